"""Sharded training for students that do not fit one GPU (`distill.sharding: fsdp`).

With N > 1 processes, the student (with the hidden loss's projection) is sharded over them by
torch's FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer is one unit, the rest
(embeddings, final norm, LM head, projection) the root unit, so each process holds 1/N of the
parameters, gradients and optimizer state and gathers one layer at a time. The teacher is not
sharded: it runs forward only and is held whole on each GPU in bf16.

Why fully_shard and not accelerate's FSDP plugin: accelerate enables FSDP only on GPUs (with
`cpu=True` it silently falls back to DDP), and this repository's tests run on CPUs over gloo.
fully_shard runs on both, so the one code path the GPUs use is the one the tests exercise. The
rest of the trainer (autocast, process group, process index) stays with accelerate.

Checkpoints are torch.distributed.checkpoint (DCP) directories written by every process (its
shards of the model and optimizer), plus one file per process with the scheduler and RNG
states; the student that leaves the stage is gathered whole on process 0.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch


def shard(pair: torch.nn.Module, device: torch.device, n: int, bf16: bool):
    """Shard `pair` (the trainer's Pair: .student and .proj) in place over n processes.
    fully_shard moves each unit's tensors to the mesh's device as it shards them, so a student
    larger than one GPU never sits on one whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from compress.layerwise import decoder_layers

    mesh = init_device_mesh(device.type, (n,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16
          else MixedPrecisionPolicy())
    for layer in decoder_layers(pair.student)[1]:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(pair, mesh=mesh, mp_policy=mp)
    return mesh


def local_mask(weight, mask: torch.Tensor):
    """`mask` (whole, the same on every process) split as `weight`'s shards are."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask.to(weight.device_mesh.device_type), weight.device_mesh, weight.placements)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save(directory: Path, pair, opt, sched, rank: int) -> None:
    """Every process writes its shards (collective) and its scheduler and RNG states."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(pair, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / "sharded"))
    torch.save({"scheduler": sched.state_dict(), "rng": _rng_state()}, directory / f"process_{rank}.pt")


def load(directory: Path, pair, opt, sched, rank: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(pair, opt)  # the shapes to fill (optimizer state initialized)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory / "sharded"))
    set_state_dict(pair, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = directory / f"process_{rank}.pt"  # absent when resumed on more processes than wrote it
    extra = torch.load(own if own.is_file() else directory / "process_0.pt", weights_only=False)
    sched.load_state_dict(extra["scheduler"])
    if own.is_file():
        _set_rng_state(extra["rng"])


def gather_student(pair, main: bool):
    """The trained student whole, as a plain module on the CPU, on process 0 (None elsewhere);
    every process must call it (the gather is collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(pair, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    sharded = pair.student
    sd = {k.removeprefix("student."): v for k, v in full.items() if k.startswith("student.")}
    plain = type(sharded)(sharded.config).to(next(iter(sd.values())).dtype)  # the dtype it was trained in
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    plain.tie_weights()
    tied = set(getattr(plain, "_tied_weights_keys", None) or ())  # e.g. lm_head.weight, the embeddings' own
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"distill: gathering the sharded student: missing {missing}, unexpected {unexpected}")
    return plain
