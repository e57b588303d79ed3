"""What one training process needs and does, alone or as one of several
(compress.distill.worker): the student (the stage's input model, or a half-depth copy of the
teacher), the layer pairs and projection of the hidden-state loss, the packed data, the model
FLOPs per trained token, and `train_student`, which runs the trainer on them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from compress.distill.config import DistillConfig
from compress.distill.data import Packed, pack
from compress.errors import UserError


def student_depth(cfg: DistillConfig, n_input: int, n_teacher: int) -> tuple[int, list[int] | None]:
    """(student layers, the teacher layers an every_other student keeps)."""
    if cfg.student == "every_other":
        keep = list(range(0, n_teacher, 2))
        return len(keep), keep
    return n_input, None


def layer_map(cfg: DistillConfig, n_s: int, n_t: int, kept: list[int] | None) -> list[tuple[int, int]]:
    """The (student layer, teacher layer) pairs of the hidden-state loss (none without one)."""
    if cfg.loss.hidden == 0:
        return []
    if cfg.loss.layer_map is not None:
        for s, t in cfg.loss.layer_map:
            if not (0 <= s < n_s and 0 <= t < n_t):
                raise UserError(f"distill.loss.layer_map: [{s}, {t}] does not fit a student of {n_s} layers and a "
                                f"teacher of {n_t} (indices from 0)")
        return list(cfg.loss.layer_map)
    if kept is not None:
        return list(enumerate(kept))
    return [(i, round((i + 1) * n_t / n_s) - 1) for i in range(n_s)]


def every_other(teacher, kept: list[int]):
    """A copy of `teacher` holding only its decoder layers `kept`."""
    from compress.layerwise import decoder_layers
    from compress.prune.structured.cuts import cut_depth

    student = copy.deepcopy(teacher)
    name, _ = decoder_layers(student)
    cut_depth(student, name, kept)
    return student


def attention_flops(model, context: int) -> int:
    """Forward FLOPs per token of attention's score and value products over `context` positions:
    2 x 2 x layers x query heads x head width x context, as PaLM counts them (the causal mask's
    skipped half not taken off)."""
    from compress.prune.structured.cuts import head_shape

    heads, _, head_dim = head_shape(model)
    return 4 * model.config.num_hidden_layers * heads * head_dim * context


def prepare(student, teacher, cfg: DistillConfig, tokenizer, seed: int, extra: torch.Tensor | None = None) -> dict:
    """What training needs besides the two models: the student itself (built from the teacher
    for every_other), the packed data, the layer pairs and projection of the hidden loss, the
    model FLOPs per trained token; the same in every process."""
    from compress.prune.structured.cuts import size_info

    n_t = teacher.config.num_hidden_layers
    n_s, kept = student_depth(cfg, student.config.num_hidden_layers if student is not None else n_t, n_t)
    if kept is not None:
        student = every_other(teacher, kept)
    pairs = layer_map(cfg, n_s, n_t, kept)
    proj = None
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    if pairs and d_s != d_t:
        torch.manual_seed(seed)
        proj = torch.nn.Linear(d_s, d_t, bias=False)
    packed = Packed(pack(tokenizer, tuple(cfg.data.datasets), cfg.data.seq_len), cfg.batch_size // cfg.grad_accum,
                    cfg.data.eval_blocks, seed, extra=extra)
    # model FLOPs per trained token (PaLM's count, its appendix B): the student's forward and
    # backward (3x its forward), and the teacher's forward where a loss reads it; each forward is
    # its linear layers' and attention's
    uses = [(student, 3)] + ([(teacher, 1)] if cfg.loss.kd > 0 or pairs else [])
    linear = sum(k * size_info(m)["flops_per_token"] for m, k in uses)
    fpt = linear + sum(k * attention_flops(m, cfg.data.seq_len) for m, k in uses)
    return {"student": student, "packed": packed, "proj": proj, "student_layers": [s for s, _ in pairs],
            "teacher_layers": [t for _, t in pairs], "flops_per_token": fpt, "linear_flops_per_token": linear,
            "info": {"student": cfg.student, "layer_map": pairs or None,
                     "projection": f"{d_s} -> {d_t}" if proj is not None else None,
                     "train_windows": int(packed.train.shape[0]), "held_out_windows": int(packed.held_out.shape[0]),
                     "teacher_windows": int(extra.shape[0]) if extra is not None else 0}}


def train_student(student, teacher, cfg: DistillConfig, tokenizer, seed: int, device: str, work_dir: Path | None,
                  extra: torch.Tensor | None = None, progress: bool = True, log=print, on_step=None):
    """(the trained student on the CPU, the run's figures): what one process does, alone or as
    one of several (compress.distill.worker). on_step: the trainer's per-step callback."""
    from compress.distill.trainer import RunSettings, train  # at call time: tests wrap trainer.train
    from compress.prune.structured.cuts import size_info

    parts = prepare(student, teacher, cfg, tokenizer, seed, extra)
    run = RunSettings(work_dir=work_dir, device=device, seed=seed, progress=progress,
                      flops_per_token=parts["flops_per_token"], student_layers=tuple(parts["student_layers"]),
                      teacher_layers=tuple(parts["teacher_layers"]), log=log)
    student, info = train(parts["student"], teacher, parts["packed"], cfg, run, parts["proj"], on_step=on_step)
    if info.get("mfu"):
        info["mfu_linear_layers_only"] = info["mfu"] * parts["linear_flops_per_token"] / parts["flops_per_token"]
    if student is None:  # a sharded run's other processes: process 0 has the gathered student
        return None, {**info, **parts["info"]}
    student = student.to("cpu")
    return student, {**info, **parts["info"], "student_size": size_info(student)}
