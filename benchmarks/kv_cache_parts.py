"""Where an FP8 KV cache's perplexity cost on SmolLM2 comes from: the keys, the values, the scale
(per tensor, per KV head, smaller or larger than amax / 448) and the queries, which vLLM's
FlashAttention 3 path also rounds to FP8 when the cache is FP8 (with the checkpoint's q_scale,
1.0 where it has none). In memory on transformers: an attention function registered with
transformers rounds K (after the rotary embedding, what the cache stores), V and optionally Q to
E4M3 with compress.export.qdq (compressed-tensors' static FP8 rounding: x / scale, saturated at
448, round to nearest) and then runs SDPA. Scales from
amax over 64 x 512 WikiText-2 validation tokens (the kv_cache stage's recipe), unquantized model.
Results: results/kv_cache_smollm2.jsonl.

    PYTHONPATH=. python benchmarks/kv_cache_parts.py [float32|bfloat16]   (about 5 minutes on 2 CPU cores)

WikiText-2 8,192 tokens, context 1,024 (the evaluator's protocol)."""
import json
import os
import sys
import time

import torch
from compressed_tensors.quantization import QuantizationArgs
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from compress.data import load_text
from compress.export.compressed_tensors import FP8_MAX
from compress.export.qdq import qdq
from compress.models import load_model, resolve_model
from smol_parts import smollm2_ppl

FP8_STATIC = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)


def e4m3(x: torch.Tensor, scale) -> torch.Tensor:
    """x [B, heads, T, D] rounded to FP8 E4M3 with `scale` (a float, or one per head)."""
    s = scale.reshape(1, -1, 1, 1).float() if torch.is_tensor(scale) else torch.tensor(float(scale))
    return qdq(x, FP8_STATIC, s).to(x.dtype)


def main(dtype: str) -> None:
    model = load_model(resolve_model("smollm2"), dtype=dtype)[0].eval()
    tok, ppl = smollm2_ppl()
    cfg = model.config
    amax = {k: torch.zeros(cfg.num_hidden_layers, h) for k, h in
            (("q", cfg.num_attention_heads), ("k", cfg.num_key_value_heads), ("v", cfg.num_key_value_heads))}
    state = {"calibrate": False, "scales": None}  # scales(layer) -> (q, k, v) scales, None: left in 16 bits

    def attention(module, q, k, v, mask, **kw):
        i = module.layer_idx
        if state["calibrate"]:
            for name, x in (("q", q), ("k", k), ("v", v)):
                amax[name][i] = torch.maximum(amax[name][i], x.detach().abs().amax(dim=(0, 2, 3)).float())
        elif state["scales"] is not None:
            qs, ks, vs = state["scales"](i)
            q, k, v = (x if s is None else e4m3(x, s) for x, s in ((q, qs), (k, ks), (v, vs)))
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    AttentionInterface.register("squeeze_kv_parts", attention)
    model.set_attn_implementation("squeeze_kv_parts")
    cal = tok(load_text("wikitext2-valid"), add_special_tokens=False, return_tensors="pt").input_ids[0][:64 * 512]
    state["calibrate"] = True
    with torch.no_grad():
        for batch in cal.view(64, 1, 512):
            model(batch)
    state["calibrate"] = False

    def head(i, m=1.0):
        return amax["k"][i] / FP8_MAX * m, amax["v"][i] / FP8_MAX * m

    variants = {
        "16-bit cache": None,
        "K, V per tensor": lambda i: (None, amax["k"][i].max() / FP8_MAX, amax["v"][i].max() / FP8_MAX),
        "K, V per head": lambda i: (None, *head(i)),
        "K, V per head, scale x 0.5 (clips)": lambda i: (None, *head(i, 0.5)),
        "K, V per head, scale x 8": lambda i: (None, *head(i, 8.0)),
        "K only, per head": lambda i: (None, head(i)[0], None),
        "V only, per head": lambda i: (None, None, head(i)[1]),
        "K, V per head + Q, q_scale 1.0 (FlashAttention 3's default)": lambda i: (1.0, *head(i)),
        "K, V per head + Q, q_scale amax / 448": lambda i: (amax["q"][i].max() / FP8_MAX, *head(i)),
    }
    res = {}
    for name, scales in variants.items():
        state["scales"] = scales
        res[name] = ppl(model)
        print(f"{name:62s} {res[name]:.3f} {100 * (res[name] / res['16-bit cache'] - 1):+.2f} %", flush=True)
    base = res["16-bit cache"]
    with open(os.path.join(os.path.dirname(__file__), "results", "kv_cache_smollm2.jsonl"), "a") as f:
        f.write(json.dumps({
            "bench": "kv_cache_parts", "what": "FP8 (E4M3) rounding of K, V and Q one part at a time, in memory",
            "model": "SmolLM2-135M-Instruct", "dtype": dtype,
            "protocol": "wikitext2 8192 tokens, context 1024, transformers (SDPA); scales from amax over "
                        "wikitext2-valid 64 x 512, unquantized model",
            "perplexity": {k: round(v, 3) for k, v in res.items()},
            "change_pct": {k: round(100 * (v / base - 1), 2) for k, v in res.items()},
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
            "host": "2 CPU cores", "date": time.strftime("%Y-%m-%d"),
            "command": f"PYTHONPATH=. python benchmarks/kv_cache_parts.py {dtype}"}) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "float32")
