"""Wanda (Sun et al., 2023): prune the weights with the smallest |W_ij| · ‖X_j‖, compared
within each output row (or each N:M group), from the input channel norms of calibration
data; no weight update. The maths is `compress.prune.masks.wanda_mask`; the stage runs it on
the layer-wise calibration runner with channel-norm statistics.
"""

from __future__ import annotations

import torch
from pydantic import Field

from compress.collectors import ChannelNormCollector
from compress.prune.calibrated import CalibratedPruneConfig, check_prune, run_pruning
from compress.prune.masks import wanda_mask
from compress.stage import Stage, StageContext


class WandaConfig(CalibratedPruneConfig):
    sequential: bool = Field(False, description="prune q/k/v, o, gate/up, down in turn (each seeing the pruned "
                             "outputs before it); off, as in the paper: one statistics pass per layer")


def check(cfg: WandaConfig, model, ctx: StageContext) -> None:
    check_prune(cfg, model, ctx, "wanda")


def apply(model, cfg: WandaConfig, ctx: StageContext):
    @torch.no_grad()
    def prune(mods, stats, sparsity):
        for m in mods:
            m.weight.mul_(wanda_mask(m.weight, stats.sq, sparsity, cfg.pattern).to(m.weight.dtype))
        return {}

    info = run_pruning(model, cfg, ctx, "wanda", lambda m, dev: ChannelNormCollector(m.in_features, dev), prune,
                       cfg.sequential)
    return model, info


STAGE = Stage(name="wanda", config=WandaConfig, apply=apply, check=check, weights=True, experts=True,
              summary="Wanda pruning (unstructured or N:M): |weight| x input norm, per output row.")
