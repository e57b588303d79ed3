"""Perplexity protocol: windows score each token once; known answers on stub engines."""

from __future__ import annotations

import math

import pytest
import torch

from eval.accuracy.perplexity import perplexity, windows


@pytest.mark.parametrize("n,ctx,stride", [(100, 16, 16), (100, 16, 5), (17, 16, 16), (16, 16, 8), (2, 4, 4),
                                          (1000, 64, 1)])
def test_windows_score_each_position_at_most_once(n, ctx, stride):
    scored = []
    for begin, end, first in windows(n, ctx, stride):
        assert end - begin <= ctx and begin < first <= end
        scored += range(first, end)
    if stride < ctx:  # overlapping windows: every token but the first has context
        assert scored == list(range(1, n))
    else:  # non-overlapping: each window's first token is not scored
        assert scored == [t for t in range(1, n) if t % ctx != 0]


class UniformEngine:
    """Every token equally likely: the perplexity is the vocabulary size, exactly."""

    name = "uniform"

    def __init__(self, vocab):
        self.vocab_size = vocab

    def score(self, ids):
        return torch.full((ids.shape[0], ids.shape[1] - 1), -math.log(self.vocab_size))


class NextTokenEngine:
    """Gives probability p to the true next token when it is (prev + 1) % V, else (1-p)/(V-1)."""

    name = "stub"

    def __init__(self, vocab, p):
        self.vocab_size, self.p = vocab, p

    def score(self, ids):
        hit = ids[:, 1:] == (ids[:, :-1] + 1) % self.vocab_size
        other = (1 - self.p) / (self.vocab_size - 1)
        return torch.where(hit, math.log(self.p), math.log(other)).float()


def test_uniform_model_perplexity_is_vocab_size():
    ids = torch.randint(0, 50, (300,))
    out = perplexity(UniformEngine(50), ids, context_length=32, stride=32, progress=False)
    assert out["perplexity"] == pytest.approx(50.0, rel=1e-6)
    assert out["tokens_scored"] == 300 - math.ceil(300 / 32)  # each window's first token unscored


def test_known_answer_counting_sequence():
    ids = torch.arange(200) % 10  # every step is a "hit"
    out = perplexity(NextTokenEngine(10, 0.8), ids, context_length=16, stride=8, max_tokens=101,
                     progress=False)
    assert out["perplexity"] == pytest.approx(1 / 0.8, rel=1e-6)
    assert out["tokens_scored"] == 100 and out["protocol"]["max_tokens"] == 101


def test_hf_engine_matches_transformers_loss(tiny_model):
    """With stride = context, our perplexity is exp(mean of transformers' own per-window loss)."""
    from eval.engines.hf import HFEngine

    eng = HFEngine.load(tiny_model)
    ids = torch.randint(0, eng.vocab_size, (3 * 32,), generator=torch.Generator().manual_seed(0))
    ours = perplexity(eng, ids, context_length=32, progress=False)
    with torch.no_grad():
        losses = [eng.model(w[None], labels=w[None]).loss.item() for w in ids.view(3, 32)]
    assert ours["perplexity"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-4)
    assert ours["tokens_scored"] == 3 * 31
