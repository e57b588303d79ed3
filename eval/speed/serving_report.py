"""Serving runs over several targets (our vLLM servers, running servers) and their table."""

from __future__ import annotations

import math

from compress.errors import UserError
from eval.speed.serving import SLO, Load, make_prompts, run_load, slo_summary


def loads_of(w) -> list[Load]:
    """The load points of a ServingConfig: its rates, then its fixed concurrencies."""
    return ([Load(rate=r, arrival=w.arrival, burst_size=w.burst_size) for r in w.rates]
            + [Load(concurrency=c) for c in w.concurrency])


def slo_of(w) -> SLO:
    return SLO(w.slo.ttft_ms, w.slo.tpot_ms, w.slo.e2e_ms)


def clients_for(w, kind: str, dialect: str) -> list[str]:
    """Who measures a target (w: ServingConfig): `vllm bench serve` on the vLLM servers Squeeze
    starts ('auto', 'vllm-bench'), with random prompts (its own random data set; 'auto' keeps
    ours for data-set prompts); our client on everything else (running servers given by URL,
    `transformers serve`); both side by side with 'both'. The first named heads the SLO line."""
    if kind != "server" or dialect != "vllm" or w.client == "squeeze" or (w.client == "auto" and w.prompts != "random"):
        return ["squeeze"]
    return {"auto": ["vllm bench serve"], "vllm-bench": ["vllm bench serve"],
            "both": ["squeeze", "vllm bench serve"]}[w.client]


def run_targets(targets: list, w, tokenizer, seed: int = 0, log=print) -> dict:
    """Each target is (kind, name, opener): kind "server" opens a ManagedServer (a context
    manager, stopped on every way out), kind "url" returns the Endpoint of a running server.
    Every load point of `w` runs against every target with the same prompts (token ids where
    the server takes them, else their text), measured by the client(s) `clients_for` names."""
    slo, rows, summaries, errors = slo_of(w), [], {}, []
    for kind, name, opener in targets:
        try:
            if kind == "server":
                with opener() as srv:
                    log(f"{name}: {srv.kind} server up in {srv.startup_s:.0f} s at {srv.endpoint.base_url}")
                    clients = clients_for(w, kind, srv.dialect)
                    pts = []
                    for c in clients:
                        pts += (_points(name, c, srv.endpoint, w, tokenizer, slo, seed, log) if c == "squeeze"
                                else _bench_points(name, srv, w, tokenizer, slo, seed, log))
            else:
                ep = opener()
                log(f"{name}: serving {ep.model}")
                clients = ["squeeze"]
                pts = _points(name, "squeeze", ep, w, tokenizer, slo, seed, log)
        except UserError as e:  # a server that will not start: said, and the other targets still run
            log(f"{name}: {e}")
            errors.append(f"{name}: {e.lines[0]}")
            summaries[name] = f"failed: {e.lines[0]}"
            continue
        rows += pts
        head = [p for p in pts if p["client"] == clients[0]] or [p for p in pts if p["client"] == "squeeze"]
        summaries[name] = slo_summary(head, slo) + ("" if clients[0] == "squeeze" else f" ({clients[0]})")
    return {"workload": w.model_dump(mode="json"), "slo": slo.text(), "rows": rows, "summaries": summaries,
            "errors": errors}


def _points(name, client, ep, w, tokenizer, slo, seed, log) -> list[dict]:
    prompts = make_prompts(w, tokenizer, seed, as_text=not ep.takes_token_ids)
    out = []
    for load in loads_of(w):
        p = run_load(ep, prompts, w.output_len, load, slo, seed=seed, warmup=w.warmup)
        log(f"{name}: {load.label}: {p['requests_s'] or 0:.2f} req/s, {p['output_tok_s'] or 0:.1f} out tok/s, "
            f"{p['failed']} failed")
        if (p["client_cpu_share"] or 0) > 0.9:
            log(f"{name}: {load.label}: the load client used {p['client_cpu_share']:.0%} of a core: it, not the "
                "server, may have set the pace (figures are a lower bound)")
        out.append({"target": name, "client": client, **p})
    return out


def _bench_points(name, srv, w, tokenizer, slo, seed, log) -> list[dict]:
    """vLLM's client on each load point; burst arrivals, which it has not, are measured by ours."""
    from eval.speed.vllm_bench import run_vllm_bench

    out = []
    for load in loads_of(w):
        if load.concurrency:
            kw = {"request_rate": math.inf, "max_concurrency": load.concurrency}
        else:
            kw = {"request_rate": load.rate, "burstiness": 1.0}
            if load.arrival == "burst" and not math.isinf(load.rate):
                log(f"{name}: vllm bench serve has no burst arrivals; {load.label} measured by our client")
                out += _points(name, "squeeze", srv.endpoint, w.model_copy(update={"rates": [load.rate],
                               "concurrency": []}), tokenizer, slo, seed, log)
                continue
        goodput = {k: v for k, v in (("ttft", w.slo.ttft_ms), ("tpot", w.slo.tpot_ms), ("e2el", w.slo.e2e_ms)) if v}
        r = run_vllm_bench(srv.endpoint.base_url, srv.endpoint.model, srv.model_dir, num_prompts=w.num_prompts,
                           input_len=w.input_len, output_len=w.output_len, seed=seed, goodput=goodput or None,
                           num_warmups=w.warmup, **kw)
        log(f"{name}: vllm bench serve {load.label}: {r['requests_s']:.2f} req/s, {r['output_tok_s']:.1f} out tok/s")
        out.append({"target": name, "client": "vllm bench serve", "load": load.label, **r})
    return out


def _ms(d: dict | None, k: str) -> str:
    v = (d or {}).get(k)
    return "–" if v is None else f"{v:.1f}"


def _num(v, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def serving_markdown(res: dict) -> str:
    head = ["target", "client", "load", "req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99",
            "ITL p50", "E2E p50", "E2E p99", "goodput req/s", "SLO met", "failed"]
    lines = [f"Workload: {res['workload']['num_prompts']} requests per load point, {res['workload']['input_len']} "
             f"prompt tokens ({res['workload']['prompts']}), {res['workload']['output_len']} output tokens; "
             f"SLO {res['slo']}; latencies in ms.", "",
             "| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    for r in res["rows"]:
        lines.append("| " + " | ".join([
            r["target"], r["client"], r["load"], _num(r.get("requests_s")), _num(r.get("output_tok_s"), "{:.1f}"),
            _ms(r.get("ttft_ms"), "p50"), _ms(r.get("ttft_ms"), "p99"), _ms(r.get("tpot_ms"), "p50"),
            _ms(r.get("tpot_ms"), "p99"), _ms(r.get("itl_ms"), "p50"), _ms(r.get("e2e_ms"), "p50"),
            _ms(r.get("e2e_ms"), "p99"), _num(r.get("goodput_requests_s")),
            _num(r.get("slo_attainment"), "{:.0%}"), str(r.get("failed", "–"))]) + " |")
    lines.append("")
    lines += [f"{t}: {s}" for t, s in res["summaries"].items()]
    return "\n".join(lines) + "\n"
