"""Distillation (compress.distill): chunked losses equal unchunked ones (values and gradients),
the divergences are what they say, a few steps lower the distillation loss, a run killed after
a checkpoint resumes and ends bit-identical to an uninterrupted run, the stage runs in a recipe
and its output is a normal checkpoint, and bad input is one line before training."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file

from compress import distill as D
from compress.distill.checkpoint import latest_checkpoint
from compress.distill.data import Packed, pack
from compress.distill.generate import teacher_windows
from compress.distill.losses import chunked_losses, head_losses, token_divergence
from compress.errors import UserError
from compress.models import load_model
from compress.stage import StageContext
from eval.engines import open_engine
from tests.conftest import REPO, distill_cfg, distill_ctx, sigkill_at_marker, tiny_recipe


def test_chunked_losses_equal_unchunked_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(37, 16, generator=g, requires_grad=True)
    h_t = torch.randn(37, 24, generator=g)
    head_s, head_t = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(24, 50, bias=False)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[5] = -100  # not counted
    for kind in ("forward", "reverse", "jsd", "skew"):
        grads = []
        for chunk in (7, 1000):
            h_s.grad, head_s.weight.grad = None, None
            kd, ce, n = chunked_losses(h_s, h_t, labels, head_s, head_t, kind, temperature=2.0, beta=0.3,
                                       chunk=chunk, want_ce=True)
            (kd + ce).backward()
            grads.append((kd.detach(), ce.detach(), n, h_s.grad.clone(), head_s.weight.grad.clone()))
        (kd1, ce1, n1, gh1, gw1), (kd2, ce2, n2, gh2, gw2) = grads
        assert n1 == n2 == 36
        torch.testing.assert_close(kd1, kd2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce1, ce2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gh1, gh2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gw1, gw2, rtol=1e-5, atol=1e-6)
    # cross-entropy is the usual one, over the counted positions
    ref = F.cross_entropy(head_s(h_s).detach()[labels >= 0], labels[labels >= 0], reduction="sum")
    torch.testing.assert_close(ce2, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "skew"])
def test_the_fused_output_layer_loss_has_autograds_values_and_gradients(kind):
    """head_losses (gradients written in the forward pass, closed-form for forward and reverse KL
    and CE) equals autograd through chunked_losses: values and the gradients of the hidden
    states, the weight and the bias, with and without cross-entropy."""
    g = torch.Generator().manual_seed(2)
    h_s = torch.randn(37, 16, generator=g, requires_grad=True)
    h_t = torch.randn(37, 24, generator=g)
    head_s, head_t = torch.nn.Linear(16, 50), torch.nn.Linear(24, 50, bias=False)
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[[3, 30]] = -100
    for want_ce in (True, False):
        got = []
        for fused in (False, True):
            h_s.grad = head_s.weight.grad = head_s.bias.grad = None
            if fused:
                loss, kd, ce = head_losses(h_s, h_t, labels, head_s, head_t, 0.7, 0.2, kind, temperature=2.0,
                                           beta=0.3, chunk=7, want_ce=want_ce)
            else:
                kd, ce, _ = chunked_losses(h_s, h_t, labels, head_s, head_t, kind, temperature=2.0, beta=0.3,
                                           chunk=7, want_ce=want_ce)
                loss = 0.7 * kd + 0.2 * ce
            (3 * loss).backward()
            got.append([loss.detach(), kd.detach(), ce.detach(), h_s.grad, head_s.weight.grad, head_s.bias.grad])
        assert got[0][1] > 0 and (got[0][2] > 0) == want_ce
        for a, b in zip(*got):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_divergences_are_what_they_say():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 40, generator=g), torch.randn(6, 40, generator=g)
    ref_fwd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(token_divergence(s, t, "forward"), ref_fwd)
    torch.testing.assert_close(token_divergence(s, t, "reverse"), token_divergence(t, s, "forward"))
    torch.testing.assert_close(token_divergence(s, t, "jsd", beta=0.5), token_divergence(t, s, "jsd", beta=0.5))
    torch.testing.assert_close(token_divergence(s, t, "skew", beta=0.0), ref_fwd)  # alpha 0: plain forward KL
    torch.testing.assert_close(token_divergence(s, t, "forward", temperature=2.0),
                               4 * token_divergence(s / 2, t / 2, "forward"))
    for kind in ("forward", "reverse", "jsd", "skew"):
        assert (token_divergence(s, t, kind) > 0).all()
        torch.testing.assert_close(token_divergence(s, s, kind), torch.zeros(6), atol=1e-6, rtol=0)


def _kd_on_held_out(student, teacher_model, packed) -> float:
    ids = packed.held_out
    with torch.no_grad():
        hs = student.base_model(ids[:, :-1]).last_hidden_state
        ht = teacher_model.base_model(ids[:, :-1]).last_hidden_state
        kd, _, n = chunked_losses(hs.reshape(-1, hs.shape[-1]), ht.reshape(-1, ht.shape[-1]), ids[:, 1:].reshape(-1),
                                  student.lm_head, teacher_model.lm_head)
    return float(kd) / n


def test_a_few_steps_lower_the_distillation_loss(teacher, corpus):
    cfg = distill_cfg(corpus, save_every=0)
    ctx = distill_ctx(teacher)
    t_model, tok = load_model(teacher)
    packed = Packed(pack(tok, (str(corpus),), 32), 4, 2, 0)
    before_student = D.every_other(t_model, [0, 2])
    before = _kd_on_held_out(before_student, t_model, packed)
    student, info = D.apply(load_model(teacher)[0], cfg, ctx)
    after = _kd_on_held_out(student, t_model, packed)
    assert student.config.num_hidden_layers == 2 and info["steps"] == 8
    assert after < 0.8 * before, (before, after)
    assert info["tokens_trained_this_run"] == 8 * 4 * 32 and info["tokens_per_s"] > 0
    # model FLOPs per token as PaLM counts them: linear layers and attention over the 32 positions,
    # 3x the student's forward, 1x the teacher's
    c = t_model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def forward_flops(m):
        lin = sum(x.weight.numel() for x in m.modules() if isinstance(x, torch.nn.Linear))
        return 2 * lin + 4 * m.config.num_hidden_layers * c.num_attention_heads * head_dim * 32

    assert info["flops_per_token"] == 3 * forward_flops(student) + forward_flops(t_model)
    ppl = info["held_out_perplexity"]  # of a random teacher's pupil on real text: reported, not a target here
    assert all(ppl[k] > 1 for k in ("start", "end", "teacher"))


def test_compiled_layers_train_as_eager_ones(teacher, corpus):
    """compile: true (torch.compile per decoder layer, student and teacher) trains to the same
    weights as eager within float tolerance, leaves the first step out of tokens/s, and the
    student leaves as a plain module."""
    from compress.layerwise import decoder_layers

    out = {}
    for comp in (False, True):
        cfg = distill_cfg(corpus, steps=3, save_every=0, compile=comp)
        out[comp] = D.apply(load_model(teacher)[0], cfg, distill_ctx(teacher))
    (s0, _), (s1, i1) = out[False], out[True]
    for (n, a), b in zip(s0.state_dict().items(), s1.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-3), n
    assert i1["tokens_timed"] == 2 * 4 * 32 and i1["tokens_trained_this_run"] == 3 * 4 * 32
    assert all(getattr(layer, "_compiled_call_impl", None) is None for layer in decoder_layers(s1)[1])


def test_gradient_checkpointing_trains_as_without(teacher, corpus):
    """gradient_checkpointing: true (layer activations recomputed in the backward pass) trains to
    the same weights, and the student leaves with it switched off."""
    out = {}
    for ckpt in (False, True):
        cfg = distill_cfg(corpus, steps=3, save_every=0, gradient_checkpointing=ckpt)
        out[ckpt] = D.apply(load_model(teacher)[0], cfg, distill_ctx(teacher))[0]
    for (n, a), b in zip(out[False].state_dict().items(), out[True].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=n)
    assert not out[True].is_gradient_checkpointing


def test_hidden_loss_through_a_projection_trains(teacher, corpus):
    """A narrower student (hidden cut) learns the teacher's hidden states through a learned
    projection; the map pairs each student layer with the teacher's at the same depth."""
    from compress.prune import structured as st

    t_model, _ = load_model(teacher)
    student = D.every_other(t_model, [0, 1, 2, 3])
    st.cut_hidden(student, student.model.layers, torch.arange(48))
    cfg = distill_cfg(corpus, student="input", save_every=0, loss={"kd": 1.0, "hidden": 1.0, "ce": 0.5})
    out, info = D.apply(student, cfg, distill_ctx(teacher))
    assert info["projection"] == "48 -> 64" and info["layer_map"] == [[0, 0], [1, 1], [2, 2], [3, 3]]
    assert set(info["last_losses"]) == {"kd", "ce", "hidden", "loss"}
    assert out.config.hidden_size == 48


def _weights(m) -> dict:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


KILL_DRIVER = """
import json, sys, time
from pathlib import Path
from squeeze import pipeline
from compress.distill import trainer
from squeeze.recipe import parse_recipe

real = trainer.train

def train(*a, **k):
    def on_step(step):
        if step == 7:  # after the step-6 checkpoint: tell the test, then wait to be killed
            Path(sys.argv[2]).write_text("step 7")
            time.sleep(600)
    return real(*a, **{**k, "on_step": on_step})

trainer.train = train
pipeline.run(parse_recipe(json.loads(Path(sys.argv[1]).read_text())), evaluate_outputs=False)
"""


def test_sigkilled_run_resumes_bit_identical(teacher, corpus, home, tmp_path):
    """A `squeeze run` SIGKILLed during step 7 of 10 (checkpoints every 3 steps), run again,
    resumes at step 6 and ends with exactly the weights of a run never interrupted (CPU, fp32)."""
    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    stage = {"type": "distill", "student": "every_other", "steps": 10, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1,
             "eval_every": 0, "save_every": 3, "data": {"datasets": [str(corpus)], "seq_len": 32, "eval_blocks": 2},
             "loss": {"kd": 1.0, "ce": 0.5}}
    killed = tiny_recipe(teacher, corpus, [stage], name="killed")
    sigkill_at_marker(KILL_DRIVER, killed, tmp_path)
    out, work = home / "killed" / "stages" / "01-distill", home / "killed" / "work" / "01-distill"
    assert not pipeline.is_complete(out) and json.loads((work / "ckpt" / "step.json").read_text())["step"] == 6

    pipeline.run(parse_recipe(killed), evaluate_outputs=False)  # resumes
    pipeline.run(parse_recipe(tiny_recipe(teacher, corpus, [stage], name="whole")), evaluate_outputs=False)
    info = json.loads((out / "stage.json").read_text())["info"]
    assert info["resumed_at"] == 6 and info["tokens_trained_this_run"] == 4 * 4 * 32 and not work.exists()
    a, b = load_file(home / "whole" / "stages" / "01-distill" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"


def test_distill_stage_in_a_recipe(teacher, corpus, home, tmp_path):
    """prune_mlp -> distill in a recipe (the CPU recipe's stages, sized down): the student is
    the pruned model, its checkpoint is a normal one, the work directory is gone once done."""
    import yaml

    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    raw = yaml.safe_load((REPO / "recipes" / "prune-distill-cpu.yaml").read_text())
    stages = raw["stages"]
    assert [s["type"] for s in stages] == ["prune_mlp", "distill"]
    stages[0]["calibration"] = {"dataset": str(corpus), "n_samples": 4, "seq_len": 32}
    stages[1].update(steps=4, batch_size=4, save_every=2, eval_every=2,
                     data={"datasets": [str(corpus)], "seq_len": 32, "eval_blocks": 2})
    recipe = parse_recipe(tiny_recipe(teacher, corpus, stages, name="pd"))
    pipeline.run(recipe, evaluate_outputs=False)
    out = home / "pd" / "stages" / "02-distill"
    assert pipeline.is_complete(out) and not (home / "pd" / "work" / "02-distill").exists()
    info = json.loads((out / "stage.json").read_text())["info"]
    assert info["student"] == "input" and info["steps"] == 4 and len(info["curve"]) == 2
    w = load_file(out / "model.safetensors")
    assert w["model.layers.0.mlp.down_proj.weight"].shape == (64, 96)  # the pruned width, trained
    back, _ = load_model(out)
    assert back.config.intermediate_size == 96


def test_bad_input_is_one_line_before_training(teacher, corpus, tmp_path):
    model, _ = load_model(teacher)
    ctx = distill_ctx(teacher)
    other = tmp_path / "other"
    shutil.copytree(teacher, other)
    c = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**c, "vocab_size": 400}))
    cases = [
        (distill_cfg(corpus, teacher=str(other)), r"has a vocabulary of 400 and the student 320; teacher and student must "
                                            r"share a tokenizer"),
        (distill_cfg(corpus, teacher=str(tmp_path)), r"not a model directory \(no config.json\)"),
        (distill_cfg(corpus, loss={"hidden": 1.0, "layer_map": [[0, 0], [2, 1]]}),
         r"layer_map: \[2, 1\] does not fit a student of 2 layers and a teacher of 4"),
        (distill_cfg(corpus, batch_size=8192), r"windows of 32 tokens, fewer than one batch \(8192\) after holding out 2"),
        (distill_cfg(corpus, grad_accum=3), r"grad_accum: 3 does not divide batch_size 4"),
        (distill_cfg(corpus, sharding="fsdp", compile=True), r"distill.compile: not with sharding: fsdp"),
    ]
    for cfg, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            D.check(cfg, model, ctx)
        assert "\n" not in str(e.value)
    with pytest.raises(ValidationError, match="greater than 0"):
        distill_cfg(corpus, steps=0)


def _engine_ctx(teacher, work):
    """distill_ctx with the engine factory the pipeline supplies (eval.engines.open_engine)."""
    return dataclasses.replace(distill_ctx(teacher, work), open_engine=open_engine)


def test_generated_data_without_an_engine_factory_is_one_line(teacher, corpus, tmp_path):
    """A stage run outside the pipeline (no StageContext.open_engine) cannot generate: one line."""
    cfg = distill_cfg(corpus, data={"generated": {"sequences": 2, "engine": "hf"}})
    _, tok = load_model(teacher)
    with pytest.raises(UserError, match=r"needs an engine factory .*run the stage through the pipeline") as e:
        D.generated(teacher, cfg, tok, distill_ctx(teacher, tmp_path / "work"))
    assert "\n" not in str(e.value)


def test_sequence_level_distillation_trains_on_the_teachers_own_sequences(teacher, corpus, tmp_path, monkeypatch):
    """data.generated: the teacher continues prompts cut from the training text (transformers
    here), the sequences become extra training windows, and they are made once: a resumed run
    reads them back from the work directory instead of generating again."""
    cfg = distill_cfg(corpus, save_every=0, steps=2, data={"generated": {"sequences": 6, "prompt_len": 8, "new_tokens": 40,
                                                                  "temperature": 1.0, "engine": "hf"}})
    work = tmp_path / "work"
    _, info = D.apply(load_model(teacher)[0], cfg, _engine_ctx(teacher, work))
    made = torch.load(work / "generated.pt")
    assert info["teacher_windows"] == made.shape[0] > 0 and made.shape[1] == 33
    _, tok = load_model(teacher)
    text = pack(tok, (str(corpus),), 32)
    assert not any(torch.equal(w, t) for w in made for t in text)  # not the text's own windows

    def no_generation(*a, **k):
        raise AssertionError("generated again")

    monkeypatch.setattr("eval.engines.hf.HFEngine.load", no_generation)
    again = D.generated(teacher, cfg, tok, _engine_ctx(teacher, work))
    assert torch.equal(again, made)


@pytest.mark.vllm
def test_teacher_sequences_through_vllm_cpu(tiny_vllm_model, tmp_path):
    """The vLLM engine continues token-id prompts: its greedy tokens agree with transformers'
    greedy ones (random weights: a near-tie may flip one), laid out prompt then continuation."""
    from eval.engines.hf import HFEngine

    windows = torch.randint(5, 300, (4, 17), generator=torch.Generator().manual_seed(0))
    gcfg = D.GeneratedConfig(sequences=3, prompt_len=8, new_tokens=12, temperature=0.0, engine="vllm")
    got = teacher_windows(tiny_vllm_model, windows, gcfg, seq_len=7, eos=None, device="cpu", seed=0,
                          open_engine=open_engine)
    hf = HFEngine.load(tiny_vllm_model)
    g = torch.Generator().manual_seed(0 + 7919)
    prompts = windows[torch.randint(0, 4, (3,), generator=g), :8].tolist()
    want = [t for p, c in zip(prompts, hf.generate_ids(prompts, 12)) for t in p + c]
    flat = got.reshape(-1).tolist()
    assert got.shape == (len(want) // 8, 8) and flat[:8] == prompts[0] and flat[20:28] == prompts[1]
    assert sum(a == b for a, b in zip(flat, want)) >= 0.9 * len(flat)


def test_recovery_training_keeps_a_pruned_models_zeros(teacher, corpus):
    """A 50 % magnitude-pruned input trained by distillation keeps exactly its zeros (keep_zeros,
    the default); with keep_zeros false they fill in."""
    from compress.prune import magnitude

    pruned, _ = magnitude.STAGE.apply(load_model(teacher)[0], magnitude.STAGE.config(sparsity=0.5, skip=["lm_head"]),
                                      StageContext(device="cpu", seed=0))
    zeros = {n: (m.weight == 0).clone() for n, m in pruned.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    cfg = distill_cfg(corpus, student="input", save_every=0, steps=3)
    out, info = D.apply(pruned, cfg, distill_ctx(teacher))
    assert info["sparse_layers_kept"] == len(zeros) == 4 * 7
    for n, z in zeros.items():
        w = out.get_submodule(n).weight
        assert torch.equal(w == 0, z), n
    loose, info = D.apply(magnitude.STAGE.apply(load_model(teacher)[0], magnitude.STAGE.config(sparsity=0.5,
                                                skip=["lm_head"]), StageContext(device="cpu", seed=0))[0],
                          distill_cfg(corpus, student="input", save_every=0, steps=3, keep_zeros=False), distill_ctx(teacher))
    assert info["sparse_layers_kept"] == 0 and (loose.model.layers[0].mlp.up_proj.weight == 0).float().mean() < 0.1


def test_a_kill_while_a_checkpoint_is_replaced_loses_nothing(tmp_path):
    """Killed after the old checkpoint moved aside and before the new one took its name: the
    newest whole one is found (the new ckpt.tmp, whole once its step.json exists), never none."""

    assert latest_checkpoint(tmp_path) is None
    for name, step in (("ckpt.old", 4), ("ckpt.tmp", 6)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "step.json").write_text(json.dumps({"step": step}))
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt.tmp"
    (tmp_path / "ckpt.tmp" / "step.json").unlink()  # the new one was not whole yet
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt.old"
