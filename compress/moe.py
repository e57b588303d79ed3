"""Mixture-of-experts layers, found by structure and turned into per-expert linear modules.

In transformers 5 a layer's experts are one module holding 3-D parameters (`gate_up_proj`
[experts, 2 × intermediate, hidden] or transposed, `down_proj` [experts, hidden, intermediate],
optional biases) called as `experts(hidden [T, H], top_k_index [T, k], top_k_weights [T, k])`
beside a router. transformers' `use_experts_implementation` states the layout on the module
(`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`); a module with those 3-D
parameters and no such flags is read with transformers' defaults (gated, concatenated
[gate; up], not transposed). No branch on a model's name.

`linearize(model)` replaces every such module by a `LinearExperts`: a ModuleList of per-expert
MLPs of plain `nn.Linear` (`experts.N.gate_proj / up_proj / down_proj`, or as the model type's
checkpoints name them: compress.moe_checkpoint; the names `save_pretrained` and vLLM's MoE
loaders use), with a forward that computes the same function.
Every stage that works on `nn.Linear` then covers the experts, and the calibration runner's
hooks see, for each expert, exactly the tokens its router sends it (or, with
`all_tokens`, every token for statistics while the output stays the routed one). `fuse(model)`
writes the weights back into the 3-D parameters. This is the peer's "linearize" idea
(llm-compressor `modeling/moe/linear_experts.py`), written over transformers' own layout flags.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compress.moe_checkpoint import checkpoint_layout

_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


# ---------------------------------------------------------------------------- structure

@dataclass(frozen=True)
class Layout:
    """How a fused experts module stores its weights (transformers' flags, or their defaults)."""

    has_gate: bool
    has_bias: bool
    transposed: bool
    concatenated: bool

    @classmethod
    def of(cls, mod: nn.Module) -> "Layout":
        has_gate = getattr(mod, "has_gate", isinstance(getattr(mod, "gate_up_proj", None), nn.Parameter))
        return cls(has_gate=has_gate, has_bias=getattr(mod, "has_bias", hasattr(mod, "down_proj_bias")),
                   transposed=getattr(mod, "is_transposed", False),
                   concatenated=getattr(mod, "is_concatenated", True))


def is_fused_experts(mod: nn.Module) -> bool:
    """A module holding a layer's experts as 3-D parameters (down_proj plus gate_up_proj or up_proj)."""
    down = mod._parameters.get("down_proj")
    up = mod._parameters.get("gate_up_proj", mod._parameters.get("up_proj"))
    return down is not None and up is not None and down.dim() == 3 and up.dim() == 3


def fused_experts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]


def num_experts(mod: nn.Module) -> int:
    if isinstance(mod, LinearExperts):
        return len(mod)
    return mod.down_proj.shape[0]


def expert_blocks(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(block name, block, experts child name) of every MoE block (fused or linearized)."""
    out = []
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            if isinstance(child, LinearExperts) or is_fused_experts(child):
                out.append((name, mod, child_name))
    return out


def router_names(model: nn.Module) -> list[str]:
    """Routers of the MoE blocks: a block's other children whose 2-D weight has one row per expert
    (the top-k router) or one row (a shared expert's sigmoid gate), and no modules inside."""
    out = []
    for name, block, experts_name in expert_blocks(model):
        e = num_experts(getattr(block, experts_name))
        for cn, child in block.named_children():
            w = getattr(child, "weight", None)
            if cn == experts_name or not isinstance(w, torch.Tensor) or w.dim() != 2 or any(child.children()):
                continue
            if w.shape[0] in (e, 1):
                out.append(f"{name}.{cn}" if name else cn)
    return out


def expert_index(name: str) -> tuple[str, int, str] | None:
    """'…mlp.experts.3.gate_proj' -> ('…mlp.experts', 3, 'gate_proj') for names in LinearExperts."""
    parts = name.split(".")
    for i in range(len(parts) - 2, 0, -1):
        if parts[i].isdigit() and parts[i - 1] == "experts":
            return ".".join(parts[:i]), int(parts[i]), ".".join(parts[i + 1:])
    return None


# ---------------------------------------------------------------------------- linear form

class ExpertMLP(nn.Module):
    """One expert as plain linear modules; `gate` is the fused module's own gating function."""

    def __init__(self, linears: dict[str, nn.Linear], owner: "LinearExperts"):
        super().__init__()
        for role, lin in linears.items():  # named as the model type's checkpoints name them
            setattr(self, owner.names[role], lin)
        self._owner = [owner]  # not a submodule

    def role(self, role: str) -> nn.Linear:
        return getattr(self, self._owner[0].names[role])

    def hidden(self, g: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """down_proj's input from gate_proj's and up_proj's outputs (the fused module's gating)."""
        owner = self._owner[0]
        if not owner.layout.has_gate:
            return owner.fused.act_fn(u)
        if not hasattr(owner.fused, "_apply_gate"):
            return owner.fused.act_fn(g) * u
        gate_up = torch.cat([g, u], -1) if owner.layout.concatenated else torch.stack([g, u], -1).flatten(-2)
        return owner.fused._apply_gate(gate_up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.role("gate")(x) if self._owner[0].layout.has_gate else None
        return self.role("down")(self.hidden(g, self.role("up")(x)))


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)  # no init
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.contiguous(), requires_grad=False)
    return lin


class LinearExperts(nn.ModuleList):
    """A fused experts module as a list of per-expert MLPs of nn.Linear; same call, same function.

    `tokens` [experts] counts the routed tokens seen since `reset_counts()` (each token once per
    expert it is sent to). With `all_tokens` every token goes through every expert (forward
    hooks on the linears see them all: statistics for rarely routed experts), while the output
    still adds only the routed tokens' results. Every expert is called on every forward pass,
    with an empty batch where no token is routed to it, so hooks see each expert each pass.
    """

    def __init__(self, fused: nn.Module, names: dict[str, str] | None = None):
        super().__init__()
        self.layout = lay = Layout.of(fused)
        self.names = names or {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
        mlps = []
        e = num_experts(fused)
        up = fused.gate_up_proj if lay.has_gate else fused.up_proj
        up_b = getattr(fused, "gate_up_proj_bias" if lay.has_gate else "up_proj_bias", None) if lay.has_bias else None
        down_b = fused.down_proj_bias if lay.has_bias else None
        for k in range(e):
            w = up.data[k].T if lay.transposed else up.data[k]          # [2I or I, H]
            b = None if up_b is None else up_b.data[k]
            if lay.has_gate:
                inter = w.shape[0] // 2
                rows = (slice(0, inter), slice(inter, None)) if lay.concatenated else (slice(0, None, 2),
                                                                                       slice(1, None, 2))
                lin = {"gate": _linear(w[rows[0]].clone(), None if b is None else b[rows[0]].clone()),
                       "up": _linear(w[rows[1]].clone(), None if b is None else b[rows[1]].clone())}
            else:
                lin = {"up": _linear(w.clone(), None if b is None else b.clone())}
            d = fused.down_proj.data[k].T if lay.transposed else fused.down_proj.data[k]
            lin["down"] = _linear(d.clone(), None if down_b is None else down_b.data[k].clone())
            mlps.append(ExpertMLP(lin, self))
        self.extend(mlps)
        for n in [n for n, _ in fused.named_parameters(recurse=False)]:   # the linears hold the weights now
            setattr(fused, n, nn.Parameter(torch.empty(0, device="meta"), requires_grad=False))
        self.fused = fused  # kept for its gating function and to fuse back (its weights are gone)
        self.all_tokens = False
        self.register_buffer("tokens", torch.zeros(e, dtype=torch.long), persistent=False)

    def __setattr__(self, name, value):
        if name == "fused":  # not a submodule: its (emptied) parameters stay out of the state dict
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def reset_counts(self) -> None:
        self.tokens.zero_()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        top_k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)   # (token, slot) pairs grouped by expert, in token order
        counts = torch.bincount(flat, minlength=len(self) + 1)[:len(self)]  # past the end: parallel sentinels
        self.tokens += counts.to(self.tokens.device)
        ends = counts.cumsum(0).tolist()          # the one host sync of the pass
        for k, mlp in enumerate(self):
            pairs = order[(ends[k - 1] if k else 0):ends[k]]
            tok, pos = pairs // top_k, pairs % top_k
            if self.all_tokens:
                y = mlp(hidden_states)[tok]
            else:
                y = mlp(hidden_states[tok])
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def to_fused(self) -> nn.Module:
        """The original module with these (possibly changed) weights written back into its 3-D parameters."""
        lay, f = self.layout, self.fused

        def param(t):
            return nn.Parameter(t.contiguous(), requires_grad=False)

        ups = []
        up_bs = []
        for mlp in self:
            if lay.has_gate:
                g, u = mlp.role("gate"), mlp.role("up")
                w = torch.cat([g.weight, u.weight]) if lay.concatenated else \
                    torch.stack([g.weight, u.weight], 1).flatten(0, 1)
                b = None if g.bias is None else (torch.cat([g.bias, u.bias]) if lay.concatenated else
                                                 torch.stack([g.bias, u.bias], 1).flatten())
            else:
                w, b = mlp.role("up").weight, mlp.role("up").bias
            ups.append(w.data.T if lay.transposed else w.data)
            up_bs.append(b)
        downs = [m.role("down").weight.data.T if lay.transposed else m.role("down").weight.data for m in self]
        up_name = "gate_up_proj" if lay.has_gate else "up_proj"
        setattr(f, up_name, param(torch.stack(ups)))
        setattr(f, "down_proj", param(torch.stack(downs)))
        if lay.has_bias:
            setattr(f, f"{up_name}_bias", param(torch.stack([b.data for b in up_bs])))
            setattr(f, "down_proj_bias", param(torch.stack([m.role("down").bias.data for m in self])))
        return f


# ---------------------------------------------------------------------------- whole models

def _set(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, mod)


def linearize(model: nn.Module) -> int:
    """Replace every fused experts module by its LinearExperts form, in place; returns how many."""
    found = fused_experts(model)
    names = checkpoint_layout(model_type(model)).proj
    for name, mod in found:
        _set(model, name, LinearExperts(mod, names))
    return len(found)


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def fuse(model: nn.Module) -> int:
    """Undo `linearize`: every LinearExperts back to its fused module with the current weights."""
    found = linear_experts(model)
    for name, mod in found:
        _set(model, name, mod.to_fused())
    return len(found)


def linear_experts(model: nn.Module) -> list[tuple[str, LinearExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LinearExperts)]

