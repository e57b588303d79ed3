"""The comparison table's columns, shared by comparison.md and the HTML pages' tables: one
(header, cell function) per column over the rows of eval.report.compare. A column nobody
measured is left out; task cells read value ± standard error (retention against the
baseline); speedups carry their paired range (eval.speed.workload.fmt_speedup)."""

from __future__ import annotations

from eval.report.cells import fmt


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
    if has("kv_cache_tokens"):
        cols += [("KV tokens", lambda r: fmt(r["kv_cache_tokens"], ",")),
                 ("KV vs base", lambda r: "base" if r["baseline"] else fmt(r["kv_cache_ratio"], ".2f"))]
    if has("peak_memory_bytes"):
        cols.append(("peak mem MiB", lambda r: fmt(r["peak_memory_bytes"] and r["peak_memory_bytes"] / 2**20, ".0f")))
    cols.append(("Pareto", lambda r: ", ".join(k for k, v in r.get("pareto", {}).items() if v) or "–"))
    return cols
