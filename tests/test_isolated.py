"""eval.isolated.run_fresh: a measurement in a fresh process, its result, its errors and Ctrl-C
handed back (vLLM's paired rounds run this way: eval.paired)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from compress.errors import UserError
from conftest import REPO
from eval.isolated import GRACE, run_fresh


def whoami(x: int) -> dict:
    return {"pid": os.getpid(), "x2": 2 * x, "threads": torch.get_num_threads(), "env": os.environ.get("ISO_PROBE")}


def refuses() -> None:
    raise UserError("eval.speed.rounds: 0 is not allowed")


def breaks() -> None:
    raise ValueError("bad value\nsecond line")


def sleeps() -> None:
    print("child started", flush=True)
    time.sleep(120)


def test_runs_in_another_process_with_this_ones_threads_and_environment(monkeypatch):
    monkeypatch.setenv("ISO_PROBE", "seen")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run_fresh(whoami, 21)
    finally:
        torch.set_num_threads(threads)
    assert out["pid"] != os.getpid() and out["x2"] == 42 and out["threads"] == 1 and out["env"] == "seen"


def test_errors_come_back_as_user_errors_or_one_line():
    with pytest.raises(UserError, match=r"^eval.speed.rounds: 0 is not allowed$"):
        run_fresh(refuses)
    with pytest.raises(RuntimeError, match=r"^ValueError: bad value$"):
        run_fresh(breaks)


# Ctrl-C as at a terminal (eval.isolated.interruptible): Python installs no KeyboardInterrupt
# handler where SIGINT arrives ignored (a suite started in the background by a non-interactive shell)
DRIVER = """
import sys
from eval.isolated import interruptible, run_fresh
interruptible()
from test_isolated import sleeps

if __name__ == "__main__":
    try:
        run_fresh(sleeps)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
"""


def test_ctrl_c_ends_the_child_and_raises_here(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "child started"
    children = psutil.Process(proc.pid).children(recursive=True)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
    out, _ = proc.communicate(timeout=GRACE + 30)  # run_fresh waits GRACE for the child, then kills it
    assert proc.returncode == 130 and "interrupted" in out
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_an_engine_that_asks_for_it_is_evaluated_in_one_fresh_process(tiny_model, text_file, home, tmp_path,
                                                                       monkeypatch, capfd):
    """squeeze run measures the evaluations of an engine whose class asks for a fresh process on
    the device (vLLM on a GPU; here transformers, made to ask) in one such process, after the
    others, with the same figures as in this one; a rerun takes them from the cache without one."""
    import json

    import yaml

    from conftest import tiny_recipe
    from eval.engines.hf import HFEngine
    from squeeze.cli import main

    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["speed"] = None
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    here = json.loads((home / "tiny" / "report.json").read_text())
    capfd.readouterr()

    monkeypatch.setenv("SQUEEZE_HOME", str(tmp_path / "home2"))
    monkeypatch.setattr(HFEngine, "fresh_process_evaluations", classmethod(lambda cls, device: True))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    err = capfd.readouterr().err
    assert err.count("(hf), in a fresh process") == 2 and "[eval 2/2] 01-magnitude_prune (hf): measured in" in err
    fresh = json.loads((tmp_path / "home2" / "tiny" / "report.json").read_text())
    for a, b in [(here["baseline"], fresh["baseline"]), (here["artifacts"][0], fresh["artifacts"][0])]:
        assert a["engines"]["hf"]["perplexity"]["perplexity"] == b["engines"]["hf"]["perplexity"]["perplexity"]
        assert not b["engines"]["hf"]["cached"]

    assert main(["run", str(tmp_path / "r.yaml"), "--force"]) == 0
    err = capfd.readouterr().err
    assert "fresh process" not in err and err.count("(hf): cached") == 2


def test_the_first_cuda_initialization_is_traced_where_asked(monkeypatch, capsys):
    """SQUEEZE_TRACE_CUDA_INIT=1: the stack that first initializes CUDA is printed, once, and the
    initialization itself still runs (here a stand-in for torch's, on a machine without CUDA)."""
    from eval.isolated import trace_cuda_init

    calls = []
    monkeypatch.setattr(torch.cuda, "_lazy_init", lambda: calls.append(1))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: len(calls) > 0)
    trace_cuda_init()  # not asked: nothing wrapped
    torch.cuda._lazy_init()
    assert capsys.readouterr().err == "" and calls == [1]
    calls.clear()
    monkeypatch.setenv("SQUEEZE_TRACE_CUDA_INIT", "1")
    trace_cuda_init()

    def makes_a_context():
        torch.cuda._lazy_init()

    makes_a_context()
    makes_a_context()
    err = capsys.readouterr().err
    # one trace (its header once; the stack quotes the line that prints it), naming the caller
    assert calls == [1, 1] and err.startswith("CUDA initialized here")
    assert err.count("(SQUEEZE_TRACE_CUDA_INIT):\n") == 1 and "in makes_a_context" in err
