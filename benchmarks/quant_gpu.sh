#!/usr/bin/env bash
# The GPU figures of weight-only quantization, in parts of at most about 10 minutes each.
# Run from the repository root on the GPU host after the GPU bundle is
# installed (. /tmp/gpu-env); results go to $OUT/quant_gpu.jsonl and logs to $OUT.
#   A: CUDA-graph self-check; GPTQ W4A16 on the Llama-3.1-8B shape under a 12 GiB GPU cap;
#      vLLM speed of the bf16 model and of that artifact
#   B: layout sweep (asymmetric, per channel, act-order 'group') in vLLM
#   C: 8-bit layouts in vLLM; SmolLM2 RTN/GPTQ on the GPU, perplexity on both engines
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
q() { python3 benchmarks/quant_gpu.py "$@" 2> >(grep -v -E "it/s\]|s/it\]|layer/s" >&2); }
case "${1:?part A, B or C}" in
  A)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    q selfcheck
    q gptq8b --out /tmp/w4 --cap-gib 12
    q layouts --out /tmp/layouts
    q speed /tmp/layouts/bf16:dummy=bf16 /tmp/w4=w4-g128-sym-gptq ;;
  B)
    q layouts --src /tmp/w4 --out /tmp/layouts
    q speed /tmp/layouts/w4-g128-asym:dummy=w4-g128-asym /tmp/layouts/w4-ch-sym:dummy=w4-ch-sym \
            /tmp/layouts/w4-g128-sym-actorder-group=w4-g128-sym-actorder-group ;;
  C)
    q speed /tmp/layouts/w8-ch-sym:dummy=w8-ch-sym /tmp/layouts/w8-g128-sym:dummy=w8-g128-sym
    SQUEEZE_DATA_DIR="$PWD/.data" q smollm2 --gguf /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf ;;
esac
