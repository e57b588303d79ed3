"""The magnitude-50 recipe (the first demo) end to end on one device, on both engines.

Runs recipes/magnitude-50.yaml (50 % magnitude pruning of SmolLM2-135M-Instruct) through the
pipeline on --device: perplexity, PIQA, speed and memory of the baseline and the pruned
model on transformers and on vLLM (`--no-vllm`: transformers only). Prints the report's
table and appends one JSONL record per (engine, model) to --out.

    python benchmarks/smollm2_pipeline.py --out benchmarks/results/smollm2_pipeline.jsonl \
        [--gguf PATH] [--device auto] [--home DIR]

--gguf takes the model from a GGUF file (on the GPU host: /tmp/models/...Q4_1.gguf)
instead of the built-in download.
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--gguf", help="model source: a GGUF file instead of the built-in")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--home", type=Path, help="SQUEEZE_HOME for this run")
    ap.add_argument("--no-vllm", action="store_true")
    a = ap.parse_args()

    import os

    if a.home:
        os.environ["SQUEEZE_HOME"] = str(a.home)
    from squeeze import pipeline
    from compress.models import resolve_device
    from compress.manifest import versions
    from squeeze.recipe import load_recipe
    from eval.evaluate import hardware
    from eval.report.report import table

    recipe = load_recipe(REPO / "recipes" / "magnitude-50.yaml")
    model = recipe.model.model_copy(update={"source": a.gguf}) if a.gguf else recipe.model
    ev = recipe.eval.model_copy(update={"engines": ["hf"] if a.no_vllm else ["hf", "vllm"]})
    recipe = recipe.model_copy(update={"model": model, "device": a.device, "eval": ev})
    device = resolve_device(a.device)
    t0 = time.perf_counter()
    report = pipeline.run(recipe, force=True)
    wall = time.perf_counter() - t0
    print(table(report))
    common = {"benchmark": "smollm2_pipeline", "date": time.strftime("%F"), "device": device,
              "hardware": hardware(), "versions": versions(), "command": " ".join(["python"] + sys.argv),
              "recipe": "recipes/magnitude-50.yaml", "dtype": recipe.model.dtype}
    records = []
    for entry in [report["baseline"]] + report["artifacts"]:
        for engine, m in entry["engines"].items():
            records.append({**common, "engine": engine, "model": entry["name"], "pipeline_wall_s": round(wall, 1),
                            **{k: m.get(k) for k in ("perplexity", "tasks", "speed", "memory", "provenance",
                                                     "error")}})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"records appended to {a.out}")


if __name__ == "__main__":
    main()
