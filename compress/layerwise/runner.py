"""The per-layer loop of the calibration runner (compress.layerwise): plan memory, capture
layer 0's inputs (compress.layerwise.capture), then one decoder layer at a time on the device:
solve its modules group by group (compress.layerwise.hooks), run the batches through the
compressed layer for the next layer's inputs, and move the layer back home in `finally`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from compress.layerwise.capture import capture, to_store
from compress.layerwise.experts import all_tokens, passes_for, routed_tokens
from compress.layerwise.hooks import call_order, collect, hidden_of
from compress.layerwise.structure import decoder_layers, split_by_layer
from compress.memplan import MemoryPlan, plan_memory
from compress.moe import linear_experts

# solve(layer_index, group: {rel name: module}, collector) -> {rel name: info}
Solver = Callable[[int, dict[str, torch.nn.Linear], Any], dict[str, dict]]


@dataclass
class _Run:
    """What the steps of one run share: the layers, the algorithm's callbacks, the activations."""

    layers_name: str
    layers: torch.nn.ModuleList
    by_layer: dict[int, list[str]]          # layer index -> names (relative to it) to solve
    device: str
    home: torch.device                      # where the layers live between their turns
    make_collector: Callable[[torch.nn.Linear, str], Any]
    solve: Solver
    solve_many: Callable[[int, list], dict[str, dict]] | None
    observe: Callable[[int, torch.Tensor, torch.Tensor], None] | None
    sequential: bool
    all_experts: bool
    store: str = "cpu"                      # where activations are kept: the device, or "cpu"
    acts: list[torch.Tensor] = field(default_factory=list)   # inputs of the layer being solved, per batch
    call_args: dict[int, list[tuple]] = field(default_factory=dict)  # batch size -> per layer (args, kwargs)

    def forward(self, layer: torch.nn.Module, i: int, b: int) -> Any:
        args, kwargs = self.call_args[self.acts[b].shape[0]][i]
        return layer(self.acts[b].to(self.device, non_blocking=True), *args, **kwargs)

    def returns_tuple(self, h: torch.Tensor, args: tuple, kwargs: dict) -> bool:
        """Whether the real layers return a tuple: layer 0 run once on the device (for capture)."""
        self.layers[0].to(self.device)
        try:
            return isinstance(self.layers[0](h.to(self.device), *args, **kwargs), (tuple, list))
        finally:
            self.layers[0].to(self.home)


def _memory_plan(model: torch.nn.Module, run: _Run, calib: torch.Tensor) -> MemoryPlan:
    """Where the activations fit (compress.memplan), from the widest input a solved module of layer 0 reads."""
    n, seq = calib.shape
    layers = run.layers
    hidden = model.get_input_embeddings().embedding_dim
    dtype = next(layers.parameters()).dtype
    max_in = max(layers[0].get_submodule(r).in_features for r in run.by_layer[0]) if run.by_layer[0] else hidden
    return plan_memory(n, seq, hidden, dtype, layers[0], max_in, run.device)


def _solve_layer(run: _Run, i: int, layer: torch.nn.Module, bar) -> dict[str, dict]:
    """Collect and solve layer i's modules, one sequential pass (or all at once) at a time."""
    mods = {rel: layer.get_submodule(rel) for rel in run.by_layer[i]}
    if not mods:
        return {}
    groups = call_order(layer, mods, lambda: run.forward(layer, i, 0))
    passes = passes_for(groups) if run.sequential else [groups]
    results: dict[str, dict] = {}
    for gs in passes:
        bar.set_postfix_str(", ".join(r.rsplit(".", 1)[-1] for g in gs for r in g))
        stats = collect(mods, gs, run.make_collector, run.device, lambda b: run.forward(layer, i, b), len(run.acts))
        pairs = [({r: mods[r] for r in g}, st) for g, st in zip(gs, stats)]
        if run.solve_many is not None and len(gs) > 1 and run.sequential:  # the experts of one projection
            solved = run.solve_many(i, pairs)
        else:
            solved = {rel: info for g, st in pairs for rel, info in run.solve(i, g, st).items()}
        results.update({f"{run.layers_name}.{i}.{rel}": info for rel, info in solved.items()})
        del stats, pairs
    return results


def _next_inputs(run: _Run, i: int, layer: torch.nn.Module) -> None:
    """Every batch through the (compressed) layer i: its outputs replace its inputs in `run.acts`."""
    for b in range(len(run.acts)):
        out = hidden_of(run.forward(layer, i, b))
        if run.observe is not None:
            run.observe(i, run.acts[b].to(run.device), out)
        run.acts[b] = to_store(out, run.store, run.acts[b])


def _calibrate_layer(run: _Run, i: int, bar) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """Layer i on the device: solved, then its outputs made; back home even when a step raises.
    Returns (per-module results, tokens routed to each expert of its mixture-of-experts blocks)."""
    layer = run.layers[i]
    layer.to(run.device)
    try:
        experts = linear_experts(layer)
        with all_tokens(experts, run.all_experts):
            results = _solve_layer(run, i, layer, bar)
        _next_inputs(run, i, layer)
        return results, routed_tokens(f"{run.layers_name}.{i}", experts)
    finally:
        layer.to(run.home)


def _layer_loop(run: _Run, desc: str, progress: bool) -> tuple[dict, dict, list[float]]:
    """Every layer in turn: (per-module results, routed tokens per experts module, seconds per layer)."""
    results: dict[str, dict] = {}
    routed: dict[str, list[int]] = {}
    layer_s = []
    bar = tqdm(range(len(run.layers)), desc=desc, unit="layer", disable=not progress, leave=False)
    try:
        for i in bar:
            t_layer = time.perf_counter()
            solved, counts = _calibrate_layer(run, i, bar)
            results.update(solved)
            routed.update(counts)
            layer_s.append(round(time.perf_counter() - t_layer, 3))
    finally:
        bar.close()
    return results, routed, layer_s


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
    returned under `experts`. Returns the run's info (memory plan, per-module results,
    timings); the model comes back on its original device with the new weights.
    """
    t_start = time.perf_counter()
    layers_name, layers = decoder_layers(model)
    run = _Run(layers_name, layers, split_by_layer(layers_name, len(layers), names), device,
               next(layers[0].parameters()).device, make_collector, solve, solve_many, observe, sequential,
               all_experts)
    plan = _memory_plan(model, run, calib)
    run.store = plan.activations_on
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    cap = capture(model, layers, list(calib.split(batch_size)), device, run.store, run.returns_tuple)
    run.acts, run.call_args = cap.inputs, cap.kwargs
    capture_s = time.perf_counter() - t0
    results, routed, layer_s = _layer_loop(run, desc, progress)
    n, seq = calib.shape
    info = {"layers": len(layers), "layers_module": layers_name, "calibration": {"samples": n, "seq_len": seq,
            "batch_size": batch_size}, "sequential": sequential, "memory": plan.as_info(),
            "capture_seconds": round(capture_s, 3), "layer_seconds": layer_s,
            "seconds": round(time.perf_counter() - t_start, 3), "modules": results}
    if routed:
        info["experts"] = {"all_experts": all_experts, "routed_tokens": routed}
    if cuda:
        info["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return info
