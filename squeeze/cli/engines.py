"""`squeeze serving` and `squeeze tune`: servers under load, and engine-settings studies.

Both start servers (or engines) that must never outlive the command: SIGTERM and SIGHUP
are turned into KeyboardInterrupt for their duration (eval.engines.server.signals_raise),
so every server's process group is killed on every way out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from compress.errors import UserError


def _floats(s: str) -> list[float]:
    try:
        return [math.inf if x.strip() in ("inf", ".inf") else float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas (inf allowed), got {s!r}") from None


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {s!r}") from None


def _workload_flags(p: argparse.ArgumentParser, num_prompts: int) -> None:
    g = p.add_argument_group("workload (defaults: eval.serving's, or the --config file's)")
    g.add_argument("--num-prompts", type=int, help=f"requests per load point (default {num_prompts})")
    g.add_argument("--input-len", type=int, help="prompt tokens (default 128)")
    g.add_argument("--output-len", type=int, help="generated tokens per request (default 64)")
    g.add_argument("--prompts", help="'random' token ids (default) or a data set cut into prompts")
    g.add_argument("--arrival", choices=["poisson", "burst"], help="default poisson")
    g.add_argument("--burst-size", type=int, help="burst arrivals: requests per burst (default 8)")
    g.add_argument("--slo-ttft-ms", type=float, help="SLO: time to first token (default 200)")
    g.add_argument("--slo-tpot-ms", type=float, help="SLO: time per output token (default 50)")
    g.add_argument("--slo-e2e-ms", type=float, help="SLO: whole request (default: not checked)")
    g.add_argument("--warmup", type=int, help="untimed requests before each load point (default 2)")


def _workload(a, base: dict) -> dict:
    """`base` (a workload mapping) with the workload flags given on the command line."""
    w = dict(base)
    for k in ("num_prompts", "input_len", "output_len", "prompts", "arrival", "burst_size", "warmup"):
        if getattr(a, k) is not None:
            w[k] = getattr(a, k)
    slo = {k: getattr(a, f"slo_{k}") for k in ("ttft_ms", "tpot_ms", "e2e_ms") if getattr(a, f"slo_{k}") is not None}
    if slo:
        w["slo"] = {**(w.get("slo") or {}), **slo}
    return w


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None, help="vLLM: context length (default: fits the workload)")
    p.add_argument("--trust-remote-code", action="store_true")


def add_parsers(sub, epilog: str, common) -> None:
    p = sub.add_parser("serving", epilog=epilog, help="load-test OpenAI-compatible servers (ours or running ones)",
                       description="Start a vLLM server per MODEL (localhost, always stopped afterwards) and/or "
                       "use running servers (--url), send each load point (rates and/or fixed concurrencies) as "
                       "streaming requests, and print one table: requests/s, output tok/s, TTFT, TPOT, ITL, "
                       "E2E and goodput under the SLO.")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model directories or built-in names (vLLM servers)")
    p.add_argument("--url", action="append", default=[], metavar="URL",
                   help="a running OpenAI-compatible server, e.g. http://host:8000 (TGI, trtllm-serve, SGLang)")
    p.add_argument("--engine", choices=["vllm", "hf", "both"], default="vllm",
                   help="servers to start per MODEL: vLLM's, transformers serve (continuous batching), or both")
    p.add_argument("--served-model", metavar="NAME", help="--url: the model name to request (default: its first)")
    p.add_argument("--dialect", choices=["vllm", "transformers", "openai"], default="vllm",
                   help="--url: how to ask for exactly N tokens: vllm (ignore_eos, min_tokens; SGLang too), "
                   "transformers (generation_config), openai (max_tokens only)")
    p.add_argument("--tokenizer", metavar="DIR", help="--url: tokenizer for text prompts (default: the first MODEL)")
    p.add_argument("--rates", type=_floats, default=None, help="request rates, e.g. 1,2,4,inf (default inf)")
    p.add_argument("--concurrency", type=_ints, default=[], help="fixed-concurrency load points, e.g. 1,8")
    p.add_argument("--client", choices=["auto", "squeeze", "vllm-bench", "both"], default=None,
                   help="who measures: auto (default) = `vllm bench serve` on the vLLM servers started here, our "
                   "client on --url servers and transformers serve; squeeze = ours everywhere; both = side by side")
    p.add_argument("--vllm-bench", action="store_true", help="the same as --client both")
    p.add_argument("--port", type=int, default=None, help="port for our server (default: a free one)")
    p.add_argument("--output", "-o", metavar="DIR", help="write serving.json and serving.md here")
    _workload_flags(p, 32)
    _engine_flags(p)
    common(p)

    p = sub.add_parser("tune", epilog=epilog, help="search an engine's settings for a model",
                       description="Search vLLM (server) or HF engine settings for MODEL with grid, random or "
                       "Bayesian (TPE) search under a trial budget; write the landscape (table, plot), the best "
                       "setting, its gain over the defaults and a ready-to-paste command. Running the same command "
                       "again resumes the study.")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--config", metavar="FILE", help="YAML with a tune section (eval.tune's fields); flags override")
    p.add_argument("--engine", choices=["vllm", "hf"], default=None, help="default vllm")
    p.add_argument("--strategy", choices=["grid", "random", "tpe"], default=None, help="default tpe")
    p.add_argument("--budget", type=int, default=None, help="trials to measure (default 12)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per trial (default 2)")
    p.add_argument("--objective", choices=["throughput", "goodput", "p99_latency"], default=None)
    p.add_argument("--throughput-floor", type=float, default=None, help="p99_latency: output tok/s to reach")
    p.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2",
                   help="a setting and its values (JSON each), e.g. max_num_seqs=32,128; replaces the built-in space")
    p.add_argument("--rate", type=float, default=None, help="workload: request rate (default inf: all at once)")
    p.add_argument("--concurrency", type=int, default=None, help="workload: fixed concurrency instead of a rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--output", "-o", metavar="DIR", help="study directory (default: <SQUEEZE_HOME>/tune/<model>/"
                   "<engine>/<GPU>)")
    p.add_argument("--cluster", metavar="WHERE", help="measure trials at once on a Ray cluster, one GPU each (or one "
                   "CPU): local, auto or ray://HOST:PORT; the study directory must be one every node mounts")
    _workload_flags(p, 64)
    _engine_flags(p)
    common(p)


def _serving_config(a):
    from pydantic import ValidationError

    from eval.config import ServingConfig

    w = _workload(a, {"num_prompts": 32})
    if a.rates is not None or a.concurrency:
        w.update(rates=a.rates or [], concurrency=a.concurrency)
    if a.client or a.vllm_bench:
        w["client"] = a.client or "both"
    try:
        return ServingConfig.model_validate(w)
    except ValidationError as e:
        raise UserError(*(f"--{'-'.join(str(x) for x in err['loc']).replace('_', '-') or 'client'}: {err['msg']}"
                          for err in e.errors(include_url=False))) from None


def cmd_serving(a) -> int:
    from compress.models import load_tokenizer, resolve_device, resolve_model
    from eval.engines import check_engines
    from eval.engines.server import SERVERS, endpoint_for, signals_raise
    from eval.speed.serving import context_len
    from eval.speed.serving_report import run_targets, serving_markdown

    if not a.models and not a.url:
        raise UserError("serving: give a MODEL to serve, or --url of a running server")
    w = _serving_config(a)
    device = resolve_device(a.device)
    dirs = [resolve_model(m) for m in a.models]
    tok_dir = a.tokenizer or (dirs[0] if dirs else None)
    if a.url and not dirs and w.client == "vllm-bench":
        raise UserError("serving --client vllm-bench: vLLM's client runs on the servers started here; a --url server "
                        "is measured by ours (--client auto or squeeze)")
    if a.url and tok_dir is None and w.prompts == "random":
        raise UserError("serving --url: give --tokenizer DIR (or a MODEL) to make text prompts of --input-len tokens")
    # each server's settings: vLLM's take the context length the workload needs
    settings = {"vllm": {"dtype": a.dtype, "max_model_len": a.max_model_len or context_len(w),
                         "trust_remote_code": a.trust_remote_code or None},
                "hf": {"dtype": a.dtype}}
    engines = ["vllm", "hf"] if a.engine == "both" else [a.engine]
    if dirs:
        check_engines(engines)
    if a.port is not None and len(dirs) * len(engines) > 1:
        raise UserError("serving --port: one MODEL and one engine only (each server needs its own port)")
    targets = [("server", f"{d} ({e})" if len(engines) > 1 else str(d),
                lambda d=d, e=e: SERVERS[e](d, settings[e], port=a.port, device=device))
               for d in dirs for e in engines]
    targets += [("url", u, lambda u=u: endpoint_for(u, a.served_model, a.dialect)) for u in a.url]
    tokenizer = load_tokenizer(Path(tok_dir), a.trust_remote_code) if tok_dir else None
    with signals_raise():
        res = run_targets(targets, w, tokenizer, log=lambda s: print(s, file=sys.stderr))
    md = serving_markdown(res)
    print(md)
    if a.output:
        from compress.fsutil import atomic_write_text

        out = Path(a.output)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "serving.json", json.dumps(res, indent=1, default=str))
        atomic_write_text(out / "serving.md", md)
        print(f"wrote {out / 'serving.json'} and serving.md", file=sys.stderr)
    for e in res["errors"]:
        print(f"error: {e}", file=sys.stderr)
    failed = any(r.get("failed") for r in res["rows"])
    return 1 if res["errors"] or failed else 0


def _tune_config(a):
    from pydantic import ValidationError

    from eval.config import TuneConfig
    from compress.yamlio import format_errors, load_yaml

    raw = {}
    if a.config:
        doc = load_yaml(Path(a.config)) or {}
        raw = (doc.get("eval", doc) or {}).get("tune", doc) if isinstance(doc, dict) else doc
    if not isinstance(raw, dict):
        raise UserError(f"{a.config}: expected a mapping with tune's fields")
    flags = {"engine": a.engine, "strategy": a.strategy, "budget": a.budget, "repeats": a.repeats,
             "objective": a.objective, "throughput_floor": a.throughput_floor, "seed": a.seed}
    raw.update({k: v for k, v in flags.items() if v is not None})
    if a.set:
        raw["space"] = dict(_parse_set(s) for s in a.set)
    wl = _workload(a, raw.get("workload") or {})
    if a.concurrency is not None:
        wl.update(concurrency=[a.concurrency], rates=[])
    elif a.rate is not None:
        wl.update(rates=[a.rate], concurrency=[])
    raw["workload"] = wl
    try:
        return TuneConfig.model_validate(raw)
    except ValidationError as e:
        if a.config:
            raise UserError(*format_errors(e, TuneConfig, a.config, ("tune",))) from None
        raise UserError(*(f"--{'-'.join(map(str, err['loc'])).replace('_', '-')}: {err['msg']}" if err["loc"] else
                          f"squeeze tune: {err['msg'].removeprefix('Value error, ')}"
                          for err in e.errors(include_url=False))) from None


def _parse_set(s: str) -> tuple[str, list]:
    name, sep, vals = s.partition("=")
    if not sep or not name.strip() or not vals.strip():
        raise UserError(f"--set {s!r}: expected NAME=V1,V2 (e.g. max_num_seqs=32,128)")
    out = []
    for v in vals.split(","):
        try:
            out.append(json.loads(v))
        except json.JSONDecodeError:
            out.append(v)  # a bare word: a string value (e.g. sdpa)
    return name.strip(), out


def cmd_tune(a) -> int:
    from compress.models import resolve_device, resolve_model
    from compress.spec import ModelSpec
    from eval.config import VLLMOptions
    from eval.engines.server import signals_raise
    from eval.tune.landscape import markdown
    from eval.tune.study import Study

    cfg = _tune_config(a)
    if a.cluster:
        from squeeze.pipeline.cluster import check_address, import_ray

        check_address(a.cluster)
        import_ray()
    device = resolve_device(a.device)
    model_dir = resolve_model(a.model)
    spec = ModelSpec(dtype=a.dtype, trust_remote_code=a.trust_remote_code)
    st = Study(model_dir, cfg, spec, VLLMOptions(max_model_len=a.max_model_len), device,
               out_dir=Path(a.output) if a.output else None, log=lambda s: print(s, file=sys.stderr))
    print(f"study {st.name} in {st.dir}", file=sys.stderr)
    executor, parallel, started = None, 1, False
    if a.cluster:
        from squeeze.pipeline.cluster import connect, tune_executor

        started = connect(a.cluster)
        executor, parallel = tune_executor(st.root, device)
        print(f"{parallel} trials at once on the cluster ({a.cluster})", file=sys.stderr)
    try:
        with signals_raise():
            res = st.run(executor, parallel)
    finally:
        if started:
            import ray

            ray.shutdown()
    print(markdown(res))
    print(f"landscape: {st.dir / 'landscape.md'}, {st.dir / 'landscape.png'}; best: {st.dir / 'best.json'}",
          file=sys.stderr)
    return 0 if res["best"] else 1
