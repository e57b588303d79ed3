"""bitsandbytes NF4, FP4 and LLM.int8(): checkpoints in the format transformers loads back and
vLLM's bitsandbytes loader reads on a GPU.

The quantization itself is the bitsandbytes library's, through transformers' own integration
(`BitsAndBytesConfig`): the stage's input checkpoint is loaded with it (every nn.Linear but
the ignored ones becomes a bnb Linear4bit / Linear8bitLt, quantized as its weights load) and
saved with transformers' bnb serialization. No calibration data: NF4 and FP4 are
blockwise (64 weights per absmax scale, optionally with the scales quantized again: double
quantization), int8 is per row with the outlier columns kept in 16 bits at run time.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from compress.engine_facts import BitsAndBytes, engine_problems
from compress.errors import UserError
from compress.export.compressed_tensors import refuse_quantized
from compress.select import linear_names, unmatched
from compress.stage import Stage, StageContext
from compress.schema import Strict

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class BnBConfig(Strict):
    quant_type: Literal["nf4", "fp4", "int8"] = Field("nf4", description="4-bit NormalFloat, 4-bit float, or "
                                                      "LLM.int8() 8-bit")
    double_quant: bool = Field(True, description="4-bit: quantize the block scales too (saves ~0.4 bit/weight)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="4-bit: the dtype weights are dequantized to for each matmul")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="module names (last part, e.g. "
                              "lm_head) left unquantized")


def _bnb_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("bitsandbytes")
    except Exception:  # noqa: BLE001 - not installed
        return None


def refusals(ctx: StageContext) -> list[str]:
    """Why the checkpoint cannot be written here, or not run by an engine of the recipe."""
    out = []
    if _bnb_version() is None:
        out.append("the bitsandbytes package is not installed (pip install 'squeeze[bnb]' or bitsandbytes>=0.48)")
    return out + engine_problems(ctx.engine_facts, BitsAndBytes())


def check(cfg: BnBConfig, model, ctx: StageContext) -> None:
    refuse_quantized(ctx.model_dir, "bnb")
    problems = refusals(ctx)
    if problems:
        raise UserError(*(f"bnb: {p}" for p in problems))
    last = {n.rsplit(".", 1)[-1] for n in linear_names(model)} | set(linear_names(model))
    bad = [p for p in unmatched(cfg.ignore, last) if p != "lm_head"]
    if bad:
        raise UserError(f"bnb.ignore: {bad[0]!r} names no nn.Linear module")
    if ctx.model_dir is None:
        raise UserError("bnb: needs its input as a checkpoint directory")


def apply(model, cfg: BnBConfig, ctx: StageContext):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check(cfg, model, ctx)
    dtype = next(model.parameters()).dtype
    del model  # the same weights are re-read from the input directory, quantized as they load
    four = cfg.quant_type != "int8"
    q = BitsAndBytesConfig(load_in_4bit=four, load_in_8bit=not four,
                           **({"bnb_4bit_quant_type": cfg.quant_type, "bnb_4bit_use_double_quant": cfg.double_quant,
                               "bnb_4bit_compute_dtype": DTYPES[cfg.compute_dtype]} if four else {}),
                           llm_int8_skip_modules=list(cfg.ignore))
    t0 = time.perf_counter()
    dev = ctx.device if ctx.device.startswith("cuda") else "cpu"
    model = AutoModelForCausalLM.from_pretrained(ctx.model_dir, quantization_config=q, dtype=dtype,
                                                 device_map=dev)
    model.eval()
    n = sum(1 for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt"))
    return model, {"scheme": {"nf4": "NF4", "fp4": "FP4", "int8": "LLM.int8"}[cfg.quant_type] + " (bitsandbytes)",
                   "quant_type": cfg.quant_type, "double_quant": cfg.double_quant if four else None,
                   "compute_dtype": cfg.compute_dtype if four else None, "quantized_modules": n,
                   "bitsandbytes": _bnb_version(), "seconds_quantize": round(time.perf_counter() - t0, 3)}


STAGE = Stage(name="bnb", config=BnBConfig, apply=apply, check=check, quantizes=True, weights=True,
              summary="bitsandbytes NF4 / FP4 / LLM.int8() through transformers, saved in its bnb serialization.")
