"""vLLM speed of a mixture-of-experts model at the Qwen3-30B-A3B shape: bf16 against our
W4A16 (GPTQ) and FP8-dynamic artifacts, measured in one run on one GPU.

Why dummy weights: the full shape is 61 GB in bf16; writing it and its two artifacts would
not fit the GPU host's 64 GB disk, and speed does not depend on weight values. So the
quantization configs are exactly those our stages write: a one-layer model of the shape is
quantized by the `gptq` stage (W4A16, group 128, calibrate_all_experts) and by the `fp8`
stage (dynamic), both exported as compressed-tensors as a recipe does; their config.json is
then set to 48 layers and vLLM builds the whole model from it with `load_format="dummy"`
(random values of the right dtypes and shapes, then each quantization method's own
post-load repacking). The one-layer GPTQ artifact is also loaded with its real weights and
generates (`--check-real`): proof that vLLM reads our per-expert layout.

Workload (each model in its own process, one after another, same GPU): throughput = 512
prompts of 512 random token ids, 128 output tokens each (EOS ignored), all submitted at once
(`LLM.generate`), output tokens / wall time, median of `--repeats` after one warm-up;
batch-1 TPOT = (t(128 tokens) - t(1 token)) / 127 for one 512-token prompt, median of 5
(fresh prompts every time, so the prefix cache serves none). The engine's KV capacity and
the MoE/linear kernel lines vLLM logs are kept with each record.

  python3 benchmarks/moe_vllm_speed.py --out $OUT/moe_vllm.jsonl      # on the GPU host
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

CAPTURE = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]  # CUDA graphs for these batch sizes only: a start in minutes, not ten
LOG_KEEP = re.compile(r"(kernel|Marlin|Cutlass|CUTLASS|MoE|moe|Using|KV cache size|Maximum concurrency|"
                      r"Error|error|Traceback)")


# ---- the artifacts' configs -----------------------------------------------------------------

def shape_args(layers: int, smoke: bool = False) -> argparse.Namespace:
    """The Qwen3-30B-A3B shape, as benchmarks/moe_gpu.py builds it (`smoke`: a tiny one, for a CPU check)."""
    if smoke:
        return argparse.Namespace(layers=layers, experts=8, top_k=2, hidden=256, inter=128, heads=4, kv_heads=2,
                                  head_dim=64, vocab=151936)
    return argparse.Namespace(layers=layers, experts=128, top_k=8, hidden=2048, inter=768, heads=32, kv_heads=4,
                              head_dim=128, vocab=151936)


def prepare(work: Path, layers: int, device: str, smoke: bool = False) -> dict[str, Path]:
    """bf16, w4a16 and fp8 model directories whose config.json names `layers` layers; the
    quantized ones exported by our stages from a one-layer model (see the module docstring)."""
    from moe_gpu import RandomTokens, build

    from compress import moe
    from compress.export.compressed_tensors import save_compressed
    from compress.registry import get

    dirs = {}
    stages = {"w4a16": ("gptq", {"bits": 4, "group_size": 128, "calibration": {
        "n_samples": 16, "seq_len": 512, "batch_size": 4, "calibrate_all_experts": True}}),
              "fp8": ("fp8", {"activations": "dynamic"})}
    for name, (stage_name, raw) in stages.items():
        model = build(shape_args(1, smoke), linear=False)
        moe.linearize(model)
        stage = get(stage_name)
        ctx = RandomTokens(device=device, seed=0, tokenizer=151936, progress=False)
        t0 = time.perf_counter()
        model, info = stage.apply(model, stage.config.model_validate(raw), ctx)
        print(f"{name}: {stage_name} on one layer in {time.perf_counter() - t0:.1f} s, "
              f"{info.get('quantized_modules')} modules", flush=True)
        one = work / f"{name}-1layer"
        save_compressed(model, one)
        dirs[f"{name}-1layer"] = one
        dirs[name] = with_layers(one, work / name, layers)
        del model
    base = build(shape_args(1, smoke), linear=False)
    base.config.save_pretrained(work / "bf16-1layer")
    dirs["bf16"] = with_layers(work / "bf16-1layer", work / "bf16", layers)
    return dirs


def with_layers(src: Path, dst: Path, layers: int) -> Path:
    """A directory holding only `src`'s config.json with `layers` layers (dummy weights need no files)."""
    dst.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    cfg["architectures"] = cfg.get("architectures") or ["Qwen3MoeForCausalLM"]  # a bare config has none
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


# ---- one engine, in its own process ---------------------------------------------------------

def child(model_dir: str, dummy: bool, prompts_n: int, input_len: int, output_len: int, repeats: int,
          eager: bool) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=model_dir, load_format="dummy" if dummy else "auto", skip_tokenizer_init=True,
              max_model_len=1024, gpu_memory_utilization=0.9, seed=0, enforce_eager=eager,
              compilation_config={"cudagraph_capture_sizes": CAPTURE})
    start_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(0)

    def prompts(n: int) -> list:
        return [TokensPrompt(prompt_token_ids=p) for p in torch.randint(10, 150000, (n, input_len), generator=g).tolist()]

    def sp(n: int) -> SamplingParams:
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)

    def timed(ps, n) -> tuple[float, int]:
        t = time.perf_counter()
        outs = llm.generate(ps, sp(n), use_tqdm=False)
        return time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs)

    if not dummy:  # a load check: a few tokens from the real weights
        _, n = timed(prompts(2), 8)
        return {"start_s": round(start_s, 1), "generated_tokens": n}
    timed(prompts(64), output_len)  # warm-up
    tput = []
    for _ in range(repeats):
        s, n = timed(prompts(prompts_n), output_len)
        tput.append(n / s)
    one, full = [], []
    for _ in range(5):
        one.append(timed(prompts(1), 1)[0])
        full.append(timed(prompts(1), output_len)[0])
    tpot = (statistics.median(full) - statistics.median(one)) / (output_len - 1)
    return {"start_s": round(start_s, 1), "output_tok_s": round(statistics.median(tput), 1),
            "output_tok_s_runs": [round(x, 1) for x in tput], "batch1_tpot_ms": round(tpot * 1e3, 3),
            "batch1_ttft_ms": round(statistics.median(one) * 1e3, 2)}


def run_child(name: str, model_dir: Path, args, dummy: bool, log_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--prompts", str(args.prompts), "--input-len",
           str(args.input_len), "--output-len", str(args.output_len), "--repeats", str(args.repeats)]
    if not dummy:
        cmd += ["--real", "--eager"]
    t0 = time.perf_counter()
    log_path = log_dir / f"vllm_{name}.log"
    with log_path.open("w") as f:  # streamed: a child that times out leaves its log
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=args.child_timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    log = log_path.read_text(errors="replace")
    rec = {"model": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1),
           "log": [ln[-300:] for ln in log.splitlines() if LOG_KEEP.search(ln)][-25:]}
    m = re.findall(r"GPU KV cache size: ([\d,]+) tokens", log)
    if m:
        rec["kv_cache_tokens"] = int(m[-1].replace(",", ""))
    res = [ln for ln in log.splitlines() if ln.startswith("RESULT ")]
    if res:
        rec.update(json.loads(res[-1][7:]))
    return rec


def versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for d in ("vllm", "transformers", "compressed-tensors"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--models", default="bf16,w4a16,fp8")
    ap.add_argument("--check-real", action="store_true", help="also load the one-layer GPTQ artifact's real weights")
    ap.add_argument("--child-timeout", type=int, default=240)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe_vllm"))
    ap.add_argument("--out", type=Path, required=False)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU (checks the script, not speed)")
    ap.add_argument("--child")
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--eager", action="store_true")
    args = ap.parse_args()
    if args.child:
        r = child(args.child, not args.real, args.prompts, args.input_len, args.output_len, args.repeats, args.eager)
        print("RESULT " + json.dumps(r), flush=True)
        return
    out = args.out or Path(os.environ.get("OUT", "/tmp/out")) / "moe_vllm.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dirs = prepare(args.work, args.layers, "cpu" if args.smoke else "cuda", args.smoke)
    print(f"configs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    common = {"bench": "moe_vllm_speed", "shape": "Qwen3-30B-A3B" if args.layers == 48 else f"{args.layers} layers",
              "layers": args.layers, "workload": f"{args.prompts} x {args.input_len} in / {args.output_len} out",
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(), "versions": versions(), "weights": "dummy (random)",
              "command": "python3 " + " ".join(sys.argv[1:] and [__file__, *sys.argv[1:]] or [__file__]),
              "date": time.strftime("%F")}
    recs = {}
    for name in args.models.split(","):
        rec = {**common, **run_child(name, dirs[name], args, True, out.parent)}
        recs[name] = rec
        if name != "bf16" and "bf16" in recs and "output_tok_s" in rec and "output_tok_s" in recs["bf16"]:
            b = recs["bf16"]
            rec["throughput_vs_bf16"] = round(rec["output_tok_s"] / b["output_tok_s"], 3)
            rec["batch1_tpot_vs_bf16"] = round(rec["batch1_tpot_ms"] / b["batch1_tpot_ms"], 3)
        print(json.dumps({k: v for k, v in rec.items() if k != "log"}), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")
    if args.check_real:
        rec = {**common, "weights": "real (one layer)", **run_child("w4a16-1layer", dirs["w4a16-1layer"], args, False,
                                                                   out.parent)}
        print(json.dumps({k: v for k, v in rec.items() if k != "log"}), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
