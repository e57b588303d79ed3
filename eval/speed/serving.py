"""Serving under load: a small async client for any OpenAI-compatible server.

Who measures what (eval.speed.serving_report.clients_for): the vLLM servers Squeeze starts
are measured by vLLM's own client, `vllm bench serve` (eval.speed.vllm_bench), by default:
on a GPU at saturation this Python client read 22.6 % more throughput than vLLM's on the
same server (benchmarks/BENCHMARKS.md), and a gate should rest on the reference client. This one measures
what vLLM's cannot drive: running servers given by URL, `transformers serve` (text only, no
ignore_eos), data-set prompts and burst arrivals, and the tuning trials, which run
in-process; `client: both` runs the two side by side.

Protocol. `num_prompts` requests per load point, each asking for exactly `output_len`
tokens (greedy; `ignore_eos` and `min_tokens` for vLLM and SGLang, a `generation_config` for
`transformers serve`, max_tokens alone for other servers), streamed
(`stream: true`, usage in the last chunk). Prompts are `input_len` random token ids (sent
as ids to vLLM, or as the text they decode to for servers that take text only), or text
from a data set. Arrivals: `poisson` (exponential gaps, scaled so that the
last request is sent at num_prompts / rate: the achieved rate does not wander with the draw),
`burst` (groups of
`burst_size` requests at once, the same mean rate), or at an infinite rate all at once;
or a fixed `concurrency` (a closed loop: a new request as soon as one ends). A few
untimed requests warm the server first.

Per request: TTFT = first streamed chunk - send; ITL = the gaps between streamed chunks;
TPOT = (end - first text) / (output tokens - 1); E2E = end - send. Per load point:
duration = last end - first send; achieved requests/s and output tok/s over it; mean,
p50, p90, p99 of each latency (ms); goodput = requests that met the SLO per second, and
the share that met it. `client_cpu_share` is the client's CPU time over the run's wall time:
near 1.0 the client, not the server, set the pace (the figures are then a lower bound).
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from dataclasses import dataclass, field

import numpy as np

from compress.errors import UserError
from eval.engines.server import Endpoint
from eval.speed.workload import distribution


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = 200.0
    tpot_ms: float | None = 50.0
    e2e_ms: float | None = None

    def met(self, r: "Result") -> bool:
        if not r.ok:
            return False
        checks = ((self.ttft_ms, r.ttft), (self.tpot_ms, r.tpot), (self.e2e_ms, r.e2e))
        return all(lim is None or (v is not None and v * 1e3 <= lim) for lim, v in checks)

    def text(self) -> str:
        parts = [f"{n} <= {v:g} ms" for n, v in (("TTFT", self.ttft_ms), ("TPOT", self.tpot_ms), ("E2E", self.e2e_ms))
                 if v is not None]
        return ", ".join(parts) or "none"


@dataclass
class Load:
    """One load point: an arrival rate (requests/s; inf = all at once) or a fixed concurrency."""
    rate: float = math.inf
    concurrency: int | None = None
    arrival: str = "poisson"  # poisson | burst
    burst_size: int = 8

    @property
    def label(self) -> str:
        if self.concurrency:
            return f"concurrency {self.concurrency}"
        return "rate inf" if math.isinf(self.rate) else f"{self.arrival} {self.rate:g}/s"


@dataclass
class Result:
    sent: float
    ok: bool = False
    chunks: list[float] = field(default_factory=list)
    end: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunks[0] - self.sent if self.chunks else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.sent if self.end is not None else None

    @property
    def tpot(self) -> float | None:
        if not self.chunks or self.output_tokens < 2:
            return None
        return (self.end - self.chunks[0]) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def send_times(n: int, load: Load, seed: int) -> list[float]:
    """Offsets (s) from the start at which each of n requests is sent."""
    if load.concurrency or math.isinf(load.rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    if load.arrival == "poisson":  # exponential gaps, scaled so that the n-th arrival is at n / rate
        t = np.cumsum(rng.exponential(1.0, n))
        return (t * (n / load.rate) / t[-1]).tolist()
    if load.arrival == "burst":
        gap = load.burst_size / load.rate
        return [(i // load.burst_size) * gap for i in range(n)]
    raise ValueError(f"arrival {load.arrival!r}; allowed: poisson, burst")


async def _one(session, ep: Endpoint, prompt, output_len: int, extra: dict) -> Result:
    body = {"model": ep.model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    r = Result(sent=time.perf_counter())
    try:
        async with session.post(f"{ep.base_url}/v1/completions", json=body) as resp:
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return r
            async for line in resp.content:  # aiohttp splits the stream at newlines
                _event(r, line)
        r.end = time.perf_counter()
        if r.output_tokens == 0:  # no usage block: one token per chunk
            r.output_tokens = len(r.chunks)
        r.ok = bool(r.chunks)
        if not r.ok:
            r.error = "nothing streamed"
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        r.error = f"{type(e).__name__}: {e}"
    return r


_CHOICE = re.compile(rb'"choices"\s*:\s*\[\s*\{')


def _event(r: Result, line: bytes) -> None:
    """One SSE line. Hot path (every token of every request): a chunk is stamped before it is
    parsed, and parsed as JSON only when it carries the usage block; a chunk with a choice
    counts as a token event even where its text is empty (a token that ends mid-character)."""
    t = time.perf_counter()
    if not line.startswith(b"data:"):
        return
    data = line[5:].strip()
    if b'"completion_tokens"' in data:
        msg = json.loads(data)
        if msg.get("choices"):
            r.chunks.append(t)
        usage = msg.get("usage") or {}
        r.output_tokens = usage.get("completion_tokens") or 0
        r.prompt_tokens = usage.get("prompt_tokens") or 0
    elif _CHOICE.search(data):
        r.chunks.append(t)


async def _run(ep: Endpoint, prompts: list, output_len: int, load: Load, seed: int, extra: dict,
               warmup: int, timeout_s: float) -> tuple[list[Result], float]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        for p in prompts[:warmup]:
            await _one(session, ep, p, min(output_len, 4), exact_length(ep, min(output_len, 4)))
        offsets = send_times(len(prompts), load, seed)
        sem = asyncio.Semaphore(load.concurrency) if load.concurrency else None
        t0 = time.perf_counter()

        async def fire(p, at):
            if sem:
                async with sem:
                    return await _one(session, ep, p, output_len, extra)
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            return await _one(session, ep, p, output_len, extra)

        results = await asyncio.gather(*(fire(p, at) for p, at in zip(prompts, offsets)))
    return list(results), t0


def _loop_factory():
    """uvloop's event loop where installed (vLLM brings it): the client's own cost per token is
    what caps the throughput it can measure."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def summarize(results: list[Result], slo: SLO, t0: float | None = None) -> dict:
    """Figures of one load point (see the module docstring)."""
    ok = [r for r in results if r.ok]
    start = t0 if t0 is not None else min(r.sent for r in results)
    duration = (max(r.end for r in ok) - start) if ok else None
    good = sum(slo.met(r) for r in ok)
    out_tokens = sum(r.output_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration else (lambda x: None)
    errors = sorted({r.error for r in results if r.error})
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "requests_s": per_s(len(ok)), "output_tok_s": per_s(out_tokens),
        "total_tok_s": per_s(out_tokens + sum(r.prompt_tokens for r in ok)),
        "output_tokens": out_tokens,
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": distribution([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": distribution([g for r in ok for g in r.itl]),
        "e2e_ms": distribution([r.e2e for r in ok]),
        "goodput_requests_s": per_s(good), "slo_attainment": good / len(results) if results else None,
        **({"errors": errors[:5]} if errors else {}),
    }


def exact_length(ep: Endpoint, n: int) -> dict:
    """Request fields that make the server generate exactly n tokens, in its dialect."""
    if ep.dialect == "vllm":
        return {"ignore_eos": True, "min_tokens": n}
    if ep.dialect == "transformers":
        return {"generation_config": json.dumps({"max_new_tokens": n, "min_new_tokens": n, "do_sample": False})}
    return {}  # plain OpenAI: max_tokens only; the output may end early (counted from usage)


def run_load(ep: Endpoint, prompts: list, output_len: int, load: Load, slo: SLO = SLO(), seed: int = 0,
             warmup: int = 2, timeout_s: float = 3600.0) -> dict:
    """Send `prompts` (token-id lists or strings) to `ep` under `load`; the load point's figures."""
    extra = exact_length(ep, output_len)
    cpu0 = time.process_time()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        results, t0 = runner.run(_run(ep, prompts, output_len, load, seed, extra, warmup, timeout_s))
    wall = time.perf_counter() - t0
    cpu_share = (time.process_time() - cpu0) / wall if wall > 0 else None
    return {"client_cpu_share": cpu_share, "load": load.label, "rate": None if load.concurrency else load.rate, "concurrency": load.concurrency,
            "arrival": None if load.concurrency or math.isinf(load.rate) else load.arrival,
            **summarize(results, slo, t0)}


def slo_summary(points: list[dict], slo: SLO, attainment: float = 0.9) -> str:
    """One line: the best goodput, and the highest load at which >= `attainment` of requests met the SLO."""
    meeting = [p for p in points if (p.get("slo_attainment") or 0) >= attainment]
    best = max(points, key=lambda p: p.get("goodput_requests_s") or 0, default=None)
    if not meeting:
        got = f"; best attainment {max((p.get('slo_attainment') or 0) for p in points):.0%}" if points else ""
        return f"no load point meets the SLO ({slo.text()}) for {attainment:.0%} of requests{got}"
    top = max(meeting, key=lambda p: p.get("requests_s") or 0)
    return (f"SLO ({slo.text()}) met for >= {attainment:.0%} of requests up to {top['load']} "
            f"({top['requests_s']:.2f} req/s achieved); best goodput {best['goodput_requests_s']:.2f} req/s at {best['load']}")


def context_len(w) -> int:
    """The context a server needs for a workload (w: ServingConfig): prompt + output + a
    margin for special tokens, at least 512."""
    return max(512, w.input_len + w.output_len + 8)


def make_prompts(w, tokenizer, seed: int = 0, as_text: bool = False) -> list:
    """`w.num_prompts` prompts of `w.input_len` tokens (w: eval.config.ServingConfig):
    random token ids, or windows of a data set's text at random offsets; as token-id lists,
    or as text for servers that take text only."""
    from eval.speed.workload import random_prompts

    if w.prompts == "random":
        ids = random_prompts(w.num_prompts, w.input_len, len(tokenizer), seed)
    else:
        from compress.data import load_text

        toks = tokenizer(load_text(w.prompts), add_special_tokens=False)["input_ids"]
        if len(toks) < w.input_len + 1:
            raise UserError(f"prompts {w.prompts!r}: {len(toks)} tokens, fewer than one {w.input_len}-token prompt")
        starts = np.random.default_rng(seed).integers(0, len(toks) - w.input_len, w.num_prompts)
        ids = [toks[s:s + w.input_len] for s in starts]
    return [tokenizer.decode(p) for p in ids] if as_text else ids
