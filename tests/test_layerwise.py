"""The layer-wise calibration runner on tiny random models of four architectures: it must feed
every module exactly the inputs the full model gives it (masks, sliding windows and position
embeddings included), solve in call order, and leave the model as it found it."""

from __future__ import annotations

import copy

import pytest
import torch

from compress.collectors import AbsMaxCollector, ChannelNormCollector, HessianCollector
from compress.errors import UserError
from compress.layerwise import decoder_layers, run_layerwise

SEQ = 24  # longer than the sliding windows below, so per-layer masks matter


def _tiny(arch: str) -> torch.nn.Module:
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if arch == "llama":
        cfg = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=1)
        cls = tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=16)
        cls = tf.Qwen3ForCausalLM
    elif arch == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=8)
        cls = tf.MistralForCausalLM
    elif arch == "gemma3":
        cfg = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=8,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        cls = tf.Gemma3ForCausalLM
    torch.manual_seed(0)
    return cls(cfg).eval()


def _calib(n=4):
    return torch.randint(0, 128, (n, SEQ), generator=torch.Generator().manual_seed(1))


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


@torch.no_grad()
def _direct(model, calib, names, batch_size):
    """Hessians collected by hooks on a plain full-model forward: the reference."""
    stats = {n: HessianCollector(model.get_submodule(n).in_features, "cpu") for n in names}
    hs = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: stats[n].add_batch(i[0]))
          for n in names]
    for ids in calib.split(batch_size):
        model(input_ids=ids, use_cache=False)
    for h in hs:
        h.remove()
    return {n: s.h for n, s in stats.items()}


def _record(into: dict, layers_name: str):
    def solve(i, group, stats):
        for rel in group:
            into[f"{layers_name}.{i}.{rel}"] = stats.h.clone()
        into.setdefault("_groups", []).append((i, list(group)))
        return {rel: {"ok": True} for rel in group}
    return solve


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_module_sees_the_inputs_of_the_full_model(arch, batch_size):
    model = _tiny(arch)
    names = _targets(model)
    calib = _calib()
    ref = _direct(model, calib, names, batch_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers_name, layers = decoder_layers(model)
    originals = list(layers)
    got: dict = {}
    info = run_layerwise(model, calib, names, lambda m, d: HessianCollector(m.in_features, d),
                         _record(got, layers_name), "cpu", sequential=True, batch_size=batch_size, progress=False)
    for n in names:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-5, msg=f"{arch} {n}")
    # q/k/v share one input, gate/up another; solved in the order the layer calls them
    assert [g for i, g in got["_groups"] if i == 0] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    assert set(info["modules"]) == set(names) and info["layers"] == 3
    assert info["memory"]["activations_on"] == "cpu" and info["calibration"]["samples"] == 4
    # the model is left as it was: same weights, same layer objects, no hooks, on the CPU
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert list(layers) == originals
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())


def _halve(i, group, stats):
    for m in group.values():
        m.weight.mul_(0.5)
    return {rel: {} for rel in group}


@pytest.mark.parametrize("sequential", [True, False])
def test_sequential_mode_feeds_later_modules_the_compressed_outputs(sequential):
    model = _tiny("llama")
    orig = copy.deepcopy(model)
    names = _targets(model)
    calib = _calib()
    seen: dict = {}

    def solve(i, group, stats):
        for rel in group:
            seen[(i, rel)] = stats.h.clone()
        return _halve(i, group, stats)

    run_layerwise(model, calib, names, lambda m, d: HessianCollector(m.in_features, d), solve, "cpu",
                  sequential=sequential, progress=False)
    for n in names:  # every targeted weight was solved (halved) exactly once
        torch.testing.assert_close(model.get_submodule(n).weight, 0.5 * orig.get_submodule(n).weight)
    # the reference for the last layer's down_proj: earlier layers compressed, and within the
    # layer, the modules before it compressed only in sequential mode
    ref_model = copy.deepcopy(orig)
    with torch.no_grad():
        for n in names:
            if not n.startswith("model.layers.2.") or (sequential and not n.endswith("down_proj")):
                ref_model.get_submodule(n).weight.mul_(0.5)
    ref = _direct(ref_model, calib, ["model.layers.2.mlp.down_proj"], 1)["model.layers.2.mlp.down_proj"]
    torch.testing.assert_close(seen[(2, "mlp.down_proj")], ref, rtol=1e-4, atol=1e-5)


def test_other_collectors_match_their_definitions():
    x = torch.randn(5, 7, 16)
    n, a = ChannelNormCollector(16, "cpu"), AbsMaxCollector(16, "cpu")
    for chunk in x.split(2):
        n.add_batch(chunk)
        a.add_batch(chunk)
    flat = x.reshape(-1, 16)
    torch.testing.assert_close(n.sq, flat.square().mean(0))
    torch.testing.assert_close(a.absmax, flat.abs().amax(0))


def test_modules_outside_the_decoder_layers_are_refused():
    model = _tiny("llama")
    with pytest.raises(UserError, match="lm_head"):
        run_layerwise(model, _calib(), ["lm_head"], lambda m, d: HessianCollector(m.in_features, d),
                      _halve, "cpu", progress=False)


def test_a_model_without_a_layer_stack_is_named():
    with pytest.raises(UserError, match="no stack of decoder layers"):
        decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_solver_that_raises_leaves_the_layer_home_and_no_hooks():
    """A failing solve (out of memory, a bad Hessian) must not strand a layer on the device nor
    leave hooks behind: the layer's last move is back home and no module keeps a hook."""
    model = _tiny("llama")
    _, layers = decoder_layers(model)
    moves = []
    for i, layer in enumerate(layers):
        def to(*args, _i=i, _to=layer.to, **kw):
            moves.append((_i, str(args[0] if args else kw.get("device"))))
            return _to(*args, **kw)
        layer.to = to

    def solve(i, group, stats):
        if i == 1:
            raise RuntimeError("solver failed")
        return {rel: {} for rel in group}

    with pytest.raises(RuntimeError, match="solver failed"):
        run_layerwise(model, _calib(), _targets(model), lambda m, d: HessianCollector(m.in_features, d), solve,
                      "cpu", progress=False)
    # moved to the device, then back home (the layer's own device) despite the error; on a CPU
    # both are "cpu": without the `finally` the second move is missing
    assert [m for m in moves if m[0] == 1] == [(1, "cpu"), (1, "cpu")]
    assert not [m for m in moves if m[0] == 2]  # the loop stopped at the failing layer
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
