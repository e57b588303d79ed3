"""Search spaces over engine settings: what may be tuned per engine, built-in spaces, checks.

A space maps a setting to the values to try. vLLM settings are engine arguments by their
Python names (passed to `vllm serve` as flags); HF settings are the transformers engine's
load and run options. Every space is discrete: numeric settings are tried at listed values,
which keeps grid, random and Bayesian search comparable on the same points.
"""

from __future__ import annotations

import itertools
import random

from compress.errors import UserError

# setting -> (type check, what is allowed, as said in errors)
VLLM_SETTINGS = {
    "max_num_seqs": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "max_num_batched_tokens": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
    "block_size": (lambda v: v in (8, 16, 32, 64, 128), "8, 16, 32, 64 or 128"),
    "enable_chunked_prefill": (lambda v: isinstance(v, bool), "true or false"),
    "enable_prefix_caching": (lambda v: isinstance(v, bool), "true or false"),
    "enforce_eager": (lambda v: isinstance(v, bool), "true (no CUDA graphs / compilation) or false"),
    "compilation_config": (lambda v: isinstance(v, (dict, int)), "a vLLM compilation config: a level or a mapping"),
    "gpu_memory_utilization": (lambda v: isinstance(v, float) and 0 < v <= 1, "a number in (0, 1]"),
    "kv_cache_dtype": (lambda v: isinstance(v, str), "auto, fp8, fp8_e4m3, fp8_e5m2, ..."),
}
HF_SETTINGS = {
    "batch_size": (lambda v: isinstance(v, int) and v > 0, "a positive integer (requests per static batch)"),
    "attn_implementation": (lambda v: v in ("eager", "sdpa", "flash_attention_2"), "eager, sdpa, flash_attention_2"),
    "decode": (lambda v: v in ("dynamic", "static", "cuda_graph"), "dynamic, static, cuda_graph"),
    "compile_decode": (lambda v: isinstance(v, bool), "true or false (torch.compile the static decode step)"),
    "dtype": (lambda v: v in ("float32", "bfloat16", "float16"), "float32, bfloat16, float16"),
}
SETTINGS = {"vllm": VLLM_SETTINGS, "hf": HF_SETTINGS}

# The "defaults" trial every study measures sets nothing: vLLM's own defaults, and for HF
# transformers' (its default attention, a dynamic cache) at the workload's concurrency.


def builtin_space(engine: str, device: str) -> dict[str, list]:
    """The space searched when the recipe gives none: small on a CPU (each vLLM trial is a
    server start, about a minute on 2 cores), wider on a GPU."""
    gpu = device.startswith("cuda")
    if engine == "vllm":
        if gpu:
            return {"max_num_seqs": [64, 128, 256, 512], "max_num_batched_tokens": [2048, 8192, 16384],
                    "enable_chunked_prefill": [True, False], "block_size": [16, 32]}
        return {"max_num_seqs": [2, 8], "max_num_batched_tokens": [256, 2048]}
    if gpu:
        return {"batch_size": [8, 32, 64, 128], "attn_implementation": ["eager", "sdpa"],
                "decode": ["dynamic", "static", "cuda_graph"]}
    return {"batch_size": [1, 4, 8], "attn_implementation": ["eager", "sdpa"]}


def check_space(engine: str, space: dict, where: str = "eval.tune.space") -> dict[str, list]:
    """The space, or a one-line UserError naming the setting and what is allowed."""
    allowed = SETTINGS[engine]
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
