"""SmolLM2 perplexity after pruning: magnitude, Wanda and SparseGPT at 50 % unstructured, 2:4
and 4:8 (one table), with the calibration size stated; records JSONL.

    python benchmarks/prune_smollm2.py [--samples 32 --seq-len 512] [--out benchmarks/results/prune_smollm2.jsonl]

Each variant is a recipe run through the pipeline (HF engine, WikiText-2 perplexity, the
evaluator's protocol; no speed) in one SQUEEZE_HOME, so the baseline is measured once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default="magnitude_prune,wanda,sparsegpt")
    ap.add_argument("--patterns", default="0.5,2:4,4:8")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prune_smollm2.jsonl")
    a = ap.parse_args()

    from compress.manifest import versions
    from compress.models import resolve_device
    from squeeze.pipeline import run
    from squeeze.recipe import parse_recipe
    from eval.evaluate import hardware

    cal = {"n_samples": a.samples, "seq_len": a.seq_len}
    rows = []
    for method in a.methods.split(","):
        for pat in a.patterns.split(","):
            stage = {"type": method, **({"nm": pat} if ":" in pat else {"sparsity": float(pat)})}
            if method != "magnitude_prune":
                stage["calibration"] = cal
            name = f"prune-{method}-{pat.replace(':', 'of')}"
            r = parse_recipe({"name": name, "device": a.device, "stages": [stage], "eval": {"speed": None}})
            t0 = time.perf_counter()
            rep = run(r)
            art = rep["artifacts"][0]
            rec = {"benchmark": "prune_smollm2", "date": time.strftime("%F"), "method": method, "pattern": pat,
                   "calibration": None if method == "magnitude_prune" else f"{a.samples} x {a.seq_len} wikitext2-valid",
                   "perplexity": art["engines"]["hf"]["perplexity"]["perplexity"],
                   "baseline_perplexity": rep["baseline"]["engines"]["hf"]["perplexity"]["perplexity"],
                   "linear_sparsity": art["engines"]["hf"].get("linear_sparsity"),
                   "stage_seconds": json.loads((Path(art["model_dir"]) / "stage.json").read_text())["seconds"],
                   "wall_seconds": round(time.perf_counter() - t0, 1), "device": resolve_device(a.device),
                   "hardware": hardware(), "versions": versions(), "command": " ".join(["python"] + sys.argv)}
            print(json.dumps({k: rec[k] for k in ("method", "pattern", "perplexity", "stage_seconds")}), flush=True)
            rows.append(rec)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"\n{'method':16} {'pattern':8} {'perplexity':>10} {'x dense':>8} {'stage s':>8}")
    for r in rows:
        print(f"{r['method']:16} {r['pattern']:8} {r['perplexity']:>10.3f} "
              f"{r['perplexity'] / r['baseline_perplexity']:>8.2f} {r['stage_seconds']:>8.1f}")


if __name__ == "__main__":
    main()
