"""W4A8's perplexity on SmolLM2, as a proxy (issue 25): the int4 g64 symmetric GPTQ weights of
`squeeze run benchmarks/w4a8_proxy_smollm2.yaml -o RUN` (with and without `rotate` in front), run on transformers with and without
every linear's inputs (lm_head's excepted, as the `activations: fp8` option leaves it) rounded
to FP8 E4M3 per token, dynamically, by compressed-tensors' own fake quantization (what
transformers runs for a W4A8 checkpoint). The rounding of vLLM's kernel, which also turns the
group scales into FP8 ones with a scale per channel at load time, is not modelled.

    PYTHONPATH=. python benchmarks/w4a8_proxy_smollm2.py RUN      (about 3 minutes on 2 CPU cores)

WikiText-2 8,192 tokens, context 1,024 (the evaluator's protocol), float32. Record:
results/w4a8_proxy_smollm2.jsonl."""
import json
import os
import sys
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from compress.data import load_text
from compress.models import load_model, resolve_model
from eval.accuracy.perplexity import perplexity
from eval.engines.hf import HFEngine

FP8_TOKEN = QuantizationArgs(num_bits=8, type="float", strategy="token", dynamic=True, symmetric=True)


def fp8_per_token(x: torch.Tensor) -> torch.Tensor:
    amax = x.abs().amax(-1, keepdim=True)
    scale, zp = calculate_qparams(-amax, amax, FP8_TOKEN)
    return fake_quantize(x, scale, zp, FP8_TOKEN)


def main(run: Path) -> None:
    arts = {a["name"]: Path(a["model_dir"]) for a in json.loads((run / "report.json").read_text())["artifacts"]}
    tok = load_model(resolve_model("smollm2"), dtype="float32")[1]
    ids = tok(load_text("wikitext2"), add_special_tokens=False, return_tensors="pt").input_ids[0]

    def ppl(model) -> float:
        return perplexity(HFEngine(model, tok, "cpu"), ids, context_length=1024, max_tokens=8192,
                          progress=False)["perplexity"]

    res = {"baseline": ppl(load_model(resolve_model("smollm2"), dtype="float32")[0].eval())}
    for name, d in arts.items():
        model = load_model(d, dtype="float32")[0].eval()
        res[f"{name} (W4A16)"] = ppl(model)
        hooks = [m.register_forward_pre_hook(lambda _, a: (fp8_per_token(a[0]),))
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
        res[f"{name} + FP8 activations per token (W4A8 proxy)"] = ppl(model)
        for h in hooks:
            h.remove()
    base = res["baseline"]
    rec = {"benchmark": "w4a8_proxy_smollm2", "model": "SmolLM2-135M-Instruct", "dtype": "float32",
           "protocol": "wikitext2 8192 tokens, context 1024, transformers",
           "weights": {k: str(v) for k, v in arts.items()},
           "perplexity": {k: round(v, 3) for k, v in res.items()},
           "change_pct": {k: round(100 * (v / base - 1), 2) for k, v in res.items()},
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "squeeze run benchmarks/w4a8_proxy_smollm2.yaml -o RUN && "
                      "PYTHONPATH=. python benchmarks/w4a8_proxy_smollm2.py RUN"}
    print(json.dumps(rec, indent=1))
    with open(os.path.join(os.path.dirname(__file__), "results", "w4a8_proxy_smollm2.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
