"""One process of a multi-process distillation (`processes: N` > 1): started N times by
torch's launcher (`python -m torch.distributed.run --standalone --nproc_per_node N`), each
process builds the same teacher and student from disk, trains (DDP through accelerate, or
FSDP2 with `sharding: fsdp`) on its slice of every global batch (compress.distill.student.train_student,
what a single process runs too), and process 0 writes the student and the run's figures:

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m compress.distill.worker SPEC.json

SPEC.json (written by the stage, compress.distill.launch): config, seed, device, dtype,
generated, teacher, student_dir, tokenizer_dir, work_dir, out_dir. The stage then loads the
student from out_dir as if it had trained it itself: the same recipe on one process or
several, no code changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(spec_path: str) -> None:
    import torch

    from compress.distill.config import DistillConfig
    from compress.distill.student import train_student
    from compress.fsutil import atomic_dir
    from compress.models import load_model, load_tokenizer

    spec = json.loads(Path(spec_path).read_text())
    cfg = DistillConfig.model_validate(spec["config"])
    teacher, _ = load_model(Path(spec["teacher"]), spec["dtype"], "cpu")
    student = None if spec["student_dir"] is None else load_model(Path(spec["student_dir"]), spec["dtype"], "cpu")[0]
    tok = load_tokenizer(Path(spec["tokenizer_dir"]))
    extra = torch.load(spec["generated"]) if spec.get("generated") else None
    student, info = train_student(student, teacher, cfg, tok, spec["seed"], spec["device"], Path(spec["work_dir"]),
                                  extra, log=lambda s: print(s, file=sys.stderr, flush=True))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with atomic_dir(Path(spec["out_dir"])) as tmp:
            student.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "info.json").write_text(json.dumps(info, default=float))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every host's launcher ends once the student is written (nodes > 1)


if __name__ == "__main__":
    main(sys.argv[1])
