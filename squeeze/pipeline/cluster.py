"""A Ray cluster for a run: connecting to it, and the checks made before any work.

- `connect(address)`: `local` starts a Ray instance on this host (every GPU, or CPU, it has);
  `auto` joins the cluster this host belongs to (`ray start` ran here); `ray://HOST:PORT` is a
  cluster's client address, tried with a plain TCP connect first so that an address with
  nothing behind it is one line within seconds, not Ray's minutes of retries. A Ray already
  initialized in this process (a test's, a notebook's) is used as it is.
- `probe(write_dirs, read_paths)`: a file written here must be seen, with its content, from
  every alive node, and the inputs (the base model) must exist there: a store that one node
  does not mount is refused before any work, naming the node.
- `check_resources(needs)`: every kind of task must fit on some node (a task asking for a GPU
  on a cluster without one would wait forever): one line per task kind, with what each node
  offers.
- `run_env(store)`: the environment every worker gets (SQUEEZE_HOME, the evaluation cache, the
  data directory, as absolute paths); `RayExecutor`: a concurrent.futures-style `submit` whose
  every call is a Ray task (tuning trials, eval.tune.study), `tune_executor` sets one up.

Ray is optional (`pip install -e '.[cluster]'`); without it `--cluster` says so in one line.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from compress.errors import UserError

INSTALL = "pip install -e '.[cluster]'"
CONNECT_TIMEOUT_S = 10.0  # a TCP connect to a ray:// address; Ray's own retries take minutes


def check_address(address: str) -> None:
    if not re.fullmatch(r"local|auto|ray://\S+", address):
        raise UserError(f"--cluster {address}: expected local, auto or ray://HOST:PORT")


def import_ray():
    """The `ray` module, or one line saying how to install it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--cluster: Ray is not installed; install it with `{INSTALL}` "
                        "(or run without --cluster: one process, in order)") from None
    return ray


def _reachable(address: str) -> None:
    u = urlsplit(address)
    host, port = u.hostname, u.port or 10001
    if not host:
        raise UserError(f"--cluster {address}: expected ray://HOST:PORT (the port of `ray start --head`'s client "
                        "server, 10001 by default)")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise UserError(f"--cluster {address}: no Ray cluster answers at {host}:{port} ({e.strerror or e}); start one "
                        "there with `ray start --head`, or check the address") from None


def connect(address: str) -> bool:
    """Connect this process to the cluster at `address`; True when it started or joined one
    (and so should `ray.shutdown()` at the end), False when Ray was initialized already."""
    ray = import_ray()
    if address.startswith("ray://"):
        _reachable(address)
    if ray.is_initialized():
        return False
    if address == "local":
        ray.init(address="local", include_dashboard=False, log_to_driver=True)  # a new one, whatever RAY_ADDRESS says
    elif address == "auto":
        try:
            ray.init(address="auto", log_to_driver=True)
        except ConnectionError:
            raise UserError("--cluster auto: no Ray cluster runs on this host; start one with `ray start --head` (and "
                            "`ray start --address HEAD:6379` on the other nodes), or use --cluster local") from None
    else:
        try:
            ray.init(address=address, log_to_driver=True)
        except (ConnectionError, TimeoutError) as e:
            raise UserError(f"--cluster {address}: could not connect ({str(e).splitlines()[0] if str(e) else e}); "
                            "is it a Ray client address (ray://HOST:10001)?") from None
    return True


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def has_gpus() -> bool:
    return any(n["Resources"].get("GPU", 0) > 0 for n in alive_nodes())


# ---- the checks before any work -----------------------------------------------------------------

def _look(files: list[str], token: str, must_exist: list[str]) -> dict:
    """On one node: which probe files are missing (or hold another run's token), which inputs are absent."""
    import ray

    bad = []
    for f in files:
        p = Path(f)
        if not p.is_file() or p.read_text() != token:
            bad.append(str(p.parent))
    return {"node": ray.util.get_node_ip_address(), "unseen": bad,
            "absent": [p for p in must_exist if not Path(p).exists()]}


def write_probe(d: Path, token: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    f = d / f".squeeze-probe-{token}"
    f.write_text(token)
    return f


def probe(write_dirs: list[Path], read_paths: list[Path], timeout_s: float = 120.0) -> None:
    """Refuse (one line per problem) a directory that some alive node does not see as this
    process wrote it, or an input that some node lacks (module docstring)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    files = [write_probe(Path(d).resolve(), token) for d in write_dirs]
    look = ray.remote(_look)
    try:
        refs = [look.options(num_cpus=0, max_retries=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote([str(f) for f in files], token, [str(Path(p).resolve()) for p in read_paths])
            for n in alive_nodes()]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        for f in files:
            f.unlink(missing_ok=True)
    errors = [f"store {d}: not visible from node {s['node']} (a probe file written here is not there); mount it at the "
              "same path on every node, or pass --store with a directory that is" for s in seen for d in s["unseen"]]
    errors += [f"{p}: absent on node {s['node']}; every node reads it at this path (put it on the shared store)"
               for s in seen for p in s["absent"]]
    if errors:
        raise UserError(*errors)


def _amount(res: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items() if v) or "nothing"


def check_resources(needs: list[tuple[str, dict]]) -> None:
    """`needs`: (what, {"CPU": n, "GPU": n}); each must fit on one alive node."""
    nodes = alive_nodes()
    offer = "; ".join(f"node {n['NodeManagerAddress']}: {_amount({k: n['Resources'].get(k, 0) for k in ('CPU', 'GPU')})}"
                      for n in nodes) or "no node"
    errors = [f"{what} needs {_amount(need)} and no node has that (the cluster offers {offer}); lower "
              "execution.stage_gpus / eval_gpus / *_cpus, or add such a node" for what, need in needs
              if not any(all(n["Resources"].get(k, 0) >= v for k, v in need.items()) for n in nodes)]
    if errors:
        raise UserError(*errors)


# ---- the environment of a worker, and single calls as tasks -------------------------------------

def run_env(store: Path | None = None) -> dict:
    """The run's environment for every worker (absolute paths: workers start elsewhere)."""
    from compress.data import data_dir
    from compress.models import home
    from eval.evaluate import cache_dir

    env = {"SQUEEZE_HOME": str(home().resolve()),
           "SQUEEZE_EVAL_CACHE": str((Path(store) / "_eval_cache") if store else cache_dir().resolve())}
    if (d := data_dir()) is not None:
        env["SQUEEZE_DATA_DIR"] = str(Path(d).resolve())
    env.update({k: os.environ[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ})
    return env


def _call(env: dict, threads: int, fn, *args):
    import torch

    os.environ.update(env)
    torch.set_num_threads(threads)
    return fn(*args)


class RayExecutor:
    """`submit(fn, *args)` -> a concurrent.futures.Future: one Ray task taking `resources`,
    retried up to `max_retries` times when its worker dies, never when `fn` raises."""

    def __init__(self, resources: dict, env: dict, max_retries: int = 2):
        import ray

        self.resources, self.env, self.max_retries = resources, env, max_retries
        self._remote = ray.remote(_call)

    def submit(self, fn, *args):
        opts = {"num_cpus": self.resources.get("CPU", 0), "num_gpus": self.resources.get("GPU", 0),
                "max_retries": self.max_retries, "retry_exceptions": False}
        threads = max(1, int(self.resources.get("CPU", 1)))
        return self._remote.options(**opts).remote(self.env, threads, fn, *args).future()


def slots(need: dict) -> int:
    """How many tasks taking `need` fit on the alive nodes at once."""
    return sum(min(int(n["Resources"].get(k, 0) // v) for k, v in need.items() if v) for n in alive_nodes()) \
        if any(need.values()) else len(alive_nodes())


def tune_executor(study_dir: Path, device: str) -> tuple[RayExecutor, int]:
    """Trials of a study on the connected cluster: one GPU each where the cluster has GPUs (one
    engine per GPU), else one CPU; the study directory probed from every node."""
    need = {"CPU": 1.0, "GPU": 1.0 if device != "cpu" and has_gpus() else 0.0}
    check_resources([("a tuning trial", need)])
    probe([study_dir], [])
    return RayExecutor(need, run_env()), slots(need)
