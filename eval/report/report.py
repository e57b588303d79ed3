"""Build, write and render the run report.

report.json schema (version 2):
  schema_version, squeeze_version, created, recipe (as run), recipe_hash, device, versions,
  baseline: {name, model_dir, engines: {engine: metrics}},
  artifacts: [{name, stage, model_dir, stage_info, engines: {engine: metrics},
               retention: {engine: {ppl_retention, ppl_change_pct, decode_speedup, ...}}}].
  Retention compares an artifact with the baseline measured on the same engine.
  Version 1 had one engine: `metrics` where version 2 has `engines`. Readers check
  schema_version.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from compress import __version__
from compress.manifest import versions
from compress.fsutil import atomic_write_text
from eval.evaluate import retention

SCHEMA_VERSION = 2


def build_report(baseline: dict, artifacts: list[dict], recipe: dict | None = None,
                 recipe_hash: str | None = None, device: str | None = None) -> dict:
    """`baseline` = {name, model_dir, engines: {engine: metrics}}; each artifact likewise, plus
    stage and stage_info."""
    arts = [{**a, "retention": {e: retention(baseline["engines"][e], m) for e, m in a["engines"].items()
                                if e in baseline["engines"]}} for a in artifacts]
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


def quant_label(m: dict) -> str:
    """'W4A16 g128', 'W8A16 ch asym', or '–' for a dense model."""
    q = m.get("quantization")
    if not q:
        return "–"
    sizes = "/".join("ch" if g == -1 else f"{g}" for g in q.get("group_sizes", [q.get("group_size", -1)]))
    label = sizes if sizes == "ch" else f"g{sizes}"
    return f"{q.get('scheme', '?')} {label}{'' if q.get('symmetric', True) else ' asym'}"


def rows(report: dict):
    """(entry, engine, metrics, retention) in table order: baseline first, per engine."""
    base = report["baseline"]
    for e, m in base["engines"].items():
        yield base, e, m, retention(m, m)
    for a in report["artifacts"]:
        for e, m in a["engines"].items():
            yield a, e, m, a["retention"].get(e, {})


def table(report: dict) -> str:
    """Markdown table: one row per (model, engine), changes against the baseline on that engine."""
    out = ["| model | engine | quant | perplexity | ppl retention | prefill tok/s | decode tok/s | decode speedup "
           "| linear sparsity | size MB |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for entry, engine, m, ret in rows(report):
        sp = m.get("speed", {})
        out.append(
            f"| {entry['name']} | {engine} | {quant_label(m)} | {_f(m.get('perplexity', {}).get('perplexity'), '.3f')} "
            f"| {_f(ret.get('ppl_retention'), '.3f')} | {_f(sp.get('prefill_tok_s'), '.1f')} "
            f"| {_f(sp.get('decode_tok_s'), '.1f')} | {_f(ret.get('decode_speedup'), '.2f')}x "
            f"| {_f(m.get('linear_sparsity'), '.1%')} | {_f(m.get('size_bytes', 0) / 1e6, '.1f')} |")
    return "\n".join(out)


def protocol_lines(report: dict) -> list[str]:
    engines = report["baseline"]["engines"]
    m = next(iter(engines.values()))
    out = []
    if "perplexity" in m:
        p = m["perplexity"]["protocol"]
        out.append(f"- Perplexity: {p['dataset']}, first {p['max_tokens'] or 'all'} tokens of "
                   f"{p['tokens_in_text']}, context {p['context_length']}, stride {p['stride']}, "
                   f"per token ({m['perplexity']['tokens_scored']} tokens scored), {m['dtype']}.")
    if "speed" in m:
        s = m["speed"]["protocol"]
        out.append(f"- Speed: batch {s['batch_size']}, {s['input_len']} input / "
                   f"{s['output_len']} output tokens (EOS ignored), {s['warmup']} warm-up + "
                   f"{s['repeats']} timed runs, {s['statistic']}; on {m['hardware']} ({m['device']}).")
    for e, em in engines.items():
        out.append(f"- Engine {e}: " + ", ".join(f"{k} {v}" for k, v in (em.get("settings") or {}).items()
                                                  if v is not None) + ".")
    if any(em.get("quantization") for a in report["artifacts"] for em in a["engines"].values()):
        out.append("- quant: weight bits, activation bits and group size (g128: 128 input channels share a "
                   "scale; g128/64: 64 on layers 128 does not divide; ch: one scale per output channel); "
                   "size MB = bytes of the safetensors on disk.")
    out.append("- ppl retention = baseline perplexity / artifact perplexity (1.0 = no loss); "
               "decode speedup = artifact decode tok/s / baseline decode tok/s.")
    return out


def markdown(report: dict) -> str:
    title = (report.get("recipe") or {}).get("name", "evaluation")
    lines = [f"# Squeeze report: {title}", "", table(report), "", "Protocol:", *protocol_lines(report)]
    for entry in [report["baseline"]] + report["artifacts"]:
        m = next((em for em in entry["engines"].values() if "params" in em), None)
        if m:
            lines.append(f"- {entry['name']}: {m['params'] / 1e6:.2f} M parameters, "
                         f"{m.get('nonzero_params', m['params']) / 1e6:.2f} M non-zero, "
                         f"{m.get('size_bytes', 0) / 1e6:.1f} MB on disk")
    for a in report["artifacts"]:
        info = {k: v for k, v in (a.get("stage_info") or {}).items() if not isinstance(v, (dict, list))}
        if info:
            lines.append(f"- {a['name']}: " + ", ".join(f"{k} = {v}" for k, v in info.items()))
        per_layer = (a.get("stage_info") or {}).get("layer_sparsity") or {}
        if per_layer:
            v = list(per_layer.values())
            lines.append(f"- {a['name']}: sparsity per layer min {min(v):.3f}, mean {sum(v) / len(v):.3f}, "
                         f"max {max(v):.3f} over {len(v)} layers (all in stage.json)")
    source = ((report.get("recipe") or {}).get("model") or {}).get("source")
    quantized = any(em.get("quantization") for a in report["artifacts"] for em in a["engines"].values())
    if source == "smollm2" and quantized:
        lines.append("- Note: the built-in SmolLM2 is dequantized from a Q4_1 GGUF, so its weights already sit on a "
                     "4-bit grid with blocks of 32: 4-bit quantization at group 32 can look lossless on it; judge "
                     "quantizers at group 128 (64 where 128 does not divide a layer) or per channel.")
    lines += ["", f"squeeze {report['squeeze_version']}, report schema {report['schema_version']}, "
              f"{report['created']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    j, m = out_dir / "report.json", out_dir / "report.md"
    atomic_write_text(j, json.dumps(report, indent=1, default=str))
    atomic_write_text(m, markdown(report))
    return j, m
