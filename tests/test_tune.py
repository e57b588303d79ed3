"""Engine tuning studies: strategies under a budget, failed trials, resume after a kill,
the landscape and its files, bad input. vLLM trials run against tests/fake_openai_server.py
(whose best setting is known: max_num_seqs 8), HF trials against the real transformers
engine on the tiny model."""

from __future__ import annotations

import json
import math

import pytest

from compress.errors import UserError
from compress.recipe import ModelSpec, TuneConfig
from eval.tune import space as sp
from eval.tune.study import Study

FAST = {"num_prompts": 4, "input_len": 4, "output_len": 8, "rates": [math.inf], "warmup": 0}


def _cfg(**kw) -> TuneConfig:
    return TuneConfig.model_validate({"engine": "vllm", "repeats": 1, "workload": FAST, **kw})


def _study(model, tmp_path, cfg, calls=None, **kw) -> Study:
    st = Study(model, cfg, out_dir=tmp_path / "tune", progress=False, log=(calls.append if calls is not None else
                                                                          lambda s: None), **kw)
    return st


def test_grid_finds_the_known_best_and_records_a_failed_trial(fake, tiny_model, tmp_path):
    cfg = _cfg(strategy="grid", budget=4, space={"max_num_seqs": [2, 3, 8, 32]})
    res = _study(tiny_model, tmp_path, cfg).run()
    by = {t["settings"]["max_num_seqs"]: t for t in res["trials"]}
    assert sorted(by) == [2, 3, 8, 32] and res["measured"] == 4 and res["failed"] == 1
    assert by[3]["state"] == "failed" and "max_num_seqs=3 is not supported" in by[3]["error"]
    assert res["best"]["settings"] == {"max_num_seqs": 8}
    assert by[8]["value"] > by[2]["value"] and by[8]["value"] > by[32]["value"]
    assert res["gain"]["ratio"] > 1.1  # the fake's default (4) streams at twice 8's token delay
    assert "--max-num-seqs 8" in res["apply"]["vllm_serve"] and res["apply"]["vllm_serve"].startswith("vllm serve ")
    d = tmp_path / "tune" / res["study"]
    for f in ("landscape.json", "landscape.md", "landscape.csv", "landscape.png", "best.json"):
        assert (d / f).is_file(), f
    md = (d / "landscape.md").read_text()
    assert "| defaults |" in md and "failed: UserError: vLLM server for" in md and "Use it: `vllm serve" in md
    assert json.loads((d / "best.json").read_text())["best"]["settings"] == {"max_num_seqs": 8}


def test_study_killed_midway_resumes(fake, tiny_model, tmp_path, monkeypatch):
    cfg = _cfg(strategy="grid", budget=3, space={"max_num_seqs": [2, 8, 32]})
    real = Study.measure
    seen = []

    def measure(self, settings, label):
        seen.append(settings)
        if len(seen) == 3:  # defaults, trial 0, then killed in trial 1
            raise KeyboardInterrupt
        return real(self, settings, label)

    monkeypatch.setattr(Study, "measure", measure)
    with pytest.raises(KeyboardInterrupt):
        _study(tiny_model, tmp_path, cfg).run()
    first = json.loads((tmp_path / "tune" / _study(tiny_model, tmp_path, cfg).name / "landscape.json").read_text())
    assert first["measured"] == 1  # what finished before the kill is on disk

    monkeypatch.setattr(Study, "measure", real)
    resumed, log = [], []
    monkeypatch.setattr(Study, "measure", lambda self, s, l: (resumed.append(s), real(self, s, l))[1])
    res = _study(tiny_model, tmp_path, cfg, calls=log).run()
    # the interrupted point again and the one never started; not the defaults, not trial 0
    assert sorted(map(sp.key, resumed)) == sorted(map(sp.key, [seen[2], {"max_num_seqs": 32}]))
    assert any("was interrupted; its setting is measured again" in s for s in log)
    assert any("resuming study" in s and "1 of 3 trials measured" in s for s in log)
    assert res["measured"] == 3 and res["failed"] == 0
    assert [t["state"] for t in res["trials"]].count("interrupted") == 1
    assert _study(tiny_model, tmp_path, cfg).run()["measured"] == 3  # a finished study measures nothing more


def test_tpe_and_random_spend_the_budget_on_distinct_settings(fake, tiny_model, tmp_path, monkeypatch):
    calls = []
    real = Study.measure
    monkeypatch.setattr(Study, "measure", lambda self, s, l: (calls.append(s), real(self, s, l))[1])
    for strategy in ("tpe", "random"):
        calls.clear()
        cfg = _cfg(strategy=strategy, budget=3, space={"max_num_seqs": [2, 8, 16, 32]}, seed=1)
        res = _study(tiny_model, tmp_path, cfg).run()
        keys = [sp.key(c) for c in calls[1:]]
        assert calls[0] == {} and len(keys) == 3 == len(set(keys)), (strategy, calls)
        assert res["measured"] == 3 and res["best"] is not None


def test_p99_latency_under_an_unreachable_floor_recommends_nothing(fake, tiny_model, tmp_path):
    from eval.tune.landscape import markdown

    cfg = _cfg(strategy="grid", budget=2, objective="p99_latency", throughput_floor=1e9,
               space={"max_num_seqs": [2, 8]})
    res = _study(tiny_model, tmp_path, cfg).run()
    assert res["best"] is None and res["gain"] is None and res["measured"] == 2
    assert all(t["feasible"] is False for t in res["trials"])
    md = markdown(res)
    assert "below floor" in md and "No trial succeeded above the throughput floor" in md


def test_hf_study_of_four_trials(tiny_model, tmp_path):
    """The transformers engine, for real: 4 trials over batch size x attention."""
    cfg = TuneConfig.model_validate({"engine": "hf", "strategy": "grid", "budget": 4, "repeats": 2,
                                     "space": {"batch_size": [1, 4], "attn_implementation": ["eager", "sdpa"]},
                                     "workload": {"num_prompts": 4, "input_len": 8, "output_len": 4}})
    res = _study(tiny_model, tmp_path, cfg, model=ModelSpec()).run()
    assert res["measured"] == 4 and res["failed"] == 0
    assert all(t["value"] > 0 and len(t["runs"]) == 2 for t in res["trials"])
    assert res["defaults"]["value"] > 0 and res["gain"] is not None
    assert res["apply"]["hf"]["batch_size"] in (1, 4)


@pytest.mark.parametrize("space,msg", [
    ({}, "the search space is empty"),
    ({"max_num_seq": [1]}, "max_num_seq: not a vllm setting; allowed: max_num_seqs,"),
    ({"max_num_seqs": []}, "max_num_seqs: give a non-empty list of values"),
    ({"max_num_seqs": [0]}, "max_num_seqs: 0 is not allowed; expected a positive integer"),
    ({"enable_chunked_prefill": ["yes"]}, "enable_chunked_prefill: 'yes' is not allowed; expected true or false"),
    ({"block_size": [16, 16]}, "block_size: repeated values"),
])
def test_bad_search_space(space, msg, tiny_model, tmp_path):
    with pytest.raises(UserError, match=msg) as e:
        _study(tiny_model, tmp_path, _cfg(space=space))
    assert len(e.value.lines) == 1


def test_tune_cli_bad_input(tiny_model, capsys):
    from compress.cli import main

    base = ["tune", str(tiny_model)]
    assert main([*base, "--budget", "0"]) == 2
    assert main([*base, "--engine", "hf", "--objective", "goodput"]) == 2
    assert main([*base, "--objective", "p99_latency"]) == 2
    assert main([*base, "--set", "max_num_seqs"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert err == [
        "error: --budget: Input should be greater than 0",
        "error: eval.tune.objective: goodput needs a server's per-request latencies; with engine hf use "
        "throughput or p99_latency",
        "error: squeeze tune: objective p99_latency needs throughput_floor (output tok/s)",
        "error: --set 'max_num_seqs': expected NAME=V1,V2 (e.g. max_num_seqs=32,128)",
    ]


def test_studies_are_kept_per_model_engine_and_gpu(tiny_model, home):
    from eval.evaluate import hardware
    from eval.tune.study import study_dir

    d = study_dir(tiny_model, "vllm", "cpu")
    assert d.parts[-4] == "tune" and d.parts[-2] == "vllm" and d.name.startswith(hardware().split()[0])
    assert d.parts[-3].startswith("model-") and study_dir(tiny_model, "hf", "cpu").parts[-2] == "hf"
