"""Inference engines behind one small interface (see base.Engine). vLLM is imported lazily."""

from __future__ import annotations


def open_engine(name: str, model_dir, **kw):
    """Open an engine by name ('hf' or 'vllm') on a local HF model directory."""
    if name == "hf":
        from eval.engines.hf import HFEngine

        return HFEngine.load(model_dir, **kw)
    if name == "vllm":
        from eval.engines.vllm import VLLMEngine

        return VLLMEngine.load(model_dir, **kw)
    raise ValueError(f"unknown engine {name!r}; allowed: hf, vllm")
