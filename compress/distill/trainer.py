"""The distillation trainer: a student learns from a frozen teacher on packed text.

Runs through accelerate, in one process or in each of several that the stage starts through
torch's launcher (each reading its slice of every global batch; DDP, or FSDP2 with
`sharding: fsdp`: compress.distill.parallel), with bf16 autocast on a GPU, gradient
accumulation, a cosine schedule with warmup, optional gradient checkpointing, a periodic
held-out perplexity, and a checkpoint every `save_every` steps: model, optimizer, scheduler
and RNG states (accelerate's save_state, or sharded), plus the step. The batch of a step is a
pure function of (seed, step) (compress.distill.data), so a run killed after a checkpoint
resumes exactly where it was and ends as an uninterrupted run would (tests compare the weights).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from pathlib import Path

import torch

from compress.distill.parallel import Replicated, Sharded, is_sharded_checkpoint
from compress.distill.data import Packed
from compress.fsutil import atomic_write_text
from compress.distill.losses import chunked_losses, head_losses, hidden_mse
from compress.errors import UserError
from compress.layerwise import decoder_layers
from compress.moe import is_fused_experts, router_names

# dense bf16 tensor-core peaks (FLOP/s) for model-FLOPs utilization; other devices report none
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


@contextlib.contextmanager
def layer_outputs(model, idx: list[int]):
    """{layer index: its output hidden states} for the decoder layers `idx`, filled by the next
    forward pass (hooks on the layers themselves: transformers' output_hidden_states gives the
    last layer's output after the final norm, the others before it)."""
    got: dict[int, torch.Tensor] = {}
    if not idx:
        yield got
        return
    _, layers = decoder_layers(model)

    def hook(i):
        return lambda mod, args, out: got.__setitem__(i, out[0] if isinstance(out, tuple) else out)

    handles = [layers[i].register_forward_hook(hook(i)) for i in idx]
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


class Pair(torch.nn.Module):
    """The student and, where hidden widths differ, its learned projections: the module that
    is trained (and wrapped for data parallelism), returning the loss parts of one batch."""

    def __init__(self, student, proj: torch.nn.Module | None, student_layers: list[int], loss_cfg,
                 compiled: bool = False):
        super().__init__()
        self.student, self.proj, self.layers, self.cfg = student, proj, student_layers, loss_cfg
        self.compiled = compiled  # the output layer's loss arithmetic through torch.compile

    def forward(self, ids: torch.Tensor, t_final: torch.Tensor | None = None, t_states: list[torch.Tensor] = (),
                head_t: torch.nn.Module | None = None, ce_only: bool = False) -> dict:
        """The loss parts of one batch; ce_only: {ce: summed next-token cross-entropy, n: tokens}
        (the held-out perplexity, through this module so that a sharded student is gathered)."""
        c = self.cfg
        if ce_only:
            return _ce_sum(self.student, ids, c.chunk)
        with layer_outputs(self.student, self.layers) as got:
            h = self.student.base_model(ids[:, :-1], use_cache=False).last_hidden_state
        labels = ids[:, 1:].reshape(-1)
        n = (labels >= 0).sum().clamp_min(1).float()  # a tensor: no host sync
        loss, kd, ce = head_losses(h.reshape(-1, h.shape[-1]), None if t_final is None or c.kd <= 0 else
                                   t_final.reshape(-1, t_final.shape[-1]), labels,
                                   self.student.get_output_embeddings(), head_t, c.kd / n, c.ce / n, kind=c.kind,
                                   temperature=c.temperature, beta=c.beta, chunk=c.chunk, want_ce=c.ce > 0,
                                   compiled=self.compiled)
        parts = {"kd": kd / n, "ce": ce / n}
        if self.layers:
            parts["hidden"] = hidden_mse([got[i] for i in self.layers], t_states, self.proj)
            loss = loss + c.hidden * parts["hidden"]
        parts["loss"] = loss
        return parts


def _teacher(teacher, ids: torch.Tensor, teacher_layers: list[int]):
    with torch.no_grad(), layer_outputs(teacher, teacher_layers) as got:
        h = teacher.base_model(ids[:, :-1], use_cache=False).last_hidden_state
    return h, [got[i] for i in teacher_layers]


def _ce_sum(model, ids: torch.Tensor, chunk: int) -> dict:
    h = model.base_model(ids[:, :-1], use_cache=False).last_hidden_state
    _, ce, n = chunked_losses(h.reshape(-1, h.shape[-1]), None, ids[:, 1:].reshape(-1), model.get_output_embeddings(),
                              None, want_kd=False, want_ce=True, chunk=chunk)
    return {"ce": ce, "n": n}


@torch.no_grad()
def held_out_perplexity(ce_of, module: torch.nn.Module, windows: torch.Tensor, device, autocast,
                        batch_size: int = 4) -> float | None:
    """exp(mean next-token cross-entropy) over the held-out windows; ce_of(ids) -> {ce, n}
    computes it for one batch (`module` is put in eval mode meanwhile)."""
    if windows.shape[0] == 0:
        return None
    was = module.training
    module.eval()
    ce_sum, n_sum = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        with autocast():
            r = ce_of(windows[i:i + batch_size].to(device))
        ce_sum, n_sum = ce_sum + float(r["ce"]), n_sum + r["n"]
    module.train(was)
    return math.exp(ce_sum / max(1, n_sum))


def latest_checkpoint(work: Path) -> Path | None:
    """The newest whole checkpoint: `ckpt`, or, after a kill in the middle of replacing it, the
    new one still named `ckpt.tmp` (whole once its step.json exists) or the old `ckpt.old`."""
    whole = [d for d in (work / "ckpt", work / "ckpt.tmp", work / "ckpt.old") if (d / "step.json").is_file()]
    return max(whole, key=lambda d: json.loads((d / "step.json").read_text())["step"], default=None)


def _save(acc, step: int, work: Path, extra: dict, write) -> None:
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


def sparsity_masks(model, min_zeros: float = 0.05) -> dict[str, torch.Tensor]:
    """{parameter name: weight != 0} for the weight matrices (linear layers' weights, a mixture-of-
    experts layer's 3-D expert weights) that are at least `min_zeros` exact zeros (a pruned
    artifact): recovery training keeps those zeros."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            params = [("weight", m.weight)]
        elif is_fused_experts(m):
            params = [(n, p) for n, p in m.named_parameters(recurse=False) if p.dim() == 3]
        else:
            continue
        for pname, p in params:
            mask = p != 0
            if 1 - mask.float().mean().item() >= min_zeros:
                out[f"{name}.{pname}" if name else pname] = mask
    return out


def freeze_routers(model) -> int:
    """Stop training the routers of a mixture-of-experts student; returns how many."""
    names = router_names(model)
    for n in names:
        model.get_submodule(n).requires_grad_(False)
    return len(names)


def train(student, teacher, packed: Packed, cfg, work_dir: Path | None, device: str, seed: int,
          progress: bool = True, flops_per_token: float | None = None, student_layers: list[int] = (),
          teacher_layers: list[int] = (), proj: torch.nn.Module | None = None, log=print,
          on_step=None) -> tuple[torch.nn.Module | None, dict]:
    """Train `student` for cfg.steps optimizer steps: (the trained student, the run's figures).
    With DDP (or one process) the student is trained in place and returned; sharded
    (cfg.sharding fsdp, several processes) it is gathered whole and returned on process 0 only
    (None on the others). on_step(step): called after each optimizer step (and its checkpoint),
    for tests."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    on_gpu = device.startswith("cuda")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and on_gpu)
    acc = Accelerator(cpu=not on_gpu, mixed_precision="bf16" if bf16 else "no")
    set_seed(seed)
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
    pair = Pair(student, proj, list(student_layers), cfg.loss, compiled=cfg.compile)
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
    runs_teacher = head_t is not None or bool(teacher_layers)  # plain CE training only reads its perplexity

    start, work, saved = 0, Path(work_dir) if work_dir else None, {}
    ckpt = latest_checkpoint(work) if work is not None else None
    if ckpt is not None:
        if par.sharded != is_sharded_checkpoint(ckpt):
            raise UserError(f"distill: the checkpoint {ckpt} was written {'without' if par.sharded else 'with'} "
                            f"sharding: fsdp; resume it with the same processes and sharding, or remove {work} to "
                            "start over")
        par.load(ckpt)
        saved = json.loads((ckpt / "step.json").read_text())
        start = saved["step"]
        log(f"distill: resuming at step {start} of {cfg.steps} from {ckpt}")
    elif work is not None:
        work.mkdir(parents=True, exist_ok=True)

    bare = par.bare  # the Pair outside DDP; a sharded student is only run through it, its root
    masked = [(w, par.mask(w, m)) for w, m in ((bare.student.get_parameter(n), m) for n, m in masks.items())]
    ppl = saved["held_out_perplexity"] if start else {"start": None, "end": None, "teacher": None}
    curve: list[dict] = saved["curve"] if start else []

    def student_ppl():
        return held_out_perplexity(lambda ids: bare(ids, ce_only=True), bare, packed.held_out, acc.device,
                                   acc.autocast)

    if start == 0:
        ppl["start"] = student_ppl()
        ppl["teacher"] = held_out_perplexity(lambda ids: _ce_sum(teacher, ids, cfg.loss.chunk), teacher,
                                             packed.held_out, acc.device, acc.autocast)
    tokens_step, ga = packed.tokens_per_step() * cfg.grad_accum, cfg.grad_accum
    bar = tqdm(total=cfg.steps, initial=start, desc="distill", unit="step", disable=not (progress and acc.is_main_process))
    t_run, t_aside, trained, last = time.perf_counter(), 0.0, 0, {}  # t_aside: evaluation and checkpoints
    first = 0.0  # this run's first step (compiling, allocator warm-up): left out of tokens/s when others follow
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        parts_sum: dict[str, torch.Tensor] = {}
        for micro in range(ga):
            ids = packed.batch(step * ga + micro, acc.process_index, acc.num_processes).to(acc.device)
            with par.sync(micro == ga - 1), acc.autocast():
                t_final, t_states = _teacher(teacher, ids, list(teacher_layers)) if runs_teacher else (None, [])
                parts = pair(ids, t_final if head_t is not None else None, t_states, head_t)
                acc.backward(parts["loss"] / ga)
            for k, v in parts.items():  # summed on the device: one host sync per step, not per micro-batch
                parts_sum[k] = parts_sum.get(k, 0.0) + v.detach().float() / ga
        if cfg.max_grad_norm:
            par.clip(params, cfg.max_grad_norm)
        opt.step()
        with torch.no_grad():
            for w, m in masked:
                w.mul_(m)
        sched.step()
        opt.zero_grad(set_to_none=True)
        last = {k: round(float(v), 5) for k, v in parts_sum.items()}
        done, t0 = step + 1, time.perf_counter()
        if step == start and done < cfg.steps:
            first = t0 - t_step
            t_aside += first
        else:
            trained += tokens_step
        if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            p = student_ppl()
            curve.append({"step": done, **last, "held_out_ppl": p})
        if work is not None and cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            _save(acc, done, work, {"held_out_perplexity": ppl, "curve": curve}, par.save)
        t_aside += time.perf_counter() - t0
        secs = time.perf_counter() - t_run - t_aside
        bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{trained / max(secs, 1e-9):,.0f}")
        bar.update(1)
        if on_step is not None:
            on_step(done)
    bar.close()
    secs = time.perf_counter() - t_run - t_aside  # training alone: tokens/s and MFU leave out evaluation,
    # checkpoints and the first step
    ppl["end"] = (curve[-1]["held_out_ppl"] if curve and curve[-1]["step"] == cfg.steps  # measured at the last step
                  else student_ppl())
    tok_s = trained / secs if secs > 0 and trained else None
    peak = peak_flops(acc.device)
    mfu = (tok_s * flops_per_token / (peak * acc.num_processes)) if (tok_s and flops_per_token and peak) else None
    out = par.trained_student()
    if out is not None:
        out.config.use_cache = True
        if cfg.compile:
            for layer in decoder_layers(out)[1]:
                layer._compiled_call_impl = None  # the student leaves as a plain module (nn.Module.compile's field)
        if cfg.gradient_checkpointing:
            out.gradient_checkpointing_disable()
        out.eval()
    return out, {"steps": cfg.steps, "resumed_at": start or None, "tokens_trained_this_run": (cfg.steps - start) * tokens_step,
            "tokens_timed": trained,
            "tokens_per_step": tokens_step, "seconds": round(secs, 2),
            "seconds_first_step": round(first, 2), "seconds_eval_and_checkpoints": round(t_aside - first, 2),
            "tokens_per_s": tok_s,
            "processes": acc.num_processes,
            "sharding": "fsdp" if par.sharded else ("ddp" if acc.num_processes > 1 else None),
            "precision": "bf16 autocast" if bf16 else "fp32",
            "sparse_layers_kept": len(masks), "routers_frozen": frozen,
            "mfu": mfu, "flops_per_token": flops_per_token, "last_losses": last, "curve": curve,
            "held_out_perplexity": ppl}
