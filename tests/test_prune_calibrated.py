"""Wanda, SparseGPT, N:M and OWL: the pure maths on random layers, then the stages on the tiny
Llama through the pipeline, prune-then-quantize included."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from squeeze import pipeline
from compress.errors import UserError
from compress.models import load_model
from compress.prune.masks import nm_mask, owl_sparsities, parse_nm, row_mask, wanda_mask, wanda_score
from compress.prune.sparsegpt import SparseGPTConfig, sparsegpt_prune
from compress.prune.wanda import WandaConfig
from compress.quant.gptq_solver import output_error
from squeeze.recipe import parse_recipe
from conftest import tiny_recipe


def _layer(out=64, n_in=256, n=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    x = torch.randn(n, n_in, generator=g) @ mix + 0.1 * torch.randn(n, n_in, generator=g)
    x *= torch.exp(0.8 * torch.randn(n_in, generator=g))  # channel scales spread widely, as in LLMs
    w = 0.05 * torch.randn(out, n_in, generator=g)
    return w, x


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.7])
def test_row_mask_prunes_exactly_per_row_and_the_lowest(sparsity):
    score = torch.rand(16, 96)
    keep = row_mask(score, sparsity)
    assert (~keep).sum(1).tolist() == [round(sparsity * 96)] * 16
    if 0 < sparsity:
        for r in range(16):
            assert score[r][~keep[r]].max() <= score[r][keep[r]].min()


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_mask_keeps_exactly_n_of_every_m(nm):
    n, m = parse_nm(nm)
    score = torch.rand(8, 64)
    keep = nm_mask(score, n, m)
    assert (keep.reshape(8, -1, m).sum(2) == n).all()
    g, k = score.reshape(8, -1, m), keep.reshape(8, -1, m)
    assert (torch.where(k, g, torch.inf).amin(2) >= torch.where(k, -torch.inf, g).amax(2)).all()


@pytest.mark.parametrize("bad", ["4:2", "2:2", "0:4", "2-4", "a:b"])
def test_bad_nm_patterns_are_refused(bad):
    with pytest.raises(ValueError, match="N:M"):
        parse_nm(bad)


def test_wanda_weighs_magnitude_by_input_norm():
    w = torch.tensor([[1.0, -1.0, 0.5, 0.2]])
    sq = torch.tensor([0.01, 4.0, 4.0, 100.0])  # channel 0 is quiet, channel 3 loud
    assert torch.allclose(wanda_score(w, sq), torch.tensor([[0.1, 2.0, 1.0, 2.0]]))
    assert wanda_mask(w, sq, 0.5).tolist() == [[False, True, False, True]]


def _errors(w, x, sparsity, nm=None):
    h = 2 * x.T @ x / x.shape[0]
    sq = x.square().mean(0)
    pattern = parse_nm(nm)
    mag = w * (nm_mask(w.abs(), *pattern) if pattern else row_mask(w.abs(), sparsity))
    wan = w * wanda_mask(w, sq, sparsity, pattern)
    sg = sparsegpt_prune(w, h, sparsity, pattern)
    return {k: output_error(w, v, h) for k, v in (("magnitude", mag), ("wanda", wan), ("sparsegpt", sg.w))}, sg


@pytest.mark.parametrize("nm", [None, "2:4", "4:8"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_correlated_inputs(nm):
    w, x = _layer()
    err, sg = _errors(w, x, 0.5, nm)
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err
    assert ((sg.w == 0) == ~sg.keep).all()
    if nm:
        n, m = parse_nm(nm)
        assert (sg.keep.reshape(64, -1, m).sum(2) == n).all()
    else:  # exactly half of every row (two blocks of 128 columns, 64 pruned in each)
        assert (~sg.keep).sum(1).tolist() == [128] * 64


def test_sparsegpt_error_per_row_is_its_output_error():
    w, x = _layer()
    h = 2 * x.T @ x / x.shape[0]
    r = sparsegpt_prune(w, h, 0.5)
    hd = h.clone()
    hd.diagonal().add_(0.01 * h.diagonal().mean())
    d = w - r.w
    torch.testing.assert_close(r.row_error, ((d @ hd) * d).sum(1), rtol=1e-3, atol=1e-6)


def test_owl_keeps_the_mean_and_prunes_outlier_layers_less():
    ratios = [0.01, 0.05, 0.02, 0.08, 0.03]
    s = owl_sparsities(ratios, 0.5, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.5)
    assert max(s) - min(s) == pytest.approx(0.16)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order] == sorted(s, reverse=True)


def test_config_conflicts_are_refused():
    with pytest.raises(ValidationError, match="nm 2:4 means sparsity 0.5"):
        WandaConfig(nm="2:4", sparsity=0.3)
    with pytest.raises(ValidationError, match="allocation owl and overrides do not apply"):
        SparseGPTConfig(nm="2:4", allocation="owl")
    with pytest.raises(ValidationError):
        WandaConfig(sparsity=1.0)
    assert WandaConfig(nm="4:8").target == 0.5


# ---------------------------------------------------------------------------- stages, end to end

def _calib(text_file):
    return {"dataset": str(text_file), "n_samples": 8, "seq_len": 64}


def _run(tiny_model, text_file, stages, name="p"):
    rec = tiny_recipe(tiny_model, text_file, stages, name=name)
    rec["eval"]["speed"] = None
    report = pipeline.run(parse_recipe(rec))
    return report


@pytest.mark.parametrize("stage", [
    {"type": "wanda", "sparsity": 0.5},
    {"type": "sparsegpt", "sparsity": 0.5},
    {"type": "wanda", "nm": "2:4"},
    {"type": "sparsegpt", "nm": "4:8"},
    {"type": "magnitude_prune", "nm": "2:4"},
], ids=lambda s: f"{s['type']}-{s.get('nm') or s.get('sparsity')}")
def test_pruning_stages_hit_their_sparsity_exactly(stage, tiny_model, text_file, home):
    if stage["type"] != "magnitude_prune":
        stage = {**stage, "calibration": _calib(text_file)}
    rep = _run(tiny_model, text_file, [stage])
    art = rep["artifacts"][0]
    sd = load_file(art["model_dir"] + "/model.safetensors")
    proj = [k for k in sd if k.endswith("proj.weight")]
    assert len(proj) == 14
    nm = parse_nm(stage.get("nm"))
    for k in proj:
        w = sd[k]
        if nm:
            assert ((w != 0).reshape(w.shape[0], -1, nm[1]).sum(2) <= nm[0]).all(), k
        assert (w == 0).float().mean().item() == pytest.approx(0.5, abs=0.002), k
    assert (sd["lm_head.weight"] != 0).all()
    if stage["type"] != "magnitude_prune":
        info = art["stage_info"]
        assert info["pruned_layers"] == 14 and info["sparsity_of_pruned"] == pytest.approx(0.5, abs=0.002)
        assert set(info["layer_sparsity"]) == {k[:-len(".weight")] for k in proj}


def test_owl_allocation_varies_by_layer_around_the_target(tiny_model, text_file, home):
    stage = {"type": "wanda", "sparsity": 0.5, "allocation": "owl", "owl_lambda": 0.1,
             "calibration": _calib(text_file)}
    info = _run(tiny_model, text_file, [stage])["artifacts"][0]["stage_info"]
    targets = list(info["owl_layer_targets"].values())
    assert len(targets) == 2 and sum(targets) / 2 == pytest.approx(0.5, abs=1e-3)
    assert max(targets) - min(targets) == pytest.approx(0.2, abs=1e-3)  # two layers: the full ±lambda


def test_sparse_then_quantized_keeps_the_zeros(tiny_model, text_file, home):
    stages = [{"type": "sparsegpt", "nm": "2:4", "calibration": _calib(text_file)},
              {"type": "gptq", "group_size": 32, "calibration": _calib(text_file)}]
    rep = _run(tiny_model, text_file, stages, name="sq")
    sparse_dir, quant_dir = (a["model_dir"] for a in rep["artifacts"])
    sparse, _ = load_model(sparse_dir)
    quant, _ = load_model(quant_dir)  # dequantized on load
    for name, m in sparse.named_modules():
        if name.endswith("proj"):
            zero = m.weight == 0
            q = quant.get_submodule(name).weight
            assert (q[zero] == 0).all(), name  # every pruned weight stays exactly zero
            assert (q[~zero] != 0).float().mean() > 0.9  # and the rest are quantized, not pruned
    q = json.loads(open(quant_dir + "/config.json").read())["quantization_config"]
    assert q["format"] == "pack-quantized"


def test_nm_that_does_not_divide_a_layer_is_named(tiny_model, text_file, home):
    with pytest.raises(UserError, match="nm: 3 does not divide the input width 64 of model.layers.0.self_attn.q_proj"):
        _run(tiny_model, text_file, [{"type": "wanda", "nm": "2:3", "calibration": _calib(text_file)}])
    assert not (home / "p").exists()


@pytest.mark.vllm
def test_stage_info_holds_what_the_recipes_engines_run_differently(tiny_model, text_file, home):
    """An N:M checkpoint runs dense on vLLM: the stage's info says so, from the engine's facts for
    the version installed; an unstructured one, which every engine runs as written, has no note."""
    pytest.importorskip("vllm")
    from eval.engines import engine_class

    for name, extra in (("nmv", {"nm": "2:4"}), ("unv", {"sparsity": 0.5})):
        rec = tiny_recipe(tiny_model, text_file, [{"type": "wanda", **extra, "calibration": _calib(text_file)}],
                          name=name)
        rec["eval"]["engines"] = ["hf", "vllm"]
        pipeline.run(parse_recipe(rec), evaluate_outputs=False)
        (stage_json,) = (home / name / "stages").glob("*-wanda/stage.json")
        info = json.loads(stage_json.read_text())["info"]
        if "nm" in extra:
            major_minor = ".".join(engine_class("vllm").version().split(".")[:2])
            assert info["vllm_note"].startswith(f"vLLM {major_minor} runs 2:4 checkpoints as dense"), info["vllm_note"]
        else:
            assert "vllm_note" not in info
