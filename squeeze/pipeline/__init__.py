"""Run a recipe: stages in order, each saved as an HF directory, then evaluate and report.

Run directory layout (squeeze.pipeline.rundir) (default ``checkpoints/<recipe name>/``)::

    run.json                      identity: the recipe's compression hash (model, seed, stages)
    recipe.yaml, recipe.json      the recipe as given and as validated
    stages/01-<type>/             HF model dir + stage.json + manifest.json (complete, or absent)
    stages/<key>-<type>/          the same for a matrix recipe, content-addressed (compress.matrix)
    report.json, .md, .html       the evaluation report (eval.report); each evaluated stage directory
                                  gets its model card, README.md (eval.report.card)
    gate.json, gate.xml           the release gate's verdicts, where the recipe has a gate

Every stage directory is written under a temporary name and renamed when complete, its
manifest last, so a crash never leaves a stage that looks done. Running the same recipe
again resumes after the last completed stage; a directory made by another recipe is never
overwritten without ``force``. A matrix run directory is only tied to its model and seed: its
stage directories are keyed by content, so adding variants to the matrix reuses every stage
already made.

The pipeline sits in the top layer with the CLI and the recipe schema: it is the code that
calls both the compression half (compress/) and the evaluator (eval/).
"""

from squeeze.pipeline.chain import chains, run_chain, run_stages, save_model
from squeeze.pipeline.checks import preflight, stage_context
from squeeze.pipeline.driver import run
from squeeze.pipeline.evaluation import evaluate_and_report, evaluation_errors
from squeeze.pipeline.rundir import artifact_names, chain_dirs, is_complete, run_dir_for, run_lock, stage_dir

__all__ = ["run", "run_dir_for", "preflight", "stage_context", "run_stages", "run_chain", "chains", "save_model",
           "evaluate_and_report", "evaluation_errors", "artifact_names", "chain_dirs", "is_complete", "run_lock",
           "stage_dir"]
