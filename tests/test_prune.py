"""Magnitude pruning: exact counts, smallest weights go, skip lists and per-layer overrides."""

from __future__ import annotations

import pytest
import torch

from compress.prune.magnitude import MagnitudePruneConfig, magnitude_mask, magnitude_prune_


def test_mask_removes_exactly_the_smallest():
    w = torch.tensor([[0.5, -0.1, 3.0], [-2.0, 0.05, 1.0]])
    keep = magnitude_mask(w, 0.5)
    assert keep.tolist() == [[False, False, True], [True, False, True]]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.73, 0.99])
def test_mask_count_is_exact(sparsity):
    w = torch.randn(37, 53)
    pruned = (~magnitude_mask(w, sparsity)).sum().item()
    assert pruned == round(sparsity * w.numel())
    if 0 < pruned < w.numel():
        kept_min = w.abs()[magnitude_mask(w, sparsity)].min()
        dropped_max = w.abs()[~magnitude_mask(w, sparsity)].max()
        assert dropped_max <= kept_min


def test_mask_count_exact_with_ties():
    w = torch.zeros(10, 10)
    w[0, :5] = 1.0
    assert (~magnitude_mask(w, 0.5)).sum().item() == 50


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_mask_rejects_bad_sparsity(bad):
    with pytest.raises(ValueError):
        magnitude_mask(torch.ones(4), bad)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _sparsity(t):
    return (t == 0).float().mean().item()


def test_prune_model_per_layer_and_skip():
    model = _model()
    head = model.lm_head.weight.clone()
    emb = model.model.embed_tokens.weight.clone()
    measured = magnitude_prune_(model, MagnitudePruneConfig(sparsity=0.5))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert sorted(measured) == sorted(linears) and len(linears) == 14
    for name in linears:
        s = _sparsity(model.get_submodule(name).weight)
        assert abs(s - 0.5) < 1e-3, (name, s)
        assert measured[name] == pytest.approx(s, abs=1e-6)
    assert torch.equal(model.lm_head.weight, head)
    assert torch.equal(model.model.embed_tokens.weight, emb)


def test_prune_overrides_and_globs():
    model = _model()
    cfg = MagnitudePruneConfig(sparsity=0.5, skip=["lm_head", "*.self_attn.*"],
                               overrides={"model.layers.1.mlp.*": 0.25})
    measured = magnitude_prune_(model, cfg)
    assert not any("self_attn" in n for n in measured)
    assert _sparsity(model.model.layers[0].self_attn.q_proj.weight) == 0.0
    assert abs(_sparsity(model.model.layers[1].mlp.up_proj.weight) - 0.25) < 1e-3
    assert abs(_sparsity(model.model.layers[0].mlp.up_proj.weight) - 0.5) < 1e-3


def test_tied_lm_head_stays_dense_when_skipped():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    magnitude_prune_(model, MagnitudePruneConfig(sparsity=0.5, skip=["lm_head"]))
    assert _sparsity(model.model.embed_tokens.weight) == 0.0


def test_globs_that_match_nothing_are_named():
    from compress.errors import UserError
    from compress.prune.magnitude import check
    from compress.stage import StageContext

    cfg = MagnitudePruneConfig(skip=["lm_head", "*.attn.*"], overrides={"model.layers.9.*": 0.2})
    with pytest.raises(UserError) as e:
        check(cfg, _model(), StageContext(device="cpu", seed=0))
    assert e.value.lines == ["magnitude_prune.skip: '*.attn.*' matches no nn.Linear module",
                             "magnitude_prune.overrides: 'model.layers.9.*' matches no nn.Linear module"]
