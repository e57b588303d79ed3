"""The FP8 KV cache in compressed-tensors checkpoints: the `kv_cache_scheme` and the attention
modules' `k_scale` / `v_scale` tensors (vLLM maps `<attention>.k_scale` onto its attention layers),
beside any weight scheme. compress.export.compressed_tensors writes them with the weights;
compress.quant.kv_cache calibrates them; compress.export.moe_load puts them back on a loaded
mixture-of-experts model."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def kv_cache_args(per_head: bool):
    """compressed-tensors' `kv_cache_scheme`: FP8 E4M3, symmetric, static scales, one per tensor or
    one per KV head (`attn_head`), the two strategies vLLM's CompressedTensorsKVCacheMethod takes."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type="float", symmetric=True, dynamic=False,
                            strategy="attn_head" if per_head else "tensor")


def with_kv_cache(qcfg, kv_args):
    """A checkpoint's QuantizationConfig with the FP8 KV cache's scheme: the weights' config, or for
    16-bit weights an empty one (format "dense": the weights are written as they are)."""
    from compressed_tensors.quantization import QuantizationConfig

    q = qcfg or QuantizationConfig(config_groups={}, format="dense", quantization_status="compressed")
    q.kv_cache_scheme = kv_args
    return q


def attach_kv_cache(model: torch.nn.Module, attentions: list[str], per_head: bool) -> None:
    """Give every named attention module compressed-tensors' KV-cache scheme: a `QuantizedKVCache`
    that sees the keys (after the rotary embedding) and values the cache stores, and `k_scale` /
    `v_scale` parameters ([1], or [kv_heads, 1, 1] per head), written as `<attention>.k_scale`
    (vLLM maps them onto its attention layers). Quantization is left off (`quantization_enabled`)
    until a layer's scales are set."""
    from compressed_tensors.modeling import initialize_hooked_kv_cache
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
    from compressed_tensors.quantization.utils import KV_CACHE_TARGETS

    scheme = QuantizationScheme(targets=list(KV_CACHE_TARGETS), input_activations=kv_cache_args(per_head))
    for name in attentions:
        m = model.get_submodule(name)
        m.quantization_scheme = scheme
        initialize_hooked_kv_cache(model, m)
        initialize_module_for_quantization(m, force_zero_point=False)
        m.quantization_status = QuantizationStatus.FROZEN
        m.quantization_enabled = False


# set on a model whose FP8 KV cache was calibrated on a compressed-tensors checkpoint (the directory):
# save_compressed writes that checkpoint's weights as they are, not packed again (the per-expert
# loader's mixture-of-experts models could not be)
KV_ON = "squeeze_kv_cache_on"


def save_kv_beside(model: torch.nn.Module, src: Path, out_dir: Path) -> None:
    """`src`'s config and weight files with the KV cache's scheme and `<attention>.k_scale` / `v_scale`
    added: into the one safetensors file, or a file of their own listed in the shards' index."""
    import shutil

    from safetensors.torch import load_file, save_file

    kv = [(n, m) for n, m in model.named_modules()
          if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is None]
    tensors = {f"{n}.{w}_scale": getattr(m, f"{w}_scale").detach().cpu().contiguous() for n, m in kv for w in "kv"}
    out_dir.mkdir(parents=True, exist_ok=True)
    index = src / "model.safetensors.index.json"
    if index.is_file():
        for f in src.glob("*.safetensors"):
            shutil.copy2(f, out_dir / f.name)
        save_file(tensors, str(out_dir / "kv_cache.safetensors"), metadata={"format": "pt"})
        idx = json.loads(index.read_text())
        idx["weight_map"].update({k: "kv_cache.safetensors" for k in tensors})
        (out_dir / index.name).write_text(json.dumps(idx, indent=2))
    else:
        (f,) = src.glob("*.safetensors")
        save_file({**load_file(f), **tensors}, str(out_dir / f.name), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"]["kv_cache_scheme"] = kv[0][1].quantization_scheme.input_activations.model_dump(
        mode="json")
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if (src / "generation_config.json").is_file():
        shutil.copy2(src / "generation_config.json", out_dir / "generation_config.json")


def load_kv_cache(model: torch.nn.Module, scales: dict[str, torch.Tensor], per_head: bool) -> None:
    """The FP8 KV cache of a loaded checkpoint put on `model` (its `<attention>.k_scale` / `v_scale`
    tensors in `scales`), rounding the cache as the saved model did."""
    names = sorted({k.rsplit(".", 1)[0] for k in scales})
    attach_kv_cache(model, names, per_head)
    with torch.no_grad():
        for n in names:
            m = model.get_submodule(n)
            for w in ("k", "v"):
                p = getattr(m, f"{w}_scale")
                p.data.copy_(scales[f"{n}.{w}_scale"].reshape(p.shape).to(p.dtype))
            m.quantization_enabled = True
