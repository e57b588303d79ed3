"""`squeeze run`, `validate`, `stages` and `import-gguf`: the commands that work on recipes,
stages and checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compress.errors import UserError


def cmd_run(a) -> int:
    from compress.models import resolve_device
    from squeeze.pipeline import run, run_dir_for
    from squeeze.recipe import load_recipe
    from eval.report.report import table

    recipe = load_recipe(a.recipe)
    if recipe.requires == "gpu" and not (device := resolve_device(recipe.device)).startswith("cuda"):
        raise UserError(f"{a.recipe}: requires: gpu (the recipe is sized for a GPU), and the device is {device}; run "
                        "it on a GPU machine, or remove `requires: gpu` to run it here anyway")
    run_dir = run_dir_for(recipe, a.output)
    if a.cluster is not None:
        from squeeze.pipeline.cluster import check_address

        check_address(a.cluster)
    report = run(recipe, run_dir, force=a.force, recipe_text=Path(a.recipe).read_text(),
                 evaluate_outputs=not a.no_eval, cluster=a.cluster, store=a.store)
    if report is None:  # --no-eval: on a cluster, a stage task that failed is exit 1 (tasks.json names it)
        tasks = run_dir / "tasks.json"
        failed = (a.cluster or recipe.execution.cluster) and tasks.is_file() and any(
            t["state"] in ("failed", "skipped") for t in json.loads(tasks.read_text())["tasks"])
        return 1 if failed else 0
    if recipe.is_matrix:
        from eval.report.compare import compare_reports
        from eval.report.tables import markdown_table, write_comparison

        groups = compare_reports([{**report, "_path": str(run_dir / "report.json")}])
        paths = write_comparison(groups, run_dir)
        print(markdown_table(groups[0].rows))
        print(f"\ncomparison: {paths['md']}, {paths['csv']}, {paths['html']}; Pareto chart: {paths['png1']}")
    else:
        print(table(report))
    print(f"report: {run_dir / 'report.md'}, {run_dir / 'report.html'}")
    rc = report_errors(report)
    for line in report.get("failed_tasks", []):  # on a cluster: a variant whose stage failed has no row
        print(f"error: {line}", file=sys.stderr)
        rc = 1
    if report.get("gate"):
        from eval.report.gate import verdict_lines

        print("\n" + "\n".join(verdict_lines(report["gate"])) + f"\n(gate.json, gate.xml in {run_dir})")
        rc = rc or (0 if report["gate"]["passed"] else 1)
    return rc

def cmd_validate(a) -> int:
    from squeeze.recipe import load_recipe

    from compress.models import local_model_dir, resolve_device
    from squeeze.pipeline import preflight

    r = load_recipe(a.recipe)
    base = local_model_dir(r.model.source)
    device = resolve_device(r.device) if base is not None else None
    skipped = ("the model is not on this machine yet" if base is None else
               f"the recipe is sized for a GPU (requires: gpu) and the device here is {device}"
               if r.requires == "gpu" and not device.startswith("cuda") else None)
    if skipped is None:  # the stages' own checks against the model, as `run` makes them first
        preflight(r, device, base)
    else:
        from eval.evaluate import check_eval

        check_eval(r.eval)
    checked = f"; model checks skipped: {skipped}" if skipped else ""
    what = (f"{len(r.variants)} variant(s): " + ", ".join(v.name for v in r.variants)) if r.is_matrix else \
        f"{len(r.stages)} stage(s): {', '.join(s.type for s in r.stages) or 'none'}"
    gate = f"; gate of {len(r.gate)} criteria" if r.gate else ""
    print(f"{a.recipe}: ok ({r.name}: {what}{gate}{checked})")
    return 0

def cmd_stages(a) -> int:
    from compress import registry
    from compress.config_docs import describe, text_lines

    docs = [describe(s) for s in registry.all_stages().values()]
    if a.json:
        print(json.dumps(docs, indent=1, default=str))
        return 0
    for d in docs:
        print(f"{d['name']}: {d['summary']}", *text_lines(d["fields"]), sep="\n")
    return 0

def cmd_import(a) -> int:
    from compress.models import import_gguf

    src = Path(a.file)
    if not src.is_file() or src.suffix != ".gguf":
        raise UserError(f"{src}: not a .gguf file")
    out = Path(a.out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new directory")
    print(import_gguf(src, out))
    return 0

def report_errors(report: dict) -> int:
    """Print the evaluations that failed (one line each, results gathered so far are in the
    report); exit code 1 if there were any."""
    from squeeze.pipeline import evaluation_errors

    errs = evaluation_errors(report)
    for line in errs:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errs else 0
