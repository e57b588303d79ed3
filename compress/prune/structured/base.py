"""What the structured-pruning stages share: the config base (`ratio`, `importance`,
`calibration`), the calibrated channel norms through the shared layer-wise runner, the count of
units a ratio removes, and the checks every cut makes before any work."""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field

from compress.calibration import CalibrationConfig, check_calibration
from compress.collectors import ChannelNormCollector
from compress.errors import UserError
from compress.export.compressed_tensors import quantization_config
from compress.layerwise import run_layerwise
from compress.prune.structured.cuts import heads_fit_width, mistral_config
from compress.schema import Strict
from compress.stage import StageContext


class CutConfig(Strict):
    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="fraction removed (rounded to whole units, the same "
                         "count in every layer)")
    importance: Literal["activation", "magnitude"] = Field(
        "activation", description="activation: calibration activations through the layer-wise runner; magnitude: "
        "weight norms (no calibration)")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)


def calibrated(model, names: list[str], cfg: CutConfig, ctx: StageContext, desc: str, observe=None) -> dict:
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


def removed_count(n: int, ratio: float, what: str, stage: str) -> int:
    """How many of `n` units `ratio` removes; UserError when that is none or all of them."""
    k = round(ratio * n)
    if k == 0:
        raise UserError(f"{stage}.ratio: {ratio:g} of {n} {what} rounds to none removed; raise the ratio")
    if k >= n:
        raise UserError(f"{stage}.ratio: {ratio:g} of {n} {what} would remove every one; lower the ratio")
    return k


def check_common(cfg: CutConfig, model, ctx: StageContext, stage: str) -> None:
    """Refuse a quantized input (prune before quantizing) and calibration data that does not fit."""
    q = quantization_config(ctx.model_dir) if ctx.model_dir is not None else None
    if q:
        raise UserError(f"{stage}: {ctx.model_dir} is quantized ({q.get('format', '?')}); prune before quantizing")
    if cfg.importance not in ("magnitude", "last"):
        check_calibration(ctx.tokenizer, cfg.calibration, stage)


def check_saveable(model, hidden: int, heads: int) -> None:
    """A cut that leaves a head count the Llama config refuses is saved as Mistral (as_loadable);
    a Llama config with a field Mistral lacks is refused here, before any work."""
    c = copy.deepcopy(model.config)
    c.hidden_size, c.num_attention_heads = hidden, heads
    if getattr(c, "model_type", None) == "llama" and not heads_fit_width(c):
        mistral_config(c)
