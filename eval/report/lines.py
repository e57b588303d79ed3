"""The run report's bullet lines ('- ...'), shared by report.md, report.html and the model
cards: how it was measured (perplexity, tasks, speed, the paired speedups, engine settings),
notes per model (sizes, chains, stage settings, kernels, what a cut, a distillation or a weight
stage did, memory, failures), provenance (host, versions, GPU stack, hashes) and the gate's
verdicts. Each function reads report.json's dict (eval.report.report) and returns lines."""

from __future__ import annotations

from eval.engines.kernels import kernel_notes
from eval.report.cells import mib
from eval.report.coverage import coverage_lines


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
            f"ratios, its range {_range_words(p['rounds'])}, and a range containing 1, or a median within "
            f"{p.get('noise_floor', 0):.0%} of 1, reads 'no measurable change'. "
            f"Seconds per round: {per}."] + failed


def _range_words(n: int) -> str:
    from eval.speed.paired import coverage, order_k

    k = order_k(n)
    which = "their min..max" if k == 1 else f"from the {_ordinal(k)} lowest to the {_ordinal(k)} highest ratio"
    return f"{which} (it holds the true median ratio with probability {coverage(n, k):.0%})"


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


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
                ratio = None if entry is report["baseline"] else (entry.get("retention") or {}).get(e, {}).get(
                    "kv_cache_ratio")
                lines.append(f"- {entry['name']} ({e}): KV cache holds {mem['kv_cache_tokens']:,} tokens"
                             + (f" in {mem['kv_cache_dtype']}" if mem.get("kv_cache_dtype") else "")
                             + (f", {ratio:.2f} × the baseline's" if ratio else ""))
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
