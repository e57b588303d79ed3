"""W8A8 mixture-of-experts artifacts on the transformers engine: their activations are rounded as
in the fake-quantized model (every quantized linear's input, each expert's gate/up and down
inputs included), so their HF figures are W8A8's, not W8A16's (compress.export.moe_acts)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from compress import moe
from compress.models import load_model
from squeeze.pipeline import save_model
from conftest import apply_linearized, make_tiny_moe
from eval.engines.kernels import hf_kernels

IDS = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
TOL = 1e-4  # float32: the same weights and the same activation rounding

CASES = {  # (arch, stage)
    "qwen3-int8-dynamic": ("qwen3_moe", {"type": "int8", "activations": "dynamic"}),
    "qwen3-int8-static": ("qwen3_moe", {"type": "int8", "activations": "static"}),
    "qwen3-fp8-dynamic": ("qwen3_moe", {"type": "fp8", "activations": "dynamic"}),
    "qwen3-fp8-static": ("qwen3_moe", {"type": "fp8", "activations": "static"}),
    "qwen2-shared-int8-dynamic": ("qwen2_moe", {"type": "int8", "activations": "dynamic"}),
    "mixtral-fp8-static": ("mixtral", {"type": "fp8", "activations": "static"}),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(arch):
        if arch not in made:
            made[arch] = make_tiny_moe(tmp_path_factory.mktemp(arch) / "model", arch)
        return made[arch]
    return get


def _fake_quantized(model_dir, text_file, stage):
    """The model as the stage leaves it in memory (experts linearized, weights on the grid)."""
    if stage["activations"] == "static":
        stage = {**stage, "calibration": {"dataset": str(text_file), "n_samples": 8, "seq_len": 32,
                                          "calibrate_all_experts": True}}
    model, tok, _ = apply_linearized(model_dir, text_file, stage)
    return model, tok


def _by_hand(x, fp8, scale=None):
    """8-bit rounding of a layer input: a scale per token (row) of |x|max / 127.5 (int8) or / 448
    (FP8 E4M3), or the static per-tensor scale."""
    s = scale if scale is not None else x.abs().amax(-1, keepdim=True) / (448.0 if fp8 else 127.5)
    if fp8:
        return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return (x / s).round().clamp(-128, 127) * s


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("case", list(CASES))
def test_hf_loaded_w8a8_moe_rounds_activations_like_the_fake_quantized_model(case, models, text_file, tmp_path):
    arch, stage = CASES[case]
    fp8, static = stage["type"] == "fp8", stage["activations"] == "static"
    model, tok = _fake_quantized(models(arch), text_file, stage)
    linears = {n: m for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None}
    assert any(".experts." in n for n in linears) and any("self_attn" in n for n in linears)

    # the hand rounding is compressed-tensors' own on a dense layer's [batch, tokens, hidden] input
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, q.in_features, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        ct = q(x)
        for m in linears.values():
            m.quantization_enabled = False  # weights stay on their grid; inputs rounded by the hooks below
        assert (ct - q(_by_hand(x, fp8, q.input_scale if static else None))).abs().max().item() < 1e-5
    w8a16 = _logits(model)
    hooks = [m.register_forward_pre_hook(lambda m, a: (_by_hand(a[0], fp8, m.input_scale if static else None),))
             for m in linears.values()]
    w8a8 = _logits(model)
    for h, m in zip(hooks, linears.values()):
        h.remove()
        m.quantization_enabled = True
    save_model(model, tok, tmp_path / "art")  # packs the weights in place: after the references

    art, _ = load_model(tmp_path / "art")
    assert moe.fused_experts(art)  # transformers' own class, as before
    got = _logits(art)
    diff, gap = (got - w8a8).abs().max().item(), (w8a16 - w8a8).abs().max().item()
    print(f"{case}: |HF - W8A8 fake-quantized| {diff:.2e}, |W8A16 - W8A8| {gap:.2e}")
    assert diff <= TOL and gap > 10 * TOL, (diff, gap)

    # the observed-kernels probe says so, for the dense layers as for dense models, and for the experts
    ran = hf_kernels(art)
    acts = f"{'float' if fp8 else 'int'}8 activations fake-quantized per {'tensor' if static else 'token'}"
    assert acts in ran["self_attn.q_proj"] and "compressed-tensors decompressed" in ran["self_attn.q_proj"]
    (experts,) = [v for k, v in ran.items() if k.endswith("experts")]
    assert acts in experts and "per expert" in experts, ran
    assert "activations" not in ran["lm_head"]

    if static:  # each expert rounds down_proj's input with its own scale from the checkpoint
        layout = moe.checkpoint_layout(art.config.model_type)
        experts = art.model.layers[1].mlp.experts
        prefix = f"model.layers.1.{layout.to_checkpoint('.mlp.').strip('.')}.experts"
        with safe_open(tmp_path / "art" / "model.safetensors", "pt") as f:
            want = torch.stack([f.get_tensor(f"{prefix}.{k}.{layout.proj['down']}.input_scale")
                                for k in range(moe.num_experts(experts))]).flatten()
        assert len(set(want.tolist())) > 1 and torch.equal(experts.down_input_scale.flatten(), want)

