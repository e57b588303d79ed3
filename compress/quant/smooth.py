"""Per-channel scale migration between a group of linear layers and the op before them: what
SmoothQuant and AWQ share.

For linears that read the same input x (q/k/v; gate/up), x·Wᵀ = (x / s)·(W·diag(s))ᵀ for any
positive per-channel s. The division by s is folded into the op that produces x: a norm
(its weight and bias divided by s), or a linear (its output rows divided by s: v_proj before
o_proj, up_proj before down_proj, whose product with the gate is linear in each channel). The
model's structure is unchanged; only weights move, exactly up to rounding.

A `Mapping` (compress.quant.mapping) names, relative to one decoder layer, the `balance`
linears and the `smooth` op.
Over a mixture-of-experts block a mapping covers every expert (compress.quant.smooth_moe).
The Llama family's (Llama, Mistral, Qwen2/3, SmolLM, Phi-3 style: input_layernorm ->
q/k/v, post_attention_layernorm -> gate/up, v_proj -> o_proj, up_proj -> down_proj) are the
defaults; other layouts pass their own in the recipe. Whether a norm can absorb a scale is
checked by running a copy of it (a Gemma-style norm computing x̂·(1 + w) cannot), before any
work.
"""

from __future__ import annotations

import copy

import torch

from compress.errors import UserError
from compress.layerwise import decoder_layers
from compress.quant.mapping import Mapping
from compress.quant.smooth_moe import expand_all


def _m(balance, smooth):
    return Mapping(balance=balance, smooth=smooth)


ATTN_IN = _m(["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "input_layernorm")
MLP_IN = _m(["mlp.gate_proj", "mlp.up_proj"], "post_attention_layernorm")
ATTN_OUT = _m(["self_attn.o_proj"], "self_attn.v_proj")
MLP_OUT = _m(["mlp.down_proj"], "mlp.up_proj")
SMOOTHQUANT_MAPPINGS = (ATTN_IN, MLP_IN, MLP_OUT)
AWQ_MAPPINGS = (ATTN_IN, ATTN_OUT, MLP_IN, MLP_OUT)


def absorbs(op: torch.nn.Module, width: int) -> str | None:
    """Why `op` cannot take a per-channel 1/s on its output of `width` channels (None: it can).

    A linear always can. A norm is run on a copy with real weights: scaling its weight by 1/s
    must scale its output by 1/s."""
    if isinstance(op, torch.nn.Linear):
        return None if op.out_features == width else f"its output width {op.out_features} is not {width}"
    w = getattr(op, "weight", None)
    if not isinstance(w, torch.Tensor) or w.shape != (width,):
        return f"it is a {type(op).__name__} without a weight of shape ({width},)"
    probe = copy.deepcopy(op).to_empty(device="cpu").float()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, width, generator=g)
    s = torch.rand(width, generator=g) + 0.5
    with torch.no_grad():
        probe.weight.fill_(1.5)
        if getattr(probe, "bias", None) is not None:
            probe.bias.fill_(0.25)
        y = probe(x)
        probe.weight.div_(s)
        if getattr(probe, "bias", None) is not None:
            probe.bias.div_(s)
        ys = probe(x)
    if not torch.allclose(ys, y / s, rtol=1e-4, atol=1e-5):
        return f"{type(op).__name__}'s output does not scale with its weight (e.g. x̂·(1 + w))"
    return None


def resolve(model: torch.nn.Module, mappings, targets: set[str], stage: str, required: bool) -> dict[int, list]:
    """{layer index: [(mapping, note or None)]} for the mappings whose balance linears are all
    targets; raises UserError (naming the layer and module) where a `required` mapping does not
    fit. A mapping that cannot apply for a structural reason (v_proj narrower than o_proj's
    input under grouped-query attention) gets a note and is skipped."""
    layers_name, layers = decoder_layers(model)
    out: dict[int, list] = {}
    errors = []
    for i, layer in enumerate(layers):
        prefix = f"{layers_name}.{i}."
        found = []
        names = dict(layer.named_modules())
        for mp in expand_all(layer, mappings):  # MoE blocks: over every expert (compress.quant.smooth_moe)
            missing = [n for n in [*mp.balance, mp.smooth] if n not in names]
            if missing:
                if required:
                    errors.append(f"{stage}: layer {layers_name}.{i} has no module {missing[0]!r} (mapping "
                                  f"{mp.smooth} -> {', '.join(mp.balance)}); set {stage}.mappings for this model")
                continue
            if not all(prefix + b in targets for b in mp.balance):
                continue
            bal = [names[b] for b in mp.balance]
            widths = {getattr(b, "in_features", None) for b in bal}
            if len(widths) != 1 or None in widths:
                errors.append(f"{stage}: layer {layers_name}.{i}: {', '.join(mp.balance)} are not linears of one "
                              "input width")
                continue
            width = widths.pop()
            why = absorbs(names[mp.smooth], width)
            if why and isinstance(names[mp.smooth], torch.nn.Linear):
                found.append((mp, f"skipped: {mp.smooth} ({why}) cannot absorb the scales of {mp.balance[0]}"))
            elif why:
                errors.append(f"{stage}: layer {layers_name}.{i}: {mp.smooth} cannot absorb the scales of "
                              f"{', '.join(mp.balance)}: {why}")
            else:
                found.append((mp, None))
        out[i] = found
    if errors:
        raise UserError(*errors[:6], *([f"{stage}: ... and {len(errors) - 6} more"] if len(errors) > 6 else []))
    return out


@torch.no_grad()
def fold(smooth: torch.nn.Module, balance: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Divide `smooth`'s output channels by s and multiply the balance linears' columns by s
    (computed in float32, stored in each tensor's dtype)."""
    s = s.float()
    w = smooth.weight  # a linear's output channels are its rows; a norm's, its weight vector
    w.copy_((w.float() / s.to(w.device).reshape(-1, *[1] * (w.ndim - 1))).to(w.dtype))
    b = getattr(smooth, "bias", None)
    if b is not None:
        b.copy_((b.float() / s.to(b.device)).to(b.dtype))
    for m in balance:  # and routers that follow the scale (their 2-D weight's columns, like a linear's)
        m.weight.copy_((m.weight.float() * s.to(m.weight.device)[None, :]).to(m.weight.dtype))


def follow(layer: torch.nn.Module, mp) -> list[torch.nn.Module]:
    """The modules that take a mapping's scale without setting it (an MoE block's routers)."""
    return [layer.get_submodule(f) for f in getattr(mp, "follow", ())]
