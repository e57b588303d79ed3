"""Pareto sets over the rows of a comparison (eval.report.compare), and the charts' axes.

A point is optimal when no other point is at least as good on both axes and better on one.
Identical points do not dominate each other (ties are all optimal); a point missing either
metric is left out of that chart and is never optimal. On the throughput axis a model is
placed by its paired speedup's range over the baseline (eval.speed.paired; the baseline at
exactly 1): one model is faster than another only when its whole range lies above the
other's, so a difference inside the noise (a range holding 1, or one the noise floor calls
noise) is a tie on that axis and earns no star. An
artifact without a paired speedup gets no star on that chart.
"""

from __future__ import annotations

from dataclasses import dataclass

from compress.errors import UserError
from eval.speed.workload import judged_range

Coord = float | tuple[float, float] | None  # a figure, or a (lo, hi) range of one


def _better(a: Coord, b: Coord, up: bool) -> bool:
    """a strictly better than b on one axis; a range is better only when wholly beyond the other."""
    (alo, ahi), (blo, bhi) = (a if isinstance(a, tuple) else (a, a)), (b if isinstance(b, tuple) else (b, b))
    return alo > bhi if up else ahi < blo


def pareto_front(points: list[tuple[Coord, Coord]], maximize: tuple[bool, bool] = (True, True)) -> set[int]:
    """Indices of the Pareto-optimal points; a coordinate is a figure or a (lo, hi) range, and
    ranges that overlap are a tie (see the module docstring for ties and gaps)."""
    ok = [i for i, p in enumerate(points) if p[0] is not None and p[1] is not None]

    def dominates(j: int, i: int) -> bool:
        pj, pi = points[j], points[i]
        return (not any(_better(pi[k], pj[k], maximize[k]) for k in (0, 1))
                and any(_better(pj[k], pi[k], maximize[k]) for k in (0, 1)))

    return {i for i in ok if not any(dominates(j, i) for j in ok if j != i)}


@dataclass(frozen=True)
class Axis:
    key: str         # row field
    label: str
    maximize: bool


def quality_axis(rows: list[dict], quality: str | None = None) -> Axis:
    """Perplexity (lower is better) by default where measured, else the first task's headline
    metric; `quality` = 'perplexity', 'TASK.METRIC' (e.g. piqa.acc) or 'TASK' (its headline)."""
    tasks = list(dict.fromkeys(t for r in rows for t in r["tasks"]))  # "task.headline" keys
    if quality in (None, "perplexity") and (quality or any(r["perplexity"] is not None for r in rows) or not tasks):
        return Axis("perplexity", "perplexity (lower is better)", False)
    q = quality or tasks[0]
    if q not in tasks:
        q = next((t for t in tasks if t.rpartition(".")[0] == q), q)
    if q not in tasks:
        raise UserError(f"--quality: {q!r} is not measured in these runs; measured: "
                        f"{', '.join(['perplexity', *tasks])}")
    return Axis(f"task:{q}", f"{q} (higher is better)", True)


THROUGHPUT = Axis("throughput", "output tok/s (higher is better)", True)
MEMORY_AXES = {"peak": Axis("peak_memory_bytes", "peak memory MiB (lower is better)", False),
               "weights": Axis("weight_bytes", "weights in memory MiB (lower is better)", False),
               "disk": Axis("size_bytes", "size on disk MiB (lower is better)", False)}


def memory_axis(rows: list[dict], memory: str | None = None) -> Axis:
    """`memory` = peak | weights | disk. Default: peak where a GPU was measured; on CPUs the
    resident set is mostly the runtime's, so the weights the engine holds, where measured."""
    if memory is None:
        gpu = any(r["peak_is_gpu"] for r in rows)
        memory = "peak" if gpu or not any(r["weight_bytes"] for r in rows) else "weights"
    if memory not in MEMORY_AXES:
        raise UserError(f"--memory: {memory!r} is not one of {', '.join(MEMORY_AXES)}")
    return MEMORY_AXES[memory]


def value(row: dict, axis: Axis) -> float | None:
    if axis.key.startswith("task:"):
        return (row["tasks"].get(axis.key[5:]) or {}).get("value")
    v = row.get(axis.key)
    return v / 2**20 if v is not None and axis.key.endswith("_bytes") else v


def speed_range(row: dict) -> tuple[float, float] | None:
    """Where a row stands on the throughput axis when stars are given: its paired throughput
    speedup's range over the baseline (the baseline itself: exactly 1), else None. A range
    beside 1 that the noise floor called noise is stretched to 1 (judged_range): a tie with the
    baseline, as its verdict says."""
    if row["baseline"]:
        return (1.0, 1.0) if row["throughput"] is not None else None
    s = row["throughput_speedup"] or {}
    return judged_range(s) if s.get("method") == "paired" and s.get("lo") is not None else None


def mark_pareto(rows: list[dict], quality: Axis, memory: Axis) -> None:
    """Set row['pareto'] = {'throughput': bool, 'memory': bool}, per engine; on throughput by
    the paired speedups' ranges (module docstring)."""
    for r in rows:
        r["pareto"] = {}
    for engine in dict.fromkeys(r["engine"] for r in rows):
        sub = [r for r in rows if r["engine"] == engine and not r["error"]]
        for name, x in (("throughput", THROUGHPUT), ("memory", memory)):
            front = pareto_front([(value(r, quality), speed_range(r) if x is THROUGHPUT else value(r, x)) for r in sub],
                                 (quality.maximize, x.maximize))
            for i, r in enumerate(sub):
                r["pareto"][name] = i in front
