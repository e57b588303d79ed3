"""GPU benchmarks for the calibrated pruners and 2:4 kernels.

    python3 benchmarks/prune_gpu.py cost   --method wanda|sparsegpt [--nm 2:4] [--cap-gib 12] [--tiny]
    python3 benchmarks/prune_gpu.py semi24 [--tiny]

cost: Wanda or SparseGPT at 50 % (or N:M) on a Llama-3.1-8B-shaped model with random bf16
  weights in host memory, 128 x 2048 random calibration tokens, under a cap on the
  process's GPU memory; records seconds, peak GPU memory and where the activations lived.
semi24: the same model on the GPU with every linear layer but lm_head pruned 2:4 (magnitude),
  measured through the HF engine dense and with torch's semi-structured sparse kernels
  (`eval.hf.sparse_kernels`): prefill and decode tok/s at batch 1 and 16, and one 4096 x
  14336 linear at several batch sizes. Records JSONL like quant_gpu.py.
"""

from __future__ import annotations

import argparse
import time

import torch

from gpu_common import add_common_args, bench_context, capped_random_llama, llama_config, random_llama, record


def cmd_cost(args) -> None:
    from compress import registry

    dev, cfg, model = capped_random_llama(args)
    n, seq = (8, 64) if args.tiny else (128, 2048)
    stage = registry.get(args.method)
    pattern = {"nm": args.nm} if args.nm else {"sparsity": 0.5}
    scfg = stage.config.model_validate({**pattern, "calibration": {"n_samples": n, "seq_len": seq}})
    t0 = time.perf_counter()
    model, info = stage.apply(model, scfg, bench_context(dev, cfg.vocab_size, n, seq))
    secs = time.perf_counter() - t0
    record(args, {"what": f"{args.method} {args.nm or '50%'}", "model": "tiny" if args.tiny else
                  "llama-3.1-8b-shape random bf16", "calibration": f"{n} x {seq} random tokens",
                  "gpu_cap_gib": args.cap_gib, "seconds": round(secs, 1), "peak_gpu_gib": info.get("peak_gpu_gib"),
                  "memory": info["memory"], "sparsity_of_pruned": info["sparsity_of_pruned"],
                  "sequential": info["sequential"], "layer_seconds": info["layer_seconds"]})


def _time(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


@torch.no_grad()
def cmd_semi24(args) -> None:
    from torch.sparse import to_sparse_semi_structured

    from compress.prune.masks import nm_mask
    from eval.engines.hf import HFEngine, to_semi_structured_
    from eval.speed.workload import workload_speed

    dev = "cuda"
    # one linear layer, dense vs 2:4, at several numbers of tokens
    g = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(14336, 4096, generator=g, device=dev, dtype=torch.bfloat16)
    w = w * nm_mask(w.abs(), 2, 4).to(w.dtype)
    ws = to_sparse_semi_structured(w)
    layer = {}
    for tokens in (1, 16, 128, 2048):
        x = torch.randn(tokens, 4096, generator=g, device=dev, dtype=torch.bfloat16)
        try:
            d, s = _time(lambda: torch.nn.functional.linear(x, w)), _time(lambda: torch.nn.functional.linear(x, ws))
            layer[tokens] = {"dense_ms": round(d * 1e3, 4), "sparse_ms": round(s * 1e3, 4), "speedup": round(d / s, 3)}
        except RuntimeError as e:
            layer[tokens] = {"error": str(e).splitlines()[0][:200]}
    record(args, {"what": "2:4 linear 14336x4096 bf16", "by_tokens": layer})
    w = ws = None  # free the GPU memory before the model comes

    cfg = llama_config(args.tiny)
    model = random_llama(cfg, dev)
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.weight.mul_(nm_mask(m.weight.to(dev).abs(), 2, 4).to(m.weight.dtype).cpu())
    model = model.to(dev)
    eng = HFEngine(model, None, dev)
    res = {}
    for kind in ("dense", "semi-structured"):
        if kind == "semi-structured":
            t0 = time.perf_counter()
            try:
                res["converted_layers"] = to_semi_structured_(model)
            except RuntimeError as e:
                res["convert_error"] = str(e).splitlines()[0][:300]
                break
            res["convert_seconds"] = round(time.perf_counter() - t0, 1)
        for batch in (1, 16):
            try:
                sp = workload_speed(eng, num_prompts=batch, input_len=128, output_len=32, batch1_requests=0,
                                    warmup=1, repeats=3)["concurrent"]
                res[f"{kind} b{batch}"] = {"output_tok_s": round(sp["output_tok_s"]["median"], 2),
                                           "tpot_ms": round(sp["tpot_mean_ms"]["median"], 3),
                                           "ttft_ms": round(sp["ttft_ms"]["p50"], 3)}
            except RuntimeError as e:
                res[f"{kind} b{batch}"] = {"error": str(e).splitlines()[0][:200]}
    record(args, {"what": "HF engine, 8B shape, every linear but lm_head 2:4", "results": res})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("cost")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument("--nm", default=None)
    p.add_argument("--cap-gib", type=float, default=12.0)
    sub.add_parser("semi24")
    add_common_args(sub)
    args = ap.parse_args()
    {"cost": cmd_cost, "semi24": cmd_semi24}[args.cmd](args)


if __name__ == "__main__":
    main()
