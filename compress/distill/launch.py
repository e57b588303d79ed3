"""Distillation over several processes (`processes: N` > 1): the stage writes a spec of the run
into its work directory, starts N processes of compress.distill.worker through torch's launcher
(`python -m torch.distributed.run --standalone`), streams their output to the terminal and to
work/launch.log, and loads the student that process 0 wrote, with the run's figures.

Several hosts (`nodes: M` > 1): the launcher runs with `--nnodes M` and a c10d rendezvous at the
config's `rendezvous` instead of `--standalone`; the stage's host starts its N processes, and
every other host joins the same run with

    python -m compress.distill.launch <run dir>/work/<stage>/spec.json

which waits for the spec (the run directory must be on storage every host mounts) and starts
that host's N processes. Process 0 of the M x N writes the student; the stage loads it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from compress.distill.config import DistillConfig
from compress.errors import UserError
from compress.fsutil import atomic_write_text
from compress.stage import StageContext


def launch(model_dir: Path, t_dir: Path, dtype: str, cfg: DistillConfig, ctx: StageContext, n: int):
    """Train in n processes (compress.distill.worker); the student process 0 wrote, and its figures."""
    from compress.models import load_model

    work = Path(ctx.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out = work / "student"
    spec = {"config": cfg.model_dump(mode="json"), "seed": ctx.seed, "device": ctx.device, "dtype": dtype,
            "generated": str(work / "generated.pt") if cfg.data.generated is not None else None,
            "teacher": str(t_dir), "student_dir": None if cfg.student == "every_other" else str(model_dir),
            "tokenizer_dir": str(model_dir), "work_dir": str(work), "out_dir": str(out), "processes": n}
    atomic_write_text(work / "spec.json", json.dumps(spec, indent=1))  # whole for a host that joins
    rc = _launch(work / "spec.json", cfg, n, work / "launch.log")
    log = work / "launch.log"
    if rc != 0 or not (out / "info.json").is_file():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise UserError(f"distill: the {n * cfg.nodes}-process run failed (exit {rc}); {log}: {tail}")
    student, _ = load_model(out, dtype, "cpu")
    return student, json.loads((out / "info.json").read_text())


def command(spec: Path, cfg: DistillConfig, n: int) -> list[str]:
    """torch's launcher for this host's `n` processes of the run `spec` describes."""
    where = ["--standalone"] if cfg.nodes == 1 else [
        f"--nnodes={cfg.nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={cfg.rendezvous}",
        f"--rdzv_id=squeeze-{hashlib.sha256(str(spec.resolve()).encode()).hexdigest()[:12]}"]  # the same on every host
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc_per_node={n}",
            "-m", "compress.distill.worker", str(spec)]


def _launch(spec: Path, cfg: DistillConfig, n: int, log: Path) -> int:
    """Run the launcher, its output to the terminal and to `log`; its exit code."""
    cmd = command(spec, cfg, n)
    with open(log, "ab") as f:  # the processes' output (process 0's progress bar) to the terminal and the log
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while chunk := proc.stdout.read1(65536):
                f.write(chunk)
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        finally:
            rc = proc.wait()
    return rc


def join(spec: Path, wait_s: float = 600.0) -> int:
    """This host's processes of a several-host run another host's stage started (module docstring)."""
    deadline = time.monotonic() + wait_s
    while not spec.is_file():
        if time.monotonic() > deadline:
            raise UserError(f"{spec}: no run appeared within {wait_s:.0f} s; start the recipe on the first host, and "
                            "put its run directory on storage this host mounts")
        time.sleep(1.0)
    s = json.loads(spec.read_text())
    cfg = DistillConfig.model_validate(s["config"])
    return _launch(spec, cfg, s["processes"], spec.parent / f"launch-{socket.gethostname()}-{os.getpid()}.log")


if __name__ == "__main__":
    sys.exit(join(Path(sys.argv[1])))
