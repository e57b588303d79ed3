"""`run`: a recipe end to end (checks, stages, evaluation, report) in its run directory, in this
process (the default) or fanned out over a Ray cluster (squeeze.pipeline.fanout)."""

from __future__ import annotations

import os
from pathlib import Path

from compress.models import resolve_device, resolve_model
from squeeze.pipeline.chain import log, run_stages
from squeeze.pipeline.checks import preflight
from squeeze.pipeline.evaluation import evaluate_and_report
from squeeze.pipeline.rundir import clear_partial, prepare_run_dir, run_dir_for, run_lock
from squeeze.recipe import Recipe


def run(recipe: Recipe, run_dir: Path | None = None, force: bool = False, recipe_text: str | None = None,
        evaluate_outputs: bool = True, cluster: str | None = None, store: str | None = None) -> dict | None:
    """Run a recipe end to end; return the report (None when `evaluate_outputs` is False).
    `cluster` and `store` override the recipe's execution.cluster and execution.store. On a
    cluster, tasks that failed are named in the report's `failed_tasks` (the rest is reported)."""
    over = {k: v for k, v in (("cluster", cluster), ("store", store)) if v is not None}
    ex = recipe.execution.model_copy(update=over) if over else recipe.execution
    run_dir = run_dir_for(recipe, run_dir)
    device = resolve_device(recipe.device)
    base_dir = resolve_model(recipe.model.source, recipe.model.allow_pickle)
    preflight(recipe, device, base_dir)
    started, cache_env = False, os.environ.get("SQUEEZE_EVAL_CACHE")
    try:
        if ex.store:  # the store holds the evaluation cache too, for this process and (fanout) every task
            os.environ["SQUEEZE_EVAL_CACHE"] = str(Path(ex.store).resolve() / "_eval_cache")
        if ex.cluster:
            from squeeze.pipeline.cluster import connect
            from squeeze.pipeline.fanout import check, run_on_cluster

            check(recipe, ex)
            started = connect(ex.cluster)
        with run_lock(run_dir):
            prepare_run_dir(recipe, run_dir, force, recipe_text)
            clear_partial(run_dir)
            measured, failed = {}, []
            if ex.cluster:
                done, measured, failed = run_on_cluster(recipe, run_dir, base_dir, ex, evaluate_outputs)
            else:
                done = run_stages(recipe, run_dir, device, base_dir, store=Path(ex.store) if ex.store else None)
            for line in failed:
                log(f"error: {line}")
            if evaluate_outputs:
                report = evaluate_and_report(recipe, run_dir, device, base_dir, done, measured)
                if failed:
                    report["failed_tasks"] = failed
                return report
    finally:
        if cache_env is None:
            os.environ.pop("SQUEEZE_EVAL_CACHE", None)
        else:
            os.environ["SQUEEZE_EVAL_CACHE"] = cache_env
        if started:
            import ray

            ray.shutdown()
    return None
