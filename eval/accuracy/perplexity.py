"""Perplexity under a stated protocol (sliding windows, per token).

Protocol: tokenize the whole text once (no special tokens added), keep the first
`max_tokens`, cut windows of `context_length` tokens every `stride` tokens, and score
each token at most once, with the context its window gives it: a window scores the
tokens not scored by the window before it, except its own first token, which has no
context. With stride < context_length every token but the text's first is scored; with
stride = context_length (non-overlapping windows, the common protocol and our default)
each window scores context_length - 1 tokens.
Perplexity = exp(mean negative log-likelihood per scored token).
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm


def windows(n_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) for each window; positions first_scored..end-1 are scored."""
    if context_length < 2 or stride < 1 or stride > context_length:
        raise ValueError("need context_length >= 2 and 1 <= stride <= context_length")
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context_length, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(engine, token_ids: torch.Tensor, context_length: int = 1024,
               stride: int | None = None, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Score `token_ids` (1-D) with `engine.score`; return the perplexity and its protocol."""
    stride = stride or context_length
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    wins = windows(len(ids), context_length, stride)
    nll, count = 0.0, 0
    for begin, end, first in tqdm(wins, desc="perplexity", unit="window", disable=not progress, leave=False):
        logp = engine.score(ids[begin:end].unsqueeze(0))[0]  # [end-begin-1], logp of ids[begin+1:end]
        scored = logp[first - begin - 1:]
        nll -= scored.double().sum().item()
        count += scored.numel()
    if count == 0:
        raise ValueError("no tokens to score: the text is shorter than 2 tokens")
    return {
        "perplexity": math.exp(nll / count),
        "nll_per_token": nll / count,
        "tokens_scored": count,
        "windows": len(wins),
        "protocol": {"context_length": context_length, "stride": stride, "max_tokens": max_tokens,
                     "tokens_in_text": int(token_ids.numel()), "unit": "token"},
    }
