"""SparseGPT (Frantar & Alistarh, 2023): prune W column by column, choosing the mask from
w² / [H⁻¹]_jj² block by block (or per N:M group) and spreading each removed weight's error
over the columns not yet processed through the inverse Hessian, as GPTQ does for rounding.

`sparsegpt_prune(W, H, sparsity, nm)` is the pure solver (shapes in its docstring); the
stage runs it on the layer-wise calibration runner with Hessian statistics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from pydantic import Field

from compress.collectors import HessianCollector
from compress.prune.calibrated import CalibratedPruneConfig, check_prune, run_pruning
from compress.quant.cuda_graph import graph_fn
from compress.quant.gptq_solver import inverse_hessian_factor
from compress.stage import Stage, StageContext


@dataclass
class SparseGPTResult:
    w: torch.Tensor            # [out, in] float32: pruned and error-compensated weights
    keep: torch.Tensor         # [out, in] bool: False where pruned
    row_error: torch.Tensor    # [out] ‖x(w_r − ŵ_r)‖² per row under the damped H
    row_energy: torch.Tensor   # [out] ‖x w_r‖² per row under H


def prune_block(w1: torch.Tensor, hinv1: torch.Tensor, keep1: torch.Tensor, q1: torch.Tensor,
                err1: torch.Tensor, k: int, n: int, m: int) -> None:
    """One block in place: w1, keep1 (0/1), q1, err1 [out, c]; hinv1 [c, c] (upper factor).

    Unstructured (m == 0): the k lowest w²/d² of each row in the block are pruned, chosen at
    the block's start. N:M (m > 0): in each group of m columns, when reached, the m - n lowest.
    No host synchronisation, so the block can be captured in a CUDA graph.
    """
    c = w1.shape[1]
    d2 = hinv1.diagonal().square()
    keep1.fill_(1.0)
    if not m and k:
        idx = torch.argsort(w1.square() / d2, dim=1, stable=True)[:, :k]
        keep1.scatter_(1, idx, 0.0)
    for i in range(c):
        if m and i % m == 0:
            idx = torch.argsort(w1[:, i:i + m].square() / d2[i:i + m], dim=1, stable=True)[:, :m - n]
            keep1[:, i:i + m].scatter_(1, idx, 0.0)
        w = w1[:, i]
        q = w * keep1[:, i]
        e = (w - q) / hinv1[i, i]
        w1[:, i + 1:].addr_(e, hinv1[i, i + 1:], alpha=-1.0)
        q1[:, i] = q
        err1[:, i] = e


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01, block_fn=prune_block) -> SparseGPTResult:
    """Prune W [out, in] against H [in, in] (inputs unchanged): per row exactly
    round(sparsity × block width) weights of every block (so round(sparsity × in) when the
    blocks divide evenly), or exactly N of every M with `nm`."""
    out, cols = w.shape
    n, m = nm if nm else (0, 0)
    if m and cols % m:
        raise ValueError(f"N:M group size {m} does not divide the input width {cols}")
    w = w.float().clone()
    h = h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    row_energy = ((w @ h) * w).sum(1)
    hinv = inverse_hessian_factor(h, damp)
    del h
    bs = -(-max(block_size, m) // m) * m if m else block_size
    keep = torch.ones_like(w)
    row_error = torch.zeros(out, device=w.device)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        w1 = w[:, i1:i2].clone()
        q1, err1, keep1 = torch.zeros_like(w1), torch.zeros_like(w1), torch.ones_like(w1)
        block_fn(w1, hinv[i1:i2, i1:i2], keep1, q1, err1, int(round(sparsity * (i2 - i1))), n, m)
        w[:, i1:i2], keep[:, i1:i2] = q1, keep1
        row_error += err1.square().sum(1)
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1.0)
    return SparseGPTResult(w=w, keep=keep.bool(), row_error=row_error, row_energy=row_energy)


class SparseGPTConfig(CalibratedPruneConfig):
    damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening added to diag(H), as a fraction of its mean")
    block_size: int = Field(128, gt=0, description="columns per block: the unstructured mask is chosen per block")
    sequential: bool = Field(True, description="prune q/k/v, o, gate/up, down in turn, each seeing the already "
                             "pruned outputs of the ones before")


def check(cfg: SparseGPTConfig, model, ctx: StageContext) -> None:
    check_prune(cfg, model, ctx, "sparsegpt")


def apply(model, cfg: SparseGPTConfig, ctx: StageContext):
    block_fn = graph_fn(prune_block, ctx.device)

    @torch.no_grad()
    def prune(mods, stats, sparsity):
        """Modules that share an input share H: their rows are solved as one matrix (exact: rows
        are independent given H), with one pass over the columns."""
        t0 = time.perf_counter()
        w = torch.cat([m.weight for m in mods])
        r = sparsegpt_prune(w, stats.h, sparsity, cfg.pattern, cfg.block_size, cfg.damp, block_fn)
        row = 0
        for m in mods:
            m.weight.copy_(r.w[row:row + m.out_features].to(m.weight.dtype))
            row += m.out_features
        err = (r.row_error.sum() / r.row_energy.sum().clamp(min=1e-30)).item()
        return {"output_rel_error": round(err, 6), "solve_seconds": round((time.perf_counter() - t0) / len(mods), 4)}

    info = run_pruning(model, cfg, ctx, "sparsegpt", lambda m, dev: HessianCollector(m.in_features, dev), prune,
                       cfg.sequential)
    return model, info


STAGE = Stage(name="sparsegpt", config=SparseGPTConfig, apply=apply, check=check, weights=True, experts=True,
              summary="SparseGPT pruning (unstructured or N:M) with error compensation, on the calibration runner.")
