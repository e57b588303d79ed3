"""FP8 KV cache: static K and V scales from calibration, written as compressed-tensors'
`kv_cache_scheme` (the checkpoint layout vLLM reads; it then stores its KV cache in FP8 E4M3,
half the bytes of a 16-bit cache, so twice the tokens fit).

    stages:
      - {type: fp8}                 # optional: any weight stage before it, or none (16-bit weights)
      - type: kv_cache
        per_head: false             # true: one scale per KV head (vLLM reads those on H100/H200 only)
        calibration: {dataset: wikitext2-valid, n_samples: 64, seq_len: 512}

scale = amax / 448 (the largest E4M3 value), amax of the keys *after* the rotary embedding
(what the cache stores) and of the values, over the calibration tokens: per tensor (one K and
one V scale per layer) or per KV head. The keys and values are seen where the attention hands
them to its cache, through compressed-tensors' `QuantizedKVCache` (compress.export.kv_cache
.attach_kv_cache), on the shared calibration runner: one layer at a time, each layer's batches
stopped after its attention's output projection; once a layer's scales are set its cache is
fake-quantized, so later layers are calibrated on what an FP8 cache gives them.

It changes no weight, so it may follow a quantization stage (`Stage.keeps_weights`): the output
is then that stage's checkpoint as it was written, with the KV-cache scheme and scales added.
Attention is not expert-specific: mixture-of-experts models are calibrated the same way.
"""

from __future__ import annotations

import sys
import time

import torch
from pydantic import Field

from compress.calibration import CalibrationConfig, check_calibration
from compress.engine_facts import KVCacheFP8, engine_notes, engine_problems
from compress.errors import UserError
from compress.export.compressed_tensors import FP8_MAX, quantization_config
from compress.export.kv_cache import KV_ON, attach_kv_cache
from compress.layerwise import decoder_layers, run_layerwise
from compress.schema import Strict
from compress.stage import Stage, StageContext

STAGE_NAME = "kv_cache"
ANCHOR = "o_proj"  # the attention's output projection: it runs right after the cache is written


class KVCacheConfig(Strict):
    per_head: bool = Field(False, description="false: one K and one V scale per layer; true: one per KV head "
                           "(compressed-tensors' attn_head; vLLM reads them with FlashAttention 3, H100/H200)")
    calibration: CalibrationConfig | None = Field(
        None, description="calibration data (required): the keys' and values' ranges the scales cover")


# ---------------------------------------------------------------------------- the maths

def kv_scales(amax: torch.Tensor, per_head: bool, dtype: torch.dtype) -> torch.Tensor:
    """FP8 scales from the largest |x| per KV head (amax [kv_heads]): [kv_heads] per head or [1]
    per tensor, amax / 448 rounded to the checkpoint's scale dtype (the value every engine reads)."""
    a = amax.float() if per_head else amax.float().max().reshape(1)
    return (a / FP8_MAX).clamp(min=torch.finfo(dtype).tiny).to(dtype).float()


class KVRange:
    """The largest |key| and |value| per KV head that one attention module handed to its cache."""

    def __init__(self):
        self.amax: dict[str, torch.Tensor | None] = {"k": None, "v": None}

    def add_batch(self, x: torch.Tensor) -> None:
        """The runner feeds the anchor's (o_proj's) input: not a statistic here (the hooks fill amax)."""

    def observe(self, which: str, states: torch.Tensor) -> None:
        """states [batch, kv_heads, seq, head_dim], as the attention passes them to its cache."""
        a = states.detach().abs().amax(dim=(0, 2, 3)).float().cpu()
        prev = self.amax[which]
        self.amax[which] = a if prev is None else torch.maximum(prev, a)


# ---------------------------------------------------------------------------- checks

def attention_modules(model, stage: str = STAGE_NAME) -> list[str]:
    """The attention module of every decoder layer (compressed-tensors' test: a class named
    *Attention* with k_proj / v_proj), each with an `o_proj`; one line naming what is missing."""
    from compressed_tensors.quantization.lifecycle.initialize import is_attention_module

    name, layers = decoder_layers(model)
    out = []
    for i, layer in enumerate(layers):
        found = [(n, m) for n, m in layer.named_modules() if n and is_attention_module(m)]
        if len(found) != 1:
            what = "no" if not found else f"{len(found)}"
            raise UserError(f"{stage}: {name}.{i} ({type(layer).__name__}) has {what} attention module with k_proj "
                            "and v_proj (the KV cache's scales are per attention); this architecture is not supported")
        rel, attn = found[0]
        if not isinstance(getattr(attn, ANCHOR, None), torch.nn.Linear):
            raise UserError(f"{stage}: {name}.{i}.{rel} ({type(attn).__name__}) has no {ANCHOR} linear layer, which "
                            "the calibration runner stops after; this architecture is not supported")
        out.append(f"{name}.{i}.{rel}")
    return out


def head_dim(model, attn: torch.nn.Module) -> int:
    cfg = getattr(model.config, "get_text_config", lambda: model.config)()
    return int(getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
               or cfg.hidden_size // cfg.num_attention_heads)


def _asked(cfg: KVCacheConfig, model, attns: list[str]) -> KVCacheFP8:
    """What the engines are asked about: this cache, for the attention's head size."""
    return KVCacheFP8(per_head=cfg.per_head, head_dim=head_dim(model, model.get_submodule(attns[0])))


def check_kv_cache(cfg: KVCacheConfig, model, ctx: StageContext) -> list[str]:
    """Checks before any work; returns the attention modules' names."""
    stage = STAGE_NAME
    if cfg.calibration is None:
        raise UserError(f"{stage}.calibration: the K and V scales come from calibration data; add e.g. calibration: "
                        "{dataset: wikitext2-valid, n_samples: 64, seq_len: 512}")
    q = quantization_config(ctx.model_dir) if ctx.model_dir is not None else None
    if q and q.get("quant_method") != "compressed-tensors":
        raise UserError(f"{stage}: {ctx.model_dir} is a {q.get('quant_method')} checkpoint; the FP8 KV cache is "
                        "written in the compressed-tensors format: start from a 16-bit model or a compressed-tensors "
                        "stage")
    if q and q.get("kv_cache_scheme"):
        raise UserError(f"{stage}: {ctx.model_dir} already has an FP8 KV cache (kv_cache_scheme); use one kv_cache "
                        "stage")
    attns = attention_modules(model)
    asked = _asked(cfg, model, attns)
    problems = engine_problems(ctx.engine_facts, asked)
    if problems:
        raise UserError(*(f"{stage}: {p}" for p in problems))
    for note in engine_notes(ctx.engine_facts, asked).values():
        if ctx.progress:
            print(f"note: {stage}: {note}", file=sys.stderr)
    if ctx.tokenizer is not None:
        check_calibration(ctx.tokenizer, cfg.calibration, stage)
    return attns


# ---------------------------------------------------------------------------- the stage

def run_kv_cache(model, cfg: KVCacheConfig, ctx: StageContext):
    from compressed_tensors.modeling import register_key_hook, register_value_hook

    attns = check_kv_cache(cfg, model, ctx)
    t0 = time.perf_counter()
    attach_kv_cache(model, attns, cfg.per_head)
    ranges = {a: KVRange() for a in attns}
    by_anchor = {id(model.get_submodule(f"{a}.{ANCHOR}")): ranges[a] for a in attns}
    handles = []
    for a, r in ranges.items():
        m = model.get_submodule(a)
        handles += [register_key_hook(m, lambda mod, x, r=r: r.observe("k", x)),
                    register_value_hook(m, lambda mod, x, r=r: r.observe("v", x))]
    layers_name = decoder_layers(model)[0]

    def solve(i, group, stats: KVRange):
        (rel,) = group
        attn = model.get_submodule(f"{layers_name}.{i}.{rel.rsplit('.', 1)[0]}")
        out = {}
        for w in ("k", "v"):
            p = getattr(attn, f"{w}_scale")
            s = kv_scales(stats.amax[w], cfg.per_head, p.dtype)
            p.data.copy_(s.reshape(p.shape).to(p.dtype))
            out[f"{w}_amax"] = round(stats.amax[w].max().item(), 6)
            out[f"{w}_scale"] = [round(x, 8) for x in s.tolist()] if cfg.per_head else round(s.item(), 8)
        attn.quantization_enabled = True  # from here on this layer's cache is FP8 (for the next layers' inputs)
        return {rel: out}

    c = cfg.calibration
    try:
        info = run_layerwise(model, ctx.calibration(c), [f"{a}.{ANCHOR}" for a in attns],
                             lambda m, dev: by_anchor[id(m)], solve, ctx.device, sequential=True,
                             batch_size=c.batch_size, progress=ctx.progress, desc=STAGE_NAME)
    finally:
        for h in handles:
            h.remove()
    if ctx.model_dir is not None and quantization_config(ctx.model_dir):
        setattr(model, KV_ON, str(ctx.model_dir))  # its weights are written as that checkpoint holds them
    per_attn = {n[: -len(ANCHOR) - 1]: v for n, v in info.pop("modules").items()}
    return model, {"kv_cache": f"FP8 (E4M3) per {'head' if cfg.per_head else 'tensor'}, static, scale = amax / 448",
                   "attention_modules": len(attns), **engine_notes(ctx.engine_facts, _asked(cfg, model, attns)),
                   "seconds_solve": round(time.perf_counter() - t0, 3), **info, "modules": per_attn}


STAGE = Stage(name=STAGE_NAME, config=KVCacheConfig, apply=run_kv_cache,
              check=check_kv_cache, quantizes=True, keeps_weights=True,
              summary="FP8 KV cache: K and V scales (per tensor or per KV head) calibrated after the rotary "
                      "embedding, compressed-tensors kv_cache_scheme; after a weight stage or alone.")
