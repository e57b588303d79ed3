"""The `prune_hidden` stage: remove hidden (embedding) channels through every layer, the norms
and the (tied) head included (RMSNorm weights and eps rescaled for the narrower width), ranked
by the RMS of the normalised hidden states every layer reads (Minitron; calibration) or by the
embedding's column norms (`importance: magnitude`)."""

from __future__ import annotations

import torch

from compress.prune.structured.base import CutConfig, calibrated, check_common, check_saveable, removed_count
from compress.prune.structured.cuts import ATTN, MLP, as_loadable, blocks, cut_hidden, head_shape, size_info
from compress.stage import Stage, StageContext


class HiddenCutConfig(CutConfig):
    pass


def hidden_scores(model, layers_name, layers, cfg: HiddenCutConfig, ctx: StageContext) -> torch.Tensor:
    """Per hidden channel: magnitude, the embedding column norms; activation (Minitron), the
    RMS of the normalised hidden states every layer reads (q_proj's and gate_proj's inputs),
    summed over layers."""
    if cfg.importance == "magnitude":
        return model.get_input_embeddings().weight.float().norm(dim=0).cpu()
    names = [f"{layers_name}.{i}.{rel}" for i in range(len(layers)) for rel in ("self_attn.q_proj", "mlp.gate_proj")]
    stats = calibrated(model, names, cfg, ctx, "hidden importance")
    return sum(v.sqrt() for v in stats.values())


def check_hidden(cfg: HiddenCutConfig, model, ctx: StageContext) -> None:
    blocks(model, "prune_hidden", ATTN + MLP)
    d = model.config.hidden_size
    check_saveable(model, d - removed_count(d, cfg.ratio, "hidden channels", "prune_hidden"), head_shape(model)[0])
    check_common(cfg, model, ctx, "prune_hidden")


@torch.no_grad()
def apply_hidden(model, cfg: HiddenCutConfig, ctx: StageContext):
    name, layers = blocks(model, "prune_hidden", ATTN + MLP)
    before, d = size_info(model), model.config.hidden_size
    k = removed_count(d, cfg.ratio, "hidden channels", "prune_hidden")
    keep = hidden_scores(model, name, layers, cfg, ctx).argsort(descending=True, stable=True)[:d - k].sort().values
    cut_hidden(model, layers, keep)
    model = as_loadable(model)
    return model, {"hidden_size": [d, d - k], "before": before, "after": size_info(model),
                   "importance": cfg.importance}


STAGE = Stage(name="prune_hidden", config=HiddenCutConfig, apply=apply_hidden, check=check_hidden,
              summary="Structured: remove hidden (embedding) channels through every layer, norms and head included.")
