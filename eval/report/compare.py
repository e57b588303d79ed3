"""Compare runs: one tradeoff table over every artifact of every run, Pareto sets, groups.

`squeeze compare RUN_DIR...` reads each run's report.json (nothing is re-measured), puts
every (artifact, engine) in one table against its baseline, and marks the Pareto-optimal
ones for quality against throughput and against memory. Runs are only compared when they
measured the same way: same baseline model (content hash, per engine) and same protocol
(perplexity, tasks, speed workload, engine settings, hardware, seed). Otherwise they are
put in separate groups, each with the reason it was split off.

The Pareto sets and the charts' axes: eval.report.pareto.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path

from compress.errors import UserError
from eval.accuracy.tasks import headline
from eval.report.cells import quant_label
from eval.report.pareto import Axis, mark_pareto, memory_axis, quality_axis

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
        "kv_cache_tokens": (m.get("memory") or {}).get("kv_cache_tokens"),
        "kv_cache_ratio": None if is_base else ret.get("kv_cache_ratio"),
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
