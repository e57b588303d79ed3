"""GPTQ's solver (Frantar et al., 2022): quantize W column by column, spreading each column's rounding
error over the columns not yet quantized through the inverse Hessian of the layer's inputs.

`gptq_quantize(W, H, grid, ...)` is the pure solver: tensors in, tensors out, no hooks or
device moves. H = 2/n XᵀX over the calibration inputs X [n, in] (see
compress.collectors.HessianCollector); the objective is ‖XWᵀ − XQᵀ‖².

Activation order (`actorder`), in the two forms compressed-tensors and vLLM know:
  * "weight": columns are solved in decreasing diag(H) order, but groups stay contiguous in
    the original column order with their scales fixed up front from W: no g_idx is stored and
    kernels run at full speed;
  * "group": columns are solved in decreasing diag(H) order and each group is the next
    `group_size` columns of that order, its scale fixed when it is reached (the paper's
    act-order): a g_idx [in] maps each column to its group and is stored with the weights.
Without actorder, groups are contiguous and each one's scale is fixed when it is reached.

The lazy-batch block size only changes the floating-point order of the updates, not the
result; it is rounded up to a multiple of the group size so every group lies in one block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compress.quant.grid import Grid, fake_quantize, group_qparams, qparams

ActOrder = Literal["weight", "group"] | None


@dataclass
class GPTQResult:
    q: torch.Tensor                  # [out, in] float32, fake-quantized (on the grid)
    scale: torch.Tensor              # [out, G] float32 (storable in grid.scale_dtype)
    zero: torch.Tensor               # [out, G] float32 integers (0 when symmetric)
    g_idx: torch.Tensor | None       # [in] int32 group of each column (actorder "group" only)
    loss: float                      # GPTQ's objective: sum((w - q)^2 / d^2) / 2
    row_error: torch.Tensor          # [out] ‖x(w_r − q_r)‖² per row, under the damped H (= 2 × its loss)
    row_energy: torch.Tensor         # [out] ‖x w_r‖² per row, under H: row_error / row_energy is relative


class HessianError(ValueError):
    pass


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 [in, in] (float32).

    Works in `h`'s memory plus one more [in, in] buffer (`h` is overwritten with (H+dI)^-1):
    for an 8B model's down_proj each is 0.8 GB, so copies count."""
    h.diagonal().add_(damp * h.diagonal().mean())
    chol, info = torch.linalg.cholesky_ex(h)
    if info.item() == 0:
        torch.cholesky_inverse(chol, out=h)
        torch.linalg.cholesky_ex(h, upper=True, out=(chol, info))
    if info.item() != 0:
        raise HessianError(f"the damped Hessian is not positive definite (damp={damp}); raise `damp`")
    return chol


def solve_block(w1: torch.Tensor, hinv1: torch.Tensor, s1: torch.Tensor, z1: torch.Tensor,
                q1: torch.Tensor, err1: torch.Tensor, grid: Grid, dynamic_group: int,
                keep1: torch.Tensor | None = None) -> None:
    """One lazy-batch block, in place: w1, q1, err1, s1, z1 [out, c]; hinv1 [c, c].

    dynamic_group > 0: each group of that many columns gets its scale/zero from the current
    (error-updated) weights when reached, written into s1/z1; else s1/z1 are given.
    keep1 [out, c] (0/1): weights that must end exactly 0 where it is 0 (a pruned model
    stays pruned; zero is on every grid). No host synchronisation, so the block can be
    captured in a CUDA graph.
    """
    c = w1.shape[1]
    for i in range(c):
        if dynamic_group and i % dynamic_group == 0:
            s, z = qparams(w1[:, i:i + dynamic_group], grid)
            s1[:, i:i + dynamic_group] = s
            z1[:, i:i + dynamic_group] = z
        w = w1[:, i]
        q = fake_quantize(w, s1[:, i], z1[:, i], grid)
        if keep1 is not None:
            q = q * keep1[:, i]
        e = (w - q) / hinv1[i, i]
        w1[:, i + 1:].addr_(e, hinv1[i, i + 1:], alpha=-1.0)
        q1[:, i] = q
        err1[:, i] = e


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, grid: Grid, block_size: int = 128,
                  damp: float = 0.01, actorder: ActOrder = None, block_fn=solve_block,
                  overwrite_h: bool = False, keep: torch.Tensor | None = None) -> GPTQResult:
    """Quantize W [out, in] against the Hessian H [in, in]; see the module docstring.

    `block_fn` runs one block (default `solve_block`; the CUDA-graph runner replays the same
    computation faster). W is not modified; H is used as scratch space when `overwrite_h`
    (then the solver needs one more [in, in] buffer, else two). `keep` [out, in] bool: where
    False the result is exactly 0 (a pruned layer stays pruned; the rounding error of those
    weights is spread over the others like any other).
    """
    out, n = w.shape
    gs = n if grid.group_size == -1 else grid.group_size
    if n % gs:
        raise ValueError(f"group size {gs} does not divide the input width {n}")
    if actorder == "group" and grid.group_size == -1:
        raise ValueError("actorder 'group' needs a group size; use actorder 'weight' per channel")
    w = w.float().clone()
    h = h if overwrite_h and h.dtype == torch.float32 else h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    static = grid.group_size == -1 or actorder == "weight"
    col_group = torch.arange(n, device=w.device) // gs   # group of each column, original order
    if static:  # scales fixed up front from W, groups contiguous in the original order
        scale, zero = group_qparams(w, grid)
    else:
        scale = torch.zeros(out, n // gs, device=w.device)
        zero = torch.zeros_like(scale)
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if actorder else None
    keep = None if keep is None else keep.float()
    if perm is not None:
        w, keep, col_group = _permute(w, h, keep, col_group, perm)
    row_energy = ((w @ h) * w).sum(1)
    hinv = inverse_hessian_factor(h, damp)
    del h

    bs = block_size if static else -(-max(block_size, gs) // gs) * gs
    q, row_error = _solve_blocks(w, hinv, scale, zero, col_group, keep, grid, 0 if static else gs, bs, block_fn)
    g_idx = None
    if not static and perm is not None:
        g_idx = torch.empty(n, dtype=torch.int32, device=w.device)
        g_idx[perm] = (torch.arange(n, device=w.device) // gs).int()
    if perm is not None:
        q = q[:, torch.argsort(perm)]
    return GPTQResult(q=q, scale=scale, zero=zero, g_idx=g_idx, loss=row_error.sum().item() / 2,
                      row_error=row_error, row_energy=row_energy)


def _permute(w: torch.Tensor, h: torch.Tensor, keep: torch.Tensor | None, col_group: torch.Tensor,
             perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Columns of W, keep and col_group, and rows and columns of H (in place), in solving order."""
    w = w[:, perm]
    keep = None if keep is None else keep[:, perm]
    h.copy_(h.index_select(0, perm))
    h.copy_(h.index_select(1, perm))
    return w, keep, col_group[perm]


def _solve_blocks(w: torch.Tensor, hinv: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  col_group: torch.Tensor, keep: torch.Tensor | None, grid: Grid, dynamic_group: int, bs: int,
                  block_fn) -> tuple[torch.Tensor, torch.Tensor]:
    """The lazy-batch loop over blocks of `bs` columns: (Q [out, in] in solving order, row error [out]).

    W is updated in place with each block's error. With `dynamic_group` (> 0, the group size)
    each group's scale and zero are fixed when reached and written into `scale` / `zero`; else
    they are read from there (fixed up front)."""
    out, n = w.shape
    gs = dynamic_group
    q = torch.zeros_like(w)
    row_error = torch.zeros(out, device=w.device)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        q1 = torch.zeros_like(w1)
        if not gs:
            s1, z1 = scale[:, col_group[i1:i2]], zero[:, col_group[i1:i2]]
        else:
            s1, z1 = torch.empty_like(w1), torch.empty_like(w1)
        keep1 = None if keep is None else keep[:, i1:i2].contiguous()
        block_fn(w1, hinv[i1:i2, i1:i2], s1, z1, q1, err1, grid, gs, keep1)
        q[:, i1:i2] = q1
        if gs:  # group k = processed columns k*gs .. (k+1)*gs - 1
            scale[:, i1 // gs:i2 // gs], zero[:, i1 // gs:i2 // gs] = s1[:, ::gs], z1[:, ::gs]
        row_error += err1.square().sum(1)
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return q, row_error


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) = ‖X(W−Q)ᵀ‖² / ‖XWᵀ‖² (W, Q [out, in])."""
    w, d = w.float(), (w.float() - q.float())
    num = ((d @ h) * d).sum()
    den = ((w @ h) * w).sum()
    return (num / den.clamp(min=1e-30)).item()
