"""The shared evaluator: one model directory and one engine in, one metrics dict out, cached
by content.

Results are cached under ``<home>/_eval_cache/`` keyed by the model's content hash, the
measurement protocol (perplexity and speed settings), the engine and its options, the dtype
and the hardware, so the baseline is measured once per engine and a resumed run does not
measure an artifact twice.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import torch

from compress.data import load_text
from compress.export.compressed_tensors import describe, quantization_config
from compress.fsutil import atomic_write_text
from compress.models import home, model_hash
from compress.recipe import EvalConfig, ModelSpec
from eval.accuracy.perplexity import perplexity
from eval.engines import open_engine
from eval.speed.generation import generation_speed

CACHE_VERSION = 2


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.machine()} cpu x{torch.get_num_threads()} threads"


def engine_settings(engine: str, cfg: EvalConfig, model: ModelSpec) -> dict:
    """What the engine is opened with (beyond device and model): part of the cache key."""
    if engine == "vllm":
        opts = cfg.vllm.model_dump()
        opts["dtype"] = opts["dtype"] or model.dtype
        return opts
    return {"dtype": model.dtype, **({"sparse_kernels": True} if cfg.hf.sparse_kernels else {})}


def evaluate(model_dir: Path, cfg: EvalConfig, model: ModelSpec, engine: str = "hf", device: str = "cpu",
             seed: int = 0, use_cache: bool = True) -> dict:
    """Measure `model_dir` on `engine` under `cfg`'s protocol (perplexity, speed)."""
    model_dir = Path(model_dir)
    settings = engine_settings(engine, cfg, model)
    key_src = {"model": model_hash(model_dir), "perplexity": cfg.perplexity and cfg.perplexity.model_dump(),
               "speed": cfg.speed and cfg.speed.model_dump(), "engine": engine, "settings": settings,
               "device": device, "hardware": hardware(), "seed": seed, "v": CACHE_VERSION}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:24]
    cache = home() / "_eval_cache" / f"{key}.json"
    if use_cache and cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}

    eng = open_engine(engine, model_dir, device=device, trust_remote_code=model.trust_remote_code,
                      allow_pickle=model.allow_pickle, **settings)
    try:
        out = {"model_dir": str(model_dir), "model_hash": key_src["model"], "engine": engine,
               "dtype": settings["dtype"], "settings": settings, "device": device, "hardware": key_src["hardware"],
               "size_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
               "quantization": describe(quantization_config(model_dir))}
        out.update(getattr(eng, "stats", {}))
        if cfg.perplexity is not None:
            p = cfg.perplexity
            ids = eng.tokenizer(load_text(p.dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]
            out["perplexity"] = perplexity(eng, ids, p.context_length, p.stride, p.max_tokens)
            out["perplexity"]["protocol"]["dataset"] = p.dataset
        if cfg.speed is not None:
            s = cfg.speed
            out["speed"] = generation_speed(eng, s.input_len, s.output_len, s.batch_size, s.warmup, s.repeats, seed)
    finally:
        eng.close()
    atomic_write_text(cache, json.dumps(out, indent=1))
    return {**out, "cached": False}


def retention(base: dict, art: dict) -> dict:
    """Artifact relative to baseline: perplexity retention (base/artifact; 1.0 = no loss) and speedups."""
    r = {}
    if "perplexity" in base and "perplexity" in art:
        bp, ap = base["perplexity"]["perplexity"], art["perplexity"]["perplexity"]
        r["ppl_retention"] = bp / ap
        r["ppl_change_pct"] = 100.0 * (ap - bp) / bp
    if "speed" in base and "speed" in art:
        r["decode_speedup"] = art["speed"]["decode_tok_s"] / base["speed"]["decode_tok_s"]
        r["prefill_speedup"] = art["speed"]["prefill_tok_s"] / base["speed"]["prefill_tok_s"]
    if base.get("size_bytes") and art.get("size_bytes"):
        r["size_ratio"] = art["size_bytes"] / base["size_bytes"]
    return r
