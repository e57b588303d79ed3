"""AWQ's scale search: a pure function of weights, input statistics and the grid.

For modules reading one input (q/k/v; gate/up; over a mixture-of-experts block every expert's
and shared expert's gate/up) and each ratio r on a grid of `n_grid` points in [0, 1):
    s = x̄^r / w̄^(1-r)      (duo_scaling; x̄^r without it), normalized to geometric mean 1
The candidate kept minimizes the output error summed over the groups,
    Σ_g n_g/N · Σ_modules tr(ΔW H_g ΔWᵀ),   ΔW = W − Q(W diag(s)) diag(1/s)
with H_g = 2/n_g XᵀX over the tokens group g sees (an expert: the tokens routed to it) and
n_g that count, so it is the error over all (token, module) pairs, each expert on its own
tokens. For an MoE block this is the cheaper objective (the routed experts' own errors,
without the routing weights or the block's summed output), not the block's output error.
s = 1 (plain RTN) is always a candidate, so the result never does worse than RTN on it.
Groups of one weight shape (the experts of a layer) are evaluated as one batch.
"""

from __future__ import annotations

import torch

from compress.collectors import HessianCollector
from compress.quant.grid import Grid, rtn


class AWQCollector(HessianCollector):
    """H = 2/n XᵀX (the search objective, and GPTQ's) plus the mean |x_j| per channel."""

    def __init__(self, in_features: int, device):
        super().__init__(in_features, device)
        self.mean_abs = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        if m == 0:  # an expert no token was routed to in this batch
            return
        self.mean_abs.mul_(self.n / (self.n + m)).add_(x2.abs().float().sum(0), alpha=1.0 / (self.n + m))
        super().add_batch(x2)


def output_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = w - q
    return ((d @ h) * d).sum().item()


def _buckets(groups: list[tuple[list[torch.Tensor], torch.Tensor, float]]):
    """[(W [B, out, in], H [B, in, in], weight [B])] of the groups stacked by weight shape."""
    by_shape: dict[tuple, list] = {}
    for ws, h, wt in groups:
        w = torch.cat([x.float() for x in ws])
        by_shape.setdefault(tuple(w.shape), []).append((w, h.float(), wt))
    return [(torch.stack([w for w, _, _ in b]), torch.stack([h for _, h, _ in b]),
             torch.tensor([wt for _, _, wt in b], dtype=torch.float32, device=b[0][0].device))
            for b in by_shape.values()]


@torch.no_grad()
def search_scales(groups: list[tuple[list[torch.Tensor], torch.Tensor, int]], x_mean: torch.Tensor, grid: Grid,
                  n_grid: int, duo: bool) -> tuple[torch.Tensor, float | None, float, float]:
    """Best per-channel scale s [in] for `groups` [(weights reading one input, H, tokens)]: (s, ratio or
    None for s = 1, loss with s, loss with s = 1 (RTN))."""
    total = sum(n for _, _, n in groups) or 1
    buckets = _buckets([(ws, h, n / total) for ws, h, n in groups])
    x_mean = x_mean.float().clamp(min=1e-8)
    ws = [b[0].reshape(-1, b[0].shape[-1]) for b in buckets]
    g = ws[0].shape[1] if grid.group_size == -1 else grid.group_size
    w_mean = torch.cat([(w.abs().reshape(w.shape[0], -1, g) /
                         w.abs().reshape(w.shape[0], -1, g).amax(-1, keepdim=True).clamp(min=1e-12))
                        .reshape(w.shape) for w in ws]).mean(0)

    def loss_for(s: torch.Tensor) -> float:
        loss = 0.0
        for w, h, wt in buckets:
            q = rtn(w.reshape(-1, w.shape[-1]) * s, grid)[0].reshape(w.shape) / s
            d = w - q
            loss += ((torch.bmm(d, h) * d).sum((1, 2)) * wt).sum().item()
        return loss

    ones = torch.ones_like(x_mean)
    base = loss_for(ones)
    best = (ones, None, base)
    for k in range(n_grid):
        r = k / n_grid
        s = x_mean.pow(r) / (w_mean.pow(1 - r) + 1e-4) if duo else x_mean.pow(r)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = loss_for(s)
        if loss < best[2]:
            best = (s, r, loss)
    return best[0], best[1], best[2], base


def mean_over(stats: list[AWQCollector]) -> torch.Tensor:
    """Mean |x_j| over the tokens of all `stats` (each weighted by its token count)."""
    total = sum(st.n for st in stats)
    if total == 0:
        return stats[0].mean_abs
    return sum(st.mean_abs * (st.n / total) for st in stats)
