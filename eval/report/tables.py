"""The comparison's tables and files: the Markdown table, the CSV, comparison.md/.csv/.html
and the Pareto PNG, from groups made by eval.report.compare. A column nobody measured is
left out; task cells read value ± standard error (retention against the baseline)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from eval.report.cells import fmt
from eval.report.compare import Group, run_label


def _speed(c: dict | None) -> str:
    from eval.speed.workload import fmt_speedup

    return fmt_speedup(c)


def task_keys(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(t for r in rows for t in r["tasks"]))


def columns(rows: list[dict]) -> list[tuple[str, callable]]:
    """(header, cell function) of the comparison table; columns nobody measured are left out."""
    def has(key):
        return any(r.get(key) is not None for r in rows)

    cols = [("model", lambda r: r["artifact"]),
            ("engine", lambda r: r["engine"]), ("quant", lambda r: r["quant"])]
    if has("params"):
        cols.append(("params M", lambda r: fmt(r["params"] and r["params"] / 1e6, ".1f")))
    if has("flops_per_token"):
        cols.append(("GFLOP/tok", lambda r: fmt(r["flops_per_token"] and r["flops_per_token"] / 1e9, ".3f")))
    if has("size_bytes"):
        cols.append(("size MB", lambda r: fmt(r["size_bytes"] and r["size_bytes"] / 1e6, ".1f")))
    if has("perplexity"):
        cols += [("perplexity", lambda r: "error" if r["error"] and r["perplexity"] is None
                  else fmt(r["perplexity"], ".3f")),
                 ("ppl Δ %", lambda r: "base" if r["baseline"] else fmt(r["ppl_change_pct"], "+.1f"))]
    for t in task_keys(rows):
        def cell(r, t=t):
            tv = r["tasks"].get(t)
            if not tv:
                return "–"
            s = f"{tv['value']:.3f}" + (f" ± {tv['stderr']:.3f}" if tv.get("stderr") is not None else "")
            return s if r["baseline"] or tv.get("retention") is None else f"{s} ({tv['retention']:.1%})"
        cols.append((t, cell))
    if has("throughput"):
        cols += [("out tok/s", lambda r: fmt(r["throughput"], ".1f")),
                 ("speedup", lambda r: "base" if r["baseline"] else _speed(r["throughput_speedup"])),
                 ("TTFT p50 ms", lambda r: fmt(r["ttft_p50_ms"], ".1f"))]
    if has("tpot_ms"):
        cols += [("b1 TPOT ms", lambda r: fmt(r["tpot_ms"], ".2f")),
                 ("TPOT speedup", lambda r: "base" if r["baseline"] else _speed(r["tpot_speedup"]))]
    if has("weight_bytes"):
        cols.append(("weights MiB", lambda r: fmt(r["weight_bytes"] and r["weight_bytes"] / 2**20, ".0f")))
    if has("peak_memory_bytes"):
        cols.append(("peak mem MiB", lambda r: fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20, ".0f")))
    cols.append(("Pareto", lambda r: ", ".join(k for k, v in r.get("pareto", {}).items() if v) or "–"))
    return cols


def markdown_table(rows: list[dict]) -> str:
    cols = columns(rows)
    out = ["| " + " | ".join(h for h, _ in cols) + " |", "|---|---|---|" + "---:|" * (len(cols) - 3)]
    out += ["| " + " | ".join(str(f(r)) for _, f in cols) + " |" for r in rows]
    return "\n".join(out)


CSV_FIELDS = ["group", "run", "artifact", "baseline", "final", "stages", "engine", "quant", "params",
              "nonzero_params", "flops_per_token", "size_bytes", "size_ratio", "perplexity", "ppl_change_pct", "ppl_retention",
              "throughput", "throughput_speedup", "throughput_speedup_lo", "throughput_speedup_hi",
              "ttft_p50_ms", "tpot_ms", "tpot_speedup", "tpot_speedup_lo", "tpot_speedup_hi",
              "peak_memory_bytes", "weight_bytes", "pareto_throughput", "pareto_memory", "error"]


def csv_text(groups: list[Group]) -> str:
    tkeys = list(dict.fromkeys(t for g in groups for t in task_keys(g.rows)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_FIELDS + [f"{t}{s}" for t in tkeys for s in ("", "_stderr", "_retention")])
    for gi, g in enumerate(groups):
        for r in g.rows:
            flat = {**r, "group": gi + 1, "stages": "+".join(r["stages"]),
                    "pareto_throughput": r["pareto"].get("throughput"), "pareto_memory": r["pareto"].get("memory")}
            for k in ("throughput_speedup", "tpot_speedup"):
                c = r[k] or {}
                flat[k], flat[f"{k}_lo"], flat[f"{k}_hi"] = c.get("ratio"), c.get("lo"), c.get("hi")
            cells = ["" if flat.get(f) is None else flat[f] for f in CSV_FIELDS]
            for t in tkeys:
                tv = r["tasks"].get(t) or {}
                cells += ["" if tv.get(s) is None else tv[s] for s in ("value", "stderr", "retention")]
            w.writerow(cells)
    return buf.getvalue()


def markdown(groups: list[Group]) -> str:
    lines = ["# Squeeze comparison", ""]
    for gi, g in enumerate(groups):
        runs = ", ".join(f"{run_label(r)} ({r['_path']})" for r in g.reports)
        lines += [f"## Group {gi + 1}" if len(groups) > 1 else "## Runs", "", f"Runs: {runs}", ""]
        if g.reason:
            lines += [f"Not compared with group 1: {g.reason}.", ""]
        lines += [markdown_table(g.rows), ""]
    lines += [f"Pareto: optimal for quality ({groups[0].quality.label.split(' (')[0]}) against throughput and/or "
              f"against {groups[0].memory.label.split(' (')[0]} on the same engine "
              "(nothing else is at least as good on both and better on one); a model missing either figure is "
              "not placed. Task cells: value ± standard error (retention against the baseline).", ""]
    return "\n".join(lines)


def write_comparison(groups: list[Group], out_dir: str | Path) -> dict[str, Path]:
    """comparison.md, comparison.csv, comparison.html and one Pareto chart (PNG) per group."""
    from compress.fsutil import atomic_write_text
    from eval.report.charts import pareto_figure
    from eval.report.html import comparison_page

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "html": out / "comparison.html"}
    atomic_write_text(paths["md"], markdown(groups))
    atomic_write_text(paths["csv"], csv_text(groups))
    atomic_write_text(paths["html"], comparison_page(groups))
    for gi, g in enumerate(groups):
        png = out / ("pareto.png" if len(groups) == 1 else f"pareto-group{gi + 1}.png")
        pareto_figure(g, fmt="png", path=png)
        paths[f"png{gi + 1}"] = png
    return paths
