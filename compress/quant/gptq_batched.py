"""GPTQ for many matrices of one shape at once: the experts of a mixture-of-experts layer.

The same algorithm as `compress.quant.gptq.gptq_quantize` (read its docstring), with a
leading batch dimension on every tensor: W [E, out, in] against its own Hessians H [E, in, in].
Each column step is one set of kernels for all E experts instead of E Python loops, which is
what makes a 128-expert layer cost about what one dense MLP costs on a GPU (the peer reports
~30x from batching its MoE GPTQ). Activation order permutes each expert's columns by its own
diag(H); groups, scales and g_idx follow per expert exactly as in the single-matrix solver.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compress.quant.gptq_solver import ActOrder, HessianError
from compress.quant.grid import Grid, fake_quantize, qparams


@dataclass
class BatchedResult:
    q: torch.Tensor              # [E, out, in] float32, on the grid
    scale: torch.Tensor          # [E, out, G]
    zero: torch.Tensor           # [E, out, G]
    g_idx: torch.Tensor | None   # [E, in] int32 (actorder "group")
    row_error: torch.Tensor      # [E, out]
    row_energy: torch.Tensor     # [E, out]


def inverse_hessian_factors(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factors of (H_e + damp · mean(diag H_e) · I)^-1, [E, in, in] float32 (h is overwritten)."""
    d = h.diagonal(dim1=-2, dim2=-1)
    d.add_(damp * d.mean(-1, keepdim=True))
    chol, info = torch.linalg.cholesky_ex(h)
    if bool((info != 0).any()):
        raise HessianError(f"a damped Hessian is not positive definite (damp={damp}); raise `damp`")
    h = torch.cholesky_inverse(chol)
    chol, info = torch.linalg.cholesky_ex(h, upper=True)
    if bool((info != 0).any()):
        raise HessianError(f"a damped Hessian is not positive definite (damp={damp}); raise `damp`")
    return chol


def solve_block_batched(w1, hinv1, s1, z1, q1, err1, grid: Grid, dynamic_group: int, keep1=None) -> None:
    """One lazy-batch block for all experts, in place: w1, q1, err1, s1, z1 [E, out, c]; hinv1 [E, c, c]."""
    c = w1.shape[-1]
    for i in range(c):
        if dynamic_group and i % dynamic_group == 0:
            s, z = qparams(w1[..., i:i + dynamic_group], grid)
            s1[..., i:i + dynamic_group] = s
            z1[..., i:i + dynamic_group] = z
        w = w1[..., i]
        q = fake_quantize(w, s1[..., i], z1[..., i], grid)
        if keep1 is not None:
            q = q * keep1[..., i]
        e = (w - q) / hinv1[:, i, i, None]
        w1[..., i + 1:] -= e[..., None] * hinv1[:, None, i, i + 1:]
        q1[..., i] = q
        err1[..., i] = e


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t [E, out, n] columns idx [E, k] per expert -> [E, out, k]."""
    return t.gather(-1, idx[:, None, :].expand(-1, t.shape[1], -1))


def gptq_quantize_batched(w: torch.Tensor, h: torch.Tensor, grid: Grid, block_size: int = 128,
                          damp: float = 0.01, actorder: ActOrder = None, block_fn=solve_block_batched,
                          keep: torch.Tensor | None = None) -> BatchedResult:
    """Quantize W [E, out, in] against H [E, in, in] (overwritten); see the module docstring."""
    n_e, out, n = w.shape
    gs = n if grid.group_size == -1 else grid.group_size
    if n % gs:
        raise ValueError(f"group size {gs} does not divide the input width {n}")
    w = w.float().clone()
    h = h.float()
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    keep = None if keep is None else keep.float()

    static = grid.group_size == -1 or actorder == "weight"
    cols = torch.arange(n, device=w.device).expand(n_e, n)
    col_group = cols // gs
    if static:
        s, z = qparams(w.reshape(n_e, out, n // gs, gs), grid)
        scale, zero = s.squeeze(-1), z.squeeze(-1)
    else:
        scale = torch.zeros(n_e, out, n // gs, device=w.device)
        zero = torch.zeros_like(scale)
    perm = torch.argsort(diag, dim=-1, descending=True, stable=True) if actorder else None
    if perm is not None:
        w, col_group = _take(w, perm), col_group.gather(-1, perm)
        keep = None if keep is None else _take(keep, perm)
        h = h.gather(1, perm[:, :, None].expand(-1, -1, n)).gather(2, perm[:, None, :].expand(-1, n, -1))
    row_energy = ((w @ h) * w).sum(-1)
    hinv = inverse_hessian_factors(h, damp)
    del h

    bs = block_size if static else -(-max(block_size, gs) // gs) * gs
    q = torch.zeros_like(w)
    row_error = torch.zeros(n_e, out, device=w.device)
    for i1 in range(0, n, bs):
        i2 = min(i1 + bs, n)
        w1 = w[..., i1:i2].clone()
        err1, q1 = torch.zeros_like(w1), torch.zeros_like(w1)
        if static:
            s1, z1 = _take(scale, col_group[:, i1:i2]), _take(zero, col_group[:, i1:i2])
        else:
            s1, z1 = torch.empty_like(w1), torch.empty_like(w1)
        keep1 = None if keep is None else keep[..., i1:i2].contiguous()
        block_fn(w1, hinv[:, i1:i2, i1:i2].contiguous(), s1, z1, q1, err1, grid, 0 if static else gs, keep1)
        q[..., i1:i2] = q1
        if not static:
            scale[..., i1 // gs:i2 // gs], zero[..., i1 // gs:i2 // gs] = s1[..., ::gs], z1[..., ::gs]
        row_error += err1.square().sum(-1)
        w[..., i2:] -= err1 @ hinv[:, i1:i2, i2:]

    g_idx = None
    if not static and perm is not None:
        g_idx = torch.empty(n_e, n, dtype=torch.int32, device=w.device)
        g_idx.scatter_(1, perm, (cols // gs).int())
    if perm is not None:
        q = _take(q, torch.argsort(perm, dim=-1))
    return BatchedResult(q=q, scale=scale, zero=zero, g_idx=g_idx, row_error=row_error, row_energy=row_energy)
