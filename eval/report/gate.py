"""The release gate: thresholds checked against a report, a verdict per criterion, JUnit XML.

Criteria (eval.config.GateCriterion) sit in a recipe's ``gate:`` or in a gate file (a
YAML list, or a mapping with ``gate:``). Each is checked on every artifact it selects
(``artifacts``: final, all, or a glob) and every engine (or the one it names). A figure
that was not measured fails its criterion (a gate never passes on a gap); a criterion that
selects nothing in the report is an error, as is a malformed file.

`squeeze gate REPORT --gate FILE [--junit FILE]` exits 0 when every verdict passes, 1 when
one fails, 2 on an error (bad file, no such report); it reads report.json only.
"""

from __future__ import annotations

import fnmatch
import json
import socket
import time
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from pydantic import ValidationError

from compress.errors import UserError
from eval.config import GATE_METRICS, GateCriterion
from compress.yamlio import format_errors, load_yaml
from eval.accuracy.tasks import headline
from eval.report.compare import peak_memory
from eval.speed.workload import fmt_speedup, judged_range


def parse_gate(raw, where: str) -> list[GateCriterion]:
    """Criteria from YAML data: a list, or a mapping whose `gate` is one."""
    if isinstance(raw, dict) and "gate" in raw:
        raw = raw["gate"]
    if not isinstance(raw, list) or not raw:
        raise UserError(f"{where}: gate: must be a non-empty list of criteria (each with metric and min or max; "
                        f"metrics: {', '.join(GATE_METRICS)})")
    out, errors = [], []
    for i, c in enumerate(raw):
        if not isinstance(c, dict):
            errors.append(f"{where}: gate[{i}]: must be a mapping with metric and min or max")
            continue
        try:
            out.append(GateCriterion.model_validate(c))
        except ValidationError as e:
            errors += format_errors(e, GateCriterion, where, f"gate[{i}]")
    if errors:
        raise UserError(*errors)
    return out


def load_gate(path: str | Path) -> list[GateCriterion]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{path}: no such gate file")
    return parse_gate(load_yaml(p), str(path))


def _task_figure(a: dict, engine: str, task: str) -> tuple[dict | None, str]:
    """(the retention record of TASK[.METRIC] on `engine`, 'task.metric')."""
    m = a["engines"][engine]
    name, _, metric = task.partition(".")
    metric = metric or headline((m.get("tasks") or {}).get(name) or {}) or "acc"
    key = f"{name}.{metric}"
    return ((a.get("retention") or {}).get(engine, {}).get("tasks") or {}).get(key), key


def measure(c: GateCriterion, a: dict, engine: str) -> tuple[float | None, str]:
    """The criterion's figure for artifact `a` on `engine`, and how to show it."""
    m, ret = a["engines"][engine], (a.get("retention") or {}).get(engine, {})
    speed = ret.get("speed") or {}
    if c.metric == "perplexity_increase_pct":
        v = ret.get("ppl_change_pct")
        return v, "" if v is None else f"{v:+.2f} %"
    if c.metric == "perplexity_retention":
        v = ret.get("ppl_retention")
        return v, "" if v is None else f"{v:.4f}"
    if c.metric in ("task_retention", "task_drop_points"):
        rec, key = _task_figure(a, engine, c.task)
        if not rec:
            return None, key
        if c.metric == "task_retention":
            return rec["retention"], f"{key} retention {rec['retention']:.4f}" if rec["retention"] is not None else key
        return -rec["change_points"], f"{key} drop {-rec['change_points']:+.2f} points"
    if c.metric in SPEEDUPS:
        s = speed.get(SPEEDUPS[c.metric])
        return (s or {}).get("ratio"), fmt_speedup(s) if s else ""
    if c.metric == "throughput_tok_s":
        v = (((m.get("speed") or {}).get("concurrent") or {}).get("output_tok_s") or {}).get("median")
        return v, "" if v is None else f"{v:.1f} tok/s"
    if c.metric == "peak_memory_mib":
        v = peak_memory(m)
        return (None, "") if v is None else (v / 2**20, f"{v / 2**20:.0f} MiB")
    if c.metric == "size_mb":
        v = m.get("size_bytes")
        return (None, "") if not v else (v / 1e6, f"{v / 1e6:.1f} MB")
    v = ret.get("size_ratio")  # size_ratio
    return v, "" if v is None else f"{v:.3f}"


SPEEDUPS = {"throughput_speedup": "throughput", "tpot_speedup": "batch1_tpot"}  # criterion -> retention speed key
ONE_ROUND = ("a speedup from fewer than 2 paired rounds has no range, so no bound can be said to be cleared or "
             "missed")


def _bounds(c: GateCriterion) -> str:
    return " and ".join(b for b in (c.min is not None and f">= {c.min:g}", c.max is not None and f"<= {c.max:g}") if b)


def speed_check(c: GateCriterion, s: dict) -> tuple[str, str]:
    """(status, detail) of a speedup criterion: "pass" only when the whole paired range clears
    the bound, "fail" when the whole range misses it, "not measurable" when it straddles the
    bound or the speedup was not measured in paired rounds (eval.speed.paired). A range the
    noise floor called noise counts as reaching 1.0 (judged_range)."""
    shown = fmt_speedup(s)
    if s.get("method") != "paired" or s.get("lo") is None:
        return "not measurable", (f"not measurable: {shown}: baseline and artifact were measured apart, not in "
                                  "paired rounds, so drift cannot be told from an effect")
    lo, hi = judged_range(s)  # a range the noise floor called noise claims no difference from 1
    if (c.min is None or lo >= c.min) and (c.max is None or hi <= c.max):
        return "pass", f"{shown}; needs {_bounds(c)}"
    if (c.min is not None and hi < c.min) or (c.max is not None and lo > c.max):
        return "fail", f"{shown}; needs {_bounds(c)}"
    return "not measurable", f"not measurable: the range {lo:.2f}-{hi:.2f} straddles {_bounds(c)} ({shown})"


def recipe_gate_errors(recipe, names: list[str]) -> list[str]:
    """A recipe's gate that could select nothing, checked before any work: an engine not
    measured, a glob matching none of `names` (the artifacts the run will make), a metric or
    task the evaluation does not measure."""
    engines, tasks, out = recipe.eval.engine_list(), [t.name for t in recipe.eval.tasks], []
    for i, c in enumerate(recipe.gate):
        if c.engine and c.engine not in engines:
            out.append(f"gate[{i}].engine: {c.engine!r} is not among eval.engines ({', '.join(engines)})")
        if c.artifacts not in ("final", "all") and not any(fnmatch.fnmatchcase(n, c.artifacts) for n in names):
            out.append(f"gate[{i}].artifacts: {c.artifacts!r} matches no artifact (artifacts: {', '.join(names)})")
        if c.metric.startswith("perplexity_") and recipe.eval.perplexity is None:
            out.append(f"gate[{i}].metric: {c.metric} needs eval.perplexity (it is null)")
        if c.metric in (*SPEEDUPS, "throughput_tok_s") and recipe.eval.speed is None:
            out.append(f"gate[{i}].metric: {c.metric} needs eval.speed (it is null)")
        elif c.metric in SPEEDUPS and recipe.eval.speed.rounds < 2:
            out.append(f"gate[{i}].metric: {c.metric} needs eval.speed.rounds >= 2 (it is "
                       f"{recipe.eval.speed.rounds}): {ONE_ROUND}")
        if c.task and c.task.split(".")[0] not in tasks:
            out.append(f"gate[{i}].task: {c.task.split('.')[0]!r} is not among eval.tasks ({', '.join(tasks) or 'none'})")
    if not names:
        out.append("gate: the recipe has no stages, so there is no artifact to gate")
    return out


def _select(c: GateCriterion, i: int, report: dict, where: str) -> list[tuple[dict, str]]:
    arts = report["artifacts"]
    if c.artifacts == "final":
        chosen = [a for a in arts if a.get("final")]
    elif c.artifacts == "all":
        chosen = list(arts)
    else:
        chosen = [a for a in arts if fnmatch.fnmatchcase(a["name"], c.artifacts)]
    if not chosen:
        names = ", ".join(a["name"] for a in arts) or "none"
        raise UserError(f"{where}: gate[{i}].artifacts: {c.artifacts!r} selects no artifact of the report "
                        f"(artifacts: {names})")
    pairs = [(a, e) for a in chosen for e in a["engines"] if c.engine in (None, e)]
    if not pairs:
        engines = sorted({e for a in chosen for e in a["engines"]})
        raise UserError(f"{where}: gate[{i}].engine: {c.engine!r} was not measured (engines: {', '.join(engines)})")
    return pairs


def _one_round_refusal(c: GateCriterion, i: int, report: dict, where: str) -> str | None:
    """Why a speedup criterion cannot be judged on this report at all (fewer than 2 paired rounds)."""
    rounds = ((report.get("protocol") or {}).get("speed") or {}).get("rounds")
    if c.metric in SPEEDUPS and rounds is not None and rounds < 2:
        return (f"{where}: gate[{i}].metric: {c.metric} on a report measured with eval.speed.rounds = {rounds}: "
                f"{ONE_ROUND}; measure again with rounds >= 2")
    return None


def _verdict(c: GateCriterion, i: int, a: dict, engine: str, where: str) -> dict:
    err = a["engines"][engine].get("error")
    v, shown = measure(c, a, engine)
    s = ((a.get("retention") or {}).get(engine, {}).get("speed") or {}).get(SPEEDUPS.get(c.metric, ""))
    if v is None:
        status, detail = "fail", f"not measured{' (' + shown + ')' if shown else ''}" + (
            f"; the evaluation failed: {err}" if err else "")
    elif s is not None:
        if s.get("verdict") == "spread unknown":
            raise UserError(f"{where}: gate[{i}].metric: {c.metric}: {a['name']} ({engine}) was measured in "
                            f"{s.get('rounds', 1)} paired round: {ONE_ROUND}; measure again with "
                            "eval.speed.rounds >= 2")
        status, detail = speed_check(c, s)
    else:
        ok = (c.min is None or v >= c.min) and (c.max is None or v <= c.max)
        status, detail = "pass" if ok else "fail", f"{shown or format(v, '.4g')}; needs {_bounds(c)}"
    return {"criterion": c.label(), "metric": c.metric, "artifact": a["name"], "engine": engine, "value": v,
            "min": c.min, "max": c.max, "passed": status == "pass", "status": status, "detail": detail}


def apply_gate(report: dict, criteria: list[GateCriterion], where: str = "gate") -> dict:
    """{passed, verdicts: [{criterion, metric, artifact, engine, value, min, max, passed, status,
    detail}]}; status is pass, fail or (speedups: a range across the bound) not measurable. A
    speedup criterion on speedups without a range (fewer than 2 paired rounds) is refused."""
    if errs := [e for i, c in enumerate(criteria) if (e := _one_round_refusal(c, i, report, where))]:
        raise UserError(*errs)
    verdicts = [_verdict(c, i, a, engine, where) for i, c in enumerate(criteria)
                for a, engine in _select(c, i, report, where)]
    return {"passed": all(v["passed"] for v in verdicts), "verdicts": verdicts,
            "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def verdict_lines(gate: dict) -> list[str]:
    out = [f"{'PASS' if v['passed'] else 'FAIL'}  {v['criterion']}  [{v['artifact']} / {v['engine']}]: {v['detail']}"
           for v in gate["verdicts"]]
    n_fail = sum(not v["passed"] for v in gate["verdicts"])
    out.append(f"gate {'passed' if gate['passed'] else 'FAILED'}: {len(gate['verdicts']) - n_fail} of "
               f"{len(gate['verdicts'])} checks pass")
    return out


def junit_xml(gate: dict, suite: str = "squeeze gate") -> str:
    """JUnit XML (the Jenkins / Surefire schema CI systems read): one testcase per verdict,
    classname squeeze.gate.<artifact>.<engine>, a <failure> where it failed."""
    cases = []
    for v in gate["verdicts"]:
        cls = quoteattr(f"squeeze.gate.{v['artifact'].replace('.', '_')}.{v['engine']}")
        head = f'    <testcase classname={cls} name={quoteattr(v["criterion"])} time="0">'
        if v["passed"]:
            cases.append(head + f"\n      <system-out>{escape(v['detail'])}</system-out>\n    </testcase>")
        else:
            kind = "not-measurable" if v.get("status") == "not measurable" else "threshold"
            cases.append(head + f"\n      <failure type=\"{kind}\" message={quoteattr(v['detail'])}>"
                         f"{escape(json.dumps(v, default=str))}</failure>\n    </testcase>")
    n, f = len(gate["verdicts"]), sum(not v["passed"] for v in gate["verdicts"])
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<testsuites name={quoteattr(suite)} tests="{n}" failures="{f}" errors="0" time="0">\n'
            f'  <testsuite name={quoteattr(suite)} tests="{n}" failures="{f}" errors="0" skipped="0" time="0" '
            f'timestamp={quoteattr(gate.get("checked", ""))} hostname={quoteattr(socket.gethostname())}>\n'
            + "\n".join(cases) + "\n  </testsuite>\n</testsuites>\n")
