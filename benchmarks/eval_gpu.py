"""The evaluator's own figures: fidelity of its speed measurement to bare
engine scripts, and agreement of the two engines on accuracy.

    python3 benchmarks/eval_gpu.py vllm-fidelity --model DIR [--dummy] --prompts 1024 --input-len 128 --output-len 128
    python3 benchmarks/eval_gpu.py hf-fidelity --model DIR --prompts 64 --input-len 128 --output-len 128
    python3 benchmarks/eval_gpu.py agree --gguf FILE [--piqa-limit N] [--gsm8k-limit N]
    python3 benchmarks/eval_gpu.py llama8b-dir --out DIR --tokenizer-from DIR

vllm-fidelity: one vLLM engine opened by the evaluator (eval.engines.vllm.VLLMEngine.load);
on it, alternately, a bare `llm.generate(prompts, SamplingParams(max_tokens=N,
ignore_eos=True))` (what a bare vLLM throughput script does) and one run of the evaluator's
workload (`workload_speed`, streaming every token back with its timestamp); fresh random
prompts for every run (no prefix-cache reuse), one warm-up of each first. Output tok/s of
each run; the ratio is median(evaluator) / median(bare).
hf-fidelity: the same for transformers: bare `model.generate(ids, max_new_tokens=N,
min_new_tokens=N, do_sample=False)` on the whole batch against the evaluator's HF engine
(`HFEngine.stream`, static batch of the same size).
agree: SmolLM2 on both engines through the evaluator (`eval.evaluate.evaluate`): WikiText-2
perplexity (8 x 1024), PIQA (lm-eval, full validation unless --piqa-limit), GSM8K
(lm-eval, 5-shot strict match, --gsm8k-limit items).
llama8b-dir: a config-only Llama-3.1-8B-shaped directory (for vLLM's dummy weights) with a
tokenizer copied from another model (prompts are token ids below that tokenizer's size).

Each command appends a JSONL record (GPU, driver, versions, command) to --jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from gpu_common import LLAMA_8B, ROOT, add_common_args, record  # noqa: F401 - ROOT puts the repo on sys.path


def _summary(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1),
            "runs": [round(x, 1) for x in xs]}


def cmd_vllm_fidelity(args) -> None:
    from vllm import SamplingParams

    from eval.engines.vllm import VLLMEngine
    from eval.speed.workload import random_prompts, workload_speed

    kw = {"load_format": "dummy"} if args.dummy else {}
    t0 = time.perf_counter()
    eng = VLLMEngine.load(Path(args.model), dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
                          **kw)
    start_s = time.perf_counter() - t0
    bare, ours, ours_full = [], [], []
    n_out = args.prompts * args.output_len
    sp = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
    try:
        for i in range(args.repeats + 1):
            prompts = [{"prompt_token_ids": p} for p in
                       random_prompts(args.prompts, args.input_len, eng.vocab_size, seed=10_000 + i)]
            t = time.perf_counter()
            outs = eng.llm.generate(prompts, sp, use_tqdm=False)
            wall = time.perf_counter() - t
            assert sum(len(o.outputs[0].token_ids) for o in outs) == n_out
            res = workload_speed(eng, args.prompts, args.input_len, args.output_len, None, 0, warmup=0, repeats=1,
                                 seed=20_000 + i, progress=False)
            if i:  # the first pair warms both paths up
                bare.append(n_out / wall)
                ours.append(res["concurrent"]["output_tok_s"]["median"])
                ours_full.append(res["concurrent"])
        b1 = workload_speed(eng, 1, args.input_len, args.output_len, 1, 5, warmup=1, repeats=3, progress=False)
    finally:
        eng.close()
    last = ours_full[-1]
    record(args, {"what": "vllm evaluator vs bare generate", "model": args.model, "dummy": args.dummy,
                  "workload": {"prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len},
                  "engine_start_s": round(start_s, 1), "bare_output_tok_s": _summary(bare),
                  "evaluator_output_tok_s": _summary(ours),
                  "ratio": round(statistics.median(ours) / statistics.median(bare), 4),
                  "evaluator_latency": {k: last[k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")},
                  "batch1": {k: b1["batch1"][k] for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "tpot_mean_ms")},
                  "kv_cache_tokens": eng.stats["memory"]["kv_cache_tokens"]})


@torch.inference_mode()
def cmd_hf_fidelity(args) -> None:
    from eval.engines.hf import HFEngine
    from eval.speed.workload import random_prompts, workload_speed

    eng = HFEngine.load(Path(args.model), dtype=args.dtype, device=args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    bare, ours = [], []
    n_out = args.prompts * args.output_len
    try:
        for i in range(args.repeats + 1):
            ids = torch.tensor(random_prompts(args.prompts, args.input_len, eng.vocab_size, seed=10_000 + i),
                               device=args.device)
            sync()
            t = time.perf_counter()
            out = eng.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.output_len,
                                     min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
            sync()
            wall = time.perf_counter() - t
            assert out.shape[1] - ids.shape[1] == args.output_len
            res = workload_speed(eng, args.prompts, args.input_len, args.output_len, None, 0, warmup=0, repeats=1,
                                 seed=20_000 + i, progress=False)
            if i:
                bare.append(n_out / wall)
                ours.append(res["concurrent"]["output_tok_s"]["median"])
    finally:
        eng.close()
    record(args, {"what": "hf evaluator vs bare generate", "model": args.model,
                  "workload": {"prompts": args.prompts, "input_len": args.input_len, "output_len": args.output_len,
                               "batch": args.prompts},
                  "bare_output_tok_s": _summary(bare), "evaluator_output_tok_s": _summary(ours),
                  "ratio": round(statistics.median(ours) / statistics.median(bare), 4)})


def cmd_agree(args) -> None:
    from compress.models import import_gguf
    from compress.spec import ModelSpec
    from eval.config import EvalConfig, PerplexityConfig, TaskSpec, VLLMOptions
    from eval.evaluate import evaluate

    os.environ.setdefault("SQUEEZE_HOME", "/tmp/squeeze-home")
    base = import_gguf(Path(args.gguf), Path(os.environ["SQUEEZE_HOME"]) / "_models" / "SmolLM2-135M-Instruct")
    tasks = [TaskSpec(name="piqa", limit=args.piqa_limit)]
    if args.gsm8k_limit:
        tasks.append(TaskSpec(name="gsm8k", limit=args.gsm8k_limit, num_fewshot=5))
    cfg = EvalConfig(engines=["hf", "vllm"], perplexity=PerplexityConfig(), speed=None, tasks=tasks,
                     vllm=VLLMOptions(gpu_memory_utilization=0.5))
    res = {}
    for engine in ("hf", "vllm"):
        t = time.perf_counter()
        m = evaluate(base, cfg, ModelSpec(dtype=args.dtype), engine=engine, device=args.device, use_cache=False)
        res[engine] = {"seconds": round(time.perf_counter() - t, 1), "error": m.get("error"),
                       "perplexity": m.get("perplexity", {}).get("perplexity"), "tasks": m.get("tasks"),
                       "memory": m.get("memory"), "provenance": m.get("provenance")}
    record(args, {"what": "smollm2 engines agree", "dtype": args.dtype, "results": res})


def cmd_llama8b_dir(args) -> None:
    from transformers import LlamaConfig

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**LLAMA_8B, torch_dtype="bfloat16").save_pretrained(out)
    for f in Path(args.tokenizer_from).glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    for f in ("special_tokens_map.json",):
        if (Path(args.tokenizer_from) / f).is_file():
            shutil.copy(Path(args.tokenizer_from) / f, out / f)
    print(json.dumps({"dir": str(out), "files": sorted(p.name for p in out.iterdir())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("vllm-fidelity", "hf-fidelity"):
        p = sub.add_parser(name)
        p.add_argument("--model", required=True)
        p.add_argument("--prompts", type=int, default=1024)
        p.add_argument("--input-len", type=int, default=128)
        p.add_argument("--output-len", type=int, default=128)
        p.add_argument("--repeats", type=int, default=3)
        p.add_argument("--max-model-len", type=int, default=2048)
        p.add_argument("--dummy", action="store_true", help="vLLM's random weights (load_format=dummy)")
        p.add_argument("--dtype", default="bfloat16")
        p.add_argument("--device", default="cuda", help="cpu: a dry run")
    p = sub.add_parser("agree")
    p.add_argument("--gguf", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda", help="cpu: a dry run")
    p.add_argument("--piqa-limit", type=int, default=None)
    p.add_argument("--gsm8k-limit", type=int, default=0)
    p = sub.add_parser("llama8b-dir")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer-from", required=True)
    add_common_args(sub)
    args = ap.parse_args()
    {"vllm-fidelity": cmd_vllm_fidelity, "hf-fidelity": cmd_hf_fidelity, "agree": cmd_agree,
     "llama8b-dir": cmd_llama8b_dir}[args.cmd](args)


if __name__ == "__main__":
    main()
