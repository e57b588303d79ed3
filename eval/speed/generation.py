"""Generation speed at fixed input/output lengths: prefill and decode throughput.

Prompts are random token ids (speed does not depend on content at fixed lengths; EOS is
ignored). Protocol: `warmup` untimed runs, then `repeats` timed runs; each figure is the
median over the timed runs.
"""

from __future__ import annotations

import statistics

import torch
from tqdm.auto import tqdm


def generation_speed(engine, input_len: int = 128, output_len: int = 32, batch_size: int = 1,
                     warmup: int = 1, repeats: int = 3, seed: int = 0, progress: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, engine.vocab_size, (batch_size, input_len), generator=g)
    runs = []
    for i in tqdm(range(warmup + repeats), desc="speed", unit="run", disable=not progress, leave=False):
        t = engine.timed_generate(ids, output_len)
        if i >= warmup:
            runs.append(t)
    prefill = statistics.median(r.prefill_s for r in runs)
    decode = statistics.median(sum(r.step_s) for r in runs)
    step = statistics.median(s for r in runs for s in r.step_s)
    return {
        "prefill_tok_s": batch_size * input_len / prefill,
        "decode_tok_s": batch_size * (output_len - 1) / decode,
        "ttft_ms": prefill * 1e3,
        "tpot_ms": step * 1e3,
        "e2e_ms": statistics.median(r.prefill_s + sum(r.step_s) for r in runs) * 1e3,
        "protocol": {"engine": engine.name, "input_len": input_len, "output_len": output_len,
                     "batch_size": batch_size, "warmup": warmup, "repeats": repeats, "statistic": "median"},
    }
