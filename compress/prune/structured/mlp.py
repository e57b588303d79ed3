"""The `prune_mlp` stage: remove intermediate channels of the gated MLP (rows of gate/up,
columns of down), the same count in every layer, ranked by |activation| x the norm of what each
channel writes (calibration through the layer-wise runner) or by weight norms alone
(`importance: magnitude`)."""

from __future__ import annotations

import torch

from compress.prune.structured.base import CutConfig, calibrated, check_common, removed_count
from compress.prune.structured.cuts import MLP, blocks, cut_mlp, size_info
from compress.stage import Stage, StageContext


class MLPCutConfig(CutConfig):
    pass


def mlp_scores(model, layers_name, layers, cfg: MLPCutConfig, ctx: StageContext) -> list[torch.Tensor]:
    """Per layer, the importance of each intermediate channel (higher: kept)."""
    if cfg.importance == "magnitude":
        return [(l.mlp.gate_proj.weight.float().norm(dim=1) * l.mlp.up_proj.weight.float().norm(dim=1))
                * l.mlp.down_proj.weight.float().norm(dim=0) for l in layers]
    names = [f"{layers_name}.{i}.mlp.down_proj" for i in range(len(layers))]
    st = calibrated(model, names, cfg, ctx, "MLP importance")
    # |activation of channel j| times the norm of what it writes: its contribution to the output
    return [st[f"{i}.mlp.down_proj"].sqrt() * l.mlp.down_proj.weight.float().norm(dim=0).cpu()
            for i, l in enumerate(layers)]


def check_mlp(cfg: MLPCutConfig, model, ctx: StageContext) -> None:
    blocks(model, "prune_mlp", MLP)
    removed_count(model.config.intermediate_size, cfg.ratio, "MLP channels", "prune_mlp")
    check_common(cfg, model, ctx, "prune_mlp")


@torch.no_grad()
def apply_mlp(model, cfg: MLPCutConfig, ctx: StageContext):
    name, layers = blocks(model, "prune_mlp", MLP)
    before, n = size_info(model), model.config.intermediate_size
    k = removed_count(n, cfg.ratio, "MLP channels", "prune_mlp")
    scores = mlp_scores(model, name, layers, cfg, ctx)
    for layer, s in zip(layers, scores):
        cut_mlp(layer, s.argsort(descending=True, stable=True)[:n - k].sort().values)
    model.config.intermediate_size = n - k
    return model, {"intermediate_size": [n, n - k], "removed_per_layer": k, "before": before,
                   "after": size_info(model), "importance": cfg.importance}


STAGE = Stage(name="prune_mlp", config=MLPCutConfig, apply=apply_mlp, check=check_mlp,
              summary="Structured: remove MLP intermediate channels (gate/up/down together); a smaller dense model.")
