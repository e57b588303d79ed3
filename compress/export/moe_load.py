"""Load a compressed-tensors checkpoint of a mixture-of-experts model as the dense model it encodes.

The checkpoint holds its experts per expert (`…experts.N.gate_proj.weight_packed`, scales,
zero points): the layout vLLM's fused-MoE methods read. transformers' class for the model
fuses them into 3-D parameters, and its own decompression of such checkpoints (transformers
5.19 `DecompressExperts`) drops zero points ("Asymmetric quant requires zero-point values")
and rounds FP8 experts through bfloat16. So Squeeze loads them itself: the model is built
without weights, its experts linearized (compress.moe), each quantized module's tensors
decompressed by compressed-tensors' own compressor for its scheme, the dense state dict
loaded, and the experts fused back. The result equals the fake-quantized model that was saved:
where the scheme quantizes input activations (W8A8 int8 or FP8, dynamic or static), every
quantized module's input is rounded as compressed-tensors rounds a dense layer's, the experts'
gate/up and down inputs included (compress.export.moe_acts, which says what that costs).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def per_expert_quantized(model_dir: Path) -> bool:
    """Whether `model_dir` is a compressed-tensors checkpoint with per-expert quantized modules."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return False
    q = json.loads(cfg.read_text()).get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        return False
    index = Path(model_dir) / "model.safetensors.index.json"
    if index.is_file():
        keys = json.loads(index.read_text())["weight_map"]
    else:
        from safetensors import safe_open

        files = sorted(Path(model_dir).glob("*.safetensors"))
        keys = [k for f in files for k in safe_open(f, "pt").keys()]
    # quantized experts, or experts in 16 bits beside an FP8 KV cache (transformers 5.19's expert
    # loader wants a weight scheme and fails on a checkpoint whose only scheme is the cache's)
    kv = bool(q.get("kv_cache_scheme"))
    return any(".experts.0." in k and (kv or k.endswith(("weight_packed", "weight_scale"))) for k in keys)


def _state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@torch.no_grad()
def load_per_expert(model_dir: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """The dense model (fused experts, dequantized weights in `dtype`, inputs rounded where the
    scheme quantizes activations) of a per-expert checkpoint."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.format import infer_module_format
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from compress import moe
    from compress.export import moe_acts
    from compress.export.kv_cache import load_kv_cache

    cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    qcfg = QuantizationConfig.model_validate(json.loads((Path(model_dir) / "config.json").read_text())
                                             ["quantization_config"])
    cfg.quantization_config = None
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code)
    moe.linearize(model)
    layout = moe.checkpoint_layout(moe.model_type(model))  # checkpoint names -> module names
    schemes = {}
    for scheme in qcfg.config_groups.values():
        targets = [layout.to_model(t) for t in scheme.targets]
        for name, mod in match_named_modules(model, targets, [layout.to_model(t) for t in qcfg.ignore or []]):
            schemes[name] = (scheme, mod)
    sd = {layout.to_model(k): v for k, v in _state_dict(model_dir).items()}
    dense, acts = {}, {}
    for name, (scheme, mod) in schemes.items():
        local = {k[len(name) + 1:]: sd.pop(k) for k in [k for k in sd if k.startswith(name + ".")]}
        fmt = scheme.format or qcfg.format or infer_module_format(type(mod), scheme)
        out = BaseCompressor.get_value_from_registry(fmt).decompress(local, scheme)
        dense[f"{name}.weight"] = out["weight"].to(dtype)
        if "bias" in out:
            dense[f"{name}.bias"] = out["bias"].to(dtype)
        if (iq := moe_acts.input_quant(scheme, out, dtype)) is not None:
            acts[name] = iq
    kv = {k: sd.pop(k) for k in [k for k in sd if k.endswith((".k_scale", ".v_scale"))]}
    dense.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()
                  if not k.rsplit(".", 1)[-1].startswith(("weight_", "input_"))})
    _, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    model.tie_weights()
    moe.fuse(model)
    moe_acts.round_inputs_(model, acts, layout.proj)  # W8A8: activations rounded as in the saved model
    if qcfg.kv_cache_scheme is not None:  # the FP8 KV cache, as transformers applies it to a dense layout
        load_kv_cache(model, kv, qcfg.kv_cache_scheme.strategy == "attn_head")
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing or unexpected:
        raise ValueError(f"{model_dir}: checkpoint does not match the model: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.eval()
