"""`squeeze run --cluster local` against the one-process run of the same recipe, side by side.

    python3 benchmarks/cluster_gpu.py share --gguf FILE [--share 0.25] [--repeats 1] [--work DIR]
    python3 benchmarks/cluster_gpu.py overhead --gguf FILE [--repeats 2] [--work DIR]
    python3 benchmarks/cluster_gpu.py share --gguf FILE --only sequential|cluster   # one side per command
    python3 benchmarks/cluster_gpu.py share --gguf FILE --eager   # engines without compilation, both runs
    python3 benchmarks/cluster_gpu.py share --gguf FILE --kv-bytes 2147483648   # fixed KV caches: starts overlap
    python3 benchmarks/cluster_gpu.py share --tiny        # a dry run on the CPU (tiny random model, hf)
    python3 benchmarks/cluster_gpu.py overhead --cpu      # SmolLM2 on the CPU (hf, perplexity only)
    python3 benchmarks/cluster_gpu.py overhead --cpu --recipe recipes/w8a8-int8-dynamic.yaml   # a shipped recipe

share: the one-GPU target. A 4-variant matrix on SmolLM2-135M-Instruct (imported from the GGUF
  FILE): RTN W8A16 per channel symmetric, RTN W4A16 g128, W8A8 int8 dynamic, FP8 dynamic, each evaluated
  on vLLM (WikiText-2 perplexity, 8,192 tokens; an offline workload of 256 x 128 / 128 and 3
  paired rounds against the baseline). Sequential: `squeeze run RECIPE` (one process, one GPU).
  Cluster: `squeeze run RECIPE --cluster local` with `execution: {eval_gpus: S, stage_gpus: S}`,
  S = --share (0.25: four evaluations share the GPU) and eval.vllm.gpu_memory_utilization S - 0.05
  in both runs (what `execution` allows: squeeze.pipeline.fanout.most_utilization), so both measure
  with the same engine settings. Goal: cluster wall time
  <= 0.5 x sequential.
overhead: one variant (W8A8 int8 dynamic) the same way with whole GPUs (S = 1, utilization 0.9).
  Goal: cluster wall time <= 1.05 x sequential.

--cpu: the same recipes on the CPU (the built-in smollm2, the transformers engine, perplexity
only): the overhead of Ray on a CPU host, each task with --task-cpus CPUs' worth of torch threads
(2 on a 2-core host: one task at a time, as the one-process run; 1: two side by side).

Each run is a fresh process with a fresh SQUEEZE_HOME (nothing cached; the imported model is
shared), the order alternating over --repeats (sequential first in odd repeats; with --start
cluster, the cluster run). Each record holds both wall times and their ratio, the perplexities
of both reports and whether the reports agree apart from timings (and the torch threads the CPU
tasks ran with), the cluster's tasks.json (state, GPU ids, seconds of each task), GPU name and
versions (Ray's too).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gpu_common import ROOT, record

from squeeze.pipeline.fanout import most_utilization

# W8A16 symmetric: vLLM 0.26 has no kernel for SmolLM2's 8-bit weights with zero points (Machete needs
# output widths divisible by 128; Marlin takes zero points with 4 bits only)
VARIANTS = {"w8a16": [{"type": "rtn", "bits": 8, "group_size": -1, "symmetric": True}],
            "w4a16": [{"type": "rtn", "bits": 4, "group_size": 128, "group_fallback": True, "symmetric": False}],
            "int8-dyn": [{"type": "int8", "activations": "dynamic"}],
            "fp8-dyn": [{"type": "fp8", "activations": "dynamic"}]}
VOLATILE = {"hardware", "created", "model_dir", "cached", "memory", "provenance", "host", "speed", "paired_speed",
            "rounds", "speedups", "timings"}


def recipe(name: str, base: Path, variants: dict, share: float, tiny: bool, data: Path | None,
           cpu: bool = False, task_cpus: float = 1.0, eager: bool = False, kv_bytes: int | None = None) -> dict:
    """The recipe both runs use; only `--cluster` differs between them."""
    if tiny:  # the CPU dry run: the transformers engine on a tiny random model
        ev = {"engines": ["hf"], "perplexity": {"dataset": str(data), "context_length": 64, "max_tokens": 512},
              "speed": {"num_prompts": 4, "input_len": 8, "output_len": 4, "warmup": 0, "repeats": 2, "rounds": 2}}
    elif cpu:
        ev = {"engines": ["hf"], "perplexity": {"dataset": "wikitext2", "context_length": 1024, "max_tokens": 8192},
              "speed": None}
    else:
        util = most_utilization(share) or 0.9  # what `execution` allows a shared GPU; 0.9 for whole ones
        ev = {"engines": ["vllm"], "vllm": {"dtype": "bfloat16", "gpu_memory_utilization": util,
                                            "max_model_len": 2048, **({"enforce_eager": True} if eager else {}),
                                            **({"engine_args": {"kv_cache_memory_bytes": kv_bytes}} if kv_bytes else {})},
              "perplexity": {"dataset": "wikitext2", "context_length": 1024, "max_tokens": 8192},
              "speed": {"num_prompts": 256, "input_len": 128, "output_len": 128, "warmup": 1, "repeats": 2,
                        "rounds": 3}}
    return {"name": name, "model": {"source": str(base), "dtype": "float32"}, "seed": 0,
            "device": "cpu" if tiny or cpu else "cuda", "matrix": {"variants": variants}, "eval": ev,
            "execution": {"eval_gpus": share, "stage_gpus": share, "eval_cpus": task_cpus, "stage_cpus": task_cpus}}


def base_model(args, work: Path) -> Path:
    """SmolLM2 imported from the GGUF once (or, --tiny, a tiny random Llama), shared by every run."""
    if args.cpu:
        from compress.models import resolve_model

        return Path(resolve_model("smollm2")).resolve()
    out = work / "_models" / ("tiny-llama" if args.tiny else "SmolLM2-135M-Instruct")
    if (out / "config.json").is_file():
        return out
    if args.tiny:
        from tests.conftest import make_tiny_llama

        return make_tiny_llama(out)
    from compress.models import import_gguf

    return import_gguf(Path(args.gguf), out)


def stable(x):
    """A report without timings, paths and when it ran (what must agree between the two runs)."""
    if isinstance(x, dict):
        return {k: stable(v) for k, v in x.items() if k not in VOLATILE and not k.startswith("seconds")}
    return [stable(v) for v in x] if isinstance(x, list) else x


def timed_run(path: Path, out: Path, home: Path, cluster: bool) -> float:
    """`squeeze run` in a fresh process and a fresh SQUEEZE_HOME; its wall time."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, "SQUEEZE_HOME": str(home),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "squeeze.cli", "run", str(path), "--output", str(out)]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        rc = subprocess.run(cmd + (["--cluster", "local"] if cluster else []), env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    secs = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {out.parent / (out.name + '.log')}")
    return secs


def perplexities(rep: dict) -> dict:
    return {a["name"]: {e: (m.get("perplexity") or {}).get("perplexity") for e, m in a["engines"].items()}
            for a in [rep["baseline"], *rep["artifacts"]]}


def compare(args, what: str, variants: dict, share: float) -> None:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    base = base_model(args, work)
    data = None
    if args.tiny:
        from tests.conftest import TEXT

        data = work / "tiny.txt"
        data.write_text(TEXT)
    path = work / f"cluster-{what}.yaml"
    import yaml

    if getattr(args, "recipe", None):  # a recipe file as it is; only the tasks' CPUs set, as for the built-in ones
        raw = yaml.safe_load(Path(args.recipe).read_text())
        raw["execution"] = {**raw.get("execution", {}), "eval_cpus": args.task_cpus, "stage_cpus": args.task_cpus}
        variants = {raw["name"]: raw.get("stages", [])}
    else:
        raw = recipe(f"cluster-{what}", base, variants, share, args.tiny, data, args.cpu, args.task_cpus, args.eager,
                     args.kv_bytes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    for rep_i in range(args.repeats):
        times = {}
        last = work / "seconds.json"  # --only: the other side's last wall time, for the ratio
        earlier = json.loads(last.read_text()) if args.only and last.is_file() else {}
        sides = (False, True) if (rep_i + (args.start == "cluster")) % 2 == 0 else (True, False)
        for cluster in [c for c in sides if args.only in (None, "cluster" if c else "sequential")]:
            tag = "cluster" if cluster else "sequential"
            home = work / f"home-{tag}"
            times[tag] = timed_run(path, work / f"run-{tag}", home, cluster)
            print(f"{what} repeat {rep_i + 1}: {tag} {times[tag]:.1f} s", flush=True)
            last.write_text(json.dumps({**earlier, **times}))
        if args.only:
            times = {**{k: v for k, v in earlier.items() if k != args.only}, **times}
        both = {t: work / f"run-{t}" / "report.json" for t in ("sequential", "cluster")}  # --only: the other's last
        reps = {t: json.loads(f.read_text()) for t, f in both.items() if f.is_file()}
        tasks = json.loads((work / "run-cluster" / "tasks.json").read_text())["tasks"] \
            if (work / "run-cluster" / "tasks.json").is_file() else []
        record(args, {"what": what, "variants": list(variants), "share": share, "task_cpus": args.task_cpus,
                      "mode": "tiny" if args.tiny else "cpu" if args.cpu else "gpu", "repeat": rep_i + 1,
                      "enforce_eager": args.eager, "kv_cache_memory_bytes": args.kv_bytes, "only": args.only,
                      "order": list(times), "seconds": {k: round(v, 1) for k, v in times.items()},
                      "ratio": round(times["cluster"] / times["sequential"], 3) if len(times) == 2 else None,
                      "goal": 0.5 if what == "share" else 1.05,
                      "reports_agree": stable(reps["cluster"]) == stable(reps["sequential"]) if len(reps) == 2 else None,
                      "perplexity": {t: perplexities(r) for t, r in reps.items()},
                      "tasks": [{k: t.get(k) for k in ("id", "state", "gpus", "attempts", "seconds")} for t in tasks],
                      "ray": _ray_version(), "recipe": str(path)})


def _ray_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, repeats in (("share", 1), ("overhead", 2)):
        p = sub.add_parser(name)
        p.add_argument("--gguf", default="/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf")
        p.add_argument("--repeats", type=int, default=repeats, help="pairs of runs, the order alternating")
        p.add_argument("--work", default=str(Path(os.environ.get("OUT", "/tmp")) / "cluster-bench"))
        p.add_argument("--only", choices=["sequential", "cluster"], help="run one side (e.g. to keep each command "
                       "short); the reports are still compared with the other side's last run")
        p.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (a dry run)")
        p.add_argument("--start", choices=["sequential", "cluster"], default="sequential",
                       help="the side the first repeat runs first (the order then alternates)")
        p.add_argument("--eager", action="store_true", help="eval.vllm.enforce_eager in both runs (no compilation "
                       "or CUDA graphs: each engine starts in seconds, and neither run warms a cache the other reads)")
        p.add_argument("--kv-bytes", type=int, help="eval.vllm.engine_args.kv_cache_memory_bytes in both runs: a KV "
                       "cache of this size, not sized from free memory, so engines sharing a GPU start side by side")
        p.add_argument("--cpu", action="store_true", help="SmolLM2 on the CPU, the transformers engine")
        p.add_argument("--task-cpus", type=float, default=1.0, help="execution.eval_cpus and stage_cpus (CPUs a task "
                       "takes, and its torch threads)")
        p.add_argument("--jsonl", default=str(Path(os.environ.get("OUT", "/tmp")) / "cluster_gpu.jsonl"))
        if name == "overhead":
            p.add_argument("--recipe", help="a single-variant recipe file to run both ways instead of the built-in one "
                           "(e.g. recipes/w8a8-int8-dynamic.yaml on the CPU, with --cpu)")
        if name == "share":
            p.add_argument("--share", type=float, default=0.25, help="the GPU share of each task in the cluster run")
    args = ap.parse_args(argv)
    if args.cmd == "share":
        compare(args, "share", VARIANTS, args.share)
    else:
        compare(args, "overhead", {"int8-dyn": VARIANTS["int8-dyn"]}, 1.0)


if __name__ == "__main__":
    main()
