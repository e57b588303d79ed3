"""The `rotate` stage: an orthogonal rotation of the residual stream folded into the weights must
leave the model's function unchanged on every supported architecture, spread an outlier
channel over all channels, and write an ordinary checkpoint the next stages and engines load."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compress.errors import UserError
from compress.quant.hadamard import factors, hadamard, rotation
from compress.quant.rotate import RotateConfig, apply
from compress.stage import StageContext
from tests.conftest import make_tiny_moe, tiny_recipe

COMMON = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def _tiny(arch: str, tied: bool = False) -> torch.nn.Module:
    import transformers as tf

    cfg, cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[arch]
    extra = {"head_dim": 12} if arch == "qwen3" else {}
    torch.manual_seed(0)
    model = cls(cfg(**COMMON, **extra, tie_word_embeddings=tied)).eval()
    for m in model.modules():  # norms with weights far from 1, so that folding them matters
        if "RMSNorm" in type(m).__name__:
            m.weight.data.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("n", [12, 64, 576, 960, 2048, 4096])
def test_hadamard_matrices_of_model_widths(n):
    h = hadamard(n)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


def test_a_width_without_a_hadamard_gets_a_seeded_random_rotation():
    assert factors(100) is None
    q, what = rotation(100, seed=3)
    assert what == "random orthogonal"
    torch.testing.assert_close(q @ q.T, torch.eye(100, dtype=torch.float64))
    torch.testing.assert_close(rotation(100, seed=3)[0], q)  # seeded
    assert not torch.equal(rotation(100, seed=4)[0], q)
    assert rotation(576, seed=0)[1] == "randomized Hadamard (12 x 12 x 4)"


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("qwen2", False), ("qwen3", False),
                                       ("mistral", False)])
@pytest.mark.parametrize("kind", ["hadamard", "random"])
def test_rotated_model_computes_the_same_logits(arch, tied, kind):
    model = _tiny(arch, tied)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    rot, info = apply(copy.deepcopy(model), RotateConfig(kind=kind), StageContext(device="cpu", seed=0))
    with torch.no_grad():
        out = rot(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert info["untied_embeddings"] is tied
    q = "model.layers.0.self_attn.q_proj.weight"
    assert (rot.state_dict()[q] - model.state_dict()[q]).abs().max() > 0.01  # really rotated
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in rot.modules() if "RMSNorm" in type(m).__name__
               and m.weight.shape[0] == COMMON["hidden_size"])  # the residual norms' weights are folded


def test_the_rotation_spreads_an_outlier_channel():
    """One channel 40x the others at q_proj's input (a norm weight outlier, as in real LLMs):
    after rotation the largest |x| is a few times the RMS, not tens of times."""
    model = _tiny("llama")
    model.model.layers[0].input_layernorm.weight.data[5] = 40.0
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))

    def peak_to_rms(m):
        seen = []
        h = m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
        with torch.no_grad():
            m(ids)
        h.remove()
        x = seen[0]
        return (x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item()

    before = peak_to_rms(model)
    after = peak_to_rms(apply(copy.deepcopy(model), RotateConfig(), StageContext(device="cpu", seed=0))[0])
    assert before > 5.0 and after < before / 2, (before, after)


def test_unsupported_architectures_are_refused_in_one_line(tmp_path):
    from compress.models import load_model

    model, _ = load_model(make_tiny_moe(tmp_path / "moe", "qwen3_moe"))
    with pytest.raises(UserError, match=r"^rotate: qwen3_moe models are not supported \(supported: llama, mistral, "):
        apply(model, RotateConfig(), StageContext(device="cpu", seed=0))


def test_rotate_then_smoothquant_then_int8_through_the_pipeline(tiny_model, text_file, home):
    """The rotated checkpoint is an ordinary HF directory with the base model's logits, and so is
    SmoothQuant's after it (the chain issue 25's int8 figure uses); int8 after them runs as usual;
    rotate after a quantization stage is refused."""
    from squeeze import pipeline
    from compress.models import load_model
    from squeeze.recipe import parse_recipe

    sq = {"type": "smoothquant", "alpha": 0.5, "calibration": {"dataset": str(text_file), "n_samples": 4, "seq_len": 32}}
    rec = tiny_recipe(tiny_model, text_file, [{"type": "rotate"}, sq, {"type": "int8"}], name="rot")
    pipeline.run(parse_recipe(rec), evaluate_outputs=False)
    stages = home / "rot" / "stages"
    base, _ = load_model(tiny_model)
    rot, _ = load_model(stages / "01-rotate")
    smooth, _ = load_model(stages / "02-smoothquant")
    ids = torch.randint(0, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = base(ids).logits
        torch.testing.assert_close(rot(ids).logits, ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(smooth(ids).logits, ref, rtol=0, atol=1e-3)
    moved = [n for n, p in smooth.named_parameters() if "layernorm" in n and not torch.allclose(p, torch.ones_like(p))]
    assert moved, "SmoothQuant left the rotated norms at 1: it folded no scale"
    assert (stages / "03-int8" / "stage.json").is_file()
    with pytest.raises(UserError, match=r"'rotate' after 'int8'"):
        parse_recipe(tiny_recipe(tiny_model, text_file, [{"type": "int8"}, {"type": "rotate"}]))


def test_a_matrix_the_rotation_cannot_reach_is_refused_not_skipped():
    """A supported model type with a weight outside nn.Linear in its MLP (as fused experts are):
    refused in one line, since rotating everything else would change the function."""
    model = _tiny("llama")
    model.model.layers[1].mlp.extra = torch.nn.Parameter(torch.zeros(4, COMMON["hidden_size"]))
    with pytest.raises(UserError, match=r"^rotate: 1 weight matrices of llama are not nn.Linear projections it can "
                                        r"rotate \(e.g. layers.1.mlp.extra\)"):
        apply(model, RotateConfig(), StageContext(device="cpu", seed=0))


def test_rotate_inside_int8_is_the_chain_rotate_then_int8(tiny_model, text_file, home):
    """`int8: {rotate: {}}` writes the same tensors as rotate -> int8 in two stages, and records
    the rotation in its info; on a model it cannot rotate it refuses before any work."""
    from safetensors.torch import load_file

    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    pipeline.run(parse_recipe(tiny_recipe(tiny_model, text_file, [{"type": "rotate"}, {"type": "int8"}],
                                          name="chain")), evaluate_outputs=False)
    pipeline.run(parse_recipe(tiny_recipe(tiny_model, text_file, [{"type": "int8", "rotate": {}}], name="inline")),
                 evaluate_outputs=False)
    chained = load_file(next((home / "chain" / "stages" / "02-int8").glob("*.safetensors")))
    inline_dir = home / "inline" / "stages" / "01-int8"
    inline = load_file(next(inline_dir.glob("*.safetensors")))
    assert chained.keys() == inline.keys() and any(k.endswith("weight_scale") for k in inline)
    assert all(torch.equal(chained[k], inline[k]) for k in chained)
    info = json.loads((inline_dir / "stage.json").read_text())["info"]
    assert info["rotate"]["rotation"].startswith("randomized Hadamard") and info["quantized_modules"] > 0


def test_rotate_inside_gptq_on_a_model_it_cannot_rotate_is_refused_first(tmp_path, text_file):
    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    moe = make_tiny_moe(tmp_path / "moe", "qwen3_moe")
    rec = parse_recipe(tiny_recipe(moe, text_file, [{"type": "gptq", "rotate": {}, "group_size": -1,
                                                     "calibration": {"n_samples": 2, "seq_len": 16}}], name="m"))
    with pytest.raises(UserError, match=r"rotate: qwen3_moe models are not supported"):
        pipeline.run(rec, run_dir=tmp_path / "run", evaluate_outputs=False)
    assert not list((tmp_path / "run").glob("stages/*/stage.json"))  # nothing written
