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

Ray is optional (`pip install -e '.[cluster]'`); without it `--cluster` says so in one line.
"""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from compress.errors import UserError

INSTALL = "pip install -e '.[cluster]'"
CONNECT_TIMEOUT_S = 10.0  # a TCP connect to a ray:// address; Ray's own retries take minutes


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
        ray.init(include_dashboard=False, log_to_driver=True)
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
