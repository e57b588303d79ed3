"""compress.export.qdq: compressed-tensors' input rounding without host round trips gives the
library's own bits on every case it takes, hands the rest back, and is what a loaded W8A8
checkpoint runs on transformers (the same logits as the library's forward)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStatus
from compressed_tensors.quantization.lifecycle.forward import forward_quantize

from compress.export import qdq
from compress.models import load_model
from eval.engines.hf import HFEngine
from squeeze.pipeline import save_model
from test_quant_w8a8 import IDS, W8A8, _apply, _calib


def _args(kind: str, strategy: str, dynamic: bool, symmetric: bool = True, **kw) -> QuantizationArgs:
    return QuantizationArgs(num_bits=8, type=kind, strategy=strategy, dynamic=dynamic, symmetric=symmetric, **kw)


CASES = {
    "int8 dynamic token": (_args("int", "token", True), {}),
    "int8 dynamic tensor": (_args("int", "tensor", True), {}),
    "fp8 dynamic token": (_args("float", "token", True), {}),
    "fp8 dynamic group 64": (_args("float", "group", True, group_size=64), {}),
    "int8 static tensor": (_args("int", "tensor", False), {"input_scale": torch.tensor([0.05])}),
    "int8 static asymmetric": (_args("int", "tensor", False, symmetric=False),
                               {"input_scale": torch.tensor([0.04]), "input_zero_point": torch.tensor([3], dtype=torch.int8)}),
    "fp8 static tensor": (_args("float", "tensor", False), {"input_scale": torch.tensor([0.01])}),
}


def _inputs(shape, dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 2, shape[-1])  # outlier channels, tiny ones
    x = x.reshape(-1, shape[-1])
    x[0] = 0  # a row of zeros: the library's scale becomes its epsilon there
    x[1, :5] = torch.tensor([1e4, -3e3, 1e-8, -0.0, 7.0])
    return x.reshape(shape).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(2, 5, 256), (7, 256)], ids=["3-D", "2-D"])
@pytest.mark.parametrize("case", list(CASES))
def test_qdq_gives_compressed_tensors_bits(case, shape, dtype):
    args, tensors = CASES[case]
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    holder = SimpleNamespace(quantization_status=QuantizationStatus.DECOMPRESSED, **tensors)
    x = _inputs(shape, dtype)
    assert qdq.covered(args)
    want = forward_quantize(holder, x.clone(), "input", args)
    got = qdq.module_qdq(holder, x.clone(), args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want)
    assert not torch.equal(got, x)  # it did round


def test_cases_it_does_not_take_go_back_to_the_library():
    assert not qdq.covered(_args("int", "token", True, symmetric=False))   # asymmetric dynamic
    assert not qdq.covered(_args("float", "group", True, group_size=64), g_idx=torch.arange(4))
    assert not qdq.covered(_args("float", "token", True), global_scale=torch.ones(1))
    assert not qdq.covered(QuantizationArgs(num_bits=4, type="float", strategy="tensor_group", group_size=16,
                                            dynamic="local", symmetric=True))
    assert not qdq.covered(None)


@pytest.mark.parametrize("scheme", ["int8-dynamic", "fp8-dynamic", "int8-static-minmax"])
def test_a_loaded_w8a8_checkpoint_runs_the_host_free_rounding(scheme, tiny_model, text_file, tmp_path, monkeypatch):
    """HFEngine.load swaps the library's quantized forward for qdq's on every quantized linear
    (2 layers x 7): the same logits, bit for bit, and the library's per-call range building,
    the host round trip, is no longer called."""
    from compressed_tensors.quantization.lifecycle import forward as ct_forward

    stage = W8A8[scheme] | ({"calibration": _calib(text_file)} if "static" in scheme else {})
    model, tok, _ = _apply(tiny_model, text_file, stage)
    save_model(model, tok, tmp_path / "art")
    plain, _ = load_model(tmp_path / "art")
    with torch.no_grad():
        want = plain(IDS).logits
    eng = HFEngine.load(tmp_path / "art")
    try:
        swapped = [n for n, m in eng.model.named_modules() if getattr(m, "forward", None) is not None
                   and getattr(m.forward, "__func__", None) is qdq._forward]
        assert len(swapped) == 14
        monkeypatch.setattr(ct_forward, "calculate_range", None)  # the library's path would now fail
        with torch.no_grad():
            got = eng.model(IDS).logits
    finally:
        eng.close()
    assert torch.equal(got, want)
