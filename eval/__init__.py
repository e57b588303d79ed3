"""Squeeze evaluation side: engines, accuracy, speed, reports."""

import compress  # noqa: F401 - sets PYTORCH_NVML_BASED_CUDA_CHECK for every process that evaluates (it says why)
