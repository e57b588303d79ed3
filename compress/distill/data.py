"""Training text for distillation, packed into fixed-length sequences.

Each data set's text is tokenized once, the sets are joined with the tokenizer's EOS between
them, and the token stream is cut into windows of seq_len + 1 (inputs and their next tokens).
The last `eval_blocks` windows are held out for the periodic perplexity and never trained on.
Batches follow a seeded permutation per epoch, so the batch at any step is a pure function of
(seed, step): resuming at step k reads exactly what an uninterrupted run would have read.
"""

from __future__ import annotations

import torch

from compress.calibration import dataset_tokens
from compress.errors import UserError


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A token stream cut into [n, seq_len + 1] windows (the tail that fills none dropped)."""
    n = ids.numel() // (seq_len + 1)
    return ids[: n * (seq_len + 1)].view(n, seq_len + 1)


def pack(tokenizer, datasets: tuple[str, ...], seq_len: int) -> torch.Tensor:
    """[n_windows, seq_len + 1] LongTensor of the joined data sets."""
    eos = tokenizer.eos_token_id
    parts = []
    for d in datasets:
        parts.append(dataset_tokens(tokenizer, d))
        if eos is not None:
            parts.append(torch.tensor([eos]))
    return windows(torch.cat(parts), seq_len)


def split(wins: torch.Tensor, eval_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training windows, the last `eval_blocks` held out)."""
    n = wins.shape[0] - eval_blocks
    return wins[:n], wins[n:]


class Packed:
    """The training windows and the held-out ones, and the batch of every step."""

    def __init__(self, wins: torch.Tensor, batch_size: int, eval_blocks: int, seed: int, where: str = "distill",
                 extra: torch.Tensor | None = None):
        """`extra`: more training windows (the teacher's own sequences), never held out."""
        n = wins.shape[0]
        if n - eval_blocks < batch_size:
            raise UserError(f"{where}.data: {n} windows of {wins.shape[1] - 1} tokens, fewer than one batch "
                            f"({batch_size}) after holding out {eval_blocks} for evaluation; add data or lower "
                            "batch_size, seq_len or eval_blocks")
        self.train, self.held_out = split(wins, eval_blocks)
        if extra is not None and extra.numel():
            self.train = torch.cat([self.train, extra])
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = self.train.shape[0] // batch_size

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.train.shape[0], generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))

    def batch(self, step: int, rank: int = 0, world: int = 1) -> torch.Tensor:
        """The micro-batch of global step `step` ([batch_size // world, seq_len + 1]) for one process."""
        epoch, k = divmod(step, self.per_epoch)
        idx = self._order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]
        per = self.batch_size // world
        return self.train[idx[rank * per:(rank + 1) * per]]

    def tokens_per_step(self) -> int:
        return self.batch_size * (self.train.shape[1] - 1)
