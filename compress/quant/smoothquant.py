"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

For each mapping (a norm and the linears reading its output), per input channel j:
    s_j = max|X_j|^α / max|W_:,j|^(1-α)
over the calibration inputs X and the mapped linears' weights W; X is divided by s (folded
into the norm, or into up_proj's rows for down_proj, whose inputs carry the largest outliers)
and W's columns multiplied by it (compress.quant.smooth). α = 0 leaves the
activations alone; α = 1 moves their whole range into the weights; 0.5 is the paper's
default, 0.8 suits Llama-family models with strong outliers.

Mixture-of-experts layers (experts linearized by the pipeline, `experts=True`): the norm
before the block is balanced against every expert's and shared expert's gate/up at once (its
activations' max over all tokens, the weights' max over all experts), the routers' columns
take the same scale so routing is unchanged, and each expert's up_proj -> down_proj is smoothed
from the tokens routed to it (an expert under `calibration.min_expert_tokens` is left as it
is and counted in `unsmoothed_experts`); see compress.quant.smooth_moe.

The output is a dense model computing the same function (up to rounding), whose
activations quantize better: a later `int8` (or `fp8`) stage quantizes it.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import AbsMaxCollector
from compress.errors import UserError
from compress.export.compressed_tensors import refuse_quantized
from compress.layerwise import decoder_layers, run_layerwise, split_by_layer
from compress.quant.mapping import Mapping
from compress.quant.smooth import SMOOTHQUANT_MAPPINGS, fold, follow, resolve
from compress.select import linear_names
from compress.stage import Stage, StageContext
from compress.schema import Strict


class SmoothQuantConfig(Strict):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: the share of the activations' "
                         "range moved into the weights")
    mappings: list[Mapping] | None = Field(None, description="norm -> linears pairs inside a decoder layer; "
                                           "default: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, "
                                           "up_proj -> down_proj")
    calibration: CalibrationConfig = Field(default_factory=lambda: CalibrationConfig(n_samples=128, seq_len=512))


def _plan(cfg: SmoothQuantConfig, model, stage="smoothquant"):
    mappings = cfg.mappings or list(SMOOTHQUANT_MAPPINGS)
    targets = {n for n in linear_names(model)}
    plan = resolve(model, mappings, targets, stage, required=True)
    if not any(plan.values()):
        raise UserError(f"{stage}: no mapping applies to this model; set {stage}.mappings")
    return plan


def check(cfg: SmoothQuantConfig, model, ctx: StageContext) -> None:
    refuse_quantized(ctx.model_dir, "smoothquant", "smooth the unquantized model, then quantize")
    _plan(cfg, model)
    if ctx.tokenizer is not None:
        check_calibration(ctx.tokenizer, cfg.calibration, "smoothquant")


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_:,j|^(1-α) (float32, clamped away from 0 and from inf)."""
    w_max = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp(min=1e-5)
    a_max = act_absmax.float().to(w_max.device).clamp(min=1e-5)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5, max=1e5)


def apply(model, cfg: SmoothQuantConfig, ctx: StageContext):
    plan = _plan(cfg, model)
    layers_name, layers = decoder_layers(model)
    names = sorted({f"{layers_name}.{i}.{b}" for i, ps in plan.items() for mp, note in ps if note is None
                    for b in mp.balance}, key=list(dict(model.named_modules())).index)
    left = {i: set(r) for i, r in split_by_layer(layers_name, len(layers), names).items()}
    t0 = time.perf_counter()
    c = cfg.calibration
    calib = ctx.calibration(c)
    seen: dict[int, dict[str, AbsMaxCollector]] = {}
    unsmoothed = [0]

    def solve(i, group, stats: AbsMaxCollector):
        # a mapping may span many groups (an MoE layer's experts): smooth once the layer's last one is in
        seen.setdefault(i, {}).update({rel: stats for rel in group})
        left[i] -= set(group)
        return {} if left[i] else smooth_layer(i, seen.pop(i))

    def smooth_layer(i, stats_of: dict[str, AbsMaxCollector]) -> dict[str, dict]:
        layer, out = layers[i], {}
        for mp, note in plan[i]:
            if note is not None:
                continue
            stats = list({id(st): st for st in (stats_of[b] for b in mp.balance)}.values())
            tokens = min(st.n for st in stats)
            if getattr(mp, "per_expert", False) and (tokens == 0 or tokens < c.min_expert_tokens):
                unsmoothed[0] += 1  # a rarely routed expert: its scales would come from a handful of tokens
                out.update({b: {"smoothed": False, "tokens": tokens} for b in mp.balance})
                continue
            absmax = torch.stack([st.absmax for st in stats]).amax(0)  # over all tokens the op's output feeds
            balance = [layer.get_submodule(b) for b in mp.balance]
            s = smoothing_scales(absmax, [m.weight for m in balance], cfg.alpha)
            fold(layer.get_submodule(mp.smooth), balance + follow(layer, mp), s)
            row = {"smoothed": True, "by": mp.smooth, "input_absmax_before": round(absmax.max().item(), 4),
                   "input_absmax_after": round((absmax.to(s.device) / s).max().item(), 4),
                   "scale_min": round(s.min().item(), 5), "scale_max": round(s.max().item(), 5)}
            out.update({b: dict(row) for b in mp.balance})
        return out

    info = run_layerwise(model, calib, names, lambda m, dev: AbsMaxCollector(m.in_features, dev), solve, ctx.device,
                         sequential=False, batch_size=c.batch_size, progress=ctx.progress, desc="smoothquant",
                         all_experts=c.calibrate_all_experts)
    mods = info["modules"]
    return model, {"alpha": cfg.alpha, "smoothed_modules": sum(m.get("smoothed", False) for m in mods.values()),
                   "unsmoothed_experts": unsmoothed[0],
                   "mappings": [f"{mp.smooth} -> {', '.join(mp.balance)}" for mp in (cfg.mappings or
                                                                                   SMOOTHQUANT_MAPPINGS)],
                   "seconds_solve": round(time.perf_counter() - t0, 3), **info}


STAGE = Stage(name="smoothquant", config=SmoothQuantConfig, apply=apply, check=check, weights=True, experts=True,
              summary="SmoothQuant: migrate activation outliers into the weights (alpha), folded into the norms; "
                      "run before int8 or fp8.")
