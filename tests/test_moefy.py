"""MoEfication (compress.moefy): a Llama's MLPs split into experts as a transformers Mixtral model.
With all experts active and a zero router it computes the Llama's function; with top-k < E it
runs, routes and differs. The built-in sources `smollm2-moe[-topK]` are made once and cached.
The real SmolLM2 test is slow (it builds the MoE form from the imported model)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from compress import moefy as M
from conftest import TEXT, make_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = make_tiny_llama(tmp_path_factory.mktemp("moefy") / "llama", intermediate=128)
    return d, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def _ids(vocab: int, n: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_all_experts_with_a_zero_router_equal_the_llama(llama, tmp_path):
    d, model = llama
    ids = _ids(model.config.vocab_size, 2, 48, 0)
    moe = M.moefy(model, num_experts=8, top_k=8)
    assert type(moe).__name__ == "MixtralForCausalLM"
    mlp = moe.model.layers[0].mlp
    assert tuple(mlp.experts.gate_up_proj.shape) == (8, 2 * 16, 64) and tuple(mlp.experts.down_proj.shape) == (8, 64, 16)
    assert torch.count_nonzero(mlp.gate.weight) == 0
    want = model(ids).logits
    torch.testing.assert_close(moe(ids).logits, want, atol=1e-4, rtol=0)
    moe.save_pretrained(tmp_path / "moe")  # and as a checkpoint transformers reads back
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    torch.testing.assert_close(again(ids).logits, want, atol=1e-4, rtol=0)
    from compress.moe import fused_experts

    assert len(fused_experts(again)) == model.config.num_hidden_layers  # what the weight stages linearize
    grouped = M.moefy(model, 8, 8, _ids(model.config.vocab_size, 8, 64, 1))  # channels grouped by co-activation
    assert torch.count_nonzero(grouped.model.layers[0].mlp.gate.weight) == 0
    assert not torch.equal(grouped.model.layers[0].mlp.experts.down_proj, mlp.experts.down_proj)
    torch.testing.assert_close(grouped(ids).logits, want, atol=1e-4, rtol=0)


def test_config_copies_the_llama_and_refuses_what_mixtral_cannot_hold():
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, rms_norm_eps=3e-6, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    moe = M.moe_config(cfg, 4, 2)
    assert (moe.vocab_size, moe.hidden_size, moe.intermediate_size, moe.num_local_experts, moe.num_experts_per_tok) == \
        (300, 64, 24, 4, 2)
    assert moe.rms_norm_eps == 3e-6 and moe.tie_word_embeddings and moe.rope_parameters["rope_theta"] == 12345.0
    assert moe.sliding_window is None and moe.head_dim == 16
    with pytest.raises(ValueError, match="must divide"):
        M.moe_config(cfg, 5, 2)
    with pytest.raises(ValueError, match="biases"):
        M.moe_config(LlamaConfig(mlp_bias=True), 8, 2)


@torch.no_grad()
@pytest.mark.parametrize("partition,router,refit", [("coact", "lsq", M.REFIT), ("contiguous", "gate_mean", None),
                                                    ("weights", "lsq", None)])
def test_top_k_below_the_experts_routes_near_1_over_k_and_differs(llama, partition, router, refit):
    _, model = llama
    ids, calib = _ids(model.config.vocab_size, 2, 48, 0), _ids(model.config.vocab_size, 8, 64, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe = M.moefy(model, 8, 2, calib, partition, router, refit)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the Llama is left as it was"
    assert moe.config.num_experts_per_tok == 2
    dense, out = model(ids).logits, moe(ids).logits
    assert torch.isfinite(out).all() and (out - dense).abs().max() > 1e-3
    h = torch.randn(64, model.config.hidden_size)
    for layer in moe.model.layers:
        _, w, idx = layer.mlp.gate(h)
        assert idx.shape == (64, 2) and (w - 0.5).abs().max() < 0.05  # near 1/k: k · w · y_e ≈ y_e
    parts = torch.cat([M.partition(layer.mlp, 8, partition, torch.randn(32, 64)).flatten() for layer in model.model.layers[:1]])
    assert torch.equal(parts.sort().values, torch.arange(128)), "every channel in exactly one expert"


@torch.no_grad()
def test_fitted_router_loses_less_than_the_gate_mean_on_correlated_channels():
    """Experts chosen by the least-squares router keep more of the MLP's output than ones chosen by
    the mean of their gate rows, on calibration-like inputs."""
    torch.manual_seed(0)
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=64, hidden_act="silu"))
    x = torch.randn(2048, 32) @ torch.randn(32, 32) * 0.5
    parts = M.partition(mlp, 8, "coact", x)
    y, ys = mlp(x), M.expert_norms(mlp, parts, x)
    lost = {}
    for kind in ("lsq", "gate_mean"):
        w = M.route(M.router(mlp, parts, kind, x), x, 2)
        h = M._expert_acts(torch.stack([torch.cat([mlp.gate_proj.weight[p], mlp.up_proj.weight[p]]) for p in parts]),
                           w * 2, x)
        out = h @ torch.cat([mlp.down_proj.weight[:, p] for p in parts], dim=1).T
        lost[kind] = ((out - y).pow(2).sum() / y.pow(2).sum()).item()
    assert ys.shape == (2048, 8) and lost["lsq"] < lost["gate_mean"], lost


def test_builtin_moe_source_is_made_once_and_cached(llama, home, tmp_path, monkeypatch):
    from compress import models

    d, _ = llama
    base = home / "_models" / "tiny"
    shutil.copytree(d, base)
    (base / "manifest.json").write_text("{}")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    cal = {"dataset": str(text), "n_samples": 4, "seq_len": 64}
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny", {"dir": "tiny"})
    monkeypatch.setitem(models.BUILTIN_MODELS, "tiny-moe-top2",
                        {"base": "tiny", "dir": "tiny-moe2", "experts": 8, "top_k": 2, "calibration": cal})
    out = models.resolve_model("tiny-moe-top2")
    assert out == home / "_models" / "tiny-moe2" and models.local_model_dir("tiny-moe-top2") == out
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    how = json.loads((out / "manifest.json").read_text())["source"]["moefy"]
    assert how["top_k"] == 2 and how["partition"] == "coact" and how["router"] == "lsq" and how["calibration"] == cal
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary directory left"
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert models.resolve_model("tiny-moe-top2") == out and (out / "model.safetensors").stat().st_mtime_ns == stamp


# ---------------------------------------------------------------------------- the real model

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_moe_equals_smollm2(smol_home, monkeypatch):
    from compress.calibration import dataset_tokens
    from compress.models import load_model, resolve_model

    monkeypatch.setenv("SQUEEZE_HOME", str(smol_home))
    dense, tok = load_model(resolve_model("smollm2"))
    moe, _ = load_model(resolve_model("smollm2-moe"))
    assert type(moe).__name__ == "MixtralForCausalLM" and moe.config.num_local_experts == 8
    assert moe.config.intermediate_size == 192 and moe.config.num_experts_per_tok == 8
    ids = dataset_tokens(tok, "wikitext2")[:320][None]
    want, got = dense(ids).logits, moe(ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
