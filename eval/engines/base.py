"""The engine interface every evaluator talks to.

An engine wraps one loaded model. Accuracy code calls `score`; speed code calls
`timed_generate`; smoke checks call `generate_text`. Engines own their device and
release it in `close`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class GenTiming:
    """One timed greedy generation of a [batch, input_len] prompt block."""

    batch: int
    input_len: int
    prefill_s: float          # prompt forward, up to the first new token
    step_s: list[float]       # one entry per further decode step (output_len - 1 of them)


class Engine(Protocol):
    name: str
    vocab_size: int

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T-1] (float32, CPU) of input_ids[:, 1:] given the tokens before."""

    def timed_generate(self, input_ids: torch.Tensor, new_tokens: int) -> GenTiming:
        """Greedy-generate exactly `new_tokens` tokens (EOS ignored) and time prefill and each step."""

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of text prompts (for smoke checks)."""

    def close(self) -> None: ...
