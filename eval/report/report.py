"""Build, write and render the run report: report.json's dict (build_report), its table (also
the console's summary), report.md, and the three files; the bullet lines under the table come
from eval.report.lines, report.html from eval.report.html.

report.json schema (version 4; eval/report/report.schema.json is its JSON Schema, the README
section "Report schema" its prose):
  schema_version, squeeze_version, created, recipe (as run, or null for `squeeze eval`),
  device,
  protocol: what makes runs comparable (eval.evaluate.protocol): perplexity, speed, tasks,
            task_batch_size, engines {engine: settings}, device, hardware, seed,
  provenance: host {device_name, cpu, gpus, driver, cuda, platform}, versions, git_sha, gpu_stack
              (on CUDA: {constraints, pinned, installed, mismatches}, eval.stack; else null),
              recipe_hash, compression_hash, seeds,
  baseline: {name, model_dir, engines: {engine: metrics}},
  artifacts: [{name, stage, stages (the chain that made it), final, model_dir, stage_info,
               engines: {engine: metrics},
               retention: {engine: {ppl_retention, ppl_change_pct, tasks: {"task.metric":
                           {retention, change_points}}, speed: {throughput | batch1_tpot:
                           {ratio, lo, hi, verdict, method, rounds, ratios}}, size_ratio,
                           kv_cache_ratio}}}],
  gate (where a gate was applied): {passed, verdicts: [...]} (eval.report.gate).
  metrics (eval.evaluate): perplexity, tasks {name: {acc, acc_stderr, acc_norm, ...}},
  speed {concurrent, batch1: per-repeat throughput and latency distributions, protocol},
  memory, provenance, settings, size_bytes, quantization, kernels (eval.engines.kernels), params, error (if it failed);
  artifacts' metrics also paired_speed: the paired rounds against the baseline (eval.paired).
  Retention compares an artifact with the baseline measured on the same engine.
  Version 1 had one engine (`metrics`); version 2 had `engines` and batch-1 speed only
  (decode_speedup); version 3 had no protocol, provenance, stages or final, and versions and
  recipe_hash at the top (readers derive the rest: eval.report.compare.load_report). Readers
  check schema_version.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

from compress import __version__
from compress.fsutil import atomic_write_text
from compress.manifest import git_sha, versions
from eval.accuracy.tasks import headline
from eval.evaluate import retention
from eval.report.cells import fmt, mib, quant_label
from eval.report.lines import gate_lines, notes, protocol_lines, provenance_lines
from eval.speed.workload import fmt_speedup
from eval.stack import gpu_stack

SCHEMA_VERSION = 4


def host_info(device: str | None) -> dict:
    """CPU model, GPUs, driver, CUDA and platform of the machine that measured."""
    import torch

    from eval.memory import device_info, gpu_name

    info = {"cpu": device_info("cpu")["device_name"], "platform": platform.platform()}
    if torch.cuda.is_available():  # NVML (gpu_name): no CUDA context in the process that reports
        info["gpus"] = [gpu_name(i) for i in range(torch.cuda.device_count())]
    if device and device.startswith("cuda"):
        info.update(device_info(device))
    else:
        info["device_name"] = info["cpu"]
    return info


def build_report(baseline: dict, artifacts: list[dict], recipe: dict | None = None, device: str | None = None,
                 protocol: dict | None = None, provenance: dict | None = None) -> dict:
    """`baseline` = {name, model_dir, engines: {engine: metrics}}; each artifact likewise, plus
    stage, stages, final and stage_info. `provenance` adds recipe_hash, compression_hash, seeds."""
    arts = [{**a, "retention": {e: retention(baseline["engines"][e], m) for e, m in a["engines"].items()
                                if e in baseline["engines"]}} for a in artifacts]
    if arts and not any(a.get("final") for a in arts):
        arts[-1]["final"] = True
    prov = {"host": host_info(device), "versions": versions(), "git_sha": git_sha(), "gpu_stack": gpu_stack(device),
            **(provenance or {})}
    return {
        "schema_version": SCHEMA_VERSION,
        "squeeze_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": recipe,
        "device": device,
        "protocol": protocol,
        "provenance": prov,
        "baseline": baseline,
        "artifacts": arts,
    }


def rows(report: dict):
    """(entry, engine, metrics, retention) in table order: baseline first, per engine."""
    base = report["baseline"]
    for e, m in base["engines"].items():
        yield base, e, m, retention(m, m)
    for a in report["artifacts"]:
        for e, m in a["engines"].items():
            yield a, e, m, a["retention"].get(e, {})


def task_columns(report: dict) -> list[tuple[str, str]]:
    """(task, headline metric) pairs in table order: the spec's `metric`, else acc for multiple
    choice and exact_match for generation."""
    cols = []
    for _, _, m, _ in rows(report):
        for task, tm in (m.get("tasks") or {}).items():
            metric = headline(tm)
            if metric and (task, metric) not in cols:
                cols.append((task, metric))
    return cols


def table(report: dict) -> str:
    """Markdown table: one row per (model, engine), changes against the baseline on that engine.
    Speedups carry the range of their paired rounds; inside the noise they read 'no measurable change'."""
    tcols = task_columns(report)
    kv = any((m.get("memory") or {}).get("kv_cache_tokens") for _, _, m, _ in rows(report))  # a vLLM engine ran
    head = ["model", "engine", "quant", "perplexity", "ppl retention", *[f"{t} {m}" for t, m in tcols],
            "out tok/s", "throughput vs base", "b1 TPOT ms", "b1 TPOT vs base", "TTFT p50 ms",
            "weights MiB", "peak RSS MiB", "sparsity", "size MB", *(["KV cache tokens"] if kv else [])]
    out = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for entry, engine, m, ret in rows(report):
        sp, mem = m.get("speed", {}), m.get("memory", {})
        conc, b1 = sp.get("concurrent", {}), sp.get("batch1", {})
        is_base = entry is report["baseline"]
        tasks = []
        for t, metric in tcols:
            tm = (m.get("tasks") or {}).get(t, {})
            v, se = tm.get(metric), tm.get(f"{metric}_stderr")
            tasks.append("–" if v is None else f"{v:.3f}" + (f" ± {se:.3f}" if se is not None else ""))
        speed = ret.get("speed", {})
        cells = [
            entry["name"], engine, quant_label(m), fmt(m.get("perplexity", {}).get("perplexity"), ".3f"),
            fmt(ret.get("ppl_retention"), ".3f"), *tasks,
            fmt(conc.get("output_tok_s", {}).get("median"), ".1f"),
            "base" if is_base and conc else fmt_speedup(speed.get("throughput")),
            fmt(b1.get("tpot_mean_ms", {}).get("median"), ".2f"),
            "base" if is_base and b1 else fmt_speedup(speed.get("batch1_tpot")),
            fmt(conc.get("ttft_ms", {}).get("p50"), ".1f"),
            mib(mem.get("weight_bytes")), mib(mem.get("peak_rss_bytes")),
            fmt(m.get("linear_sparsity"), ".1%"), fmt(m.get("size_bytes", 0) / 1e6, ".1f")]
        if kv:
            cells.append(kv_cell(mem, None if is_base else ret.get("kv_cache_ratio")))
        if m.get("error"):
            cells[3] = cells[3] if cells[3] != "–" else "error"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def kv_cell(mem: dict, ratio: float | None) -> str:
    """Tokens the engine's KV cache holds: '232,448', or '464,896 fp8 (2.00 ×)' with its dtype where it is
    not the model's (as the engine resolved it) and its ratio to the baseline's."""
    n, dt = mem.get("kv_cache_tokens"), str(mem.get("kv_cache_dtype") or "")
    if not n:
        return "–"
    return f"{n:,}" + (f" {dt}" if dt.startswith("fp8") else "") + (f" ({ratio:.2f} ×)" if ratio is not None else "")


def markdown(report: dict) -> str:
    title = (report.get("recipe") or {}).get("name", "evaluation")
    from eval.serve_tune import report_lines  # the serving and tuning code: loaded only for report.md

    lines = [f"# Squeeze report: {title}", *gate_lines(report.get("gate")), "", table(report), *report_lines(report),
             "", "Protocol:", *protocol_lines(report), *notes(report), "", "Provenance:", *provenance_lines(report)]
    lines += ["", f"squeeze {report['squeeze_version']}, report schema {report['schema_version']}, "
              f"{report['created']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path, Path]:
    """report.json, report.md and the self-contained report.html in `out_dir`."""
    from eval.report.html import report_page  # matplotlib (its charts): loaded only when writing

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m, h = out_dir / "report.json", out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(j, json.dumps(report, indent=1, default=str))
    atomic_write_text(m, markdown(report))
    atomic_write_text(h, report_page(report))
    return j, m, h
