#!/usr/bin/env bash
# The GPU figures of W8A8 int8 / FP8, SmoothQuant, AWQ and bitsandbytes, in parts of at most
# about 10 minutes each. Run from the repository root on the GPU host after the GPU bundle is
# installed
# (. /tmp/gpu-env), with the data sets under .data; results go to $OUT/quant2_gpu.jsonl and
# vLLM logs to $OUT.
#   A: vLLM speed on the Llama-3.1-8B shape (dummy weights, 512 x 512/128, median of 3):
#      bf16, FP8 dynamic, W8A8 int8 dynamic
#   B: the static variants (FP8, int8); cost of SmoothQuant + static int8 on the 8B shape
#   C: cost of AWQ W4A16 on the 8B shape (8 GiB GPU cap); our SmolLM2 checkpoints (static
#      int8, FP8 dynamic and static, AWQ, bitsandbytes NF4) on transformers and vLLM
#   D: bitsandbytes in vLLM on the 8B shape (real bf16 weights, in-flight quantization)
#   F1 / F2 / F3: issue 25's Hopper formats on the 8B shape (dummy weights; ratios to bf16 in the
#      same call): F1 bf16, FP8 128x128 blocks, W4A8; F2 bf16, W4A16 g128 on vLLM's default kernel
#      and with linear_backend=marlin; F3 the KV cache: bf16 weights with a
#      16-bit and an FP8 cache at 128 prompts x 7,936 in / 256 out (the layout's 8,192 positions; capacity
#      from the engine); a cold engine start took about 2 minutes on an H100 (compilation), 35 s
#      with vLLM's compile cache warm: run F3 after F1 or F2 on the same machine, in its own call
#   G: issue 25's cost of rotate + GPTQ on the 8B shape beside GPTQ alone (W4 g128 symmetric,
#      random weights in host memory, 12 GiB GPU cap, 128 x 2048 random tokens), one call
#   E NAME...: SmolLM2 schemes (quant2_gpu.py SMOLLM2_STAGES) with perplexity and full PIQA on
#      both engines
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
export SQUEEZE_DATA_DIR="${SQUEEZE_DATA_DIR:-$PWD/.data}" SQUEEZE_HOME=/tmp/squeeze-home HF_HUB_OFFLINE=1
mkdir -p "$OUT"
q() { python3 benchmarks/quant2_gpu.py "$@" --jsonl "$OUT/quant2_gpu.jsonl" 2> >(grep -v -E "it/s\]|s/it\]|layer/s|window/s" >&2); }
L=/tmp/q2layouts
case "${1:?part A, B, C, D, E, G or F1..F3}" in
  A)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    q layouts --out $L
    q speed $L/bf16:dummy=bf16 $L/fp8-dynamic:dummy=fp8-dynamic $L/int8-dynamic:dummy=int8-dynamic ;;
  B)
    [ -d $L ] || q layouts --out $L
    q speed $L/fp8-static:dummy=fp8-static $L/int8-static:dummy=int8-static
    q cost8b --method sq-int8-static --cap-gib 8 ;;
  C)
    q cost8b --method awq --cap-gib 8
    q smollm2 --gguf /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf \
      --only int8-static fp8-dynamic fp8-static awq-w4-g128 bnb-nf4 ;;
  F1)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    q layouts --out $L
    q speed $L/bf16:dummy=bf16 $L/fp8-block128:dummy=fp8-block128 $L/w4a8:dummy=w4a8 --tput-repeats 2 ;;
  F2)
    [ -d $L ] || q layouts --out $L
    q speed $L/bf16:dummy=bf16 $L/w4a16:dummy=w4a16 $L/w4a16:dummy=w4a16-marlin+linear_backend=marlin \
      --tput-repeats 2 ;;
  F3)
    [ -d $L ] || q layouts --out $L
    q speed $L/bf16:dummy=bf16-kv16 $L/bf16:dummy=bf16-kvfp8+kv_cache_dtype=fp8 --tput-repeats 1 \
      --prompts 128 --input-len 7936 --output-len 256 --max-model-len 8192 --timeout 290 ;;
  G)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    q cost8b --method gptq --cap-gib 12
    q cost8b --method rotate-gptq --cap-gib 12 ;;
  E)
    q smollm2 --gguf /tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf --piqa --only "${@:2}" ;;
  D)
    q bf16-dir --out /tmp/llama8b-bf16
    cp /tmp/q2layouts/bf16/config.json /tmp/llama8b-bf16/config.json 2>/dev/null || true
    q speed /tmp/llama8b-bf16:bnb=bnb-nf4-inflight ;;
esac
