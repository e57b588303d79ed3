"""Build, write and render the run report.

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
                           {ratio, lo, hi, verdict, method, rounds, ratios}}, size_ratio}}}],
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
from eval.engines.kernels import kernel_notes
from eval.evaluate import retention
from eval.report.cells import fmt, mib, quant_label
from eval.report.coverage import coverage_lines
from eval.speed.workload import fmt_speedup
from eval.stack import gpu_stack

SCHEMA_VERSION = 4


def host_info(device: str | None) -> dict:
    """CPU model, GPUs, driver, CUDA and platform of the machine that measured."""
    import torch

    from eval.memory import device_info

    info = {"cpu": device_info("cpu")["device_name"], "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
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
    head = ["model", "engine", "quant", "perplexity", "ppl retention", *[f"{t} {m}" for t, m in tcols],
            "out tok/s", "throughput vs base", "b1 TPOT ms", "b1 TPOT vs base", "TTFT p50 ms",
            "weights MiB", "peak RSS MiB", "sparsity", "size MB"]
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
        if m.get("error"):
            cells[3] = cells[3] if cells[3] != "–" else "error"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def protocol_lines(report: dict) -> list[str]:
    engines = report["baseline"]["engines"]
    m = next((em for em in engines.values() if not em.get("error")), next(iter(engines.values())))
    out = []
    if "perplexity" in m:
        p = m["perplexity"]["protocol"]
        out.append(f"- Perplexity: {p['dataset']}, first {p['max_tokens'] or 'all'} tokens of "
                   f"{p['tokens_in_text']}, context {p['context_length']}, stride {p['stride']}, "
                   f"per token ({m['perplexity']['tokens_scored']} tokens scored), {m['dtype']}.")
    for task, tm in (m.get("tasks") or {}).items():
        out.append(f"- Task {task}: {tm['kind']}, {tm['n']} of {tm['n_total']} records "
                   f"({'limit ' + str(tm['limit']) if tm.get('limit') else 'all'}), {tm['num_fewshot']}-shot, "
                   + (f"headline {tm['metric']} (the spec's `metric`), " if tm.get("metric") else "") +
                   f"lm-eval {tm['lm_eval']} (its hf / vllm backends on the loaded model); source {tm['source']}; "
                   "± is lm-eval's standard error.")
    if "speed" in m:
        s = m["speed"]["protocol"]
        out.append(f"- Speed: {s['num_prompts']} requests of {s['input_len']} random prompt tokens, "
                   f"{s['output_len']} output tokens each (EOS ignored), {s['concurrency']} in flight; batch 1: "
                   f"{s['batch1_requests']} requests one at a time; {s['warmup']} warm-up + {s['repeats']} timed "
                   f"runs; throughput and TPOT are medians of runs; TTFT p50 over the timed requests streamed "
                   f"token by token (vLLM: up to 64 per run); on {m['hardware']} ({m['device']}).")
        out += paired_lines(report)
    for e, em in engines.items():
        out.append(f"- Engine {e} {(em.get('provenance') or {}).get('engine_version') or ''}: " + ", ".join(
            f"{k} {v}" for k, v in (em.get("settings") or {}).items() if v is not None) + ".")
    if any(em.get("quantization") for a in report["artifacts"] for em in a["engines"].values()):
        out.append("- quant: weight bits, activation bits and group size (g128: 128 input channels share a "
                   "scale; g128/64: 64 on layers 128 does not divide; ch: one scale per output channel); "
                   "size MB = bytes of the safetensors on disk.")
    out.append("- ppl retention = baseline perplexity / artifact perplexity (1.0 = no loss); weights MiB = "
               "the model's tensors in the engine's memory; peak RSS = this process and the engine's processes.")
    return out


def paired_lines(report: dict) -> list[str]:
    """How the speedups were measured (eval.speed.paired): rounds, mode and seconds per round."""
    done = [(a["name"], e, p) for a in report["artifacts"] for e, m in a["engines"].items()
            if (p := m.get("paired_speed")) and not p.get("error")]
    failed = [f"- {a['name']} ({e}): the paired speed measurement failed, so its speedups are not paired: "
              f"{p['error']}" for a in report["artifacts"] for e, m in a["engines"].items()
              if (p := m.get("paired_speed")) and p.get("error")]
    if not done:
        return failed + (["- Speedups: not paired (each model measured on its own, minutes apart): the ratio of "
                          "medians, with no range and no verdict of change."] if report["artifacts"] else [])
    p = done[0][2]["protocol"]
    per = "; ".join(f"{n} ({e}) {r['seconds_per_round']:.1f} s, {r['mode']}" for n, e, r in done)
    return [f"- Speedups: {p['rounds']} paired rounds per artifact and engine, after {p['warmup']} warm-up run(s) "
            "of each: the baseline and the artifact both open on the engine, given the same prompts in turn, the "
            "baseline first in even rounds and the artifact in odd ones, the baseline's engine reopened at half-time "
            "(so that it is opened before the artifact's in one half and after it in the other); a speedup is the "
            "median of the per-round "
            "ratios, its range their min..max (it holds the true median ratio with probability "
            f"{1 - 2 ** (1 - p['rounds']):.0%}), and a range containing 1 reads 'no measurable change'. "
            f"Seconds per round: {per}."] + failed


def cut_lines(info: dict) -> list[str]:
    """What a structured cut or a distillation did, from its stage info: the counts before and
    after (the same in every layer), the heads kept and layers removed per layer; the training
    (steps, processes, tokens/s, MFU) and the held-out perplexity before and after it."""
    out = []
    for k in ("intermediate_size", "heads", "kv_heads", "hidden_size", "layers"):
        v = info.get(k)
        if isinstance(v, list) and len(v) == 2:
            out.append(f"{k.replace('_', ' ')} {v[0]} -> {v[1]}" + (" in every layer" if k != "layers" else ""))
    if info.get("kept_heads_per_layer"):
        out.append("query heads kept per layer: " + "; ".join(
            f"{i}: {','.join(map(str, h))}" for i, h in enumerate(info["kept_heads_per_layer"])))
    if info.get("removed_layers"):
        out.append(f"decoder layers removed: {', '.join(map(str, info['removed_layers']))}")
    if info.get("tokens_per_step"):  # a distillation's run
        n, sh = info.get("processes") or 1, info.get("sharding")
        line = (f"trained {info['steps']:,} steps of {info['tokens_per_step']:,} tokens"
                + (f" (resumed at step {info['resumed_at']:,})" if info.get("resumed_at") else "")
                + f" on {n} process{'es' if n > 1 else ''}" + (f" ({sh})" if sh else ""))
        if info.get("tokens_per_s"):
            line += f", {info['tokens_per_s']:,.0f} tokens/s" + (f", MFU {info['mfu']:.1%}" if info.get("mfu") else "")
        out.append(line)
    ppl = info.get("held_out_perplexity") or {}
    if ppl.get("end") is not None:
        out.append(f"held-out perplexity {ppl['start']:.3f} -> {ppl['end']:.3f}" if ppl.get("start") else
                   f"held-out perplexity {ppl['end']:.3f}")
        out[-1] += f" (teacher {ppl['teacher']:.3f})" if ppl.get("teacher") else ""
    return out


def notes(report: dict) -> list[str]:
    """Per-model notes ('- ...' lines): sizes, stage settings, kernels, sparsity, memory, failures."""
    lines = []
    for entry in [report["baseline"]] + report["artifacts"]:
        m = next((em for em in entry["engines"].values() if "params" in em), None)
        if m:
            lines.append(f"- {entry['name']}: {m['params'] / 1e6:.2f} M parameters, "
                         f"{m.get('nonzero_params', m['params']) / 1e6:.2f} M non-zero, "
                         f"{m.get('size_bytes', 0) / 1e6:.1f} MB on disk"
                         + (f", {m['flops_per_token'] / 1e9:.3f} GFLOP per token (linear layers)"
                            if m.get("flops_per_token") else ""))
    lines += kernel_notes(report["baseline"])
    for a in report["artifacts"]:
        if len(a.get("stages") or []) > 1:
            lines.append(f"- {a['name']}: made by {' -> '.join(a['stages'])}")
    for a in report["artifacts"]:
        info = {k: v for k, v in (a.get("stage_info") or {}).items() if not isinstance(v, (dict, list))}
        if info and a.get("stage") != "distill":  # a distillation's figures: one line of cut_lines
            lines.append(f"- {a['name']}: " + ", ".join(f"{k} = {v}" for k, v in info.items()))
        lines += kernel_notes(a)
        lines += [f"- {a['name']}: {t}" for t in cut_lines(a.get("stage_info") or {})]
        lines += [f"- {a['name']}: {t}" for t in coverage_lines(a.get("stage_info") or {})]
        per_layer = (a.get("stage_info") or {}).get("layer_sparsity") or {}
        if per_layer:
            v = list(per_layer.values())
            lines.append(f"- {a['name']}: sparsity per layer min {min(v):.3f}, mean {sum(v) / len(v):.3f}, "
                         f"max {max(v):.3f} over {len(v)} layers (all in stage.json)")
    for entry in [report["baseline"]] + report["artifacts"]:
        for e, em in entry["engines"].items():
            mem = em.get("memory") or {}
            if mem.get("kv_cache_tokens"):
                lines.append(f"- {entry['name']} ({e}): KV cache holds {mem['kv_cache_tokens']:,} tokens")
            if mem.get("peak_gpu_used_bytes") or mem.get("peak_torch_allocated_bytes"):
                lines.append(f"- {entry['name']} ({e}): peak GPU memory "
                             f"{mib(mem.get('peak_gpu_used_bytes') or mem.get('peak_torch_allocated_bytes'))} MiB")
            if em.get("error"):
                lines.append(f"- **{entry['name']} ({e}) failed**: {em['error']} (figures before it are kept)")
    source = ((report.get("recipe") or {}).get("model") or {}).get("source")
    quantized = any(em.get("quantization") for a in report["artifacts"] for em in a["engines"].values())
    if source == "smollm2" and quantized:
        lines.append("- Note: the built-in SmolLM2 is dequantized from a Q4_1 GGUF, so its weights already sit on a "
                     "4-bit grid with blocks of 32: 4-bit quantization at group 32 can look lossless on it; judge "
                     "quantizers at group 128 (64 where 128 does not divide a layer) or per channel.")
    return lines


def provenance_lines(report: dict) -> list[str]:
    prov = report.get("provenance") or {}
    host = prov.get("host") or {}
    out = [f"- Host: {host.get('device_name') or report.get('device')}"
           + (f", driver {host['driver']}" if host.get("driver") else "")
           + (f", CUDA {host['cuda']}" if host.get("cuda") else "") + (f"; {host['platform']}" if host.get("platform")
                                                                      else "")]
    v = prov.get("versions") or {}
    out.append("- Versions: " + ", ".join(f"{k} {x}" for k, x in v.items()))
    if st := prov.get("gpu_stack"):  # eval.stack: the installed GPU stack against the pinned one
        out.append(f"- GPU stack: {'as pinned' if not st['mismatches'] else 'differs from the pins'} in "
                   f"{st['constraints']}" + "".join(f"; {n} {st['installed'][n] or 'not installed'} (pinned "
                                                    f"{st['pinned'][n]})" for n in st["mismatches"]))
    ids = {k: prov.get(k) for k in ("git_sha", "recipe_hash", "compression_hash")}
    out.append("- " + ", ".join(f"{k} {x[:12] if k != 'git_sha' else x}" for k, x in ids.items() if x)
               + (f"; seeds {prov['seeds']}" if prov.get("seeds") else ""))
    return out


def gate_lines(gate: dict | None) -> list[str]:
    if not gate:
        return []
    out = ["", f"Release gate: **{'PASSED' if gate['passed'] else 'FAILED'}**", ""]
    out += [f"- {'PASS' if v['passed'] else 'FAIL'}: {v['criterion']} on {v['artifact']} ({v['engine']}): "
            f"{v['detail']}" for v in gate["verdicts"]]
    return out


def markdown(report: dict) -> str:
    title = (report.get("recipe") or {}).get("name", "evaluation")
    from eval.serve_tune import report_lines

    lines = [f"# Squeeze report: {title}", *gate_lines(report.get("gate")), "", table(report), *report_lines(report),
             "", "Protocol:", *protocol_lines(report), *notes(report), "", "Provenance:", *provenance_lines(report)]
    lines += ["", f"squeeze {report['squeeze_version']}, report schema {report['schema_version']}, "
              f"{report['created']}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> tuple[Path, Path, Path]:
    """report.json, report.md and the self-contained report.html in `out_dir`."""
    from eval.report.html import report_page

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    j, m, h = out_dir / "report.json", out_dir / "report.md", out_dir / "report.html"
    atomic_write_text(j, json.dumps(report, indent=1, default=str))
    atomic_write_text(m, markdown(report))
    atomic_write_text(h, report_page(report))
    return j, m, h
