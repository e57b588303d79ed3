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

Losses (compress.distill.losses): forward / reverse KL, Jensen-Shannon, skew KL, with a
temperature, computed in chunks of positions; cross-entropy on the data; MSE between mapped
layers' hidden states through a learned projection where the widths differ. The trainer
(compress.distill.trainer) checkpoints every `save_every` steps under the run's work
directory and a re-run resumes there.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from compress.distill.data import Packed, pack, split
from compress.errors import UserError
from compress.moe import router_names
from compress.stage import Stage, StageContext
from compress.schema import Strict


class LossConfig(Strict):
    kd: float = Field(1.0, ge=0.0, description="weight of the teacher-student divergence on the logits")
    kind: Literal["forward", "reverse", "jsd", "skew"] = Field(
        "forward", description="forward KL(teacher||student), reverse KL(student||teacher), jsd (Jensen-Shannon, "
        "mixture weight beta), skew (KL(teacher || beta teacher + (1-beta) student))")
    temperature: float = Field(1.0, gt=0.0, description="softens both distributions; the loss is scaled by T^2")
    beta: float = Field(0.5, ge=0.0, le=1.0, description="jsd: the teacher's weight in the mixture; skew: alpha")
    ce: float = Field(0.0, ge=0.0, description="weight of cross-entropy on the data's next tokens")
    hidden: float = Field(0.0, ge=0.0, description="weight of MSE between mapped layers' hidden states")
    layer_map: list[Annotated[list[int], Field(min_length=2, max_length=2)]] | None = Field(
        None, description="hidden: [[student_layer, teacher_layer], ...]; default: every student layer to the "
        "teacher layer at the same relative depth")
    chunk: int = Field(1024, gt=0, description="positions per loss chunk (logits never held for more)")


class GeneratedConfig(Strict):
    sequences: int = Field(..., gt=0, description="prompts the teacher continues (their sequences are added to "
                           "the training windows)")
    prompt_len: int = Field(32, gt=0, description="prompt tokens, cut from random training windows")
    new_tokens: int = Field(256, gt=0, description="tokens generated per prompt (fewer where EOS comes first)")
    temperature: float = Field(1.0, ge=0.0, description="0: greedy; else sampled from the full distribution")
    engine: Literal["auto", "vllm", "hf"] = Field("auto", description="auto: vLLM on a GPU where it is installed, "
                                                  "else transformers")


class DataConfig(Strict):
    datasets: list[str] = Field(["wikitext2-valid"], min_length=1, description="built-in names (wikitext2-valid, "
                                "tinyshakespeare, gsm8k, ...), text/.jsonl files or hf:ID, joined")
    seq_len: int = Field(512, gt=1, description="tokens per packed sequence")
    eval_blocks: int = Field(8, ge=0, description="sequences held out for the periodic perplexity")
    generated: GeneratedConfig | None = Field(None, description="sequence-level distillation: add the teacher's own "
                                              "continuations of prompts from the data")


class DistillConfig(Strict):
    teacher: str = Field("base", description="base: the recipe's input model; or a model directory")
    student: Literal["input", "every_other"] = Field(
        "input", description="input: the stage's input model; every_other: the teacher's even-numbered layers")
    loss: LossConfig = Field(default_factory=LossConfig, description="the training objective: divergence from the "
                             "teacher on the logits, cross-entropy, hidden-state MSE")
    data: DataConfig = Field(default_factory=DataConfig, description="the training text, packed into sequences")
    steps: int = Field(100, gt=0, description="optimizer steps")
    batch_size: int = Field(8, gt=0, description="sequences per optimizer step, over all processes")
    grad_accum: int = Field(1, gt=0, description="micro-batches per step, of batch_size / grad_accum sequences each")
    lr: float = Field(1e-4, gt=0.0)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0, description="0: no clipping")
    eval_every: int = Field(50, ge=0, description="held-out perplexity every N steps (0: at the end only)")
    save_every: int = Field(50, ge=0, description="checkpoint every N steps for resume (0: none)")
    gradient_checkpointing: bool = False
    compile: bool = Field(False, description="torch.compile each decoder layer of student and teacher, and the "
                          "loss arithmetic over the vocabulary (fewer, fused kernels: faster on a GPU once "
                          "compiled, a minute or so of compiling first)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on a GPU, fp32 "
                                                      "on the CPU")
    keep_zeros: bool = Field(True, description="recovery training of a pruned artifact: linear layers (and 3-D "
                             "expert weights) with >= 5 % exact zeros keep them (their masks re-applied after every "
                             "step)")
    freeze_router: bool = Field(False, description="mixture-of-experts students: the routers are not trained "
                                "(each token keeps the experts the compressed model picks)")
    sharding: Literal["ddp", "fsdp"] = Field(
        "ddp", description="several processes: ddp (a whole student per GPU) or fsdp (the student's parameters, "
        "gradients and optimizer state split over the GPUs, for students that do not fit one; the teacher stays whole "
        "on each, in bf16)")
    processes: int | Literal["auto"] = Field(
        1, description="processes to train on, one per GPU: 1 trains in this process; N > 1 starts N through "
        "torch's launcher, each training through accelerate on its slice of every batch; auto: every visible GPU")


def teacher_dir(cfg: DistillConfig, ctx: StageContext) -> Path:
    if cfg.teacher == "base":
        if ctx.base_dir is None:
            raise UserError("distill.teacher: base needs the recipe's input model; give a model directory")
        return Path(ctx.base_dir)
    p = Path(cfg.teacher).expanduser()
    if not (p / "config.json").is_file():
        raise UserError(f"distill.teacher: {cfg.teacher}: not a model directory (no config.json)")
    return p


def student_depth(cfg: DistillConfig, n_input: int, n_teacher: int) -> tuple[int, list[int] | None]:
    """(student layers, the teacher layers an every_other student keeps)."""
    if cfg.student == "every_other":
        keep = list(range(0, n_teacher, 2))
        return len(keep), keep
    return n_input, None


def layer_map(cfg: DistillConfig, n_s: int, n_t: int, kept: list[int] | None) -> list[tuple[int, int]]:
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
    n = n_processes(cfg, ctx.device)
    if (cfg.batch_size // cfg.grad_accum) % n:
        raise UserError(f"distill.batch_size: micro-batches of {cfg.batch_size // cfg.grad_accum} sequences do not "
                        f"split over {n} processes")
    n_s, kept = student_depth(cfg, model.config.num_hidden_layers, t_cfg.num_hidden_layers)
    layer_map(cfg, n_s, t_cfg.num_hidden_layers, kept)
    if ctx.tokenizer is not None:
        Packed(pack(ctx.tokenizer, tuple(cfg.data.datasets), cfg.data.seq_len), cfg.batch_size // cfg.grad_accum,
               cfg.data.eval_blocks, ctx.seed)


def _every_other(teacher, kept: list[int]):
    from compress.layerwise import decoder_layers
    from compress.prune.structured.cuts import cut_depth

    student = copy.deepcopy(teacher)
    name, _ = decoder_layers(student)
    cut_depth(student, name, kept)
    return student


def generated(t_dir: Path, cfg: DistillConfig, tokenizer, ctx: StageContext, log=print) -> torch.Tensor | None:
    """The teacher's sequences as training windows (None without data.generated), made once and
    kept in the work directory."""
    if cfg.data.generated is None:
        return None
    from compress.distill.generate import teacher_windows

    train, _ = split(pack(tokenizer, tuple(cfg.data.datasets), cfg.data.seq_len), cfg.data.eval_blocks)
    cache = Path(ctx.work_dir) / "generated.pt" if ctx.work_dir is not None else None
    return teacher_windows(t_dir, train, cfg.data.generated, cfg.data.seq_len, tokenizer.eos_token_id, ctx.device,
                           ctx.seed, cache, log)


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
        student = _every_other(teacher, kept)
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


def _launch(model_dir: Path, t_dir: Path, dtype: str, cfg: DistillConfig, ctx: StageContext, n: int):
    """Train in n processes (compress.distill.worker); the student process 0 wrote, and its figures."""
    import subprocess
    import sys

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


def train_student(student, teacher, cfg: DistillConfig, tokenizer, seed: int, device: str, work_dir: Path | None,
                  extra: torch.Tensor | None = None, progress: bool = True, log=print, on_step=None):
    """(the trained student on the CPU, the run's figures): what one process does, alone or as
    one of several (compress.distill.worker). on_step: the trainer's per-step callback."""
    from compress.distill.trainer import train
    from compress.prune.structured.cuts import size_info

    parts = prepare(student, teacher, cfg, tokenizer, seed, extra)
    student, info = train(parts["student"], teacher, parts["packed"], cfg, work_dir, device, seed, progress,
                          parts["flops_per_token"], parts["student_layers"], parts["teacher_layers"], parts["proj"],
                          log, on_step=on_step)
    if info.get("mfu"):
        info["mfu_linear_layers_only"] = info["mfu"] * parts["linear_flops_per_token"] / parts["flops_per_token"]
    if student is None:  # a sharded run's other processes: process 0 has the gathered student
        return None, {**info, **parts["info"]}
    student = student.to("cpu")
    return student, {**info, **parts["info"], "student_size": size_info(student)}


def apply(model, cfg: DistillConfig, ctx: StageContext):
    from compress.models import load_model

    t_dir = teacher_dir(cfg, ctx)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n = n_processes(cfg, ctx.device)
    extra = generated(t_dir, cfg, ctx.tokenizer, ctx)  # before any process trains: made once, kept for a resume
    if n > 1:
        if ctx.work_dir is None or ctx.model_dir is None:
            raise UserError("distill.processes: several processes need the stage's input on disk and a work directory "
                            "(run it through a recipe)")
        student, info = _launch(Path(ctx.model_dir), t_dir, dtype, cfg, ctx, n)
    else:
        student, info = train_student(model, load_model(t_dir, dtype, "cpu")[0], cfg, ctx.tokenizer, ctx.seed,
                                      ctx.device, ctx.work_dir, extra, ctx.progress)
    info["teacher"] = str(t_dir)
    return student, json.loads(json.dumps(info, default=float))


STAGE = Stage("distill", DistillConfig, apply, "knowledge distillation from a teacher (KL / JS / skew, CE, hidden "
              "MSE), resumable", check)
