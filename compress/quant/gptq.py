"""The gptq stage: GPTQ weight-only quantization on the layer-wise calibration runner, written
as compressed-tensors pack-quantized. The solver is compress.quant.gptq_solver (one matrix)
and compress.quant.gptq_batched (the experts of a mixture-of-experts layer, as one batch).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import HessianCollector
from compress.export.compressed_tensors import QuantRecord, WeightScheme, attach
from compress.layerwise import decoder_layers, run_layerwise
from compress.quant.common import WeightQuantConfig, check_weight_quant, group_summary, row_slices, store
from compress.quant.cuda_graph import graph_fn
from compress.quant.gptq_batched import gptq_quantize_batched, solve_block_batched
from compress.quant.gptq_solver import gptq_quantize, solve_block
from compress.quant.grid import Grid, rtn
from compress.quant.rotate import ROTATE_FIELD, RotateConfig, rotating
from compress.stage import Stage, StageContext


# ---------------------------------------------------------------------------- the stage

PRUNED_FRACTION = 0.1  # a module with this share of exact zeros was pruned: its zeros stay
EXPERT_CHUNK = 32      # experts solved in one batch (W, H and H^-1 of 32 Qwen3-30B experts: ~3 GiB)


class GPTQConfig(WeightQuantConfig):
    damp: float = Field(0.01, gt=0.0, le=1.0, description="dampening added to diag(H), as a fraction of its mean")
    block_size: int = Field(128, gt=0, description="columns per lazy-batch block (speed only)")
    actorder: Literal["weight", "group"] | None = Field(
        "weight", description="solve columns in decreasing activation order: 'weight' keeps contiguous groups "
        "(no g_idx, full kernel speed), 'group' is the paper's act-order with a stored g_idx, null = off")
    sequential: bool = Field(True, description="solve q/k/v, o, gate/up, down in turn, each seeing the "
                             "already quantized outputs of the ones before")
    preserve_zeros: bool = Field(True, description="a pruned module (at least 10 % of its weights exactly 0) "
                                 "keeps its zeros exactly: prune, then quantize")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    rotate: RotateConfig | None = Field(None, description=ROTATE_FIELD)

    @model_validator(mode="after")
    def _actorder_needs_groups(self):
        if self.actorder == "group" and self.group_size == -1:
            raise ValueError("actorder 'group' needs a group size; per channel use actorder 'weight'")
        return self


def check(cfg: GPTQConfig, model, ctx: StageContext) -> None:
    check_weight_quant(cfg, model, ctx, "gptq", cfg.actorder)
    if ctx.tokenizer is not None:
        check_calibration(ctx.tokenizer, cfg.calibration, "gptq")


class _Solver:
    """The runner's callbacks for one gptq run: solve a group (or a layer's experts as one batch,
    or round a rarely routed expert to nearest), and keep each module's record and scheme."""

    def __init__(self, cfg: GPTQConfig, device: str, layers_name: str):
        self.cfg, self.c, self.layers_name = cfg, cfg.calibration, layers_name
        self.records: dict[str, QuantRecord] = {}
        self.schemes: dict[str, WeightScheme] = {}
        self.block_fn = graph_fn(solve_block, device)
        self.block_fn_many = graph_fn(solve_block_batched, device)
        self.device = device

    def grid(self, mods: list[torch.nn.Linear]) -> tuple[WeightScheme, Grid]:
        cfg = self.cfg
        scheme = cfg.scheme(mods[0].in_features, cfg.actorder)
        return scheme, Grid(bits=cfg.bits, symmetric=cfg.symmetric, group_size=scheme.group_size,
                            scale_dtype=mods[0].weight.dtype)

    def solve(self, layer_idx: int, group: dict[str, torch.nn.Linear], stats: HessianCollector) -> dict[str, dict]:
        cfg = self.cfg
        mods = list(group.values())
        w = torch.cat([m.weight for m in mods]).float()      # modules sharing an input share H
        scheme, grid = self.grid(mods)
        t0 = time.perf_counter()
        if stats.n < self.c.min_expert_tokens:  # too few tokens for a Hessian (a rarely routed expert)
            return self.fallback(layer_idx, group, grid, stats, scheme)
        keep = w != 0
        pruned = cfg.preserve_zeros and (~keep).float().mean().item() >= PRUNED_FRACTION
        r = gptq_quantize(w, stats.h, grid, cfg.block_size, cfg.damp, cfg.actorder, block_fn=self.block_fn,
                          overwrite_h=True, keep=keep if pruned else None)  # H is not needed after this
        stats.h = None
        return self.record(layer_idx, group, r, scheme, grid, time.perf_counter() - t0, stats.n)

    def record(self, layer_idx, group, r, scheme, grid, secs, tokens) -> dict[str, dict]:
        out = {}
        for rel, m, rows in row_slices(group):
            name = f"{self.layers_name}.{layer_idx}.{rel}"
            err = (r.row_error[rows].sum() / r.row_energy[rows].sum().clamp(min=1e-30)).item()
            self.records[name] = store(m, r.q[rows], r.scale[rows], r.zero[rows], r.g_idx)
            self.schemes[name] = scheme
            out[rel] = {"output_rel_error": round(err, 6), "group_size": grid.group_size,
                        "solve_seconds": round(secs / len(group), 4), "tokens": tokens}
        return out

    def solve_many(self, layer_idx: int, pairs: list[tuple[dict, HessianCollector]]) -> dict[str, dict]:
        """The experts of a layer (groups of one shape) solved as one batch, EXPERT_CHUNK at a time."""
        out: dict[str, dict] = {}
        rest = [(g, st) for g, st in pairs if st.n >= self.c.min_expert_tokens]
        for g, st in pairs:
            if st.n < self.c.min_expert_tokens:
                out.update(self.solve(layer_idx, g, st))
        for k in range(0, len(rest), EXPERT_CHUNK):
            out.update(self.solve_chunk(layer_idx, rest[k:k + EXPERT_CHUNK]))
        return out

    def solve_chunk(self, layer_idx: int, chunk: list[tuple[dict, HessianCollector]]) -> dict[str, dict]:
        """Up to EXPERT_CHUNK experts' groups of one shape through the batched solver."""
        cfg = self.cfg
        scheme, grid = self.grid(list(chunk[0][0].values()))
        t0 = time.perf_counter()
        w = torch.stack([torch.cat([m.weight for m in g.values()]) for g, _ in chunk]).to(self.device).float()
        h = torch.stack([st.h for _, st in chunk])
        for _, st in chunk:
            st.h = None
        keep = w != 0
        pruned = (~keep).float().mean((1, 2)) >= PRUNED_FRACTION
        keep = keep | ~pruned[:, None, None] if cfg.preserve_zeros and bool(pruned.any()) else None
        r = gptq_quantize_batched(w, h, grid, cfg.block_size, cfg.damp, cfg.actorder, self.block_fn_many, keep)
        del w, h
        secs = (time.perf_counter() - t0) / len(chunk)
        out: dict[str, dict] = {}
        for e, (g, st) in enumerate(chunk):
            one = SimpleNamespace(q=r.q[e], scale=r.scale[e], zero=r.zero[e], row_error=r.row_error[e],
                                  row_energy=r.row_energy[e], g_idx=None if r.g_idx is None else r.g_idx[e])
            out.update(self.record(layer_idx, g, one, scheme, grid, secs, st.n))
        return out

    def fallback(self, layer_idx, group, grid, stats, scheme) -> dict[str, dict]:
        """Round-to-nearest in the same scheme (an MoE layer's experts share one in vLLM)."""
        out = {}
        for rel, m in group.items():
            name = f"{self.layers_name}.{layer_idx}.{rel}"
            q, scale, zero = rtn(m.weight.float(), grid)
            g_idx = None
            if scheme.actorder == "group":  # contiguous groups, stated
                g_idx = (torch.arange(m.in_features) // grid.group_size).int()
            self.records[name] = store(m, q, scale, zero, g_idx)
            self.schemes[name] = scheme
            out[rel] = {"fallback": "rtn", "tokens": stats.n, "group_size": grid.group_size}
        stats.h = None
        return out


def apply(model, cfg: GPTQConfig, ctx: StageContext):
    names = check_weight_quant(cfg, model, ctx, "gptq", cfg.actorder)
    c = cfg.calibration
    calib = ctx.calibration(c)
    solver = _Solver(cfg, ctx.device, decoder_layers(model)[0])
    info = run_layerwise(model, calib, names, lambda m, dev: HessianCollector(m.in_features, dev), solver.solve,
                         ctx.device, sequential=cfg.sequential, batch_size=c.batch_size, progress=ctx.progress,
                         desc="gptq", all_experts=c.calibrate_all_experts, solve_many=solver.solve_many)
    records, schemes = solver.records, solver.schemes
    attach(model, records, schemes)
    errs = [m["output_rel_error"] for m in info["modules"].values() if "output_rel_error" in m]
    info["fallback_modules"] = sum("fallback" in m for m in info["modules"].values())
    return model, {"scheme": f"W{cfg.bits}A16", "bits": cfg.bits, "group_size": cfg.group_size,
                   "group_sizes": group_summary(schemes), "symmetric": cfg.symmetric, "actorder": cfg.actorder, "quantized_modules": len(records),
                   "mean_output_rel_error": round(sum(errs) / max(len(errs), 1), 6), **info}


STAGE = rotating(Stage(name="gptq", config=GPTQConfig, apply=apply, check=check, quantizes=True, weights=True, experts=True,
              summary="GPTQ weight-only int4/int8 (W4A16, W8A16) on the layer-wise calibration runner, "
                      "compressed-tensors pack-quantized; optionally rotated first (`rotate`)."))
