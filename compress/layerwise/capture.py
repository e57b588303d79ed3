"""Capture: the inputs of layer 0 for every calibration batch, and what each layer is called with.

The modules outside the layers (embeddings, rotary tables) go to the device and layer 0 is
replaced by a recorder that stores its input and raises `StopForward`. The keyword arguments
each layer receives (attention mask, position embeddings; they differ per layer on models that
mix sliding-window and full attention) are recorded in one more pass for the first batch of
each batch size: all batches have the same shape and no padding, so they repeat. The model's
layers and devices are restored in `finally`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


class StopForward(Exception):
    """Raised by hooks and recorders to end a forward pass early."""


def to_store(x: torch.Tensor, store: str, reuse: torch.Tensor | None = None) -> torch.Tensor:
    """`x` moved to where activations are kept: host memory is pinned (fast copies back to the
    GPU) and a previous buffer of the same shape is reused."""
    if store != "cpu" or x.device.type == "cpu":
        return x.to(store)
    if reuse is None or reuse.shape != x.shape or reuse.device.type != "cpu":
        reuse = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    return reuse.copy_(x)


class _Recorder(torch.nn.Module):
    """Stands in for a decoder layer during capture: records what it is called with."""

    def __init__(self, index: int, sink: Callable, last: bool, tuple_out: bool):
        super().__init__()
        self.index, self.sink, self.last, self.tuple_out = index, sink, last, tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        self.sink(self.index, hidden_states, args, kwargs)
        if self.last:
            raise StopForward
        return (hidden_states,) if self.tuple_out else hidden_states


def _move_outside(model: torch.nn.Module, layers: torch.nn.ModuleList, device) -> list:
    """Move every parameter and buffer outside `layers` to `device`; return how to undo it."""
    inside = {id(t) for t in list(layers.parameters()) + list(layers.buffers())}
    undo = []
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for k, t in store.items():
                if t is None or id(t) in inside:
                    continue
                undo.append((t, t.data.device))
                t.data = t.data.to(device)
    return undo


@dataclass
class Captured:
    inputs: list[torch.Tensor]                  # per batch: hidden states entering layer 0
    kwargs: dict[int, list[tuple]] = field(default_factory=dict)   # batch size -> per layer (args, kwargs)


def _run_until_stopped(model, ids: torch.Tensor, device) -> None:
    try:
        model(input_ids=ids.to(device), use_cache=False)
    except StopForward:
        pass


@torch.no_grad()
def capture(model, layers: torch.nn.ModuleList, batches: list[torch.Tensor], device, store,
            tuple_out: Callable[[torch.Tensor, tuple, dict], bool]) -> Captured:
    """Layer-0 inputs for every batch and each layer's call arguments (see module docstring).

    `tuple_out(hidden, args, kwargs)` is asked once whether the real layers return a tuple, so that
    the recorders can stand in for them during the argument pass.
    """
    originals = list(layers)
    undo = _move_outside(model, layers, device)
    cap = Captured(inputs=[])
    first_args: dict[int, tuple] = {}

    def keep_input(i, h, args, kwargs):
        cap.inputs.append(to_store(h, store))
        first_args.setdefault(h.shape[0], (args, kwargs))

    try:
        layers[0] = _Recorder(0, keep_input, last=True, tuple_out=False)
        for ids in batches:
            _run_until_stopped(model, ids, device)
        layers[0] = originals[0]
        as_tuple = tuple_out(cap.inputs[0], *first_args[cap.inputs[0].shape[0]])
        for size in first_args:
            per_layer: list[tuple] = [None] * len(originals)

            def keep_args(i, h, args, kwargs):
                per_layer[i] = (args, kwargs)

            for i in range(len(originals)):
                layers[i] = _Recorder(i, keep_args, last=i == len(originals) - 1, tuple_out=as_tuple)
            _run_until_stopped(model, next(b for b in batches if b.shape[0] == size), device)
            cap.kwargs[size] = per_layer
    finally:
        for i, m in enumerate(originals):
            layers[i] = m
        for t, dev in undo:
            t.data = t.data.to(dev)
    return cap
