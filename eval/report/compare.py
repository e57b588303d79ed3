"""Compare runs: one tradeoff table over every artifact of every run, Pareto sets, groups.

`squeeze compare RUN_DIR...` reads each run's report.json (nothing is re-measured), puts
every (artifact, engine) in one table against its baseline, and marks the Pareto-optimal
ones for quality against throughput and against memory. Runs are only compared when they
measured the same way: same baseline model (content hash, per engine) and same protocol
(perplexity, tasks, speed workload, engine settings, hardware, seed). Otherwise they are
put in separate groups, each with the reason it was split off.

Pareto sets (`pareto_front`): a point is optimal when no other point is at least as good on
both axes and better on one. Identical points do not dominate each other (ties are all
optimal); a point missing either metric is left out of that chart and is never optimal. On
the throughput axis a model is placed by its paired speedup's range over the baseline
(eval.speed.paired; the baseline at exactly 1): one model is faster than another only when
its whole range lies above the other's, so a difference inside the noise is a tie on that
axis and earns no star. An artifact without a paired speedup gets no star on that chart.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import UserError
from eval.accuracy.tasks import headline

READABLE_SCHEMAS = (3, 4)


def load_report(path: str | Path) -> dict:
    """report.json of a run directory (or the file itself), upgraded in memory to schema 4."""
    p = Path(path)
    f = p / "report.json" if p.is_dir() else p
    if not f.is_file():
        raise UserError(f"{path}: no report.json (run `squeeze run` there first, or name the file)")
    try:
        rep = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{f}: not a readable report: {e}") from None
    v = rep.get("schema_version") if isinstance(rep, dict) else None
    if v not in READABLE_SCHEMAS:
        raise UserError(f"{f}: report schema {v!r} is not readable here (readable: "
                        f"{', '.join(map(str, READABLE_SCHEMAS))}); evaluate again with this version")
    rep["_path"] = str(f)
    if v == 3:  # no protocol / provenance / chain: derive what comparing needs
        eng = {e: m for e, m in rep["baseline"]["engines"].items()}
        rep["protocol"] = {"derived_from": "schema 3", "eval": {k: v2 for k, v2 in ((rep.get("recipe") or {}).get(
            "eval") or {}).items() if k not in ("artifacts", "engines")},
            "engines": {e: m.get("settings") for e, m in eng.items()},
            "hardware": next((m.get("hardware") for m in eng.values()), None)}
        rep.setdefault("provenance", {"versions": rep.get("versions"), "recipe_hash": rep.get("recipe_hash")})
        for i, a in enumerate(rep["artifacts"]):
            a.setdefault("stages", [a.get("stage")])
            a.setdefault("final", i == len(rep["artifacts"]) - 1)
    return rep


def run_label(rep: dict) -> str:
    return (rep.get("recipe") or {}).get("name") or Path(rep.get("_path", "report")).parent.name or "report"


# -- one row per (model, engine) ------------------------------------------------------------

def peak_memory(m: dict) -> int | None:
    """Peak memory while measured: the GPU's where one was used, else the resident set."""
    mem = m.get("memory") or {}
    return mem.get("peak_gpu_used_bytes") or mem.get("peak_torch_allocated_bytes") or mem.get("peak_rss_bytes")


def flat_row(run: str, entry: dict, engine: str, m: dict, ret: dict, is_base: bool) -> dict:
    """The figures of one model on one engine, flat (None where not measured)."""
    from eval.report.report import quant_label

    sp = m.get("speed") or {}
    conc, b1 = sp.get("concurrent") or {}, sp.get("batch1") or {}
    tasks = {}
    for t, tm in (m.get("tasks") or {}).items():
        metric = headline(tm)  # the spec's `metric`, else acc or exact_match
        if metric:
            tasks[f"{t}.{metric}"] = {"value": tm[metric], "stderr": tm.get(f"{metric}_stderr"),
                                      "retention": 1.0 if is_base else (ret.get("tasks") or {}).get(
                                          f"{t}.{metric}", {}).get("retention")}
    speed = ret.get("speed") or {}
    return {
        "run": run, "artifact": entry["name"], "baseline": is_base, "final": bool(entry.get("final")),
        "stages": entry.get("stages") or ([entry["stage"]] if entry.get("stage") else []), "engine": engine,
        "quant": quant_label(m), "params": _model_figure(m, entry, "params"),
        "nonzero_params": m.get("nonzero_params"),
        "flops_per_token": _model_figure(m, entry, "flops_per_token"),
        "size_bytes": m.get("size_bytes") or None,
        "perplexity": (m.get("perplexity") or {}).get("perplexity"),
        "ppl_change_pct": 0.0 if is_base and m.get("perplexity") else ret.get("ppl_change_pct"),
        "ppl_retention": 1.0 if is_base and m.get("perplexity") else ret.get("ppl_retention"),
        "tasks": tasks,
        "throughput": (conc.get("output_tok_s") or {}).get("median"),
        "throughput_speedup": None if is_base else speed.get("throughput"),
        "ttft_p50_ms": (conc.get("ttft_ms") or {}).get("p50"),
        "tpot_ms": (b1.get("tpot_mean_ms") or {}).get("median"),
        "tpot_speedup": None if is_base else speed.get("batch1_tpot"),
        "peak_memory_bytes": peak_memory(m), "weight_bytes": (m.get("memory") or {}).get("weight_bytes"),
        "peak_is_gpu": bool((m.get("memory") or {}).get("peak_gpu_used_bytes")
                            or (m.get("memory") or {}).get("peak_torch_allocated_bytes")),
        "size_ratio": 1.0 if is_base and m.get("size_bytes") else ret.get("size_ratio"),
        "error": m.get("error"),
    }


def _model_figure(m: dict, entry: dict, key: str):
    """A property of the model itself (parameters, FLOPs per token): this engine's figure, or
    any engine's that measured it."""
    return m.get(key) or next((em[key] for em in entry["engines"].values() if em.get(key)), None)


def report_rows(rep: dict, run: str | None = None, with_baseline: bool = True) -> list[dict]:
    run = run or run_label(rep)
    base = rep["baseline"]
    out = [flat_row(run, base, e, m, {}, True) for e, m in base["engines"].items()] if with_baseline else []
    for a in rep["artifacts"]:
        out += [flat_row(run, a, e, m, a.get("retention", {}).get(e, {}), False) for e, m in a["engines"].items()]
    return out


# -- Pareto ---------------------------------------------------------------------------------

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
    speedup's range over the baseline (the baseline itself: exactly 1), else None."""
    if row["baseline"]:
        return (1.0, 1.0) if row["throughput"] is not None else None
    s = row["throughput_speedup"] or {}
    return (s["lo"], s["hi"]) if s.get("method") == "paired" and s.get("lo") is not None else None


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


# -- groups ---------------------------------------------------------------------------------

def comparability(rep: dict) -> dict:
    """What two runs must share to sit in one table."""
    return {"baseline": {e: m.get("model_hash") for e, m in rep["baseline"]["engines"].items()},
            "protocol": rep.get("protocol")}


def differences(a, b, path: str = "", limit: int = 3) -> list[str]:
    """Up to `limit` 'path: a vs b' lines where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(dict.fromkeys([*a, *b])):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), limit - len(out))
            if len(out) >= limit:
                break
        return out
    if a != b:
        def short(x):
            s = json.dumps(x, default=str)
            return s if len(s) <= 40 else s[:37] + "..."
        return [f"{path}: {short(a)} vs {short(b)}"]
    return []


@dataclass
class Group:
    reports: list[dict]
    reason: str = ""                       # why it is not with the first group
    rows: list[dict] = field(default_factory=list)
    quality: Axis | None = None            # the charts' axes (set by `finish`)
    memory: Axis | None = None

    def finish(self, quality: str | None = None, memory: str | None = None) -> Group:
        """Choose the axes and mark the Pareto sets."""
        self.quality, self.memory = quality_axis(self.rows, quality), memory_axis(self.rows, memory)
        mark_pareto(self.rows, self.quality, self.memory)
        return self


def group_reports(reports: list[dict]) -> list[Group]:
    """Reports that measured alike, together; each later group says how it differs from the first."""
    groups: list[tuple[dict, Group]] = []
    for rep in reports:
        key = comparability(rep)
        g = next((g for k, g in groups if k == key), None)
        if g is not None:
            g.reports.append(rep)
            continue
        g = Group([rep])
        if groups:
            first_key, first = groups[0]
            a, b = first.reports[0], rep
            who = f"{run_label(b)} ({b['_path']}) differs from {run_label(a)} ({a['_path']})"
            old = [r for r in (a, b) if (r.get("protocol") or {}).get("derived_from")]
            if len(old) == 1:
                g.reason = (f"{who}: {run_label(old[0])} is a schema 3 report, whose protocol was not recorded; it "
                            "is only compared with other schema 3 reports")
            else:
                g.reason = f"{who}: " + "; ".join(differences(first_key, key))
        groups.append((key, g))
    return [g for _, g in groups]


def group_rows(g: Group) -> list[dict]:
    """The baseline once (it is the same model measured the same way), then every artifact; with
    several runs, artifact names are prefixed by their run's name (#k where two runs share one)."""
    labels = [run_label(rep) for rep in g.reports]
    labels = [f"{x}#{k + 1}" if labels.count(x) > 1 else x for k, x in enumerate(labels)]
    rows = []
    for k, (rep, run) in enumerate(zip(g.reports, labels)):
        for r in report_rows(rep, run, with_baseline=k == 0):
            if len(g.reports) > 1 and not r["baseline"]:
                r["artifact"] = f"{run}/{r['artifact']}"
            rows.append(r)
    return rows


def compare_reports(reports: list[dict], quality: str | None = None, only: str | None = None,
                    memory: str | None = None) -> list[Group]:
    """Group and flatten loaded reports (each with its `_path`); mark Pareto sets per group and
    engine. `only`: glob over artifact names (the baseline always stays); `quality`, `memory`:
    the charts' axes."""
    groups = group_reports(reports)
    for g in groups:
        g.rows = [r for r in group_rows(g) if r["baseline"] or not only or fnmatch.fnmatchcase(r["artifact"], only)]
        g.finish(quality, memory)
    return groups


def compare(paths: list[str | Path], quality: str | None = None, only: str | None = None,
            memory: str | None = None) -> list[Group]:
    """`compare_reports` over the report.json of each path (a run directory or the file)."""
    if not paths:
        raise UserError("compare: name at least one run directory or report.json")
    return compare_reports([load_report(p) for p in paths], quality, only, memory)
