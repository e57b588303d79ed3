"""The `prune_heads` stage: remove attention heads, GQA-aware: `kv_groups` removes whole KV
heads with their query heads; `query_heads` removes the same number of query heads inside every
KV group. Heads are ranked by the energy of o_proj's input per head (calibration activations x
o_proj's column norms) or by o_proj's column norms alone (`importance: magnitude`). The config's
`head_dim` is written explicitly (hidden / heads no longer gives it)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.prune.structured.base import CutConfig, calibrated, check_common, check_saveable, removed_count
from compress.prune.structured.cuts import ATTN, as_loadable, blocks, cut_heads, head_shape, heads_to_keep, size_info
from compress.stage import Stage, StageContext


class HeadCutConfig(CutConfig):
    mode: Literal["kv_groups", "query_heads"] = Field(
        "kv_groups", description="kv_groups: whole KV heads with their query heads; query_heads: the same number of "
        "query heads inside every KV group")


def head_scores(model, layers_name, layers, cfg: HeadCutConfig, ctx: StageContext) -> list[torch.Tensor]:
    """Per layer, the importance of each query head (higher: kept)."""
    heads, _, hd = head_shape(model)
    if cfg.importance == "magnitude":
        return [l.self_attn.o_proj.weight.float().norm(dim=0).view(heads, hd).square().sum(1).cpu() for l in layers]
    names = [f"{layers_name}.{i}.self_attn.o_proj" for i in range(len(layers))]
    st = calibrated(model, names, cfg, ctx, "head importance")
    o = [l.self_attn.o_proj.weight.float().norm(dim=0).cpu() for l in layers]
    return [(st[f"{i}.self_attn.o_proj"].sqrt() * o[i]).view(heads, hd).square().sum(1) for i in range(len(layers))]


def check_heads(cfg: HeadCutConfig, model, ctx: StageContext) -> None:
    blocks(model, "prune_heads", ATTN)
    heads, kv, _ = head_shape(model)
    if cfg.mode == "kv_groups":
        k = removed_count(kv, cfg.ratio, "KV heads", "prune_heads")
        check_saveable(model, model.config.hidden_size, (kv - k) * (heads // kv))
    else:
        k = removed_count(heads // kv, cfg.ratio, "query heads per KV group", "prune_heads")
        check_saveable(model, model.config.hidden_size, kv * (heads // kv - k))
    check_common(cfg, model, ctx, "prune_heads")


@torch.no_grad()
def apply_heads(model, cfg: HeadCutConfig, ctx: StageContext):
    name, layers = blocks(model, "prune_heads", ATTN)
    before = size_info(model)
    heads, kv, hd = head_shape(model)
    k = removed_count(kv if cfg.mode == "kv_groups" else heads // kv, cfg.ratio, "heads", "prune_heads")
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


STAGE = Stage(name="prune_heads", config=HeadCutConfig, apply=apply_heads, check=check_heads,
              summary="Structured: remove attention heads, GQA-aware (whole KV groups or query heads within groups).")
