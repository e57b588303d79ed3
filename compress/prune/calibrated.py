"""What the calibrated pruning stages (wanda, sparsegpt) share: the config, the checks before
any work, the per-module sparsity (uniform, explicit overrides, or OWL's outlier-weighted
allocation), and the run on the layer-wise calibration runner.

OWL here: a first runner pass collects the input channel norms of every layer and scores
each module with Wanda's metric; a layer's outlier ratio is the share of scores above
`owl_outlier` times their module's mean, averaged over its modules by size; layers with more
outliers are pruned less (compress.prune.masks.owl_sparsities), the mean sparsity staying at
`sparsity`. Then the pruning pass runs with those per-layer targets.
"""

from __future__ import annotations

import sys
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field, model_validator

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import ChannelNormCollector
from compress.engine_facts import NMSparse, engine_notes
from compress.errors import UserError
from compress.export.compressed_tensors import quantization_config
from compress.layerwise import decoder_layers, run_layerwise
from compress.prune.magnitude import magnitude_mask
from compress.prune.masks import nm_mask, outlier_ratio, owl_sparsities, parse_nm, wanda_score
from compress.select import matches, select_linears, unmatched
from compress.stage import StageContext
from compress.schema import Strict


class CalibratedPruneConfig(Strict):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights zeroed in each pruned layer "
                            "(the mean, with allocation: owl)")
    nm: str | None = Field(None, description="semi-structured pattern 'N:M' (e.g. '2:4', '4:8'): N of every M "
                           "consecutive input weights kept; sets sparsity to 1 - N/M")
    targets: list[str] = Field(default_factory=lambda: ["*"], description="module-name globs of nn.Linear layers")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name globs left dense")
    overrides: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=dict, description="per-module sparsity: module-name glob -> sparsity; first match wins")
    allocation: Literal["uniform", "owl"] = Field("uniform", description="uniform, or OWL: layers with more "
                                                   "activation outliers pruned less, same mean sparsity")
    owl_lambda: float = Field(0.08, gt=0.0, lt=0.5, description="OWL: layer sparsities spread over 2 x lambda "
                              "around the mean `sparsity`")
    owl_outlier: float = Field(5.0, gt=1.0, description="OWL: a score above this many times its module's mean "
                               "is an outlier")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)

    @model_validator(mode="after")
    def _consistent(self):
        pattern = parse_nm(self.nm)
        if pattern:
            implied = 1 - pattern[0] / pattern[1]
            if "sparsity" in self.model_fields_set and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(f"nm {self.nm} means sparsity {implied:g}; drop `sparsity` or set it to {implied:g}")
            if self.allocation == "owl" or self.overrides:
                raise ValueError(f"nm {self.nm} fixes every layer's sparsity; allocation owl and overrides do not apply")
        return self

    @property
    def pattern(self) -> tuple[int, int] | None:
        return parse_nm(self.nm)

    @property
    def target(self) -> float:
        p = self.pattern
        return 1 - p[0] / p[1] if p else self.sparsity


def check_prune(cfg: CalibratedPruneConfig, model: torch.nn.Module, ctx: StageContext, stage: str,
                notes: bool = True) -> list[str]:
    """Checks before any work; returns the module names to prune."""
    q = quantization_config(ctx.model_dir) if ctx.model_dir is not None else None
    if q:
        raise UserError(f"{stage}: {ctx.model_dir} is quantized ({q.get('format', '?')}); prune before quantizing")
    names = select_linears(model, cfg.targets, cfg.ignore, stage)
    bad = [f"{stage}.overrides: {p!r} matches no nn.Linear module" for p in unmatched(cfg.overrides, names)]
    if cfg.pattern:
        m = cfg.pattern[1]
        bad += [f"{stage}.nm: {m} does not divide the input width {model.get_submodule(n).in_features} of {n}"
                for n in names if model.get_submodule(n).in_features % m]
    if bad:
        raise UserError(*bad[:6])
    if ctx.tokenizer is not None:
        check_calibration(ctx.tokenizer, cfg.calibration, stage)
    for note in engine_notes(ctx.engine_facts, NMSparse(cfg.nm)).values() if notes and cfg.pattern else ():
        print(f"note: {stage}: {note}", file=sys.stderr)
    return names


def owl_layer_sparsity(model, calib, names, cfg: CalibratedPruneConfig, ctx: StageContext) -> dict[int, float]:
    """OWL's per-layer sparsity from a statistics-only pass of the runner (see module docstring)."""
    ratios: dict[int, list[tuple[float, int]]] = {}

    def score(i, group, stats):
        for m in group.values():
            ratios.setdefault(i, []).append((outlier_ratio(wanda_score(m.weight, stats.sq), cfg.owl_outlier),
                                             m.weight.numel()))
        return {rel: {} for rel in group}

    run_layerwise(model, calib, names, lambda m, dev: ChannelNormCollector(m.in_features, dev), score, ctx.device,
                  sequential=False, batch_size=cfg.calibration.batch_size, progress=ctx.progress, desc="owl")
    layers = sorted(ratios)
    per_layer = [sum(r * n for r, n in ratios[i]) / sum(n for _, n in ratios[i]) for i in layers]
    return dict(zip(layers, owl_sparsities(per_layer, cfg.target, cfg.owl_lambda)))


# prune(modules, stats, sparsity) -> info: prune modules that read one input (and so share `stats`)
# to one sparsity, in place
Pruner = Callable[[list[torch.nn.Linear], object, float], dict]


@torch.no_grad()
def magnitude_fallback(mods: list[torch.nn.Linear], cfg: CalibratedPruneConfig, sparsity: float, tokens: int) -> dict:
    """Prune by |w| alone (per module), for modules whose statistics saw too few tokens."""
    for m in mods:
        w = m.weight
        keep = nm_mask(w.abs(), *cfg.pattern) if cfg.pattern else magnitude_mask(w, sparsity)
        w.mul_(keep.to(w.dtype))
    return {"fallback": "magnitude", "tokens": tokens}


def run_pruning(model, cfg: CalibratedPruneConfig, ctx: StageContext, stage: str, make_collector, prune: Pruner,
                sequential: bool) -> dict:
    """Calibrate and prune every target module on the runner; return the stage's info."""
    names = check_prune(cfg, model, ctx, stage, notes=False)
    calib = ctx.calibration(cfg.calibration)
    layer_sparsity = owl_layer_sparsity(model, calib, names, cfg, ctx) if cfg.allocation == "owl" else {}
    layers_name = decoder_layers(model)[0]

    def solve(i, group, stats):
        by_target: dict[float, list[str]] = {}
        for rel in group:
            hit = matches(f"{layers_name}.{i}.{rel}", cfg.overrides)
            by_target.setdefault(cfg.overrides[hit] if hit else layer_sparsity.get(i, cfg.target), []).append(rel)
        out = {}
        for s, rels in by_target.items():
            if stats.n < cfg.calibration.min_expert_tokens:  # a rarely routed expert: magnitude instead
                info = magnitude_fallback([group[r] for r in rels], cfg, s, stats.n)
            else:
                info = prune([group[r] for r in rels], stats, s)
            for r in rels:
                w = group[r].weight
                out[r] = {"target": round(s, 4), "sparsity": round((w == 0).float().mean().item(), 6), **info}
        return out

    info = run_layerwise(model, calib, names, make_collector, solve, ctx.device, sequential=sequential,
                         batch_size=cfg.calibration.batch_size, progress=ctx.progress, desc=stage,
                         all_experts=cfg.calibration.calibrate_all_experts)
    mods = info["modules"]
    info["fallback_modules"] = sum("fallback" in m for m in mods.values())
    zeros = sum(m["sparsity"] * model.get_submodule(n).weight.numel() for n, m in mods.items())
    total = sum(model.get_submodule(n).weight.numel() for n in mods)
    return {"pruned_layers": len(mods), "target_sparsity": cfg.target, "nm": cfg.nm, "allocation": cfg.allocation,
            "sparsity_of_pruned": round(zeros / total, 6),
            "layer_sparsity": {n: m["sparsity"] for n, m in mods.items()},
            **({"owl_layer_targets": {str(k): round(v, 4) for k, v in layer_sparsity.items()}} if layer_sparsity
               else {}),
            # what the recipe's engines run differently (N:M as dense): from their facts, per version
            **(engine_notes(ctx.engine_facts, NMSparse(cfg.nm)) if cfg.pattern else {}),
            **info}
