"""What the weight-only quantization stages (rtn, gptq) share: the config fields, the checks
made before any work, and the record-keeping from solved weights to the export.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from compress.engine_facts import W4A8, WeightOnlyInt, engine_problems
from compress.errors import UserError
from compress.export.compressed_tensors import ActScheme, QuantRecord, WeightScheme, refuse_quantized
from compress.moe import expert_index
from compress.select import select_linears
from compress.stage import StageContext
from compress.schema import Strict


class WeightQuantConfig(Strict):
    bits: Literal[4, 8] = Field(4, description="weight bits (activations stay 16-bit: W4A16 / W8A16)")
    group_size: Literal[-1, 32, 64, 128] = Field(128, description="input channels sharing one scale; -1 = one "
                                                 "scale per output channel")
    symmetric: bool = Field(False, description="false stores a zero point per group (more accurate; vLLM runs 4-bit "
                            "ones faster, 8-bit ones on H100/H200 only where every layer's output width divides "
                            "by 128); true: symmetric grid, no zero point")
    targets: list[str] = Field(default_factory=lambda: ["*"], description="module-name globs of nn.Linear layers "
                               "to quantize")
    ignore: list[str] = Field(default_factory=lambda: ["lm_head"], description="module-name globs left in "
                              "16 bits (lm_head by default)")
    group_fallback: bool = Field(False, description="where group_size does not divide a layer's input width, "
                                 "use the largest of 64, 32 that does (recorded per layer) instead of refusing")
    activations: Literal["none", "fp8"] = Field(
        "none", description="none: 16-bit activations (W4A16); fp8: FP8 activations scaled per token at run time "
        "(W4A8: vLLM's CUTLASS W4A8 kernel on H100/H200; needs bits 4, group_size 128, symmetric)")

    @model_validator(mode="after")
    def _w4a8_layout(self):
        if self.activations == "fp8":
            wrong = [f"{k} {getattr(self, k)}" for k, v in (("bits", 4), ("group_size", 128), ("symmetric", True))
                     if getattr(self, k) != v]
            if wrong or self.group_fallback:
                raise ValueError("activations: fp8 (W4A8) takes int4 weights, symmetric, in groups of 128 (the one "
                                 f"layout vLLM's W4A8 kernel runs); got {', '.join(wrong) or 'group_fallback'}")
        return self

    def group_for(self, in_features: int) -> int | None:
        """The group size used for a layer of this input width (None: no valid choice)."""
        if self.group_size == -1 or in_features % self.group_size == 0:
            return self.group_size
        if self.group_fallback:
            return next((g for g in (64, 32) if g < self.group_size and in_features % g == 0), None)
        return None

    def scheme(self, in_features: int, actorder: str | None = None) -> WeightScheme:
        acts = ActScheme(type="float", dynamic=True) if self.activations == "fp8" else None
        return WeightScheme(self.bits, self.group_for(in_features), self.symmetric, actorder, input_acts=acts)


def check_weight_quant(cfg: WeightQuantConfig, model: torch.nn.Module, ctx: StageContext, stage: str,
                       actorder: str | None = None) -> list[str]:
    """Checks before any work; returns the module names to quantize."""
    refuse_quantized(ctx.model_dir, stage)
    names = select_linears(model, cfg.targets, cfg.ignore, stage)
    widths = {n: model.get_submodule(n).in_features for n in names}
    bad = [(n, w) for n, w in widths.items() if cfg.group_for(w) is None]
    if bad:
        hint = "" if cfg.group_fallback else "; set group_fallback: true to use 64 or 32 there"
        raise UserError(*(f"{stage}.group_size: {cfg.group_size} does not divide the input width {w} of {n}{hint}"
                          for n, w in bad[:5]), *([f"{stage}.group_size: ... and {len(bad) - 5} more layers"]
                                                  if len(bad) > 5 else []))
    if cfg.activations == "fp8" and actorder == "group":
        raise UserError(f"{stage}.actorder: 'group' stores a column order that vLLM's W4A8 kernel does not take; "
                        "use actorder: weight (the same accuracy, no reordering at run time) or none")
    # engines run experts as one fused layer with their own methods, the other linears with
    # their linear kernels: asked apart
    dense_names = [n for n in names if expert_index(n) is None]
    experts = frozenset(cfg.scheme(w, actorder) for n, w in widths.items() if expert_index(n) is not None)
    dense = frozenset(cfg.scheme(widths[n], actorder) for n in dense_names)

    def asked(schemes, of_experts: bool):
        if cfg.activations == "fp8":
            return W4A8(cfg.group_size, of_experts)
        return WeightOnlyInt(schemes, of_experts, () if of_experts else stacked_out_widths(model, dense_names))

    problems = sorted(set(engine_problems(ctx.engine_facts, asked(dense, False)))) if dense else []
    problems += engine_problems(ctx.engine_facts, asked(experts, True)) if experts else []
    if problems:
        raise UserError(*(f"{stage}: {p}" for p in problems))
    return names


STACKED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
           "up_proj": "gate_up_proj"}  # the projections vLLM runs as one layer, by the name it gives it


def stacked_out_widths(model: torch.nn.Module, names: list[str]) -> tuple[tuple[str, int], ...]:
    """(name, output width) of each of `names` as engines run them: a module's q/k/v projections as
    one `qkv_proj` (their widths added), gate/up as one `gate_up_proj`, the others as they are."""
    widths: dict[str, int] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        key = f"{parent}.{STACKED[leaf]}" if leaf in STACKED else n
        widths[key] = widths.get(key, 0) + model.get_submodule(n).out_features
    return tuple(widths.items())


def group_summary(schemes: dict[str, WeightScheme]) -> dict[str, int]:
    """{group size: number of modules} for the report."""
    out: dict[str, int] = {}
    for s in schemes.values():
        out[str(s.group_size)] = out.get(str(s.group_size), 0) + 1
    return out


def row_slices(group: dict[str, torch.nn.Linear]):
    """(name, module, rows) of modules solved as one matrix: their weights stacked in order."""
    row = 0
    for rel, m in group.items():
        yield rel, m, slice(row, row + m.out_features)
        row += m.out_features


@torch.no_grad()
def store(module: torch.nn.Linear, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
          g_idx: torch.Tensor | None = None) -> QuantRecord:
    """Write fake-quantized weights into `module` (its dtype) and keep the record on the CPU."""
    module.weight.data.copy_(q.to(module.weight.dtype))
    dt = module.weight.dtype
    return QuantRecord(scale=scale.to(dt).cpu(), zero=zero.cpu(), g_idx=None if g_idx is None else g_idx.cpu())
