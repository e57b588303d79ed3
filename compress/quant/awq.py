"""AWQ (Lin et al., 2024): activation-aware per-channel scales for 4-bit weights, searched on a
grid, folded into the op before, then the weights quantized (RTN, or GPTQ).

For each mapping (compress.quant.smooth: input_layernorm -> q/k/v, v_proj -> o_proj where
their widths match, post_attention_layernorm -> gate/up, up_proj -> down_proj) a per-channel
scale is searched on a grid of ratios, minimizing the output error tr(ΔW H ΔWᵀ) computed from
the Hessian H = 2/n XᵀX the runner collects (compress.quant.awq_search). s = 1 (plain RTN) is
always a candidate, so the chosen scales never do worse than RTN on that objective.

Mixture-of-experts layers (experts linearized by the pipeline, `experts=True`): the norm
before the block takes one scale for every expert's and shared expert's gate/up, searched on
the summed per-expert output error over each expert's routed tokens (each with its own H,
weighted by its token count; the cheaper objective, not the block's output error), and the
routers' columns take it too, so routing is unchanged and routers stay 16-bit. Each expert's
up_proj -> down_proj is searched on its own routed tokens. An expert under
`calibration.min_expert_tokens` gets no search of its own and is rounded to nearest (also under
`quantizer: gptq`), recorded as `fallback: rtn` and counted in `fallback_modules`.

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
from compress.export.compressed_tensors import QuantRecord, WeightScheme, attach
from compress.layerwise import decoder_layers, run_layerwise, split_by_layer
from compress.moe import expert_index
from compress.quant.common import WeightQuantConfig, check_weight_quant, group_summary, row_slices, store
from compress.quant.cuda_graph import graph_fn
from compress.quant.gptq_solver import gptq_quantize, solve_block
from compress.quant.grid import Grid, rtn
from compress.quant.awq_search import AWQCollector, mean_over, search_scales
from compress.quant.mapping import Mapping
from compress.quant.smooth import AWQ_MAPPINGS, fold, follow, resolve
from compress.stage import Stage, StageContext


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


class _Solver:
    """The runner's callbacks for one awq run: a layer's groups are kept until all have their
    statistics, then every mapping's scale is searched and folded and every group quantized."""

    def __init__(self, cfg: AWQConfig, device: str, plan: dict[int, list], layers_name: str,
                 layers: torch.nn.ModuleList, left: dict[int, set[str]]):
        self.cfg, self.c, self.plan = cfg, cfg.calibration, plan
        self.layers_name, self.layers, self.left = layers_name, layers, left
        self.records: dict[str, QuantRecord] = {}
        self.schemes: dict[str, WeightScheme] = {}
        self.seen: dict[int, list] = {}
        self.block_fn = graph_fn(solve_block, device)
        self.search_seconds = 0.0

    def grid_for(self, mods: list[torch.nn.Linear]) -> tuple[Grid, WeightScheme]:
        cfg = self.cfg
        scheme = cfg.scheme(mods[0].in_features, cfg.actorder)
        return Grid(bits=cfg.bits, symmetric=cfg.symmetric, group_size=scheme.group_size,
                    scale_dtype=mods[0].weight.dtype), scheme

    def rare(self, rel: str, stats: AWQCollector) -> bool:  # an expert with too few routed tokens: RTN, no search
        return expert_index(rel) is not None and stats.n < self.c.min_expert_tokens

    def quantize_group(self, i: int, group: dict, stats: AWQCollector, s: torch.Tensor | None,
                       fallback: bool) -> dict:
        cfg = self.cfg
        mods = list(group.values())
        grid, scheme = self.grid_for(mods)
        w = torch.cat([m.weight for m in mods]).float()
        if cfg.quantizer == "gptq" and not fallback:
            if s is not None:  # inputs are x / s now: H' = diag(1/s) H diag(1/s)
                inv = 1.0 / s
                stats.h.mul_(inv[:, None]).mul_(inv[None, :])
            r = gptq_quantize(w, stats.h, grid, cfg.block_size, cfg.damp, cfg.actorder, block_fn=self.block_fn,
                              overwrite_h=True)
            q, scale, zero = r.q, r.scale, r.zero
        else:
            q, scale, zero = rtn(w, grid)
        stats.h = None
        out = {}
        for rel, m, rows in row_slices(group):
            name = f"{self.layers_name}.{i}.{rel}"
            err = ((w[rows] - q[rows]).norm() / w[rows].norm().clamp(min=1e-30)).item()
            self.records[name] = store(m, q[rows], scale[rows], zero[rows])
            self.schemes[name] = scheme
            out[rel] = {"weight_rel_error": round(err, 6), "group_size": grid.group_size,
                        **({"tokens": stats.n} if expert_index(rel) is not None else {}),
                        **({"fallback": "rtn"} if fallback else {})}
        return out

    def search(self, i: int, mp, pairs: list) -> tuple[torch.Tensor | None, dict]:
        """Search and fold one mapping's scale over its groups (one, or every expert's of an MoE block)."""
        layer, t0 = self.layers[i], time.perf_counter()
        use = [(g, st) for g, st in pairs if not self.rare(next(iter(g)), st)]
        if not use:
            return None, {"scaled": False}
        grid, _ = self.grid_for(list(use[0][0].values()))
        s, ratio, loss, base = search_scales([([m.weight for m in g.values()], st.h, st.n) for g, st in use],
                                             mean_over([st for _, st in use]), grid, self.cfg.n_grid,
                                             self.cfg.duo_scaling)
        if ratio is not None:
            fold(layer.get_submodule(mp.smooth), [layer.get_submodule(b) for b in mp.balance] + follow(layer, mp), s)
        self.search_seconds += time.perf_counter() - t0
        return (s if ratio is not None else None), {"scaled": ratio is not None, "by": mp.smooth, "ratio": ratio,
                                                    "search_loss_over_rtn": round(loss / base, 5) if base > 0 else 1.0}

    def solve_layer(self, i: int, pairs: list) -> dict[str, dict]:
        """All mappings of the layer searched on its unquantized inputs (up_proj takes down_proj's scales
        in its rows), then every group quantized."""
        owner = {rel: k for k, (g, _) in enumerate(pairs) for rel in g}
        scales: list = [None] * len(pairs)
        rows: list[dict] = [{"scaled": False} for _ in pairs]
        for mp, note in self.plan[i]:
            ks = sorted({owner[b] for b in mp.balance if b in owner})
            if not ks or note is not None:
                for k in ks:
                    rows[k]["note"] = note
                continue
            s, row = self.search(i, mp, [pairs[k] for k in ks])
            for k in ks:
                scales[k], rows[k] = s, row
        out = {}
        for k, (g, st) in enumerate(pairs):
            fallback = self.rare(next(iter(g)), st)
            out.update({rel: {**rows[k], **q} for rel, q in self.quantize_group(i, g, st, scales[k], fallback).items()})
        return out

    def solve(self, i: int, group: dict[str, torch.nn.Linear], stats: AWQCollector) -> dict[str, dict]:
        self.seen.setdefault(i, []).append((group, stats))
        self.left[i] -= set(group)
        return {} if self.left[i] else self.solve_layer(i, self.seen.pop(i))


def apply(model, cfg: AWQConfig, ctx: StageContext):
    names = check_weight_quant(cfg, model, ctx, "awq", cfg.actorder)
    plan = resolve(model, cfg.mappings or AWQ_MAPPINGS, set(names), "awq", required=cfg.mappings is not None)
    layers_name, layers = decoder_layers(model)
    left = {i: set(r) for i, r in split_by_layer(layers_name, len(layers), names).items()}
    c = cfg.calibration
    calib = ctx.calibration(c)
    solver = _Solver(cfg, ctx.device, plan, layers_name, layers, left)
    info = run_layerwise(model, calib, names, lambda m, dev: AWQCollector(m.in_features, dev), solver.solve,
                         ctx.device, sequential=False, batch_size=c.batch_size, progress=ctx.progress, desc="awq",
                         all_experts=c.calibrate_all_experts)
    records, schemes = solver.records, solver.schemes
    attach(model, records, schemes)
    mods = info["modules"].values()
    ratios = [m["search_loss_over_rtn"] for m in mods if "search_loss_over_rtn" in m]
    info["fallback_modules"] = sum("fallback" in m for m in mods)
    return model, {"scheme": f"W{cfg.bits}A16", "bits": cfg.bits, "group_size": cfg.group_size,
                   "group_sizes": group_summary(schemes), "symmetric": cfg.symmetric, "quantizer": cfg.quantizer,
                   "quantized_modules": len(records), "scaled_modules": sum(m.get("scaled", False) for m in mods),
                   "mean_search_loss_over_rtn": round(sum(ratios) / len(ratios), 5) if ratios else None,
                   "seconds_search": round(solver.search_seconds, 3), **info}


STAGE = Stage(name="awq", config=AWQConfig, apply=apply, check=check, quantizes=True, weights=True, experts=True,
              summary="AWQ weight-only int4 (W4A16): activation-aware scales searched per mapping, folded, then RTN "
                      "or GPTQ; compressed-tensors pack-quantized.")
