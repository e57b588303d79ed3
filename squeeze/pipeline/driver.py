"""`run`: a recipe end to end (checks, stages, evaluation, report) in its run directory."""

from __future__ import annotations

from pathlib import Path

from compress.models import resolve_device, resolve_model
from squeeze.pipeline.chain import run_stages
from squeeze.pipeline.checks import preflight
from squeeze.pipeline.evaluation import evaluate_and_report
from squeeze.pipeline.rundir import clear_partial, prepare_run_dir, run_dir_for, run_lock
from squeeze.recipe import Recipe


def run(recipe: Recipe, run_dir: Path | None = None, force: bool = False, recipe_text: str | None = None,
        evaluate_outputs: bool = True) -> dict | None:
    """Run a recipe end to end; return the report (None when `evaluate_outputs` is False)."""
    run_dir = run_dir_for(recipe, run_dir)
    device = resolve_device(recipe.device)
    base_dir = resolve_model(recipe.model.source, recipe.model.allow_pickle)
    preflight(recipe, device, base_dir)
    with run_lock(run_dir):
        prepare_run_dir(recipe, run_dir, force, recipe_text)
        clear_partial(run_dir)
        done = run_stages(recipe, run_dir, device, base_dir)
        if evaluate_outputs:
            return evaluate_and_report(recipe, run_dir, device, base_dir, done)
    return None
