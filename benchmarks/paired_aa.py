"""A/A check of the paired speed protocol: a model against an exact copy of itself, and against
variants that differ only in weight values, each pair measured as a report measures it.

    python3 benchmarks/paired_aa.py BASE [VARIANT_DIR...] [--recipe recipes/demo.yaml] [--engine vllm]
        [--jsonl benchmarks/results/paired_aa_cpu.jsonl]

Without VARIANT_DIRs it writes three under --work: `copy` (the same weights),
`rand50` (50 % of each linear's weights but lm_head zeroed at random) and `mag50` (the
magnitude_prune stage at 50 %). Dense kernels run all of them at the same cost, so each
speedup should read "no measurable change": a pair that reads faster or slower shows a bias of
the protocol or of the process it runs in, not of the model. The pairs run in one fresh process
through eval.paired.paired_speeds with the recipe's eval.speed (rounds, workload, noise floor),
nothing cached. One JSON line per pair: both speedups, the median ratio under each baseline
instance (the engine is reopened at half-time), the host and versions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def write_variant(base: Path, out: Path, how: str) -> Path:
    """`base` as it is (`copy`), with half of each linear's weights (lm_head aside) zeroed at random
    (`rand50`), or pruned by the magnitude_prune stage's own code at 50 % (`mag50`)."""
    from transformers import AutoModelForCausalLM

    from compress.models import load_tokenizer
    from compress.prune.magnitude import MagnitudePruneConfig, magnitude_prune_
    from squeeze.pipeline.chain import save_model

    if (out / "config.json").is_file():
        return out
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    fused = [n for n, p in model.named_parameters() if p.dim() > 2] if how == "rand50" else []
    if fused:  # fused experts are 3-D parameters, not nn.Linear: rand50 would leave them dense
        raise SystemExit(f"paired_aa: rand50 zeroes nn.Linear weights only, and {base} holds {len(fused)} fused "
                         f"3-D weights it would leave dense (e.g. {fused[0]}); give VARIANT_DIRs or use a dense model")
    if how == "mag50":
        magnitude_prune_(model, MagnitudePruneConfig(sparsity=0.5))
    elif how == "rand50":
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                    mod.weight[torch.rand(mod.weight.shape, generator=g) < 0.5] = 0
    save_model(model, load_tokenizer(base), out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("variants", nargs="*", type=Path)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml", help="eval.speed and model from here")
    ap.add_argument("--engine", default="vllm", help="hf, vllm, or several in the order to run them (hf,vllm: the "
                    "demo's order, transformers' pairs first in the same process)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--work", type=Path, default=Path("/tmp/paired-aa"))
    ap.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "results" / "paired_aa_cpu.jsonl"))
    args = ap.parse_args(argv)

    from eval.evaluate import stack_versions
    from eval.memory import device_info
    from eval.paired import paired_speeds
    from squeeze.recipe import load_recipe

    dirs = args.variants or [write_variant(args.base, args.work / how, how) for how in ("copy", "rand50", "mag50")]
    recipe = load_recipe(args.recipe)
    t0 = time.perf_counter()
    env = {"host": device_info(args.device), "versions": stack_versions(args.device), "command": " ".join(sys.argv)}
    for engine in args.engine.split(","):
        results = paired_speeds(args.base, dirs, recipe.eval, recipe.model, engine=engine, device=args.device,
                                use_cache=False)
        report(args, dirs, results, engine, t0, env)


def report(args, dirs: list[Path], results: list[dict], engine: str, t0: float, env: dict) -> None:
    for d, r in zip(dirs, results):
        rec = {"what": "paired A/A", "base": str(args.base), "variant": str(d), "engine": engine,
               "engines_in_order": args.engine,
               "recipe": str(args.recipe), "error": r.get("error")}
        if not r.get("error"):
            by = {i: statistics.median(q["base"]["tpot_ms"] / q["art"]["tpot_ms"] for q in r["rounds"]
                                       if q["base_instance"] == i) for i in (1, 2)}
            rec.update(speedups=r["speedups"], tpot_median_by_base_instance=by, rounds=r["rounds"], mode=r["mode"])
        rec.update(**env, seconds_all=round(time.perf_counter() - t0, 1), date=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")
        s = rec.get("speedups") or {}
        print(engine, Path(d).name, rec["error"] or "  ".join(
            f"{k} {v['ratio']:.3f} ({v['lo']:.3f}-{v['hi']:.3f}) {v['verdict']}" for k, v in s.items()), flush=True)


if __name__ == "__main__":  # vLLM's engine processes import this module again
    main()
