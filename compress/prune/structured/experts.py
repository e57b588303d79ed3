"""Structured: remove whole experts from every mixture-of-experts layer (`prune_experts`).

Every MoE block keeps the same number of experts (the config holds one count): those with the
highest saliency on calibration tokens, measured through the shared layer-wise runner on the
linearized model (compress.moe.LinearExperts):
  - `reap` (REAP, router-weighted expert activation pruning, Lasby et al. 2025): for expert j,
    the mean over the tokens routed to it of gate weight × ‖expert output‖₂; an expert no
    calibration token is routed to scores 0.
  - `frequency`: the number of tokens routed to it.
The cut is pure slicing on the fused experts module, whatever its layout: every per-expert
tensor (first dimension = the expert count) of the experts module, the router (weight rows,
bias, per-expert buffers such as a score-correction bias) and the block keeps the kept experts,
in their original order. The integer attributes and the config field that held the count
shrink; the config field is found generically, as the integer field named *expert* (not
*per_tok*, not *shared*) equal to the router's row count (`num_experts`, `num_local_experts`,
`n_routed_experts`). The result is the same architecture with fewer experts, which transformers
and vLLM load with no custom code; removing experts the router never selects changes no
output (a test).

Refused in one line before any work: a model with no MoE layers, a ratio that removes no expert,
leaves fewer experts than the router's top-k, or groups routing (`n_group` > 1), a config with no
field holding the count, a quantized input. A ratio outside (0, 1) fails the config's bounds.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compress import moe
from compress.errors import UserError
from compress.layerwise import run_layerwise
from compress.prune.structured.base import CutConfig, check_common, removed_count
from compress.prune.structured.cuts import size_info
from compress.stage import Stage, StageContext

NAME = "prune_experts"


class ExpertCutConfig(CutConfig):
    ratio: float = Field(0.25, gt=0.0, lt=1.0, description="fraction of each layer's experts removed (rounded to "
                         "whole experts, the same count in every layer)")
    importance: Literal["reap", "frequency"] = Field(
        "reap", description="reap: mean of gate weight × expert output norm over the tokens routed to the expert "
        "(REAP); frequency: the number of tokens routed to it")


# ------------------------------------------------------------------------------ structure

def _is_count(name: str, value, e: int) -> bool:
    """An integer attribute or config field that holds the number of routed experts."""
    return (type(value) is int and value == e and "expert" in name.lower()
            and "per_tok" not in name.lower() and "shared" not in name.lower())


def _configs(model) -> list:
    c = model.config
    text = c.get_text_config() if hasattr(c, "get_text_config") else c
    return [c] if text is c else [c, text]


def count_fields(model, e: int) -> list[tuple[object, str]]:
    """(config, field) pairs holding the expert count `e`."""
    return [(c, k) for c in _configs(model) for k, v in c.to_dict().items() if _is_count(k, v, e)]


def router_of(block: nn.Module, experts_name: str, e: int) -> str | None:
    """The block's child whose 2-D weight has one row per expert (the top-k router)."""
    for cn, child in block.named_children():
        w = getattr(child, "weight", None)
        if cn != experts_name and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == e \
                and not any(child.children()):
            return cn
    return None


def _top_k(model, block: nn.Module, router: nn.Module) -> int | None:
    for mod in (router, block):
        if type(getattr(mod, "top_k", None)) is int:
            return mod.top_k
    return next((v for c in _configs(model) for k, v in c.to_dict().items()
                 if "per_tok" in k and type(v) is int), None)


def plan(model, cfg: ExpertCutConfig) -> tuple[int, int, list[tuple[str, nn.Module, str, str]]]:
    """(experts per layer, experts removed per layer, [(block name, block, experts child, router
    child)]); UserError on a model this cut cannot handle."""
    found = moe.expert_blocks(model)
    if not found:
        raise UserError(f"{NAME}: {type(model).__name__} has no mixture-of-experts layers (experts with a router); "
                        "prune_mlp cuts a dense MLP's channels")
    counts = {moe.num_experts(getattr(b, ex)) for _, b, ex in found}
    if len(counts) > 1:
        raise UserError(f"{NAME}: the MoE layers hold different expert counts ({sorted(counts)}); the cut keeps "
                        "one count for the config")
    e = counts.pop()
    blocks = []
    for name, block, ex in found:
        r = router_of(block, ex, e)
        if r is None:
            raise UserError(f"{NAME}: {name} ({type(block).__name__}) has no router (a child whose weight has one "
                            f"row per expert, {e})")
        blocks.append((name, block, ex, r))
    top_k = _top_k(model, found[0][1], getattr(found[0][1], blocks[0][3]))
    if top_k is None:
        raise UserError(f"{NAME}: cannot tell the router's top-k (no top_k on {blocks[0][0]}.{blocks[0][3]}, no "
                        "num_experts_per_tok in the config)")
    k = removed_count(e, cfg.ratio, "experts per layer", NAME)
    if e - k < top_k:
        raise UserError(f"{NAME}.ratio: {cfg.ratio:g} of {e} experts leaves {e - k}, fewer than the router's top-k "
                        f"of {top_k}; keep at least {top_k} (ratio at most {(e - top_k) / e:g})")
    groups = next((getattr(c, "n_group") for c in _configs(model) if type(getattr(c, "n_group", None)) is int), 1)
    if groups > 1:
        raise UserError(f"{NAME}: the router picks experts within n_group={groups} groups of {e // groups}, which "
                        "removing experts would unbalance; not supported")
    if not count_fields(model, e):
        raise UserError(f"{NAME}: no integer field of {type(model.config).__name__} named *expert* equals the "
                        f"router's {e} rows, so the new count cannot be written")
    return e, k, blocks


# ------------------------------------------------------------------------------ saliency

def _routing(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
    w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
    return idx, w


class ExpertSaliency:
    """Per expert of one LinearExperts: routed tokens and the sum of gate weight × ‖output‖₂.

    `route` sees a forward call's routing (before the experts run) and starts that call's
    figures; `add(j, y)` adds expert j's outputs, whose rows follow LinearExperts' order (the
    (token, slot) pairs routed to j, in token order); `commit` keeps the call's figures. A call
    that is never committed (the runner's probe of layer 0's output type) is dropped."""

    def __init__(self, e: int):
        self.tokens = torch.zeros(e, dtype=torch.long)
        self.reap = torch.zeros(e, dtype=torch.float64)
        self._call = None

    def route(self, idx: torch.Tensor, w: torch.Tensor) -> None:
        e = len(self.tokens)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=e + 1)[:e]
        ends = [0] + counts.cumsum(0).tolist()
        self._call = (counts, w.reshape(-1)[order].double(), ends, torch.zeros(e, dtype=torch.float64,
                                                                              device=w.device))

    def add(self, j: int, y: torch.Tensor) -> None:
        counts, ws, ends, reap = self._call
        w = ws[ends[j]:ends[j + 1]]
        if y.shape[0] != w.numel():
            raise RuntimeError(f"expert {j}: {y.shape[0]} outputs for {w.numel()} routed tokens (LinearExperts' "
                               "order changed?)")
        reap[j] += (w * y.double().norm(dim=-1)).sum()

    def commit(self) -> None:
        if self._call is not None:
            counts, _, _, reap = self._call
            self.tokens += counts.cpu()
            self.reap += reap.cpu()
            self._call = None


def expert_saliency(model, cfg: ExpertCutConfig, ctx: StageContext) -> tuple[dict[str, ExpertSaliency], dict]:
    """{LinearExperts name: ExpertSaliency} over the calibration tokens, and the runner's info.
    The model must be linearized; the hooks go in `finally`."""
    sal = {name: ExpertSaliency(len(m)) for name, m in moe.linear_experts(model)}
    handles = []

    def observe(i, x, y):  # a batch has gone through layer i: keep what its experts saw
        for s in sal.values():
            s.commit()

    try:
        for name, m in moe.linear_experts(model):
            s = sal[name]
            handles.append(m.register_forward_pre_hook(lambda mod, a, kw, s=s: s.route(*_routing(a, kw)),
                                                       with_kwargs=True))
            for j, mlp in enumerate(m):
                handles.append(mlp.register_forward_hook(lambda mod, a, y, s=s, j=j: s.add(j, y)))
        info = run_layerwise(model, ctx.calibration(cfg.calibration), [], lambda m, dev: None,
                             lambda i, g, st: {}, ctx.device, sequential=False,
                             batch_size=cfg.calibration.batch_size, progress=ctx.progress, desc="expert saliency",
                             observe=observe)
    finally:
        for h in handles:
            h.remove()
    return sal, info


# ------------------------------------------------------------------------------ the cut

def _slice(mod: nn.Module, e: int, keep: torch.Tensor) -> None:
    """Keep entries `keep` along dim 0 of `mod`'s own per-expert parameters and buffers."""
    for store in (mod._parameters, mod._buffers):
        for k, t in list(store.items()):
            if t is None or t.dim() == 0 or t.shape[0] != e:
                continue
            new = t.data.index_select(0, keep.to(t.device))
            store[k] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new


def cut_experts(block: nn.Module, experts_name: str, router_name: str, keep: torch.Tensor) -> None:
    """Keep experts `keep` (sorted indices) of one fused MoE block: the experts' 3-D weights and
    biases, the router's rows and per-expert buffers, their expert-count attributes."""
    experts, router = getattr(block, experts_name), getattr(block, router_name)
    e = moe.num_experts(experts)
    for mod in (block, experts, router):
        _slice(mod, e, keep)
        for attr, v in list(vars(mod).items()):
            if _is_count(attr, v, e):
                setattr(mod, attr, len(keep))


@torch.no_grad()
def apply_experts(model, cfg: ExpertCutConfig, ctx: StageContext):
    e, k, _ = plan(model, cfg)
    before = size_info(model)["params"]
    moe.linearize(model)  # a no-op where the pipeline did it (Stage.experts)
    sal, run = expert_saliency(model, cfg, ctx)
    moe.fuse(model)
    layers = {}
    for name, block, ex, router in plan(model, cfg)[2]:
        s = sal[f"{name}.{ex}" if name else ex]
        mean = s.reap / s.tokens.clamp(min=1)
        score = mean if cfg.importance == "reap" else s.tokens.double()
        keep = score.argsort(descending=True, stable=True)[:e - k].sort().values
        cut_experts(block, ex, router, keep)
        layers[name] = {"kept": keep.tolist(), "saliency": [round(v, 6) for v in score.tolist()],
                        "tokens": s.tokens.tolist()}
    fields = count_fields(model, e)
    for c, f in fields:
        setattr(c, f, e - k)
    for m in model.modules():  # the model's own copies (e.g. the causal LM's num_experts for the aux loss)
        for attr, v in list(vars(m).items()):
            if _is_count(attr, v, e):
                setattr(m, attr, e - k)
    return model, {"experts": [e, e - k], "removed_per_layer": k, "importance": cfg.importance,
                   "config_fields": [f for _, f in fields], "params": [before, size_info(model)["params"]],
                   "layers": layers, "memory": run["memory"], "calibration_seconds": run["seconds"]}


def check_experts(cfg: ExpertCutConfig, model, ctx: StageContext) -> None:
    plan(model, cfg)
    check_common(cfg, model, ctx, NAME)


STAGE = Stage(name=NAME, config=ExpertCutConfig, apply=apply_experts, check=check_experts, experts=True,
              summary="Structured: remove a fraction of every MoE layer's experts (REAP saliency or routing "
                      "frequency), router rows and config count with them.")
