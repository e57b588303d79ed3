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

from compress.models import load_model, resolve_model
from smol_parts import fp8_token_hooks, smollm2_ppl


def main(run: Path) -> None:
    arts = {a["name"]: Path(a["model_dir"]) for a in json.loads((run / "report.json").read_text())["artifacts"]}
    _, ppl = smollm2_ppl()
    res = {"baseline": ppl(load_model(resolve_model("smollm2"), dtype="float32")[0].eval())}
    for name, d in arts.items():
        model = load_model(d, dtype="float32")[0].eval()
        res[f"{name} (W4A16)"] = ppl(model)
        hooks = fp8_token_hooks(model)
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
