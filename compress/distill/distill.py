"""Knowledge distillation as a stage: a frozen teacher teaches the stage's input model (or a
smaller copy of the teacher) on packed text, and the trained student is the stage's output, a
normal HF checkpoint that later stages take (prune -> distil -> quantize).

    - type: distill
      teacher: base            # the recipe's input model (default), or a model directory
      student: input           # the previous stage's output (default); every_other: the
                               # teacher's even layers (a half-depth copy)
      loss: {kd: 1.0, kind: forward, temperature: 1.0, ce: 0.0, hidden: 0.0}
      data: {datasets: [wikitext2-valid], seq_len: 512, eval_blocks: 8}
      steps: 200
      batch_size: 8
      lr: 1.0e-4

This module holds the stage: `check` (every refusal before any work), `apply` (the teacher's
generated sequences where asked, then training in this process or in several) and `STAGE`.
The schema is compress.distill.config; what a training process does, compress.distill.student;
losses (forward / reverse KL, Jensen-Shannon, skew KL, cross-entropy, hidden-state MSE),
compress.distill.losses. The trainer (compress.distill.trainer) checkpoints every `save_every`
steps under the run's work directory and a re-run resumes there.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from compress.distill.config import DistillConfig
from compress.distill.data import Packed, pack, split
from compress.distill.launch import launch
from compress.distill.student import layer_map, student_depth, train_student
from compress.errors import UserError
from compress.moe import router_names
from compress.stage import Stage, StageContext


def teacher_dir(cfg: DistillConfig, ctx: StageContext) -> Path:
    """The teacher's model directory: the recipe's input model (base) or the one named."""
    if cfg.teacher == "base":
        if ctx.base_dir is None:
            raise UserError("distill.teacher: base needs the recipe's input model; give a model directory")
        return Path(ctx.base_dir)
    p = Path(cfg.teacher).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"distill.teacher: {cfg.teacher}: not a model directory (no config.json)")
    return p


def _vocab_check(student_cfg, teacher_cfg, student_tok, t_dir: Path) -> None:
    from compress.models import load_tokenizer

    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise UserError(f"distill.teacher: {t_dir} has a vocabulary of {teacher_cfg.vocab_size} and the student "
                        f"{student_cfg.vocab_size}; teacher and student must share a tokenizer")
    if student_tok is not None:
        try:
            t_tok = load_tokenizer(t_dir)
        except Exception as e:  # noqa: BLE001 - reported as the user's problem, in one line
            raise UserError(f"distill.teacher: {t_dir}: no tokenizer loads ({type(e).__name__})") from None
        if t_tok.get_vocab() != student_tok.get_vocab():
            raise UserError(f"distill.teacher: {t_dir}'s tokenizer differs from the student's; teacher and student "
                            "must share a tokenizer")


def n_processes(cfg: DistillConfig, device: str) -> int:
    """How many processes train, checked against the GPUs visible and any accelerate
    configuration file (whose num_processes must agree: it is what `accelerate launch` would use)."""
    gpu = device.startswith("cuda")
    visible = torch.cuda.device_count() if gpu else 0
    n = (visible or 1) if cfg.processes == "auto" else cfg.processes
    if n < 1:
        raise UserError(f"distill.processes: {n}; give a positive count or auto")
    if gpu and n > visible:
        raise UserError(f"distill.processes: {n} processes need {n} GPUs; {visible} visible")
    if n > 1:
        from accelerate.commands.config import default_config_file

        f = Path(default_config_file)
        if f.is_file():
            import yaml

            want = (yaml.safe_load(f.read_text()) or {}).get("num_processes")
            if want is not None and int(want) != n:
                raise UserError(f"distill.processes: {n}, but the accelerate configuration {f} says num_processes: "
                                f"{want}; make them agree (or remove that file)")
    return n


def check(cfg: DistillConfig, model, ctx: StageContext) -> None:
    """Refuse, in one line and before any work, what the stage cannot train."""
    from transformers import AutoConfig

    from compress.export.compressed_tensors import quantization_config

    q = quantization_config(ctx.model_dir) if ctx.model_dir is not None else None
    if q:
        raise UserError(f"distill: {ctx.model_dir} is quantized ({q.get('format', '?')}); distil before quantizing")
    t_dir = teacher_dir(cfg, ctx)
    t_cfg = AutoConfig.from_pretrained(t_dir)
    _vocab_check(model.config, t_cfg, ctx.tokenizer, t_dir)
    if cfg.freeze_router and not router_names(model):
        raise UserError(f"distill.freeze_router: {type(model).__name__} has no mixture-of-experts routers, so it does "
                        "nothing there; remove it")
    if cfg.batch_size % cfg.grad_accum:
        raise UserError(f"distill.grad_accum: {cfg.grad_accum} does not divide batch_size {cfg.batch_size}")
    if cfg.sharding == "fsdp" and cfg.compile:
        raise UserError("distill.compile: not with sharding: fsdp (compiling sharded layers is not supported here); "
                        "choose one")
    gen = cfg.data.generated
    if gen is not None:
        from compress.distill.generate import engine_for

        if engine_for(gen.engine, ctx.device) == "vllm" and importlib.util.find_spec("vllm") is None:
            raise UserError("distill.data.generated.engine: vllm is not installed; use hf or auto")
    n = n_processes(cfg, ctx.device) * cfg.nodes
    if (cfg.batch_size // cfg.grad_accum) % n:
        raise UserError(f"distill.batch_size: micro-batches of {cfg.batch_size // cfg.grad_accum} sequences do not "
                        f"split over {n} processes")
    n_s, kept = student_depth(cfg, model.config.num_hidden_layers, t_cfg.num_hidden_layers)
    layer_map(cfg, n_s, t_cfg.num_hidden_layers, kept)
    if ctx.tokenizer is not None:
        Packed(pack(ctx.tokenizer, tuple(cfg.data.datasets), cfg.data.seq_len), cfg.batch_size // cfg.grad_accum,
               cfg.data.eval_blocks, ctx.seed)


def generated(t_dir: Path, cfg: DistillConfig, tokenizer, ctx: StageContext, log=print) -> torch.Tensor | None:
    """The teacher's sequences as training windows (None without data.generated), made once
    through ctx.open_engine and kept in the work directory."""
    if cfg.data.generated is None:
        return None
    from compress.distill.generate import teacher_windows

    train, _ = split(pack(tokenizer, tuple(cfg.data.datasets), cfg.data.seq_len), cfg.data.eval_blocks)
    cache = Path(ctx.work_dir) / "generated.pt" if ctx.work_dir is not None else None
    return teacher_windows(t_dir, train, cfg.data.generated, cfg.data.seq_len, tokenizer.eos_token_id, ctx.device,
                           ctx.seed, cache, log, open_engine=ctx.open_engine)


def apply(model, cfg: DistillConfig, ctx: StageContext):
    """(the trained student, the run's figures), trained in this process or in `processes`."""
    from compress.models import load_model

    t_dir = teacher_dir(cfg, ctx)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n = n_processes(cfg, ctx.device)
    extra = generated(t_dir, cfg, ctx.tokenizer, ctx)  # before any process trains: made once, kept for a resume
    if n > 1 or cfg.nodes > 1:
        if ctx.work_dir is None or ctx.model_dir is None:
            raise UserError("distill.processes: several processes need the stage's input on disk and a work directory "
                            "(run it through a recipe)")
        student, info = launch(Path(ctx.model_dir), t_dir, dtype, cfg, ctx, n)
    else:
        student, info = train_student(model, load_model(t_dir, dtype, "cpu")[0], cfg, ctx.tokenizer, ctx.seed,
                                      ctx.device, ctx.work_dir, extra, ctx.progress)
    info["teacher"] = str(t_dir)
    return student, json.loads(json.dumps(info, default=float))


STAGE = Stage("distill", DistillConfig, apply, "knowledge distillation from a teacher (KL / JS / skew, CE, hidden "
              "MSE), resumable", check)
