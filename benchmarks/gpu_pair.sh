#!/usr/bin/env bash
# Two lists of benchmarks/evaluator2_gpu.sh parts side by side, one list per GPU of a
# two-GPU host (e.g. two H200s), each list in turn on its GPU, all cut off at one deadline so
# that every part still packs what it has into $OUT (a tuning study cut off resumes when the
# same part runs again on the same machine).
#   bash benchmarks/gpu_pair.sh "vllm-smol vllm-8b" "prune-vllm prune-hf decode" [SECONDS]
set -uo pipefail
a=${1:?parts for GPU 0}; b=${2:?parts for GPU 1}
export OUT="${OUT:-/tmp/out}" DEADLINE=$(( $(date +%s) + ${3:-540} ))
mkdir -p "$OUT"
lane() {  # GPU, parts
  for p in $2; do echo "== $p on GPU $1 ($(date -u +%T))"; CUDA_VISIBLE_DEVICES=$1 bash benchmarks/evaluator2_gpu.sh "$p"; done
}
lane 0 "$a" > "$OUT/gpu0.log" 2>&1 &
lane 1 "$b" > "$OUT/gpu1.log" 2>&1 &
wait
tail -n 25 "$OUT/gpu0.log" "$OUT/gpu1.log"
