"""The engine interface every evaluator talks to.

An engine wraps one loaded model. Perplexity calls `score`; speed calls `stream`; task
accuracy hands the loaded model to lm-eval's own backend (eval.accuracy.tasks.lm_for); smoke
checks call `generate_text`. Engines own their device and release it in `close`.
"""

from __future__ import annotations

from typing import Protocol

import torch

from eval.speed.workload import RequestTiming


class Engine(Protocol):
    name: str
    vocab_size: int
    stats: dict  # what the engine knows of the loaded model (params, memory, ...)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T-1] (float32, CPU) of input_ids[:, 1:] given the tokens before."""

    def stream(self, prompts: list[list[int]], output_len: int, concurrency: int) -> list[RequestTiming]:
        """Greedy-generate exactly `output_len` tokens per prompt (EOS ignored), at most
        `concurrency` at once; stamp each output token when it comes back."""

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of text prompts (for smoke checks)."""

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0) -> list[list[int]]:
        """Continuations (token ids, up to and including EOS) of token-id prompts, greedy at
        temperature 0, else sampled from the full distribution (seeded); for sequence-level
        distillation."""

    def close(self) -> None: ...
