"""The integer quantization grid: scales, zero points, quantize, dequantize. Pure functions.

Conventions are those of the compressed-tensors format (and so of vLLM's kernels), so that
what we solve is exactly what gets packed and served:
  * codes are signed, in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1] ([-8, 7] for 4 bits);
  * dequantized value = (code - zero) * scale, computed in the scale's dtype;
  * symmetric: zero = 0, scale = absmax / ((qmax - qmin) / 2) (absmax / 7.5 for 4 bits, as in
    GPTQ and compressed-tensors); asymmetric: scale = (max - min) / (qmax - qmin) over a
    range widened to include 0, zero = round(qmin - min / scale), a signed integer in range;
  * scales are rounded to their storage dtype (the model's dtype) *before* codes are
    computed, so the stored scale reproduces the fake-quantized weight bit for bit.

Shapes: a weight W is [out, in]; with group size g (g = -1: one group per row, i.e. per
output channel) there are G = in / g groups and scale, zero are [out, G].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    symmetric: bool = True
    group_size: int = 128            # -1: per output channel
    scale_dtype: torch.dtype = torch.float32

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group_size must be -1 or positive, got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size


def qparams(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of `w` [..., n] over its last dim -> ([..., 1], [..., 1]).

    Scale is float32 holding values exactly representable in `grid.scale_dtype`; zero is a
    float32 tensor of integers (0 when symmetric).
    """
    w = w.float()
    lo = w.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = w.amax(dim=-1, keepdim=True).clamp(min=0)
    span = float(grid.qmax - grid.qmin)
    if grid.symmetric:
        scale = torch.maximum(-lo, hi) / (span / 2)
    else:
        scale = (hi - lo) / span
    scale = _storable(scale, grid.scale_dtype)
    if grid.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (grid.qmin - lo / scale).round().clamp(grid.qmin, grid.qmax)
    return scale, zero


def _storable(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to `dtype` and replace zeros (an all-zero group) by the smallest normal value."""
    tiny = torch.finfo(dtype).tiny
    return scale.clamp(min=tiny).to(dtype).float()


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Integer codes (as float32) in [qmin, qmax]; scale/zero broadcast against w."""
    return (w.float() / scale + zero).round_().clamp_(grid.qmin, grid.qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(q - zero) * scale in float32 (exact for codes and storable scales)."""
    return (q - zero) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    return dequantize(quantize(w, scale, zero, grid), scale, zero)


def group_qparams(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of W [out, in] for its contiguous groups -> ([out, G], [out, G])."""
    out, n = w.shape
    g = n if grid.group_size == -1 else grid.group_size
    if n % g:
        raise ValueError(f"group size {g} does not divide the input width {n}")
    s, z = qparams(w.reshape(out, n // g, g), grid)
    return s.squeeze(-1), z.squeeze(-1)


def expand(t: torch.Tensor, in_features: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group [out, G] -> per-column [out, in]: column j uses group g_idx[j] (default j // g)."""
    if g_idx is None:
        g = in_features if group_size == -1 else group_size
        g_idx = torch.arange(in_features, device=t.device) // g
    return t[:, g_idx.long()]


def rtn(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: W [out, in] -> (Q [out, in] float32, scale [out, G], zero [out, G])."""
    scale, zero = group_qparams(w, grid)
    n = w.shape[1]
    q = fake_quantize(w, expand(scale, n, grid.group_size), expand(zero, n, grid.group_size), grid)
    return q, scale, zero
