"""Engine tuning studies: strategies under a budget, failed trials, resume after a kill,
the landscape and its files, bad input. vLLM trials run against tests/fake_openai_server.py
(whose best setting is known: max_num_seqs 8), HF trials against the real transformers
engine on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from compress.errors import UserError
from eval.config import TuneConfig
from eval.tune import space as sp
from eval.tune.study import Study

ROOT = Path(__file__).resolve().parent.parent

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
    res = _study(tiny_model, tmp_path, cfg).run()
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
    ({"linear_backend": ["machete", "fastest"]}, "linear_backend: 'fastest' is not allowed; expected auto, cutlass,"),
])
def test_bad_search_space(space, msg, tiny_model, tmp_path):
    with pytest.raises(UserError, match=msg) as e:
        _study(tiny_model, tmp_path, _cfg(space=space))
    assert len(e.value.lines) == 1


def test_tune_cli_bad_input(tiny_model, capsys):
    from squeeze.cli import main

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


def test_recipe_serving_and_tuning_sections(fake, tiny_model, text_file, home, tmp_path, monkeypatch):
    """`squeeze run` with eval.serving (servers: the fake one) and eval.tune (HF engine, 2 trials):
    both sections in report.json (schema-valid) and report.md; a re-run serves from its cache
    and the study measures nothing more."""
    import jsonschema
    import yaml

    from squeeze.cli import main
    from tests.conftest import tiny_recipe

    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["serving"] = {"num_prompts": 3, "input_len": 4, "output_len": 4, "rates": [".inf"], "warmup": 0,
                            "client": "squeeze"}  # the fake server: vllm bench serve would need real vLLM
    r["eval"]["tune"] = {"engine": "hf", "strategy": "grid", "budget": 2, "repeats": 1,
                         "space": {"batch_size": [1, 3]}, "workload": {"num_prompts": 3, "input_len": 4,
                                                                      "output_len": 4}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r).replace("'.inf'", ".inf"))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    run = home / "tiny"
    rep = json.loads((run / "report.json").read_text())
    schema = json.loads((ROOT / "eval" / "report" / "report.schema.json").read_text())
    jsonschema.validate(rep, schema)
    assert [row["target"] for row in rep["serving"]["rows"]] == ["baseline", "01-magnitude_prune"]
    assert all(row["completed"] == 3 for row in rep["serving"]["rows"])
    t = rep["tuning"]["01-magnitude_prune"]
    assert t["measured"] == 2 and t["best"]["settings"]["batch_size"] in (1, 3)
    md = (run / "report.md").read_text()
    assert "Serving (vLLM server, streaming load):" in md and "Engine tuning, 01-magnitude_prune (hf" in md

    served = []
    monkeypatch.setattr("eval.speed.serving_report.run_targets", lambda *a, **k: served.append(a))
    assert main(["run", str(tmp_path / "r.yaml")]) == 0
    assert served == []  # cached per model: no server started again
    assert json.loads((run / "report.json").read_text())["tuning"]["01-magnitude_prune"]["measured"] == 2


def test_recipe_refuses_a_bad_tuning_space_before_any_work(tiny_model, text_file, home, tmp_path, capsys):
    import yaml

    from squeeze.cli import main
    from tests.conftest import tiny_recipe

    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["tune"] = {"engine": "hf", "space": {"batch_size": [0]}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["run", str(tmp_path / "r.yaml")]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: eval.tune.space.batch_size: 0 is not allowed; expected a positive integer (requests per static batch)"
    assert not (home / "tiny" / "stages").exists()


@pytest.mark.parametrize("gain,last", [
    ({"ratio": 1.37, "lo": 1.32, "hi": 1.43, "verdict": "faster"}, "Use it: `vllm serve m --max-num-seqs 256`"),
    ({"ratio": 1.02, "lo": 0.97, "hi": 1.08, "verdict": "no measurable change"}, "Use it: `vllm serve m --max-num-seqs 256`"),
    ({"ratio": 0.94, "lo": 0.85, "hi": 1.04, "verdict": "no measurable change"},
     "The defaults' median is higher, inside the noise: keep them (or widen the space)."),
    ({"ratio": 0.80, "lo": 0.75, "hi": 0.85, "verdict": "slower"},
     "The defaults beat every setting tried: keep them (or widen the space)."),
])
def test_recommendation_keeps_the_defaults_when_they_measure_higher(gain, last):
    from eval.tune.landscape import recommendation

    res = {"best": {"number": 2, "settings": {"max_num_seqs": 256}, "value": 4986.7}, "unit": "output tok/s",
           "gain": gain, "objective": "throughput", "apply": {"vllm_serve": "vllm serve m --max-num-seqs 256"}}
    lines = recommendation(res)
    assert lines[0].startswith("Best: trial 2 (max_num_seqs=256): ") and lines[-1] == last


def test_the_linear_kernels_a_server_chose_are_read_from_its_log_and_reported(tmp_path):
    from eval.tune.landscape import recommendation
    from eval.tune.trials import kernels_in_log

    log = tmp_path / "server.log"
    log.write_text("(APIServer pid=1) INFO 12-06 01:00:00 [compressed_tensors_wNa16.py:95] Using MacheteLinearKernel "
                   "for CompressedTensorsWNA16\nINFO [fp8.py:12] Selected CutlassFP8ScaledMMLinearKernel for "
                   "CompressedTensorsW8A8Fp8\nINFO Using max model len 2048\n")
    ran = kernels_in_log(log)
    assert ran == {"CompressedTensorsWNA16": "MacheteLinearKernel",
                   "CompressedTensorsW8A8Fp8": "CutlassFP8ScaledMMLinearKernel"}
    assert kernels_in_log(tmp_path / "missing.log") == {}
    res = {"best": {"number": 1, "settings": {"linear_backend": "machete"}, "value": 10.0, "kernels": ran},
           "unit": "output tok/s", "gain": None, "objective": "throughput", "apply": {"vllm_serve": "vllm serve m"}}
    assert recommendation(res)[0].endswith("Its linear kernels (the server's log): MacheteLinearKernel for "
                                           "CompressedTensorsWNA16; CutlassFP8ScaledMMLinearKernel for "
                                           "CompressedTensorsW8A8Fp8.")
