"""GPU benchmarks for static and dynamic W8A8, SmoothQuant, AWQ and bitsandbytes.

    python3 benchmarks/quant2_gpu.py layouts --out DIR [--tiny]
    python3 benchmarks/quant2_gpu.py speed DIR[:dummy|:bnb][=LABEL]... [--tput-repeats 3] [--tiny]
    python3 benchmarks/quant2_gpu.py cost8b --method awq|sq-int8-static|gptq|rotate-gptq [--cap-gib 8] [--tiny]
    python3 benchmarks/quant2_gpu.py bf16-dir --out DIR [--tiny]
    python3 benchmarks/quant2_gpu.py smollm2 --gguf FILE

layouts: config-only directories (and an empty weights file) of the Llama-3.1-8B shape for
  vLLM's dummy weights (speed does not depend on weight values at fixed output lengths): bf16, and the W8A8 int8 and FP8
  checkpoints our stages write (dynamic per-token and static per-tensor activations), their
  quantization_config built by the same export code (compress.export.compressed_tensors).
speed: benchmarks/vllm_speed.py per model in a fresh process (512 prompts × 512 in / 128 out,
  median of --tput-repeats runs on fresh prompts; batch-1 TTFT/TPOT), kernels from vLLM's log.
  `:bnb` loads real bf16 weights with vLLM's in-flight bitsandbytes quantization.
cost8b: the stage(s) on a random-weight 8B-shaped model in host memory with 128 × 2048
  random calibration tokens, the process capped at --cap-gib of GPU memory: seconds and peak.
  gptq / rotate-gptq: GPTQ W4 g128 symmetric, without and with `rotate: {}` (issue 25's cost goal:
  rotate + GPTQ <= 1.2 x GPTQ alone; run both in one call).
bf16-dir: the random 8B model written as a bf16 checkpoint (for the bitsandbytes run).
smollm2: the stage of each W8A8 / SmoothQuant / AWQ / bitsandbytes recipe on SmolLM2 on the GPU,
  the artifact measured on transformers and vLLM (perplexity, WikiText-2, 8,192 tokens): our real
  checkpoints in vLLM.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpu_common import add_common_args, bench_context, capped_random_llama, llama_config, random_llama, record
from kv_cache_gpu import write_layouts as kv_layouts
from quant_gpu import cmd_speed


def _ct_config(sch) -> dict:
    """The quantization_config our export writes for a WeightScheme (compress.export)."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    q = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=sch.args(),
        input_activations=sch.input_acts.args() if sch.input_acts else None)},
        format=sch.format, quantization_status="compressed", ignore=["lm_head"])
    return {"quant_method": "compressed-tensors", **q.model_dump(mode="json", exclude_none=False)}


def _schemes() -> dict:
    """Layout name -> the WeightScheme our stages write for it (None: bf16)."""
    from compress.export.compressed_tensors import ActScheme, WeightScheme

    def w8a8(fp8, dynamic):
        t = "float" if fp8 else "int"
        return WeightScheme(8, -1, True, type=t, input_acts=ActScheme(type=t, dynamic=dynamic))

    return {"bf16": None, "int8-dynamic": w8a8(False, True), "int8-static": w8a8(False, False),
            "fp8-dynamic": w8a8(True, True), "fp8-static": w8a8(True, False),
            # issue 25's Hopper formats: FP8 128 x 128 weight blocks with activations per token
            # and group of 128 (the fp8 stage's `weights: block`), int4 g128 weights with FP8
            # token activations (W4A8: `activations: fp8` on rtn / gptq / awq), and W4A16 g128
            # with a zero point (the W4A16 recipes' layout)
            "fp8-block128": WeightScheme(8, -1, True, type="float", block=128,
                                         input_acts=ActScheme(type="float", dynamic=True, group_size=128)),
            "w4a8": WeightScheme(4, 128, True, input_acts=ActScheme(type="float", dynamic=True)),
            "w4a16": WeightScheme(4, 128, False)}


def cmd_layouts(args) -> None:
    out = Path(args.out)
    cfg = llama_config(args.tiny)
    for name, q in _schemes().items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        c = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"]}
        if q:
            c["quantization_config"] = _ct_config(q)
        (d / "config.json").write_text(json.dumps(c, indent=1))
        # an empty weights file, so that Squeeze's own loaders take the directory (its checks want
        # weights); vLLM's dummy loader (load_format: dummy) never reads it
        save_file({}, str(d / "model.safetensors"))
    # the FP8 KV cache's scheme on 16-bit weights: kv-fp8 (per tensor), kv-fp8-head (per KV head); how to
    # time them with dummy weights (random k/v scales): benchmarks/kv_cache_gpu.py's docstring
    kv_layouts(out, args.tiny)
    record(args, {"what": "layout configs written", "dirs": sorted(p.name for p in out.iterdir()),
                  "int8_static_config": _ct_config(_schemes()["int8-static"])})


def cmd_bf16_dir(args) -> None:
    cfg = llama_config(args.tiny)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    model = random_llama(cfg, dev)
    model.save_pretrained(args.out)
    record(args, {"what": "random bf16 checkpoint written", "dir": args.out,
                  "seconds": round(time.perf_counter() - t0, 1)})


def cmd_cost8b(args) -> None:
    from compress import registry

    dev, cfg, model = capped_random_llama(args)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n, seq = (8, 64) if args.tiny else (args.samples, args.seq_len)
    cal = {"n_samples": n, "seq_len": seq}
    gptq = {"bits": 4, "group_size": 128, "symmetric": True, "actorder": "weight", "calibration": cal}
    stages = {"awq": [("awq", {"bits": 4, "group_size": 128, "symmetric": False, "calibration": cal})],
              "sq-int8-static": [("smoothquant", {"alpha": 0.5, "calibration": cal}),
                                 ("int8", {"activations": "static", "calibration": cal})],
              "gptq": [("gptq", gptq)], "rotate-gptq": [("gptq", {**gptq, "rotate": {}})]}[args.method]
    ctx = bench_context(dev, cfg.vocab_size, n, seq)
    per_stage, t_all = {}, time.perf_counter()
    for name, conf in stages:
        st = registry.get(name)
        t0 = time.perf_counter()
        model, info = st.apply(model, st.config.model_validate(conf), ctx)
        per_stage[name] = {"seconds": round(time.perf_counter() - t0, 1), "peak_gpu_gib": info.get("peak_gpu_gib"),
                           "memory": info.get("memory"), "capture_seconds": info.get("capture_seconds"),
                           **{k: info[k] for k in ("seconds_search", "mean_search_loss_over_rtn", "scaled_modules",
                                                   "smoothed_modules", "quantized_modules", "rotate") if k in info}}
    total = time.perf_counter() - t_all
    record(args, {"what": f"{args.method} cost", "model": "tiny" if args.tiny else "llama-3.1-8b-shape random bf16",
                  "calibration": f"{n} x {seq} random tokens", "gpu_cap_gib": args.cap_gib,
                  "seconds": round(total, 1), "stages": per_stage,
                  "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if dev == "cuda" else None})


SQ = {"type": "smoothquant", "alpha": 0.5, "calibration": "C"}
SQ8 = {"type": "smoothquant", "alpha": 0.8, "calibration": "C"}
STATIC = {"type": "int8", "activations": "static", "calibration": "C"}
PCT = {"observer": "percentile", "percentile": 99.99}
SMOLLM2_STAGES = {
    "int8-dynamic": [{"type": "int8"}],
    "sq0.5-int8-dynamic": [SQ, {"type": "int8"}],
    "sq0.8-int8-dynamic": [SQ8, {"type": "int8"}],
    "int8-static": [STATIC],
    "int8-static-percentile": [{**STATIC, **PCT}],
    "sq0.5-int8-static": [SQ, STATIC],
    "sq0.8-int8-static": [SQ8, STATIC],
    "sq0.8-int8-static-percentile": [SQ8, {**STATIC, **PCT}],
    "sq0.8-all-int8-static": [{**SQ8, "mappings": [
        {"balance": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "smooth": "input_layernorm"},
        {"balance": ["mlp.gate_proj", "mlp.up_proj"], "smooth": "post_attention_layernorm"},
        {"balance": ["mlp.down_proj"], "smooth": "mlp.up_proj"}]}, STATIC],
    "sq0.8-int8-static-down16": [SQ8, {**STATIC, "ignore": ["lm_head", "*.down_proj"]}],
    "fp8-dynamic": [{"type": "fp8"}],
    "fp8-static": [{"type": "fp8", "activations": "static", "calibration": "C"}],
    "rtn-w4-g128": [{"type": "rtn", "group_size": 128, "group_fallback": True, "symmetric": False}],
    "awq-w4-g128": [{"type": "awq", "group_size": 128, "group_fallback": True, "calibration": "C"}],
    "awq-gptq-w4-g128": [{"type": "awq", "group_size": 128, "group_fallback": True, "quantizer": "gptq",
                          "calibration": "C"}],
    "bnb-nf4": [{"type": "bnb", "quant_type": "nf4"}],
    "bnb-fp4": [{"type": "bnb", "quant_type": "fp4"}],
    "bnb-int8": [{"type": "bnb", "quant_type": "int8"}],
}


def cmd_smollm2(args) -> None:
    """Each recipe's stages on SmolLM2 on the GPU; perplexity on both engines (bf16)."""
    from squeeze import pipeline
    from compress.models import import_gguf
    from squeeze.recipe import parse_recipe

    src = Path("/tmp/squeeze-home/_models/SmolLM2-135M-Instruct")
    if not (src / "config.json").is_file():
        import_gguf(Path(args.gguf), src)
    cal = {"dataset": "wikitext2-valid", "n_samples": 128, "seq_len": 512}
    for name in args.only or SMOLLM2_STAGES:
        stages = [{k: (cal if isinstance(v, str) and v == "C" else v) for k, v in s.items()}
                  for s in SMOLLM2_STAGES[name]]
        rec = {"name": f"q2-{name}", "model": {"source": str(src), "dtype": "bfloat16"}, "device": "cuda",
               "stages": stages, "eval": {"engines": ["hf", "vllm"], "artifacts": "final", "speed": None,
                                          "vllm": {"enforce_eager": True, "gpu_memory_utilization": 0.3},
                                          "perplexity": {"dataset": "wikitext2", "context_length": 1024,
                                                         "max_tokens": 8192},
                                          "tasks": [{"name": "piqa"}] if args.piqa else []}}
        run_dir = Path("/tmp/q2runs") / name
        t0 = time.perf_counter()
        try:
            report = pipeline.run(parse_recipe(rec), run_dir, force=True)
        except Exception as e:  # noqa: BLE001 - one scheme failing is a result, not the end of the run
            record(args, {"what": f"smollm2 {name}", "failed": f"{type(e).__name__}: {e}"[:2000]})
            continue
        a = report["artifacts"][-1]
        def piqa(m):
            return ((m.get("tasks") or {}).get("piqa") or {}).get("acc")

        ppl = {e: {"baseline": report["baseline"]["engines"][e].get("perplexity", {}).get("perplexity"),
                   "artifact": m.get("perplexity", {}).get("perplexity"), "error": m.get("error"),
                   "piqa_baseline": piqa(report["baseline"]["engines"][e]), "piqa_artifact": piqa(m)}
               for e, m in a["engines"].items()}
        record(args, {"what": f"smollm2 {name}", "seconds": round(time.perf_counter() - t0, 1),
                      "scheme": (a["engines"]["hf"].get("quantization") or {}).get("scheme"), "perplexity": ppl,
                      "stage_seconds": [round(json.loads(f.read_text())["seconds"], 1)
                                        for f in sorted(run_dir.glob("stages/*/stage.json"))],
                      "stage_info": {k: v for k, v in (a.get("stage_info") or {}).items()
                                     if not isinstance(v, (dict, list))}})
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("layouts")
    p.add_argument("--out", required=True)
    p = sub.add_parser("speed")
    p.add_argument("models", nargs="+")
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--tput-repeats", type=int, default=3)
    p.add_argument("--prompts", type=int)
    p.add_argument("--input-len", type=int)
    p.add_argument("--output-len", type=int)
    p.add_argument("--max-model-len", type=int)
    p = sub.add_parser("cost8b")
    p.add_argument("--method", choices=["awq", "sq-int8-static", "gptq", "rotate-gptq"], required=True)
    p.add_argument("--cap-gib", type=float, default=8.0)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p = sub.add_parser("bf16-dir")
    p.add_argument("--out", required=True)
    p = sub.add_parser("smollm2")
    p.add_argument("--gguf", required=True)
    p.add_argument("--only", nargs="*")
    p.add_argument("--piqa", action="store_true", help="full PIQA validation (1,838) on both engines")
    add_common_args(sub)
    args = ap.parse_args()
    args.workload = {k: getattr(args, k) for k in ("prompts", "input_len", "output_len", "max_model_len")
                     if getattr(args, k, None)}
    {"layouts": cmd_layouts, "speed": cmd_speed, "cost8b": cmd_cost8b, "bf16-dir": cmd_bf16_dir,
     "smollm2": cmd_smollm2}[args.cmd](args)


if __name__ == "__main__":
    main()
