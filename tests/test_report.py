"""Reports: Pareto sets, comparison across runs (and its refusal to mix protocols), the release
gate and its exit codes, JUnit XML against the schema shipped in eval/report/junit.xsd, the
report schema."""

from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

import pytest

from squeeze.cli import main
from eval.report.compare import compare
from eval.report.pareto import pareto_front
from eval.report.tables import write_comparison
from eval.report.report import build_report, write_report


# -- Pareto -----------------------------------------------------------------------------------

def test_pareto_front_exact():
    # (quality, throughput), both higher is better
    pts = [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0), (2.0, 2.0), (0.5, 3.0), (2.0, 2.0), (None, 9.0), (3.0, None)]
    # (2,2) twice: a tie, neither dominates the other, both optimal; (0.5, 3) is optimal on
    # throughput; points with a missing figure are never placed
    assert pareto_front(pts) == {3, 4, 5}
    # lower-is-better on the first axis (perplexity) flips it: (0.5, 3) dominates (1, 2) and (1, 1)
    assert pareto_front(pts, (False, True)) == {4}
    assert pareto_front(pts, (False, False)) == {0, 4}
    assert pareto_front([]) == set() and pareto_front([(None, None)]) == set()
    # equal on one axis, better on the other: dominated
    assert pareto_front([(1.0, 5.0), (1.0, 4.0)]) == {0}


# -- synthetic reports with known numbers -----------------------------------------------------

def metrics(ppl, acc, tok_s, tpot, mem_mib, size_mb, model_hash):
    spread = tok_s and [tok_s * 0.99, tok_s, tok_s * 1.01]
    ppl_proto = {"dataset": "wikitext2", "max_tokens": 8192, "tokens_in_text": 300_000, "context_length": 1024,
                 "stride": 1024}
    speed_proto = {"num_prompts": 8, "input_len": 128, "output_len": 32, "concurrency": 8, "batch1_requests": 2,
                   "warmup": 1, "repeats": 3}
    return {
        "model_hash": model_hash, "size_bytes": int(size_mb * 1e6), "params": 1_000_000, "dtype": "float32",
        "device": "cpu", "hardware": "x86_64 cpu x2 threads", "settings": {"dtype": "float32"},
        "perplexity": None if ppl is None else {"perplexity": ppl, "protocol": ppl_proto, "tokens_scored": 8184},
        "tasks": {"piqa": {"acc": acc, "acc_stderr": 0.01, "kind": "multiple_choice", "n": 100, "n_total": 1838,
                           "limit": 100, "num_fewshot": 0, "lm_eval": "0.4.13", "source": "piqa.jsonl"}}
        if acc is not None else {},
        "speed": None if tok_s is None else {
            "concurrent": {"output_tok_s": {"median": tok_s, "runs": spread}, "ttft_ms": {"p50": 10.0}},
            "batch1": {"tpot_mean_ms": {"median": tpot, "runs": [tpot * 0.99, tpot, tpot * 1.01]}},
            "protocol": speed_proto},
        "memory": {"peak_rss_bytes": int(mem_mib * 2**20)},
    }


def _clean(m):
    return {k: v for k, v in m.items() if v is not None}


PROTOCOL = {"perplexity": {"dataset": "wikitext2", "max_tokens": 8192}, "speed": {"num_prompts": 8},
            "tasks": [{"name": "piqa", "limit": 100}], "engines": {"hf": {"dtype": "float32"}},
            "device": "cpu", "hardware": "x86_64 cpu x2 threads", "seed": 0}


def paired_measurement(base, art, base_hash):
    """A paired measurement (eval.paired) whose per-round ratios sit within 2 % of the true ones."""
    from eval.speed.paired import ratio_range

    thr, tpot = art[2] / base[2], base[3] / art[3]
    return {"base_hash": base_hash, "mode": "both open", "seconds_per_round": 1.5,
            "protocol": {"rounds": 3, "warmup": 1},
            "speedups": {"throughput": ratio_range([thr * 0.98, thr, thr * 1.02]),
                         "batch1_tpot": ratio_range([tpot * 0.98, tpot, tpot * 1.02])}}


def make_report(name, arts, base=(30.0, 0.65, 100.0, 50.0, 1000, 500), protocol=PROTOCOL, base_hash="b0",
                paired=True):
    """arts: {name: (ppl, acc, tok_s, tpot, mem MiB, size MB)}; engine hf only; artifacts with a
    speed measured in paired rounds against the baseline, unless `paired` is False."""
    baseline = {"name": "baseline (tiny)", "model_dir": "/x", "engines": {"hf": _clean(metrics(*base, base_hash))}}
    artifacts = [{"name": n, "stage": "magnitude_prune", "stages": ["magnitude_prune"], "final": True,
                  "model_dir": f"/x/{n}", "stage_info": {}, "engines": {"hf": _clean(metrics(*v, f"h-{n}"))}}
                 for n, v in arts.items()]
    for a, v in zip(artifacts, arts.values()):
        if paired and v[2] is not None:
            a["engines"]["hf"]["paired_speed"] = paired_measurement(base, v, base_hash)
    rep = build_report(baseline, artifacts, recipe={"name": name}, device="cpu", protocol=copy.deepcopy(protocol),
                       provenance={"recipe_hash": "r" * 64, "seeds": {"recipe": 0}})
    return rep


def write_run(tmp_path, name, rep) -> Path:
    d = tmp_path / name
    write_report(rep, d)
    return d


ARTS = {
    "fast-bad": (60.0, 0.55, 200.0, 25.0, 600, 250),     # fastest, smallest, worst
    "slow-good": (31.0, 0.64, 90.0, 55.0, 1100, 500),     # dominated by the baseline (better + faster + smaller)
    "mid": (40.0, 0.60, 150.0, 40.0, 800, 300),           # a tradeoff: optimal
    "mid-twin": (40.0, 0.60, 150.0, 40.0, 800, 300),      # identical to mid: a tie, optimal too
    "no-speed": (35.0, 0.62, None, None, 700, 300),       # missing throughput: not on that chart
}


def test_compare_marks_the_pareto_set_exactly(tmp_path):
    d = write_run(tmp_path, "run-a", make_report("run-a", ARTS))
    (g,) = compare([d])
    opt = {r["artifact"]: r["pareto"] for r in g.rows}
    assert {k for k, v in opt.items() if v["throughput"]} == {"baseline (tiny)", "fast-bad", "mid", "mid-twin"}
    # memory: no-speed (35, 700 MiB) is placed here and is optimal; mid (40, 800) is dominated by it
    assert {k for k, v in opt.items() if v["memory"]} == {"baseline (tiny)", "fast-bad", "no-speed"}
    row = next(r for r in g.rows if r["artifact"] == "mid")
    assert row["ppl_change_pct"] == pytest.approx(100 * 10 / 30) and row["throughput_speedup"]["ratio"] == 1.5
    assert row["tasks"]["piqa.acc"]["retention"] == pytest.approx(0.60 / 0.65)
    # quality on a task instead of perplexity
    (g2,) = compare([d], quality="piqa.acc")
    assert {r["artifact"] for r in g2.rows if r["pareto"]["throughput"]} == {"baseline (tiny)", "fast-bad", "mid",
                                                                               "mid-twin"}
    with pytest.raises(Exception, match="not measured"):
        compare([d], quality="hellaswag.acc")
    # memory on disk instead of the peak: no-speed (35, 300 MB) now dominates mid and mid-twin (40, 300 MB)
    (g3,) = compare([d], memory="disk")
    assert g3.memory.key == "size_bytes"
    assert {r["artifact"] for r in g3.rows if r["pareto"]["memory"]} == {"baseline (tiny)", "fast-bad", "no-speed"}
    (g4,) = compare([d], memory="disk", only="mid*")
    assert [r["artifact"] for r in g4.rows] == ["baseline (tiny)", "mid", "mid-twin"]
    assert all(r["pareto"]["memory"] for r in g4.rows)  # baseline: best quality; mid, mid-twin: smaller, tied


def test_a_task_spec_names_its_headline_metric(tmp_path, capsys):
    """HellaSwag-style: acc and acc_norm measured, the spec's `metric: acc_norm` heads the report
    table, the comparison, the Pareto's default quality axis and the gate's task_retention."""
    def with_hellaswag(rep, scores):
        for entry in [rep["baseline"], *rep["artifacts"]]:
            acc, acc_norm = scores[entry["name"]]
            entry["engines"]["hf"]["tasks"] = {"hellaswag": {
                "acc": acc, "acc_stderr": 0.02, "acc_norm": acc_norm, "acc_norm_stderr": 0.03, "metric": "acc_norm",
                "kind": "multiple_choice", "n": 300, "n_total": 300, "limit": None, "num_fewshot": 0,
                "lm_eval": "0.4.13", "source": "hellaswag.jsonl"}}
            entry["engines"]["hf"].pop("perplexity", None)
        return build_report(rep["baseline"], rep["artifacts"], recipe=rep["recipe"], device="cpu",
                            protocol=rep["protocol"], provenance=rep["provenance"])

    # mid: worse on acc, better on acc_norm than fast-bad
    rep = with_hellaswag(make_report("hs", {"mid": ARTS["mid"], "fast-bad": ARTS["fast-bad"]}),
                         {"baseline (tiny)": (0.377, 0.437), "mid": (0.30, 0.43), "fast-bad": (0.37, 0.35)})
    from eval.report.report import table

    text = table(rep)
    assert "| hellaswag acc_norm |" in text and "| 0.437 ± 0.030 |" in text and "hellaswag acc |" not in text
    assert rep["artifacts"][0]["retention"]["hf"]["tasks"]["hellaswag.acc_norm"]["retention"] == \
        pytest.approx(0.43 / 0.437)
    d = write_run(tmp_path, "hs", rep)
    assert "Task hellaswag: multiple_choice, 300 of 300 records (all), 0-shot, headline acc_norm" in \
        (d / "report.md").read_text()
    (g,) = compare([d])  # no perplexity: quality is the first task's headline
    assert g.quality.key == "task:hellaswag.acc_norm"
    assert {r["artifact"] for r in g.rows if r["pareto"]["throughput"]} == {"baseline (tiny)", "mid", "fast-bad"}
    assert compare([d], quality="hellaswag")[0].quality.key == "task:hellaswag.acc_norm"
    main(["compare", str(d)])
    assert "| hellaswag.acc_norm |" in capsys.readouterr().out
    g_file = tmp_path / "g.yaml"
    g_file.write_text("- {metric: task_retention, task: hellaswag, min: 0.95}\n")
    assert main(["gate", str(d), "--gate", str(g_file)]) == 1
    out = capsys.readouterr().out
    assert "PASS  task_retention[hellaswag] >= 0.95  [mid / hf]: hellaswag.acc_norm retention 0.9840" in out
    assert "FAIL  task_retention[hellaswag] >= 0.95  [fast-bad / hf]: hellaswag.acc_norm retention 0.8009" in out


def test_compare_groups_runs_measured_differently(tmp_path, capsys):
    a = write_run(tmp_path, "run-a", make_report("run-a", {"mid": ARTS["mid"]}))
    b = write_run(tmp_path, "run-b", make_report("run-b", {"fast-bad": ARTS["fast-bad"]}))
    other = {**PROTOCOL, "perplexity": {"dataset": "wikitext2", "max_tokens": 4096}}
    c = write_run(tmp_path, "run-c", make_report("run-c", {"x": ARTS["mid"]}, protocol=other))
    dd = write_run(tmp_path, "run-d", make_report("run-d", {"y": ARTS["mid"]}, base_hash="other-model"))
    groups = compare([a, b, c, dd])
    assert [[r["recipe"]["name"] for r in g.reports] for g in groups] == [["run-a", "run-b"], ["run-c"], ["run-d"]]
    assert "perplexity.max_tokens: 8192 vs 4096" in groups[1].reason
    assert "baseline.hf" in groups[2].reason
    # one baseline row per group, artifacts prefixed by their run where runs are merged
    assert [r["artifact"] for r in groups[0].rows] == ["baseline (tiny)", "run-a/mid", "run-b/fast-bad"]
    paths = write_comparison(groups, tmp_path / "cmp")
    md = paths["md"].read_text()
    assert md.count("## Group") == 3 and f"Not compared with group 1: run-c ({c}/report.json) differs from run-a" in md
    rows = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    assert len(rows) == 3 + 2 + 2 and {r["group"] for r in rows} == {"1", "2", "3"}
    assert rows[1]["artifact"] == "run-a/mid" and float(rows[1]["perplexity"]) == 40.0
    assert rows[1]["pareto_throughput"] == "True" and rows[1]["piqa.acc"] == "0.6"
    assert paths["png1"].stat().st_size > 10_000 and paths["png3"].is_file()
    # the CLI prints the same and writes the same files
    assert main(["compare", str(a), str(c), "-o", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert "## Group 2" in out and (tmp_path / "cli" / "comparison.html").is_file()


def test_compare_bad_input(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "no report.json" in capsys.readouterr().err
    old = tmp_path / "old"
    old.mkdir()
    (old / "report.json").write_text(json.dumps({"schema_version": 1}))
    assert main(["compare", str(old)]) == 2
    err = capsys.readouterr().err
    assert "report schema 1 is not readable" in err and len(err.strip().splitlines()) == 1


# -- the release gate -------------------------------------------------------------------------

GATE_OK = """\
gate:
  - metric: perplexity_increase_pct
    max: 40
  - metric: task_retention
    task: piqa
    min: 0.9
  - metric: throughput_speedup
    min: 1.2
  - metric: size_mb
    max: 400
"""


def test_gate_pass_fail_and_junit(tmp_path, capsys):
    d = write_run(tmp_path, "run", make_report("run", {"mid": ARTS["mid"]}))
    ok = tmp_path / "ok.yaml"
    ok.write_text(GATE_OK)
    assert main(["gate", str(d), "--gate", str(ok)]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "gate passed: 4 of 4" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(GATE_OK.replace("max: 40\n", "max: 5\n").replace("min: 1.2", "min: 2"))
    junit = tmp_path / "gate.xml"
    assert main(["gate", str(d / "report.json"), "--gate", str(bad), "--junit", str(junit)]) == 1
    out = capsys.readouterr().out
    assert "FAIL  perplexity_increase_pct <= 5  [mid / hf]: +33.33 %; needs <= 5" in out
    assert "FAIL  throughput_speedup >= 2  [mid / hf]: 1.50x (1.47-1.53); needs >= 2" in out
    assert "PASS  size_mb <= 400" in out and "gate FAILED: 2 of 4 checks pass" in out
    validate_junit(junit.read_text())
    assert junit.read_text().count("<failure") == 2


def test_gate_fails_on_a_figure_not_measured(tmp_path, capsys):
    d = write_run(tmp_path, "run", make_report("run", {"no-speed": ARTS["no-speed"]}))
    g = tmp_path / "g.yaml"
    g.write_text("- {metric: tpot_speedup, min: 1.0}\n")
    assert main(["gate", str(d), "--gate", str(g)]) == 1
    assert "FAIL  tpot_speedup >= 1  [no-speed / hf]: not measured" in capsys.readouterr().out


@pytest.mark.parametrize("text, expect", [
    ("gate:\n  - metric: speed\n    min: 1\n", "gate[0].metric: Input should be 'perplexity_increase_pct'"),
    ("gate:\n  - metric: size_mb\n", "gate[0]: Value error, give `min` or `max`"),
    ("gate:\n  - metric: size_mb\n    max: big\n", "gate[0].max: Input should be a valid number"),
    ("gate:\n  - metric: task_retention\n    min: 0.9\n", "needs `task`"),
    ("gate:\n  - metric: size_mb\n    max: 1\n    colour: red\n", "gate[0].colour: unknown field; allowed: metric"),
    ("gate: []\n", "gate: must be a non-empty list"),
    ("gate:\n  - metric: size_mb\n    max: 1\n    engine: vllm\n", "gate[0].engine: 'vllm' was not measured"),
    ("gate:\n  - metric: size_mb\n    max: 1\n    artifacts: 'w8*'\n", "gate[0].artifacts: 'w8*' selects no "
     "artifact"),
    ("gate:\n  - metric: size_mb\n    max: .nan\n", "gate[0].max: Input should be a finite number (got nan)"),
    ("gate:\n  - metric: throughput_speedup\n    min: .inf\n",
     "gate[0].min: Input should be a finite number (got inf)"),
    ("gate: [\n", "invalid YAML"),
])
def test_malformed_gate_exits_2_with_one_line(tmp_path, capsys, text, expect):
    d = write_run(tmp_path, "run", make_report("run", {"mid": ARTS["mid"]}))
    g = tmp_path / "g.yaml"
    g.write_text(text)
    assert main(["gate", str(d), "--gate", str(g)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {g}") and expect in err, err


JUNIT_XSD = Path(__file__).resolve().parent.parent / "eval" / "report" / "junit.xsd"


def validate_junit(text: str) -> None:
    """Raise unless `text` is JUnit XML as CI systems read it: valid against the schema shipped
    in the repository (eval/report/junit.xsd: no download, so never skipped offline), and every
    suite's counts match its testcases (what XSD 1.0 cannot say)."""
    import xml.etree.ElementTree as ET

    import xmlschema

    xmlschema.XMLSchema(str(JUNIT_XSD)).validate(text)  # raises on any violation
    root = ET.fromstring(text)
    for suite in [root] if root.tag == "testsuite" else root.iter("testsuite"):
        cases = suite.findall("testcase")
        for attr, n in (("tests", len(cases)), ("failures", sum(len(c.findall("failure")) for c in cases)),
                        ("errors", sum(len(c.findall("error")) for c in cases))):
            if int(suite.get(attr, n)) != n:
                raise ValueError(f"testsuite {suite.get('name')!r}: {attr}={suite.get(attr)} but {n} found")


TC = '<testcase classname="c" name="t"/>'


@pytest.mark.parametrize("xml, why", [
    ('<testsuites><testsuite name="s" tests="1"><testcase classname="c"/></testsuite></testsuites>',
     "a testcase without its required name"),
    (f'<testsuites>{TC}</testsuites>', "a testcase outside a testsuite"),
    (f'<testsuites><testsuite name="s" tests="one">{TC}</testsuite></testsuites>', "a count that is not a number"),
    ('<testsuite name="s" tests="1" failures="1"><testcase name="t"/><failure message="m"/></testsuite>',
     "a failure outside its testcase"),
    ('<testsuite name="s" tests="1"><testcase name="t"><skipped/><failure/></testcase></testsuite>',
     "a testcase both skipped and failed"),
    ('<testsuite name="s" tests="1" time="-1"><testcase name="t"/></testsuite>', "a negative time"),
    ('<testsuite name="s" tests="1" timestamp="yesterday"><testcase name="t"/></testsuite>',
     "a timestamp not ISO 8601"),
    (f'<testsuite name="s" tests="2">{TC}</testsuite>', "tests=2 with one testcase"),
    (f'<testsuite name="s" tests="1" failures="1">{TC}</testsuite>', "failures=1 with none"),
])
def test_junit_validator_rejects_invalid_xml(xml, why):
    """The check is real: each of these is refused (schema or counts), with no network."""
    import xmlschema

    with pytest.raises((xmlschema.XMLSchemaValidationError, ValueError)):
        validate_junit(xml)


def test_junit_validator_accepts_what_ci_readers_take():
    validate_junit('<?xml version="1.0" encoding="UTF-8"?>\n<testsuites name="all" tests="3" failures="1" errors="1">'
                   '<testsuite name="s" tests="3" failures="1" errors="1" skipped="1" time="0.25" '
                   'timestamp="2026-01-02T03:04:05+0100" hostname="h"><properties><property name="k" value="v"/>'
                   '</properties><testcase classname="c" name="a" time="0.1"><failure message="m" type="t">x'
                   '</failure><system-out>o</system-out></testcase><testcase name="b"><error message="e"/></testcase>'
                   '<testcase name="c"><skipped message="why"/></testcase><system-err>e</system-err></testsuite>'
                   '</testsuites>')


# -- the report file ----------------------------------------------------------------------------

def test_report_matches_its_json_schema(tmp_path):
    import jsonschema

    from eval.report.gate import apply_gate, parse_gate
    schema = json.loads((Path(__file__).parent.parent / "eval" / "report" / "report.schema.json").read_text())
    rep = make_report("run", ARTS)
    rep["gate"] = apply_gate(rep, parse_gate([{"metric": "size_mb", "max": 400}], "g"))
    d = write_run(tmp_path, "run", rep)
    doc = json.loads((d / "report.json").read_text())
    jsonschema.validate(doc, schema)
    assert doc["schema_version"] == 4 and doc["provenance"]["host"]["cpu"]
    assert {"torch", "transformers", "python"} <= set(doc["provenance"]["versions"])
    bad = copy.deepcopy(doc)
    del bad["artifacts"][0]["engines"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    md = (d / "report.md").read_text()
    assert "Release gate: **FAILED**" in md and "Provenance:" in md and "recipe_hash rrrrrrrrrrrr" in md


def test_cut_lines_say_what_a_structured_cut_and_a_distillation_did():
    from eval.report.lines import cut_lines

    info = {"heads": [8, 6], "kv_heads": [4, 3], "kept_heads_per_layer": [[0, 1, 2, 3, 6, 7], [2, 3, 4, 5, 6, 7]],
            "mode": "kv_groups"}
    assert cut_lines(info) == ["heads 8 -> 6 in every layer", "kv heads 4 -> 3 in every layer",
                               "query heads kept per layer: 0: 0,1,2,3,6,7; 1: 2,3,4,5,6,7"]
    assert cut_lines({"layers": [30, 22], "removed_layers": [3, 7]}) == ["layers 30 -> 22", "decoder layers removed: 3, 7"]
    assert cut_lines({"held_out_perplexity": {"start": 40.0, "end": 30.5, "teacher": 25.0}}) == [
        "held-out perplexity 40.000 -> 30.500 (teacher 25.000)"]
    assert cut_lines({"steps": 610, "tokens_per_step": 32768, "processes": 2, "sharding": "fsdp", "resumed_at": 300,
                      "tokens_per_s": 116526.8, "mfu": 0.1127}) == [
        "trained 610 steps of 32,768 tokens (resumed at step 300) on 2 processes (fsdp), 116,527 tokens/s, MFU 11.3%"]
    assert cut_lines({"steps": 4, "tokens_per_step": 128, "processes": 1, "sharding": None, "resumed_at": None,
                      "tokens_per_s": None}) == ["trained 4 steps of 128 tokens on 1 process"]
    assert cut_lines({"sparsity": 0.5}) == []
