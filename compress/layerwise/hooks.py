"""The runner's forward hooks on one decoder layer: which modules read the same input and in
what order the layer calls them (`call_order`), and a pass over the calibration batches that
feeds each group's statistic collector (`collect`, compress.collectors). Every hook is removed
in `finally`, so an exception never leaves one behind.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from compress.errors import UserError
from compress.layerwise.capture import StopForward


def hidden_of(out: Any) -> torch.Tensor:
    """A layer's output hidden states (layers return a tensor or a tuple starting with it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def call_order(layer: torch.nn.Module, modules: dict[str, torch.nn.Module], run: Callable[[], Any]) -> list[list[str]]:
    """Groups of `modules` in the order the layer calls them; consecutive modules that read the
    same input tensor (q/k/v, gate/up) form one group. Inputs are held until the pass ends,
    so a freed block cannot be reused under another module and fake a shared input."""
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []
    for rel, mod in modules.items():
        def pre(m, inp, rel=rel):
            if all(r != rel for r, _ in calls):
                calls.append((rel, inp[0]))
        handles.append(mod.register_forward_pre_hook(pre))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    missing = [r for r in modules if all(r != c for c, _ in calls)]
    if missing:
        raise UserError(f"modules never called in the layer's forward pass, so they cannot be calibrated: "
                        f"{', '.join(missing)} (add them to ignore)")
    groups: list[list[str]] = []
    prev = None
    for rel, x in calls:
        # an empty input (an expert no token was routed to) has no storage to compare: the object itself
        key = ("empty", id(x)) if x.numel() == 0 else (x.data_ptr(), tuple(x.shape), x.stride())
        if key == prev:
            groups[-1].append(rel)
        else:
            groups.append([rel])
        prev = key
    return groups


def collect(mods: dict[str, torch.nn.Module], groups: list[list[str]], make_collector, device,
            run_batch: Callable[[int], Any], n_batches: int) -> list:
    """Run every batch (`run_batch(b)`) feeding one collector per group; stop after the last group.

    Groups fed the very same tensor object in a batch (every expert's gate/up under
    `all_experts`) share the first one's statistics: computed once, copied at the end."""
    stats = [make_collector(mods[g[0]], device) for g in groups]
    handles = []
    last = groups[-1][-1]
    fed: list = []                 # (group index, input) fed so far in this batch
    alias: dict[int, int] = {}     # group index -> the group whose statistics it shares

    def feed(k, x):
        owner = next((j for j, y in fed if y is x), None)
        if owner is not None:
            alias[k] = owner
            return
        fed.append((k, x))
        stats[k].add_batch(x)

    def stop(m, inp, out):
        raise StopForward

    try:
        for k, g in enumerate(groups):
            handles.append(mods[g[0]].register_forward_pre_hook(lambda m, inp, k=k: feed(k, inp[0])))
        handles.append(mods[last].register_forward_hook(stop))
        for b in range(n_batches):
            fed.clear()
            try:
                run_batch(b)
            except StopForward:
                pass
    finally:
        fed.clear()
        for h in handles:
            h.remove()
    for k, owner in alias.items():
        stats[k] = copy.deepcopy(stats[owner])
    return stats
