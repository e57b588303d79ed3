"""Why FP8 dynamic gets worse after `rotate` on SmolLM2: FP8 on the weights alone (per channel) and
FP8 on the activations alone (per token; all linears, or one kind), each on the plain and the
rotated model, in memory (no export), on transformers, float32. Results: results/fp8_rotate_parts.jsonl.

    PYTHONPATH=. python benchmarks/fp8_rotate_parts.py      (about 4 minutes on 2 CPU cores)

WikiText-2 8,192 tokens, context 1,024."""
import copy
import json
import os
import time

import torch

from compress.models import load_model, resolve_model
from compress.quant.rotate import apply as rot_apply, RotateConfig
from compress.quant.w8a8 import quantize_weight
from compress.stage import StageContext
from smol_parts import fp8_token_hooks, linears, smollm2_ppl

model = load_model(resolve_model("smollm2"), dtype="float32")[0].eval()
tok, ppl = smollm2_ppl()  # the evaluator's protocol (eval.evaluate), in memory


def fp8_weights(m):
    for n, l in linears(m):
        q, _ = quantize_weight(l.weight.data, True)
        l.weight.data.copy_(q)

rot, _ = rot_apply(copy.deepcopy(model), RotateConfig(), StageContext(device="cpu", seed=0))
res = {}
for name, base in (("plain", model), ("rotated", rot)):
    res[name] = ppl(base)
    m = copy.deepcopy(base); fp8_weights(m); res[name + "+W"] = ppl(m)
    m = copy.deepcopy(base); fp8_token_hooks(m); res[name + "+A"] = ppl(m)
    for part in (["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]):
        m = copy.deepcopy(base); fp8_token_hooks(m, part); res[f"{name}+A[{part[0]}]"] = ppl(m)
    print(res, flush=True)
for k, v in res.items():
    print(f"{k:28s} {v:.3f}")
with open(os.path.join(os.path.dirname(__file__), "results", "fp8_rotate_parts.jsonl"), "a") as f:
    f.write(json.dumps({"what": "fp8 parts, plain vs rotated", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
                        "protocol": "wikitext2 8192 tokens, context 1024, transformers", "perplexity": res,
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                        "command": "PYTHONPATH=. python benchmarks/fp8_rotate_parts.py"}) + "\n")
