"""Batch-1 greedy decode on transformers of a W8A8 compressed-tensors checkpoint, with the
library's own activation rounding and with compress.export.qdq's (the same bits, no host round
trips), against its 16-bit baseline, in one process, rounds alternating, best of each.

    PYTHONPATH=. python benchmarks/qdq_decode.py BASELINE_DIR W8A8_DIR [--tokens 32] [--rounds 3] [--jsonl FILE]

Prints one JSON line (and appends it to --jsonl): seconds per `generate` call of each side and their
ratios to the baseline, and whether qdq's tokens equal the library's.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from compress.export import qdq
from compress.models import load_model
from eval.stack import installed_version


def _generate(model, ids, tokens: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("baseline", type=Path)
    ap.add_argument("w8a8", type=Path)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jsonl", type=Path)
    a = ap.parse_args()
    base, _ = load_model(a.baseline, a.dtype, a.device)
    lib, _ = load_model(a.w8a8, a.dtype, a.device)
    fast, _ = load_model(a.w8a8, a.dtype, a.device)
    swapped = qdq.speed_up_(fast)
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(a.device)
    sides = {"baseline": base, "compressed-tensors": lib, "qdq": fast}
    for m in sides.values():
        _generate(m, ids, 4)  # warm-up
    best = {k: float("inf") for k in sides}
    outs = {}
    for _ in range(a.rounds):
        for k, m in sides.items():
            t, outs[k] = _generate(m, ids, a.tokens)
            best[k] = min(best[k], t)
    rec = {"bench": "qdq_decode", "baseline": str(a.baseline), "w8a8": str(a.w8a8), "device": a.device,
           "host": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "dtype": a.dtype, "tokens": a.tokens, "rounds": a.rounds, "layers_swapped": swapped,
           "seconds": {k: round(v, 4) for k, v in best.items()},
           "x_baseline": {k: round(v / best["baseline"], 3) for k, v in best.items()},
           "same_tokens": bool(torch.equal(outs["qdq"], outs["compressed-tensors"])),
           "versions": {p: installed_version(p) for p in ("torch", "transformers", "compressed-tensors")},
           "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(rec))
    if a.jsonl:
        with a.jsonl.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
