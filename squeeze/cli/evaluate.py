"""`squeeze eval`: one model measured (and paired with a baseline) from flags or an eval file."""

from __future__ import annotations

import sys
from pathlib import Path

from squeeze.cli.recipes import report_errors
from compress.errors import UserError


def _flag_errors(e, a) -> UserError:
    """Validation errors named by the flag that set the field (a.eval_flags: dest -> (flag, default));
    the one model-level check on these flags is stride <= context length."""
    def flag(loc) -> str:
        return a.eval_flags.get(loc[-1], (loc[-1],))[0] if loc else "--stride"

    return UserError(*(f"{flag(err['loc'])}: {err['msg']}" for err in e.errors(include_url=False)))


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
            raise _flag_errors(e, a) from None
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
        given = [flag for dest, (flag, default) in a.eval_flags.items() if getattr(a, dest) != default]
        if given:
            raise UserError(f"--eval-config {a.eval_config} sets the whole evaluation; {', '.join(given)} would be "
                            "ignored beside it: put them in the file (perplexity, speed, tasks, vllm) or drop it")
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
        raise _flag_errors(e, a) from None
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
    return report_errors(report)
