"""Distillation figures on a GPU machine: recovery, efficiency and scaling.

    python3 benchmarks/distill_gpu.py recovery [--tokens 20e6] [--processes 1] [--seq-len 1024] [--batch 32]
    python3 benchmarks/distill_gpu.py scale [--tokens 2e6]        (needs 2 GPUs: 1 process, then 2)
    python3 benchmarks/distill_gpu.py recovery --compile   (the stage's torch.compile option)
    python3 benchmarks/distill_gpu.py profile [--compile]     (torch.profiler: where a step's time goes)
CPU smoke run (minutes; checks the plumbing, not the figures):
    python3 benchmarks/distill_gpu.py recovery --device cpu --tokens 8192 --seq-len 128 --batch 4 \
        --calib-samples 4 --ppl-tokens 2048 --piqa-limit 20 --jsonl /tmp/d.jsonl

recovery: one matrix recipe through `squeeze run` on SmolLM2-135M-Instruct: 25 % of the MLP
channels cut (activation importance, shared by both variants), then the same token budget of
training in two ways: distillation from the unpruned model (forward KL + 0.1 CE) and plain
cross-entropy on the data (the control). The evaluator scores the baseline, the pruned model
(an empty variant) and both students: WikiText-2 perplexity (the evaluator's protocol) and
PIQA. Recovery = (ppl_pruned - ppl_student) / (ppl_pruned - ppl_dense); goal >= 0.5 and KD
better than CE. Tokens/s and model-FLOPs utilization come from the distill stage's info.
scale: the same student (25 % of the MLP cut, magnitude importance: no calibration) distilled
for a short budget on 1 process, then on 2 (torch's launcher, DDP through accelerate), each
eager and with `compile: true`: tokens/s ratios (goal >= 1.8x) and MFU (goal >= 25 %).
One JSONL record per command in results/distill_gpu.jsonl (GPU name, versions, command).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from gpu_common import ROOT, record  # noqa: F401 - ROOT puts the repo on sys.path

DATA = ["wikitext2-valid", "tinyshakespeare", "gsm8k"]
PRUNE_FAST = {"type": "prune_mlp", "ratio": 0.25, "importance": "magnitude"}  # the scale runs' student, no calibration


def distill_stage(args, **over) -> dict:
    steps = max(1, round(float(args.tokens) / (args.batch * args.seq_len)))
    st = {"type": "distill", "teacher": "base", "student": "input", "steps": steps, "batch_size": args.batch,
          "lr": args.lr, "warmup_steps": max(1, steps // 20), "eval_every": max(1, steps // 5),
          "save_every": max(1, steps // 5), "processes": args.processes,
          "loss": {"kd": 1.0, "kind": "forward", "ce": 0.1, "chunk": args.loss_chunk}, "compile": args.compile,
          "data": {"datasets": DATA, "seq_len": args.seq_len, "eval_blocks": 16}}
    for k, v in over.items():
        st[k] = {**st[k], **v} if isinstance(v, dict) else v
    return st


def run_recipe(recipe: dict, path: Path, fresh: bool = False) -> Path:
    """`squeeze run` on the recipe; fresh: an earlier run of the same name (another batch on the
    same host) is replaced, not refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc = subprocess.call([sys.executable, "-m", "squeeze.cli", "run", str(path)] + ["--force"] * fresh, cwd=ROOT)
    run_dir = Path(os.environ.get("SQUEEZE_HOME", ROOT / "checkpoints")) / recipe["name"]
    if rc not in (0, 1):  # 1: a gate failed, the figures are still written
        raise SystemExit(f"squeeze run {path} failed (exit {rc})")
    return run_dir


def stage_infos(run_dir: Path) -> dict:
    out = {}
    for d in sorted((run_dir / "stages").glob("*-distill")):
        j = json.loads((d / "stage.json").read_text())
        out[d.name] = j["info"]
    return out


def cmd_recovery(args) -> None:
    prune = {"type": "prune_mlp", "ratio": 0.25, "importance": "activation",
             "calibration": {"dataset": "wikitext2-valid", "n_samples": args.calib_samples, "seq_len": 1024}}
    piqa = {"name": "piqa", **({"limit": args.piqa_limit} if args.piqa_limit else {})}
    recipe = {"name": "distill-recovery", "model": {"source": "smollm2", "dtype": "float32"}, "seed": 0,
              "device": args.device,  # the prune stage is every variant's first; the matrix runs it once and shares it
              "matrix": {"axes": {"train": {"pruned": [prune], "kd": [prune, distill_stage(args)],
                                            "ce": [prune, distill_stage(args, loss={"kd": 0.0, "ce": 1.0})]}}},
              "eval": {"engines": ["hf"], "perplexity": {"dataset": "wikitext2", "context_length": 1024,
                                                         "max_tokens": args.ppl_tokens},
                       "tasks": [piqa],
                       "speed": None}}
    run_dir = run_recipe(recipe, Path(args.work) / "distill-recovery.yaml")
    rep = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").is_file() else {}
    record(args, {"recipe": recipe, "run_dir": str(run_dir), "report": rep, "distill_stages": stage_infos(run_dir)})
    print((run_dir / "report.md").read_text() if (run_dir / "report.md").is_file() else "no report.md")
    print(json.dumps(stage_infos(run_dir), indent=1, default=str)[:4000])


def cmd_scale(args) -> None:
    res: dict[str, dict] = {}
    try:
        for key in args.runs.split(","):
            n, flags = int(key.split("-")[0]), set(key.split("-")[1:])
            st = distill_stage(args, processes=n, compile="compiled" in flags, eval_every=0, save_every=0,
                               sharding="fsdp" if "fsdp" in flags else "ddp")
            recipe = {"name": f"distill-scale-{key}", "model": {"source": "smollm2", "dtype": "float32"}, "seed": 0,
                      "device": args.device, "stages": [PRUNE_FAST, st],
                      "eval": {"engines": ["hf"], "perplexity": {"max_tokens": 4096}, "speed": None}}
            run_dir = run_recipe(recipe, Path(args.work) / f"distill-scale-{key}.yaml", fresh=True)
            res[key] = next(iter(stage_infos(run_dir).values()))
            print(key, res[key]["tokens_per_s"], res[key].get("mfu"), flush=True)
    finally:  # what was measured before a deadline is still recorded
        keep = ("tokens_per_s", "mfu", "mfu_linear_layers_only", "seconds", "seconds_first_step", "processes", "sharding", "steps",
                "tokens_per_step", "flops_per_token")
        ratio = {c: res[f"2{c}"]["tokens_per_s"] / res[f"1{c}"]["tokens_per_s"]
                 for c in ("", "-compiled") if f"1{c}" in res and f"2{c}" in res}
        if "1" in res and "2-fsdp" in res:
            ratio["-fsdp"] = res["2-fsdp"]["tokens_per_s"] / res["1"]["tokens_per_s"]
        print("2 processes / 1:", ratio)
        if res:
            record(args, {"student": "SmolLM2-135M, 25 % of MLP channels cut (magnitude)", "loss": "forward KL + 0.1 CE",
                          "batch": [args.batch, args.seq_len], "loss_chunk": args.loss_chunk,
                          "runs": {k: {f: v.get(f) for f in keep} for k, v in res.items()},
                          "speedup_eager": ratio.get(""), "speedup_compiled": ratio.get("-compiled"),
                          "speedup_fsdp": ratio.get("-fsdp")})


def cmd_profile(args) -> None:
    """torch.profiler over a few steps of the scale run's student, in this process: the kernels
    that take the GPU's time (top rows by device time) and the wall time per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from compress import distill as D
    from compress.models import load_model, load_tokenizer, resolve_model
    from compress.prune.structured import MLPCutConfig, apply_mlp
    from compress.stage import StageContext

    src = resolve_model("smollm2")
    tok = load_tokenizer(src)
    ctx = StageContext(device=args.device, seed=0, tokenizer=tok, model_dir=src, base_dir=src, work_dir=None,
                       progress=False)
    student, _ = apply_mlp(load_model(src)[0], MLPCutConfig(ratio=0.25, importance="magnitude"), ctx)
    st = distill_stage(args, compile=args.compile, eval_every=0, save_every=0, steps=args.warm + args.active + 2)
    st.pop("type")
    cfg = D.DistillConfig.model_validate(st)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
    # the first step (and the set-up before it) waits, the last one (and the final perplexity) is left out
    prof = profile(activities=acts, schedule=schedule(wait=1, warmup=args.warm, active=args.active, repeat=1))
    stamps = {}

    def on_step(step):  # after every optimizer step
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps[step] = time.perf_counter()
        prof.step()

    with prof:
        _, info = D.train_student(student, load_model(src)[0], cfg, tok, 0, args.device, None, progress=True,
                                  on_step=on_step)
    sort = "cuda_time_total" if args.device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=70)
    print(table)
    first = 1 + args.warm
    wall = stamps[first + args.active] - stamps[first]
    print(f"profiled {args.active} steps: {wall / args.active * 1e3:.1f} ms per step of wall time (the table's "
          f"'Self CUDA time total' over {args.active}: the device's busy time)")
    print({k: info.get(k) for k in ("tokens_per_s", "mfu", "mfu_linear_layers_only", "tokens_per_step")})
    out = Path(os.environ.get("OUT", args.work))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"distill-profile{'-compiled' if args.compile else ''}.txt").write_text(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("recovery", "scale", "profile"):
        p = sub.add_parser(name)
        p.add_argument("--tokens", type=float, default=20e6 if name == "recovery" else 2e6)
        p.add_argument("--seq-len", type=int, default=1024)
        p.add_argument("--batch", type=int, default=32)
        p.add_argument("--lr", type=float, default=2e-4)
        p.add_argument("--processes", type=int, default=1)
        p.add_argument("--compile", action="store_true", help="recovery: the distill stage's compile option")
        p.add_argument("--loss-chunk", type=int, default=1024, help="the distill stage's loss.chunk (positions)")
        if name == "scale":
            p.add_argument("--runs", default="1,1-compiled,2,2-compiled",
                           help="processes, then -compiled for compile: true, -fsdp for sharding: fsdp")
        if name == "profile":
            p.add_argument("--warm", type=int, default=3, help="steps before the profiled ones (compiling)")
            p.add_argument("--active", type=int, default=3, help="profiled steps")
            p.add_argument("--rows", type=int, default=30)
        p.add_argument("--work", default="/tmp/distill-bench")
        p.add_argument("--device", default="cuda", help="cuda (the figures) or cpu (a smoke run with a tiny budget)")
        p.add_argument("--calib-samples", type=int, default=128, help="prune stage: calibration windows of 1024")
        p.add_argument("--ppl-tokens", type=int, default=None, help="perplexity: first N tokens (default: all)")
        p.add_argument("--piqa-limit", type=int, default=None, help="PIQA: first N items (default: all 1,838)")
        p.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "results" / "distill_gpu.jsonl"))
    args = ap.parse_args()
    {"recovery": cmd_recovery, "scale": cmd_scale, "profile": cmd_profile}[args.cmd](args)


if __name__ == "__main__":
    main()
