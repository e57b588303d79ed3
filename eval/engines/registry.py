"""The engines by name: the one table from a recipe's engine name to its class (eval.engines.base
says what a class provides), loaded on first use so that vLLM's module is imported only where
a vLLM engine is asked for.

Callers never branch on an engine's name: they ask its class (`engine_class(name)`) for what
differs (its version, install check, options, paired settings, compression facts, ...).
"""

from __future__ import annotations

import importlib

from compress.engine_facts import EngineFacts

ENGINES = {"hf": "eval.engines.hf:HFEngine", "vllm": "eval.engines.vllm:VLLMEngine"}


def engine_class(name: str):
    """The class of engine `name` ('hf' or 'vllm')."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; allowed: {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def check_engines(engines: list[str]) -> None:
    """Refuse, in one line that says how to install it, an engine this machine lacks."""
    for e in engines:
        engine_class(e).check_installed()


def open_engine(name: str, model_dir, **kw):
    """Open an engine by name ('hf' or 'vllm') on a local HF model directory."""
    cls = engine_class(name)
    cls.check_installed()
    return cls.load(model_dir, **kw)


def engine_facts(cfg, model, device: str) -> tuple[EngineFacts, ...]:
    """What each engine of an evaluation (`cfg`: eval.config.EvalConfig) can run of a compressed
    checkpoint, on `device`'s platform, at the version installed and the dtype it will be
    opened with: StageContext.engine_facts (compress.engine_facts)."""
    out = []
    for name in cfg.engine_list():
        cls = engine_class(name)
        out.append(cls.facts(device, cls.options(cfg, model)["dtype"]))
    return tuple(out)
