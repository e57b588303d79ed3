"""Where static int8's error on SmolLM2 comes from, with and without `rotate`: one static scale
per tensor (min-max over 64 x 512 WikiText-2 validation tokens) on the activations of one kind of
linear at a time (weights unquantized), in memory, on transformers, float32. Reads the stage
outputs of `squeeze run benchmarks/rotate_smoothquant_smollm2.yaml -o RUN` (SmoothQuant 0.5
alone, `rotate` alone, `rotate` + SmoothQuant 0.5). Results: results/rotate_smollm2.jsonl.

    PYTHONPATH=. python benchmarks/int8_static_parts.py RUN      (about 4 minutes on 2 CPU cores)

WikiText-2 8,192 tokens, context 1,024 (the evaluator's protocol)."""
import json
import os
import sys
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

from compress.data import load_text
from compress.models import load_model
from smol_parts import linears, smollm2_ppl

PARTS = (("q/k/v", ("q_proj", "k_proj", "v_proj")), ("o_proj", ("o_proj",)), ("gate/up", ("gate_proj", "up_proj")),
         ("down_proj", ("down_proj",)), ("all", ()))
STATIC = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False)  # int8 stages' static layout


def main(run: Path) -> None:
    chains = json.loads((run / "variants.json").read_text())
    sq, rot = chains["sq50+int8-dynamic"][0], chains["rotated+sq50+int8-dynamic"]
    tok, ppl = smollm2_ppl()
    cal = tok(load_text("wikitext2-valid"), add_special_tokens=False, return_tensors="pt").input_ids[0][:64 * 512]
    out = {}
    for name, d in (("smoothquant 0.5", sq), ("rotate", rot[0]), ("rotate + smoothquant 0.5", rot[1])):
        model = load_model(d, dtype="float32")[0].eval()
        lin = dict(linears(model))
        amax, tokmax = dict.fromkeys(lin, 0.0), {n: [] for n in lin if n.endswith("down_proj")}

        def seen(n, x):
            amax[n] = max(amax[n], x.abs().max().item())
            if n in tokmax:
                tokmax[n].append(x.abs().amax(-1).flatten())

        hooks = [m.register_forward_pre_hook(lambda _, a, n=n: seen(n, a[0])) for n, m in lin.items()]
        with torch.no_grad():
            for batch in cal.view(8, 8, 512):
                model(batch)
        for h in hooks:
            h.remove()
        # down_proj's inputs token by token: the layer whose largest per-token maximum is furthest above its median
        per_token = {n: torch.cat(v) for n, v in tokmax.items()}
        worst = max(per_token, key=lambda n: per_token[n].max().item() / per_token[n].median().item())
        t = per_token[worst]
        res = {"none": ppl(model)}
        zero = torch.zeros(1, dtype=torch.int8)
        for part, names in PARTS:  # compressed-tensors' own fake quantization: what transformers runs
            hooks = [m.register_forward_pre_hook(
                lambda _, a, s=torch.tensor([amax[n] / 127]): (fake_quantize(a[0], s, zero, STATIC),))
                for n, m in lin.items() if not names or n.rsplit(".", 1)[-1] in names]
            res[part] = ppl(model)
            for h in hooks:
                h.remove()
        out[name] = {k: round(v, 3) for k, v in res.items()}
        out[name]["down_proj per-token max |x|"] = {"layer": worst, "largest": round(t.max().item(), 2),
                                                    "median": round(t.median().item(), 3)}
        print(name, out[name], flush=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "rotate_smollm2.jsonl"), "a") as f:
        f.write(json.dumps({"benchmark": "int8_static_parts", "what": "static int8 (min-max, per tensor) on one kind "
                            "of linear's activations at a time, weights unquantized", "model": "SmolLM2-135M-Instruct",
                            "dtype": "float32", "protocol": "wikitext2 8192 tokens, context 1024, transformers; "
                            "calibration wikitext2-valid 64 x 512", "perplexity": out, "torch": torch.__version__,
                            "date": time.strftime("%Y-%m-%d"),
                            "command": "PYTHONPATH=. python benchmarks/int8_static_parts.py RUN"}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
