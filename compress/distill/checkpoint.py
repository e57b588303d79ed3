"""The distillation trainer's checkpoints in the stage's work directory: written atomically as
work/ckpt (model, optimizer, scheduler and RNG states through the parallel strategy's `save`,
then step.json, which marks it whole), found again after a kill at any point, and loaded on a
resume only with the sharding that wrote it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from compress.distill.parallel import is_sharded_checkpoint
from compress.errors import UserError
from compress.fsutil import atomic_write_text


def latest_checkpoint(work: Path) -> Path | None:
    """The newest whole checkpoint: `ckpt`, or, after a kill in the middle of replacing it, the
    new one still named `ckpt.tmp` (whole once its step.json exists) or the old `ckpt.old`."""
    whole = [d for d in (work / "ckpt", work / "ckpt.tmp", work / "ckpt.old") if (d / "step.json").is_file()]
    return max(whole, key=lambda d: json.loads((d / "step.json").read_text())["step"], default=None)


def save_checkpoint(acc, step: int, work: Path, extra: dict, write) -> None:
    """Checkpoint atomically as work/ckpt (the previous one is replaced only once this one is
    whole); write(directory) runs in every process (Replicated.save or Sharded.save)."""
    tmp, final = work / "ckpt.tmp", work / "ckpt"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    write(tmp)
    acc.wait_for_everyone()  # every process has written its RNG states before the directory moves
    if acc.is_main_process:
        atomic_write_text(tmp / "step.json", json.dumps({"step": step, **extra}))  # last: marks the checkpoint whole
        old = work / "ckpt.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()


def resume(par, work: Path | None, steps: int, log) -> dict:
    """Load the newest whole checkpoint in `work` into `par` (Replicated or Sharded) and return
    its step.json ({} when there is none: the run starts at step 0 in a new `work`)."""
    ckpt = latest_checkpoint(work) if work is not None else None
    if ckpt is None:
        if work is not None:
            work.mkdir(parents=True, exist_ok=True)
        return {}
    if par.sharded != is_sharded_checkpoint(ckpt):
        raise UserError(f"distill: the checkpoint {ckpt} was written {'without' if par.sharded else 'with'} "
                        f"sharding: fsdp; resume it with the same processes and sharding, or remove {work} to "
                        "start over")
    par.load(ckpt)
    saved = json.loads((ckpt / "step.json").read_text())
    log(f"distill: resuming at step {saved['step']} of {steps} from {ckpt}")
    return saved

