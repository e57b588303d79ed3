"""SmolLM2 perplexity after each structured cut, activation-based against magnitude-based
importance on the same cut, and depth by block influence against dropping the last layers;
records JSONL.

    python benchmarks/prune_structured_smollm2.py [--samples 32 --seq-len 512] [--max-tokens 4096]

Each variant is a recipe run through the pipeline (HF engine, WikiText-2 perplexity on the
first --max-tokens tokens, no speed) in one SQUEEZE_HOME, so the baseline is measured once.
Parameters and linear FLOPs per token come from the stage's info.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = [  # (name, stages)
    ("mlp-25-activation", [{"type": "prune_mlp", "ratio": 0.25, "importance": "activation"}]),
    ("mlp-25-magnitude", [{"type": "prune_mlp", "ratio": 0.25, "importance": "magnitude"}]),
    ("heads-kv-activation", [{"type": "prune_heads", "ratio": 0.25, "mode": "kv_groups", "importance": "activation"}]),
    ("heads-kv-magnitude", [{"type": "prune_heads", "ratio": 0.25, "mode": "kv_groups", "importance": "magnitude"}]),
    ("heads-q-activation", [{"type": "prune_heads", "ratio": 0.25, "mode": "query_heads", "importance": "activation"}]),
    ("heads-q-magnitude", [{"type": "prune_heads", "ratio": 0.25, "mode": "query_heads", "importance": "magnitude"}]),
    ("hidden-25-activation", [{"type": "prune_hidden", "ratio": 0.25, "importance": "activation"}]),
    ("hidden-25-magnitude", [{"type": "prune_hidden", "ratio": 0.25, "importance": "magnitude"}]),
    ("depth-25-block-influence", [{"type": "prune_depth", "ratio": 0.25, "importance": "block_influence"}]),
    ("depth-25-last", [{"type": "prune_depth", "ratio": 0.25, "importance": "last"}]),
    ("mlp-heads-25-activation", [{"type": "prune_mlp", "ratio": 0.25},
                                 {"type": "prune_heads", "ratio": 0.25, "mode": "kv_groups"}]),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--only", default=None, help="comma-separated variant names")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "prune_structured_smollm2.jsonl")
    a = ap.parse_args()

    from compress.manifest import versions
    from compress.models import resolve_device
    from squeeze.pipeline import run
    from squeeze.recipe import parse_recipe
    from eval.evaluate import hardware

    cal = {"n_samples": a.samples, "seq_len": a.seq_len}
    rows = []
    for name, stages in VARIANTS:
        if a.only and name not in a.only.split(","):
            continue
        stages = [{**s, "calibration": cal} for s in stages]
        r = parse_recipe({"name": f"pruneS-{name}", "device": a.device, "stages": stages, "eval": {
            "engines": ["hf"], "speed": None, "perplexity": {"max_tokens": a.max_tokens}}})
        t0 = time.perf_counter()
        rep = run(r)
        art = rep["artifacts"][-1]
        infos = [json.loads((Path(x["model_dir"]) / "stage.json").read_text())["info"] for x in rep["artifacts"]]
        rec = {"benchmark": "prune_structured_smollm2", "date": time.strftime("%F"), "variant": name,
               "stages": stages, "perplexity": art["engines"]["hf"]["perplexity"]["perplexity"],
               "baseline_perplexity": rep["baseline"]["engines"]["hf"]["perplexity"]["perplexity"],
               "params": [infos[0]["before"]["params"], infos[-1]["after"]["params"]],
               "flops_per_token": [infos[0]["before"]["flops_per_token"], infos[-1]["after"]["flops_per_token"]],
               "cut": [{k: v for k, v in i.items() if k not in ("before", "after", "kept_heads_per_layer")}
                       for i in infos],
               "wall_seconds": round(time.perf_counter() - t0, 1), "device": resolve_device(a.device),
               "hardware": hardware(), "versions": versions(), "command": " ".join(["python"] + sys.argv)}
        print(json.dumps({k: rec[k] for k in ("variant", "perplexity", "params")}), flush=True)
        rows.append(rec)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
    print(f"\n{'variant':28} {'perplexity':>10} {'x dense':>8} {'params M':>9}")
    for r in rows:
        print(f"{r['variant']:28} {r['perplexity']:>10.3f} {r['perplexity'] / r['baseline_perplexity']:>8.2f} "
              f"{r['params'][1] / 1e6:>9.1f}")


if __name__ == "__main__":
    main()
