"""SmoothQuant and AWQ over mixture-of-experts layers: the norm before the experts balanced against
every expert's (and shared expert's) gate/up with the routers' columns scaled alike, so the
function and the routing stay; each expert's up -> down from its routed tokens; coverage of
every expert; AWQ's searched scales beat plain round-to-nearest on the experts."""

from __future__ import annotations

import pytest
import torch

from compress import moe
from compress.models import load_model
from compress.quant import smooth, smooth_moe
from squeeze.recipe import parse_recipe
from conftest import MOE_ARCHS, apply_linearized, make_tiny_moe, tiny_recipe
from test_moe import _calib, _run

IDS = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(MOE_ARCHS))
def moe_model(request, tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp(request.param) / "model", request.param)


def _apply(model_dir, text_file, stage: dict):
    """The stage on the linearized model, as the pipeline runs it; (reference model, model, info)."""
    ref, _ = load_model(model_dir)
    model, _, info = apply_linearized(model_dir, text_file, stage)
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
    from squeeze.pipeline import run

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


# ---------------------------------------------------------------------------- AWQ

def _outliers(n_tokens, width, seed):
    """Correlated inputs with a few large channels (what AWQ's scales are for)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width ** 0.5
    x = torch.randn(n_tokens, width, generator=g) @ mix + 0.3 * torch.randn(n_tokens, width, generator=g)
    return x * torch.where(torch.arange(width) % 16 == 0, 12.0, 1.0)


def awq_vs_rtn_on_experts(qwen3_dir, search=True):
    """(AWQ's, RTN's) output error of every expert's gate/up, summed over the tokens routed to it, with
    the norm's scale searched over all experts together as the stage does."""
    from compress.quant.awq_search import AWQCollector, mean_over, search_scales
    from compress.quant.grid import Grid, rtn

    model, _ = load_model(qwen3_dir)
    moe.linearize(model)
    block = model.model.layers[0].mlp
    x = _outliers(1024, 64, 0)
    _, _, index = block.gate(x)
    grid = Grid(bits=4, symmetric=False, group_size=32)
    groups, stats, xs = [], [], []
    for k, mlp in enumerate(block.experts):
        xe = x[(index == k).any(-1)]
        st = AWQCollector(64, "cpu")
        st.add_batch(xe)
        ws = [mlp.role("gate").weight.float(), mlp.role("up").weight.float()]
        groups.append((ws, st.h, st.n))
        stats.append(st)
        xs.append(xe)
    s = search_scales(groups, mean_over(stats), grid, 20, True)[0] if search else torch.ones(64)
    err_awq = err_rtn = 0.0
    for (ws, _, _), xe in zip(groups, xs):
        for w in ws:
            err_awq += (xe @ (w - rtn(w * s, grid)[0] / s).T).square().sum().item()
            err_rtn += (xe @ (w - rtn(w, grid)[0]).T).square().sum().item()
    return err_awq, err_rtn


def test_awq_beats_rtn_on_the_experts_routed_tokens(tmp_path_factory):
    d = make_tiny_moe(tmp_path_factory.mktemp("q3a") / "model", "qwen3_moe")
    err_awq, err_rtn = awq_vs_rtn_on_experts(d)
    assert err_awq < 0.9 * err_rtn, (err_awq, err_rtn)


def test_awq_on_moe_covers_every_expert_and_scales_routers_exactly(moe_model, text_file, tmp_path):
    stage = {"type": "awq", "group_size": 32, "n_grid": 10, "calibration": _calib(text_file)}
    out, info = _run(moe_model, text_file, [stage], tmp_path, "awq")
    cov = info["coverage"]["by_kind"]
    assert cov["expert"]["changed"] == cov["expert"]["params"] > 0 and info["coverage"]["changed_fraction"] > 0.9
    e = 8 if "qwen3" in str(moe_model) else 4
    shared = 3 if "qwen2" in str(moe_model) else 0
    assert info["quantized_modules"] == 2 * (4 + 3 * e + shared)   # routers stay 16-bit
    mods = info["modules"]
    gate = [n for n in mods if ".experts.0." in n][0]
    assert mods[gate]["by"] == "post_attention_layernorm" and mods[gate]["search_loss_over_rtn"] <= 1.0
    ratios = [m["search_loss_over_rtn"] for n, m in mods.items() if ".experts." in n and "search_loss_over_rtn" in m]
    assert max(ratios) <= 1.0 and min(ratios) < 1.0
    # the router's columns took exactly the norm's scale: routing of the unquantized function is kept
    ref, _ = load_model(moe_model)
    art, _ = load_model(out)
    for i in (0, 1):
        if not mods[f"model.layers.{i}.{gate.split('.', 3)[3]}"]["scaled"]:
            continue
        s = ref.model.layers[i].post_attention_layernorm.weight / art.model.layers[i].post_attention_layernorm.weight
        r_ref, r_art = ref.model.layers[i].mlp.gate.weight, art.model.layers[i].mlp.gate.weight
        assert torch.allclose(r_art, r_ref * s[None, :], rtol=1e-5, atol=1e-7)


def test_awq_rare_experts_fall_back_to_rtn(text_file, tmp_path_factory, tmp_path):
    d = make_tiny_moe(tmp_path_factory.mktemp("q3b") / "model", "qwen3_moe")
    stage = {"type": "awq", "group_size": 32, "n_grid": 5, "quantizer": "gptq",
             "calibration": _calib(text_file, min_expert_tokens=10**6)}
    _, info = _run(d, text_file, [stage], tmp_path, "rare")
    assert info["fallback_modules"] == 2 * 8 * 3
    experts = {n: m for n, m in info["modules"].items() if ".experts." in n}
    assert all(m["fallback"] == "rtn" and "tokens" in m for m in experts.values())
    assert not any(m["scaled"] for n, m in experts.items() if n.endswith("down_proj"))
    cov = info["coverage"]["by_kind"]
    assert cov["expert"]["changed"] == cov["expert"]["params"]
