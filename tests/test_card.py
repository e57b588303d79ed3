"""Model cards (eval.report.card): each evaluated artifact directory gets a README.md whose
front matter parses back as Hugging Face model card metadata and which holds the report's
figures and the gate's verdicts on that artifact."""

from __future__ import annotations

import json
import os
from pathlib import Path
from unittest import mock

import pytest
import yaml
from huggingface_hub import ModelCard

from squeeze.cli import main
from compress.models import hub_id, model_hash
from conftest import tiny_recipe
from eval.report.card import card_text

MC = [{"q": f"is {a} {b}?", "a": a, "b": f"{b} dog", "y": i % 2}
      for i, (a, b) in enumerate(zip("apple river stone cloud green quick lazy brown".split() * 2,
                                     "quick lazy brown apple river stone cloud green".split() * 2))]


@pytest.fixture(scope="module")
def run(tiny_model, text_file, tmp_path_factory) -> tuple[Path, dict]:
    """A two-stage run (50 % magnitude pruning, then int8 W8A8) with a task and a gate that
    passes on both artifacts and fails on the int8 one: (run dir, report)."""
    tmp = tmp_path_factory.mktemp("card")
    task = tmp / "mc.jsonl"
    task.write_text("\n".join(json.dumps(r) for r in MC) + "\n")
    recipe = tiny_recipe(tiny_model, text_file, [{"type": "magnitude_prune", "sparsity": 0.5},
                                                 {"type": "int8", "activations": "dynamic"}], name="cardrun")
    recipe["eval"]["tasks"] = [{"name": "mc", "file": str(task), "kind": "multiple_choice",
                                "prompt": "Q: {{q}}\nA:", "choices": ["a", "b"], "label": "y"}]
    recipe["gate"] = [{"metric": "size_mb", "max": 1e6, "artifacts": "all"},
                      {"metric": "size_mb", "max": 1e-6, "artifacts": "02-*"}]
    (tmp / "r.yaml").write_text(yaml.safe_dump(recipe))
    with mock.patch.dict(os.environ, {"SQUEEZE_HOME": str(tmp / "home")}):
        assert main(["run", str(tmp / "r.yaml")]) == 1  # the gate fails on the int8 artifact, as meant
    run_dir = tmp / "home" / "cardrun"
    return run_dir, json.loads((run_dir / "report.json").read_text())


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_each_artifact_directory_gets_a_card_that_parses_back(run):
    run_dir, report = run
    assert [a["name"] for a in report["artifacts"]] == ["01-magnitude_prune", "02-int8"]
    for a in report["artifacts"]:
        path = Path(a["model_dir"]) / "README.md"
        meta = ModelCard.load(path).data.to_dict()  # huggingface_hub's own parser
        assert meta == front_matter(path.read_text())  # and plain YAML reads the same
        assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
        assert "base_model" not in meta  # a local directory is no hub id
        assert {"squeeze", "compressed", "pruned"} <= set(meta["tags"])
        sq = meta["squeeze"]
        assert sq["recipe"] == "cardrun" and sq["artifact"] == a["name"] and sq["stages"] == a["stages"]
        assert sq["recipe_hash"] == report["provenance"]["recipe_hash"] and len(sq["recipe_hash"]) == 64
        assert sq["compression_hash"] == report["provenance"]["compression_hash"]
    q = ModelCard.load(Path(report["artifacts"][1]["model_dir"]) / "README.md").data.to_dict()
    assert {"quantized", "compressed-tensors"} <= set(q["tags"])
    assert "quantized" not in ModelCard.load(Path(report["artifacts"][0]["model_dir"]) / "README.md").data.tags


def test_card_holds_the_reports_figures_and_the_gates_verdicts(run):
    _, report = run
    for a, verdict in zip(report["artifacts"], ("passed", "failed")):
        text = (Path(a["model_dir"]) / "README.md").read_text()
        meta, m = front_matter(text), a["engines"]["hf"]
        results = {r["metrics"][0]["name"]: r["metrics"][0]["value"] for r in meta["model-index"][0]["results"]}
        assert results["perplexity (hf)"] == round(m["perplexity"]["perplexity"], 4)
        assert results["mc acc (hf)"] == round(m["tasks"]["mc"]["acc"], 4)
        body = text.split("---\n", 2)[2]
        row = next(line for line in body.splitlines() if line.startswith(f"| {a['name']} | hf |"))
        assert f"| {m['perplexity']['perplexity']:.3f} |" in row
        assert f"| {a['retention']['hf']['ppl_retention']:.3f} |" in row
        assert f"| {m['speed']['concurrent']['output_tok_s']['median']:.1f} |" in row
        base = report["baseline"]["engines"]["hf"]["perplexity"]["perplexity"]
        assert any(line.startswith("| baseline") and f"{base:.3f}" in line for line in body.splitlines())
        assert meta["squeeze"]["gate"] == verdict
        assert "PASS: size_mb <= 1e+06" in body or "PASS: size_mb" in body
        assert ("FAIL: size_mb" in body) == (verdict == "failed") and f"**{verdict.upper()}** on this model" in body
        assert "## How it was made" in body and "type: magnitude_prune" in body
        assert "context 64" in body and report["provenance"]["recipe_hash"][:12] in body


def test_card_is_outside_the_model_hash_and_the_manifest(run):
    _, report = run
    d = Path(report["artifacts"][0]["model_dir"])
    before = model_hash(d)
    (d / "README.md").write_text((d / "README.md").read_text() + "\nedited\n")
    assert model_hash(d) == before and "README.md" not in json.loads((d / "manifest.json").read_text())["files"]


def test_base_model_names_the_hub_id_and_the_quantized_relation(run):
    _, report = run
    assert hub_id("smollm2") == "HuggingFaceTB/SmolLM2-135M-Instruct" and hub_id("org/name") == "org/name"
    assert hub_id("./org/name") is None and hub_id(str(Path(report["artifacts"][0]["model_dir"]))) is None
    rep = {**report, "recipe": {**report["recipe"], "model": {**report["recipe"]["model"], "source": "smollm2"}}}
    q, p = (front_matter(card_text(rep, a)) for a in reversed(rep["artifacts"]))
    assert q["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and q["base_model_relation"] == "quantized"
    assert p["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and "base_model_relation" not in p
    nogate = card_text({k: v for k, v in rep.items() if k != "gate"}, rep["artifacts"][0])
    assert "The recipe has no release gate." in nogate and front_matter(nogate)["squeeze"]["gate"] is None
