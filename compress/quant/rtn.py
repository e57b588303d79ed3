"""Round-to-nearest weight-only quantization (W4A16 / W8A16): no calibration data.

Each targeted nn.Linear is rounded on its own grid (per group of input channels, or per
output channel) on the stage's device, one module at a time, and written as a
compressed-tensors `pack-quantized` checkpoint. The baseline every calibrated method
(GPTQ, AWQ) must beat.
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from compress.export.compressed_tensors import attach
from compress.quant.common import WeightQuantConfig, check_weight_quant, group_summary, store
from compress.quant.grid import Grid, rtn
from compress.stage import Stage, StageContext


class RTNConfig(WeightQuantConfig):
    pass


def check(cfg: RTNConfig, model, ctx: StageContext) -> None:
    check_weight_quant(cfg, model, ctx, "rtn")


@torch.no_grad()
def apply(model, cfg: RTNConfig, ctx: StageContext):
    names = check_weight_quant(cfg, model, ctx, "rtn")
    t0 = time.perf_counter()
    records, schemes, per_module = {}, {}, {}
    for name in tqdm(names, desc="rtn", unit="module", disable=not ctx.progress, leave=False):
        mod = model.get_submodule(name)
        w = mod.weight.to(ctx.device)
        schemes[name] = cfg.scheme(mod.in_features)
        grid = Grid(bits=cfg.bits, symmetric=cfg.symmetric, group_size=schemes[name].group_size, scale_dtype=w.dtype)
        q, scale, zero = rtn(w, grid)
        err = ((w.float() - q).norm() / w.float().norm().clamp(min=1e-30)).item()
        records[name] = store(mod, q, scale, zero)
        per_module[name] = {"weight_rel_error": round(err, 6), "group_size": grid.group_size}
    attach(model, records, schemes)
    return model, {"scheme": f"W{cfg.bits}A16", "bits": cfg.bits, "group_size": cfg.group_size,
                   "group_sizes": group_summary(schemes), "symmetric": cfg.symmetric, "quantized_modules": len(names),
                   "seconds_solve": round(time.perf_counter() - t0, 3), "modules": per_module}


STAGE = Stage(name="rtn", config=RTNConfig, apply=apply, check=check, quantizes=True, weights=True, experts=True,
              summary="Round-to-nearest weight-only int4/int8 (W4A16, W8A16), compressed-tensors pack-quantized.")
