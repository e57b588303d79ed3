"""Quantization stages: grid, RTN, GPTQ (and the compressed-tensors export in compress.export)."""
