"""HF decode speed: bare `generate` against the HF engine's decode paths, side by side in one
process on one model (goal: batch-1 decode >= 3x bare generate on the Llama-3.1-8B
shape).

    python3 benchmarks/hf_decode_gpu.py [--model llama8b|smollm2|tiny|DIR] [--batch 1 --batch 8]
                                        [--input-len 128] [--new-tokens 128] [--repeats 3] [--out JSONL]

CPU smoke run (the graph modes record their one-line error there):
    python3 benchmarks/hf_decode_gpu.py --model tiny --dtype float32 --new-tokens 8 --repeats 1 --out /tmp/d.jsonl

Per batch size, in turn on the same model and prompts (random token ids), each run timed
from the call to the last token (synchronized): bare `model.generate(ids, max_new_tokens=N,
min_new_tokens=N, do_sample=False)` (transformers' defaults: a DynamicCache, eager); the
engine's `static` path (eval.engines.hf_static, a static cache, eager step), its
`cuda_graph` path (the step replayed as a CUDA graph) and `cuda_graph+compile` (the step
torch.compile'd, then captured); one warm-up run each (compilation and capture happen there), then --repeats timed runs. Decode tok/s = B x N / time (prefill included,
as a user sees it). The graph paths' tokens are checked against the static path's (random weights give flat
logits: batched kernels can flip a near-tie, so a batch > 1 mismatch is not by itself a bug). Each mode
in try/except: a failure is recorded, the others still run. One JSONL record per batch size.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from pathlib import Path

import torch

from gpu_common import LLAMA_8B, SMOLLM2, TINY, record  # noqa: F401 - puts the repo on sys.path


def _model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from gpu_common import random_llama

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = {"llama8b": LLAMA_8B, "smollm2": SMOLLM2, "tiny": TINY}
    if args.model in shapes:
        cfg = LlamaConfig(**shapes[args.model], torch_dtype=args.dtype)
        return random_llama(cfg, dev).to(dev, getattr(torch, args.dtype)), dev
    m = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    return m.to(dev).eval(), dev


def _timed(fn, dev: str) -> tuple[float, torch.Tensor]:
    if dev == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama8b",
                    help="llama8b, smollm2 or tiny (that Llama shape, random weights) or an HF directory")
    ap.add_argument("--dtype", default="bfloat16", help="torch dtype of the weights")
    ap.add_argument("--batch", type=int, action="append", default=None, help="batch size; repeat it (default 1 and 8)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (EOS ignored)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode after one warm-up")
    ap.add_argument("--jsonl", "--out", dest="jsonl", help="JSONL file the records are appended to",
                    default=str(Path(__file__).parent / "results" / "hf_decode_gpu.jsonl"))
    args = ap.parse_args()
    args.cmd = "hf-decode"
    from eval.engines.hf_static import StaticDecoder

    model, dev = _model(args)
    n = args.new_tokens
    for b in args.batch or [1, 8]:
        ids = torch.randint(10, model.config.vocab_size, (b, args.input_len),
                            generator=torch.Generator().manual_seed(b)).to(dev)
        modes = {"generate": lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                   min_new_tokens=n, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]}
        decoders = {}
        for mode in ("static", "cuda_graph", "cuda_graph+compile"):
            try:
                decoders[mode] = StaticDecoder(model, mode.split("+")[0], compile=mode.endswith("+compile"))
                modes[mode] = lambda d=decoders[mode]: d.generate(ids, n)
            except Exception as e:  # noqa: BLE001 - recorded, the other modes still run
                modes[mode] = e
        res, toks = {}, {}
        for mode, fn in modes.items():
            if isinstance(fn, Exception):
                res[mode] = {"error": f"{type(fn).__name__}: {fn}"}
                continue
            try:
                with torch.inference_mode():
                    _timed(fn, dev)  # warm-up (and the capture)
                    runs = [_timed(fn, dev) for _ in range(args.repeats)]
                toks[mode] = runs[-1][1]
                tps = [b * n / t for t, _ in runs]
                res[mode] = {"tok_s": statistics.median(tps), "min": min(tps), "max": max(tps), "runs": tps}
                if mode in decoders and decoders[mode].fallback:
                    res[mode]["fallback"] = decoders[mode].fallback
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                res[mode] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        base = res["generate"].get("tok_s")
        for mode in decoders:
            if base and "tok_s" in res.get(mode, {}):
                res[mode]["x_generate"] = res[mode]["tok_s"] / base
        same = {m: bool((toks["static"] == toks[m]).all()) for m in ("cuda_graph", "cuda_graph+compile")
                if "static" in toks and m in toks}
        gen_same = bool((toks["static"] == toks["generate"]).float().mean() > 0.9) if "static" in toks and \
            "generate" in toks else None
        print(f"batch {b}: " + ", ".join(f"{m} {r['tok_s']:.1f} tok/s" if "tok_s" in r else f"{m} FAILED {r['error']}"
                                         for m, r in res.items()) + f"; graph tokens == static: {same}", flush=True)
        record(args, {"model": args.model, "dtype": args.dtype, "batch": b, "input_len": args.input_len,
                      "new_tokens": n, "repeats": args.repeats, "results": res, "tokens_equal_static": same,
                      "static_tokens_match_generate_90pct": gen_same})


if __name__ == "__main__":
    main()
