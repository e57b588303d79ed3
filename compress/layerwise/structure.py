"""Where the decoder layers are: found by structure, never by model name or torch.fx tracing.

`decoder_layers` picks the model's largest nn.ModuleList of blocks of one class that hold
nn.Linear modules; `split_by_layer` maps full module names onto those layers.
"""

from __future__ import annotations

import torch

from compress.errors import UserError


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(name, ModuleList) of the model's decoder layers, found by structure."""
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.ModuleList) or len(mod) == 0:
            continue
        cls = type(mod[0])
        if not all(type(m) is cls for m in mod):
            continue
        if not any(isinstance(x, torch.nn.Linear) for x in mod[0].modules()):
            continue
        size = sum(p.numel() for p in mod.parameters())
        if best is None or size > best[2]:
            best = (name, mod, size)
    if best is None:
        raise UserError(f"{type(model).__name__}: no stack of decoder layers found (expected an nn.ModuleList "
                        "of identical blocks holding nn.Linear modules)")
    return best[0], best[1]


def split_by_layer(layers_name: str, n_layers: int, names: list[str]) -> dict[int, list[str]]:
    """Module names -> {layer index: names relative to the layer}; raises for names outside."""
    prefix = layers_name + "."
    out: dict[int, list[str]] = {i: [] for i in range(n_layers)}
    outside = []
    for n in names:
        head, _, rel = n[len(prefix):].partition(".") if n.startswith(prefix) else ("", "", "")
        if not head.isdigit() or not rel:
            outside.append(n)
            continue
        out[int(head)].append(rel)
    if outside:
        raise UserError(f"calibrated stages work on modules inside the decoder layers ({layers_name}.N.*); "
                        f"outside them: {', '.join(outside[:4])}{' ...' if len(outside) > 4 else ''} (add to ignore)")
    return out
