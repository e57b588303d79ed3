"""AWQ (Lin et al., 2024): activation-aware per-channel scales for 4-bit weights, searched on a
grid, folded into the op before, then the weights quantized (RTN, or GPTQ).

For each mapping (compress.quant.smooth: input_layernorm -> q/k/v, v_proj -> o_proj where
their widths match, post_attention_layernorm -> gate/up, up_proj -> down_proj) and each ratio
r on a grid of `n_grid` points in [0, 1):
    s = x̄^r / w̄^(1-r)      (duo_scaling; x̄^r without it), normalized to geometric mean 1
where x̄_j is the mean |x_j| over the calibration tokens and w̄_j the mean of the weights'
|W_:,j| relative to their group's max. The candidate kept minimizes the group's output error
    Σ_modules ‖X Wᵀ − X diag(1/s) Q(W diag(s))ᵀ‖² = Σ tr(ΔW H ΔWᵀ),   ΔW = W − Q(W diag(s)) diag(1/s)
computed from the Hessian H = 2/n XᵀX the runner collects (no activations are stored, so the
cost per candidate is one rounding and one [out, in] × [in, in] product). s = 1 (plain RTN)
is always a candidate, so the chosen scales never do worse than RTN on that objective.

All groups of a decoder layer are searched on the unquantized layer's inputs first (the
scales of down_proj fold into up_proj's rows, which must not be quantized yet), then the
layer is quantized: RTN with the group's grid, or GPTQ with the Hessian of the scaled inputs
H' = diag(1/s) H diag(1/s). The checkpoint is pack-quantized like RTN and GPTQ's.
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import HessianCollector
from compress.export.compressed_tensors import QuantRecord, WeightScheme, attach
from compress.layerwise import decoder_layers, run_layerwise, split_by_layer
from compress.quant.common import WeightQuantConfig, check_weight_quant, group_summary, row_slices, store
from compress.quant.cuda_graph import graph_fn
from compress.quant.gptq_solver import gptq_quantize, solve_block
from compress.quant.grid import Grid, rtn
from compress.quant.smooth import AWQ_MAPPINGS, Mapping, fold, mapping_for, resolve
from compress.stage import Stage, StageContext


class AWQCollector(HessianCollector):
    """H = 2/n XᵀX (the search objective, and GPTQ's) plus the mean |x_j| per channel."""

    def __init__(self, in_features: int, device):
        super().__init__(in_features, device)
        self.mean_abs = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        self.mean_abs.mul_(self.n / (self.n + m)).add_(x2.abs().float().sum(0), alpha=1.0 / (self.n + m))
        super().add_batch(x2)


class AWQConfig(WeightQuantConfig):
    symmetric: bool = Field(False, description="false: a zero point per group (AWQ's default); true: symmetric")
    n_grid: int = Field(20, ge=2, le=100, description="ratios r = 0, 1/n, ..., (n-1)/n tried per mapping")
    duo_scaling: bool = Field(True, description="scales from activations and weights (x̄^r / w̄^(1-r)); false: "
                              "activations only (x̄^r, the paper's form)")
    quantizer: Literal["rtn", "gptq"] = Field("rtn", description="how the scaled weights are quantized")
    damp: float = Field(0.01, gt=0.0, le=1.0, description="gptq: dampening of diag(H)")
    block_size: int = Field(128, gt=0, description="gptq: columns per lazy-batch block")
    actorder: Literal["weight"] | None = Field(None, description="gptq: 'weight' solves columns in activation "
                                               "order with contiguous groups")
    mappings: list[Mapping] | None = Field(None, description="op -> linears pairs inside a decoder layer; default: "
                                           "the Llama family's four")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _gptq_only(self):
        if self.quantizer == "rtn" and "actorder" in self.model_fields_set and self.actorder:
            raise ValueError("actorder applies to quantizer: gptq")
        return self


def check(cfg: AWQConfig, model, ctx: StageContext) -> None:
    names = check_weight_quant(cfg, model, ctx, "awq", cfg.actorder)
    resolve(model, cfg.mappings or AWQ_MAPPINGS, set(names), "awq", required=cfg.mappings is not None)
    if ctx.tokenizer is not None:
        check_calibration(ctx.tokenizer, cfg.calibration, "awq")


def output_loss(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    d = w - q
    return ((d @ h) * d).sum().item()


@torch.no_grad()
def search_scales(weights: list[torch.Tensor], h: torch.Tensor, x_mean: torch.Tensor, grid: Grid, n_grid: int,
                  duo: bool) -> tuple[torch.Tensor, float | None, float, float]:
    """Best per-channel scale s [in] for modules reading one input: (s, ratio or None for s = 1,
    loss with s, loss with s = 1 (RTN))."""
    ws = [w.float() for w in weights]
    x_mean = x_mean.float().clamp(min=1e-8)
    g = ws[0].shape[1] if grid.group_size == -1 else grid.group_size
    w_mean = torch.cat([(w.abs().reshape(w.shape[0], -1, g) /
                         w.abs().reshape(w.shape[0], -1, g).amax(-1, keepdim=True).clamp(min=1e-12))
                        .reshape(w.shape) for w in ws]).mean(0)

    def loss_for(s: torch.Tensor) -> float:
        return sum(output_loss(w, rtn(w * s, grid)[0] / s, h) for w in ws)

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


def apply(model, cfg: AWQConfig, ctx: StageContext):
    names = check_weight_quant(cfg, model, ctx, "awq", cfg.actorder)
    plan = resolve(model, cfg.mappings or AWQ_MAPPINGS, set(names), "awq", required=cfg.mappings is not None)
    layers_name, layers = decoder_layers(model)
    by_layer = {i: set(r) for i, r in split_by_layer(layers_name, len(layers), names).items()}
    c = cfg.calibration
    calib = ctx.calibration(c)
    records: dict[str, QuantRecord] = {}
    schemes: dict[str, WeightScheme] = {}
    qinfo: dict[str, dict] = {}
    pending: dict[int, list] = {}
    block_fn = graph_fn(solve_block, ctx.device)
    t_search = [0.0]

    def quantize_layer(i: int) -> None:
        for group, stats, s, scheme in pending.pop(i):
            mods = list(group.values())
            grid = Grid(bits=cfg.bits, symmetric=cfg.symmetric, group_size=scheme.group_size,
                        scale_dtype=mods[0].weight.dtype)
            w = torch.cat([m.weight for m in mods]).float()
            if cfg.quantizer == "gptq":
                if s is not None:  # inputs are x / s now: H' = diag(1/s) H diag(1/s)
                    inv = 1.0 / s
                    stats.h.mul_(inv[:, None]).mul_(inv[None, :])
                r = gptq_quantize(w, stats.h, grid, cfg.block_size, cfg.damp, cfg.actorder, block_fn=block_fn,
                                  overwrite_h=True)
                q, scale, zero = r.q, r.scale, r.zero
            else:
                q, scale, zero = rtn(w, grid)
            stats.h = None
            for rel, m, rows in row_slices(group):
                name = f"{layers_name}.{i}.{rel}"
                err = ((w[rows] - q[rows]).norm() / w[rows].norm().clamp(min=1e-30)).item()
                records[name] = store(m, q[rows], scale[rows], zero[rows])
                schemes[name] = scheme
                qinfo[name] = {"weight_rel_error": round(err, 6), "group_size": grid.group_size}

    def solve(i: int, group: dict[str, torch.nn.Linear], stats: AWQCollector) -> dict[str, dict]:
        layer = layers[i]
        mods = list(group.values())
        scheme = cfg.scheme(mods[0].in_features, cfg.actorder)
        hit = mapping_for(plan[i], list(group))
        out: dict = {"scaled": False}
        s = None
        if hit is not None and hit[1] is None:
            t0 = time.perf_counter()
            mp = hit[0]
            grid = Grid(bits=cfg.bits, symmetric=cfg.symmetric, group_size=scheme.group_size,
                        scale_dtype=mods[0].weight.dtype)
            w_dev = [m.weight for m in mods]
            s, ratio, loss, base = search_scales(w_dev, stats.h, stats.mean_abs, grid, cfg.n_grid, cfg.duo_scaling)
            if ratio is None:
                s = None
            else:
                fold(layer.get_submodule(mp.smooth), [layer.get_submodule(b) for b in mp.balance], s)
            t_search[0] += time.perf_counter() - t0
            out = {"scaled": s is not None, "by": mp.smooth, "ratio": ratio,
                   "search_loss_over_rtn": round(loss / base, 5) if base > 0 else 1.0}
        elif hit is not None:
            out["note"] = hit[1]
        pending.setdefault(i, []).append((group, stats, s, scheme))
        by_layer[i] -= set(group)
        if not by_layer[i]:
            quantize_layer(i)
        return {rel: dict(out) for rel in group}

    info = run_layerwise(model, calib, names, lambda m, dev: AWQCollector(m.in_features, dev), solve, ctx.device,
                         sequential=False, batch_size=c.batch_size, progress=ctx.progress, desc="awq")
    for name, q in qinfo.items():
        info["modules"].setdefault(name, {}).update(q)
    attach(model, records, schemes)
    mods = info["modules"].values()
    ratios = [m["search_loss_over_rtn"] for m in mods if "search_loss_over_rtn" in m]
    return model, {"scheme": f"W{cfg.bits}A16", "bits": cfg.bits, "group_size": cfg.group_size,
                   "group_sizes": group_summary(schemes), "symmetric": cfg.symmetric, "quantizer": cfg.quantizer,
                   "quantized_modules": len(records), "scaled_modules": sum(m.get("scaled", False) for m in mods),
                   "mean_search_loss_over_rtn": round(sum(ratios) / len(ratios), 5) if ratios else None,
                   "seconds_search": round(t_search[0], 3), **info}


STAGE = Stage(name="awq", config=AWQConfig, apply=apply, check=check, quantizes=True, weights=True,
              summary="AWQ weight-only int4 (W4A16): activation-aware scales searched per mapping, folded, then RTN "
                      "or GPTQ; compressed-tensors pack-quantized.")
