#!/usr/bin/env bash
# The evaluator's GPU figures, in parts of at most about 10 minutes each. Run from the
# repository root on the GPU host after the GPU bundle is installed
# (. /tmp/gpu-env), with the data sets under .data (SQUEEZE_DATA_DIR); results go to
# $OUT/eval_gpu.jsonl, logs to stderr.
#   A: SmolLM2 on both engines in bf16 (perplexity, full PIQA, GSM8K 5-shot on 200 items);
#      vLLM and HF evaluator throughput against bare scripts on SmolLM2
#   B: vLLM evaluator against a bare script on SmolLM2 and on the Llama-3.1-8B shape (dummy
#      weights), with the evaluator streaming a sample of 64 requests per run
#   C: GSM8K 5-shot on both engines (200 items) after the few-shot fix (worked solutions in
#      the examples); PIQA on 100 items
set -uo pipefail
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}"
export SQUEEZE_DATA_DIR="${SQUEEZE_DATA_DIR:-$PWD/.data}" SQUEEZE_HOME=/tmp/squeeze-home HF_HUB_OFFLINE=1
mkdir -p "$OUT"
GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf
SMOL=/tmp/squeeze-home/_models/SmolLM2-135M-Instruct
b() { python3 benchmarks/eval_gpu.py "$@" --jsonl "$OUT/eval_gpu.jsonl" 2> >(grep -v -E "it/s\]|s/it\]|INFO" >&2); }
case "${1:?part A or B}" in
  A)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    b agree --gguf "$GGUF" --dtype bfloat16 --gsm8k-limit 200
    b vllm-fidelity --model "$SMOL" --prompts 1024 --input-len 128 --output-len 128
    b hf-fidelity --model "$SMOL" --prompts 64 --input-len 128 --output-len 128 ;;
  B)
    python3 -c "from compress.models import import_gguf; import_gguf('$GGUF', '$SMOL')" 2>/dev/null || true
    b vllm-fidelity --model "$SMOL" --prompts 1024 --input-len 128 --output-len 128
    b llama8b-dir --out /tmp/llama8b --tokenizer-from "$SMOL"
    b vllm-fidelity --model /tmp/llama8b --dummy --prompts 512 --input-len 512 --output-len 128 ;;
  C)
    b agree --gguf "$GGUF" --dtype bfloat16 --piqa-limit 100 --gsm8k-limit 200 ;;
esac
