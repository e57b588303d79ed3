"""Run a recipe: stages in order, each saved as an HF directory, then evaluate and report.

The run directory (its layout, resume and crash safety) is described in
squeeze.pipeline.rundir; the checks before any work in checks, the stages in chain, the
evaluation and report in evaluation, the whole run in driver.

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
