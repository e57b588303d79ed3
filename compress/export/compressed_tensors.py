"""Quantized checkpoints in the compressed-tensors format, written with the compressed-tensors
library (the format vLLM and transformers load natively).

Solving and packing are apart: a quantization stage leaves fake-quantized weights in the
model (values on the grid) and a `QuantRecord` (scale, zero, g_idx) per module; `attach`
puts the compressed-tensors scheme and those parameters on the modules; `save_compressed`
lets the library pack and write them. The library re-quantizes the weight with *our* scale,
zero point and g_idx (no observer runs), so the codes it packs are the ones we solved:
weights are handed to it in float32, where (code - zero) * scale is exact.

The FP8 KV cache's scales live on the attention modules (compress.export.kv_cache: compressed-tensors'
`kv_cache_scheme`, tensors `<attention>.k_scale` / `v_scale`), beside any weight scheme.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from compress.export.kv_cache import KV_ON, save_kv_beside, with_kv_cache
from compress.quant.grid import Grid, expand, quantize


FP8_MAX = 448.0  # largest finite float8 E4M3 (e4m3fn) value


@dataclass
class QuantRecord:
    scale: torch.Tensor            # [out, G]
    zero: torch.Tensor             # [out, G] float32 integers
    g_idx: torch.Tensor | None     # [in] int32 (activation order "group")
    input_scale: torch.Tensor | None = None   # [1] static per-tensor activation scale


@dataclass(frozen=True)
class ActScheme:
    """8-bit input activations: per token (or per token and group of `group_size` channels),
    computed at run time (dynamic), or one scale per tensor from calibration (static).
    Symmetric, as vLLM's fast kernels take them."""

    type: str = "int"              # "int" (int8) | "float" (FP8 E4M3)
    dynamic: bool = True
    group_size: int | None = None  # dynamic only: one scale per token and group of channels

    def args(self):
        from compressed_tensors.quantization import QuantizationArgs

        strategy = "tensor" if not self.dynamic else "group" if self.group_size else "token"
        return QuantizationArgs(num_bits=8, type=self.type, symmetric=True, strategy=strategy,
                                group_size=self.group_size, dynamic=self.dynamic)


@dataclass(frozen=True)
class WeightScheme:
    """What a quantization stage produced: enough to write the quantization_config."""

    bits: int
    group_size: int                # -1: per channel
    symmetric: bool
    actorder: str | None = None    # None | "weight" | "group"
    type: str = "int"              # "int" | "float" (FP8 E4M3, 8 bits, symmetric)
    input_acts: ActScheme | None = None   # None: weight-only (16-bit activations)
    block: int | None = None       # FP8 only: one scale per block x block tile (group_size is then -1)

    def args(self):
        from compressed_tensors.quantization import QuantizationArgs

        if self.block:
            return QuantizationArgs(num_bits=self.bits, type=self.type, symmetric=self.symmetric, strategy="block",
                                    block_structure=[self.block, self.block])
        return QuantizationArgs(num_bits=self.bits, type=self.type, symmetric=self.symmetric,
                                strategy="channel" if self.group_size == -1 else "group",
                                group_size=None if self.group_size == -1 else self.group_size,
                                actorder=self.actorder)

    @property
    def format(self) -> str:
        """compressed-tensors format: packed int4/int8 codes for weight-only and for int4 weights
        with FP8 activations (W4A8: vLLM's CUTLASS W4A8 loads packed weights), int8 or FP8 tensors
        for W8A8 (what vLLM's W8A8 kernels load)."""
        if self.type == "float":
            return "float-quantized"
        return "int-quantized" if self.input_acts is not None and self.input_acts.type == "int" else "pack-quantized"

    @property
    def name(self) -> str:
        a = self.input_acts
        return scheme_name(self.type, self.bits, None if a is None else a.dynamic, a and a.type, self.block)


def scheme_name(wtype: str | None, bits: int | None, act_dynamic: bool | None, act_type: str | None = None,
                block: int | None = None) -> str:
    """'W4A16', 'W8A8-INT8 dynamic', 'FP8 static', 'FP8 block128 dynamic', 'W4A8-FP8 dynamic', ...
    (act_dynamic None: weight-only)."""
    if act_dynamic is None:
        return f"{'FP8' if wtype == 'float' else f'W{bits}'}A16"
    how = "dynamic" if act_dynamic else "static"
    if wtype != "float" and bits == 4:
        return f"W4A8-{'FP8' if act_type == 'float' else 'INT8'} {how}"
    return f"{'FP8' if wtype == 'float' else 'W8A8-INT8'}{f' block{block}' if block else ''} {how}"


def attach(model: torch.nn.Module, records: dict[str, QuantRecord], schemes: dict[str, WeightScheme]) -> None:
    """Give every recorded module its compressed-tensors scheme and our scale/zero/g_idx.

    One config group per distinct scheme. With one scheme it targets the `Linear` class and the
    library lists the linears left out in `ignore` (the layout llm-compressor writes and vLLM
    reads); with several (group_fallback), each targets its modules by exact name (modules that
    vLLM fuses, q/k/v and gate/up, always share one scheme: they share an input width). The
    schemes are put on the modules directly, not matched by the library's target search, which
    compares every module with every target (quadratic: hours for the ~18,000 expert linears of
    a 30B mixture of experts)."""
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus
    from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization

    by_scheme: dict[WeightScheme, list[str]] = {}
    for name in records:
        by_scheme.setdefault(schemes[name], []).append(name)
    for sch, names in by_scheme.items():
        qs = QuantizationScheme(targets=["Linear"] if len(by_scheme) == 1 else names, weights=sch.args(),
                                input_activations=sch.input_acts.args() if sch.input_acts else None)
        for name in names:
            m = model.get_submodule(name)
            m.quantization_scheme = qs
            initialize_module_for_quantization(m, force_zero_point=True)
            m.quantization_status = QuantizationStatus.FROZEN
    with torch.no_grad():
        for name, rec in records.items():
            m = model.get_submodule(name)
            m.weight_scale.data.copy_(rec.scale.to(m.weight_scale.dtype))
            if hasattr(m, "weight_zero_point"):
                m.weight_zero_point.data.copy_(rec.zero.to(m.weight_zero_point.dtype))
            if rec.g_idx is not None:
                m.weight_g_idx.data.copy_(rec.g_idx.to(torch.int32))
            if rec.input_scale is not None:
                m.input_scale.data.copy_(rec.input_scale.reshape(m.input_scale.shape).to(m.input_scale.dtype))


def is_quantized(model: torch.nn.Module) -> bool:
    return any(getattr(m, "quantization_scheme", None) is not None for m in model.modules())


def save_compressed(model: torch.nn.Module, out_dir: Path) -> None:
    """Pack the attached modules and write the model to `out_dir` (config, safetensors)."""
    from compressed_tensors.compressors import ModelCompressor

    if getattr(model, KV_ON, None) is not None:  # weights kept: the input checkpoint plus the cache's scales
        return save_kv_beside(model, Path(getattr(model, KV_ON)), Path(out_dir))

    formats = set()
    with torch.no_grad():
        for m in model.modules():
            sch = getattr(m, "quantization_scheme", None)
            if sch is None or sch.weights is None:  # attention modules: the KV cache's scales only
                continue
            # rebuild the weight from its codes in float32: exact, whatever the model dtype
            w = m.weight.data.float()
            if sch.weights.type == "float":
                formats.add("float-quantized")
                s = m.weight_scale.data.float()
                if sch.weights.block_structure:  # one scale per tile: spread over the tile's weights
                    bh, bw = sch.weights.block_structure
                    s = s.repeat_interleave(bh, 0)[: w.shape[0]].repeat_interleave(bw, 1)[:, : w.shape[1]]
                m.weight.data = fp8_round(w / s) * s
                continue
            acts = sch.input_activations
            formats.add("int-quantized" if acts is not None and acts.type == "int" else "pack-quantized")
            grid = Grid(bits=sch.weights.num_bits, symmetric=sch.weights.symmetric,
                        group_size=sch.weights.group_size or -1)
            g_idx = getattr(m, "weight_g_idx", None)
            g_idx = g_idx.data if g_idx is not None and sch.weights.actorder == "group" else None
            s = expand(m.weight_scale.data.float(), w.shape[1], grid.group_size, g_idx)
            zp = getattr(m, "weight_zero_point", None)
            z = torch.zeros_like(s) if sch.weights.symmetric or zp is None else \
                expand(zp.data.float(), w.shape[1], grid.group_size, g_idx)
            m.weight.data = (quantize(w, s, z, grid) - z) * s
    if len(formats) > 1:
        raise ValueError(f"one checkpoint holds one compressed-tensors format, got {sorted(formats)}")
    # the attention modules' schemes (the KV cache's scales, saved as they are) step aside while the
    # library describes and packs the weights, then join the config as its kv_cache_scheme
    kv = [(m, m.quantization_scheme) for m in model.modules()
          if getattr(m, "quantization_scheme", None) is not None and m.quantization_scheme.weights is None]
    try:
        for m, _ in kv:
            del m.quantization_scheme
        comp = ModelCompressor.from_pretrained_model(model, quantization_format=formats.pop() if formats else None)
        comp.compress_model(model)
    finally:
        for m, sch in kv:
            m.quantization_scheme = sch
    if kv:
        comp.quantization_config = with_kv_cache(comp.quantization_config, kv[0][1].input_activations)
    model.save_pretrained(out_dir)
    comp.update_config(str(out_dir))  # after save_pretrained, which rewrites config.json
    _moe_config(model, out_dir)


def _moe_config(model: torch.nn.Module, out_dir: Path) -> None:
    """Two fixes to a mixture-of-experts checkpoint's quantization_config. The routers join `ignore`:
    transformers holds them as plain modules (not nn.Linear, so the library does not list them), but
    vLLM builds them as linear layers, which a `Linear` target would quantize. And save_pretrained
    renames keys to the model type's checkpoint layout (Mixtral: `.mlp.` -> `.block_sparse_moe.`):
    the config's module names follow, so that they name the modules vLLM and our loader find."""
    from compress import moe

    routers = moe.router_names(model)
    layout = moe.checkpoint_layout(moe.model_type(model))
    if not routers and not layout.renames:
        return
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text())
    q = cfg["quantization_config"]
    for g in q.get("config_groups", {}).values():
        g["targets"] = [layout.to_checkpoint(t) for t in g.get("targets", [])]
    ignore = list(dict.fromkeys([*(q.get("ignore") or []), *routers]))
    q["ignore"] = [layout.to_checkpoint(t) for t in ignore]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def fp8_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest float8 E4M3 value (saturating at ±448), in float32."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def quantization_config(model_dir: Path) -> dict | None:
    """The checkpoint's quantization_config (None for a dense model)."""
    cfg = Path(model_dir) / "config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text()).get("quantization_config")


def refuse_quantized(model_dir: Path | None, stage: str, hint: str = "start from the unquantized model") -> None:
    """UserError when the stage's input checkpoint is already quantized (any method)."""
    from compress.errors import UserError

    q = quantization_config(model_dir) if model_dir is not None else None
    if q:
        raise UserError(f"{stage}: {model_dir} is already quantized ({q.get('quant_method', '?')}, format "
                        f"{q.get('format', '?')}); {hint}")


def describe(qcfg: dict | None) -> dict | None:
    """Short description of a checkpoint's quantization config for reports: scheme, bits, group
    size. What an engine ran for it is observed by the engine (eval.engines.kernels), not named here."""
    if not qcfg:
        return None
    out = {"method": qcfg.get("quant_method"), "format": qcfg.get("format")}
    if qcfg.get("quant_method") == "bitsandbytes":
        four = bool(qcfg.get("load_in_4bit") or qcfg.get("_load_in_4bit"))
        kind = (qcfg.get("bnb_4bit_quant_type") or "nf4").upper() if four else "LLM.int8"
        return {**out, "format": "bitsandbytes", "bits": 4 if four else 8, "group_size": 64 if four else -1,
                "group_sizes": [64 if four else -1], "symmetric": True, "scheme": f"{kind} (bitsandbytes)"}
    kv = qcfg.get("kv_cache_scheme")
    if kv:  # 'FP8 per tensor' / 'FP8 per head'
        out["kv_cache"] = f"FP8 per {'head' if kv.get('strategy') == 'attn_head' else 'tensor'}"
    groups = list((qcfg.get("config_groups") or {}).values())
    sizes = sorted({(g.get("weights") or {}).get("group_size") or -1 for g in groups}, reverse=True)
    def name(g: dict) -> str:
        w, acts = g.get("weights") or {}, g.get("input_activations")
        return scheme_name(w.get("type"), w.get("num_bits"), None if not acts else bool(acts.get("dynamic")),
                           acts and acts.get("type"), (w.get("block_structure") or [None])[0])

    if groups:  # the first group's weights; one name per distinct scheme ('W8A8-INT8 static + W8A8-INT8 dynamic')
        w = groups[0].get("weights") or {}
        block = (w.get("block_structure") or [None])[0]
        out.update({"bits": w.get("num_bits"), "group_size": sizes[0], "group_sizes": sizes,
                    "symmetric": w.get("symmetric"), "actorder": w.get("actorder"),
                    "scheme": " + ".join(dict.fromkeys(name(g) for g in groups)), **({"block": block} if block else {})})
    return out
