"""Memory while a model is evaluated, and where it was measured (provenance).

`MemorySampler` polls, every `interval` seconds on a background thread, the resident memory
(RSS) of this process plus all its children (vLLM's engine and worker processes) and, on
CUDA machines, the memory in use on the device through NVML (every process's, so vLLM's
workers count); it keeps the peaks. On CUDA the HF engine's own peak comes from torch's
allocator (`torch.cuda.max_memory_allocated`), which is exact.
"""

from __future__ import annotations

import functools
import math
import platform
import subprocess
import threading
from pathlib import Path

import torch

_FLOAT = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
_INT = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def _nvml_handle(index: int):
    """NVML's handle on CUDA device `index` of this process (CUDA_VISIBLE_DEVICES maps it: NVML
    counts every GPU of the host)."""
    import os

    import pynvml

    pynvml.nvmlInit()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    if index < len(visible):
        v = visible[index]
        return pynvml.nvmlDeviceGetHandleByIndex(int(v)) if v.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(v)
    return pynvml.nvmlDeviceGetHandleByIndex(index)


def _nvml(query: str, index: int):
    """NVML's `query` (a pynvml function name) on CUDA device `index`; None where NVML does not
    answer (no bindings, no driver)."""
    try:
        import pynvml

        return getattr(pynvml, query)(_nvml_handle(index))
    except Exception:
        return None


def _nvml_used(index: int) -> int | None:
    info = _nvml("nvmlDeviceGetMemoryInfo", index)
    return None if info is None else int(info.used)


def gpu_name(index: int = 0) -> str:
    """CUDA device `index`'s name, from NVML where it answers. torch.cuda.get_device_name creates
    a CUDA context in this process, and vLLM then starts each engine's process with spawn instead
    of fork ("Overriding VLLM_WORKER_MULTIPROC_METHOD to 'spawn' ... CUDA is initialized"), which
    imports everything again: SmolLM2 engines took 35-37 s to open inside `squeeze run` on an H100
    against 9 s for a lone start with the same settings (vLLM 0.26, 2026-12-07)."""
    name = _nvml("nvmlDeviceGetName", index)
    if name is None:
        return torch.cuda.get_device_name(index)
    return name.decode() if isinstance(name, bytes) else name


def gpu_capability(index: int = 0) -> tuple[int, int]:
    """CUDA device `index`'s compute capability, from NVML where it answers (gpu_name says why
    not torch.cuda.get_device_capability)."""
    cc = _nvml("nvmlDeviceGetCudaComputeCapability", index)
    return tuple(torch.cuda.get_device_capability(index)) if cc is None else (int(cc[0]), int(cc[1]))


def _rss_tree() -> int:
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for c in me.children(recursive=True):
        try:
            total += c.memory_info().rss
        except psutil.Error:
            pass
    return total


class MemorySampler:
    """Peak RSS (this process and its children) and peak device memory in use, sampled."""

    def __init__(self, device: str = "cpu", interval: float = 0.1):
        self.device, self.interval = device, interval
        self.gpu_index = (torch.device(device).index or 0) if device.startswith("cuda") else None
        self.peak_rss = self.peak_gpu = 0
        self.gpu_before = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="squeeze-memory")

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss_tree())
        if self.gpu_index is not None:
            used = _nvml_used(self.gpu_index)
            if used is not None:
                self.peak_gpu = max(self.peak_gpu, used)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "MemorySampler":
        if self.gpu_index is not None:
            self.gpu_before = _nvml_used(self.gpu_index)
            if torch.cuda.is_initialized():  # else this process has allocated nothing yet (gpu_name says why)
                torch.cuda.reset_peak_memory_stats(self.gpu_index)
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    def result(self) -> dict:
        out = {"peak_rss_bytes": self.peak_rss, "rss_scope": "this process and its children"}
        if self.gpu_index is not None:
            if torch.cuda.is_initialized():  # an engine in this process (transformers); vLLM's run in their own
                out["peak_torch_allocated_bytes"] = int(torch.cuda.max_memory_allocated(self.gpu_index))
            if self.peak_gpu and self.gpu_before is not None:
                out["peak_gpu_used_bytes"] = self.peak_gpu - self.gpu_before
                out["gpu_scope"] = "device memory in use (NVML) above what was in use before the engine opened"
        return out


def checkpoint_weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of the checkpoint's tensors with floating-point ones at the engine's `dtype` and
    integer (packed) ones as stored: what an engine that loads it as written holds in memory."""
    from compress.model_files import safetensors_header

    total = 0
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        for name, t in safetensors_header(f)[1].items():
            if name != "__metadata__":
                total += math.prod(t["shape"]) * (_DTYPE_BYTES[dtype] if t["dtype"] in _FLOAT
                                                  else _INT.get(t["dtype"], 1))
    return total


def device_info(device: str) -> dict:
    """Device name and driver (GPU) or CPU model, for a result's provenance."""
    if device.startswith("cuda") and torch.cuda.is_available():
        i = torch.device(device).index or 0
        info = {"device_name": gpu_name(i), "cuda": torch.version.cuda}
        try:
            import pynvml

            pynvml.nvmlInit()
            d = pynvml.nvmlSystemGetDriverVersion()
            info["driver"] = d.decode() if isinstance(d, bytes) else d
        except Exception:
            try:
                info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                                capture_output=True, text=True, timeout=10).stdout.split("\n")[0]
            except (OSError, subprocess.SubprocessError):
                info["driver"] = None
        return info
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device_name": name, "threads": torch.get_num_threads()}


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """The x86 CPU's feature flags (None where /proc/cpuinfo does not say); read once."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), None)
    except OSError:
        return None
    return frozenset(line.split(":", 1)[1].split()) if line else None
