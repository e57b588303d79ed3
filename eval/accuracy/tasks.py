"""Task accuracy through lm-evaluation-harness (0.4.x), on the engine that is already open.

lm-eval does the prompting, the scoring and the statistics (acc, acc_norm, exact_match and
their standard errors); this module only turns our task specs into lm-eval task configs and
hands lm-eval the loaded model through lm-eval's own backend, which each engine builds
(`lm_eval_model`: ``HFLM`` around the transformers model object, ``VLLM`` around the
``vllm.LLM`` instance; no second load).

Task specs (``eval.config.TaskSpec``):
  - built-in: ``piqa`` (PIQA validation from the data directory, lm-eval's prompt) and
    ``gsm8k`` (GSM8K word problems from the data directory, lm-eval's prompt and strict
    ``#### N`` answer match; the local copy is the train split, few-shot examples are drawn
    from it too, never the scored question itself);
  - a JSONL file plus a prompt template (Jinja, over the record's fields) and, for
    ``multiple_choice``, the choices and the label field, for ``generate`` the answer field
    and the extraction patterns;
  - ``hub: true``: lm-eval's registered task of that name (needs network for its data).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import logging
import re
from pathlib import Path
from typing import Any
from unittest import mock

from compress.data import data_dir
from compress.errors import UserError

PIQA_PROMPT = "Question: {{goal}}\nAnswer:"
GSM8K_PROMPT = "Question: {{question}}\nAnswer:"
# lm-eval's gsm8k "strict-match": the number after "#### "
GSM8K_EXTRACT = r"#### (\-?[0-9\.\,]+)"
GSM8K_ANSWER = r"#### (.*)"
# what exact_match ignores on both sides (lm-eval's gsm8k: thousands commas, dollar signs, a final dot)
GEN_IGNORE = [",", r"\$", r"\.$"]
BUILTIN = ("piqa", "gsm8k")
# what lm-eval reports for each kind of task file; the first is the headline unless the spec names one
METRICS = {"multiple_choice": ("acc", "acc_norm"), "generate": ("exact_match",)}
WHOLE = r"(?s)^\s*(.*?)\s*$"  # no `extract`: the whole output, stripped (one match)


def builtin(spec) -> dict:
    """The fields a built-in task name implies (file, kind, prompt, ...); {} for other names."""
    if spec.hub or spec.file is not None:
        return {}
    dd = data_dir()
    if spec.name in BUILTIN and dd is None:
        raise UserError(f"task {spec.name!r}: no data directory (pass --data-dir DIR or set SQUEEZE_DATA_DIR; it "
                        f"holds {spec.name}/), or give `file:`")
    if spec.name == "piqa":
        return {"file": str(dd / "piqa" / "validation.jsonl"), "kind": "multiple_choice",
                "prompt": PIQA_PROMPT, "choices": ["sol1", "sol2"], "label": "label"}
    if spec.name == "gsm8k":
        return {"file": str(dd / "gsm8k" / "train.jsonl"), "kind": "generate", "prompt": GSM8K_PROMPT,
                "answer": "answer", "answer_pattern": GSM8K_ANSWER, "extract": GSM8K_EXTRACT,
                "until": ["Question:", "</s>", "<|im_end|>"], "max_new_tokens": 256}
    return {}


def resolved(spec) -> dict:
    """The spec's fields with the built-in ones filled in where the user left them out."""
    d = spec.model_dump()
    for k, v in builtin(spec).items():
        if d.get(k) is None:
            d[k] = v
    return d


def _template_fields(template: str) -> set[str]:
    import jinja2
    from jinja2 import meta

    return meta.find_undeclared_variables(jinja2.Environment().parse(template))


def read_records(path: Path, where: str) -> list[dict]:
    if not path.is_file():
        raise UserError(f"{where}.file: {path}: no such file")
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}.file: {path}:{i}: not JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise UserError(f"{where}.file: {path}:{i}: a record must be a JSON object")
                out.append(rec)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where}.file: {path}: cannot read: {e}") from None
    if not out:
        raise UserError(f"{where}.file: {path}: no records")
    return out


def check_task(spec, where: str) -> int:
    """Validate a task spec against its file (every record, before any work); return the number
    of records. Hub tasks are not checked here (their data comes at run time)."""
    d = resolved(spec)
    if spec.hub:
        return 0
    if d["file"] is None:
        raise UserError(f"{where}: task {spec.name!r} is not built in ({', '.join(BUILTIN)}); give `file:` "
                        "(a JSONL file) with `kind`, `prompt` and its fields, or `hub: true` for lm-eval's task")
    path = Path(d["file"]).expanduser()
    recs = read_records(path, where)
    need = {"prompt": d["prompt"], "kind": d["kind"]}
    if d["kind"] == "multiple_choice":
        need.update(choices=d["choices"], label=d["label"])
    elif d["kind"] == "generate":
        need.update(answer=d["answer"])
    missing = [k for k, v in need.items() if v is None]
    if missing:
        raise UserError(f"{where}: task {spec.name!r} needs {', '.join(missing)} (kind {d['kind']})")
    if spec.metric is not None and spec.metric not in METRICS[d["kind"]]:
        raise UserError(f"{where}.metric: {spec.metric!r} is not measured for a {d['kind']} task; choose "
                        f"{' or '.join(METRICS[d['kind']])}")
    try:
        fields = _template_fields(d["prompt"])
    except Exception as e:  # jinja2.TemplateSyntaxError
        raise UserError(f"{where}.prompt: not a valid template: {e}") from None
    for pat in ("answer_pattern", "extract"):
        if d.get(pat):
            try:
                if re.compile(d[pat]).groups < 1:
                    raise UserError(f"{where}.{pat}: {d[pat]!r} needs one capture group (...) around the answer")
            except re.error as e:
                raise UserError(f"{where}.{pat}: not a valid regular expression: {e}") from None
    for i, rec in enumerate(recs, 1):
        at = f"{where}.file: {path}: record {i}"
        for f in sorted(fields):
            if f not in rec:
                raise UserError(f"{at}: no field {f!r} (used by the prompt); it has {', '.join(rec)}")
        if d["kind"] == "multiple_choice":
            n = _check_choices(rec, d["choices"], at)
            lab = rec.get(d["label"])
            if d["label"] not in rec:
                raise UserError(f"{at}: no label field {d['label']!r}; it has {', '.join(rec)}")
            if not isinstance(lab, int) or isinstance(lab, bool) or not 0 <= lab < n:
                raise UserError(f"{at}: label {d['label']!r} = {lab!r} is not a choice index in 0..{n - 1}")
        else:
            if d["answer"] not in rec:
                raise UserError(f"{at}: no answer field {d['answer']!r}; it has {', '.join(rec)}")
            if d.get("answer_pattern") and not re.search(d["answer_pattern"], str(rec[d["answer"]])):
                raise UserError(f"{at}: answer_pattern {d['answer_pattern']!r} finds nothing in "
                                f"{d['answer']!r}")
    return len(recs)


def _check_choices(rec: dict, choices, at: str) -> int:
    if isinstance(choices, str):
        v = rec.get(choices)
        if not isinstance(v, list) or len(v) < 2 or not all(isinstance(c, str) for c in v):
            raise UserError(f"{at}: choices field {choices!r} must be a list of at least 2 strings")
        return len(v)
    for c in choices:
        if c not in rec:
            raise UserError(f"{at}: no choice field {c!r}; it has {', '.join(rec)}")
    return len(choices)


def _target_fn(answer: str, pattern: str | None):
    """doc -> reference answer: the field, or the pattern's first group found in it."""
    rx = re.compile(pattern) if pattern else None

    def target(doc: dict) -> str:
        v = str(doc[answer])
        if rx is None:
            return v.strip()
        m = rx.search(v)
        return (m.group(1) if m else v).strip()

    return target


def lm_eval_config(spec) -> dict:
    """The lm-eval task config (a dict, as a task YAML would hold it) for a file-backed task."""
    d = resolved(spec)
    path = str(Path(d["file"]).expanduser().resolve())
    cfg: dict[str, Any] = {
        "task": spec.name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": path}},
        "test_split": "test", "fewshot_split": "test", "doc_to_text": d["prompt"],
        "target_delimiter": d["target_delimiter"], "fewshot_delimiter": "\n\n",
        "metadata": {"version": 1.0, "source": "squeeze"},
    }
    if d["kind"] == "multiple_choice":
        ch = d["choices"]
        cfg.update(output_type="multiple_choice", doc_to_target="{{" + d["label"] + "}}",
                   doc_to_choice="{{" + (ch if isinstance(ch, str) else "[" + ", ".join(ch) + "]") + "}}",
                   metric_list=[{"metric": m, "aggregation": "mean", "higher_is_better": True}
                                for m in METRICS["multiple_choice"]])
    else:
        cfg.update(
            output_type="generate_until", doc_to_target=_target_fn(d["answer"], d.get("answer_pattern")),
            # few-shot examples show the whole answer field (a worked solution ending in "#### 72"),
            # the scored target is the answer the pattern finds in it ("72")
            fewshot_config={"sampler": "default", "doc_to_target": "{{" + d["answer"] + "}}"},
            generation_kwargs={"until": list(d["until"]), "do_sample": False, "temperature": 0.0,
                               "max_gen_toks": d["max_new_tokens"]},
            filter_list=[{"name": "extract", "filter": [
                {"function": "regex", "regex_pattern": d["extract"] or WHOLE, "group_select": -1},
                {"function": "take_first"}]}],
            metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                          "ignore_case": True, "ignore_punctuation": False, "regexes_to_ignore": GEN_IGNORE}])
    return cfg


def headline(tm: dict) -> str | None:
    """A task result's headline metric: the one its spec names (`metric`, which the evaluator
    puts on the result), else acc (multiple choice) or exact_match (generation), where measured."""
    return tm.get("metric") or next((k for k in ("acc", "exact_match") if tm.get(k) is not None), None)


def _without_torch_env_report():
    """A context in which lm-eval's simple_evaluate leaves out torch's environment report
    (`loggers.utils.add_env_info` -> `torch.utils.collect_env`), which calls torch.cuda.init():
    a CUDA context in the measuring process, after which vLLM spawns every later engine core
    instead of forking it (seen with SQUEEZE_TRACE_CUDA_INIT on an H200, 2026-12-07: 36-41 s
    per engine load against about 10 s), and 1.4 s of subprocesses (pip, nvidia-smi) per task.
    Squeeze records its own provenance (eval.evaluate). An lm-eval without that function (the
    pins hold 0.4.13, which has it) runs as is."""
    import lm_eval.evaluator as evaluator

    if not hasattr(evaluator, "add_env_info"):
        return contextlib.nullcontext()
    return mock.patch.object(evaluator, "add_env_info",
                             lambda results: results.update(pretty_env_info="left out (eval.accuracy.tasks)"))


def run_tasks(engine, tasks: list, seed: int = 0, batch_size: int | str = 32) -> dict:
    """Evaluate every task spec on the open engine; {task name: {metric: value, ...}}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    lm = engine.lm_eval_model(batch_size)
    out = {}
    for spec in tasks:
        d = resolved(spec)
        if spec.hub:
            task, tm = spec.name, TaskManager()
        else:
            task, tm = lm_eval_config(spec), TaskManager(include_defaults=False)
        with _without_torch_env_report():
            res = lm_eval.simple_evaluate(
                model=lm, tasks=[task], task_manager=tm, limit=spec.limit, num_fewshot=spec.num_fewshot,
                random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
                bootstrap_iters=1000, log_samples=False, verbosity="WARNING")
        r = res["results"][spec.name]
        metrics = {}
        for key, v in r.items():  # "acc,none": 0.64, "acc_stderr,none": 0.011 (stderr "N/A" is skipped)
            if "," in key and isinstance(v, (int, float)):
                metrics[key.split(",", 1)[0]] = float(v)
        n = res.get("n-samples", {}).get(spec.name, {})
        out[spec.name] = {**metrics, "kind": "hub" if spec.hub else d["kind"],
                          "n": n.get("effective"), "n_total": n.get("original"),
                          "num_fewshot": spec.num_fewshot, "limit": spec.limit,
                          "source": "hub" if spec.hub else d["file"],
                          "lm_eval": md.version("lm_eval")}
    return out
