"""Squeeze compression side: recipes, stages, pipeline, model loading."""

import os

__version__ = "0.1.0"

# torch.cuda.is_available() asks the CUDA runtime by default, which marks the process so that
# every child it forks fails on its first CUDA call ("Cannot re-initialize CUDA in forked
# subprocess") while torch.cuda.is_initialized() still says False, so vLLM forks its engine
# core and the engine dies. Asked through NVML instead (torch's own switch), nothing is marked.
# The H100 main job of 2026-12-07 had every vLLM engine fail this way (BENCHMARKS.md).
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
