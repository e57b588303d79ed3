"""Distillation losses, computed in chunks of token positions so that neither the student's
nor the teacher's logits ([tokens, vocab]) are ever held whole.

Per token, with p the teacher's and q the student's distribution at temperature T:
  forward   KL(p || q)                         (mode covering; Hinton et al.)
  reverse   KL(q || p)                         (mode seeking; MiniLLM)
  jsd       beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
  skew      KL(p || alpha p + (1 - alpha) q)   (skew KL; DistiLLM)
each times T^2 (so gradients keep their scale across temperatures), plus cross-entropy of the
student on the data's next tokens.

Training goes through `head_losses`: the output layer and the loss in one autograd function
that, chunk by chunk, computes the logits, the loss and its gradient with respect to the logits
(in closed form for forward and reverse KL and cross-entropy, by autograd for the others), and
turns that gradient at once into the gradients of the hidden states and of the output layer. A
chunk's logits exist only while it is computed and are never recomputed in the backward pass,
which only scales the stored gradients. With `compiled`, the per-chunk arithmetic is one
torch.compile graph, so the [chunk, vocab] float32 intermediates are fused away instead of
written and read a dozen times. torch has no fused linear-plus-KL loss, and the packages that
have one (Liger kernels) need Triton on a GPU and cover other losses, so this is ours.
`chunked_losses` computes the same values with plain autograd: the held-out evaluation and the
tests' reference use it.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

KINDS = ("forward", "reverse", "jsd", "skew")
CLOSED_FORM = ("forward", "reverse")  # divergences whose gradient head_losses writes out


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
    [N] the next tokens (-100: not counted); head_s / head_t the output layers. Without
    gradients a chunk's logits exist only while it is computed; training uses head_losses."""
    n = h_s.shape[0]
    w_t = head_t.weight if head_t is not None else None
    b_t = getattr(head_t, "bias", None) if head_t is not None else None
    kd_sum = ce_sum = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        args = (h_s[i:i + chunk], h_t[i:i + chunk] if h_t is not None else None, labels[i:i + chunk],
                head_s.weight, getattr(head_s, "bias", None), w_t, b_t, kind, temperature, beta, want_kd, want_ce)
        kd, ce = _chunk(*args)
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    return kd_sum, ce_sum, int((labels >= 0).sum())


def _chunk_grad(s_logits: torch.Tensor, t_logits: torch.Tensor | None, labels: torch.Tensor, w_kd: torch.Tensor,
                w_ce: torch.Tensor, kind: str, temperature: float, beta: float, want_ce: bool):
    """(summed divergence, summed cross-entropy, d(w_kd kd + w_ce ce)/d s_logits in s_logits'
    dtype) of one chunk; w_kd and w_ce are 0-dim tensors (not Python floats: a compiled graph
    would be specialised on each value)."""
    keep = (labels >= 0).float()
    s = s_logits.float()
    zero = s.new_zeros(())
    kd, ce, grad = zero, zero, torch.zeros_like(s)
    if t_logits is not None:
        if kind in CLOSED_FORM:
            logq = F.log_softmax(s / temperature, dim=-1)
            logp = F.log_softmax(t_logits.float() / temperature, dim=-1)
            if kind == "forward":  # d KL(p||q) / dz = q - p
                p = logp.exp()
                d = (p * (logp - logq)).sum(-1)
                g = logq.exp() - p
            else:  # d KL(q||p) / dz = q (log q - log p - KL)
                q, diff = logq.exp(), logq - logp
                d = (q * diff).sum(-1)
                g = q * (diff - d[:, None])
            d, g = d * temperature ** 2, g * temperature  # T^2 KL(z = s / T): dz/ds = 1 / T
        else:
            with torch.enable_grad():
                leaf = s.detach().requires_grad_()
                d = token_divergence(leaf, t_logits, kind, temperature, beta)
                (g,) = torch.autograd.grad((d * keep).sum(), leaf)
            d = d.detach()
        kd = (d * keep).sum()
        grad = grad + (w_kd * keep)[:, None] * g
    if want_ce:
        lse = torch.logsumexp(s, dim=-1)
        tgt = labels.clamp_min(0)[:, None]
        ce = ((lse - s.gather(1, tgt).squeeze(1)) * keep).sum()
        g = (s - lse[:, None]).exp().scatter_add(1, tgt, -torch.ones_like(tgt, dtype=s.dtype))
        grad = grad + (w_ce * keep)[:, None] * g
    return kd, ce, grad.to(s_logits.dtype)


@functools.cache
def _compiled_chunk_grad():
    """_chunk_grad through torch.compile, built once (not at every step's forward pass)."""
    return torch.compile(_chunk_grad, dynamic=False)


class _HeadLoss(torch.autograd.Function):
    """w_kd kd + w_ce ce of the output layer over h_s (see head_losses); the forward pass stores
    the gradients of h_s, the weight and the bias, the backward pass scales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, b_s, h_t, w_t, b_t, labels, w_kd, w_ce, opts):
        kind, temperature, beta, chunk, want_ce, compiled = opts
        fn = _chunk_grad
        if compiled and kind in CLOSED_FORM:  # the others take their gradient through autograd: eager
            fn = _compiled_chunk_grad()
        g_h = torch.empty_like(h_s)
        g_w = torch.zeros_like(w_s, dtype=torch.float32)
        g_b = torch.zeros_like(b_s, dtype=torch.float32) if b_s is not None else None
        kd_sum = ce_sum = h_s.new_zeros((), dtype=torch.float32)
        for i in range(0, h_s.shape[0], chunk):
            h = h_s[i:i + chunk]
            s_logits = F.linear(h, w_s, b_s)  # under autocast: in its dtype, as are the two products below
            t_logits = F.linear(h_t[i:i + chunk], w_t, b_t) if h_t is not None else None
            kd, ce, g = fn(s_logits, t_logits, labels[i:i + chunk], w_kd, w_ce, kind, temperature, beta, want_ce)
            g_h[i:i + chunk] = g @ w_s.to(g.dtype)
            g_w += g.t() @ h.to(g.dtype)
            if g_b is not None:
                g_b += g.float().sum(0)
            kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
        ctx.save_for_backward(g_h, g_w, g_b)
        ctx.w_dtypes = (w_s.dtype, b_s.dtype if b_s is not None else None)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return w_kd * kd_sum + w_ce * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, g_loss, _g_kd, _g_ce):
        g_h, g_w, g_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.w_dtypes
        return (g_h * g_loss.to(g_h.dtype), (g_w * g_loss).to(w_dtype),
                (g_b * g_loss).to(b_dtype) if g_b is not None else None) + (None,) * 7


def head_losses(h_s: torch.Tensor, h_t: torch.Tensor | None, labels: torch.Tensor, head_s: torch.nn.Module,
                head_t: torch.nn.Module | None, w_kd, w_ce, kind: str = "forward", temperature: float = 1.0,
                beta: float = 0.5, chunk: int = 1024, want_ce: bool = True,
                compiled: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w_kd * summed divergence + w_ce * summed cross-entropy, the summed divergence, the summed
    cross-entropy) over the positions whose label is >= 0, as chunked_losses computes them, with
    the first differentiable in h_s and head_s: the training loss of the output layer. h_t None:
    no divergence; want_ce False: no cross-entropy. w_kd, w_ce: weights (numbers or 0-dim
    tensors, e.g. a coefficient over the counted tokens); compiled: the per-chunk arithmetic
    through torch.compile."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; allowed: {', '.join(KINDS)}")
    w_kd, w_ce = (torch.as_tensor(w, dtype=torch.float32, device=h_s.device) for w in (w_kd, w_ce))
    w_t = head_t.weight if h_t is not None else None
    b_t = getattr(head_t, "bias", None) if h_t is not None else None
    return _HeadLoss.apply(h_s, head_s.weight, getattr(head_s, "bias", None), h_t, w_t, b_t, labels, w_kd, w_ce,
                           (kind, temperature, beta, chunk, want_ce, compiled))


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
