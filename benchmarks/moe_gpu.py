"""GPTQ on a mixture-of-experts model at real scale, on one GPU: time, peak GPU memory, coverage.

The model is the Qwen3-30B-A3B shape (48 layers, 128 experts of width 768, 8 active, hidden
2,048, 32 heads / 4 KV heads of 128) with random bf16 weights in host memory (about 61 GB;
the cost of GPTQ does not depend on the weight values), calibrated on random token ids
(128 × 2,048 by default) through the gptq stage exactly as a recipe runs it: experts
linearized, every token through every expert for statistics (`calibrate_all_experts`),
the experts of each layer solved as one batch. Prints one JSON record and appends it to
--out (JSONL) with the GPU, versions and command.

  python3 benchmarks/moe_gpu.py --out $OUT/moe_gpu.jsonl            # the full shape (the target)
  python3 benchmarks/moe_gpu.py --layers 2 --experts 16 --samples 8  # a smoke run (CPU or GPU)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress import coverage, moe  # noqa: E402
from compress.registry import get  # noqa: E402
from compress.stage import StageContext  # noqa: E402


class RandomTokens(StageContext):
    """A stage context whose calibration data are random token ids (no tokenizer)."""

    def calibration(self, cfg) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, self.tokenizer, (cfg.n_samples, cfg.seq_len), generator=g)


def build(args, linear: bool) -> torch.nn.Module:
    """The model with random weights, filled from one random bank (fast: memory copies, not RNG).
    `linear`: its experts linearized before the weights are allocated (one copy of 61 GB, not two)."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
                         moe_intermediate_size=args.inter, num_experts=args.experts,
                         num_experts_per_tok=args.top_k, intermediate_size=6144, max_position_embeddings=4096,
                         tie_word_embeddings=False, norm_topk_prob=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    if linear:
        moe.linearize(model)
    model = model.to_empty(device="cpu")
    for _, m in moe.linear_experts(model):
        m.reset_counts()
    g = torch.Generator().manual_seed(0)
    bank = (torch.randn(1 << 26, generator=g) * 0.02).to(torch.bfloat16)
    off = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for s in range(0, flat.numel(), bank.numel()):
                n = min(bank.numel(), flat.numel() - s)
                start = (off * 7919) % (bank.numel() - n + 1)
                flat[s:s + n].copy_(bank[start:start + n])
                off += 1
    model.model.rotary_emb = type(model.model.rotary_emb)(cfg)  # its tables, left empty by to_empty
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768, help="expert width")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="calibration windows per forward pass")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--routed-only", action="store_true", help="without calibrate_all_experts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--linearize-real", action="store_true", help="build the fused model and time the "
                    "linearization of its real weights (as a recipe does); default: linearized before allocation")
    ap.add_argument("--out", type=Path, help="append the record to this JSONL file")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = build(args, linear=not args.linearize_real)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    stage = get("gptq")
    cfg = stage.config.model_validate({"bits": 4, "group_size": args.group, "calibration": {
        "n_samples": args.samples, "seq_len": args.seq, "batch_size": args.batch,
        "calibrate_all_experts": not args.routed_only}})
    ctx = RandomTokens(device=args.device, seed=0, tokenizer=args.vocab, progress=True)  # per-layer bar on stderr
    t0 = time.perf_counter()
    moe.linearize(model)
    lin_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    before = coverage.fingerprint(model)
    fp_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, info = stage.apply(model, cfg, ctx)
    stage_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cov = coverage.coverage(before, model)
    cov_s = time.perf_counter() - t0
    import transformers

    rec = {"bench": "moe_gptq", "shape": "Qwen3-30B-A3B" if args.layers == 48 and args.experts == 128 else "custom",
           "params_b": round(n_params / 1e9, 3), "layers": args.layers, "experts": args.experts, "top_k": args.top_k,
           "calibration": f"{args.samples} x {args.seq}", "batch": args.batch, "group_size": args.group,
           "calibrate_all_experts": not args.routed_only, "gptq_seconds": round(stage_s, 1),
           "build_seconds": round(build_s, 1), "linearize_seconds": round(lin_s, 1) if args.linearize_real else None,
           "fingerprint_seconds": round(fp_s, 1),
           "coverage_seconds": round(cov_s, 1), "peak_gpu_gib": info.get("peak_gpu_gib"),
           "capture_seconds": info["capture_seconds"], "mean_layer_seconds":
               round(sum(info["layer_seconds"]) / len(info["layer_seconds"]), 2),
           "quantized_modules": info["quantized_modules"], "fallback_modules": info["fallback_modules"],
           "coverage": cov, "memory": info["memory"],
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "cuda": torch.version.cuda, "python": platform.python_version()},
           "command": "python3 " + " ".join(sys.argv), "date": time.strftime("%F")}
    print(json.dumps(rec))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
