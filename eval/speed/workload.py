"""Offline speed of an engine on a workload: throughput, latency distributions, their spread.

Protocol (both engines): `num_prompts` prompts of `input_len` random token ids (speed does
not depend on content at fixed lengths; fresh ones every run, so a prefix cache never
serves one run's prefill to another), each generating exactly `output_len` tokens greedily
(EOS ignored), with at most `concurrency` requests in flight (default: all). Output tokens
are timestamped when the engine hands them back. vLLM streams new tokens step by step
(`RequestOutputKind.DELTA`, what a streaming client sees) for a sample of at most 64
requests per run, evenly spread over the workload, and returns the others whole (the
offline default), because streaming every request of a large workload costs throughput
(1,024 requests on an H200: 19 % fewer tokens/s); the HF engine runs static batches of
`concurrency` requests and stamps each step for all. Per streamed request: TTFT = first
token - submission, TPOT = (last - first token) / (output_len - 1), ITL = the gaps between
consecutive tokens; per request: E2E = last token - submission.
The workload runs `warmup` times untimed, then `repeats` times timed. A second, batch-1
profile runs `batch1_requests` requests one at a time (same warm-up and repeats).

Reported: per-repeat throughput (output tok/s, total tok/s = (input + output) / duration,
requests/s) as median with min..max over repeats, and latency distributions (mean, p50,
p90, p99) pooled over the timed requests (ITL over every gap).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm


@dataclass
class RequestTiming:
    """One request: when it was handed to the engine, when each output token came back
    (streamed requests only) and when its last token came back (time.perf_counter seconds)."""

    submitted: float
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None

    @property
    def end(self) -> float:
        return self.finished if self.finished is not None else self.token_times[-1]


LATENCY_SAMPLE = 64  # requests streamed token by token per run (evenly spread); the rest report only their end


def random_prompts(n: int, input_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab_size, (n, input_len), generator=g).tolist()


def spread(values: list[float]) -> dict:
    """Median and min..max of per-repeat figures (the runs kept for comparisons)."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def distribution(values_s: list[float]) -> dict:
    """mean / p50 / p90 / p99 in milliseconds of values given in seconds."""
    if not values_s:
        return {"mean": None, "p50": None, "p90": None, "p99": None, "n": 0}
    a = np.asarray(values_s) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99), "n": int(a.size)}


def duration(reqs: list[RequestTiming]) -> float:
    """One run's wall time: first submission to last token, in seconds."""
    return max(r.end for r in reqs) - min(r.submitted for r in reqs)


def noise_verdict(lo: float, hi: float, n: int, noise_floor: float = 0.0, ratio: float | None = None) -> str:
    """The verdict on a speedup range (> 1: faster) drawn from n measurements per side (or n
    paired rounds): under 2 the spread is unknown; a range holding 1.0 is inside the noise, and
    so is a `ratio` within `noise_floor` of 1.0 (a difference too small to claim)."""
    if n < 2:
        return "spread unknown"
    if lo <= 1.0 <= hi or (ratio is not None and abs(ratio - 1.0) < noise_floor):
        return "no measurable change"
    return "faster" if lo > 1.0 else "slower"


def per_request(reqs: list[RequestTiming]) -> dict[str, list[float]]:
    """E2E per request; TTFT, TPOT and every ITL gap of the streamed requests; in seconds."""
    out = {"ttft": [], "tpot": [], "itl": [], "e2e": []}
    for r in reqs:
        out["e2e"].append(r.end - r.submitted)
        t = r.token_times
        if not t:
            continue
        out["ttft"].append(t[0] - r.submitted)
        if len(t) > 1:
            out["tpot"].append((t[-1] - t[0]) / (len(t) - 1))
            out["itl"] += [b - a for a, b in zip(t, t[1:])]
    return out


def _profile(engine, n, input_len, output_len, concurrency, warmup, repeats, seed, desc, progress) -> dict:
    runs = []
    n_out, n_in = n * output_len, n * input_len
    for i in tqdm(range(warmup + repeats), desc=desc, unit="run", disable=not progress, leave=False):
        # fresh prompts every run: no run reuses another's prefill from a prefix cache
        prompts = random_prompts(n, input_len, engine.vocab_size, seed * 1000 + i)
        reqs = engine.stream(prompts, output_len, concurrency, stream_every=max(1, -(-n // LATENCY_SAMPLE)))
        if i >= warmup:
            runs.append(reqs)
    durations, tpot_runs, lat = [], [], {"ttft": [], "tpot": [], "itl": [], "e2e": []}
    for reqs in runs:
        durations.append(duration(reqs))
        one = per_request(reqs)
        tpot_runs.append(statistics.mean(one["tpot"]) * 1e3)
        for k, v in one.items():
            lat[k] += v
    return {
        "output_tok_s": spread([n_out / d for d in durations]),
        "total_tok_s": spread([(n_in + n_out) / d for d in durations]),
        "requests_s": spread([n / d for d in durations]),
        "duration_s": spread(durations),
        "tpot_mean_ms": spread(tpot_runs),
        **{f"{k}_ms": distribution(v) for k, v in lat.items()},
    }


def workload_speed(engine, num_prompts: int = 8, input_len: int = 128, output_len: int = 32,
                   concurrency: int | None = None, batch1_requests: int = 2, warmup: int = 1, repeats: int = 3,
                   seed: int = 0, progress: bool = True) -> dict:
    """Measure `engine` (an object with `.stream(prompts, output_len, concurrency)` and
    `.vocab_size`) under the protocol in the module docstring."""
    conc = min(concurrency or num_prompts, num_prompts)
    out = {"concurrent": _profile(engine, num_prompts, input_len, output_len, conc, warmup, repeats, 2 * seed,
                                  "speed", progress)}
    if batch1_requests:
        out["batch1"] = _profile(engine, batch1_requests, input_len, output_len, 1, warmup, repeats, 2 * seed + 1,
                                 "speed batch 1", progress)
    out["protocol"] = {"engine": engine.name, "num_prompts": num_prompts, "input_len": input_len,
                       "output_len": output_len, "concurrency": conc, "batch1_requests": batch1_requests,
                       "warmup": warmup, "repeats": repeats, "ignore_eos": True, "prompts": "random token ids",
                       "prompts_per_run": "fresh", "statistic": "median over repeats (min..max); latency percentiles over all timed requests"}
    return out


def compare(base: dict, art: dict, higher_is_better: bool = True) -> dict:
    """Artifact vs baseline for one per-repeat figure ({runs: [...]}, as `spread` writes it).

    ratio = median(art) / median(base), oriented so that > 1 is better (a speedup); the
    interval is the widest ratio the repeats allow (worst of one against best of the other).
    Where it contains 1.0 the difference is inside the noise: verdict "no measurable change".
    With fewer than 2 runs on a side the spread is unknown and so is the verdict."""
    a, b = art["runs"], base["runs"]
    if higher_is_better:
        ratio, lo, hi = art["median"] / base["median"], min(a) / max(b), max(a) / min(b)
    else:
        ratio, lo, hi = base["median"] / art["median"], min(b) / max(a), max(b) / min(a)
    return {"ratio": ratio, "lo": lo, "hi": hi, "verdict": noise_verdict(lo, hi, min(len(a), len(b)))}


def speedups(base: dict, art: dict) -> dict:
    """Throughput (concurrent output tok/s) and batch-1 TPOT of two separate measurements:
    the ratio of their medians, without a range and without a verdict of change ("not
    paired"): measured minutes apart, a drift of the machine between them cannot be told from
    an effect. Speedups with a range come from paired rounds (eval.speed.paired)."""
    def unpaired(b: dict, a: dict, higher_is_better: bool) -> dict:
        ratio = a["median"] / b["median"] if higher_is_better else b["median"] / a["median"]
        return {"ratio": ratio, "lo": None, "hi": None, "verdict": "not paired", "method": "unpaired"}

    out = {}
    if "concurrent" in base and "concurrent" in art:
        out["throughput"] = unpaired(base["concurrent"]["output_tok_s"], art["concurrent"]["output_tok_s"], True)
    if "batch1" in base and "batch1" in art:
        out["batch1_tpot"] = unpaired(base["batch1"]["tpot_mean_ms"], art["batch1"]["tpot_mean_ms"], False)
    return out


def judged_range(c: dict) -> tuple[float, float]:
    """A paired speedup's range as the gate and the Pareto front judge it: a range beside 1.0
    whose median the noise floor called noise ("no measurable change") is stretched to 1.0, so
    it claims no difference from the baseline, as its verdict says."""
    if c.get("verdict") == "no measurable change":
        return min(c["lo"], 1.0), max(c["hi"], 1.0)
    return c["lo"], c["hi"]


def fmt_speedup(c: dict | None) -> str:
    """'1.32x (1.28-1.36)', 'no measurable change (0.97-1.05)', '1.04x (not paired)', or '–'."""
    if not c:
        return "–"
    rng = f"{c['lo']:.2f}-{c['hi']:.2f}" if c.get("lo") is not None else ""
    if c["verdict"] == "no measurable change":
        return f"no measurable change ({rng})"
    if c["verdict"] == "spread unknown":
        return f"{c['ratio']:.2f}x (1 {'round' if c.get('method') == 'paired' else 'run'})"
    if c["verdict"] == "not paired":
        return f"{c['ratio']:.2f}x (not paired)"
    return f"{c['ratio']:.2f}x ({rng})"
