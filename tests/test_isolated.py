"""eval.isolated.run_fresh: a measurement in a fresh process, its result and its errors handed
back (vLLM's paired rounds run this way: eval.paired)."""

from __future__ import annotations

import os

import pytest
import torch

from compress.errors import UserError
from eval.isolated import run_fresh


def whoami(x: int) -> dict:
    return {"pid": os.getpid(), "x2": 2 * x, "threads": torch.get_num_threads(), "env": os.environ.get("ISO_PROBE")}


def refuses() -> None:
    raise UserError("eval.speed.rounds: 0 is not allowed")


def breaks() -> None:
    raise ValueError("bad value\nsecond line")


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
