"""Tasks with dependencies on a Ray cluster, each submitted as soon as its inputs are done.

A `Task` is a plain function and its arguments, the ids of the tasks it waits for and the
resources it takes (Ray's `num_cpus` / `num_gpus`; a fraction of a GPU shares one). `run_tasks`
submits every task whose dependencies are done, and follows each through its states:

    waiting -> queued -> running (node, GPU ids, attempt) -> done | failed | skipped

one line per change on the log and the whole table in `tasks.json` (rewritten atomically).

Faults: a task whose worker dies (killed, lost with its node) is retried by Ray up to
`max_retries` times; a task whose own code raises (bad input, out of memory) is not retried:
it fails with its one-line error, the tasks that need its output are skipped, and every other
task goes on. A task may also be skipped by its `skip` check, given its dependencies' results.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from compress.errors import UserError
from compress.fsutil import atomic_write_text

FINISHED = ("done", "failed", "skipped")


@dataclass
class Task:
    id: str
    fn: Callable
    args: tuple = ()
    deps: tuple[str, ...] = ()
    resources: dict = field(default_factory=lambda: {"CPU": 1.0})
    skip: Callable[[list], str | None] | None = None  # given the dependencies' results: a reason to skip, or None
    meta: dict = field(default_factory=dict)  # the caller's: what the task is about
    state: str = "waiting"
    node: str | None = None
    gpus: list = field(default_factory=list)
    attempts: int = 0
    seconds: float | None = None
    error: str | None = None
    result: Any = None
    _t0: float = 0.0

    def row(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("fn", "args", "skip", "result", "_t0", "meta")}
        return {**d, "deps": list(self.deps)}


def error_line(e: BaseException) -> str:
    """A UserError's own line(s), else the exception's type and first line."""
    from eval.evaluate import one_line

    return "; ".join(e.lines) if isinstance(e, UserError) else one_line(e)


class _Progress:
    """A Ray actor: workers tell it where each attempt runs, the driver drains what it was told."""

    def __init__(self):
        self.seen = []

    def started(self, task_id: str, node: str, gpus: list) -> None:
        self.seen.append((task_id, node, gpus))

    def drain(self) -> list:
        out, self.seen = self.seen, []
        return out


def _body(progress, task_id: str, fn: Callable, args: tuple, env: dict, threads: int | None,
          attempts: str | None):
    """What runs in the worker: report where, set the run's environment, run the function."""
    import ray

    if attempts:  # one line per attempt, written before any work: an attempt that dies is counted
        fd = os.open(attempts, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, (task_id + "\n").encode())
        os.close(fd)
    gpus = [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]
    # not waited for: a task blocked in ray.get or ray.wait lends its CPUs to other tasks (oversubscribed)
    progress.started.remote(task_id, ray.util.get_node_ip_address(), gpus)
    os.environ.update(env)
    if threads:
        import torch

        torch.set_num_threads(threads)
    return fn(*args)


def _amount(res: dict) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in res.items() if v) or "no resources"


def run_tasks(tasks: list[Task], env: dict | None = None, threads: int | None = None, max_retries: int = 2,
              tasks_json: Path | None = None, log: Callable[[str], None] = print, header: dict | None = None
              ) -> dict[str, Task]:
    """Run `tasks` on the connected Ray cluster (module docstring); every task ends finished.
    A dependency id that names no task counts as done (its output exists already). `threads`:
    torch's threads in every task (default: the task's CPUs, as Ray sets OMP_NUM_THREADS), so
    tasks sharing a host do not oversubscribe its cores."""
    import ray

    run = _Run(tasks, env or {}, threads, max_retries, tasks_json, log, header or {})
    try:
        while True:
            run.submit_ready()
            if not run.refs:
                break
            done, _ = ray.wait(list(run.refs), num_returns=1, timeout=0.5)
            run.drain()
            for ref in done:
                run.finish(ref)
    finally:
        for ref in run.refs:
            ray.cancel(ref, force=True)
        ray.kill(run.progress)
    return run.by_id


class _Run:
    """The driver's side of run_tasks: what is submitted, and every state change."""

    def __init__(self, tasks, env, threads, max_retries, tasks_json, log, header):
        import ray

        self.tasks, self.by_id, self.refs = tasks, {t.id: t for t in tasks}, {}
        self.env, self.threads, self.max_retries = env, threads, max_retries
        self.tasks_json, self.log, self.header = tasks_json, log, header
        self.progress = ray.remote(num_cpus=0)(_Progress).remote()
        self.attempts = tasks_json.with_name(f".{tasks_json.stem}.attempts") if tasks_json is not None else None
        if self.attempts is not None:
            self.attempts.unlink(missing_ok=True)
        self.remote = ray.remote(_body)

    def change(self, t: Task, state: str, note: str = "") -> None:
        t.state = state
        self.log(f"task {t.id}: {state}{note}")
        if self.tasks_json is not None:
            atomic_write_text(self.tasks_json, json.dumps({**self.header, "tasks": [x.row() for x in self.tasks]},
                                                          indent=1))

    def submit_ready(self) -> None:
        """Submit every waiting task whose dependencies are done; skip those whose did not finish."""
        for t in self.tasks:
            if t.state != "waiting":
                continue
            deps = [self.by_id[d] for d in t.deps if d in self.by_id]
            if any(d.state in ("failed", "skipped") for d in deps):
                t.error = "needs " + ", ".join(d.id for d in deps if d.state in ("failed", "skipped"))
                self.change(t, "skipped", f": {t.error}, which did not finish")
            elif all(d.state == "done" for d in deps):
                if t.skip is not None and (why := t.skip([d.result for d in deps])):
                    t.error = why
                    self.change(t, "skipped", f": {why}")
                    continue
                opts = {"num_cpus": t.resources.get("CPU", 0), "num_gpus": t.resources.get("GPU", 0),
                        "max_retries": self.max_retries, "retry_exceptions": False, "name": t.id}
                n = self.threads or max(1, int(t.resources.get("CPU", 1)))  # Ray's own rule for OMP_NUM_THREADS
                self.refs[self.remote.options(**opts).remote(self.progress, t.id, t.fn, t.args, self.env, n,
                                                             self.attempts and str(self.attempts))] = t
                t._t0 = time.perf_counter()
                self.change(t, "queued", f" ({_amount(t.resources)})")

    def started(self, task_id: str) -> int:
        """Attempts of `task_id` that started, as they wrote it (0 without an attempts file)."""
        f = self.attempts
        return f.read_text().split().count(task_id) if f is not None and f.is_file() else 0

    def drain(self) -> None:
        """Where the attempts that started since the last look run."""
        import ray

        for task_id, node, gpus in ray.get(self.progress.drain.remote()):
            t = self.by_id[task_id]
            t.attempts, t.node, t.gpus = max(t.attempts + 1, self.started(t.id)), node, gpus
            where = f" on {node}" + (f", GPU {','.join(gpus)}" if gpus else "")
            self.change(t, "running", where + (f" (attempt {t.attempts})" if t.attempts > 1 else ""))

    def finish(self, ref) -> None:
        import ray

        t = self.refs.pop(ref)
        for _ in range(25):  # its start message may still be on its way (it is not waited for)
            if t.state == "running":
                break
            time.sleep(0.02)
            self.drain()
        t.seconds = time.perf_counter() - t._t0
        t.attempts = max(t.attempts, self.started(t.id))
        try:
            t.result = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the task's own error: not retried
            t.error = error_line(e.cause if isinstance(e.cause, BaseException) else e)
            self.change(t, "failed", f": {t.error}")
        except ray.exceptions.RayError as e:  # its worker or node died on every attempt
            t.error = f"its worker died on each of {self.max_retries + 1} attempts ({type(e).__name__})"
            self.change(t, "failed", f": {t.error}")
        else:
            self.change(t, "done", f" in {t.seconds:.1f} s")
