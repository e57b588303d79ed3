"""The demo recipe end to end on one device, then its baseline and artifact in vLLM.

Runs recipes/demo.yaml (50 % magnitude pruning of SmolLM2-135M-Instruct) through the
pipeline on --device (HF engine: perplexity + batch-1 speed), then loads the baseline and
the pruned model in vLLM on the same device and measures the same speed protocol there.
Prints a table and appends one JSONL record per (engine, model) to --out.

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
    from compress import pipeline
    from compress.models import resolve_device
    from compress.manifest import versions
    from compress.recipe import load_recipe
    from eval.evaluate import hardware
    from eval.report.report import table
    from eval.speed.generation import generation_speed

    recipe = load_recipe(REPO / "recipes" / "demo.yaml")
    model = recipe.model.model_copy(update={"source": a.gguf}) if a.gguf else recipe.model
    recipe = recipe.model_copy(update={"model": model, "device": a.device})
    device = resolve_device(a.device)
    t0 = time.perf_counter()
    report = pipeline.run(recipe, force=True)
    wall = time.perf_counter() - t0
    print(table(report))
    common = {"benchmark": "smollm2_pipeline", "date": time.strftime("%F"), "device": device,
              "hardware": hardware(), "versions": versions(), "command": " ".join(["python"] + sys.argv),
              "recipe": "recipes/demo.yaml", "dtype": recipe.model.dtype}
    records = []
    for entry in [report["baseline"]] + report["artifacts"]:
        m = entry["engines"]["hf"]
        records.append({**common, "engine": "hf", "model": entry["name"], "pipeline_wall_s": round(wall, 1),
                        "perplexity": m["perplexity"]["perplexity"], "ppl_protocol": m["perplexity"]["protocol"],
                        "speed": m["speed"]})
    if not a.no_vllm:
        from eval.engines.vllm import VLLMEngine

        s = recipe.eval.speed
        for entry in [report["baseline"]] + report["artifacts"]:
            t = time.perf_counter()
            eng = VLLMEngine.load(Path(entry["model_dir"]), dtype=recipe.model.dtype, device=device,
                                  **({"gpu_memory_utilization": 0.5} if device.startswith("cuda") else {}))
            load_s = time.perf_counter() - t
            try:
                text = eng.generate_text(["The capital of France is"], 8)[0]
                speed = generation_speed(eng, s.input_len, s.output_len, s.batch_size, s.warmup, s.repeats)
            finally:
                eng.close()
            records.append({**common, "engine": "vllm", "model": entry["name"], "engine_load_s": round(load_s, 1),
                            "completion": text, "speed": speed})
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    print(f"\n{'engine':6} {'model':28} {'ppl':>9} {'prefill tok/s':>14} {'decode tok/s':>13} {'TPOT ms':>8}")
    for r in records:
        sp = r["speed"]
        ppl = f"{r['perplexity']:.3f}" if "perplexity" in r else "-"
        print(f"{r['engine']:6} {r['model']:28} {ppl:>9} {sp['prefill_tok_s']:>14.1f} {sp['decode_tok_s']:>13.1f} "
              f"{sp['tpot_ms']:>8.2f}")
    print(f"records appended to {a.out}")


if __name__ == "__main__":
    main()
