"""One model's speed in vLLM's offline engine: throughput on a fixed workload and batch-1 latency.

    python3 benchmarks/vllm_speed.py MODEL_DIR [--dummy] [--prompts 512 --input-len 512 --output-len 128]

Workload: `prompts` random token-id prompts of `input_len` tokens, exactly `output_len` new
tokens each (EOS ignored, greedy), one `generate` call; output tok/s = prompts × output_len /
wall time of that call. Batch 1: TTFT = wall time of a 1-token generation of one prompt;
TPOT = (wall time of `output_len` tokens − TTFT) / (output_len − 1); median of `repeats`
fresh prompts. Prefix caching is off so no run reuses another's prefill. `--dummy` loads
random weights of the model's config (vLLM's load_format="dummy"): speed does not depend
on weight values at fixed output lengths. `--engine-arg KEY=VALUE` passes more engine
arguments (kv_cache_dtype, linear_backend, ...); the KV cache's capacity in tokens is recorded. Prints one line `RESULT {json}` at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _kv_tokens(llm) -> int | None:
    """Tokens the KV cache holds: blocks x block size, from the loaded engine's cache config."""
    cc = llm.llm_engine.vllm_config.cache_config
    return cc.num_gpu_blocks * cc.block_size if cc.num_gpu_blocks else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--dummy", action="store_true", help="random weights (load_format=dummy)")
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--label", default="")
    ap.add_argument("--quantization", default=None, help="vLLM's in-flight quantization, e.g. bitsandbytes")
    ap.add_argument("--tput-repeats", type=int, default=1, help="throughput runs (fresh prompts each); median")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="more of vLLM's engine arguments (VALUE read as JSON where it parses, e.g. "
                    "kv_cache_dtype=fp8, linear_backend=marlin)")
    a = ap.parse_args()
    extra = {}
    for kv in a.engine_arg:
        k, _, v = kv.partition("=")
        try:
            extra[k] = json.loads(v)
        except json.JSONDecodeError:
            extra[k] = v

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    g = torch.Generator().manual_seed(0)
    vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]

    def prompts(n):
        return [{"prompt_token_ids": torch.randint(vocab // 100, vocab - 1, (a.input_len,), generator=g).tolist()}
                for _ in range(n)]

    cpu = {} if torch.cuda.is_available() else {"kv_cache_memory_bytes": 1 << 30, "enforce_eager": True}  # dry runs
    t0 = time.perf_counter()
    llm = LLM(model=a.model, load_format="dummy" if a.dummy else "auto", dtype=a.dtype, skip_tokenizer_init=True,
              max_model_len=a.max_model_len, enable_prefix_caching=False, seed=0,
              **({"quantization": a.quantization} if a.quantization else {}), **cpu, **extra)
    start_s = time.perf_counter() - t0
    sp = lambda n: SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0, detokenize=False)  # noqa: E731
    llm.generate(prompts(16), sp(16), use_tqdm=False)  # warm-up

    walls = []
    for _ in range(a.tput_repeats):
        work = prompts(a.prompts)
        t0 = time.perf_counter()
        outs = llm.generate(work, sp(a.output_len), use_tqdm=False)
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)

    ttft, tpot = [], []
    for _ in range(a.repeats):
        p = prompts(1)
        t0 = time.perf_counter()
        llm.generate(p, sp(1), use_tqdm=False)
        t1 = time.perf_counter() - t0
        p = prompts(1)
        t0 = time.perf_counter()
        llm.generate(p, sp(a.output_len), use_tqdm=False)
        tn = time.perf_counter() - t0
        ttft.append(t1)
        tpot.append((tn - t1) / (a.output_len - 1))
    res = {
        "label": a.label, "model": a.model, "dummy": a.dummy, "dtype": a.dtype, "quantization": a.quantization,
        "engine_args": extra, "kv_cache_tokens": _kv_tokens(llm),
        "workload": {"prompts": a.prompts, "input_len": a.input_len, "output_len": a.output_len},
        "output_tokens": n_out, "wall_s": round(wall, 3), "wall_s_all": [round(w, 3) for w in walls], "output_tok_s": round(n_out / wall, 1),
        "total_tok_s": round((n_out + a.prompts * a.input_len) / wall, 1), "requests_s": round(a.prompts / wall, 2),
        "batch1_ttft_ms": round(statistics.median(ttft) * 1e3, 3), "batch1_tpot_ms": round(statistics.median(tpot) * 1e3, 4),
        "batch1_tpot_ms_all": [round(x * 1e3, 4) for x in tpot], "engine_start_s": round(start_s, 1),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "versions": {"vllm": vllm.__version__, "torch": torch.__version__},
    }
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
