"""Search spaces over engine settings: checks against what an engine takes, its built-in
space, the grid and random points of a space.

A space maps a setting to the values to try; each engine class says which settings it takes
(`tunable`) and its built-in spaces (`tune_space`). vLLM settings are engine arguments by their
Python names (passed to `vllm serve` as flags); HF settings are the transformers engine's
load and run options. Every space is discrete: numeric settings are tried at listed values,
which keeps grid, random and Bayesian search comparable on the same points.
"""

from __future__ import annotations

import itertools
import random

from compress.errors import UserError
from eval.engines import engine_class

# The "defaults" trial every study measures sets nothing: vLLM's own defaults, and for HF
# transformers' (its default attention, a dynamic cache) at the workload's concurrency.


def builtin_space(engine: str, device: str) -> dict[str, list]:
    """The space searched when the recipe gives none (the engine's `tune_space`): small on a
    CPU (each vLLM trial is a server start, about a minute on 2 cores), wider on a GPU."""
    return engine_class(engine).tune_space(device)


def check_space(engine: str, space: dict, where: str = "eval.tune.space") -> dict[str, list]:
    """The space, or a one-line UserError naming the setting and what is allowed (the engine's
    `tunable` settings)."""
    allowed = engine_class(engine).tunable
    if not space:
        raise UserError(f"{where}: the search space is empty; give at least one setting with values "
                        f"(allowed for {engine}: {', '.join(allowed)})")
    for name, values in space.items():
        if name not in allowed:
            raise UserError(f"{where}.{name}: not a {engine} setting; allowed: {', '.join(allowed)}")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{name}: give a non-empty list of values")
        check, what = allowed[name]
        for v in values:
            if not check(v):
                raise UserError(f"{where}.{name}: {v!r} is not allowed; expected {what}")
        if len({repr(v) for v in values}) != len(values):
            raise UserError(f"{where}.{name}: repeated values in {values}")
    return {k: list(v) for k, v in space.items()}


def grid(space: dict[str, list]) -> list[dict]:
    """Every point of the space, in a fixed order."""
    names = list(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]


def sample(space: dict[str, list], n: int, seed: int) -> list[dict]:
    """n distinct points drawn at random (all of them if the space is smaller)."""
    pts = grid(space)
    random.Random(seed).shuffle(pts)
    return pts[:n]


def key(settings: dict) -> str:
    """A stable identity for a point (JSON with sorted keys)."""
    import json

    return json.dumps(settings, sort_keys=True, default=str)
