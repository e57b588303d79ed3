"""Statistics of a linear layer's inputs, accumulated over calibration batches.

Each collector has `add_batch(x)` with x [..., in_features] (any leading dims: batch,
sequence) and keeps a running statistic in float32 on x's device. The calibration runner
(compress.layerwise) feeds them from forward hooks; the algorithm that chose the collector
reads the result and the runner frees it. Modules that read the same input tensor (q/k/v,
gate/up) share one collector.
An empty batch (an expert of a mixture-of-experts layer that no token was routed to) adds
nothing: `n` counts the tokens a collector saw, which the stages compare to their threshold.

  HessianCollector      H = 2/n Σ xᵀx            [in, in]   GPTQ, SparseGPT, AWQ (its AWQCollector
                                                             adds the mean |x_j|: compress.quant.awq_search)
  ChannelNormCollector  Σ x_j² / n (per channel)  [in]       Wanda, OWL, structured-pruning importance
  AbsMaxCollector       max |x_j| (per channel)   [in]       SmoothQuant
  RangeCollector        max |x|, log2 |x| histogram (per tensor)   static activation scales (int8, fp8)
"""

from __future__ import annotations

import torch


class HessianCollector:
    """Running mean of 2 xᵀx over tokens (GPTQ's H; the factor 2 is the paper's)."""

    def __init__(self, in_features: int, device):
        self.h = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # an expert no token was routed to in this batch
            return
        x = x.reshape(-1, x.shape[-1])
        m = x.shape[0]
        self.h.mul_(self.n / (self.n + m))
        self.n += m
        self.h.add_(_gram(x), alpha=2.0 / self.n)



def _gram(x: torch.Tensor) -> torch.Tensor:
    """xᵀx in float32. On CUDA, 16-bit inputs go through a 16-bit GEMM with float32 output:
    the products of 16-bit numbers are exact in float32 and the sums accumulate in float32, so
    it is as precise as upcasting first, at tensor-core speed (for down_proj of an 8B model,
    ~100 TFLOP per layer at 128 × 2048 calibration tokens)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    x = x.float()
    return x.T @ x


class ChannelNormCollector:
    """Mean of x_j² over tokens, per input channel (Wanda's ‖X_j‖² / n)."""

    def __init__(self, in_features: int, device):
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # an expert no token was routed to in this batch
            return
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.sq.mul_(self.n / (self.n + m))
        self.n += m
        self.sq.add_(x.square().sum(0), alpha=1.0 / self.n)



class AbsMaxCollector:
    """Largest |x_j| seen, per input channel."""

    def __init__(self, in_features: int, device):
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # an expert no token was routed to in this batch
            return
        x = x.reshape(-1, x.shape[-1])
        self.n += x.shape[0]
        torch.maximum(self.absmax, x.abs().amax(0).float(), out=self.absmax)



class RangeCollector:
    """Per-tensor range of a layer's inputs for static activation scales: the largest |x| seen
    (min-max observer) and a histogram of log2 |x| over all elements (percentile observer).

    The histogram has LOG_BINS bins over 2^-64 .. 2^64 (1.4 % wide each), so a percentile is
    found to within one bin, read at the bin's upper edge (never below the true value)."""

    LOG_BINS, LOG_LO, LOG_HI = 8192, -64.0, 64.0

    def __init__(self, in_features: int, device, histogram: bool = True):
        self.absmax = torch.zeros((), dtype=torch.float32, device=device)
        self.hist = torch.zeros(self.LOG_BINS, dtype=torch.float64, device=device) if histogram else None
        self.n = 0

    def add_batch(self, x: torch.Tensor) -> None:
        if x.numel() == 0:  # an expert no token was routed to in this batch
            return
        a = x.detach().reshape(-1).abs().float()
        self.n += a.numel()
        torch.maximum(self.absmax, a.max(), out=self.absmax)
        if self.hist is not None:
            logs = a.clamp(min=2.0 ** self.LOG_LO).log2_()
            self.hist += torch.histc(logs, self.LOG_BINS, self.LOG_LO, self.LOG_HI).double()

    def percentile(self, p: float) -> float:
        """The p-th percentile (0 < p <= 100) of |x|, at most the largest |x|."""
        if self.hist is None or p >= 100:
            return self.absmax.item()
        cdf = self.hist.cumsum(0) / self.hist.sum().clamp(min=1)
        k = int(torch.searchsorted(cdf, torch.tensor(p / 100, dtype=cdf.dtype, device=cdf.device)).item())
        edge = 2.0 ** (self.LOG_LO + (k + 1) * (self.LOG_HI - self.LOG_LO) / self.LOG_BINS)
        return min(edge, self.absmax.item())
