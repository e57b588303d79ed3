"""Replay GPTQ's per-column loop as CUDA graphs.

A GPTQ block is a Python loop of ~10 tiny kernels per column; on a GPU its cost is launch
overhead, not arithmetic (an 8B model has ~10^6 columns). `solve_block` never syncs with
the host, so it can be captured once per block shape and replayed: same kernels, same
result, without the per-launch CPU cost. On the CPU the plain function runs.
"""

from __future__ import annotations

import warnings

import torch

from compress.quant.grid import Grid


class GraphBlockRunner:
    """Callable with `solve_block`'s signature; one captured graph per (shapes, grid, group)."""

    def __init__(self, solve_block):
        self.solve_block = solve_block
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]] = {}
        self.failed = False

    def __call__(self, w1, hinv1, s1, z1, q1, err1, grid: Grid, dynamic_group: int) -> None:
        args = (w1, hinv1, s1, z1, q1, err1)
        if self.failed:
            return self.solve_block(*args, grid, dynamic_group)
        key = (tuple(w1.shape), w1.device, grid, dynamic_group)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(args, grid, dynamic_group)
            except RuntimeError as e:  # capture unsupported here: run eagerly, same maths
                self.failed = True
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); GPTQ runs eagerly")
                return self.solve_block(*args, grid, dynamic_group)
        graph, bufs = self.graphs[key]
        for b, t in zip(bufs, args):
            b.copy_(t)
        graph.replay()
        for b, t in zip(bufs[2:], args[2:]):  # s1, z1, q1, err1 are outputs
            t.copy_(b)

    def _capture(self, args, grid, dynamic_group):
        bufs = [t.clone() for t in args]
        side = torch.cuda.Stream(device=bufs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as CUDA graphs require
            self.solve_block(*[b.clone() for b in bufs], grid, dynamic_group)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.solve_block(*bufs, grid, dynamic_group)
        return graph, bufs


def graph_block_fn(device: str):
    """The block solver for `device`: graph replay on CUDA, the plain loop elsewhere."""
    from compress.quant.gptq import solve_block

    return GraphBlockRunner(solve_block) if str(device).startswith("cuda") else solve_block
