"""Observed kernels (eval.engines.kernels): what each engine ran per layer kind is read from the
loaded model, and whatever was not read reads "not observed", never a guess. The vLLM probe on
real engines runs in the vllm-marked tests that start an engine anyway (test_quant_w8a8,
test_quant_stages, test_evaluator)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from squeeze.pipeline import save_model
from eval.engines import kernels as K
from eval.engines.hf import HFEngine
from test_quant_w8a8 import _apply


def _kernel_class(name: str):
    """A stand-in for one of vLLM's kernel classes (recognized by its module, not its name)."""
    return type(name, (), {"__module__": "vllm.model_executor.kernels.linear.scaled_mm.cpu"})


def test_layer_kinds_group_layers_and_list_variants():
    assert K.layer_kind("model.layers.11.mlp.down_proj") == "mlp.down_proj"
    assert K.layer_kind("model.language_model.layers.0.self_attn.qkv_proj") == "self_attn.qkv_proj"
    assert K.layer_kind("lm_head") == "lm_head"
    got = K.by_kind([("model.layers.0.mlp.down_proj", "A"), ("model.layers.1.mlp.down_proj", "B"),
                     ("model.layers.2.mlp.down_proj", "A"), ("lm_head", "C")])
    assert got == {"mlp.down_proj": "A (2 layers); B (1 layer)", "lm_head": "C"}


def test_unread_kernels_say_not_observed():
    assert K.kernel_line({}) == K.kernel_line(None) == "not observed"
    entry = {"name": "int8", "engines": {"hf": {"kernels": {"mlp.up_proj": "X", "mlp.down_proj": "X", "lm_head": "Y"}},
                                         "vllm": {"quantization": {"scheme": "W8A8-INT8 dynamic"}}}}
    assert K.kernel_notes(entry) == ["- int8 (hf): kernels: mlp.up_proj, mlp.down_proj: X; lm_head: Y",
                                     "- int8 (vllm): kernels of W8A8-INT8 dynamic: not observed"]


def test_vllm_layer_reads_the_chosen_kernel_and_never_guesses_one():
    scheme_cls = type("CompressedTensorsW8A8Int8", (), {})
    kernel = _kernel_class("CPUInt8ScaledMMLinearKernel")()
    kernel.linear_method = lambda: None
    kernel.linear_method.__name__ = "_apply_weights_onednn"
    scheme = scheme_cls()
    scheme.kernel = kernel
    qm = type("CompressedTensorsLinearMethod", (), {})()
    assert K._vllm_linear(SimpleNamespace(scheme=scheme), qm) == \
        "CompressedTensorsW8A8Int8 / CPUInt8ScaledMMLinearKernel (onednn)"
    # a scheme whose kernel is not where the probe looks: the method is named, the kernel is not guessed
    assert K._vllm_linear(SimpleNamespace(scheme=scheme_cls()), qm) == "CompressedTensorsW8A8Int8 / not observed"
    # unquantized on the CPU: the op the dispatch bound
    unq = type("UnquantizedLinearMethod", (), {})()
    layer = SimpleNamespace(cpu_linear=lambda x, w, b: torch.ops.x.onednn_mm(x, b))
    assert K._vllm_linear(layer, unq) == "UnquantizedLinearMethod / onednn_mm"
    moe = type("CompressedTensorsW8A8Int8MoEMethod", (), {})()
    assert K._vllm_moe(moe) == "CompressedTensorsW8A8Int8MoEMethod / not observed"
    moe.moe_kernel = SimpleNamespace(fused_experts=type("CPUExpertsInt8", (), {})())
    assert K._vllm_moe(moe) == "CompressedTensorsW8A8Int8MoEMethod / CPUExpertsInt8"


def test_an_engine_without_the_probe_or_failing_it_observes_nothing():
    def llm(ext, rpc):
        cfg = SimpleNamespace(parallel_config=SimpleNamespace(worker_extension_cls=ext))
        return SimpleNamespace(llm_engine=SimpleNamespace(vllm_config=cfg), collective_rpc=rpc)

    def fail(_):
        raise NotImplementedError("Method 'squeeze_kernels' is not implemented.")

    assert K.vllm_kernels(llm("", lambda _: [{"x": "y"}])) == {}
    assert K.vllm_kernels(llm(K.PROBE, fail)) == {}
    assert K.vllm_kernels(llm(K.PROBE, lambda _: [{"lm_head": "M / k"}, {"lm_head": "M / k"}])) == {"lm_head": "M / k"}


@pytest.mark.parametrize("stage,acts", [
    ({"type": "int8"}, ", int8 activations fake-quantized per token (dynamic)"),
    ({"type": "rtn", "group_size": 32}, ""),
], ids=["w8a8-int8", "w4a16"])
def test_hf_engine_observes_the_decompressed_path(stage, acts, tiny_model, text_file, tmp_path):
    """transformers loads compressed-tensors checkpoints decompressed (compress.models): the
    engine says so per layer kind, with the activations' fake quantization where it runs."""
    model, tok, _ = _apply(tiny_model, text_file, stage)
    save_model(model, tok, tmp_path / "art")
    eng = HFEngine.load(tmp_path / "art", dtype="bfloat16")
    try:
        got = eng.stats["kernels"]
    finally:
        eng.close()
    assert set(got) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"}
    assert got["mlp.down_proj"] == "Linear (bfloat16), compressed-tensors decompressed" + acts
    assert got["lm_head"] == "Linear (bfloat16)"  # left out of the scheme: runs dense


def test_hf_compressed_module_is_named_compressed():
    """A module that keeps its int8 codes (compressed-tensors' run_compressed path) reads compressed."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    m = torch.nn.Linear(8, 4)
    m.weight = torch.nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    m.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8))
    assert K._hf_linear(m) == "Linear (int8), compressed-tensors compressed"
