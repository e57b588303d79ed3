"""Accuracy on a real-weight mixture of experts: SmolLM2-135M-Instruct MoEfied (compress.moefy),
WikiText-2 perplexity under the evaluator's protocol (HF engine, the demo's first 4,096 tokens,
context 1,024); records JSONL.

    python benchmarks/moe_smollm2.py quant [--sources smollm2-moe,smollm2-moe-top4,smollm2]
    python benchmarks/moe_smollm2.py moefy [--top-k 4] [--variants contiguous/gate_mean/none,coact/lsq/none,...]
    python benchmarks/moe_smollm2.py down-error [--layers 2,9,16,23,28]

`quant` runs recipes/moe-smollm2-gptq.yaml (RTN and GPTQ W4 g128, a matrix) once per model
source, the recipe's `model.source` replaced (its run directory named after the source), and
records the baseline's and each artifact's perplexity. `moefy` builds the top-k form with each
partition / router / down_proj-refit choice in-process and records its perplexity: the
measurement behind the defaults of compress.moefy. `down-error` compares, on a few layers of
`smollm2-moe` (all experts active), GPTQ W4 on each expert's `down_proj` alone (group 64) with
GPTQ on the dense `down_proj` (group 128, and 64), by the output error over all experts
together, tr(ΔW H ΔWᵀ) on the calibration tokens: why per-expert GPTQ trails dense GPTQ.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RECIPE = REPO / "recipes" / "moe-smollm2-gptq.yaml"


def _record(a, rec: dict) -> None:
    from compress.manifest import versions
    from eval.evaluate import hardware

    rec = {"benchmark": "moe_smollm2", "date": time.strftime("%F"), **rec, "hardware": hardware(),
           "versions": versions(), "command": " ".join(["python"] + sys.argv)}
    print(json.dumps({k: rec[k] for k in ("model", "method", "perplexity")}), flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "a") as f:
        f.write(json.dumps(rec) + "\n")


def quant(a) -> None:
    import yaml

    from squeeze.pipeline import run
    from squeeze.recipe import parse_recipe

    for src in a.sources.split(","):
        raw = yaml.safe_load(RECIPE.read_text())
        raw["model"]["source"], raw["name"] = src, f"{raw['name']}-{src}"
        t0 = time.perf_counter()
        rep = run(parse_recipe(raw))
        made = json.loads((Path(rep["baseline"]["model_dir"]) / "manifest.json").read_text())["source"]
        for entry in [rep["baseline"], *rep["artifacts"]]:
            ppl = entry["engines"]["hf"]["perplexity"]
            method = "none" if entry is rep["baseline"] else entry["name"]
            stage = {} if method == "none" else next(s for s in raw["matrix"]["axes"]["quant"][method])
            _record(a, {"model": src, "moefy": made.get("moefy"), "method": method, "stage": stage,
                        "perplexity": ppl["perplexity"],
                        "baseline_perplexity": rep["baseline"]["engines"]["hf"]["perplexity"]["perplexity"],
                        "protocol": {"dataset": "wikitext2", **ppl["protocol"], "engine": "hf", "dtype": "float32"},
                        "recipe": str(RECIPE.relative_to(REPO)), "run_wall_seconds": round(time.perf_counter() - t0, 1)})


def moefy_variants(a) -> None:
    import torch

    from compress import moefy
    from compress.calibration import calibration_batches, dataset_tokens
    from compress.models import BUILTIN_MODELS, load_model, resolve_model
    from eval.accuracy.perplexity import perplexity
    from eval.engines.hf import HFEngine

    c = BUILTIN_MODELS["smollm2-moe-top4"]["calibration"]
    model, tok = load_model(resolve_model("smollm2"))
    calib = calibration_batches(tok, c["dataset"], c["n_samples"], c["seq_len"])
    ids = dataset_tokens(tok, "wikitext2")
    for v in a.variants.split(","):
        part, router, refit = v.split("/")
        refit = None if refit == "none" else float(refit)
        t0 = time.perf_counter()
        moe = moefy.moefy(model, 8, a.top_k, calib, part, router, refit)
        built = round(time.perf_counter() - t0, 1)
        with torch.inference_mode():
            ppl = perplexity(HFEngine(moe, tok, "cpu"), ids, 1024, max_tokens=4096, progress=False)
        _record(a, {"model": f"smollm2-moe-top{a.top_k}", "method": "moefy",
                    "moefy": {"experts": 8, "top_k": a.top_k, "partition": part, "router": router, "refit": refit,
                              "calibration": c, "build_seconds": built},
                    "perplexity": ppl["perplexity"],
                    "protocol": {"dataset": "wikitext2", **ppl["protocol"], "engine": "hf", "dtype": "float32"}})
        del moe


def down_error(a) -> None:
    import torch
    import torch.nn.functional as F

    from compress.calibration import calibration_batches
    from compress.models import load_model, resolve_model
    from compress.quant.gptq_solver import gptq_quantize
    from compress.quant.grid import Grid

    dense, tok = load_model(resolve_model("smollm2"))
    moe, _ = load_model(resolve_model("smollm2-moe"))
    layers = [int(i) for i in a.layers.split(",")]
    calib, xs = calibration_batches(tok, "wikitext2-valid", 32, 512), {i: [] for i in layers}
    hooks = [dense.model.layers[i].mlp.register_forward_pre_hook(lambda m, x, i=i: xs[i].append(x[0].flatten(0, 1)))
             for i in layers]
    with torch.inference_mode():
        for b in calib.split(4):
            dense(b, use_cache=False)
    for h in hooks:
        h.remove()
    for i in layers:
        mlp, gate_up = dense.model.layers[i].mlp, moe.model.layers[i].mlp.experts.gate_up_proj.detach()
        row = {r.numpy().tobytes(): j for j, r in enumerate(mlp.gate_proj.weight.detach())}
        parts = [[row[r.numpy().tobytes()] for r in g[:g.shape[0] // 2]] for g in gate_up]  # the built-in's experts
        x = torch.cat(xs[i])
        with torch.no_grad():
            hid = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
            w = mlp.down_proj.weight.detach()
        hess = 2 / len(hid) * hid.T.double() @ hid.double()

        def err(dw):
            return torch.einsum("oi,ij,oj->", dw.double(), hess, dw.double()).item()

        def gptq(wm, hm, g):
            return gptq_quantize(wm, hm.float().clone(), Grid(4, False, g), 128, 0.01, "weight").q - wm

        dw = torch.zeros_like(w)
        for p in parts:
            dw[:, p] = gptq(w[:, p], hess[p][:, p], 64)
        out = {"dense_g128": err(gptq(w, hess, 128)), "dense_g64": err(gptq(w, hess, 64)), "per_expert_g64": err(dw)}
        _record(a, {"model": "smollm2-moe", "method": "gptq-down-error", "layer": i, "perplexity": None,
                    "output_error": out, "per_expert_over_dense_g128": out["per_expert_g64"] / out["dense_g128"],
                    "calibration": "32 x 512 wikitext2-valid", "protocol": "tr(dW H dW^T), H = 2/n h^T h of down_proj's input"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("quant")
    q.add_argument("--sources", default="smollm2-moe,smollm2-moe-top4,smollm2")
    m = sub.add_parser("moefy")
    m.add_argument("--top-k", type=int, default=4)
    m.add_argument("--variants", default="contiguous/gate_mean/none,coact/lsq/none,coact/lsq/0.1,coact/lsq/1")
    d = sub.add_parser("down-error")
    d.add_argument("--layers", default="2,9,16,23,28")
    for p in (q, m, d):
        p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "moe_smollm2.jsonl")
    a = ap.parse_args()
    {"quant": quant, "moefy": moefy_variants, "down-error": down_error}[a.cmd](a)


if __name__ == "__main__":
    main()
