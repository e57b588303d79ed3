"""Distillation on several processes (compress.distill.parallel): two processes train as one,
with DDP or FSDP2; a sharded run whose processes are all SIGKILLed resumes bit-identical; a
checkpoint resumes only with the sharding that wrote it; process counts that do not fit are
one line before training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from compress import distill as D
from compress.errors import UserError
from compress.models import load_model
from compress.stage import StageContext
from tests.conftest import REPO, distill_cfg, distill_ctx, sigkill_at_marker, tiny_recipe


@pytest.fixture(scope="module")
def one_process_run(teacher, corpus, tmp_path_factory):
    """The 1-process run the multi-process runs are compared with: (weights, info)."""
    return _processes_run(teacher, corpus, tmp_path_factory.mktemp("p1home"), 1, "ddp")


def _processes_run(teacher, corpus, home, n, sharding, **over):
    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    stage = {"type": "distill", "student": "every_other", "steps": 4, "batch_size": 4, "lr": 3e-3,
             "warmup_steps": 1, "eval_every": 2, "save_every": 2, "processes": n, "sharding": sharding,
             "data": {"datasets": [str(corpus)], "seq_len": 32, "eval_blocks": 2}, "loss": {"kd": 1.0, "ce": 0.5},
             **over}
    with pytest.MonkeyPatch.context() as mp:  # a private SQUEEZE_HOME (the module-scoped run cannot take `home`)
        mp.setenv("SQUEEZE_HOME", str(home))
        pipeline.run(parse_recipe(tiny_recipe(teacher, corpus, [stage], name=f"p{n}{sharding}")), evaluate_outputs=False)
    out = home / f"p{n}{sharding}" / "stages" / "01-distill"
    return load_file(out / "model.safetensors"), json.loads((out / "stage.json").read_text())["info"]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_train_as_one(teacher, corpus, tmp_path, one_process_run, sharding):
    """processes: 2 (torch's launcher, gloo on the CPU, each process half of every batch) ends
    where one process does, whether each holds the whole student (DDP through accelerate) or
    half of it (FSDP2): the same recipe on one device or several."""
    w1, i1 = one_process_run
    w2, i2 = _processes_run(teacher, corpus, tmp_path, 2, sharding)
    assert i1["processes"] == 1 and i2["processes"] == 2 and i2["tokens_trained_this_run"] == i1["tokens_trained_this_run"]
    assert i2["sharding"] == sharding and i1["sharding"] is None
    assert i2["held_out_perplexity"]["end"] == pytest.approx(i1["held_out_perplexity"]["end"], rel=1e-4)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(w1[k], load_file(next(teacher.glob("*.safetensors")))[k]) for k in w1
               if k in load_file(next(teacher.glob("*.safetensors"))))  # it did train


def test_two_nodes_through_a_rendezvous_train_as_one(teacher, corpus, tmp_path, one_process_run):
    """nodes: 2 with one process each, two "hosts" on this one: the stage's launcher and a second
    that joins with `python -m compress.distill.launch SPEC` (a c10d rendezvous on localhost, gloo)
    end where one process does."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = tmp_path / "p1ddp" / "work" / "01-distill" / "spec.json"
    joiner = subprocess.Popen([sys.executable, "-m", "compress.distill.launch", str(spec)], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        w2, i2 = _processes_run(teacher, corpus, tmp_path, 1, "ddp", nodes=2, rendezvous=f"127.0.0.1:{port}")
        assert joiner.wait(timeout=120) == 0, joiner.stderr.read().decode()[-2000:]
    finally:
        joiner.kill()
    w1, i1 = one_process_run
    assert i2["processes"] == 2 and i2["tokens_trained_this_run"] == i1["tokens_trained_this_run"]
    assert i2["held_out_perplexity"]["end"] == pytest.approx(i1["held_out_perplexity"]["end"], rel=1e-4)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5)


RUN_DRIVER = """
import json, sys
from pathlib import Path
from squeeze import pipeline
from squeeze.recipe import parse_recipe

pipeline.run(parse_recipe(json.loads(Path(sys.argv[1]).read_text())), evaluate_outputs=False)
"""


def test_sharded_run_killed_resumes_bit_identical(teacher, corpus, home, tmp_path):
    """A 2-process FSDP run whose whole process group is SIGKILLed after a checkpoint (sharded
    model and optimizer through torch.distributed.checkpoint), run again, resumes there and ends
    with exactly the weights of a run never interrupted."""
    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    stage = {"type": "distill", "student": "every_other", "steps": 60, "batch_size": 4, "lr": 3e-3,
             "warmup_steps": 1, "eval_every": 0, "save_every": 5, "processes": 2, "sharding": "fsdp",
             "data": {"datasets": [str(corpus)], "seq_len": 32, "eval_blocks": 2}, "loss": {"kd": 1.0, "ce": 0.5}}
    killed = tiny_recipe(teacher, corpus, [stage], name="killed")
    step_json = home / "killed" / "work" / "01-distill" / "ckpt" / "step.json"
    sigkill_at_marker(RUN_DRIVER, killed, tmp_path, marker=step_json)  # at the first whole checkpoint
    at = json.loads(step_json.read_text())["step"]
    out = home / "killed" / "stages" / "01-distill"
    assert 5 <= at < 60 and not pipeline.is_complete(out)

    pipeline.run(parse_recipe(killed), evaluate_outputs=False)  # resumes
    pipeline.run(parse_recipe(tiny_recipe(teacher, corpus, [stage], name="whole")), evaluate_outputs=False)
    info = json.loads((out / "stage.json").read_text())["info"]
    assert info["resumed_at"] >= at and info["sharding"] == "fsdp"
    a, b = load_file(home / "whole" / "stages" / "01-distill" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"


def test_a_checkpoint_resumes_only_with_its_own_sharding(teacher, corpus, tmp_path):
    """A work directory holding a sharded (FSDP) checkpoint is not read as an unsharded one: one line."""
    work = tmp_path / "work"
    (work / "ckpt" / "sharded").mkdir(parents=True)
    (work / "ckpt" / "step.json").write_text(json.dumps({"step": 2}))
    with pytest.raises(UserError, match=r"written with sharding: fsdp; resume it with the same processes") as e:
        D.apply(load_model(teacher)[0], distill_cfg(corpus), distill_ctx(teacher, work))
    assert "\n" not in str(e.value)


def test_process_counts_that_do_not_fit_are_one_line(teacher, corpus, tmp_path, monkeypatch):
    model, _ = load_model(teacher)
    with pytest.raises(UserError, match=r"distill.processes: 2 processes need 2 GPUs; 0 visible"):
        D.check(distill_cfg(corpus, processes=2), model, StageContext(device="cuda", seed=0, base_dir=teacher))
    with pytest.raises(UserError, match=r"micro-batches of 3 sequences do not split over 2 processes"):
        D.check(distill_cfg(corpus, processes=2, batch_size=3), model, distill_ctx(teacher))
    cfg_file = tmp_path / "accelerate.yaml"
    cfg_file.write_text("num_processes: 4\n")
    monkeypatch.setattr("accelerate.commands.config.default_config_file", str(cfg_file))
    with pytest.raises(UserError, match=r"distill.processes: 2, but the accelerate configuration .* says "
                                        r"num_processes: 4; make them agree"):
        D.check(distill_cfg(corpus, processes=2), model, distill_ctx(teacher))
