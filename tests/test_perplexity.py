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
    score_rows = 1

    def __init__(self, vocab):
        self.vocab_size = vocab

    def score(self, ids):
        return torch.full((ids.shape[0], ids.shape[1] - 1), -math.log(self.vocab_size))


class NextTokenEngine:
    """Gives probability p to the true next token when it is (prev + 1) % V, else (1-p)/(V-1)."""

    name = "stub"

    def __init__(self, vocab, p, score_rows=1):
        self.vocab_size, self.p, self.score_rows = vocab, p, score_rows
        self.calls = []  # the shape of each score() call

    def score(self, ids):
        self.calls.append(tuple(ids.shape))
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


@pytest.mark.parametrize("stride", [16, 5])
def test_windows_batched_per_call_give_the_same_perplexity(stride):
    """An engine taking 4 rows per call (vLLM's kind) gets equal-length windows 4 at a time, the
    shorter last window alone, and the figure is the one-window-per-call figure exactly."""
    ids = torch.randint(0, 10, (203,), generator=torch.Generator().manual_seed(0))
    one, four = NextTokenEngine(10, 0.6), NextTokenEngine(10, 0.6, score_rows=4)
    a = perplexity(one, ids, context_length=16, stride=stride, progress=False)
    b = perplexity(four, ids, context_length=16, stride=stride, progress=False)
    assert b == a and all(c[0] == 1 for c in one.calls)
    n = len(one.calls)
    assert sum(c[0] for c in four.calls) == n and len(four.calls) == -(-(n - 1) // 4) + 1
    assert four.calls[0] == (4, 16) and four.calls[-1][1] < 16 and four.calls[-1][0] == 1


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


def test_vllm_scores_a_batch_of_windows_in_one_call_without_token_text():
    """vLLM's score() hands all rows to one generate call and asks for log-probabilities only:
    no text per scored position (detokenize=False), which took most of a window's time."""
    from types import SimpleNamespace

    from eval.engines.vllm import VLLMEngine

    calls = []

    def generate(prompts, params, use_tqdm):
        calls.append((len(prompts), params))
        return [SimpleNamespace(prompt_logprobs=[None] + [{t: SimpleNamespace(logprob=-float(t))} for t in
                                                         p["prompt_token_ids"][1:]]) for p in prompts]

    eng = VLLMEngine.__new__(VLLMEngine)
    eng.llm = SimpleNamespace(generate=generate)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    assert eng.score(ids).tolist() == [[-2.0, -3.0], [-5.0, -6.0]]
    (n, params), = calls
    assert n == 2 and params.detokenize is False and params.prompt_logprobs == 0 and params.max_tokens == 1
