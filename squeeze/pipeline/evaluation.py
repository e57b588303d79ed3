"""After the stages: every artifact (and the baseline) evaluated on every engine, speedups
paired, serving and tuning where asked, the gate applied, and the report and model cards written.
This is where the pipeline calls the evaluator (eval/)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from compress.fsutil import atomic_write_text
from squeeze.pipeline.chain import log
from squeeze.pipeline.rundir import record
from squeeze.recipe import Recipe
from compress.spec import StageSpec


def _targets(recipe: Recipe, done: list[tuple[str, list[StageSpec], list[Path]]]) -> list[dict]:
    """What to evaluate: each variant's final output for a matrix; every stage output of one
    recipe (or its last with eval.artifacts: final). Artifact entries without metrics yet."""
    out = []
    for name, stages, outs in filter(lambda c: c[2], done):
        keep = range(len(outs)) if not recipe.is_matrix and recipe.eval.artifacts == "all" else [len(outs) - 1]
        out += [{"name": name or outs[i].name, "stages": [s.type for s in stages[:i + 1]], "model_dir": outs[i],
                 "final": i == len(outs) - 1} for i in keep]
    return out


def evaluate_and_report(recipe: Recipe, run_dir: Path, device: str, base_dir: Path,
                         done: list[tuple[str, list[StageSpec], list[Path]]], measured: dict | None = None) -> dict:
    """Evaluate, pair, serve, tune, gate and report. `measured` holds what a cluster measured
    (squeeze.pipeline.fanout): {("eval" | "paired", model dir, engine): result}; whatever it
    lacks is measured here, in this process, and recorded in events.jsonl."""
    from eval.evaluate import protocol
    from eval.paired import pair_entries
    from eval.report.card import write_cards
    from eval.report.report import build_report, write_report

    m, ecfg = recipe.model, recipe.eval
    measured, events = measured or {}, run_dir / "events.jsonl"
    targets = _targets(recipe, done)
    entries = [{"name": "baseline", "model_dir": base_dir}] + targets
    _evaluate_all(recipe, entries, device, measured, events)
    for a in targets:  # paired on the cluster: eval.paired.pair_entries skips these
        for engine, res in a["engines"].items():
            if (pr := measured.get(("paired", str(a["model_dir"]), engine))) is not None:
                res["paired_speed"] = pr
    pair_entries(entries[0], targets, ecfg, m, device, recipe.seed, log)  # speedups: paired rounds (eval.paired)
    for a in targets:
        for engine, res in a["engines"].items():
            pr = res.get("paired_speed") or {}
            if pr.get("cached") is False and ("paired", str(a["model_dir"]), engine) not in measured:
                record(events, "paired speed measured", model=a["name"], engine=engine)
    for a in targets:
        st = json.loads((a["model_dir"] / "stage.json").read_text())
        a.update(stage=st["type"], stage_info=st["info"], model_dir=str(a["model_dir"]))
    report = build_report({"name": f"baseline ({m.source})", "model_dir": str(base_dir),
                           "engines": entries[0]["engines"]}, targets, recipe=recipe.as_dict(), device=device,
                          protocol=protocol(ecfg, m, device, recipe.seed),
                          provenance={"recipe_hash": recipe.recipe_hash(),
                                      "compression_hash": recipe.compression_hash(),
                                      "seeds": {"recipe": recipe.seed, "eval": recipe.seed}})
    finals = [(a["name"], Path(a["model_dir"])) for a in targets if a["final"]]
    if ecfg.serving is not None:
        from eval import serve_tune

        report["serving"] = serve_tune.serving(ecfg, m, recipe.seed, run_dir, device, [("baseline", base_dir), *finals],
                                               log)
    if ecfg.tune is not None:
        from eval import serve_tune

        report["tuning"] = serve_tune.tuning(ecfg, m, run_dir, device, finals, log)
    if recipe.gate:
        from eval.report.gate import apply_gate, junit_xml

        report["gate"] = apply_gate(report, recipe.gate, "recipe")
        atomic_write_text(run_dir / "gate.json", json.dumps(report["gate"], indent=1, default=str))
        atomic_write_text(run_dir / "gate.xml", junit_xml(report["gate"], f"squeeze gate: {recipe.name}"))
    write_report(report, run_dir)
    write_cards(report)  # README.md (model card) in each artifact directory
    return report


def _evaluate_all(recipe: Recipe, entries: list[dict], device: str, measured: dict, events: Path) -> None:
    """Each entry's `engines`: its evaluation on every engine, from `measured` or measured here.
    An engine that asks for it on this device (eval.engines: fresh_process_evaluations; vLLM on
    a GPU) has all its evaluations measured in one fresh process, after the others."""
    from eval.engines import engine_class
    from eval.evaluate import evaluate

    fresh: dict[str, list] = {}  # engine -> [(tag, entry)] measured in a fresh process
    for i, entry in enumerate(entries):
        entry["engines"] = {}
        for engine in recipe.eval.engine_list():
            tag = f"[eval {i + 1}/{len(entries)}] {entry['name']} ({engine})"
            if (res := measured.get(("eval", str(entry["model_dir"]), engine))) is not None:
                entry["engines"][engine] = {**res, "model_dir": str(entry["model_dir"])}
                log(f"{tag}: from the cluster" + (f": {res['error']}" if res.get("error") else ""))
                continue
            if engine_class(engine).fresh_process_evaluations(device) and (res := evaluate(
                    entry["model_dir"], recipe.eval, recipe.model, engine=engine, device=device, seed=recipe.seed,
                    cached_only=True)) is None:
                entry["engines"][engine] = None  # its place in the report's order
                fresh.setdefault(engine, []).append((tag, entry))
                continue
            log(tag)
            t0 = time.perf_counter()
            res = res or evaluate(entry["model_dir"], recipe.eval, recipe.model, engine=engine, device=device,
                                  seed=recipe.seed)
            log(_line(tag, res, time.perf_counter() - t0))
            _measured(entry, engine, res, events)
    for engine, todo in fresh.items():
        from eval.isolated import run_fresh

        jobs = [(tag, entry["model_dir"]) for tag, entry in todo]
        results = run_fresh(_evaluate_fresh, jobs, recipe.eval, recipe.model, engine, device, recipe.seed)
        for (_, entry), res in zip(todo, results):
            _measured(entry, engine, res, events)


def _evaluate_fresh(jobs: list, cfg, model, engine: str, device: str, seed: int) -> list[dict]:
    """In a fresh process (eval.isolated.run_fresh): each (tag, model dir) of `jobs` evaluated on
    `engine`, logged to stderr."""
    from eval.evaluate import evaluate
    from eval.isolated import stderr_log

    out = []
    for tag, model_dir in jobs:
        stderr_log(f"{tag}, in a fresh process")
        t0 = time.perf_counter()
        out.append(evaluate(model_dir, cfg, model, engine=engine, device=device, seed=seed))
        stderr_log(_line(tag, out[-1], time.perf_counter() - t0))
    return out


def _line(tag: str, res: dict, seconds: float) -> str:
    """An evaluation's log line: cached, or measured in how long and where the time went."""
    if res.get("cached"):
        return f"{tag}: cached"
    parts = ", ".join(f"{k} {v:.0f}" for k, v in res.get("seconds", {}).items())
    return f"{tag}: measured in {seconds:.0f} s" + (f" ({parts})" if parts else "")


def _measured(entry: dict, engine: str, res: dict, events: Path) -> None:
    """`res` into the entry, and its event where it was measured."""
    entry["engines"][engine] = res
    if not res.get("cached") and not res.get("error"):
        record(events, "evaluation measured", model=entry["name"], engine=engine)


def evaluation_errors(report: dict) -> list[str]:
    """One line per failed evaluation in a report ('<model> (<engine>): <error>')."""
    return [f"{entry['name']} ({e}): {m['error']}" for entry in [report["baseline"], *report["artifacts"]]
            for e, m in entry["engines"].items() if m.get("error")]
