"""The comparison's Markdown table and CSV, and its files: comparison.md, comparison.csv,
comparison.html (eval.report.html) and a Pareto PNG per group (eval.report.charts), from
groups made by eval.report.compare. The table's columns: eval.report.columns."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from compress.fsutil import atomic_write_text
from eval.report.charts import pareto_figure
from eval.report.columns import columns, task_keys
from eval.report.compare import Group, run_label
from eval.report.html import comparison_page


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
