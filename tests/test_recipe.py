"""Recipe validation: good recipes pass; malformed ones give one-line errors with the field path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from compress.cli import main
from compress.errors import UserError
from compress.recipe import load_recipe, parse_recipe
from conftest import REPO

GOOD = """\
name: ok
stages:
  - type: magnitude_prune
    sparsity: 0.5
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "r.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.mark.parametrize("recipe", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    r = load_recipe(recipe)
    assert r.stages or r.variants, "a shipped recipe should do something"


def test_good_recipe_defaults(tmp_path):
    r = load_recipe(write(tmp_path, GOOD))
    assert r.name == "ok" and r.model.source == "smollm2" and not r.model.trust_remote_code
    assert r.stages[0].type == "magnitude_prune" and r.stages[0].config.sparsity == 0.5
    assert r.stages[0].config.skip == ["lm_head"]
    assert r.eval.perplexity.context_length == 1024 and r.eval.perplexity.max_tokens == 8192


def test_compression_hash_ignores_eval_and_formatting(tmp_path):
    a = load_recipe(write(tmp_path, GOOD))
    b = parse_recipe({"name": "ok", "stages": [{"type": "magnitude_prune", "sparsity": 0.5}],
                      "eval": {"speed": None}})
    c = parse_recipe({"name": "ok", "stages": [{"type": "magnitude_prune", "sparsity": 0.6}]})
    assert a.compression_hash() == b.compression_hash() != c.compression_hash()


MALFORMED = [
    ("unknown top-level key", "name: x\nmodle: {}\n", "modle: unknown field; allowed: name, description, model"),
    ("sparsity out of range", "name: x\nstages:\n  - type: magnitude_prune\n    sparsity: 1.5\n",
     "stages[0].sparsity: Input should be less than 1"),
    ("sparsity not a number", "name: x\nstages:\n  - type: magnitude_prune\n    sparsity: half\n",
     "stages[0].sparsity:"),
    ("unknown stage", "name: x\nstages:\n  - type: magnitude_prune\n  - type: prune_everything\n",
     "stages[1].type: unknown stage 'prune_everything'; allowed: awq, bnb, distill, fp8, gptq, int8, magnitude_prune, prune_depth, prune_heads, prune_hidden, prune_mlp, rtn"),
    ("stage without type", "name: x\nstages:\n  - sparsity: 0.5\n", "stages[0].type: missing; allowed:"),
    ("unknown stage field", "name: x\nstages:\n  - type: magnitude_prune\n    sparsty: 0.5\n",
     "stages[0].sparsty: unknown field; allowed: sparsity, skip, overrides"),
    ("missing name", "stages: []\n", "name: required field is missing"),
    ("bad name", "name: ../escape\n", "name: must be 1-100 letters, digits"),
    ("bad device", "name: x\ndevice: tpu\n", "device: must be auto, cpu, cuda or cuda:N (got 'tpu')"),
    ("nested eval field", "name: x\neval:\n  perplexity:\n    context_length: 0\n",
     "eval.perplexity.context_length: Input should be greater than 1"),
    ("bool given as string", "name: x\nmodel:\n  trust_remote_code: 'yes'\n",
     "model.trust_remote_code: Input should be a valid boolean"),
    ("bad dtype", "name: x\nmodel:\n  dtype: int3\n", "model.dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    ("stages not a list", "name: x\nstages: magnitude_prune\n", "stages: must be a list of stages"),
    ("override out of range", "name: x\nstages:\n  - type: magnitude_prune\n    overrides: {'model.layers.0.*': 2}\n",
     "stages[0].overrides.model.layers.0.*: Input should be less than 1"),
    ("stride longer than the window", "name: x\neval:\n  perplexity:\n    context_length: 512\n    stride: 1024\n",
     "eval.perplexity: Value error, stride (1024) must be <= context_length (512)"),
    ("output_len too small", "name: x\neval:\n  speed:\n    output_len: 1\n", "eval.speed.output_len:"),
    ("YAML syntax", "name: x\nstages: [\n", "invalid YAML"),
    ("duplicate key", "name: x\nname: y\n", "duplicate key 'name'"),
    ("python object tag", "name: !!python/object/apply:os.system ['echo pwned']\n", "invalid YAML"),
    ("top level list", "- name: x\n", "recipe must be a mapping"),
    ("empty file", "", "recipe is empty"),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_recipes(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UserError) as ei:
        load_recipe(path)
    assert any(expected in line and line.startswith(str(path)) for line in ei.value.lines), ei.value.lines
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())


def test_several_problems_reported_together(tmp_path):
    path = write(tmp_path, "name: x\ndevice: tpu\nstages:\n  - type: nope\n  - type: magnitude_prune\n    sparsity: 2\n")
    with pytest.raises(UserError) as ei:
        load_recipe(path)
    text = "\n".join(ei.value.lines)
    assert "device:" in text and "stages[0].type" in text and "stages[1].sparsity" in text
    assert len(ei.value.lines) == 3


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "no such recipe file" in capsys.readouterr().err


def test_python_tag_is_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = write(tmp_path, f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError):
        load_recipe(path)
    assert not marker.exists()


def test_validate_cli_exit_codes_in_a_real_process(tmp_path):
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(GOOD)
    bad.write_text("name: x\nstages:\n  - type: magnitude_prune\n    sparsity: 1.5\n")
    cmd = [sys.executable, "-m", "compress.cli", "validate"]
    ok = subprocess.run(cmd + [str(good)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "ok" in ok.stdout
    ko = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, cwd=REPO)
    assert ko.returncode == 2
    assert ko.stderr.strip().count("\n") == 0 and "stages[0].sparsity" in ko.stderr
    assert "Traceback" not in ko.stderr
