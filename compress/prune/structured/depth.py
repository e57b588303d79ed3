"""The `prune_depth` stage: remove whole decoder layers, the least influential by block
influence (ShortGPT: 1 - cos(layer input, layer output), averaged over calibration tokens,
through the layer-wise runner's `observe`), or the last ones (`importance: last`)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.layerwise import decoder_layers
from compress.prune.structured.base import CutConfig, calibrated, check_common, removed_count
from compress.prune.structured.cuts import cut_depth, size_info
from compress.stage import Stage, StageContext


class DepthCutConfig(CutConfig):
    importance: Literal["block_influence", "last"] = Field(
        "block_influence", description="block_influence: drop the layers whose output is most like their input "
        "(ShortGPT); last: drop the last layers")


def block_influence(model, layers_name, layers, cfg: DepthCutConfig, ctx: StageContext) -> list[float]:
    """1 - mean cosine(input, output) per layer over the calibration tokens."""
    sums = torch.zeros(len(layers), dtype=torch.float64)
    counts = torch.zeros(len(layers), dtype=torch.float64)

    def observe(i, x, y):
        cos = torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1)
        sums[i] += (1 - cos).sum().item()
        counts[i] += cos.numel()

    calibrated(model, [], cfg, ctx, "block influence", observe=observe)
    return (sums / counts.clamp(min=1)).tolist()


def check_depth(cfg: DepthCutConfig, model, ctx: StageContext) -> None:
    _, layers = decoder_layers(model)
    removed_count(len(layers), cfg.ratio, "decoder layers", "prune_depth")
    check_common(cfg, model, ctx, "prune_depth")


@torch.no_grad()
def apply_depth(model, cfg: DepthCutConfig, ctx: StageContext):
    name, layers = decoder_layers(model)
    before, n = size_info(model), len(layers)
    k = removed_count(n, cfg.ratio, "decoder layers", "prune_depth")
    if cfg.importance == "last":
        bi, drop = None, list(range(n - k, n))
    else:
        bi = block_influence(model, name, layers, cfg, ctx)
        drop = sorted(sorted(range(n), key=lambda i: (bi[i], i))[:k])
    cut_depth(model, name, [i for i in range(n) if i not in drop])
    return model, {"layers": [n, n - k], "removed_layers": drop, "block_influence": bi, "before": before,
                   "after": size_info(model), "importance": cfg.importance}


STAGE = Stage(name="prune_depth", config=DepthCutConfig, apply=apply_depth, check=check_depth,
              summary="Structured: remove whole decoder layers by block influence (ShortGPT) or the last ones.")
