"""The distillation trainer: a student learns from a frozen teacher on packed text.

Runs through accelerate, in one process or in each of several that the stage starts through
torch's launcher (each reading its slice of every global batch; DDP, or FSDP2 with
`sharding: fsdp`: compress.distill.parallel), with bf16 autocast on a GPU, gradient
accumulation, a cosine schedule with warmup, optional gradient checkpointing, a periodic
held-out perplexity, and a checkpoint every `save_every` steps: model, optimizer, scheduler
and RNG states (accelerate's save_state, or sharded), plus the step (compress.distill.checkpoint).
The batch of a step is a pure function of (seed, step) (compress.distill.data), so a run killed
after a checkpoint resumes exactly where it was and ends as an uninterrupted run would (tests
compare the weights). The forward passes and the loss of a batch are compress.distill.pair's.

`train` runs in named steps: `_setup` (accelerator, student, optimizer, teacher), `resume`,
the start perplexities, `_steps` (each optimizer step `_step`, then its evaluation and
checkpoint where due), and the figures of the run (`_figures`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from compress.distill.checkpoint import resume, save_checkpoint
from compress.distill.data import Packed
from compress.distill.pair import Pair, ce_sum, freeze_routers, held_out_perplexity, sparsity_masks, teacher_outputs
from compress.distill.parallel import Replicated, Sharded
from compress.layerwise import decoder_layers

# dense bf16 tensor-core peaks (FLOP/s) for model-FLOPs utilization; other devices report none
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


@dataclass(frozen=True)
class RunSettings:
    """What a run needs besides the two models, the data and the stage config. work_dir: its
    checkpoints, where a re-run resumes (None: no checkpoints); flops_per_token: model FLOPs per
    trained token, for the MFU; student_layers / teacher_layers: the hidden loss's layer pairs;
    log: one-line messages (a resume, the zeros kept)."""

    work_dir: Path | None
    device: str
    seed: int
    progress: bool = True
    flops_per_token: float | None = None
    student_layers: tuple[int, ...] = ()
    teacher_layers: tuple[int, ...] = ()
    log: Callable[[str], Any] = print


@dataclass
class _Training:
    """The live objects of one run (built by `_setup`)."""

    cfg: Any  # the stage's DistillConfig
    acc: Any  # the accelerate.Accelerator
    par: Replicated | Sharded
    pair: torch.nn.Module  # what a step calls: Pair, DDP-wrapped or sharded
    opt: torch.optim.Optimizer
    sched: Any
    params: list[torch.nn.Parameter]
    teacher: torch.nn.Module
    head_t: torch.nn.Module | None  # the teacher's output layer, where a loss reads its logits
    teacher_layers: list[int]
    packed: Packed
    bf16: bool
    masks: dict[str, torch.Tensor]  # the zeros kept (by parameter name)
    frozen: int  # routers frozen
    masked: list = field(default_factory=list)  # (weight, its mask as the weight is laid out)

    @property
    def runs_teacher(self) -> bool:
        return self.head_t is not None or bool(self.teacher_layers)  # plain CE training only reads its perplexity

    @property
    def tokens_per_step(self) -> int:
        return self.packed.tokens_per_step() * self.cfg.grad_accum

    def student_ppl(self) -> float | None:
        bare = self.par.bare  # the Pair outside DDP; a sharded student is only run through it, its root
        return held_out_perplexity(lambda ids: bare(ids, ce_only=True), bare, self.packed.held_out, self.acc.device,
                                   self.acc.autocast)

    def teacher_ppl(self) -> float | None:
        return held_out_perplexity(lambda ids: ce_sum(self.teacher, ids, self.cfg.loss.chunk), self.teacher,
                                   self.packed.held_out, self.acc.device, self.acc.autocast)


@dataclass
class _Progress:
    """Where a run stands: the step it started at (a resume's), the held-out perplexities and
    curve (carried in checkpoints), the last step's losses, and its clock: training time alone,
    with evaluation, checkpoints and this run's first step (compiling, allocator warm-up; left
    out only when other steps follow) set aside from tokens/s and MFU."""

    start: int
    ppl: dict
    curve: list[dict]
    last: dict = field(default_factory=dict)
    t_run: float = 0.0
    aside: float = 0.0  # evaluation, checkpoints and the first step
    first: float = 0.0
    trained: int = 0  # tokens of the timed steps

    def seconds(self) -> float:
        return time.perf_counter() - self.t_run - self.aside


def train(student, teacher, packed: Packed, cfg, run: RunSettings, proj: torch.nn.Module | None = None,
          on_step=None) -> tuple[torch.nn.Module | None, dict]:
    """Train `student` for cfg.steps optimizer steps: (the trained student, the run's figures).
    With DDP (or one process) the student is trained in place and returned; sharded
    (cfg.sharding fsdp, several processes) it is gathered whole and returned on process 0 only
    (None on the others). on_step(step): called after each optimizer step (and its checkpoint),
    for tests."""
    t = _setup(student, teacher, packed, cfg, run, proj)
    work = Path(run.work_dir) if run.work_dir else None
    saved = resume(t.par, work, cfg.steps, run.log)
    start = saved.get("step", 0)
    bare = t.par.bare  # the Pair outside DDP (or the sharded root): its parameters by name
    t.masked = [(w, t.par.mask(w, m)) for w, m in ((bare.student.get_parameter(n), m) for n, m in t.masks.items())]
    p = _Progress(start, saved["held_out_perplexity"] if start else {"start": None, "end": None, "teacher": None},
                  saved["curve"] if start else [])
    if start == 0:
        p.ppl["start"] = t.student_ppl()
        p.ppl["teacher"] = t.teacher_ppl()
    _steps(t, run, work, p, on_step)
    secs = p.seconds()  # training alone: tokens/s and MFU leave out evaluation, checkpoints and the first step
    measured = p.curve and p.curve[-1]["step"] == cfg.steps  # the curve's last point is the last step's
    p.ppl["end"] = p.curve[-1]["held_out_ppl"] if measured else t.student_ppl()
    figures = _figures(t, run, p, secs)
    return _finished_student(t.par, cfg), figures


def _setup(student, teacher, packed: Packed, cfg, run: RunSettings, proj) -> _Training:
    """The accelerator (bf16 autocast on a GPU unless fp32 is asked) and the seed, the student
    made ready, the Pair spread over the processes with its AdamW and cosine schedule, and the
    frozen teacher on the device."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    on_gpu = run.device.startswith("cuda")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    acc = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if bf16 else "no")
    set_seed(run.seed)
    masks, frozen = _ready_student(student, teacher, cfg, run.log)
    pair = Pair(student, proj, list(run.student_layers), cfg.loss, compiled=cfg.compile)
    # one process has nothing to shard over
    par = Sharded(acc, bf16) if cfg.sharding == "fsdp" and acc.num_processes > 1 else Replicated(acc)
    if par.sharded:
        par.shard(pair)  # before the optimizer, which then holds the shards
    params = [p for p in pair.parameters() if p.requires_grad]
    # fused: one kernel for the whole update on a GPU (sharded parameters keep the default, multi-tensor)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95),
                            fused=True if on_gpu and not par.sharded else None)
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, cfg.steps)
    pair, opt = par.prepare(pair, opt, sched)
    # frozen: its weights are cast to bf16 once instead of by autocast at every forward pass
    teacher = teacher.to(acc.device, dtype=torch.bfloat16 if bf16 else None).eval().requires_grad_(False)
    head_t = teacher.get_output_embeddings() if cfg.loss.kd > 0 else None
    return _Training(cfg, acc, par, pair, opt, sched, params, teacher, head_t, list(run.teacher_layers), packed,
                     bf16, masks, frozen)


def _ready_student(student, teacher, cfg, log) -> tuple[dict[str, torch.Tensor], int]:
    """The student made ready to train: gradient checkpointing, no KV cache, each decoder layer
    compiled (the teacher's too), its pruned layers' zeros found, its routers frozen; (the masks
    of those zeros, the routers frozen)."""
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.config.use_cache = False
    if cfg.compile:
        for m in (student, teacher):  # per layer (as torchtitan does): one graph serves every layer
            for layer in decoder_layers(m)[1]:
                layer.compile()
    masks = sparsity_masks(student) if cfg.keep_zeros else {}
    if masks:
        log(f"distill: keeping the zeros of {len(masks)} pruned layers")
    frozen = freeze_routers(student) if cfg.freeze_router else 0
    student.train()
    return masks, frozen


def _steps(t: _Training, run: RunSettings, work: Path | None, p: _Progress, on_step) -> None:
    """Optimizer steps p.start .. cfg.steps, each followed by the held-out perplexity and a
    checkpoint where due, the progress bar and on_step(step); p records them."""
    from tqdm.auto import tqdm

    cfg = t.cfg
    bar = tqdm(total=cfg.steps, initial=p.start, desc="distill", unit="step",
               disable=not (run.progress and t.acc.is_main_process))
    p.t_run = time.perf_counter()
    for step in range(p.start, cfg.steps):
        t_step = time.perf_counter()
        p.last = _step(t, step)
        done, t0 = step + 1, time.perf_counter()
        if step == p.start and done < cfg.steps:
            p.first = t0 - t_step
            p.aside += p.first
        else:
            p.trained += t.tokens_per_step
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            p.curve.append({"step": done, **p.last, "held_out_ppl": t.student_ppl()})
        if work is not None and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            save_checkpoint(t.acc, done, work, {"held_out_perplexity": p.ppl, "curve": p.curve}, t.par.save)
        p.aside += time.perf_counter() - t0
        bar.set_postfix(loss=f"{p.last['loss']:.4f}", tok_s=f"{p.trained / max(p.seconds(), 1e-9):,.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(done)
    bar.close()


def _step(t: _Training, step: int) -> dict[str, float]:
    """Optimizer step `step`: cfg.grad_accum micro-batches (gradients reduced after the last),
    clipping, the update, the kept zeros re-applied; its loss parts (means, rounded)."""
    cfg, acc, ga = t.cfg, t.acc, t.cfg.grad_accum
    parts_sum: dict[str, torch.Tensor] = {}
    for micro in range(ga):
        ids = t.packed.batch(step * ga + micro, acc.process_index, acc.num_processes).to(acc.device)
        with t.par.sync(micro == ga - 1), acc.autocast():
            t_final, t_states = teacher_outputs(t.teacher, ids, t.teacher_layers) if t.runs_teacher else (None, [])
            parts = t.pair(ids, t_final if t.head_t is not None else None, t_states, t.head_t)
            acc.backward(parts["loss"] / ga)
        for k, v in parts.items():  # summed on the device: one host sync per step, not per micro-batch
            parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float() / ga
    if cfg.max_grad_norm:
        t.par.clip(t.params, cfg.max_grad_norm)
    t.opt.step()
    with torch.no_grad():
        for w, m in t.masked:
            w.mul_(m)
    t.sched.step()
    t.opt.zero_grad(set_to_none=True)
    return {k: round(float(v), 5) for k, v in parts_sum.items()}


def _figures(t: _Training, run: RunSettings, p: _Progress, secs: float) -> dict:
    """The run's figures (the stage's info): steps and tokens, seconds, tokens/s and MFU of the
    timed steps, processes and precision, what was kept or frozen, the losses and perplexities."""
    cfg, acc, fpt = t.cfg, t.acc, run.flops_per_token
    tok_s = p.trained / secs if secs > 0 and p.trained else None
    peak = peak_flops(acc.device)
    mfu = (tok_s * fpt / (peak * acc.num_processes)) if (tok_s and fpt and peak) else None
    return {"steps": cfg.steps, "resumed_at": p.start or None,
            "tokens_trained_this_run": (cfg.steps - p.start) * t.tokens_per_step, "tokens_timed": p.trained,
            "tokens_per_step": t.tokens_per_step, "seconds": round(secs, 2),
            "seconds_first_step": round(p.first, 2), "seconds_eval_and_checkpoints": round(p.aside - p.first, 2),
            "tokens_per_s": tok_s, "processes": acc.num_processes,
            "sharding": "fsdp" if t.par.sharded else ("ddp" if acc.num_processes > 1 else None),
            "precision": "bf16 autocast" if t.bf16 else "fp32",
            "sparse_layers_kept": len(t.masks), "routers_frozen": t.frozen,
            "mfu": mfu, "flops_per_token": fpt, "last_losses": p.last, "curve": p.curve,
            "held_out_perplexity": p.ppl}


def _finished_student(par, cfg):
    """The trained student as a plain module in eval mode, its KV cache back on (None on a
    sharded run's other processes; every process must call this: the gather is collective)."""
    out = par.trained_student()
    if out is not None:
        out.config.use_cache = True
        if cfg.compile:
            for layer in decoder_layers(out)[1]:
                layer._compiled_call_impl = None  # the student leaves as a plain module (nn.Module.compile's field)
        if cfg.gradient_checkpointing:
            out.gradient_checkpointing_disable()
        out.eval()
    return out
