"""The evaluator: lm-eval tasks, the speed workload and its noise verdicts, memory, the
stack-keyed cache and provenance, and bad input (one line, before any work; results kept).
The vLLM engine's own tests are in test_evaluator_vllm.py."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

from squeeze.cli import main
from compress.errors import UserError
from squeeze.recipe import parse_recipe
from compress.spec import ModelSpec
from eval.config import EvalConfig, TaskSpec
from conftest import tiny_recipe
from eval.speed.workload import compare, distribution, per_request, RequestTiming

MC_PROMPT = "Q: {{q}}\nA:"


def mc_records(n: int = 12) -> list[dict]:
    words = ["apple", "river", "stone", "cloud", "green", "quick", "lazy", "brown"]
    return [{"q": f"is the {words[i % 8]} {words[(i * 3 + 1) % 8]}?", "a": words[(i + 2) % 8],
             "b": f"{words[(i + 5) % 8]} dog", "y": i % 2} for i in range(n)]


def write_jsonl(path, recs) -> str:
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    return str(path)


def hand_acc(engine, recs) -> float:
    """PIQA-style accuracy computed by hand from engine.score: the choice whose continuation
    (' ' + text) has the highest summed log-probability after the rendered prompt."""
    tok, right = engine.tokenizer, 0
    for r in recs:
        ctx = f"Q: {r['q']}\nA:"
        n_ctx = len(tok(ctx, add_special_tokens=False).input_ids)
        scores = []
        for c in (r["a"], r["b"]):
            ids = torch.tensor([tok(ctx + " " + c, add_special_tokens=False).input_ids])
            scores.append(engine.score(ids)[0, n_ctx - 1:].double().sum().item())
        right += int(max(range(2), key=scores.__getitem__) == r["y"])
    return right / len(recs)


# ---- pure parts -------------------------------------------------------------------------

def test_noise_verdicts():
    base = {"median": 100.0, "runs": [98.0, 100.0, 102.0]}
    assert compare(base, {"median": 101.0, "runs": [99.0, 101.0, 103.0]})["verdict"] == "no measurable change"
    c = compare(base, {"median": 130.0, "runs": [128.0, 130.0, 131.0]})
    assert c["verdict"] == "faster" and c["lo"] == pytest.approx(128 / 102) and c["hi"] == pytest.approx(131 / 98)
    # lower is better (TPOT): a higher artifact TPOT is a slowdown, the ratio below 1
    t = compare({"median": 10.0, "runs": [9.9, 10.0, 10.1]}, {"median": 12.0, "runs": [11.9, 12.0, 12.2]},
                higher_is_better=False)
    assert t["verdict"] == "slower" and t["ratio"] == pytest.approx(10 / 12)
    assert compare({"median": 1.0, "runs": [1.0]}, {"median": 2.0, "runs": [2.0]})["verdict"] == "spread unknown"


def test_latency_from_token_stamps():
    reqs = [RequestTiming(0.0, [0.5, 0.6, 0.8]), RequestTiming(0.1, [0.7, 0.9, 1.0])]
    lat = per_request(reqs)
    assert lat["ttft"] == pytest.approx([0.5, 0.6]) and lat["e2e"] == pytest.approx([0.8, 0.9])
    assert lat["tpot"] == pytest.approx([0.15, 0.15]) and lat["itl"] == pytest.approx([0.1, 0.2, 0.2, 0.1])
    d = distribution(lat["itl"])
    assert d["n"] == 4 and d["mean"] == pytest.approx(150.0) and d["p50"] == pytest.approx(150.0)


def test_generation_task_shows_worked_answers_but_scores_the_extracted_one(tmp_path):
    """GSM8K-style: few-shot examples carry the whole answer field (the worked solution), the
    scored reference is what answer_pattern finds in it, and the scored item is never its own
    example."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from eval.accuracy.tasks import lm_eval_config

    recs = [{"q": f"what is {i}+1?", "sol": f"{i} plus one is {i + 1}\n#### {i + 1}"} for i in range(4)]
    spec = TaskSpec(name="g", file=write_jsonl(tmp_path / "g.jsonl", recs), kind="generate", prompt="Q: {{q}}\nA:",
                    answer="sol", answer_pattern="#### (.*)")
    task = get_task_dict([lm_eval_config(spec)], TaskManager(include_defaults=False))["g"]
    doc = list(task.test_docs())[0]
    ctx = task.fewshot_context(doc, num_fewshot=2)
    assert task.doc_to_target(doc) == "1"
    assert ctx.endswith("Q: what is 0+1?\nA:") and ctx.count("what is 0+1?") == 1
    assert ctx.count(" plus one is ") == 2 and ctx.count("\n#### ") == 2


# ---- bad input: one line, before any work ------------------------------------------------

def _recipe_with_task(tmp_path, tiny_model, text_file, task: dict) -> str:
    r = tiny_recipe(tiny_model, text_file, stages=[])
    r["eval"]["tasks"] = [task]
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    return str(p)


@pytest.mark.parametrize("task,records,expected", [
    ({"file": "MISSING"}, None, "eval.tasks[0].file: {missing}: no such file"),
    ({}, [{"q": "x", "a": "1", "b": "2", "y": 0}, {"q": "x", "a": "1", "y": 1}],
     "record 2: no choice field 'b'"),
    ({}, [{"q": "x", "a": "1", "b": "2", "y": 2}], "label 'y' = 2 is not a choice index in 0..1"),
    ({}, [{"question": "x", "a": "1", "b": "2", "y": 0}], "no field 'q' (used by the prompt)"),
    ({"kind": "generate", "answer": "a", "answer_pattern": "#### (.*)"}, [{"q": "x", "a": "7"}],
     "answer_pattern '#### (.*)' finds nothing in 'a'"),
    ({"kind": "generate", "answer": "a", "extract": "no group"}, [{"q": "x", "a": "7"}], "needs one capture group"),
])
def test_bad_task_files_refused_by_validate(task, records, expected, tmp_path, tiny_model, text_file, capsys):
    f = tmp_path / "t.jsonl"
    if records is not None:
        write_jsonl(f, records)
    spec = {"name": "mine", "file": str(f), "kind": "multiple_choice", "prompt": MC_PROMPT, "choices": ["a", "b"],
            "label": "y"}
    spec.update({k: v for k, v in task.items() if k != "file"})
    if task.get("file") == "MISSING":
        spec["file"] = str(tmp_path / "missing.jsonl")
    rc = main(["validate", _recipe_with_task(tmp_path, tiny_model, text_file, spec)])
    err = capsys.readouterr().err
    assert rc == 2 and expected.format(missing=spec["file"]) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_task_without_file_and_missing_perplexity_file(tmp_path, tiny_model, text_file, capsys):
    r = tiny_recipe(tiny_model, text_file, stages=[])
    r["eval"]["tasks"] = [{"name": "hellaswag"}]
    r["eval"]["perplexity"]["dataset"] = str(tmp_path / "nope.txt")
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r))
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "eval.perplexity.dataset" in err and "no such file" in err
    r["eval"]["perplexity"]["dataset"] = str(text_file)
    p.write_text(yaml.safe_dump(r))
    assert main(["validate", str(p)]) == 2
    assert "task 'hellaswag' is not built in (piqa, gsm8k); give `file:`" in capsys.readouterr().err


def test_truncated_safetensors_is_one_line(tiny_model, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    st = bad / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    rc = main(["eval", str(bad), "--engine", "hf", "--no-speed", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "truncated" in err and "model.safetensors" in err and "Traceback" not in err
    st.write_bytes(b"\x05\x00")
    assert main(["eval", str(bad), "--engine", "hf", "--no-speed"]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_eval_config_with_evaluation_flags_is_refused_not_half_applied(tiny_model, tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("perplexity: null\nspeed: {num_prompts: 2, input_len: 8, output_len: 4}\n")
    rc = main(["eval", str(tiny_model), "--engine", "hf", "--eval-config", str(cfg), "--rounds", "5", "--no-perplexity"])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        f"error: --eval-config {cfg} sets the whole evaluation; --no-perplexity, --rounds would be ignored beside "
        "it: put them in the file (perplexity, speed, tasks, vllm) or drop it"]


def test_engine_not_installed_says_how(monkeypatch):
    import importlib.util

    import eval.evaluate as ev

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "vllm" else real(n, *a))
    with pytest.raises(UserError, match=r"'vllm' is not installed here; pip install 'squeeze\[cpu\]'"):
        ev.check_engines(["hf", "vllm"])
    assert EvalConfig().engine_list() == ["hf"]  # the default is both engines only where vllm is there


def test_out_of_memory_keeps_results_and_fails_the_run(tiny_model, text_file, home, tmp_path, monkeypatch, capsys):
    import eval.speed.workload as wl

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(wl, "workload_speed", oom)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(tiny_recipe(tiny_model, text_file)))
    assert main(["run", str(p)]) == 1
    err = capsys.readouterr().err
    assert "error: baseline" in err and "speed: out of memory" in err and "Traceback" not in err
    rep = json.loads((home / "tiny" / "report.json").read_text())
    base = rep["baseline"]["engines"]["hf"]
    assert base["perplexity"]["perplexity"] > 1 and "speed" not in base and "out of memory" in base["error"]
    assert set(base["seconds"]) == {"load", "perplexity"}  # where the time went: the parts that finished
    assert re.search(r"baseline \(hf\): measured in \d+ s \(load \d+, perplexity \d+\)", err)
    assert "failed" in (home / "tiny" / "report.md").read_text()
    assert not list((home / "_eval_cache").glob("*.json")), "a failed evaluation must not be cached"


def test_a_stack_version_change_misses_the_cache(tiny_model, text_file, home, monkeypatch):
    """The cache key holds the software stack: the same model and protocol are measured again
    after torch, transformers, compressed-tensors, lm-eval or vLLM change version, and the
    result records the stack it was measured on."""
    import eval.evaluate as ev

    cfg = EvalConfig(engines=["hf"], speed=None,
                     perplexity={"dataset": str(text_file), "context_length": 32, "max_tokens": 64})
    first = ev.evaluate(tiny_model, cfg, ModelSpec(source=str(tiny_model)))
    assert not first["cached"] and ev.evaluate(tiny_model, cfg, ModelSpec(source=str(tiny_model)))["cached"]
    stack = first["provenance"]["stack"]
    assert stack["torch"] == torch.__version__ and stack["transformers"]
    assert stack["driver"] is None and stack["cuda"] is None  # measured on the CPU
    real = ev._version
    for pkg in ev.STACK_PACKAGES:
        monkeypatch.setattr(ev, "_version", lambda *names, pkg=pkg: "9.9.9" if pkg in names else real(*names))
        res = ev.evaluate(tiny_model, cfg, ModelSpec(source=str(tiny_model)))
        assert not res["cached"], f"a {pkg} upgrade must re-measure"
        assert res["provenance"]["stack"][pkg] == "9.9.9"
    monkeypatch.setattr(ev, "_version", real)
    assert ev.evaluate(tiny_model, cfg, ModelSpec(source=str(tiny_model)))["cached"]  # back on the first stack


def test_stack_versions_reads_driver_and_cuda_on_a_gpu(monkeypatch):
    """On a CUDA device the driver and CUDA version join the key (read through device_info, here
    faked: no GPU needed); a driver update alone changes the stack."""
    import eval.evaluate as ev

    monkeypatch.setattr(ev, "device_info", lambda d: {"device_name": "H100", "cuda": "12.9", "driver": "575.57"})
    gpu = ev.stack_versions("cuda:0")
    assert gpu["driver"] == "575.57" and gpu["cuda"] == "12.9"
    assert ev.stack_versions("cpu")["driver"] is None and ev.stack_versions("cpu")["cuda"] is None
    monkeypatch.setattr(ev, "device_info", lambda d: {"device_name": "H100", "cuda": "12.9", "driver": "580.1"})
    assert ev.stack_versions("cuda:0") != gpu


def test_gpu_provenance_and_memory_create_no_cuda_context(monkeypatch):
    """The GPU's name (cache key, provenance) comes from NVML for the CUDA device as this process
    numbers it (CUDA_VISIBLE_DEVICES), and the memory sampler touches torch's CUDA statistics only
    where this process already has a context: vLLM starts its engines by fork only without one.
    Whether there is a GPU at all is asked through NVML too (importing compress or eval sets
    torch's PYTORCH_NVML_BASED_CUDA_CHECK) (faked NVML and CUDA: no GPU needed)."""
    import sys
    import types

    import eval.evaluate as ev
    import eval.memory as mem
    from eval.engines.facts import VLLMFacts
    from eval.report.report import host_info

    handles = []
    nvml = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlDeviceGetHandleByIndex=lambda i: handles.append(i) or i,
        nvmlDeviceGetHandleByUUID=lambda u: handles.append(u) or u,
        nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3", nvmlSystemGetDriverVersion=lambda: "580.159",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=2 << 30),
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)

    def context(*a, **k):
        raise AssertionError("creates a CUDA context")

    for f in ("get_device_name", "get_device_properties", "get_device_capability", "reset_peak_memory_stats",
              "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, f, context)
    # torch.cuda.is_available() as on a CUDA build: asking the CUDA runtime marks every forked
    # child unable to use CUDA (vLLM's engine core died of it), asking NVML does not
    monkeypatch.setattr(torch.cuda, "_is_compiled", lambda: True)
    monkeypatch.setattr(torch._C, "_cuda_getDeviceCount", context, raising=False)
    monkeypatch.setattr(torch.cuda, "_device_count_nvml", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,GPU-ab12")
    assert ev.hardware() == "NVIDIA H100 80GB HBM3" and handles == [3]
    assert mem.device_info("cuda:1") == {"device_name": "NVIDIA H100 80GB HBM3", "cuda": torch.version.cuda,
                                         "driver": "580.159"} and handles[-1] == "GPU-ab12"
    with mem.MemorySampler("cuda:0", interval=10) as s:
        pass
    out = s.result()
    assert "peak_torch_allocated_bytes" not in out and out["peak_gpu_used_bytes"] == 0
    # the engine facts' checks before loading (compute capability) and the report's host line
    assert VLLMFacts("vllm", "0.26.0", "bfloat16", "cuda:1").gpu() == ("NVIDIA H100 80GB HBM3", (9, 0))
    assert handles[-1] == "GPU-ab12"
    assert host_info("cuda:0")["gpus"] == ["NVIDIA H100 80GB HBM3"]


# ---- lm-eval tasks on the HF engine ------------------------------------------------------

def test_multiple_choice_task_matches_hand_computed_accuracy(tiny_model, tmp_path, monkeypatch):
    """... and lm-eval does not run torch's environment report, whose torch.cuda.init() gives the
    measuring process a CUDA context (vLLM then spawns its later engines instead of forking them)."""
    import lm_eval.evaluator
    import torch.utils.collect_env

    from eval.accuracy.tasks import run_tasks
    from eval.engines.hf import HFEngine

    reports = []
    monkeypatch.setattr(torch.utils.collect_env, "get_pretty_env_info", lambda: reports.append(1) or "")
    add_env_info = lm_eval.evaluator.add_env_info
    recs = mc_records(12)
    spec = TaskSpec(name="mine", file=write_jsonl(tmp_path / "mc.jsonl", recs), kind="multiple_choice",
                    prompt=MC_PROMPT, choices=["a", "b"], label="y", limit=10)
    eng = HFEngine.load(tiny_model)
    try:
        res = run_tasks(eng, [spec], batch_size=4)["mine"]
        expect = hand_acc(eng, recs[:10])
    finally:
        eng.close()
    assert res["n"] == 10 and res["n_total"] == 12 and res["kind"] == "multiple_choice"
    assert res["acc"] == pytest.approx(expect)
    assert res["acc_stderr"] == pytest.approx((expect * (1 - expect) / 9) ** 0.5)
    assert 0 <= res["acc_norm"] <= 1 and res["acc_norm_stderr"] is not None
    assert reports == [] and lm_eval.evaluator.add_env_info is add_env_info  # put back after the call


def test_eval_cli_runs_a_task_file_and_reports_it(tiny_model, text_file, tmp_path, home, capsys):
    recs = mc_records(8)
    spec = {"name": "mine", "file": write_jsonl(tmp_path / "mc.jsonl", recs), "kind": "multiple_choice",
            "prompt": MC_PROMPT, "choices": ["a", "b"], "label": "y"}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(spec))
    rc = main(["eval", str(tiny_model), "--engine", "hf", "--device", "cpu", "--task-file", str(tmp_path / "mine.yaml"),
               "--limit", "6", "--dataset", str(text_file), "--max-tokens", "128", "--context-length", "64",
               "--num-prompts", "2", "--input-len", "8", "--output-len", "3", "--repeats", "2",
               "--output", str(tmp_path / "ev")])
    assert rc == 0
    m = json.loads((tmp_path / "ev" / "report.json").read_text())["baseline"]["engines"]["hf"]
    assert m["tasks"]["mine"]["n"] == 6 and m["speed"]["protocol"]["num_prompts"] == 2
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "| mine acc |" in md and "Task mine: multiple_choice, 6 of 8 records (limit 6), 0-shot" in md
    # the spec names its headline metric: the same cached measurement, acc_norm at the head of the table
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**spec, "metric": "acc_norm"}))
    args = ["eval", str(tiny_model), "--engine", "hf", "--device", "cpu", "--task-file", str(tmp_path / "mine.yaml"),
            "--limit", "6", "--dataset", str(text_file), "--max-tokens", "128", "--context-length", "64",
            "--num-prompts", "2", "--input-len", "8", "--output-len", "3", "--repeats", "2"]
    capsys.readouterr()
    assert main(args + ["--output", str(tmp_path / "ev2")]) == 0
    assert "cached results" in capsys.readouterr().err
    m2 = json.loads((tmp_path / "ev2" / "report.json").read_text())["baseline"]["engines"]["hf"]["tasks"]["mine"]
    assert m2["metric"] == "acc_norm" and m2["acc_norm"] == m["tasks"]["mine"]["acc_norm"]
    md2 = (tmp_path / "ev2" / "report.md").read_text()
    assert "| mine acc_norm |" in md2 and f"| {m2['acc_norm']:.3f} ± {m2['acc_norm_stderr']:.3f} |" in md2
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(spec))  # and back: the cache kept no headline
    assert main(args + ["--output", str(tmp_path / "ev3")]) == 0
    assert "metric" not in json.loads((tmp_path / "ev3" / "report.json").read_text())["baseline"]["engines"]["hf"][
        "tasks"]["mine"]
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({**spec, "metric": "exact_match"}))
    assert main(args) == 2
    assert "metric: 'exact_match' is not measured for a multiple_choice task; choose acc or acc_norm" in \
        capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "kind": "essay"}))
    assert main(["eval", str(tiny_model), "--engine", "hf", "--task-file", str(bad)]) == 2
    assert f"{bad}: kind: Input should be 'multiple_choice' or 'generate'" in capsys.readouterr().err


def test_recipe_tasks_field_and_speed_fields_validate(tiny_model, text_file):
    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["tasks"] = [{"name": "piqa", "limit": 5}, {"name": "piqa"}]
    with pytest.raises(UserError, match="task names must be unique; repeated: piqa"):
        parse_recipe(r)
    r["eval"]["tasks"] = [{"name": "piqa", "limit": 0}]
    with pytest.raises(UserError, match=r"eval.tasks\[0\].limit: Input should be greater than 0"):
        parse_recipe(r)
    r["eval"]["tasks"] = []
    r["eval"]["speed"]["batch_size"] = 4
    with pytest.raises(UserError, match="eval.speed.batch_size: unknown field; allowed: num_prompts"):
        parse_recipe(r)
