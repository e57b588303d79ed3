"""W8A8: 8-bit weights and 8-bit activations, int8 or FP8 (E4M3), the checkpoints vLLM runs on
its scaled-matmul kernels (and transformers runs with the compressed-tensors library).

Weights: one scale per output channel, symmetric, rounded to nearest (int8: scale =
absmax / 127.5, codes in [-128, 127]; FP8: scale = absmax / 448, values rounded to E4M3); or,
FP8 only (`weights: block`), one scale per 128 x 128 tile (DeepSeek-V3's layout, the FP8 of many
released models), its activations scaled per token and group of 128 channels at run time.
Activations:
  * dynamic: one scale per token, computed at run time by the kernel: no calibration;
  * static: one scale per tensor, from the calibration runner: the layer inputs' range as
    seen through the already quantized layers before it (sequential), read by an observer,
    `minmax` (largest |x|) or `percentile` (the p-th percentile of |x|, which ignores the
    rarest outliers at the price of clipping them).
SmoothQuant (the `smoothquant` stage) runs before either to move activation outliers into
the weights.

Written as compressed-tensors `int-quantized` / `float-quantized` checkpoints: int8 or
float8 weights with their scales, plus `input_scale` for static activations.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import RangeCollector
from compress.engine_facts import W8A8, engine_notes, engine_problems
from compress.errors import UserError
from compress.export.compressed_tensors import (FP8_MAX, ActScheme, QuantRecord, WeightScheme, attach, fp8_round,
                                                refuse_quantized)
from compress.layerwise import decoder_layers, run_layerwise
from compress.moe import linear_experts
from compress.quant.grid import Grid, rtn
from compress.quant.rotate import ROTATE_FIELD, RotateConfig, rotating
from compress.select import select_linears
from compress.stage import Stage, StageContext
from compress.schema import Strict

INT8_HALF_RANGE = 127.5  # compressed-tensors' symmetric int8 scale: absmax / ((127 - (-128)) / 2)


class W8A8Config(Strict):
    activations: Literal["dynamic", "static"] = Field(
        "dynamic", description="dynamic: a scale per token at run time; static: one scale per tensor from calibration")
    observer: Literal["minmax", "percentile"] = Field(
        "minmax", description="static scales: the largest |x| seen, or the `percentile`-th percentile of |x|")
    percentile: float = Field(99.99, gt=50.0, le=100.0, description="percentile observer: which percentile of |x|")
    targets: list[str] = Field(default_factory=lambda: ["*"], description="module-name globs of nn.Linear layers")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name globs left in 16 bits")
    calibration: CalibrationConfig | None = Field(
        None, description="calibration data: required for static activations, unused for dynamic ones")
    weights: Literal["channel", "block"] = Field(
        "channel", description="channel: one scale per output channel; block (fp8 only): one scale per block_size x "
        "block_size tile of the weight, activations per token and group of block_size channels (dynamic)")
    block_size: Literal[64, 128] = Field(128, description="weights: block: the tile's side; it must divide every "
                                         "quantized layer's input and output widths (vLLM's fast kernels take 128)")
    dynamic_modules: list[str] = Field(
        default_factory=list, description="static activations: module-name globs whose activations stay dynamic, a "
        "scale per token (e.g. ['*down_proj']: its inputs peak on a few tokens far above the rest, a range one scale "
        "per tensor cannot hold); the checkpoint gets a config group for them, the report names both")
    rotate: RotateConfig | None = Field(None, description=ROTATE_FIELD)

    @property
    def histogram(self) -> bool:
        """Static scales from the percentile observer (which needs the |x| histogram)."""
        return self.activations == "static" and self.observer == "percentile"

    @model_validator(mode="after")
    def _static_needs_data(self):
        if self.activations == "dynamic" and self.calibration is not None:
            raise ValueError("dynamic activations need no calibration data; drop `calibration` or use "
                             "activations: static")
        if "observer" in self.model_fields_set and self.activations == "dynamic":
            raise ValueError("`observer` sets static activation scales; dynamic activations have none")
        if self.dynamic_modules and self.activations == "dynamic":
            raise ValueError("dynamic_modules keeps some modules dynamic among static ones; with activations: dynamic "
                             "every module is dynamic already")
        if self.weights == "block" and self.activations == "static":
            raise ValueError("weights: block takes dynamic activations (a scale per token and group of block_size "
                             "channels, as vLLM runs it); use activations: dynamic, or weights: channel")
        if "block_size" in self.model_fields_set and self.weights != "block":
            raise ValueError("block_size applies to weights: block")
        return self

    @property
    def block(self) -> int | None:
        return self.block_size if self.weights == "block" else None


def engine_checkpoints(cfg: W8A8Config, model, fp8: bool) -> tuple[W8A8, ...]:
    """What the engines are asked about: the dense linears (first), and the experts where there
    are any (engines run those as one fused layer with their own methods)."""
    dense = W8A8(fp8=fp8, dynamic=cfg.activations == "dynamic", block=cfg.block)
    kinds = (dense, replace(dense, dynamic=True)) if cfg.dynamic_modules else (dense,)
    return (*kinds, *(replace(k, experts=True) for k in kinds)) if linear_experts(model) else kinds


FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # one layer, one scheme in vLLM


def dynamic_set(model, cfg: W8A8Config, names: list[str], stage: str) -> set[str]:
    """The quantized modules `dynamic_modules` names; every glob must name a module, and modules vLLM
    fuses into one layer (q/k/v, gate/up) must be named together."""
    if not cfg.dynamic_modules:
        return set()
    dynamic = set(select_linears(model, cfg.dynamic_modules, [], f"{stage}.dynamic_modules")) & set(names)
    for n in sorted(dynamic):
        head, _, tail = n.rpartition(".")
        for fused in FUSED:
            rest = [f for f in fused if f != tail and f"{head}.{f}" in names and f"{head}.{f}" not in dynamic]
            if tail in fused and rest:
                raise UserError(f"{stage}.dynamic_modules: {n} is named but not {', '.join(rest)}: vLLM runs "
                                f"{'/'.join(fused)} as one layer with one scheme; name them together")
    return dynamic


def check_w8a8(cfg: W8A8Config, model, ctx: StageContext, stage: str, fp8: bool) -> tuple[list[str], set[str]]:
    """Checks before any work; returns the module names to quantize and those kept dynamic among them."""
    refuse_quantized(ctx.model_dir, stage)
    if cfg.block and not fp8:
        raise UserError(f"{stage}.weights: block is an FP8 layout (no engine runs block-wise int8); use the fp8 "
                        "stage, or weights: channel")
    if cfg.activations == "static" and cfg.calibration is None:
        raise UserError(f"{stage}.calibration: static activation scales come from calibration data; add e.g. "
                        "calibration: {dataset: wikitext2-valid, n_samples: 128, seq_len: 2048}, or use "
                        "activations: dynamic")
    if cfg.activations == "static" and linear_experts(model) and not cfg.calibration.calibrate_all_experts:
        raise UserError(f"{stage}.calibration.calibrate_all_experts: static input scales of a mixture-of-experts "
                        "model need every expert to see tokens (vLLM takes one scale per layer across its experts); "
                        "set it to true, or use activations: dynamic")
    asked = engine_checkpoints(cfg, model, fp8)
    problems = [p for c in asked for p in engine_problems(ctx.engine_facts, c)]
    if problems:
        raise UserError(*(f"{stage}: {p}" for p in problems))
    for note in engine_notes(ctx.engine_facts, asked[0]).values():
        if ctx.progress:
            print(f"note: {stage}: {note}", file=sys.stderr)
    if cfg.calibration is not None and ctx.tokenizer is not None:
        check_calibration(ctx.tokenizer, cfg.calibration, stage)
    names = select_linears(model, cfg.targets, cfg.ignore, stage)
    dynamic = dynamic_set(model, cfg, names, stage)
    if cfg.block:
        check_blocks(model, names, cfg.block_size, stage)
    return names, dynamic


def check_blocks(model, names: list[str], block: int, stage: str) -> None:
    """Every quantized layer's widths are whole blocks, and its input at least two: transformers
    (compressed-tensors 0.17) infers the tile from the scale's shape, and reads a scale of one
    column as one per output channel."""
    def misfits(b: int) -> list[tuple[str, str]]:
        out = []
        for n in names:
            m = model.get_submodule(n)
            out += [(n, f"{k} {w} is not a multiple of it") for k, w in (("output", m.out_features),
                                                                         ("input", m.in_features)) if w % b]
            if m.in_features == b:
                out.append((n, f"input {b} is a single block, which transformers reads as per channel"))
        return out

    bad = misfits(block)
    if bad:
        fits = [b for b in (128, 64) if b != block and not misfits(b)]
        hint = f"; block_size: {fits[0]} fits every one" if fits else "; use weights: channel"
        raise UserError(f"{stage}.block_size: {block} does not fit {bad[0][0]}: its {bad[0][1]} "
                        f"({len(bad)} such widths){hint}")


@torch.no_grad()
def quantize_weight(w: torch.Tensor, fp8: bool, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit weights: (fake-quantized W float32, scale): one scale per output channel
    ([out, 1]), or (FP8, `block`) one per block x block tile ([out / block, in / block])."""
    if not fp8:
        q, scale, _ = rtn(w, Grid(bits=8, symmetric=True, group_size=-1, scale_dtype=w.dtype))
        return q, scale
    tiny = torch.finfo(w.dtype).tiny
    if block:
        o, i = w.shape
        tiles = w.float().reshape(o // block, block, i // block, block)
        scale = (tiles.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=tiny).to(w.dtype).float()
        full = scale[:, None, :, None]
        return (fp8_round(tiles / full) * full).reshape(o, i), scale
    absmax = w.float().abs().amax(dim=1, keepdim=True)
    scale = (absmax / FP8_MAX).clamp(min=tiny).to(w.dtype).float()
    return fp8_round(w.float() / scale) * scale, scale


def _record(mod: torch.nn.Linear, q, scale, input_scale=None) -> QuantRecord:
    dt = mod.weight.dtype
    mod.weight.data.copy_(q.to(dt))
    return QuantRecord(scale=scale.to(dt).cpu(), zero=torch.zeros_like(scale).cpu(), g_idx=None,
                       input_scale=None if input_scale is None else input_scale.to(dt).cpu())


def half_range(fp8: bool) -> float:
    """What one scale unit covers: x = code * scale with |code| <= this."""
    return FP8_MAX if fp8 else INT8_HALF_RANGE


def static_scale(stats: RangeCollector, cfg: W8A8Config, fp8: bool, dtype: torch.dtype) -> torch.Tensor:
    r = stats.percentile(cfg.percentile) if cfg.histogram else stats.absmax.item()
    s = max(r, 1e-8) / half_range(fp8)
    return torch.tensor([s], dtype=torch.float32).to(dtype).float()


def run_w8a8(model, cfg: W8A8Config, ctx: StageContext, stage: str, fp8: bool):
    names, dynamic = check_w8a8(cfg, model, ctx, stage, fp8)
    scheme = WeightScheme(bits=8, group_size=-1, symmetric=True, type="float" if fp8 else "int", block=cfg.block,
                          input_acts=ActScheme(type="float" if fp8 else "int", dynamic=cfg.activations == "dynamic",
                                               group_size=cfg.block))
    dyn_scheme = replace(scheme, input_acts=replace(scheme.input_acts, dynamic=True))
    t0 = time.perf_counter()
    records: dict[str, QuantRecord] = {}
    per_module: dict[str, dict] = {}
    info: dict = {}

    def quantize(name: str, mod: torch.nn.Linear, input_scale=None) -> dict:
        w = mod.weight.to(ctx.device)
        q, scale = quantize_weight(w, fp8, cfg.block)
        err = ((w.float() - q).norm() / w.float().norm().clamp(min=1e-30)).item()
        records[name] = _record(mod, q, scale, input_scale)
        out = {"weight_rel_error": round(err, 6)}
        if input_scale is not None:
            out["input_scale"] = float(input_scale.item())
        return out

    if cfg.activations == "dynamic":
        for name in tqdm(names, desc=stage, unit="module", disable=not ctx.progress, leave=False):
            per_module[name] = quantize(name, model.get_submodule(name))
    else:
        c = cfg.calibration
        calib = ctx.calibration(c)
        layers_name = decoder_layers(model)[0]
        def solve(i, group, stats: RangeCollector):
            s = static_scale(stats, cfg, fp8, next(iter(group.values())).weight.dtype)
            extra = {"input_absmax": stats.absmax.item()}
            if cfg.histogram:
                extra["absmax_over_range"] = round(stats.absmax.item() / (s.item() * half_range(fp8)), 3)
            return {rel: {**quantize(f"{layers_name}.{i}.{rel}", m, None if f"{layers_name}.{i}.{rel}" in dynamic else s),
                          **extra} for rel, m in group.items()}

        info = run_layerwise(model, calib, names,
                             lambda m, dev: RangeCollector(m.in_features, dev, cfg.histogram), solve,
                             ctx.device, sequential=True, batch_size=c.batch_size, progress=ctx.progress, desc=stage,
                             all_experts=c.calibrate_all_experts)
        per_module = info.pop("modules")
    attach(model, records, {n: dyn_scheme if n in dynamic else scheme for n in records})
    errs = [m["weight_rel_error"] for m in per_module.values()]
    return model, {"scheme": scheme.name + (f" + {dyn_scheme.name}" if dynamic else ""), "format": scheme.format,
                   "weights": (f"{cfg.block}x{cfg.block} blocks" if cfg.block else "per channel") + ", symmetric, RTN",
                   "activations": (f"per token and group of {cfg.block}, dynamic" if cfg.block else
                                   "per token, dynamic") if cfg.activations == "dynamic"
                   else f"per tensor, static ({cfg.observer}{f' {cfg.percentile}' if cfg.histogram else ''})"
                   + (f"; per token, dynamic: {len(dynamic)} modules ({', '.join(cfg.dynamic_modules)})" if dynamic
                      else ""),
                   "quantized_modules": len(records),
                   **engine_notes(ctx.engine_facts, engine_checkpoints(cfg, model, fp8)[0]),
                   "mean_weight_rel_error": round(sum(errs) / len(errs), 6),
                   "seconds_solve": round(time.perf_counter() - t0, 3), **info, "modules": per_module}


def _stage(name: str, fp8: bool, summary: str) -> Stage:
    def check(cfg, model, ctx) -> None:
        check_w8a8(cfg, model, ctx, name, fp8)

    return rotating(Stage(name=name, config=W8A8Config, apply=lambda m, c, x: run_w8a8(m, c, x, name, fp8),
                          check=check, quantizes=True, weights=True, experts=True, summary=summary))


INT8 = _stage("int8", False, "W8A8 int8: per-channel weights, dynamic per-token or static per-tensor activations "
                             "(min-max or percentile), compressed-tensors int-quantized.")
FP8 = _stage("fp8", True, "W8A8 FP8 (E4M3): per-channel or 128 x 128 block weights, dynamic per-token (per-group) or "
                          "static per-tensor activations, compressed-tensors float-quantized.")
