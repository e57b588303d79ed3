"""What a stage covered: the decoder's weight parameters it changed, by module kind.

A stage never reports success on what it did not do. Before a stage runs, every weight
matrix inside the decoder layers is fingerprinted; afterwards a parameter counts as covered
when its bytes changed or its module carries a quantization scheme (a weight already on the
grid may come back bit-identical and still be quantized). The result goes into the stage's
info as `coverage` and the report shows it per artifact.

Kinds: `linear` (attention and dense MLP projections, shared experts), `expert` (the
per-expert linears of a linearized MoE layer), `router` (the top-k router and a shared
expert's gate), or the class name of anything else holding weights (a fused experts module
such as `Qwen3MoeExperts` that the stage left as 3-D parameters).

Before any work, `refusal` says in one line when a stage would leave more than
`MAX_UNTOUCHED` of those parameters in fused expert modules it cannot handle.
"""

from __future__ import annotations

import hashlib

import torch

from compress import moe
from compress.layerwise import decoder_layers

MAX_UNTOUCHED = 0.10


def _kind(name: str, mod: torch.nn.Module, routers: set[str]) -> str:
    if name in routers:
        return "router"
    if isinstance(mod, torch.nn.Linear):
        return "expert" if moe.expert_index(name) is not None else "linear"
    return type(mod).__name__


def decoder_weights(model: torch.nn.Module) -> dict[str, tuple[str, str, torch.Tensor]]:
    """{parameter name: (kind, module name, tensor)} for every weight (2-D or more) in the decoder layers."""
    layers_name, layers = decoder_layers(model)
    routers = set(moe.router_names(model))
    out = {}
    for mname, mod in layers.named_modules(prefix=layers_name):
        for pname, p in mod.named_parameters(recurse=False):
            if p.dim() >= 2 and not pname.startswith(("weight_", "input_", "output_")):  # not quantization params
                out[f"{mname}.{pname}"] = (_kind(mname, mod, routers), mname, p)
    return out


SAMPLE = 1 << 16


def fingerprint(model: torch.nn.Module) -> dict[str, str]:
    """{parameter name: digest} for the decoder's weights: every byte of a tensor up to SAMPLE
    elements, else about SAMPLE elements evenly spread over it (a 30B model in seconds, where reading
    every byte takes minutes on a few cores). Quantization and pruning change far more than one
    element in every stride of a matrix; a change confined to the elements between samples would
    not be seen."""
    return _digests(decoder_weights(model))


def _digests(weights: dict) -> dict[str, str]:
    out = {}
    for name, (_, _, p) in weights.items():
        t = p.detach().reshape(-1)
        sample = t[::max(1, t.numel() // SAMPLE)].contiguous().cpu()
        out[name] = hashlib.blake2b(sample.view(torch.uint8).numpy().data, digest_size=16).hexdigest()
    return out


def coverage(before: dict[str, str], model: torch.nn.Module) -> dict:
    """{"by_kind": {kind: {"params", "changed"}}, "changed_fraction"} of `model` against `before`."""
    by_kind: dict[str, dict[str, int]] = {}
    weights = decoder_weights(model)
    after = _digests(weights)
    for name, (kind, mname, p) in weights.items():
        quantized = getattr(model.get_submodule(mname), "quantization_scheme", None) is not None
        changed = quantized or before.get(name) != after[name]
        k = by_kind.setdefault(kind, {"params": 0, "changed": 0})
        k["params"] += p.numel()
        k["changed"] += p.numel() if changed else 0
    total = sum(k["params"] for k in by_kind.values())
    return {"by_kind": by_kind, "changed_fraction": round(sum(k["changed"] for k in by_kind.values())
                                                          / max(total, 1), 6)}


def refusal(model: torch.nn.Module, stage: str) -> str | None:
    """One line when fused (3-D) expert weights the stage does not handle are more than
    MAX_UNTOUCHED of the decoder's weight parameters; None otherwise."""
    weights = decoder_weights(model)
    total = sum(p.numel() for _, _, p in weights.values())
    fused: dict[str, int] = {}
    for _, mod in moe.fused_experts(model):
        fused[type(mod).__name__] = fused.get(type(mod).__name__, 0) + sum(p.numel() for p in mod.parameters())
    left = sum(fused.values())
    if not total or left / total <= MAX_UNTOUCHED:
        return None
    kinds = ", ".join(sorted(fused))
    return (f"{kinds}: 3-D expert weights, which {stage} does not handle ({100 * left / total:.0f} % of the "
            "decoder's weights would stay uncompressed)")
