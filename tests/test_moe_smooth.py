"""SmoothQuant and AWQ over mixture-of-experts layers: the norm before the experts balanced against
every expert's (and shared expert's) gate/up with the routers' columns scaled alike, so the
function and the routing stay; each expert's up -> down from its routed tokens; coverage of
every expert; AWQ's searched scales beat plain round-to-nearest on the experts."""

from __future__ import annotations

import pytest
import torch

from compress import moe, registry
from compress.models import load_model
from compress.pipeline import stage_context
from compress.quant import smooth, smooth_moe
from compress.recipe import parse_recipe
from conftest import MOE_ARCHS, make_tiny_moe, tiny_recipe
from test_moe import _calib, _run

IDS = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(MOE_ARCHS))
def moe_model(request, tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _apply(model_dir, text_file, stage: dict):
    """The stage on the linearized model, as the pipeline runs it; (reference model, model, info)."""
    recipe = parse_recipe(tiny_recipe(model_dir, text_file, [stage]))
    ref, tok = load_model(model_dir)
    model, _ = load_model(model_dir)
    moe.linearize(model)
    ctx = stage_context(recipe, "cpu", tok, model_dir)
    ctx.progress = False
    spec = recipe.stages[0]
    model, info = registry.get(spec.type).apply(model, spec.config, ctx)
    return ref, model, info


def _routing(model, ids=IDS):
    """Top-k expert indices of every MoE block, recorded from the routers' outputs."""
    seen, handles = [], []
    for name in moe.router_names(model):
        mod = model.get_submodule(name)
        if mod.weight.shape[0] > 1:   # the top-k router, not a shared expert's gate
            handles.append(mod.register_forward_hook(lambda m, i, o: seen.append(o[2].clone())))
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, seen


# ---------------------------------------------------------------------------- mappings

def test_moe_mappings_are_found_by_structure(tmp_path_factory):
    d = make_tiny_moe(tmp_path_factory.mktemp("q2") / "model", "qwen2_moe")
    model, _ = load_model(d)
    moe.linearize(model)
    plan = smooth.resolve(model, smooth.SMOOTHQUANT_MAPPINGS, {n for n, _ in model.named_modules()},
                          "smoothquant", required=True)
    maps = [mp for mp, note in plan[0] if note is None]
    norm = next(mp for mp in maps if mp.smooth == "post_attention_layernorm")
    assert len(norm.balance) == 4 * 2 + 2   # every expert's gate/up and the shared expert's
    assert "mlp.shared_expert.up_proj" in norm.balance and "mlp.experts.3.gate_proj" in norm.balance
    assert set(norm.follow) == {"mlp.gate", "mlp.shared_expert_gate"}   # routers take the scale
    downs = [mp for mp in maps if mp.balance[0].endswith("down_proj")]
    assert [mp.smooth for mp in downs] == ["mlp.shared_expert.up_proj"] + [f"mlp.experts.{k}.up_proj"
                                                                          for k in range(4)]
    assert [mp.per_expert for mp in downs] == [False] + [True] * 4


def test_mixtral_expert_names_and_a_clamped_gate_is_not_given_down_scales(tmp_path_factory):
    d = make_tiny_moe(tmp_path_factory.mktemp("mx") / "model", "mixtral")
    model, _ = load_model(d)
    moe.linearize(model)
    layer = model.model.layers[0]
    maps = smooth_moe.expand_all(layer, smooth.SMOOTHQUANT_MAPPINGS)
    assert ["mlp.experts.0.w2"] in [mp.balance for mp in maps]     # Mixtral's w1/w3/w2 per expert
    norm = next(mp for mp in maps if mp.smooth == "post_attention_layernorm")
    assert norm.balance[:2] == ["mlp.experts.0.w1", "mlp.experts.0.w3"]
    experts = layer.mlp.experts
    assert smooth_moe.up_is_linear(experts)
    experts.fused._apply_gate = lambda gu: gu[..., :64].sigmoid() * gu[..., 64:].clamp(-1, 1)  # gpt-oss style
    assert not smooth_moe.up_is_linear(experts)
    assert not any(mp.balance[0].endswith("w2") for mp in smooth_moe.expand_all(layer, smooth.SMOOTHQUANT_MAPPINGS))


# ---------------------------------------------------------------------------- SmoothQuant

def test_smoothquant_on_moe_keeps_logits_and_routing(moe_model, text_file):
    ref, model, info = _apply(moe_model, text_file, {"type": "smoothquant", "alpha": 0.8,
                                                     "calibration": _calib(text_file)})
    ref_logits, ref_routes = _routing(ref)
    logits, routes = _routing(model)
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
    assert len(routes) == 2 and all(torch.equal(a, b) for a, b in zip(routes, ref_routes))
    mods = info["modules"]
    e = moe.num_experts(model.model.layers[0].mlp.experts)
    gate = moe.checkpoint_layout(moe.model_type(model)).proj["gate"]
    for k in range(e):   # every expert's gate/up smoothed by the norm, with one scale for all of them
        row = mods[f"model.layers.0.mlp.experts.{k}.{gate}"]
        assert row["smoothed"] and row["by"] == "post_attention_layernorm"
        # the activations' range actually moved into the weights
        assert row["scale_max"] > row["scale_min"] and row["input_absmax_after"] != row["input_absmax_before"]
    norm_before = ref.model.layers[0].post_attention_layernorm.weight
    assert not torch.equal(model.model.layers[0].post_attention_layernorm.weight, norm_before)
    downs = [m for n, m in mods.items() if ".experts." in n and n.endswith(("down_proj", "w2"))]
    assert len(downs) == 2 * e and sum(m["smoothed"] for m in downs) == 2 * e - info["unsmoothed_experts"]


def test_smoothquant_leaves_rare_experts_unsmoothed_and_counts_them(text_file, tmp_path_factory):
    d = make_tiny_moe(tmp_path_factory.mktemp("q3") / "model", "qwen3_moe")
    _, model, info = _apply(d, text_file, {"type": "smoothquant",
                                           "calibration": _calib(text_file, min_expert_tokens=10**6)})
    assert info["unsmoothed_experts"] == 2 * 8
    downs = {n: m for n, m in info["modules"].items() if n.endswith("down_proj") and ".experts." in n}
    assert len(downs) == 16 and not any(m["smoothed"] for m in downs.values())
    assert all(m["smoothed"] for n, m in info["modules"].items() if n.endswith("gate_proj"))


def test_smoothquant_then_static_int8_on_moe_through_the_pipeline(moe_model, text_file, tmp_path):
    calib = _calib(text_file, calibrate_all_experts=True)
    stages = [{"type": "smoothquant", "alpha": 0.5, "calibration": calib},
              {"type": "int8", "activations": "static", "calibration": calib}]
    from compress.pipeline import run

    recipe = parse_recipe(tiny_recipe(moe_model, text_file, stages, name="sq"))
    run(recipe, tmp_path / "sq", evaluate_outputs=False)
    import json

    infos = [json.loads((d / "stage.json").read_text())["info"]
             for d in sorted((tmp_path / "sq" / "stages").iterdir())]
    sq, q = infos
    for info in infos:   # every expert weight changed by each stage
        cov = info["coverage"]["by_kind"]
        assert cov["expert"]["changed"] == cov["expert"]["params"] > 0
    assert sq["unsmoothed_experts"] == 0 and sq["coverage"]["by_kind"]["router"]["changed"] > 0
    assert q["coverage"]["by_kind"]["router"]["changed"] == 0      # routers stay 16-bit
    assert all("input_scale" in m for n, m in q["modules"].items() if ".experts." in n)
