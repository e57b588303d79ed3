"""How a report's consumers judge a paired speedup (eval.speed.paired): the release gate by its
whole range, the Pareto front with ranges inside the noise as ties; a range the noise floor
called noise counts as reaching 1.0 in both (eval.speed.workload.judged_range)."""

from __future__ import annotations

import json

import yaml

from squeeze.cli import main
from conftest import tiny_recipe
from eval.speed.paired import ratio_range


# ---------------------------------------------------------------------------- the gate

def _gate_report(ranges: dict) -> dict:
    """A report whose artifacts (name -> (lo, hi) of the paired throughput ratio) sit on hf."""
    from test_report import ARTS, make_report

    rep = make_report("run", {n: ARTS["mid"] for n in ranges})
    for a in rep["artifacts"]:
        lo, hi = ranges[a["name"]]
        a["retention"]["hf"]["speed"]["throughput"] = ratio_range([lo, (lo + hi) / 2, hi])
    return rep


def test_gate_speed_passes_only_when_the_whole_range_clears_the_bound():
    from eval.config import GateCriterion
    from eval.report.gate import apply_gate

    rep = _gate_report({"clear": (1.22, 1.30), "across": (1.15, 1.25), "below": (0.95, 1.10)})
    g = apply_gate(rep, [GateCriterion(metric="throughput_speedup", min=1.2, artifacts="all")])
    st = {v["artifact"]: (v["status"], v["passed"], v["detail"]) for v in g["verdicts"]}
    assert st["clear"][:2] == ("pass", True) and st["below"][:2] == ("fail", False)
    assert st["across"][:2] == ("not measurable", False)  # its median (1.20) would have passed
    assert st["across"][2] == "not measurable: the range 1.15-1.25 straddles >= 1.2 (1.20x (1.15-1.25))"
    g = apply_gate(rep, [GateCriterion(metric="throughput_speedup", max=1.2, artifacts="all")])
    assert [v["status"] for v in g["verdicts"]] == ["fail", "not measurable", "pass"]


def test_gate_judges_a_range_the_noise_floor_called_noise_as_reaching_1():
    """0.97-0.99 is wholly below 1, but with a 5 % floor its verdict is "no measurable change":
    a no-regression bound of 1.0 cannot be judged on it (not a "fail"), one of 0.95 passes."""
    from eval.config import GateCriterion
    from eval.report.gate import apply_gate

    rep = _gate_report({"nmc": (0.97, 0.99)})
    s = ratio_range([0.97, 0.98, 0.99], noise_floor=0.05)
    rep["artifacts"][0]["retention"]["hf"]["speed"]["throughput"] = s
    assert s["verdict"] == "no measurable change"
    (v,) = apply_gate(rep, [GateCriterion(metric="throughput_speedup", min=1.0, artifacts="all")])["verdicts"]
    assert v["status"] == "not measurable" and not v["passed"]
    (v,) = apply_gate(rep, [GateCriterion(metric="throughput_speedup", min=0.95, artifacts="all")])["verdicts"]
    assert v["status"] == "pass"
    rep["artifacts"][0]["retention"]["hf"]["speed"]["throughput"] = ratio_range([0.97, 0.98, 0.99])  # no floor
    (v,) = apply_gate(rep, [GateCriterion(metric="throughput_speedup", min=1.0, artifacts="all")])["verdicts"]
    assert v["status"] == "fail"


def test_gate_speed_on_unpaired_speedups_is_not_measurable(tmp_path):
    from eval.config import GateCriterion
    from eval.report.gate import apply_gate, junit_xml
    from test_report import ARTS, make_report

    rep = make_report("run", {"mid": ARTS["mid"]}, paired=False)
    (v,) = apply_gate(rep, [GateCriterion(metric="throughput_speedup", min=1.2)])["verdicts"]
    assert v["status"] == "not measurable" and "1.50x (not paired)" in v["detail"] and "drift" in v["detail"]
    assert 'type="not-measurable"' in junit_xml({"verdicts": [v]})


def test_speed_gate_without_repeats_is_refused(tiny_model, text_file, tmp_path, home, capsys):
    """Bad input: a speed criterion on speedups from fewer than 2 paired rounds, refused in one
    line that says why: before any work in a recipe, and by `squeeze gate` on such a report."""
    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["speed"]["rounds"] = 1
    r["gate"] = [{"metric": "tpot_speedup", "min": 1.0}]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    assert main(["run", str(p)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: gate[0].metric: tpot_speedup needs eval.speed.rounds >= 2 (it is 1): a speedup from "
                   "fewer than 2 paired rounds has no range, so no bound can be said to be cleared or missed"]
    assert not (home / "tiny").exists()
    rep = _gate_report({"mid": (1.5, 1.5)})
    rep["artifacts"][0]["retention"]["hf"]["speed"]["throughput"] = ratio_range([1.5])
    d = tmp_path / "rep"
    d.mkdir()
    (d / "report.json").write_text(json.dumps(rep))
    g = tmp_path / "g.yaml"
    g.write_text("- {metric: throughput_speedup, min: 1.2}\n")
    assert main(["gate", str(d), "--gate", str(g)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mid (hf) was measured in 1 paired round" in err[0] and "rounds >= 2" in err[0]


# ---------------------------------------------------------------------------- Pareto

def test_a_speedup_inside_the_noise_earns_no_star(tmp_path):
    """'noisy' reads more tok/s than the baseline and has worse quality: by point values it would
    be optimal on throughput; its paired range holds 1, so it ties with the baseline and is
    dominated. 'fast' (whole range above 1) keeps its star."""
    from eval.report.compare import compare_reports
    from test_report import make_report

    arts = {"noisy": (40.0, 0.60, 108.0, 50.0, 800, 300), "fast": (45.0, 0.58, 150.0, 40.0, 800, 300)}
    rep = make_report("run", arts)
    for a, rng in zip(rep["artifacts"], ([0.94, 1.08, 1.15], [1.4, 1.5, 1.55])):
        a["retention"]["hf"]["speed"]["throughput"] = ratio_range(rng)
    rep["_path"] = str(tmp_path / "report.json")
    (g,) = compare_reports([rep])
    star = {r["artifact"]: r["pareto"]["throughput"] for r in g.rows}
    assert star == {"baseline (tiny)": True, "noisy": False, "fast": True}
    # a range wholly above 1 whose median the noise floor calls noise ties with the baseline too
    rep["artifacts"][0]["retention"]["hf"]["speed"]["throughput"] = ratio_range([1.01, 1.03, 1.04], noise_floor=0.05)
    assert rep["artifacts"][0]["retention"]["hf"]["speed"]["throughput"]["verdict"] == "no measurable change"
    (g,) = compare_reports([rep])
    assert {r["artifact"]: r["pareto"]["throughput"] for r in g.rows} == star
    rep["artifacts"][0]["retention"]["hf"]["speed"]["throughput"] = ratio_range([1.01, 1.03, 1.04])
    (g,) = compare_reports([rep])  # with no floor the same range is "faster", and earns its star
    assert {r["artifact"]: r["pareto"]["throughput"] for r in g.rows}["noisy"] is True
