"""How a model type's checkpoints name the experts of a mixture-of-experts layer, read from
transformers' conversion mapping (the renaming it applies when loading and reverses when
saving): the per-expert module names (gate_proj / up_proj / down_proj, or Mixtral's w1 / w3 /
w2), the key renamings (Mixtral's `.mlp.` is `.block_sparse_moe.` on disk), and whether
checkpoints keep the experts fused (gpt-oss). compress.moe names the linearized experts with
it; the export and its loader (compress.export) write and read per-expert keys with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointLayout:
    """How a model type's checkpoints name experts, read from transformers' conversion mapping
    (the mapping it applies when loading, and reverses when saving)."""

    proj: dict            # role (gate, up, down) -> per-expert module name: gate_proj / w1, ...
    renames: tuple = ()   # (model substring, checkpoint substring), e.g. ('.mlp.', '.block_sparse_moe.')
    per_expert: bool = True   # False: checkpoints keep the experts fused (gpt-oss)

    def to_checkpoint(self, name: str) -> str:
        for model_part, ckpt_part in self.renames:
            name = name.replace(model_part, ckpt_part)
        return name

    def to_model(self, name: str) -> str:
        for model_part, ckpt_part in self.renames:
            name = name.replace(ckpt_part, model_part)
        return name


_PLAIN = re.compile(r"^[\w.]+$")


def checkpoint_layout(model_type: str | None) -> CheckpointLayout:
    """The per-expert names and key renamings of `model_type`'s checkpoints (defaults where
    transformers has no conversion mapping: gate_proj / up_proj / down_proj, no renaming)."""
    proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping

        mapping = get_checkpoint_conversion_mapping(model_type) if model_type else None
    except ImportError:
        mapping = None
    if not mapping:
        return CheckpointLayout(proj, per_expert=model_type is None)
    renames, per_expert = [], False
    for conv in mapping:
        src, dst = list(conv.source_patterns), list(conv.target_patterns)
        if type(conv).__name__ == "WeightRenaming" and _PLAIN.match(src[0]) and _PLAIN.match(dst[0]):
            renames.append((dst[0], src[0]))
        elif dst and dst[0].endswith(("experts.gate_up_proj", "experts.up_proj", "experts.down_proj")):
            names = [s.split("*.", 1)[-1].rsplit(".weight", 1)[0] for s in src]
            roles = {"experts.gate_up_proj": ("gate", "up"), "experts.up_proj": ("up",),
                     "experts.down_proj": ("down",)}[".".join(dst[0].split(".")[-2:])]
            proj.update(zip(roles, names))
            per_expert = True
    return CheckpointLayout(proj, tuple(renames), per_expert)
