"""GPU benchmarks for the weight-only quantizers.

    python3 benchmarks/quant_gpu.py gptq8b  --out DIR [--cap-gib 12] [--tiny]
    python3 benchmarks/quant_gpu.py layouts --src DIR --out DIR [--tiny]
    python3 benchmarks/quant_gpu.py speed   DIR[:dummy][=LABEL]... [--tiny]
    python3 benchmarks/quant_gpu.py smollm2 --gguf FILE

gptq8b: a Llama-3.1-8B-shaped model with random bf16 weights (hidden 4096, 32 layers, 32
  heads, 8 KV heads, MLP 14336, vocab 128256) is built in host memory; GPTQ W4A16 (group 128,
  symmetric, actorder 'weight') runs on it through the `gptq` stage with 128 × 2048 random
  calibration tokens while the process may use at most --cap-gib of GPU memory (below the
  model's 16 GB: the larger-than-GPU case); then the compressed-tensors artifact is written.
  Records seconds, peak GPU memory and where the activations lived.
layouts: config-only directories (vLLM load_format=dummy) for the bf16 model and other
  weight layouts (asymmetric, per channel, 8-bit), and a copy of the real artifact with a
  valid act-order g_idx (activation order 'group'), for the kernel/speed sweep.
speed: benchmarks/vllm_speed.py for each model in a fresh process; records throughput,
  batch-1 TTFT/TPOT, and the kernel vLLM chose (from its log).
smollm2: RTN and GPTQ W4A16 on SmolLM2 on the GPU, perplexity on transformers and vLLM.
Every record is one JSON line on stdout and in --jsonl (default $OUT/quant_gpu.jsonl), with
the GPU name and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_common import ROOT, add_common_args, bench_context, cap_gpu_memory, llama_config, random_llama, record


def cmd_selfcheck(args) -> None:
    """GPTQ through CUDA-graph replay gives the plain loop's result; both timed."""
    from compress.quant.cuda_graph import GraphRunner
    from compress.quant.gptq_solver import gptq_quantize, solve_block
    from compress.quant.grid import Grid

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    out, n = (6144, 4096) if not args.tiny else (64, 256)
    x = torch.randn(8192, n, generator=g, device=dev)
    h = 2 * x.T @ x / 8192
    w = 0.02 * torch.randn(out, n, generator=g, device=dev)
    res = {}
    for name, fn in (("graph", GraphRunner(solve_block)), ("eager", solve_block)):
        for actorder in ("weight", "group"):
            grid = Grid(4, True, 128, torch.bfloat16)
            gptq_quantize(w, h, grid, actorder=actorder, block_fn=fn)  # warm-up / capture
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            r = gptq_quantize(w, h, grid, actorder=actorder, block_fn=fn)
            torch.cuda.synchronize()
            res[(name, actorder)] = (r, time.perf_counter() - t0)
    same = {a: bool(torch.equal(res[("graph", a)][0].q, res[("eager", a)][0].q)) for a in ("weight", "group")}
    record(args, {"what": "gptq cuda-graph selfcheck", "shape": [out, n], "identical_q": same,
                  "seconds": {f"{k[0]}-{k[1]}": round(v[1], 3) for k, v in res.items()}})


def cmd_gptq8b(args) -> None:
    from compress import registry
    from squeeze.pipeline import save_model

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = llama_config(args.tiny)
    t0 = time.perf_counter()
    model = random_llama(cfg, dev)
    build_s = time.perf_counter() - t0
    model_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    if dev == "cuda":
        cap_gpu_memory(args.cap_gib)
    n, seq = (8, 64) if args.tiny else (args.samples, args.seq_len)

    stage = registry.get("gptq")
    scfg = stage.config.model_validate({"bits": 4, "group_size": 128, "symmetric": True, "actorder": args.actorder,
                                        "calibration": {"n_samples": n, "seq_len": seq}})
    ctx = bench_context(dev, cfg.vocab_size, n, seq)
    t0 = time.perf_counter()
    model, info = stage.apply(model, scfg, ctx)
    gptq_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    class NoTok:
        def save_pretrained(self, d):
            pass

    if not args.no_save:
        save_model(model, NoTok(), out)
    save_s = time.perf_counter() - t0
    record(args, {"what": "gptq W4A16 g128 sym actorder=" + str(args.actorder), "model": "tiny" if args.tiny
                  else "llama-3.1-8b-shape random bf16", "model_gb": round(model_gb, 2),
                  "calibration": f"{n} x {seq} random tokens", "gpu_cap_gib": args.cap_gib,
                  "gptq_seconds": round(gptq_s, 1), "save_seconds": round(save_s, 1),
                  "build_seconds": round(build_s, 1), "peak_gpu_gib": info.get("peak_gpu_gib"),
                  "memory": info["memory"], "capture_seconds": info["capture_seconds"],
                  "layer_seconds_median": sorted(info["layer_seconds"])[len(info["layer_seconds"]) // 2],
                  "mean_output_rel_error": info["mean_output_rel_error"], "artifact": str(out),
                  "artifact_gb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 2),
                  "layer_seconds": info["layer_seconds"]})


def _ct_config(bits: int, group: int, symmetric: bool, actorder=None) -> dict:
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "config_groups": {"group_0": {
                "targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
                "weights": {"num_bits": bits, "type": "int", "symmetric": symmetric,
                            "strategy": "channel" if group == -1 else "group",
                            "group_size": None if group == -1 else group, "actorder": actorder, "dynamic": False}}}}


def cmd_layouts(args) -> None:
    """Config-only directories for dummy-weight runs, and the real artifact with a g_idx."""
    from safetensors.torch import load_file, save_file

    out = Path(args.out)
    cfg = llama_config(args.tiny)
    layouts = {"bf16": None, "w4-g128-asym": _ct_config(4, 128, False), "w4-ch-sym": _ct_config(4, -1, True),
               "w8-ch-sym": _ct_config(8, -1, True), "w8-g128-sym": _ct_config(8, 128, True),
               "w4-g128-sym": _ct_config(4, 128, True)}
    for name, q in layouts.items():
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        c = cfg.to_dict()
        if q:
            c["quantization_config"] = q
        (d / "config.json").write_text(json.dumps(c, indent=1))
    if args.src is None:
        return record(args, {"what": "layout configs written", "dirs": sorted(p.name for p in out.iterdir())})
    # act-order 'group': the real artifact plus a valid g_idx per module (a random permutation
    # of group ids, each group exactly 128 columns), as GPTQ with actorder 'group' writes it
    src, d = Path(args.src), out / "w4-g128-sym-actorder-group"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for f in sorted(src.glob("*.safetensors")):
        sd = load_file(f)
        for k in [k for k in sd if k.endswith(".weight_packed")]:
            cols = int(sd[k.replace("weight_packed", "weight_shape")][1])
            sd[k.replace("weight_packed", "weight_g_idx")] = (torch.randperm(cols, generator=g) // 128).int()
        save_file(sd, d / f.name, metadata={"format": "pt"})
    for f in src.glob("*.json"):
        (d / f.name).write_text(f.read_text())
    c = json.loads((d / "config.json").read_text())
    for grp in c["quantization_config"]["config_groups"].values():
        grp["weights"]["actorder"] = "group"
    (d / "config.json").write_text(json.dumps(c, indent=1))
    record(args, {"what": "layouts written", "dirs": sorted(p.name for p in out.iterdir())})


def cmd_speed(args) -> None:
    """Each DIR[:dummy|:bnb][=LABEL[+KEY=VALUE...]] in a fresh process (benchmarks/vllm_speed.py);
    +KEY=VALUE are more engine arguments (e.g. +kv_cache_dtype=fp8, +linear_backend=marlin)."""
    for spec in args.models:
        spec, _, label = spec.partition("=")
        label, *eargs = label.split("+")
        path, _, mode = spec.partition(":")
        extra = ["--prompts", "16", "--input-len", "64", "--output-len", "16", "--max-model-len", "256"] if args.tiny \
            else [f"--{k.replace('_', '-')}={v}" for k, v in (getattr(args, "workload", None) or {}).items()]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "vllm_speed.py"), path, "--label", label or Path(path).name,
               *(["--dummy"] if mode == "dummy" else []), *(["--quantization", "bitsandbytes"] if mode == "bnb" else []),
               "--tput-repeats", str(getattr(args, "tput_repeats", 1)), *extra,
               *[f"--engine-arg={e}" for e in eargs]]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            log, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:  # keep what it logged: where the time went is the result
            out = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (e.stdout, e.stderr)]
            log, rc = "".join(out) + f"\ntimed out after {args.timeout} s (error)", "timeout"
        Path(os.environ.get("OUT", "/tmp")).joinpath(f"vllm_{label or Path(path).name}.log").write_text(log[-200000:])
        kernels = sorted(set(re.findall(r"Using (\w+Kernel) for (\w+)", log)))
        res = next((json.loads(ln[7:]) for ln in log.splitlines() if ln.startswith("RESULT ")), None)
        if res is None:
            tail = [ln for ln in log.splitlines() if "Error" in ln or "error" in ln][-5:]
            record(args, {"what": "vllm speed", "label": label, "model": path, "failed": True, "rc": rc,
                          "error_tail": tail, "seconds": round(time.perf_counter() - t0, 1)})
            continue
        other = sorted({ln.split("] ", 1)[-1][:160] for ln in log.splitlines()
                        if re.search(r"(?i)(deep_?gemm|cutlass|marlin|machete|fp8 kv|kv cache dtype)", ln)
                        and "Kernel for" not in ln})[:12]
        record(args, {"what": "vllm speed", **res, "kernels": [f"{k} for {s}" for k, s in kernels],
                      "kernel_log_lines": other,
                      "seconds": round(time.perf_counter() - t0, 1)})


def cmd_smollm2(args) -> None:
    """RTN vs GPTQ on SmolLM2 on the GPU, measured on both engines (fidelity on vLLM 0.26)."""
    from compress.models import import_gguf
    from squeeze.pipeline import run
    from squeeze.recipe import load_recipe

    os.environ.setdefault("SQUEEZE_HOME", "/tmp/squeeze-home")
    base = import_gguf(Path(args.gguf), Path(os.environ["SQUEEZE_HOME"]) / "_models" / "SmolLM2-135M-Instruct")
    for name in ("w4a16-rtn", "w4a16-gptq"):
        r = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        ev = r.eval.model_copy(update={"vllm": r.eval.vllm.model_copy(update={"enforce_eager": True})})
        r = r.model_copy(update={"model": r.model.model_copy(update={"source": str(base)}), "eval": ev})
        t0 = time.perf_counter()
        rep = run(r, force=True)
        b, a = rep["baseline"], rep["artifacts"][0]
        record(args, {"what": f"smollm2 {name}", "seconds": round(time.perf_counter() - t0, 1),
                      "stage_seconds": a["stage_info"].get("seconds"),
                      "perplexity": {e: {"baseline": b["engines"][e]["perplexity"]["perplexity"],
                                         "artifact": a["engines"][e]["perplexity"]["perplexity"]}
                                     for e in a["engines"]},
                      "settings": {e: a["engines"][e]["settings"] for e in a["engines"]}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("selfcheck")
    p = sub.add_parser("gptq8b")
    p.add_argument("--out", required=True)
    p.add_argument("--cap-gib", type=float, default=12.0)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--actorder", default="weight")
    p.add_argument("--no-save", action="store_true", help="skip writing the artifact")
    p = sub.add_parser("layouts")
    p.add_argument("--src", help="the real W4A16 g128 artifact (for the act-order copy); omit: configs only")
    p.add_argument("--out", required=True)
    p = sub.add_parser("speed")
    p.add_argument("models", nargs="+")
    p.add_argument("--timeout", type=int, default=400)
    p = sub.add_parser("smollm2")
    p.add_argument("--gguf", required=True)
    add_common_args(sub)
    args = ap.parse_args()
    {"selfcheck": cmd_selfcheck, "gptq8b": cmd_gptq8b, "layouts": cmd_layouts, "speed": cmd_speed, "smollm2": cmd_smollm2}[args.cmd](args)


if __name__ == "__main__":
    main()
