"""`squeeze run --cluster`: a recipe fanned out over a local Ray instance (2 CPUs, shared by the
module) ends with the sequential run's report and bit-identical artifacts; a worker that dies is
retried and a task's own error is not; a driver SIGKILLed mid-run resumes with nothing done
twice (counted in events.jsonl); bad input is one line each."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from compress.errors import UserError
from squeeze.cli.main import main
from tests.conftest import sigkill_at_marker, tiny_recipe

ray = pytest.importorskip("ray")

AXES = {"prune": {"none": [], "m30": [{"type": "magnitude_prune", "sparsity": 0.3}]},
        "quant": {"none": [], "rtn8": [{"type": "rtn", "bits": 8, "group_size": -1}]}}


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def matrix_recipe(model: Path, text: Path, name: str = "mx") -> dict:
    r = tiny_recipe(model, text, stages=[], name=name)
    r["matrix"] = {"axes": AXES}  # 3 variants: rtn8, m30, m30+rtn8 (m30 shared)
    return r


def write(r: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def events(run_dir: Path) -> Counter:
    lines = [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]
    return Counter((e["event"], e.get("stage") or e.get("model"), e.get("engine")) for e in lines)


VOLATILE = {"hardware", "seconds", "speed", "paired_speed", "memory", "created", "model_dir", "cached", "seconds_per_round",
            "rounds", "speedups", "timings", "load_seconds", "provenance", "host"}


def stable(x):
    """The report without timings, paths, when it ran and the torch threads it ran with (a task
    takes its own CPUs' worth: `hardware` on the CPU names them)."""
    if isinstance(x, dict):
        return {k: stable(v) for k, v in x.items() if k not in VOLATILE and not k.startswith("seconds")}
    if isinstance(x, list):
        return [stable(v) for v in x]
    return x


def weights(run_dir: Path) -> dict:
    variants = json.loads((run_dir / "variants.json").read_text())
    return {name: {f.name: f.read_bytes() for f in sorted(Path(dirs[-1]).glob("*.safetensors"))}
            for name, dirs in variants.items()}


def test_local_cluster_matches_the_sequential_run(tiny_model, text_file, tmp_path, monkeypatch, capsys):
    """3 variants (one stage shared): the same report apart from timings, bit-identical artifacts,
    every task in tasks.json done, the shared stage computed once; a rerun computes nothing."""
    r = write(matrix_recipe(tiny_model, text_file), tmp_path / "mx.yaml")
    monkeypatch.setenv("SQUEEZE_HOME", str(tmp_path / "seq-home"))
    t0 = time.perf_counter()
    assert main(["run", str(r), "--output", str(tmp_path / "seq")]) == 0
    t_seq = time.perf_counter() - t0
    monkeypatch.setenv("SQUEEZE_HOME", str(tmp_path / "ray-home"))  # its own evaluation cache: measured anew
    t0 = time.perf_counter()
    store = tmp_path / "store"
    assert main(["run", str(r), "--output", str(tmp_path / "ray"), "--cluster", "local", "--store", str(store)]) == 0
    t_ray = time.perf_counter() - t0
    err = capsys.readouterr().err
    print(f"3-variant matrix on 2 CPUs: sequential {t_seq:.1f} s, --cluster local {t_ray:.1f} s", file=sys.stderr)
    seq, rep = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("seq", "ray"))
    assert stable(rep) == stable(seq)
    assert rep["artifacts"][0]["engines"]["hf"]["hardware"].endswith("cpu x1 threads")  # the task's one CPU
    assert [a["engines"]["hf"]["paired_speed"]["protocol"]["rounds"] for a in rep["artifacts"]] == [3, 3, 3]
    assert weights(tmp_path / "ray") == weights(tmp_path / "seq")
    tasks = json.loads((tmp_path / "ray" / "tasks.json").read_text())["tasks"]
    assert {t["id"]: t["state"] for t in tasks} == {
        "stages rtn8": "done", "stages m30": "done", "stages m30+rtn8": "done",
        **{f"eval {m} (hf)": "done" for m in ("baseline", "rtn8", "m30", "m30+rtn8")},
        **{f"paired {m} (hf)": "done" for m in ("rtn8", "m30", "m30+rtn8")}}
    assert next(t for t in tasks if t["id"] == "stages m30+rtn8")["deps"] == ["stages m30"]
    assert all(t["node"] and t["attempts"] == 1 for t in tasks)
    assert "[cluster] task stages m30: running on " in err and "[cluster] task eval m30 (hf): done in " in err
    ev = events(tmp_path / "ray")
    assert sorted(k[0] for k in ev) == ["evaluation measured"] * 4 + ["paired speed measured"] * 3 + [
        "stage computed"] * 3 and set(ev.values()) == {1}
    assert all((tmp_path / "ray" / "stages" / d).is_symlink() for d in json.loads(
        (tmp_path / "ray" / "variants.json").read_text())["m30+rtn8"])  # the outputs live in the store
    # another run directory on the same store: no stage task at all, every measurement from its cache
    assert main(["run", str(r), "--output", str(tmp_path / "again"), "--cluster", "local", "--store", str(store)]) == 0
    assert not (tmp_path / "again" / "events.jsonl").exists()
    ids = [t["id"] for t in json.loads((tmp_path / "again" / "tasks.json").read_text())["tasks"]]
    assert ids and not any(i.startswith("stages ") for i in ids)
    assert stable(json.loads((tmp_path / "again" / "report.json").read_text())) == stable(rep)


def test_a_dead_worker_is_retried_and_a_failing_task_is_not(tmp_path):
    from squeeze.pipeline.scheduler import Task, run_tasks

    marker = tmp_path / "crashed-once"

    def crash_once(path):
        import os
        import time
        from pathlib import Path

        if not Path(path).exists():
            Path(path).write_text("x")
            time.sleep(0.5)  # a while into the task
            os._exit(1)  # the worker dies mid-task
        return "survived"

    def bad_input():
        raise UserError("stages[0].sparsity: 2 is not below 1")

    def fine(x):
        return x * 2

    log = []
    ran = run_tasks([Task("crash", crash_once, (str(marker),)), Task("bad", bad_input),
                     Task("after-bad", fine, (1,), deps=("bad",)), Task("fine", fine, (21,), deps=("crash",))],
                    max_retries=2, tasks_json=tmp_path / "tasks.json", log=log.append)
    assert (ran["crash"].state, ran["crash"].attempts, ran["crash"].result) == ("done", 2, "survived")
    assert (ran["bad"].state, ran["bad"].attempts) == ("failed", 1)
    assert ran["bad"].error == "stages[0].sparsity: 2 is not below 1"
    assert ran["after-bad"].state == "skipped" and ran["fine"].result == 42
    assert "task crash: running on " in "\n".join(log) and any(x.endswith("(attempt 2)") for x in log)
    states = {t["id"]: (t["state"], t["attempts"]) for t in json.loads((tmp_path / "tasks.json").read_text())["tasks"]}
    assert states == {"crash": ("done", 2), "bad": ("failed", 1), "after-bad": ("skipped", 0), "fine": ("done", 1)}
    marker.unlink()  # with no retries left, the dead worker is the task's failure
    ran = run_tasks([Task("crash", crash_once, (str(marker),))], max_retries=0, log=log.append)
    assert ran["crash"].state == "failed" and "worker died" in ran["crash"].error


KILLED_DRIVER = """
import json, sys
from pathlib import Path
from squeeze import pipeline
from squeeze.recipe import parse_recipe

pipeline.run(parse_recipe(json.loads(Path(sys.argv[1]).read_text())), cluster="auto")
"""


def test_a_killed_driver_resumes_with_nothing_done_twice(tiny_model, text_file, home, tmp_path, monkeypatch):
    """A driver joined to a running cluster (`auto`: this module's Ray) is SIGKILLed once the
    first stage is written (Ray ends its tasks with it); the same run again finishes, and no
    stage or evaluation is done twice."""
    from squeeze import pipeline
    from squeeze.recipe import parse_recipe

    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # what `auto` joins
    r = matrix_recipe(tiny_model, text_file, name="killed")
    r["eval"]["speed"] = None  # stages and evaluations (paired speed: the rerun in the test above)
    run_dir = home / "killed"
    sigkill_at_marker(KILLED_DRIVER, r, tmp_path, timeout_s=180, marker=run_dir / "events.jsonl")
    before = events(run_dir)
    assert before and sum(before.values()) < 7  # killed mid-run: 3 stages and 4 evaluations in all
    rep = pipeline.run(parse_recipe(r), cluster="local")
    ev = events(run_dir)
    assert set(ev.values()) == {1}, f"done twice: {[k for k, n in ev.items() if n > 1]}"
    assert sum(1 for k in ev if k[0] == "stage computed") <= 3 and len(rep["artifacts"]) == 3
    assert all(a["engines"]["hf"].get("perplexity") for a in rep["artifacts"])


def test_a_store_shares_stages_and_measurements_without_a_cluster(tiny_model, text_file, tmp_path, monkeypatch):
    """--store alone: a second run directory (another SQUEEZE_HOME) computes and measures nothing."""
    r = tiny_recipe(tiny_model, text_file)
    r["eval"]["speed"] = None
    path, store = write(r, tmp_path / "r.yaml"), tmp_path / "store"
    for i in (1, 2):
        monkeypatch.setenv("SQUEEZE_HOME", str(tmp_path / f"home{i}"))
        assert main(["run", str(path), "--output", str(tmp_path / f"run{i}"), "--store", str(store)]) == 0
    assert sum(events(tmp_path / "run1").values()) == 3 and not (tmp_path / "run2" / "events.jsonl").exists()
    assert (tmp_path / "run2" / "stages" / "01-magnitude_prune").is_symlink() and list(store.glob("_eval_cache/*.json"))


# ---- bad input: one line each --------------------------------------------------------------------

def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_without_ray_cluster_says_how_to_install(tiny_model, text_file, home, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    r = write(tiny_recipe(tiny_model, text_file), tmp_path / "r.yaml")
    line = one_line_error(capsys, ["run", str(r), "--cluster", "local"])
    assert "Ray is not installed" in line and "pip install -e '.[cluster]'" in line
    assert not (home / "tiny").exists()  # refused before any work


def test_an_address_with_no_cluster_is_one_line_within_seconds(tiny_model, text_file, home, tmp_path, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = write(tiny_recipe(tiny_model, text_file), tmp_path / "r.yaml")
    t0 = time.perf_counter()
    line = one_line_error(capsys, ["run", str(r), "--cluster", f"ray://127.0.0.1:{port}"])
    assert time.perf_counter() - t0 < 30
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in line
    assert "expected local, auto or ray://" in one_line_error(capsys, ["run", str(r), "--cluster", "nowhere"])


def test_resources_no_node_has_name_the_task_and_the_offer(tiny_model, text_file, home, tmp_path, capsys):
    r = tiny_recipe(tiny_model, text_file)
    r["execution"] = {"eval_cpus": 4}
    line = one_line_error(capsys, ["run", str(write(r, tmp_path / "r.yaml")), "--cluster", "local"])
    assert "task 'eval baseline (hf)' needs 4 CPU and no node has that (the cluster offers node " in line
    assert ": 2 CPU)" in line
    assert not list((home / "tiny" / "stages").glob("*/manifest.json"))


def test_a_store_some_node_cannot_see_is_refused_before_work(tiny_model, text_file, home, tmp_path, capsys,
                                                            monkeypatch):
    from squeeze.pipeline import cluster

    real = cluster.write_probe
    monkeypatch.setattr(cluster, "write_probe", lambda d, token: real(d, "another host's view"))
    store = tmp_path / "store"
    r = write(tiny_recipe(tiny_model, text_file), tmp_path / "r.yaml")
    assert main(["run", str(r), "--cluster", "local", "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"error: store {home.resolve() / 'tiny'}: not visible from node ")
    assert any(f"store {store.resolve()}: not visible" in x for x in err) and "--store" in err[0]
    assert not list(store.glob("stages/*/manifest.json"))


def test_a_gpu_share_that_vllm_would_overflow_is_refused():
    from squeeze.pipeline.fanout import check
    from squeeze.recipe import Execution, parse_recipe

    r = parse_recipe({"name": "v", "eval": {"engines": ["vllm"]}})
    with pytest.raises(UserError, match=r"execution.eval_gpus: 0.25 of a GPU per evaluation, but "
                                        r"eval.vllm.gpu_memory_utilization is 0.9; set it at most 0.2 "):
        check(r, Execution(cluster="local", eval_gpus=0.25))
    # 0.225 at a quarter each filled an H100 and the fourth engine ran out of memory: refused too
    tight = parse_recipe({"name": "v", "eval": {"engines": ["vllm"], "vllm": {"gpu_memory_utilization": 0.225}}})
    with pytest.raises(UserError, match=r"is 0.225; set it at most 0.2 "):
        check(tight, Execution(cluster="local", eval_gpus=0.25))
    fits = parse_recipe({"name": "v", "eval": {"engines": ["vllm"], "vllm": {"gpu_memory_utilization": 0.2}}})
    check(fits, Execution(cluster="local", eval_gpus=0.25))
    check(r, Execution(cluster="local", eval_gpus=1.0))  # a whole GPU each: vLLM's own setting as it is
    with pytest.raises(UserError, match=r"eval_gpus: 0.05 of a GPU per evaluation leaves vLLM no memory"):
        check(fits, Execution(cluster="local", eval_gpus=0.05))


def test_tune_runs_trials_at_once_in_a_shared_journal(tiny_model, home, tmp_path, capsys):
    """`squeeze tune --cluster`: 4 HF trials, 2 at a time on the 2 CPUs, the study in optuna's
    journal file; run again, it resumes from the journal and measures nothing."""
    out = tmp_path / "study"
    argv = ["tune", str(tiny_model), "--engine", "hf", "--strategy", "grid", "--budget", "4", "--repeats", "1",
            "--set", "batch_size=1,4", "--set", "attn_implementation=eager,sdpa", "--num-prompts", "4",
            "--input-len", "8", "--output-len", "4", "--cluster", "local", "--output", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "2 trials at once on the cluster (local)" in err and len(re.findall(r"trial \d: ", err)) == 4
    assert (out / "study.journal").is_file() and not (out / "study.db").exists()
    land = json.loads(next(out.glob("*/landscape.json")).read_text())
    assert land["measured"] == 4 and land["failed"] == 0 and land["defaults"]["value"] > 0
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "4 of 4 trials measured" in err and not re.findall(r"trial \d: ", err)


def test_vllm_across_nodes_passes_ray_and_pipeline_parallel_through():
    """eval.vllm.engine_args reach vLLM's LLM(...) and its server as they are: the Ray executor and
    pipeline parallelism that put one model on several nodes (docs/clusters.md)."""
    from eval.config import EvalConfig
    from eval.engines.server import serve_command
    from eval.engines.vllm import VLLMEngine
    from eval.tune.trials import vllm_base
    from squeeze.recipe import ModelSpec

    cfg = EvalConfig.model_validate({"engines": ["vllm"], "vllm": {"tensor_parallel_size": 8, "engine_args": {
        "distributed_executor_backend": "ray", "pipeline_parallel_size": 2}}})
    opts = VLLMEngine.options(cfg, ModelSpec())
    assert (opts["tensor_parallel_size"], opts["pipeline_parallel_size"], opts["distributed_executor_backend"]) == (
        8, 2, "ray")
    line = serve_command("m", vllm_base(cfg.vllm, ModelSpec(), "cuda"))
    assert "--tensor-parallel-size 8" in line and "--pipeline-parallel-size 2" in line
    assert "--distributed-executor-backend ray" in line


def test_the_gpu_benchmark_recipes_validate(tmp_path):
    """benchmarks/cluster_gpu.py's recipes (run on a GPU host only) parse, and their GPU shares
    fit vLLM's memory setting: a typo fails here, not on the GPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        import cluster_gpu
    finally:
        sys.path.pop(0)
    from squeeze.pipeline.fanout import check
    from squeeze.recipe import parse_recipe

    for variants, share in ((cluster_gpu.VARIANTS, 0.25), ({"int8-dyn": cluster_gpu.VARIANTS["int8-dyn"]}, 1.0)):
        r = parse_recipe(cluster_gpu.recipe("b", tmp_path, variants, share, False, None))
        assert [v.name for v in r.variants] == list(variants) and r.eval.engine_list() == ["vllm"]
        check(r, r.execution.model_copy(update={"cluster": "local"}))
        assert r.eval.vllm.gpu_memory_utilization <= share - (0.05 if share < 1 else 0)
