"""compressed-tensors' rounding of a layer's input activations, with no trip to the host.

transformers gives each layer of a W8A8 (int8 or FP8) or W4A8 compressed-tensors checkpoint the
library's quantized forward, whose `forward_quantize` rounds the input before the matmul. In
compressed-tensors 0.17 every call builds its range as new device tensors (`calculate_range`:
`torch.tensor(q_min, device=...)`, twice), its epsilon too, and reads `float(bit_range)` back
from the device. On a GPU each of those is a copy that waits for the stream to drain: several per
linear layer per forward pass, so the host never runs ahead of the GPU. On an H100 the int8
SmolLM2 took 91 s to evaluate on transformers against 22 s for its bf16 baseline, and a paired
speed round 15.9 s (`benchmarks/results/demo_gpu.jsonl`); on 2 CPU cores its batch-1 decode took
1.86-1.88x the baseline's time, and 1.26-1.41x with `qdq` (`benchmarks/qdq_decode.py`, two runs in
`benchmarks/results/qdq_decode_cpu.jsonl`; cProfile: 47,000 `torch.tensor` calls for 32 tokens).

`qdq` is the same arithmetic with the range as Python numbers: the same torch operations on the
same values in the same order, so the same bits (tests/test_qdq.py compares it with
`forward_quantize` on every case it takes, float32 and bfloat16). It takes symmetric dynamic
scales per token, per tensor or per group, and static scales (with zero points) of any shape;
for anything else (asymmetric dynamic, blocks, global or micro-scaling scales, a rounded
scale dtype, activation-ordered groups) `covered` says no and the caller keeps compressed-tensors'
own function. Written here because the library offers no host-free path for it.
"""

from __future__ import annotations

import math
import types

import torch

FP8_MAX = 448.0  # E4M3's largest value (compressed-tensors' FP8_E4M3_DATA.max)


def _range(args) -> tuple[float, float] | None:
    kind = str(getattr(args.type, "value", args.type))
    if kind == "int":
        half = 2.0 ** args.num_bits / 2
        return -half, half - 1
    if kind == "float" and args.num_bits == 8:
        return -FP8_MAX, FP8_MAX
    return None


def _round(x: torch.Tensor, args, lo: float, hi: float) -> torch.Tensor:
    """compressed-tensors' `round_to_quantized_type_args`: clamp, then round to the grid."""
    dtype = x.dtype
    x = torch.clamp(x, lo, hi)
    if str(getattr(args.type, "value", args.type)) == "float":
        return x.to(torch.float8_e4m3fn).to(dtype)
    return torch.round(x).to(dtype)


def _eps(dtype: torch.dtype) -> float:
    return 0.125 if dtype == torch.float8_e4m3fn else torch.finfo(dtype).eps


def _qdq(x, scale, zero_point, args, lo, hi):
    """compressed-tensors' `_quantize_dequantize` (no global scale)."""
    scaled = x / scale
    if zero_point is not None:
        scaled += zero_point.to(x.dtype)
    out = _round(scaled, args, lo, hi).to(scale.dtype)
    if zero_point is not None:
        out = out - zero_point.to(scale.dtype)
    return out * scale


def _dynamic_scale(value: torch.Tensor, lo: float, hi: float, dims, keepdim: bool) -> torch.Tensor:
    """calculate_qparams' symmetric scale: max(|min(amin, 0)|, |max(amax, 0)|) / (range / 2), zeros to eps."""
    if dims:
        mn, mx = torch.amin(value, dim=dims, keepdim=keepdim), torch.amax(value, dim=dims, keepdim=keepdim)
    else:
        mn, mx = torch.aminmax(value)
    mn, mx = torch.clamp(mn, max=0), torch.clamp(mx, min=0)
    scale = torch.max(mn.abs(), mx.abs()) / ((hi - lo) / 2)
    scale = scale.masked_fill(scale == 0, _eps(scale.dtype))
    return scale.reshape(1) if scale.ndim == 0 else scale


def covered(args, g_idx=None, global_scale=None) -> bool:
    """Whether `qdq` takes these activation arguments (else: compressed-tensors' own function)."""
    if args is None or global_scale is not None or getattr(args, "scale_dtype", None) is not None:
        return False
    if _range(args) is None:
        return False
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if args.dynamic is True:
        if not args.symmetric:
            return False
        return strategy in ("token", "tensor") or (strategy == "group" and g_idx is None)
    return not args.dynamic and strategy in ("tensor", "token", "channel")


def qdq(x: torch.Tensor, args, scale: torch.Tensor | None = None,
        zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """`x` rounded as compressed-tensors' `forward_quantize(module, x, "input", args)` rounds it;
    `scale` / `zero_point`: the module's static `input_scale` / `input_zero_point`. Only for
    arguments `covered` takes."""
    lo, hi = _range(args)
    if x.numel() == 0:
        return x
    if not args.dynamic:
        return _qdq(x, scale, zero_point, args, lo, hi)
    strategy = str(getattr(args.strategy, "value", args.strategy))
    if strategy == "group":
        size = args.group_size
        if x.shape[-1] % size:
            raise ValueError(f"tensor column shape must be divisible by the given group_size {size} "
                             f"but got {x.shape[-1]}")
        grouped = x.unflatten(-1, (math.ceil(x.shape[-1] / size), size))
        s = _dynamic_scale(grouped, lo, hi, -1, False)
        while s.ndim < 2:
            s = s.unsqueeze(1)
        return _qdq(grouped, s.unsqueeze(-1), None, args, lo, hi).flatten(start_dim=-2).to(x.dtype)
    dims = tuple(range(2, x.ndim)) if strategy == "token" else None  # token: keeps dims 0 and 1
    return _qdq(x, _dynamic_scale(x, lo, hi, dims, True), None, args, lo, hi)


def module_qdq(module, x: torch.Tensor, args) -> torch.Tensor:
    """A module's input rounded with its own static tensors where it has them."""
    return qdq(x, args, getattr(module, "input_scale", None), getattr(module, "input_zero_point", None))


def speed_up_(model: torch.nn.Module) -> int:
    """Give every layer of a loaded model that transformers set up with compressed-tensors'
    quantized forward, and that `qdq` covers, a forward that rounds its input with `qdq`
    instead: the same outputs, bit for bit. Layers whose weights are still rounded on each
    pass (status below compressed) or whose outputs are rounded keep theirs. Returns how many."""
    from compressed_tensors.quantization import QuantizationStatus

    n = 0
    for m in model.modules():
        scheme, status = getattr(m, "quantization_scheme", None), getattr(m, "quantization_status", None)
        if scheme is None or status is None or "forward" not in vars(m) or scheme.output_activations:
            continue
        if scheme.weights is not None and status < QuantizationStatus.COMPRESSED:
            continue
        args = scheme.input_activations
        if args is None or not covered(args, getattr(m, "weight_g_idx", None),
                                       getattr(m, "input_global_scale", None)):
            continue
        m.forward = types.MethodType(_forward, m)
        n += 1
    return n


def _forward(self, input: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' quantized forward of a layer whose weights are not rounded again."""
    if getattr(self, "quantization_enabled", True):
        input = module_qdq(self, input, self.quantization_scheme.input_activations)
    return type(self).forward(self, input)
