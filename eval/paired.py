"""Paired speed measurements: each artifact against its baseline, both open at once, cached.

`paired_speeds(base_dir, art_dirs, cfg, model, engine, device, seed)` opens the baseline on
`engine` once (in a fresh process where the engine class sets `fresh_process_pairs`, as vLLM
does: eval.isolated says why), then each artifact beside it in turn, and runs
eval.speed.paired's rounds (its docstring holds the protocol and its cost); one result per artifact, which
eval.speed.paired.speedups turns into the report's speedups. A matrix pairs every variant with
the one baseline engine, opened once.

Both open: transformers holds both models in memory; vLLM runs two engines, on a GPU each with
half of eval.vllm.gpu_memory_utilization (vLLM's limit is per engine). Before the second is
opened, the memory the first took (host memory on the CPU, device memory for transformers on
a GPU) is compared with what is left: where a second copy would not fit with 20 % to spare,
or where opening it fails for memory, one engine is open at a time and reopened whenever the
side changes (`mode` in the result; `loads`: the engines opened for the pair, i.e. the
artifact's and the baseline's second instance, or one per switch). vLLM on a GPU: where the
baseline's KV cache at half the share holds fewer tokens than the speed workload keeps in
flight (`kv_short`), both open would measure smaller batches than one engine alone runs (an
FP8 artifact of the Llama-3.1-8B shape read 1.30 x bf16's throughput both open at 0.45 each,
1.42 x alone), so each gets the whole share (`settings` in the result) and both are opened with
vLLM's sleep mode: the side not measured sleeps (weights in host memory, KV cache freed) and a
switch costs a wake-up and a warm-up (`wakes`) instead of an engine start.

Cache: ``<eval cache>/paired-<key>.json`` (eval.evaluate.cache_dir), keyed by both models'
content hashes, the engine and its settings as opened here, the speed workload with its
warm-up and rounds, the protocol's version, the device, hardware, software stack
(eval.evaluate.stack_versions) and seed. A failed measurement is recorded as `error` and not
cached.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from pathlib import Path

from compress.errors import UserError
from compress.fsutil import atomic_write_text
from compress.models import model_hash
from compress.spec import ModelSpec
from eval.config import EvalConfig
from eval.engine_pair import EnginePair
from eval.engines import engine_class, open_engine
from eval.evaluate import cache_dir, engine_settings, hardware, one_line, stack_versions
from eval.speed.paired import PROTOCOL_VERSION, default_noise_floor, run_rounds, summarize

SPARE = 1.2  # a second model must fit in what the first left free, with this factor to spare


def free_memory(engine: str, device: str) -> int | None:
    """Bytes the next model could use: device memory for transformers on a GPU, else host memory
    (None for vLLM on a GPU, whose share is set by gpu_memory_utilization)."""
    return engine_class(engine).free_memory(device)


def paired_settings(engine: str, settings: dict, device: str) -> dict:
    """The engine settings for two engines at once: vLLM on a GPU gets half its memory share each."""
    return engine_class(engine).paired_options(settings, device)


def alternate_settings(engine: str, settings: dict, device: str) -> dict:
    """The settings for one engine at a time with the whole share: vLLM on a GPU opens each with
    its sleep mode, so the side not measured sleeps instead of closing."""
    return engine_class(engine).alternate_options(settings, device)


def paired_key(base_hash: str, art_hash: str, cfg: EvalConfig, engine: str, settings: dict, device: str,
               seed: int) -> str:
    src = {"base": base_hash, "art": art_hash, "speed": cfg.speed.model_dump(), "engine": engine,
           "settings": settings, "device": device, "hardware": hardware(), "stack": stack_versions(device),
           "seed": seed, "protocol": PROTOCOL_VERSION}
    return hashlib.sha256(json.dumps(src, sort_keys=True, default=str).encode()).hexdigest()[:24]


def paired_speeds(base_dir: Path, art_dirs: list[Path], cfg: EvalConfig, model: ModelSpec, engine: str = "hf",
                  device: str = "cpu", seed: int = 0, use_cache: bool = True, log=None) -> list[dict]:
    """One paired measurement per artifact in `art_dirs` against `base_dir` (module docstring)."""
    lone = engine_settings(engine, cfg, model)
    settings = paired_settings(engine, lone, device)
    base_hash = model_hash(base_dir)
    head = {"base_hash": base_hash, "engine": engine, "settings": settings, "device": device,
            "hardware": hardware(), "seed": seed}
    results, todo = [], []
    for i, d in enumerate(art_dirs):
        art_hash = model_hash(d)
        cache = cache_dir() / f"paired-{paired_key(base_hash, art_hash, cfg, engine, settings, device, seed)}.json"
        if use_cache and cache.is_file():
            results.append({**json.loads(cache.read_text()), "cached": True})
            continue
        results.append({**head, "art_hash": art_hash, "art_dir": str(d), "_cache": cache})
        todo.append(i)
    if todo:  # in a fresh process where the engine asks for one (eval.isolated says why)
        fresh = getattr(engine_class(engine), "fresh_process_pairs", False)
        if fresh:
            from eval.isolated import run_fresh, stderr_log

            log = stderr_log if log is not None else None  # the caller's may not cross processes
        args = (base_dir, [results[i] for i in todo], cfg, model, engine, device, seed, settings, log,
                lone if lone != settings else None)
        measured = run_fresh(_measured, *args) if fresh else _measured(*args)
        for i, r in zip(todo, measured):
            results[i] = {**r, "mode": f"{r['mode']}, in a fresh process"} if fresh and "mode" in r else r
    for r in results:
        cache = r.pop("_cache", None)
        if cache is not None and "error" not in r:
            atomic_write_text(cache, json.dumps(r, indent=1))
            r["cached"] = False
    return results


def kv_short(eng, speed) -> str | None:
    """Why two engines open at once would not measure what one alone does: the engine's KV cache
    (at its half share) holds fewer tokens than the workload keeps in flight, so both would run
    smaller batches than a lone engine, and a format that gains with the batch (FP8, int8) would
    read less than its gain. None where it holds them (or the engine does not say)."""
    kv = ((getattr(eng, "stats", None) or {}).get("memory") or {}).get("kv_cache_tokens")
    if not kv or speed is None:
        return None
    in_flight = min(speed.concurrency or speed.num_prompts, speed.num_prompts,
                    getattr(eng, "max_num_seqs", None) or speed.num_prompts)
    need = in_flight * (speed.input_len + speed.output_len)
    return None if kv >= need else (f"with both open the baseline's KV cache holds {kv:,} tokens and the workload "
                                    f"keeps {need:,} in flight; each opened alone with the whole share")


def _measured(*args) -> list[dict]:
    """_measure_all's results (returned, for a fresh process to hand back)."""
    _measure_all(*args)
    return args[1]


def _measure_all(base_dir, results, cfg, model, engine, device, seed, settings, log, lone=None) -> None:
    """Fill each result in place: the baseline opened once, each artifact beside it in turn.
    `lone`: the settings for one engine at a time where they differ from the paired `settings`
    (vLLM on a GPU: the whole memory share), used where the halves would not hold the workload."""
    opts = dict(settings)

    def opener(d):
        return open_engine(engine, d, device=device, trust_remote_code=model.trust_remote_code,
                           allow_pickle=model.allow_pickle, **opts)

    before = free_memory(engine, device)
    base, pair, coexist, why, vocab = None, None, True, "", None
    try:
        try:
            base = opener(base_dir)
            short = kv_short(base, cfg.speed) if lone is not None else None
            if short:  # one at a time, each with the lone engine's share, opened when its side is measured
                vocab = base.vocab_size  # known: the pair need not open the baseline to learn it
                base.close()
                base, coexist, why = None, False, short
                opts = alternate_settings(engine, lone, device)
        except (UserError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - reported with each result, like evaluate()'s
            for r in results:
                r["error"] = f"{engine} failed to start on {base_dir}: {one_line(e)}"
            return
        after = free_memory(engine, device)
        if coexist and before is not None and after is not None and after < SPARE * max(before - after, 0):
            coexist, why = False, (f"a second model needs about {(before - after) / 2**30:.1f} GiB and "
                                   f"{after / 2**30:.1f} GiB are free")
        for r in results:
            r["settings"] = dict(opts)
            pair = EnginePair(opener, {"base": base_dir, "art": Path(r["art_dir"])}, coexist, {"base": base},
                              sleeps=bool(opts.get("enable_sleep_mode")))
            pair.why = why
            if vocab is not None:
                pair.vocab.setdefault("base", vocab)
            _measure_one(pair, cfg, seed, r, device)
            pair.close("art")
            if "base" in pair.asleep:  # awake for the next artifact's pair
                pair.get("base")
            base, coexist, why = pair.eng["base"], pair.coexist, pair.why  # the baseline stays open for the next
            if log:
                log(f"paired speed {Path(r['art_dir']).name} ({engine}): " + (r.get("error") or (
                    f"{len(r['rounds'])} rounds in {r['seconds']:.0f} s ({r['mode']})")))
    finally:  # closing twice is harmless: every engine open here is closed on every path
        for eng in [base, *(pair.eng.values() if pair else [])]:
            if eng is not None:
                eng.close()


def _measure_one(pair: EnginePair, cfg: EvalConfig, seed: int, r: dict, device: str) -> None:
    t0 = time.perf_counter()
    try:
        rounds = run_rounds(pair, cfg.speed, seed)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - an engine that fails is a result to report
        r["error"] = f"paired speed: {one_line(e)}"
        return
    s = cfg.speed
    floor = default_noise_floor(device) if s.noise_floor is None else s.noise_floor
    r.update(protocol={"method": "paired", "version": PROTOCOL_VERSION, "rounds": s.rounds, "warmup": s.warmup,
                       "noise_floor": floor,
                       "num_prompts": s.num_prompts, "input_len": s.input_len, "output_len": s.output_len,
                       "concurrency": min(s.concurrency or s.num_prompts, s.num_prompts),
                       "batch1_requests": s.batch1_requests,
                       "order": "baseline first in even rounds, artifact first in odd ones"},
             mode="both open" if pair.coexist else
             f"one {'awake at a time, the other asleep' if pair.sleeps else 'at a time'} ({pair.why})",
             loads=pair.loads, wakes=sum(pair.wakes.values()), rounds=rounds,
             speedups=summarize(rounds, floor) if rounds else {}, seconds=time.perf_counter() - t0,
             seconds_per_round=statistics.median(x["seconds"] for x in rounds) if rounds else None)


def pair_entries(base: dict, entries: list[dict], cfg: EvalConfig, model: ModelSpec, device: str,
                 seed: int = 0, log=None, use_cache: bool = True) -> None:
    """Pair every entry ({model_dir, engines: {engine: evaluation result}}) with the baseline
    (the same shape) on each engine both were evaluated on without error; the result goes to the
    entry's evaluation as `paired_speed` (where eval.speed.paired.speedups finds it); an entry
    that has one already is left as it is. Nothing when eval.speed is null or its rounds 0."""
    if cfg.speed is None or not cfg.speed.rounds:
        return
    base_dir = Path(base["model_dir"])
    for engine in cfg.engine_list():
        if base["engines"].get(engine, {"error": "not evaluated"}).get("error"):
            continue
        todo = [e for e in entries if engine in e["engines"] and not e["engines"][engine].get("error")
                and "paired_speed" not in e["engines"][engine]]  # paired elsewhere already (a cluster's task)
        if not todo:
            continue
        for e, res in zip(todo, paired_speeds(base_dir, [Path(e["model_dir"]) for e in todo], cfg, model, engine,
                                              device, seed, use_cache, log)):
            e["engines"][engine]["paired_speed"] = res
