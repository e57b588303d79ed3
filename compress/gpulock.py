"""One GPU's memory changes kept apart from vLLM's memory profiling, between processes on a host.

vLLM sizes its KV cache at start-up from what the GPU's free memory does while it profiles: it
assumes that no other process allocates or frees memory on that GPU meanwhile (vLLM's
gpu_worker: "we assume that the other processes using the same GPU did not change their memory
usage during the profiling"). Where tasks share a GPU (`squeeze run --cluster` with a fraction of
a GPU per task), four engines starting together failed on an H100: "No available memory for the
cache blocks" (the others' allocations counted as this engine's) and "Error in memory profiling"
(one engine's memory freed during another's profiling).

So, per physical GPU, one lock file under the host's temporary directory, locked with POSIX
record locks (fcntl.lockf): held by this process alone and let go when it exits, however it
exits. Not flock: a flock lock belongs to the open file, which a forked child shares, and vLLM
forks its engine core while the exclusive lock is held, so the lock stayed held for the engine's
life and this process's next lock waited on it forever (the H100 main job of 2026-12-07 hung in
its first vLLM evaluation). A forked child inherits no POSIX lock.

- exclusive while a vLLM engine starts (`exclusive`): it profiles then; shared where the engine's
  KV cache has a fixed size (vLLM's `kv_cache_memory_bytes`: vLLM then skips sizing it from free
  memory), so engines set so start side by side;
- shared while anything else changes that GPU's memory: a chain of stages, a transformers
  engine from load to close (`shared`, `Hold`), a vLLM engine while it stops and frees its memory.

Engines start one at a time, and never while another process on that GPU allocates or frees;
everything else goes on side by side. Nothing waits on a CPU. Written here because nothing maintained
offers a cross-process reader-writer lock keyed by GPU (filelock has exclusive locks only).
A process never waits on its own POSIX lock, and closing any descriptor of the file lets all of
its locks go: so one descriptor per GPU and process (`_HELD`), which nothing else opens.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
import threading
from pathlib import Path

SHARED, EXCLUSIVE = fcntl.LOCK_SH, fcntl.LOCK_EX
LOCK_DIR_ENV = "SQUEEZE_GPU_LOCK_DIR"  # where the lock files go (default: the temporary directory)


def gpu_ids(device: str, world: int = 1) -> list[str]:
    """The physical GPUs that CUDA devices `device` ("cuda" or "cuda:N") .. +world-1 of this process
    are: entries of CUDA_VISIBLE_DEVICES (as Ray sets it for a task), or the indices themselves."""
    first = int(device.split(":", 1)[1]) if ":" in device else 0
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [v.strip() for v in vis.split(",") if v.strip()] if vis else [str(i) for i in range(first + world)]
    return ids[first:first + max(1, world)]


def lock_path(gpu: str) -> Path:
    d = Path(os.environ.get(LOCK_DIR_ENV) or tempfile.gettempdir())
    return d / f"squeeze-gpu-{re.sub(r'[^A-Za-z0-9_.-]', '_', gpu)}.lock"


def _open(gpu: str) -> int:
    p = lock_path(gpu)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o666)
    with contextlib.suppress(OSError):  # another user's file: keep its mode
        os.fchmod(fd, 0o666)  # other users' processes share the GPU and the lock
    return fd


class _Held:
    """This process's descriptor on one GPU's lock file and how many holds of each kind ride on it:
    holds nest within a process (a transformers engine open while a vLLM engine starts converts
    the shared lock to an exclusive one and back, instead of waiting on itself)."""

    def __init__(self, gpu: str):
        self.fd, self.shared, self.exclusive = _open(gpu), 0, 0


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def _lock(h: _Held, gpu: str, mode: int) -> None:
    """Take `mode` on `gpu`'s lock; where another process holds it, say so on stderr first (a
    wait is otherwise silent, however long)."""
    try:
        fcntl.lockf(h.fd, mode | fcntl.LOCK_NB)
        return
    except OSError:  # EAGAIN or EACCES: held elsewhere
        pass
    if mode == EXCLUSIVE and h.shared:
        # let go of this process's shared hold while it waits, as flock did: two processes that
        # both hold it shared and both want it exclusive would wait on each other (EDEADLK)
        fcntl.lockf(h.fd, fcntl.LOCK_UN)
    print(f"GPU {gpu}: waiting for another process's hold on it (a vLLM engine starting, or GPU memory "
          f"being allocated or freed; lock {lock_path(gpu)}, `lslocks` names the holder)", file=sys.stderr, flush=True)
    fcntl.lockf(h.fd, mode)


def _acquire(gpu: str, mode: int) -> None:
    with _GUARD:
        h = _HELD.get(gpu) or _HELD.setdefault(gpu, _Held(gpu))
        if mode == EXCLUSIVE and not h.exclusive:
            _lock(h, gpu, EXCLUSIVE)  # from shared (ours) too: converted in place, or let go and waited for
        elif mode == SHARED and not (h.shared or h.exclusive):
            _lock(h, gpu, SHARED)
        if mode == EXCLUSIVE:
            h.exclusive += 1
        else:
            h.shared += 1


def _release(gpu: str, mode: int) -> None:
    with _GUARD:
        h = _HELD[gpu]
        if mode == EXCLUSIVE:
            h.exclusive -= 1
        else:
            h.shared -= 1
        if not (h.shared or h.exclusive):
            os.close(h.fd)  # the only descriptor: the lock goes with it
            del _HELD[gpu]
        elif mode == EXCLUSIVE and not h.exclusive:
            fcntl.lockf(h.fd, SHARED)  # back to the shared holds still open here


class Hold:
    """A held lock on the GPUs of `device` until `release` (or the process's end); none on a CPU."""

    def __init__(self, device: str, mode: int, world: int = 1):
        self.mode, self.gpus = mode, []
        if not device.startswith("cuda"):
            return
        try:
            for g in sorted(set(gpu_ids(device, world))):  # one order everywhere: no two processes wait on each other
                _acquire(g, mode)
                self.gpus.append(g)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for g in reversed(self.gpus):
            _release(g, self.mode)
        self.gpus = []


@contextlib.contextmanager
def _held(device: str, mode: int, world: int):
    hold = Hold(device, mode, world)
    try:
        yield
    finally:
        hold.release()


def exclusive(device: str, world: int = 1):
    """Held while a vLLM engine starts on `device`."""
    return _held(device, EXCLUSIVE, world)


def shared(device: str, world: int = 1):
    """Held while work that allocates and frees as it goes runs on `device`."""
    return _held(device, SHARED, world)
