"""Smoothing mappings over mixture-of-experts layers (SmoothQuant, AWQ), found by structure.

A dense mapping names linears of one MLP (`mlp.gate_proj`, `mlp.up_proj` after
`post_attention_layernorm`; `mlp.down_proj` after `mlp.up_proj`). Where the layer's `mlp` is
an MoE block instead (its experts linearized by compress.moe, so each expert is an
`ExpertMLP` of nn.Linear), `expand` rewrites the mapping over what the block holds:

  * op outside the block (the norm) -> one mapping over every expert's gate/up and every
    shared expert's gate/up together (one scale vector for the norm), plus the block's
    routers (top-k router, shared-expert gate) in `follow`: their weight columns take the
    same scale without setting it, so router logits and hence routing stay exactly as they
    were (up to float rounding) and the routers stay 16-bit;
  * op inside the block (up_proj -> down_proj) -> one mapping per expert and per shared
    expert (`per_expert` for the routed ones: its scale comes from that expert's tokens,
    and a stage leaves an expert with too few tokens unsmoothed).

Per-expert names come from the experts module (`LinearExperts.names`: gate_proj / up_proj /
down_proj, or Mixtral's w1 / w3 / w2); shared experts are the block's children holding the
mapping's linears by their dense names. An expert whose gating is not linear in up_proj's
output (gpt-oss clamps it) cannot absorb up->down scales: probed, not assumed.
"""

from __future__ import annotations

import torch
from torch import nn

from compress.moe import ExpertMLP, LinearExperts, router_names
from compress.quant.mapping import Mapping

ROLES = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}   # dense name -> expert role


class MoEMapping(Mapping):
    """A mapping over an MoE block (made by `expand`, never written in a recipe)."""

    follow: list[str] = []      # routers: weight columns take the scale, exactly, without setting it
    per_expert: bool = False    # the scale comes from one routed expert's tokens (threshold applies)


def _experts(block: nn.Module) -> tuple[str, LinearExperts] | None:
    return next(((n, c) for n, c in block.named_children() if isinstance(c, LinearExperts)), None)


def _shared(block: nn.Module, leaves: list[str], skip: set[str]) -> list[str]:
    """Children of the block (not the experts, not routers) holding every leaf as an nn.Linear."""
    return [n for n, c in block.named_children() if n not in skip
            and all(isinstance(getattr(c, leaf, None), nn.Linear) for leaf in leaves)]


def _expert_leaf(experts: LinearExperts, mlp: ExpertMLP, leaf: str) -> str | None:
    name = experts.names.get(ROLES.get(leaf, ""), None)
    return name if name is not None and isinstance(getattr(mlp, name, None), nn.Linear) else None


def up_is_linear(experts: LinearExperts) -> bool:
    """Whether each expert's hidden activation scales channel-wise with up_proj's output
    (act(g) * u does; a clamped u does not): h(g, u / s) == h(g, u) / s on random input."""
    if not experts.layout.has_gate or not len(experts):
        return False
    mlp, g = experts[0], torch.Generator().manual_seed(0)
    width = mlp.role("up").out_features
    gate, up = torch.randn(4, width, generator=g) * 8, torch.randn(4, width, generator=g) * 8
    s = torch.rand(width, generator=g) + 0.5
    with torch.no_grad():
        return torch.allclose(mlp.hidden(gate, up / s), mlp.hidden(gate, up) / s, rtol=1e-4, atol=1e-5)


def expand(layer: nn.Module, mp: Mapping) -> list[Mapping]:
    """`mp` rewritten over the layer's MoE block (see module docstring); [mp] where it is not about one."""
    names = dict(layer.named_modules())
    parents = {b.rpartition(".")[0] for b in mp.balance}
    if all(n in names for n in [*mp.balance, mp.smooth]) or len(parents) != 1:
        return [mp]
    parent = parents.pop()
    block = names.get(parent)
    found = _experts(block) if block is not None else None
    leaves = [b.rpartition(".")[2] for b in mp.balance]
    if found is None or any(leaf not in ROLES for leaf in leaves):
        return [mp]
    ename, experts = found
    pre = f"{parent}." if parent else ""
    routers = [r for r in router_names(block)]
    shared = _shared(block, leaves, {ename, *routers})
    s_parent, _, s_leaf = mp.smooth.rpartition(".")
    if s_parent != parent:   # the op before the block: one mapping over all experts, routers follow
        balance = [f"{pre}{ename}.{k}.{leaf}" for k, m in enumerate(experts) for leaf in
                   [_expert_leaf(experts, m, x) for x in leaves] if leaf]
        balance += [f"{pre}{sh}.{leaf}" for sh in shared for leaf in leaves]
        return [MoEMapping(balance=balance, smooth=mp.smooth, follow=[pre + r for r in routers])]
    if s_leaf not in ROLES:
        return [mp]
    out: list[Mapping] = [MoEMapping(balance=[f"{pre}{sh}.{leaf}" for leaf in leaves], smooth=f"{pre}{sh}.{s_leaf}")
                          for sh in shared]
    if ROLES[s_leaf] == "up" and not up_is_linear(experts):
        return out   # gated non-linearly in u (e.g. clamped): up_proj cannot take down_proj's scales
    for k, m in enumerate(experts):
        bal, op = [_expert_leaf(experts, m, x) for x in leaves], _expert_leaf(experts, m, s_leaf)
        if op and all(bal):
            out.append(MoEMapping(balance=[f"{pre}{ename}.{k}.{b}" for b in bal], smooth=f"{pre}{ename}.{k}.{op}",
                                  per_expert=True))
    return out


def expand_all(layer: nn.Module, mappings) -> list[Mapping]:
    return [x for mp in mappings for x in expand(layer, mp)]
