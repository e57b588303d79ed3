"""Squeeze evaluation side: engines, accuracy, speed, reports."""

import os

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # compress/__init__.py says why
