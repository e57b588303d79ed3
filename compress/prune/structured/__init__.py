"""Structured pruning: remove whole MLP channels, attention heads and decoder layers, so the
model is smaller and faster on every engine (a dense HF checkpoint with an updated config;
no masks, no zeros).

Cuts (each a stage; the same count in every layer, so the config stays one number):
  - `prune_mlp`: intermediate channels of the gated MLP (rows of gate/up, columns of down).
  - `prune_heads`: attention heads, GQA-aware: `kv_groups` removes whole KV heads with their
    query heads; `query_heads` removes the same number of query heads inside every KV group.
    The config's `head_dim` is written explicitly (hidden / heads no longer gives it).
  - `prune_hidden`: hidden (embedding) channels through every layer, the norms and the
    (tied) head included; RMSNorm weights and eps rescaled for the narrower width.
  - `prune_depth`: whole decoder layers, the least influential by block influence (ShortGPT:
    1 - cos(layer input, layer output), averaged over calibration tokens), or the last ones.
Importance comes from calibration activations collected through the shared layer-wise
runner (compress.layerwise: channel norms of down_proj's input for MLP channels, of
o_proj's input for heads; the runner's `observe` for block influence), or from weight
magnitudes (`importance: magnitude`, no calibration). The cut itself is a pure slicing of
weights (`keep_*` functions), so that cutting nothing changes nothing and a cut equals the
original with the removed parts zeroed (tests check both).

Layers are recognised by structure: a decoder layer must hold `self_attn.{q,k,v,o}_proj` and
`mlp.{gate,up,down}_proj` (Llama, Qwen2/3, Mistral and their kin); otherwise the error names
the module it expected.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import ChannelNormCollector
from compress.errors import UserError
from compress.export.compressed_tensors import quantization_config
from compress.layerwise import decoder_layers, run_layerwise
from compress.prune.structured.cuts import (  # noqa: F401 - the cuts are part of this module's API
    ATTN, MLP, blocks, cut_depth, cut_heads, cut_hidden, cut_mlp, head_channels, head_shape, heads_to_keep,
    as_loadable, heads_fit_width, keep_cols, keep_rows, mistral_config, size_info)
from compress.stage import Stage, StageContext
from compress.schema import Strict


class _Cut(Strict):
    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="fraction removed (rounded to whole units, the same "
                         "count in every layer)")
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation: calibration activations through the layer-wise runner; magnitude: "
        "weight norms (no calibration)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


class MLPCutConfig(_Cut):
    pass


class HeadCutConfig(_Cut):
    mode: Literal["kv_groups", "query_heads"] = Field(
        "kv_groups", description="kv_groups: whole KV heads with their query heads; query_heads: the same number of "
        "query heads inside every KV group")


class HiddenCutConfig(_Cut):
    pass


class DepthCutConfig(_Cut):
    importance: Literal["block_influence", "last"] = Field(
        "block_influence", description="block_influence: drop the layers whose output is most like their input "
        "(ShortGPT); last: drop the last layers")


# ------------------------------------------------------------------------------ importance

def _calibrated(model, names: list[str], cfg: _Cut, ctx: StageContext, desc: str, observe=None) -> dict:
    """Channel norms (mean x^2 per input channel) of each named module's input, through the
    shared runner (weights untouched)."""
    stats = {}

    def solve(i, mods, st):
        for rel in mods:
            stats[f"{i}.{rel}"] = st.sq.cpu()
        return {rel: {} for rel in mods}

    calib = ctx.calibration(cfg.calibration)
    run_layerwise(model, calib, names, lambda m, dev: ChannelNormCollector(m.in_features, dev), solve, ctx.device,
                  sequential=False, batch_size=cfg.calibration.batch_size, progress=ctx.progress, desc=desc,
                  observe=observe)
    return stats


def mlp_scores(model, layers_name, layers, cfg: MLPCutConfig, ctx: StageContext) -> list[torch.Tensor]:
    if cfg.importance == "magnitude":
        return [(l.mlp.gate_proj.weight.float().norm(dim=1) * l.mlp.up_proj.weight.float().norm(dim=1))
                * l.mlp.down_proj.weight.float().norm(dim=0) for l in layers]
    names = [f"{layers_name}.{i}.mlp.down_proj" for i in range(len(layers))]
    st = _calibrated(model, names, cfg, ctx, "MLP importance")
    # |activation of channel j| times the norm of what it writes: its contribution to the output
    return [st[f"{i}.mlp.down_proj"].sqrt() * l.mlp.down_proj.weight.float().norm(dim=0).cpu()
            for i, l in enumerate(layers)]


def head_scores(model, layers_name, layers, cfg: HeadCutConfig, ctx: StageContext) -> list[torch.Tensor]:
    heads, _, hd = head_shape(model)
    if cfg.importance == "magnitude":
        return [l.self_attn.o_proj.weight.float().norm(dim=0).view(heads, hd).square().sum(1).cpu() for l in layers]
    names = [f"{layers_name}.{i}.self_attn.o_proj" for i in range(len(layers))]
    st = _calibrated(model, names, cfg, ctx, "head importance")
    o = [l.self_attn.o_proj.weight.float().norm(dim=0).cpu() for l in layers]
    return [(st[f"{i}.self_attn.o_proj"].sqrt() * o[i]).view(heads, hd).square().sum(1) for i in range(len(layers))]


def hidden_scores(model, layers_name, layers, cfg: HiddenCutConfig, ctx: StageContext) -> torch.Tensor:
    """Per hidden channel: magnitude, the embedding column norms; activation (Minitron), the
    RMS of the normalised hidden states every layer reads (q_proj's and gate_proj's inputs),
    summed over layers."""
    if cfg.importance == "magnitude":
        return model.get_input_embeddings().weight.float().norm(dim=0).cpu()
    names = [f"{layers_name}.{i}.{rel}" for i in range(len(layers)) for rel in ("self_attn.q_proj", "mlp.gate_proj")]
    stats = _calibrated(model, names, cfg, ctx, "hidden importance")
    return sum(v.sqrt() for v in stats.values())


def block_influence(model, layers_name, layers, cfg: DepthCutConfig, ctx: StageContext) -> list[float]:
    """1 - mean cosine(input, output) per layer over the calibration tokens."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def observe(i, x, y):
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        sums[i] += (1 - cos).sum().item()
        counts[i] += cos.numel()

    _calibrated(model, [], cfg, ctx, "block influence", observe=observe)
    return (sums / counts.clamp(min=1)).tolist()


# ------------------------------------------------------------------------------ stages

def _count(n: int, ratio: float, what: str, stage: str) -> int:
    k = round(ratio * n)
    if k == 0:
        raise UserError(f"{stage}.ratio: {ratio:g} of {n} {what} rounds to none removed; raise the ratio")
    if k >= n:
        raise UserError(f"{stage}.ratio: {ratio:g} of {n} {what} would remove every one; lower the ratio")
    return k


def _check_common(cfg: _Cut, model, ctx: StageContext, stage: str) -> None:
    q = quantization_config(ctx.model_dir) if ctx.model_dir is not None else None
    if q:
        raise UserError(f"{stage}: {ctx.model_dir} is quantized ({q.get('format', '?')}); prune before quantizing")
    if cfg.importance not in ("magnitude", "last"):
        check_calibration(ctx.tokenizer, cfg.calibration, stage)


def _check_saveable(model, hidden: int, heads: int) -> None:
    """A cut that leaves a head count the Llama config refuses is saved as Mistral (as_loadable);
    a Llama config with a field Mistral lacks is refused here, before any work."""
    c = copy.deepcopy(model.config)
    c.hidden_size, c.num_attention_heads = hidden, heads
    if getattr(c, "model_type", None) == "llama" and not heads_fit_width(c):
        mistral_config(c)


def check_mlp(cfg: MLPCutConfig, model, ctx: StageContext) -> None:
    blocks(model, "prune_mlp", MLP)
    _count(model.config.intermediate_size, cfg.ratio, "MLP channels", "prune_mlp")
    _check_common(cfg, model, ctx, "prune_mlp")


def check_heads(cfg: HeadCutConfig, model, ctx: StageContext) -> None:
    blocks(model, "prune_heads", ATTN)
    heads, kv, _ = head_shape(model)
    if cfg.mode == "kv_groups":
        k = _count(kv, cfg.ratio, "KV heads", "prune_heads")
        _check_saveable(model, model.config.hidden_size, (kv - k) * (heads // kv))
    else:
        k = _count(heads // kv, cfg.ratio, "query heads per KV group", "prune_heads")
        _check_saveable(model, model.config.hidden_size, kv * (heads // kv - k))
    _check_common(cfg, model, ctx, "prune_heads")


def check_hidden(cfg: HiddenCutConfig, model, ctx: StageContext) -> None:
    blocks(model, "prune_hidden", ATTN + MLP)
    d = model.config.hidden_size
    _check_saveable(model, d - _count(d, cfg.ratio, "hidden channels", "prune_hidden"), head_shape(model)[0])
    _check_common(cfg, model, ctx, "prune_hidden")


def check_depth(cfg: DepthCutConfig, model, ctx: StageContext) -> None:
    _, layers = decoder_layers(model)
    _count(len(layers), cfg.ratio, "decoder layers", "prune_depth")
    _check_common(cfg, model, ctx, "prune_depth")


@torch.no_grad()
def apply_mlp(model, cfg: MLPCutConfig, ctx: StageContext):
    name, layers = blocks(model, "prune_mlp", MLP)
    before, n = size_info(model), model.config.intermediate_size
    k = _count(n, cfg.ratio, "MLP channels", "prune_mlp")
    scores = mlp_scores(model, name, layers, cfg, ctx)
    for layer, s in zip(layers, scores):
        cut_mlp(layer, s.argsort(descending=True, stable=True)[:n - k].sort().values)
    model.config.intermediate_size = n - k
    return model, {"intermediate_size": [n, n - k], "removed_per_layer": k, "before": before,
                   "after": size_info(model), "importance": cfg.importance}


@torch.no_grad()
def apply_heads(model, cfg: HeadCutConfig, ctx: StageContext):
    name, layers = blocks(model, "prune_heads", ATTN)
    before = size_info(model)
    heads, kv, hd = head_shape(model)
    k = _count(kv if cfg.mode == "kv_groups" else heads // kv, cfg.ratio, "heads", "prune_heads")
    scores = head_scores(model, name, layers, cfg, ctx)
    kept = []
    for layer, s in zip(layers, scores):
        keep_q, keep_kv = heads_to_keep(s, kv, k, cfg.mode)
        cut_heads(layer, keep_q, keep_kv, hd)
        kept.append(keep_q.tolist())
    c = model.config
    c.head_dim, c.num_attention_heads = hd, len(kept[0])
    c.num_key_value_heads = kv - k if cfg.mode == "kv_groups" else kv
    model = as_loadable(model)
    return model, {"heads": [heads, c.num_attention_heads], "kv_heads": [kv, c.num_key_value_heads],
                   "mode": cfg.mode, "kept_heads_per_layer": kept, "before": before, "after": size_info(model),
                   "importance": cfg.importance}


@torch.no_grad()
def apply_hidden(model, cfg: HiddenCutConfig, ctx: StageContext):
    name, layers = blocks(model, "prune_hidden", ATTN + MLP)
    before, d = size_info(model), model.config.hidden_size
    k = _count(d, cfg.ratio, "hidden channels", "prune_hidden")
    keep = hidden_scores(model, name, layers, cfg, ctx).argsort(descending=True, stable=True)[:d - k].sort().values
    cut_hidden(model, layers, keep)
    model = as_loadable(model)
    return model, {"hidden_size": [d, d - k], "before": before, "after": size_info(model),
                   "importance": cfg.importance}


@torch.no_grad()
def apply_depth(model, cfg: DepthCutConfig, ctx: StageContext):
    name, layers = decoder_layers(model)
    before, n = size_info(model), len(layers)
    k = _count(n, cfg.ratio, "decoder layers", "prune_depth")
    if cfg.importance == "last":
        bi, drop = None, list(range(n - k, n))
    else:
        bi = block_influence(model, name, layers, cfg, ctx)
        drop = sorted(sorted(range(n), key=lambda i: (bi[i], i))[:k])
    cut_depth(model, name, [i for i in range(n) if i not in drop])
    return model, {"layers": [n, n - k], "removed_layers": drop, "block_influence": bi, "before": before,
                   "after": size_info(model), "importance": cfg.importance}


STAGES = [
    Stage(name="prune_mlp", config=MLPCutConfig, apply=apply_mlp, check=check_mlp,
          summary="Structured: remove MLP intermediate channels (gate/up/down together); a smaller dense model."),
    Stage(name="prune_heads", config=HeadCutConfig, apply=apply_heads, check=check_heads,
          summary="Structured: remove attention heads, GQA-aware (whole KV groups or query heads within groups)."),
    Stage(name="prune_hidden", config=HiddenCutConfig, apply=apply_hidden, check=check_hidden,
          summary="Structured: remove hidden (embedding) channels through every layer, norms and head included."),
    Stage(name="prune_depth", config=DepthCutConfig, apply=apply_depth, check=check_depth,
          summary="Structured: remove whole decoder layers by block influence (ShortGPT) or the last ones."),
]
