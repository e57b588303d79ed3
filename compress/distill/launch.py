"""Distillation over several processes (`processes: N` > 1): the stage writes a spec of the run
into its work directory, starts N processes of compress.distill.worker through torch's launcher
(`python -m torch.distributed.run --standalone`), streams their output to the terminal and to
work/launch.log, and loads the student that process 0 wrote, with the run's figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from compress.distill.config import DistillConfig
from compress.errors import UserError
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
            "tokenizer_dir": str(model_dir), "work_dir": str(work), "out_dir": str(out)}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    log = work / "launch.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "compress.distill.worker", str(work / "spec.json")]
    with open(log, "ab") as f:  # the processes' output (process 0's progress bar) to the terminal and the log
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            while chunk := proc.stdout.read1(65536):
                f.write(chunk)
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
        finally:
            rc = proc.wait()
    if rc != 0 or not (out / "info.json").is_file():
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise UserError(f"distill: the {n}-process run failed (exit {rc}); {log}: {tail}")
    student, _ = load_model(out, dtype, "cpu")
    return student, json.loads((out / "info.json").read_text())
