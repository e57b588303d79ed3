"""The installed GPU stack against .ci/constraints-gpu.txt (eval.stack): bad input is a
constraints file that does not match what is installed: one warning line with the versions,
and the result's and the report's provenance record both."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval.evaluate as ev
from compress.spec import ModelSpec
from eval.config import EvalConfig
from eval import stack
from eval.report.lines import provenance_lines
from eval.report.report import build_report

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def off_pins(tmp_path, monkeypatch) -> Path:
    """A constraints file that the installed stack does not match: torch pinned to a release
    never made, and a package that is not installed."""
    import torch

    p = tmp_path / "constraints-gpu.txt"
    p.write_text(f"# test\ntorch==0.0.1\nnot-a-package-here==1.0\ntransformers=={stack.installed_version('transformers')}\n")
    monkeypatch.setattr(stack, "CONSTRAINTS", p)
    monkeypatch.setattr(stack, "_warned", set())
    assert torch.__version__ != "0.0.1"
    return p


def test_shipped_constraints_parse_and_a_local_build_meets_its_release():
    assert stack.pins(REPO / ".ci" / "constraints-gpu.txt")["torch"] == "2.11.0"
    assert stack.matches("2.11.0", "2.11.0+cu130") and not stack.matches("2.11.0", "2.11.1")
    assert not stack.matches("0.26.0", None)


def test_a_line_that_pins_nothing_is_refused(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("vllm>=0.26\n")
    with pytest.raises(ValueError, match="line 1: 'vllm>=0.26' is not name==version"):
        stack.pins(p)


def test_cpu_or_no_file_records_nothing(off_pins, tmp_path, capsys):
    assert stack.gpu_stack("cpu") is None
    assert stack.gpu_stack("cuda", tmp_path / "absent.txt") is None
    assert capsys.readouterr().err == ""


def test_mismatch_warns_once_in_one_line_and_records_both(off_pins, capsys):
    import torch

    rec = stack.gpu_stack("cuda:0")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: the installed GPU stack is not the one")
    assert f"torch {torch.__version__} (pinned 0.0.1)" in err
    assert "not-a-package-here not installed (pinned 1.0)" in err and "transformers" not in err.split(":", 2)[2]
    assert rec["pinned"] == stack.pins(off_pins) and rec["installed"]["torch"] == torch.__version__
    assert rec["installed"]["not-a-package-here"] is None
    assert rec["mismatches"] == ["torch", "not-a-package-here"]
    assert stack.gpu_stack("cuda") == rec and capsys.readouterr().err == ""  # said once per process


def test_report_provenance_records_and_shows_the_stack(off_pins, capsys):
    import jsonschema

    metrics = {"engine": "hf", "dtype": "float32"}
    rep = build_report({"name": "b", "model_dir": "m", "engines": {"hf": metrics}}, [], device="cuda")
    st = rep["provenance"]["gpu_stack"]
    assert st["pinned"]["torch"] == "0.0.1" and st["mismatches"] == ["torch", "not-a-package-here"]
    line = next(x for x in provenance_lines(rep) if x.startswith("- GPU stack"))
    assert "differs from the pins" in line and "torch" in line and "(pinned 0.0.1)" in line
    schema = json.loads((REPO / "eval" / "report" / "report.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(rep, default=str)), schema)
    assert build_report({"name": "b", "model_dir": "m", "engines": {"hf": metrics}}, [],
                        device="cpu")["provenance"]["gpu_stack"] is None


def test_evaluation_result_provenance_records_the_stack(off_pins, tiny_model, text_file, home, monkeypatch, capsys):
    """The evaluator's hook: on a CUDA device (simulated: the stack check is what differs) the
    result's provenance holds pinned and installed versions, and the warning is printed."""
    real = stack.gpu_stack
    monkeypatch.setattr(ev, "gpu_stack", lambda device: real("cuda", off_pins))
    cfg = EvalConfig(engines=["hf"], speed=None,
                     perplexity={"dataset": str(text_file), "context_length": 32, "max_tokens": 64})
    res = ev.evaluate(tiny_model, cfg, ModelSpec(source=str(tiny_model)))
    assert res["provenance"]["gpu_stack"]["installed"]["not-a-package-here"] is None
    assert res["provenance"]["gpu_stack"]["pinned"]["torch"] == "0.0.1"
    assert "warning: the installed GPU stack" in capsys.readouterr().err


def test_module_cli_exits_1_when_a_pinned_package_is_missing(off_pins, capsys):
    assert stack.main([str(off_pins)]) == 1
    out, err = capsys.readouterr()
    assert "torch" in out and "<- differs" in out and "error: not installed: not-a-package-here" in err
