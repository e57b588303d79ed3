"""The layer-wise calibration runner, shared by every calibrated algorithm (GPTQ today;
Wanda, SparseGPT, AWQ, SmoothQuant, static activation scales and structured-pruning
importance plug into the same loop).

How it runs (one decoder layer and the activations on the device at a time, so a model
larger than the GPU can be compressed; the model itself stays in host memory):
  1. Find the decoder layers by structure: the model's largest nn.ModuleList of blocks of
     one class that hold nn.Linear modules. No model names, no torch.fx tracing.
  2. Capture the inputs of layer 0 for every calibration batch: the modules outside the
     layers (embeddings, rotary tables) go to the device, layer 0 is replaced by a recorder
     that stores its input and raises. The keyword arguments each layer receives
     (attention mask, position embeddings; they differ per layer on models that mix
     sliding-window and full attention) are recorded in one more pass for the first batch
     of each batch size: all batches have the same shape and no padding, so they repeat.
  3. For each layer: move it to the device; find which target modules read the same input
     (q/k/v, gate/up: one shared statistic) and in which order the layer calls them; attach
     forward hooks that feed each group's collector; run the batches (stopping the layer
     right after the group's last module); let the algorithm solve the group; with
     `sequential`, one group at a time, so that later groups see the earlier ones' already
     compressed outputs. Then run the batches through the compressed layer for the next
     layer's inputs, move the layer back and free the statistics. Hooks go in `finally`.
Hidden states stay on the device when they fit (planned from free memory before starting,
recorded in the returned info) and are kept in host memory otherwise.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from compress.errors import UserError
from compress.memplan import plan_memory
from compress.moe import LinearExperts, expert_index


class _Stop(Exception):
    """Raised by hooks and recorders to end a forward pass early."""


# ---------------------------------------------------------------------------- structure

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


# ---------------------------------------------------------------------------- capture

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
            raise _Stop
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
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
        layers[0] = originals[0]
        as_tuple = tuple_out(cap.inputs[0], *first_args[cap.inputs[0].shape[0]])
        for size in first_args:
            per_layer: list[tuple] = [None] * len(originals)

            def keep_args(i, h, args, kwargs):
                per_layer[i] = (args, kwargs)

            for i in range(len(originals)):
                layers[i] = _Recorder(i, keep_args, last=i == len(originals) - 1, tuple_out=as_tuple)
            ids = next(b for b in batches if b.shape[0] == size)
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            cap.kwargs[size] = per_layer
    finally:
        for i, m in enumerate(originals):
            layers[i] = m
        for t, dev in undo:
            t.data = t.data.to(dev)
    return cap


# ---------------------------------------------------------------------------- the loop

def _hidden(out: Any) -> torch.Tensor:
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


def passes_for(groups: list[list[str]]) -> list[list[list[str]]]:
    """Sequential passes over `groups`: one group per pass, except that the experts of a
    mixture-of-experts layer share a pass per projection (every expert's gate/up, then every
    expert's down_proj): their statistics come from one run of the batches, and a stage solves
    them together, instead of one pass per expert."""
    passes: list[list[list[str]]] = []
    where: dict[str, int] = {}
    for g in groups:
        e = expert_index(g[0])
        key = f"{e[0]}.*.{e[2]}" if e else None
        if key is not None and key in where:
            passes[where[key]].append(g)
            continue
        if key is not None:
            where[key] = len(passes)
        passes.append([g])
    return passes


# solve(layer_index, group: {rel name: module}, collector) -> {rel name: info}
Solver = Callable[[int, dict[str, torch.nn.Linear], Any], dict[str, dict]]


@torch.no_grad()
def run_layerwise(model: torch.nn.Module, calib: torch.Tensor, names: list[str],
                  make_collector: Callable[[torch.nn.Linear, str], Any], solve: Solver, device: str,
                  sequential: bool = True, batch_size: int = 1, progress: bool = True,
                  desc: str = "calibrate", observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                  all_experts: bool = False, solve_many: Callable[[int, list], dict[str, dict]] | None = None
                  ) -> dict:
    """Run the layer-wise loop over `model` with calibration tokens `calib` [n, seq].

    `names`: full names of the nn.Linear modules to solve (all inside decoder layers).
    `make_collector(module, device)`: the statistic to accumulate for a group of modules
    that share one input. `solve(...)` changes the modules' weights in place and returns
    what it measured per module; `solve_many(i, [(group, collector), ...])`, if given, solves the
    groups of one sequential pass together (a mixture-of-experts layer's experts: one batch
    on the GPU instead of a loop). `observe(i, x_in, x_out)`, if given, sees each batch's hidden
    states before and after layer i (block influence for depth pruning). `all_experts`: the
    experts of linearized mixture-of-experts layers (compress.moe.LinearExperts) see every
    token while statistics are collected (the layer's output stays the routed one); the tokens
    routed to each expert are counted in the pass that makes the next layer's inputs and
    returned under `experts`. Returns the run's
    info (memory plan, per-module results, timings); the model comes back on its original
    device with the new weights.
    """
    t_start = time.perf_counter()
    layers_name, layers = decoder_layers(model)
    by_layer = split_by_layer(layers_name, len(layers), names)
    n, seq = calib.shape
    hidden = model.get_input_embeddings().embedding_dim
    dtype = next(layers.parameters()).dtype
    max_in = max(layers[0].get_submodule(r).in_features for r in by_layer[0]) if by_layer[0] else hidden
    plan = plan_memory(n, seq, hidden, dtype, layers[0], max_in, device)
    store = plan.activations_on
    batches = list(calib.split(batch_size))
    home = next(layers[0].parameters()).device
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def tuple_out(h, args, kwargs) -> bool:
        layers[0].to(device)
        try:
            return isinstance(layers[0](h.to(device), *args, **kwargs), (tuple, list))
        finally:
            layers[0].to(home)

    t0 = time.perf_counter()
    cap = capture(model, layers, batches, device, store, tuple_out)
    acts = cap.inputs  # the inputs of the layer being solved; replaced by its outputs batch by batch
    capture_s = time.perf_counter() - t0

    def forward(layer, i, b):
        args, kwargs = cap.kwargs[acts[b].shape[0]][i]
        return layer(acts[b].to(device, non_blocking=True), *args, **kwargs)

    results: dict[str, dict] = {}
    routed: dict[str, list[int]] = {}
    layer_s = []
    bar = tqdm(range(len(layers)), desc=desc, unit="layer", disable=not progress, leave=False)
    for i in bar:
        t_layer = time.perf_counter()
        layer = layers[i]
        layer.to(device)
        mods = {rel: layer.get_submodule(rel) for rel in by_layer[i]}
        experts = [(rel, m) for rel, m in layer.named_modules() if isinstance(m, LinearExperts)]
        for _, m in experts:
            m.all_tokens = all_experts
        if mods:
            groups = call_order(layer, mods, lambda: forward(layer, i, 0))
            passes = passes_for(groups) if sequential else [groups]
            for gs in passes:
                bar.set_postfix_str(", ".join(r.rsplit(".", 1)[-1] for g in gs for r in g))
                stats = _collect(layer, i, mods, gs, make_collector, device, forward, len(acts))
                pairs = [({r: mods[r] for r in g}, st) for g, st in zip(gs, stats)]
                if solve_many is not None and len(gs) > 1 and sequential:  # the experts of one projection
                    solved = solve_many(i, pairs)
                else:
                    solved = {rel: info for g, st in pairs for rel, info in solve(i, g, st).items()}
                results.update({f"{layers_name}.{i}.{rel}": info for rel, info in solved.items()})
                del stats, pairs
        for _, m in experts:
            m.all_tokens = False
            m.reset_counts()
        for b in range(len(acts)):
            out = _hidden(forward(layer, i, b))
            if observe is not None:
                observe(i, acts[b].to(device), out)
            acts[b] = to_store(out, store, acts[b])
        routed.update({f"{layers_name}.{i}.{rel}": m.tokens.tolist() for rel, m in experts})
        layer.to(home)
        layer_s.append(round(time.perf_counter() - t_layer, 3))
    bar.close()
    info = {"layers": len(layers), "layers_module": layers_name, "calibration": {"samples": n, "seq_len": seq,
            "batch_size": batch_size}, "sequential": sequential, "memory": plan.as_info(),
            "capture_seconds": round(capture_s, 3), "layer_seconds": layer_s,
            "seconds": round(time.perf_counter() - t_start, 3), "modules": results}
    if routed:
        info["experts"] = {"all_experts": all_experts, "routed_tokens": routed}
    if cuda:
        info["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return info


def _collect(layer, i, mods, groups: list[list[str]], make_collector, device, forward, n_batches) -> list:
    """Run every batch through `layer` feeding one collector per group; stop after the last group.

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

    try:
        for k, g in enumerate(groups):
            handles.append(mods[g[0]].register_forward_pre_hook(lambda m, inp, k=k: feed(k, inp[0])))
        def stop(m, inp, out):
            raise _Stop
        handles.append(mods[last].register_forward_hook(stop))
        for b in range(n_batches):
            fed.clear()
            try:
                forward(layer, i, b)
            except _Stop:
                pass
    finally:
        fed.clear()
        for h in handles:
            h.remove()
    for k, owner in alias.items():
        stats[k] = copy.deepcopy(stats[owner])
    return stats
