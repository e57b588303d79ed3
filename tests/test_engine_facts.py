"""Engine facts (eval.engines.facts) as the compression stages see them (compress.engine_facts):
keyed by engine, platform and the version detected, messages naming that version; and the
engine table callers ask instead of branching on a name (eval.engines.registry)."""

from __future__ import annotations

import pytest
import torch

from compress.engine_facts import BitsAndBytes, NMSparse, W8A8, WeightOnlyInt, engine_notes, engine_problems
from compress.export.compressed_tensors import WeightScheme
from compress.spec import ModelSpec
from eval.config import EvalConfig
from eval.engines import engine_class, engine_facts
from eval.engines.facts import VLLMFacts
from eval.engines.facts_lookup import lookup
from eval.engines.facts_vllm_cpu import VLLMCpuFacts

W8_GROUP = WeightOnlyInt(frozenset({WeightScheme(8, 128, False, "group")}))
W4_GROUP = WeightOnlyInt(frozenset({WeightScheme(4, 128, True, None)}))


def test_messages_name_the_detected_version():
    assert lookup("vllm", "cpu", "0.32.0", "bfloat16").problems(BitsAndBytes()) == [
        "vllm-cpu 0.32 has no bitsandbytes kernels (vLLM runs bitsandbytes checkpoints on CUDA GPUs only); "
        "leave vllm out of eval.engines, or run on a GPU"]
    later = lookup("vllm", "cpu", "0.40.1", "bfloat16")  # no newer row: the 0.32 facts, said of 0.40
    assert isinstance(later, VLLMCpuFacts) and later.problems(BitsAndBytes())[0].startswith("vllm-cpu 0.40 has")
    absent = lookup("vllm", "cpu", None, "bfloat16")  # not installed: the row's own version
    assert absent.problems(BitsAndBytes())[0].startswith("vllm-cpu 0.32 has")


def test_platform_picks_the_row(monkeypatch):
    import eval.engines.facts_vllm_cpu as F

    monkeypatch.setattr(F, "cpu_flags", lambda: frozenset({"avx512f"}))  # the same facts on any machine
    gpu = lookup("vllm", "cuda:0", "0.26.0", "bfloat16")
    assert type(gpu) is VLLMFacts and gpu.problems(BitsAndBytes()) == [] and gpu.problems(W8_GROUP) == []
    cpu = lookup("vllm", "cpu", "0.32.0", "float32")
    assert [p.split(", which ")[1] for p in cpu.problems(W8_GROUP)] == [
        "has no float32 path; set eval.vllm.dtype: bfloat16",
        "is 4-bit only; use bits: 4 or leave vllm out of eval.engines",
        "refuses activation order 'group'; use actorder: weight"]
    both = W8A8(fp8=False, dynamic=False, experts=True)  # int8 static experts: refused on every platform
    assert gpu.problems(both) and set(gpu.problems(both)) <= set(cpu.problems(both))


def test_int8_experts_on_vllm_cpu_need_amx_tiles(monkeypatch):
    import eval.engines.facts_vllm_cpu as F

    cpu, experts = lookup("vllm", "cpu", "0.32.0", "bfloat16"), W8A8(fp8=False, dynamic=True, experts=True)
    monkeypatch.setattr(F.importlib.util, "find_spec", lambda name: None)  # no zentorch
    for flags, refused in ((frozenset({"avx512f"}), True), (frozenset({"avx512f", "amx_tile"}), False)):
        monkeypatch.setattr(F, "cpu_flags", lambda: flags)
        said = [p for p in cpu.problems(experts) if "AMX tiles only" in p]
        assert bool(said) == refused, (flags, cpu.problems(experts))


def test_weight_only_int_on_vllm_cpu_needs_avx512(monkeypatch):
    """vllm-cpu 0.32's AVX2 build has no CPUWNA16 kernel (cpu_gemm_wna16; an AMD EPYC without
    AVX-512 failed to start a W4A16 artifact): refused in one line there, taken with AVX-512."""
    import eval.engines.facts_vllm_cpu as F

    cpu = lookup("vllm", "cpu", "0.32.0", "bfloat16")
    for flags, refused in ((frozenset({"avx2"}), True), (frozenset({"avx2", "avx512f"}), False), (None, False)):
        monkeypatch.setattr(F, "cpu_flags", lambda: flags)
        said = [p for p in cpu.problems(W4_GROUP) if "AVX-512 only" in p]
        assert bool(said) == refused and all("\n" not in p for p in said), (flags, cpu.problems(W4_GROUP))


def test_transformers_runs_everything_and_notes_are_keyed_by_engine():
    facts = engine_facts(EvalConfig(engines=["hf", "vllm"]), ModelSpec(dtype="bfloat16"), "cpu")
    assert [f.name for f in facts] == ["hf", "vllm"] and [f.dtype for f in facts] == ["bfloat16", "bfloat16"]
    for c in (W8_GROUP, W8A8(True, False), BitsAndBytes(), NMSparse("2:4")):
        assert facts[0].problems(c) == [] and facts[0].notes(c) == []
    assert engine_problems(facts, W8_GROUP) == facts[1].problems(W8_GROUP)
    assert list(engine_notes(facts, W8A8(fp8=False, dynamic=False))) == ["vllm_note"]
    assert engine_notes(facts[:1], NMSparse("2:4")) == {}


def test_the_vllm_dtype_defaults_to_the_models():
    cfg = EvalConfig(engines=["vllm"], vllm={"dtype": "float16"})
    assert engine_facts(cfg, ModelSpec(dtype="float32"), "cpu")[0].dtype == "float16"
    assert engine_facts(EvalConfig(engines=["vllm"]), ModelSpec(dtype="float32"), "cpu")[0].dtype == "float32"


def test_vllm_engine_args_pass_through_and_never_shadow_a_named_option():
    from pydantic import ValidationError

    from eval.tune.trials import vllm_base

    cfg = EvalConfig(engines=["vllm"], vllm={"engine_args": {"load_format": "dummy", "max_num_seqs": 64}})
    opts = engine_class("vllm").options(cfg, ModelSpec(dtype="bfloat16"))
    assert opts["load_format"] == "dummy" and opts["max_num_seqs"] == 64 and "engine_args" not in opts
    assert vllm_base(cfg.vllm, ModelSpec(), "cpu")["load_format"] == "dummy"  # servers and tuning trials too
    with pytest.raises(ValidationError, match="engine_args: dtype has its own field here"):
        EvalConfig(engines=["vllm"], vllm={"engine_args": {"dtype": "float16"}})


def test_the_engine_table():
    assert engine_class("hf").name == "hf" and engine_class("vllm").name == "vllm"
    with pytest.raises(ValueError, match="unknown engine 'tgi'; allowed: hf, vllm"):
        engine_class("tgi")
    vllm = engine_class("vllm")
    opts = {"gpu_memory_utilization": 0.8, "dtype": "bfloat16"}
    assert vllm.paired_options(opts, "cuda")["gpu_memory_utilization"] == 0.4
    assert vllm.paired_options(opts, "cpu") == opts and engine_class("hf").paired_options(opts, "cuda") == opts
    assert vllm.free_memory("cuda") is None and engine_class("hf").free_memory("cpu") > 0


def test_vllm_gpu_refuses_8bit_zero_points_where_machete_cannot_run(monkeypatch, tiny_model):
    """W8A16 with zero points has one kernel in vLLM 0.26 (Machete: compute capability 9.0, stacked output
    widths divisible by 128); seen failing to start on SmolLM2 (qkv_proj 960 wide) on an H100."""
    from transformers import AutoModelForCausalLM

    from compress.quant.common import stacked_out_widths

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    widths = dict(stacked_out_widths(model, names))
    c = model.config
    kv = c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    assert widths["model.layers.0.self_attn.qkv_proj"] == c.hidden_size + 2 * kv
    assert widths["model.layers.0.mlp.gate_up_proj"] == 2 * c.intermediate_size
    assert widths["model.layers.0.self_attn.o_proj"] == c.hidden_size and len(widths) == 4 * c.num_hidden_layers

    gpu = lookup("vllm", "cuda:0", "0.26.0", "bfloat16")
    h100 = ("NVIDIA H100 80GB HBM3", (9, 0))
    monkeypatch.setattr(VLLMFacts, "gpu", lambda self: h100)
    asym, sym = WeightScheme(8, -1, False), WeightScheme(8, -1, True)
    smollm2 = (("model.layers.0.self_attn.qkv_proj", 960), ("model.layers.0.self_attn.o_proj", 576),
               ("model.layers.0.mlp.gate_up_proj", 3072))
    said = gpu.problems(WeightOnlyInt(frozenset({asym}), out_widths=smollm2))
    assert said == ["vLLM 0.26 runs 8-bit weights with zero points (symmetric: false) with one kernel (Machete), "
                    "which needs output widths divisible by 128; model.layers.0.self_attn.qkv_proj has 960 (and 1 "
                    "more layers): set symmetric: true (Marlin runs it) or leave vllm out of eval.engines"]
    wide = (("model.layers.0.self_attn.qkv_proj", 6144), ("model.layers.0.mlp.gate_up_proj", 28672))
    assert gpu.problems(WeightOnlyInt(frozenset({asym}), out_widths=wide)) == []  # the 8B shape: Machete
    assert gpu.problems(WeightOnlyInt(frozenset({sym}), out_widths=smollm2)) == []  # Marlin
    assert gpu.problems(WeightOnlyInt(frozenset({WeightScheme(4, 128, False)}), out_widths=smollm2)) == []
    from compress.errors import UserError
    from compress.quant.rtn import RTNConfig, check
    from compress.stage import StageContext

    ctx = StageContext(device="cuda", seed=0, model_dir=tiny_model, engine_facts=(gpu,))
    with pytest.raises(UserError, match=r"^rtn: vLLM 0.26 runs 8-bit weights with zero points .*\.o_proj has 64 "):
        check(RTNConfig(bits=8, group_size=-1, symmetric=False), model, ctx)  # the stage's check asks with widths
    check(RTNConfig(bits=8, group_size=-1, symmetric=True), model, ctx)
    monkeypatch.setattr(VLLMFacts, "gpu", lambda self: ("NVIDIA A100-SXM4-80GB", (8, 0)))
    assert "compute capability 9.0 only (H100, H200); NVIDIA A100-SXM4-80GB has 8.0" in \
        gpu.problems(WeightOnlyInt(frozenset({asym}), out_widths=wide))[0]
