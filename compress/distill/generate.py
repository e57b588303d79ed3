"""Sequence-level distillation data: the teacher's own continuations of prompts cut from the
training text (Kim & Rush, 2016), generated once through an engine the layer above supplies
(StageContext.open_engine: vLLM where it is installed and the stage runs on a GPU, else
transformers), kept in the stage's work directory so that a resumed run trains on the same
sequences, and packed into windows like the text. This module never imports the evaluator."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable

import torch

from compress.distill.data import windows
from compress.errors import UserError


def engine_for(choice: str, device: str) -> str:
    """The engine `choice` names; auto: vllm on a GPU where it is installed, else hf."""
    if choice != "auto":
        return choice
    return "vllm" if device.startswith("cuda") and importlib.util.find_spec("vllm") else "hf"


def teacher_windows(teacher_dir: Path, train: torch.Tensor, gcfg, seq_len: int, eos: int | None, device: str,
                    seed: int, cache: Path | None = None, log=print, *,
                    open_engine: Callable[..., Any] | None) -> torch.Tensor:
    """[n, seq_len + 1] windows of prompt + continuation sequences (joined with EOS), from
    `gcfg.sequences` prompts: the first `prompt_len` tokens of seeded random training windows.
    open_engine(name, model_dir, *, dtype, device, **options) opens the teacher's engine
    (StageContext.open_engine); only a run that generates needs it, not one that reads `cache`."""
    if cache is not None and cache.is_file():
        return torch.load(cache)
    if open_engine is None:
        raise UserError("distill.data.generated needs an engine factory (StageContext.open_engine): run the stage "
                        "through the pipeline")
    g = torch.Generator().manual_seed(seed + 7919)
    pick = torch.randint(0, train.shape[0], (gcfg.sequences,), generator=g)
    prompts = train[pick, : gcfg.prompt_len].tolist()
    engine, dtype = engine_for(gcfg.engine, device), "bfloat16" if device.startswith("cuda") else "float32"
    log(f"distill: the teacher continues {len(prompts)} prompts of {gcfg.prompt_len} tokens by up to "
        f"{gcfg.new_tokens} ({engine} engine, temperature {gcfg.temperature:g})")
    options = {"max_model_len": gcfg.prompt_len + gcfg.new_tokens + 8} if engine == "vllm" else {}
    eng = open_engine(engine, teacher_dir, dtype=dtype, device=device, **options)
    try:
        conts = eng.generate_ids(prompts, gcfg.new_tokens, gcfg.temperature, seed)
    finally:
        eng.close()
    seqs = []
    for p, c in zip(prompts, conts):
        seqs += p + c
        if eos is not None and (not c or c[-1] != eos):
            seqs.append(eos)
    out = windows(torch.tensor(seqs, dtype=torch.long), seq_len)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(cache)
    return out
