"""How the trainer spreads one run over its processes: `Replicated` (one process, or DDP
through accelerate: the student whole in every process) or `Sharded` (`distill.sharding: fsdp`
with several processes, for students that do not fit one GPU). The trainer calls the same
methods on either: prepare, the micro-batch sync, gradient clipping, the keep-zeros masks,
checkpoint save and load, and the trained student at the end.

Sharded: torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) splits the student (with the
hidden loss's projection) over the processes: each decoder layer is one unit, the rest
(embeddings, final norm, LM head, projection) the root unit, so each process holds 1/N of the
parameters, gradients and optimizer state and gathers one layer at a time. The teacher is not
sharded: it runs forward only and is held whole on each GPU in bf16.

Why fully_shard and not accelerate's FSDP plugin: accelerate enables FSDP only on GPUs (with
`cpu=True` it silently falls back to DDP), and this repository's tests run on CPUs over gloo.
fully_shard runs on both, so the one code path the GPUs use is the one the tests exercise. The
rest of the trainer (autocast, process group, process index) stays with accelerate.

Sharded checkpoints are torch.distributed.checkpoint (DCP) directories written by every
process (its shards of the model and optimizer), plus one file per process with the scheduler
and RNG states; the student that leaves the stage is gathered whole on process 0.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import torch

SHARDED = "sharded"  # a sharded checkpoint's DCP directory (its model and optimizer shards)


def is_sharded_checkpoint(directory: Path) -> bool:
    """Whether the checkpoint `directory` was written by `Sharded` (else by `Replicated`)."""
    return (directory / SHARDED).is_dir()


class Replicated:
    """One process, or DDP through accelerate (every process holds the whole student)."""

    sharded = False

    def __init__(self, acc):
        self.acc = acc

    def prepare(self, pair, opt, sched):
        """(the module to call, the optimizer to step)."""
        self.pair, opt = self.acc.prepare(pair, opt)
        self.acc.register_for_checkpointing(sched)  # stepped once per optimizer step, on any number of processes
        self.bare = self.acc.unwrap_model(self.pair)  # Pair itself, for evaluation outside DDP
        return self.pair, opt

    def mask(self, weight, mask: torch.Tensor):
        return mask.to(self.acc.device)

    def sync(self, last: bool):
        """Around a micro-batch: gradients reduced only after the last one of a step."""
        return contextlib.nullcontext() if last else self.acc.no_sync(self.pair)

    def clip(self, params, max_norm: float) -> None:
        self.acc.clip_grad_norm_(params, max_norm)

    def save(self, directory: Path) -> None:
        self.acc.save_state(str(directory), safe_serialization=True)

    def load(self, directory: Path) -> None:
        self.acc.load_state(str(directory))

    def trained_student(self):
        return self.bare.student


class Sharded:
    """FSDP2 over the accelerate processes (see the module docstring)."""

    sharded = True

    def __init__(self, acc, bf16: bool):
        self.acc, self.bf16 = acc, bf16

    def prepare(self, pair, opt, sched):
        """`pair` was sharded (`shard`) before the optimizer was built on its shards."""
        self.pair = self.bare = pair
        self.opt, self.sched = opt, sched
        return pair, opt

    def shard(self, pair) -> None:
        """Shard `pair` (the trainer's Pair: .student and .proj) in place. fully_shard moves each
        unit's tensors to the mesh's device as it shards them, so a student larger than one GPU
        never sits on one whole."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from compress.layerwise import decoder_layers

        mesh = init_device_mesh(self.acc.device.type, (self.acc.num_processes,))
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16
              else MixedPrecisionPolicy())
        for layer in decoder_layers(pair.student)[1]:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(pair, mesh=mesh, mp_policy=mp)

    def mask(self, weight, mask: torch.Tensor):
        """`mask` (whole, the same on every process) split as `weight`'s shards are."""
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(mask.to(weight.device_mesh.device_type), weight.device_mesh, weight.placements)

    def sync(self, last: bool):
        self.pair.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip(self, params, max_norm: float) -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)  # over the whole model's (sharded) gradients

    def save(self, directory: Path) -> None:
        """Every process writes its shards (collective) and its scheduler and RNG states."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.pair, self.opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / SHARDED))
        torch.save({"scheduler": self.sched.state_dict(), "rng": _rng_state()},
                   directory / f"process_{self.acc.process_index}.pt")

    def load(self, directory: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.pair, self.opt)  # the shapes to fill (optimizer state initialized)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(directory / SHARDED))
        set_state_dict(self.pair, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        own = directory / f"process_{self.acc.process_index}.pt"  # absent when resumed on more processes
        extra = torch.load(own if own.is_file() else directory / "process_0.pt", weights_only=False)
        self.sched.load_state_dict(extra["scheduler"])
        if own.is_file():
            _set_rng_state(extra["rng"])

    def trained_student(self):
        """The trained student whole, as a plain module on the CPU, on process 0 (None
        elsewhere); every process must call it (the gather is collective)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.pair, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.acc.is_main_process:
            return None
        sharded = self.pair.student
        sd = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
        plain = type(sharded)(sharded.config).to(next(iter(sd.values())).dtype)  # the dtype it was trained in
        missing, unexpected = plain.load_state_dict(sd, strict=False)
        plain.tie_weights()
        tied = set(getattr(plain, "_tied_weights_keys", None) or ())  # e.g. lm_head.weight, the embeddings' own
        if unexpected or set(missing) - tied:
            raise RuntimeError(f"distill: gathering the sharded student: missing {missing}, unexpected {unexpected}")
        return plain


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
