#!/usr/bin/env bash
# GPTQ W4A16 g128 with calibrate_all_experts on the Qwen3-30B-A3B shape (random bf16 weights), one GPU.
# Run from the repository root on the GPU host with the wheels the host lacks in .whl/ (pydantic,
# tqdm, compressed-tensors 0.17.0, loguru, ...: see the GPU section of benchmarks/BENCHMARKS.md);
# the record goes to $OUT/moe_gpu.jsonl.
set -uo pipefail
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/whlsite .whl/*.whl 2>&1 | grep -vi warning
export PYTHONPATH=$PWD:/tmp/whlsite PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
timeout "${LIMIT:-560}" python3 benchmarks/moe_gpu.py --out "$OUT/moe_gpu.jsonl" "$@" 2>&1 | tr "\r" "\n" | tee "$OUT/moe_gpu.log" | tail -3
