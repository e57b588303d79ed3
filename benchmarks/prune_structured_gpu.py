"""Speed of a structurally pruned Llama-3.1-8B shape against the unpruned one, side by side in
one run (issue "Pruning II": 25 % of the MLP channels + 25 % of the heads, vLLM throughput
>= 1.3x and batch-1 TPOT >= 1.25x on 512 x 512 in / 128 out).

    python3 benchmarks/prune_structured_gpu.py [--engine vllm|hf] [--prompts 512] [--input-len 512] [--output-len 128]

The pruned shape comes from the stages themselves: prune_mlp and prune_heads (kv_groups,
magnitude importance) run on a small-width stand-in with the 8B's layer counts and head
layout, and the resulting counts (intermediate 10,752; 24 query heads in 6 KV groups,
head_dim 128) are written into the 8B config. Speed does not depend on weight values, so
both models run with random weights (vLLM: load_format dummy; HF: random bf16 tensors).
The two models run one after the other in one process, fresh random prompts each run,
through the evaluator's own speed protocol (eval.speed.workload; HF with the CUDA-graph
decode path), and the ratios come with their noise ranges.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from gpu_common import LLAMA_8B, record  # noqa: F401 - puts the repo on sys.path


def pruned_shape(ratio_mlp: float, ratio_heads: float) -> dict:
    """The 8B config after the two stages, from running them on a narrow stand-in."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.prune import structured as st
    from compress.stage import StageContext

    small = dict(LLAMA_8B, hidden_size=256, num_hidden_layers=2, vocab_size=512)  # same heads, KV groups, MLP
    small["head_dim"] = LLAMA_8B["hidden_size"] // LLAMA_8B["num_attention_heads"]
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**small))
    ctx = StageContext(device="cpu", seed=0)
    m, _ = st.apply_mlp(m, st.MLPCutConfig(ratio=ratio_mlp, importance="magnitude"), ctx)
    m, _ = st.apply_heads(m, st.HeadCutConfig(ratio=ratio_heads, importance="magnitude"), ctx)
    c = m.config
    return {"intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim}


def model_dir(out: Path, cfg: dict, tokenizer_from: str | None) -> Path:
    from transformers import LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    LlamaConfig(**cfg, torch_dtype="bfloat16").save_pretrained(out)
    for f in Path(tokenizer_from).glob("tokenizer*") if tokenizer_from else []:
        shutil.copy(f, out / f.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratio", type=float, default=0.25)
    ap.add_argument("--tokenizer-from", default=None, help="a model dir whose tokenizer the config-only dirs get")
    ap.add_argument("--work", default="/tmp/prune8b")
    ap.add_argument("--jsonl", default=str(Path(__file__).parent / "results" / "prune_structured_gpu.jsonl"))
    args = ap.parse_args()
    args.cmd = "prune-structured-speed"
    from eval.speed.workload import speedups, workload_speed

    shape = pruned_shape(args.ratio, args.ratio)
    dirs = {"dense": model_dir(Path(args.work) / "dense", LLAMA_8B, args.tokenizer_from),
            "pruned": model_dir(Path(args.work) / "pruned", {**LLAMA_8B, **shape}, args.tokenizer_from)}
    res = {}
    for name, d in dirs.items():
        if args.engine == "vllm":
            from eval.engines.vllm import VLLMEngine

            eng = VLLMEngine.load(d, dtype="bfloat16", device="cuda", max_model_len=1024, load_format="dummy")
        else:
            from eval.engines.hf import HFEngine
            from gpu_common import random_llama
            from transformers import LlamaConfig

            import torch

            m = random_llama(LlamaConfig.from_pretrained(d), "cuda").to("cuda", torch.bfloat16)
            eng = HFEngine(m, None, "cuda", decode="cuda_graph")
        try:
            res[name] = workload_speed(eng, num_prompts=args.prompts, input_len=args.input_len,
                                       output_len=args.output_len, batch1_requests=4, warmup=1, repeats=args.repeats)
        finally:
            eng.close()
        print(name, json.dumps({k: res[name]["concurrent"]["output_tok_s"]["median"] for k in ["concurrent"]}))
    sp = speedups(res["dense"], res["pruned"])
    print(json.dumps({"shape": shape, **{k: v for k, v in sp.items()}}, indent=1))
    record(args, {"engine": args.engine, "shape": shape, "workload": [args.prompts, args.input_len, args.output_len],
                  "dense": {k: res["dense"][k]["output_tok_s"] | {"tpot_ms": res["dense"][k]["tpot_mean_ms"]}
                            for k in ("concurrent", "batch1")},
                  "pruned": {k: res["pruned"][k]["output_tok_s"] | {"tpot_ms": res["pruned"][k]["tpot_mean_ms"]}
                             for k in ("concurrent", "batch1")},
                  "throughput_speedup": sp.get("throughput"), "batch1_tpot_speedup": sp.get("batch1_tpot")})


if __name__ == "__main__":
    main()
