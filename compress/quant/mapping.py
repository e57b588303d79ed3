"""A smoothing mapping as a recipe writes it: the linears that read one input (`balance`) and
the op whose output that input is (`smooth`), both named inside a decoder layer.

It is the config field of smoothquant and awq; compress.quant.smooth holds the Llama family's
default mappings and folds the scales, compress.quant.smooth_moe rewrites a mapping over a
mixture-of-experts block (MoEMapping, a subclass). Kept apart so both can build on it.
"""

from __future__ import annotations

from pydantic import Field

from compress.schema import Strict


class Mapping(Strict):
    balance: list[str] = Field(min_length=1, description="linears (names inside a decoder layer) that read one "
                               "input and take the scale into their columns")
    smooth: str = Field(description="the norm or linear (name inside a decoder layer) whose output is that input: "
                        "it takes 1/scale")
