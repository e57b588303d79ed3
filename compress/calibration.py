"""Calibration token batches for the stages that look at activations (Wanda, SparseGPT,
GPTQ, AWQ, SmoothQuant). They reach it through `StageContext.calibration(...)`; the
layer-wise runner (one decoder layer at a time) will consume these batches."""

from __future__ import annotations

import torch

from compress.data import load_text
from compress.errors import UserError


def calibration_batches(tokenizer, dataset: str, n_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """[n_samples, seq_len] token windows at seeded random offsets of a text data set."""
    ids = tokenizer(load_text(dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() <= seq_len:
        raise UserError(f"calibration data {dataset!r} has {ids.numel()} tokens; need more than seq_len={seq_len}")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=g)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
