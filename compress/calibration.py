"""Calibration data: token windows of a text data set at seeded random offsets.

The stages that look at activations run them through the layer-wise runner
(compress.layerwise): gptq, awq, smoothquant, static int8/fp8 activation scales, wanda,
sparsegpt, and the structured cuts' importance (MLP channels, heads, hidden channels, depth,
experts). `CalibrationConfig` is a field of each such stage's config, so the data set, sample
count and length enter the recipe hash and stage.json; StageContext.calibration (compress.stage)
draws the windows with the recipe's seed. The MoEfied built-in models are fitted on such windows
(compress.models), and distillation reads its training text through `dataset_tokens`.
Sensible sizes: 128 × 2048 tokens on a GPU (the GPTQ paper's setting); on a CPU, 32-64 × 512
keeps a 135M model within minutes.
"""

from __future__ import annotations

import functools

import torch
from pydantic import Field

from compress.data import load_text
from compress.errors import UserError
from compress.schema import Strict


class CalibrationConfig(Strict):
    dataset: str = Field("wikitext2-valid", description="built-in name, a text/.jsonl file, or hf:ID[:CONFIG[:SPLIT]]")
    n_samples: int = Field(128, gt=0, description="number of token windows")
    seq_len: int = Field(2048, gt=1, description="tokens per window")
    batch_size: int = Field(1, gt=0, description="windows per forward pass (memory vs speed)")
    calibrate_all_experts: bool = Field(False, description="mixture-of-experts models: every token also goes "
                                        "through every expert for statistics (the layer's output stays the "
                                        "routed one), so rarely routed experts are calibrated too")
    min_expert_tokens: int = Field(16, ge=0, description="a module whose statistics saw fewer tokens (an expert "
                                   "the router rarely picks) falls back: round-to-nearest for GPTQ, magnitude "
                                   "for Wanda and SparseGPT; the stage's info counts them")


@functools.lru_cache(maxsize=8)
def dataset_tokens(tokenizer, dataset: str) -> torch.Tensor:
    """The whole data set's token ids (no special tokens), tokenized once per tokenizer."""
    return tokenizer(load_text(dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]


def check_calibration(tokenizer, cfg: CalibrationConfig, where: str = "stage") -> None:
    """UserError when the data set holds fewer tokens than n_samples × seq_len."""
    n = dataset_tokens(tokenizer, cfg.dataset).numel()
    need = cfg.n_samples * cfg.seq_len
    if n < need or n <= cfg.seq_len:
        raise UserError(f"{where}.calibration: data set {cfg.dataset!r} has {n:,} tokens, fewer than "
                        f"n_samples × seq_len = {cfg.n_samples} × {cfg.seq_len} = {need:,}; lower n_samples or "
                        "seq_len, or use a larger data set")


def calibration_batches(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] token windows at seeded random offsets of a text data set."""
    ids = dataset_tokens(tokenizer, dataset)
    if ids.numel() <= seq_len:
        raise UserError(f"calibration data {dataset!r} has {ids.numel()} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
