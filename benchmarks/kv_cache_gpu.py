"""FP8 KV cache on a GPU (issue 25, item 4): config-only layouts of the Llama-3.1-8B shape whose
quantization_config is what the `kv_cache` stage writes on 16-bit weights (compressed-tensors'
kv_cache_scheme, built by compress.export.compressed_tensors), for vLLM's dummy weights.

    python3 benchmarks/kv_cache_gpu.py layouts --out DIR [--tiny]
    python3 benchmarks/kv_cache_gpu.py record RUN_DIR [--command "squeeze run ..."]

layouts: DIR/kv-fp8 (per-tensor scales) and DIR/kv-fp8-head (per KV head: vLLM reads those with
  FlashAttention 3, H100/H200 only), each a config.json and an empty weights file.
record: the figures of a run of benchmarks/kv_cache_smollm2.yaml (its report.json: perplexity per
  engine with the 16-bit cache and the FP8 one, vLLM's KV capacity, versions) as one JSONL line in
  benchmarks/results/kv_cache_smollm2.jsonl.

How to time them (read from vLLM 0.26's source): `load_format: dummy` fills every floating-point
parameter with uniform(-1e-3, 1e-3) values (initialize_dummy_weights), k_scale / v_scale / q_scale
included, and CompressedTensorsKVCacheMethod.process_weights_after_loading uses them as they are:
the cache then quantizes with random, partly negative scales. Speed does not depend on their values
(same FP8 cache, same kernels, same capacity), but nothing it generates means anything. The honest
per-tensor timing is therefore the bf16 layout with the engine argument `kv_cache_dtype: fp8`
(scales 1.0, the same cache and kernels as a calibrated checkpoint), next to the bf16 layout with
`kv_cache_dtype: auto`; kv-fp8 checks that the checkpoint's scheme alone switches the cache to FP8
(same KV capacity), and kv-fp8-head is the only way to time the per-head path.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import save_file

from gpu_common import llama_config, record

LAYOUTS = {"kv-fp8": False, "kv-fp8-head": True}  # name -> per_head


def kv_config(per_head: bool) -> dict:
    """The quantization_config the kv_cache stage writes on 16-bit weights."""
    from compress.export.kv_cache import kv_cache_args, with_kv_cache

    return {"quant_method": "compressed-tensors",
            **with_kv_cache(None, kv_cache_args(per_head)).model_dump(mode="json", exclude_none=False)}


def write_layouts(out: Path, tiny: bool = False) -> list[str]:
    """DIR/<layout>/config.json (+ an empty model.safetensors: Squeeze's loaders want a weights
    file; vLLM's dummy loader never reads it) for every LAYOUTS entry; returns the names."""
    cfg = llama_config(tiny)
    for name, per_head in LAYOUTS.items():
        d = Path(out) / name
        d.mkdir(parents=True, exist_ok=True)
        c = {**cfg.to_dict(), "architectures": ["LlamaForCausalLM"], "quantization_config": kv_config(per_head)}
        (d / "config.json").write_text(json.dumps(c, indent=1))
        save_file({}, str(d / "model.safetensors"))
    return list(LAYOUTS)


def smollm2_record(run_dir: Path) -> dict:
    """The SmolLM2 figures of a kv_cache_smollm2.yaml run, from its report.json."""
    rep = json.loads((Path(run_dir) / "report.json").read_text())
    base, (art,) = rep["baseline"], rep["artifacts"]
    out = {"what": "FP8 KV cache (kv_cache stage) vs the same model with a 16-bit cache",
           "model": "SmolLM2-135M-Instruct", "protocol": rep["protocol"]["perplexity"], "engines": {}}
    for e, m in art["engines"].items():
        b = base["engines"][e]
        out["engines"][e] = {"dtype": m["dtype"], "perplexity_16bit_cache": b["perplexity"]["perplexity"],
                             "perplexity_fp8_cache": m["perplexity"]["perplexity"],
                             "ppl_change_pct": art["retention"][e]["ppl_change_pct"],
                             "kv_cache_dtype": (m.get("memory") or {}).get("kv_cache_dtype"),
                             "kv_cache_tokens": (m.get("memory") or {}).get("kv_cache_tokens"),
                             "kv_cache_tokens_16bit": (b.get("memory") or {}).get("kv_cache_tokens"),
                             "kv_cache_ratio": art["retention"][e].get("kv_cache_ratio")}
    info = art.get("stage_info") or {}
    out.update(stage={k: info.get(k) for k in ("kv_cache", "calibration", "seconds")},
               stages=(rep.get("recipe") or {}).get("stages"), versions=rep["provenance"]["versions"],
               host=rep["provenance"]["host"],
               git_sha=rep["provenance"]["git_sha"], created=rep["created"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("layouts", help="config-only 8B-shape directories with the FP8 KV-cache scheme")
    p.add_argument("--out", required=True, help="directory to write the layouts into")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama shape instead of Llama-3.1-8B (dry runs)")
    p.add_argument("--jsonl", default="benchmarks/results/kv_cache_gpu.jsonl", help="where the record goes")
    p = sub.add_parser("record", help="the SmolLM2 run's figures as a JSONL line")
    p.add_argument("run_dir", help="the run directory of `squeeze run benchmarks/kv_cache_smollm2.yaml`")
    p.add_argument("--command", default="squeeze run benchmarks/kv_cache_smollm2.yaml", help="how it was run")
    p.add_argument("--jsonl", default="benchmarks/results/kv_cache_smollm2.jsonl", help="where the record goes")
    args = ap.parse_args()
    if args.cmd == "record":
        rec = {"bench": "kv_cache_smollm2", **smollm2_record(Path(args.run_dir)), "command": args.command}
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec))
        return
    names = write_layouts(Path(args.out), args.tiny)
    record(args, {"what": "kv-cache layout configs written", "dirs": names, "kv_config": kv_config(False)})


if __name__ == "__main__":
    main()
