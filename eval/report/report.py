"""Build, write and render the run report.

report.json schema (version 1):
  schema_version, squeeze_version, created, recipe (as run), recipe_hash, device,
  baseline: {name, model_dir, metrics}, artifacts: [{name, stage, model_dir, stage_info,
  metrics, retention}]. Later versions add fields; readers check schema_version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from compress import __version__
from compress.manifest import versions
from compress.fsutil import atomic_write_text
from eval.evaluate import retention

SCHEMA_VERSION = 1


def build_report(baseline: dict, artifacts: list[dict], recipe: dict | None = None,
                 recipe_hash: str | None = None, device: str | None = None) -> dict:
    """`baseline` = {name, model_dir, metrics}; each artifact = {name, model_dir, metrics, ...}."""
    arts = [{**a, "retention": retention(baseline["metrics"], a["metrics"])} for a in artifacts]
    return {
        "schema_version": SCHEMA_VERSION,
        "squeeze_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "recipe": recipe,
        "recipe_hash": recipe_hash,
        "device": device,
        "versions": versions(),
        "baseline": baseline,
        "artifacts": arts,
    }


def _f(x, fmt):
    return "–" if x is None else format(x, fmt)


def table(report: dict) -> str:
    """Markdown table: baseline first, then each artifact with its change against baseline."""
    rows = ["| model | perplexity | ppl retention | prefill tok/s | decode tok/s | decode speedup "
            "| linear sparsity | size MB |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base = report["baseline"]
    entries = [(base, retention(base["metrics"], base["metrics"]))] + [(a, a["retention"]) for a in report["artifacts"]]
    for entry, ret in entries:
        m, sp = entry["metrics"], entry["metrics"].get("speed", {})
        rows.append(
            f"| {entry['name']} | {_f(m.get('perplexity', {}).get('perplexity'), '.3f')} "
            f"| {_f(ret.get('ppl_retention'), '.3f')} | {_f(sp.get('prefill_tok_s'), '.1f')} "
            f"| {_f(sp.get('decode_tok_s'), '.1f')} | {_f(ret.get('decode_speedup'), '.2f')}x "
            f"| {_f(m.get('linear_sparsity'), '.1%')} | {_f(m.get('size_bytes', 0) / 1e6, '.1f')} |")
    return "\n".join(rows)


def protocol_lines(report: dict) -> list[str]:
    m = report["baseline"]["metrics"]
    out = []
    if "perplexity" in m:
        p = m["perplexity"]["protocol"]
        out.append(f"- Perplexity: {p['dataset']}, first {p['max_tokens'] or 'all'} tokens of "
                   f"{p['tokens_in_text']}, context {p['context_length']}, stride {p['stride']}, "
                   f"per token ({m['perplexity']['tokens_scored']} tokens scored), {m['dtype']}.")
    if "speed" in m:
        s = m["speed"]["protocol"]
        out.append(f"- Speed: engine {s['engine']}, batch {s['batch_size']}, {s['input_len']} input / "
                   f"{s['output_len']} output tokens (EOS ignored), {s['warmup']} warm-up + "
                   f"{s['repeats']} timed runs, {s['statistic']}; on {m['hardware']} ({m['device']}).")
    out.append("- ppl retention = baseline perplexity / artifact perplexity (1.0 = no loss); "
               "decode speedup = artifact decode tok/s / baseline decode tok/s.")
    return out


def markdown(report: dict) -> str:
    title = (report.get("recipe") or {}).get("name", "evaluation")
    lines = [f"# Squeeze report: {title}", "", table(report), "", "Protocol:", *protocol_lines(report)]
    for a in report["artifacts"]:
        info = {k: v for k, v in (a.get("stage_info") or {}).items() if not isinstance(v, dict)}
        if info:
            lines.append(f"- {a['name']}: " + ", ".join(f"{k} = {v}" for k, v in info.items()))
    lines += ["", f"squeeze {report['squeeze_version']}, report schema {report['schema_version']}, "
              f"{report['created']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    j, m = out_dir / "report.json", out_dir / "report.md"
    atomic_write_text(j, json.dumps(report, indent=1, default=str))
    atomic_write_text(m, markdown(report))
    return j, m
