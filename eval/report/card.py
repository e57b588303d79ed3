"""Model cards: a README.md in each evaluated artifact directory, so that a pushed model shows
how it was made and measured.

The pipeline writes them after the evaluation and the gate (`write_cards(report)`), from the
run's report, one per artifact that has a directory. A card is the Hugging Face model card
format (huggingface_hub's ModelCard / ModelCardData, the Hub's metadata spec):

  front matter: base_model (a hub id, where the source has one) and base_model_relation
    (quantized, for a quantized artifact); library_name transformers; pipeline_tag; tags
    (squeeze, compressed, pruned / quantized / distilled, the checkpoint's format such as
    compressed-tensors); model-index: the perplexity and task figures per engine; squeeze:
    recipe, recipe_hash, compression_hash, artifact, stages and the gate's verdict here;
  body: the report's table cut to the baseline and this artifact (every engine), the gate's
    verdicts on this artifact, the stages as the recipe gave them, the protocol, provenance.

README.md is evidence, not model: it is written after the directory's manifest, and the
model's content hash (config and weights) does not cover it, so a card never changes a cache
key. Running the recipe again rewrites it with the figures of that run.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from compress.fsutil import atomic_write_text
from compress.models import hub_id
from eval.accuracy.tasks import headline
from eval.report.lines import protocol_lines, provenance_lines
from eval.report.report import table

KINDS = {"compress.prune": "pruned", "compress.quant": "quantized", "compress.distill": "distilled"}


def quantization(artifact: dict) -> dict | None:
    return next((m["quantization"] for m in artifact["engines"].values() if m.get("quantization")), None)


def tags(artifact: dict) -> list[str]:
    """squeeze, compressed, what its stages did (by the stage's package), the checkpoint format."""
    from compress import registry

    out = ["squeeze", "compressed"]
    for t in artifact.get("stages") or []:
        stage = registry.get(t)
        mod = getattr(stage.apply, "__module__", "") if stage else ""
        out += [kind for pkg, kind in KINDS.items() if mod.startswith(pkg) and kind != "quantized"]
    q = quantization(artifact)
    out += ["quantized", q["method"]] if q and q.get("method") else ["quantized"] if q else []
    return list(dict.fromkeys(out))


def eval_results(artifact: dict) -> list[EvalResult]:
    """The model-index: perplexity and each task's headline metric, per engine."""
    out = []
    for engine, m in artifact["engines"].items():
        ppl = m.get("perplexity") or {}
        if ppl.get("perplexity") is not None:
            p = ppl.get("protocol") or {}
            wiki, name = p.get("dataset") == "wikitext2", Path(str(p.get("dataset"))).name  # no local paths
            out.append(EvalResult(
                task_type="text-generation", dataset_type="wikitext" if wiki else name,
                dataset_name="WikiText-2 (raw)" if wiki else name,
                dataset_config="wikitext-2-raw-v1" if wiki else None, dataset_split="test" if wiki else None,
                metric_type="perplexity", metric_value=round(ppl["perplexity"], 4),
                metric_name=f"perplexity ({engine})",
                metric_args={"engine": engine, "context_length": p.get("context_length"), "stride": p.get("stride"),
                             "tokens_scored": ppl.get("tokens_scored")}))
        for task, tm in (m.get("tasks") or {}).items():
            metric = headline(tm)
            if metric and tm.get(metric) is not None:
                out.append(EvalResult(
                    task_type="multiple-choice" if tm.get("kind") == "multiple_choice" else "text-generation",
                    dataset_type=task, dataset_name=task, metric_type=metric, metric_value=round(tm[metric], 4),
                    metric_name=f"{task} {metric} ({engine})",
                    metric_args={"engine": engine, "n": tm.get("n"), "num_fewshot": tm.get("num_fewshot")}))
    return out


def verdicts(report: dict, name: str) -> list[dict]:
    return [v for v in (report.get("gate") or {}).get("verdicts", []) if v["artifact"] == name]


def made_by(report: dict, artifact: dict) -> list[dict]:
    """The stage specs that made the artifact, as the recipe gave them."""
    recipe = report.get("recipe") or {}
    chain = list(recipe.get("stages") or []) + list((recipe.get("variants") or {}).get(artifact["name"], []))
    return chain[:len(artifact.get("stages") or [])]


def card_data(report: dict, artifact: dict) -> ModelCardData:
    recipe, prov, mine = report.get("recipe") or {}, report.get("provenance") or {}, verdicts(report, artifact["name"])
    source = (recipe.get("model") or {}).get("source")
    base = hub_id(source) if source else None
    results = eval_results(artifact)
    return ModelCardData(
        base_model=base, base_model_relation="quantized" if base and quantization(artifact) else None,
        library_name="transformers", pipeline_tag="text-generation", tags=tags(artifact),
        model_name=f"{recipe.get('name', 'squeeze')}/{artifact['name']}" if results else None,
        eval_results=results or None,
        squeeze={"recipe": recipe.get("name"), "recipe_hash": prov.get("recipe_hash"),
                 "compression_hash": prov.get("compression_hash"), "artifact": artifact["name"],
                 "stages": artifact.get("stages"),
                 "gate": None if not mine else "passed" if all(v["passed"] for v in mine) else "failed"})


def gate_section(report: dict, name: str) -> list[str]:
    mine = verdicts(report, name)
    if not report.get("gate"):
        return ["The recipe has no release gate."]
    if not mine:
        return ["The release gate has no criterion on this model."]
    n_ok = sum(v["passed"] for v in mine)
    return [f"**{'PASSED' if n_ok == len(mine) else 'FAILED'}** on this model ({n_ok} of {len(mine)} checks "
            f"pass; the run's gate as a whole: {'passed' if report['gate']['passed'] else 'failed'}).", ""] + [
        f"- {'PASS' if v['passed'] else 'FAIL'}: {v['criterion']} ({v['engine']}): {v['detail']}" for v in mine]


def card_text(report: dict, artifact: dict) -> str:
    data = card_data(report, artifact)
    source = ((report.get("recipe") or {}).get("model") or {}).get("source") or report["baseline"]["name"]
    chain = made_by(report, artifact)
    body = [f"# {artifact['name']}", "",
            f"`{source}` compressed by Squeeze (recipe `{(report.get('recipe') or {}).get('name', '?')}`): "
            f"{' -> '.join(artifact.get('stages') or [])}. Every figure below was measured by Squeeze's evaluator, "
            "against the uncompressed baseline on the same engine and machine.", "",
            "## Measured", "", table({**report, "artifacts": [artifact]}), "",
            "## Release gate", "", *gate_section(report, artifact["name"]), ""]
    if chain:
        body += ["## How it was made", "", "```yaml", yaml.safe_dump(chain, sort_keys=False).rstrip(), "```", ""]
    body += ["## How it was measured", "", *protocol_lines(report), "",
             "## Provenance", "", *provenance_lines(report),
             f"- Report: the run's report.json (schema {report.get('schema_version')}), {report.get('created')}", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)).content


def write_cards(report: dict) -> list[Path]:
    """README.md in each artifact directory of the report that exists; the paths written."""
    out = []
    for a in report.get("artifacts") or []:
        d = Path(a.get("model_dir") or "")
        if a.get("model_dir") and d.is_dir():
            atomic_write_text(d / "README.md", card_text(report, a))
            out.append(d / "README.md")
    return out
