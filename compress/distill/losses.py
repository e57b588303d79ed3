"""Distillation losses, computed in chunks of token positions so that neither the student's
nor the teacher's logits ([tokens, vocab]) are ever held whole.

Per token, with p the teacher's and q the student's distribution at temperature T:
  forward   KL(p || q)                         (mode covering; Hinton et al.)
  reverse   KL(q || p)                         (mode seeking; MiniLLM)
  jsd       beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
  skew      KL(p || alpha p + (1 - alpha) q)   (skew KL; DistiLLM)
each times T^2 (so gradients keep their scale across temperatures), plus cross-entropy of the
student on the data's next tokens. A chunk's logits are recomputed in the backward pass
(activation checkpointing of the chunk), so peak memory is one chunk's logits, not the
sequence's: torch has no fused chunked-KL loss, and the packages that have one (Liger
kernels) need Triton on a GPU, so this is ours.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

KINDS = ("forward", "reverse", "jsd", "skew")


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, from log-probabilities (0 log 0 = 0)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _mix(logp: torch.Tensor, logq: torch.Tensor, w: float) -> torch.Tensor:
    """log(w p + (1 - w) q), stably."""
    if w <= 0.0:
        return logq
    if w >= 1.0:
        return logp
    return torch.logaddexp(logp + math.log(w), logq + math.log1p(-w))


def token_divergence(s_logits: torch.Tensor, t_logits: torch.Tensor, kind: str, temperature: float = 1.0,
                     beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher (t) and student (s) logits [n, vocab] -> [n], times T^2.
    beta: the teacher's weight in jsd's mixture, or skew's alpha."""
    logq = F.log_softmax(s_logits.float() / temperature, dim=-1)
    logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
    if kind == "forward":
        d = _kl(logp, logq)
    elif kind == "reverse":
        d = _kl(logq, logp)
    elif kind == "jsd":
        m = _mix(logp, logq, beta)
        d = beta * _kl(logp, m) + (1 - beta) * _kl(logq, m)
    elif kind == "skew":
        d = _kl(logp, _mix(logp, logq, beta))
    else:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(KINDS)}")
    return d * temperature ** 2


def _chunk(h_s, h_t, labels, w_s, b_s, w_t, b_t, kind, temperature, beta, want_kd, want_ce):
    s_logits = F.linear(h_s, w_s, b_s)
    kd = ce = s_logits.new_zeros((), dtype=torch.float32)
    keep = labels >= 0
    if want_kd:
        with torch.no_grad():
            t_logits = F.linear(h_t, w_t, b_t)
        kd = (token_divergence(s_logits, t_logits, kind, temperature, beta) * keep).sum()
    if want_ce:
        ce = F.cross_entropy(s_logits.float(), labels.clamp_min(0), reduction="none").mul(keep).sum()
    return kd, ce


def chunked_losses(h_s: torch.Tensor, h_t: torch.Tensor | None, labels: torch.Tensor, head_s: torch.nn.Module,
                   head_t: torch.nn.Module | None, kind: str = "forward", temperature: float = 1.0,
                   beta: float = 0.5, chunk: int = 1024, want_kd: bool = True,
                   want_ce: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(summed divergence, summed cross-entropy, counted tokens) over positions whose label is
    >= 0. h_s [N, d_s] and h_t [N, d_t] are final hidden states (after the final norm), labels
    [N] the next tokens (-100: not counted); head_s / head_t the output layers. Each chunk of
    `chunk` positions is checkpointed: its logits exist only while it is computed."""
    n = h_s.shape[0]
    w_t = head_t.weight if head_t is not None else None
    b_t = getattr(head_t, "bias", None) if head_t is not None else None
    kd_sum = ce_sum = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        args = (h_s[i:i + chunk], h_t[i:i + chunk] if h_t is not None else None, labels[i:i + chunk],
                head_s.weight, getattr(head_s, "bias", None), w_t, b_t, kind, temperature, beta, want_kd, want_ce)
        if torch.is_grad_enabled():
            kd, ce = checkpoint(_chunk, *args, use_reentrant=False)
        else:
            kd, ce = _chunk(*args)
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    return kd_sum, ce_sum, int((labels >= 0).sum())


def hidden_mse(s_states: list[torch.Tensor], t_states: list[torch.Tensor],
               proj: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean squared error between mapped layers' hidden states, the student's through a learned
    projection where the widths differ; averaged over pairs, normalised by the teacher's mean
    square so that layers of different scale weigh alike."""
    total = s_states[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(s_states, t_states):
        s = proj(s) if proj is not None else s
        t = t.float()
        total = total + F.mse_loss(s.float(), t) / t.pow(2).mean().clamp_min(1e-6)
    return total / max(1, len(s_states))
