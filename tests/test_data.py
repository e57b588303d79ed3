"""Data sets and calibration batches."""

from __future__ import annotations

import json

import pytest
import torch

from compress import data
from compress.errors import UserError
from compress.calibration import CalibrationConfig
from compress.registry import StageContext


def test_builtin_wikitext_from_data_dir(tmp_path, monkeypatch):
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(" = Title = \n hello \n")
    monkeypatch.setenv("SQUEEZE_DATA_DIR", str(tmp_path))
    assert data.load_text("wikitext2") == " = Title = \n hello \n"


def test_missing_builtin_names_the_place_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="tinyshakespeare/input.txt not found.*SQUEEZE_DATA_DIR"):
        data.load_text("tinyshakespeare")


def test_bad_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="SQUEEZE_DATA_DIR: no such directory"):
        data.data_dir()


def test_jsonl_and_unknown_spec(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"text": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    assert data.load_text(str(p)) == "a\n\nb"
    p.write_text('{"txt": 1}\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: each line must be a JSON object with a 'text' field"):
        data.load_text(str(p))
    with pytest.raises(UserError, match="not a built-in"):
        data.load_text("no-such-set")


def test_calibration_batches_are_seeded_windows(tiny_model, text_file):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ctx = StageContext(device="cpu", seed=3, tokenizer=tok)
    cfg = CalibrationConfig(dataset=str(text_file), n_samples=4, seq_len=16)
    a = ctx.calibration(cfg)
    b = ctx.calibration(cfg)
    c = StageContext(device="cpu", seed=4, tokenizer=tok).calibration(cfg)
    assert a.shape == (4, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    full = tok(text_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0].tolist()
    for row in a.tolist():  # each row is a contiguous window of the tokenized text
        assert any(full[i:i + 16] == row for i in range(len(full) - 15))
    with pytest.raises(UserError, match="fewer than n_samples × seq_len = 1 × 1000000"):
        ctx.calibration(CalibrationConfig(dataset=str(text_file), n_samples=1, seq_len=10**6))
