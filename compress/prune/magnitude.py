"""Magnitude pruning: zero the smallest-|w| fraction of each linear layer, or the smallest
M - N of every M consecutive input weights (N:M, e.g. 2:4).

Each targeted `nn.Linear` is pruned to its own sparsity (per layer, not global), so the
measured sparsity of every pruned layer equals the asked one up to one weight.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from compress.errors import UserError
from compress.moe import router_names
from compress.prune.masks import nm_mask, parse_nm
from compress.select import linear_names, matches, unmatched
from compress.stage import Stage, StageContext
from compress.schema import Strict


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask for `w` (any shape) with exactly round(sparsity * w.numel()) False entries.

    The pruned entries are those of smallest |w|; ties are broken by position, so the count
    is exact even when many weights are equal (e.g. already zero).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    n_prune = int(round(sparsity * w.numel()))
    mask = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
    if n_prune:
        idx = torch.argsort(w.detach().abs().flatten().float(), stable=True)[:n_prune]
        mask[idx] = False
    return mask.view_as(w)


class MagnitudePruneConfig(Strict):
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of weights zeroed in each pruned layer")
    skip: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="module-name globs left dense (embeddings are never nn.Linear, so never pruned)",
    )
    overrides: dict[str, Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        default_factory=dict,
        description="per-layer sparsity: module-name glob -> sparsity; the first matching glob wins",
    )
    nm: str | None = Field(None, description="semi-structured 'N:M' (e.g. '2:4'): keep the N largest of every M "
                           "consecutive input weights; replaces sparsity and overrides")

    @model_validator(mode="after")
    def _nm_alone(self):
        pattern = parse_nm(self.nm)
        if pattern and ("sparsity" in self.model_fields_set or self.overrides):
            raise ValueError(f"nm {self.nm} fixes every layer's sparsity; drop `sparsity` and `overrides`")
        return self


def target_layers(model: torch.nn.Module, cfg: MagnitudePruneConfig) -> dict[str, float]:
    """Module name -> sparsity for every nn.Linear the config prunes (the linears of linearized
    experts included; MoE routers never: they pick the experts)."""
    out = {}
    routers = set(router_names(model))
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear) or matches(name, cfg.skip) or name in routers:
            continue
        hit = matches(name, cfg.overrides)
        out[name] = cfg.overrides[hit] if hit else cfg.sparsity
    return out


@torch.no_grad()
def magnitude_prune_(model: torch.nn.Module, cfg: MagnitudePruneConfig, device: str = "cpu") -> dict:
    """Prune `model` in place; return {layer: measured sparsity} for the pruned layers."""
    targets = target_layers(model, cfg)
    skipped_tied = _tied_to_skipped(model, cfg)
    measured = {}
    for name in tqdm(list(targets), desc="magnitude prune", unit="layer", leave=False):
        w = model.get_submodule(name).weight
        if w.data_ptr() in skipped_tied:
            continue  # shares storage with a layer the user asked to keep dense
        wd = w.to(device)  # the sort runs on `device`
        keep = nm_mask(wd.abs(), *parse_nm(cfg.nm)) if cfg.nm else magnitude_mask(wd, targets[name])
        w.mul_(keep.to(w.device, w.dtype))
        measured[name] = round((w == 0).sum().item() / w.numel(), 6)
    return measured


def _tied_to_skipped(model: torch.nn.Module, cfg: MagnitudePruneConfig) -> set[int]:
    ptrs = set()
    for name, mod in model.named_modules():
        if matches(name, cfg.skip):
            ptrs.update(p.data_ptr() for p in mod.parameters(recurse=False))
    return ptrs


def check(cfg: MagnitudePruneConfig, model, ctx: StageContext) -> None:
    names = linear_names(model)
    bad = [f"skip: {p!r}" for p in unmatched(cfg.skip, names) if p != "lm_head"]
    bad += [f"overrides: {p!r}" for p in unmatched(cfg.overrides, names)]
    if cfg.nm:
        m = parse_nm(cfg.nm)[1]
        bad += [f"nm: {m} does not divide the input width {w} of {n}"
                for n, w in ((n, model.get_submodule(n).in_features) for n in target_layers(model, cfg)) if w % m]
    if bad:
        raise UserError(*(f"magnitude_prune.{b}" + ("" if b.startswith("nm:") else " matches no nn.Linear module")
                          for b in bad[:6]))


def apply(model, cfg: MagnitudePruneConfig, ctx: StageContext):
    measured = magnitude_prune_(model, cfg, ctx.device)
    if not measured:
        raise ValueError("magnitude_prune matched no nn.Linear layer (check `skip`)")
    return model, {"pruned_layers": len(measured), "layer_sparsity": measured}


STAGE = Stage(
    name="magnitude_prune",
    config=MagnitudePruneConfig,
    apply=apply,
    check=check,
    weights=True,
    experts=True,
    summary="Unstructured magnitude pruning of nn.Linear weights, per-layer sparsity.",
)
