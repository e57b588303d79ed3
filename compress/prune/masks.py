"""Pruning masks from a score, and the N:M pattern. Pure functions; True = keep.

  row_mask(score, sparsity)  per output row, the round(sparsity * in) lowest scores pruned
  nm_mask(score, n, m)       in every group of m consecutive input columns, the n highest kept
  wanda_score(W, sq_norm)    |W| * ||X_j||: Wanda's metric (Sun et al., 2023)
  wanda_mask(W, sq_norm, ...) the two above together

Ties are broken by position (stable sort), so counts are exact even on equal scores.
"""

from __future__ import annotations

import torch


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep n of every m; None passes through."""
    if nm is None:
        return None
    n, _, m = nm.partition(":")
    if not (n.isdigit() and m.isdigit()) or not 0 < int(n) < int(m):
        raise ValueError(f"N:M pattern must look like '2:4' with 0 < N < M, got {nm!r}")
    return int(n), int(m)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """score [out, in] -> keep [out, in] bool with exactly round(sparsity * in) False per row."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    k = int(round(sparsity * score.shape[1]))
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        idx = torch.argsort(score.float(), dim=1, stable=True)[:, :k]
        keep.scatter_(1, idx, False)
    return keep


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """score [out, in] (in % m == 0) -> keep [out, in] bool with exactly n True per group of m."""
    out, cols = score.shape
    if cols % m:
        raise ValueError(f"N:M group size {m} does not divide the input width {cols}")
    g = score.float().reshape(out, cols // m, m)
    idx = torch.argsort(g, dim=2, stable=True)[:, :, : m - n]
    keep = torch.ones_like(g, dtype=torch.bool)
    keep.scatter_(2, idx, False)
    return keep.reshape(out, cols)


def wanda_score(w: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """W [out, in], mean x_j² per input channel [in] -> |W_ij| * sqrt(mean x_j²) [out, in]."""
    return w.float().abs() * sq_norm.float().sqrt().unsqueeze(0)


def wanda_mask(w: torch.Tensor, sq_norm: torch.Tensor, sparsity: float,
               nm: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda's keep-mask: scores compared within each output row (or each N:M group)."""
    score = wanda_score(w, sq_norm)
    return nm_mask(score, *nm) if nm else row_mask(score, sparsity)


def outlier_ratio(score: torch.Tensor, m: float = 5.0) -> float:
    """Fraction of scores above m times their mean (OWL's layer-wise outlier distribution)."""
    s = score.float()
    return (s > m * s.mean()).float().mean().item()


def owl_sparsities(ratios: list[float], target: float, lam: float) -> list[float]:
    """OWL (Yin et al., 2024): per-layer sparsity around `target` from each layer's outlier
    ratio; more outliers, less pruning. As in OWL's code, densities are the ratios scaled to
    a span of 2*lam and shifted to average 1 - target: the mean sparsity is `target` and the
    layers spread over 2*lam (clipped to [0, 0.99])."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    dens = (r - r.min()) / span * 2 * lam if span > 0 else torch.zeros_like(r)
    dens = dens - dens.mean() + (1 - target)
    return [min(max(1 - d, 0.0), 0.99) for d in dens.tolist()]
