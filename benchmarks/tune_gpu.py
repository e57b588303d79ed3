"""Engine tuning and serving figures on a GPU machine.

    python3 benchmarks/tune_gpu.py study --engine hf --model DIR --strategy grid --budget 18 --set batch_size=32,64,128 ...
    python3 benchmarks/tune_gpu.py study --engine vllm --model DIR [--dummy] --strategy grid ...
    python3 benchmarks/tune_gpu.py cross A/landscape.json B/landscape.json     (here, after both GPUs ran)
    python3 benchmarks/tune_gpu.py tpe-vs-grid GRID/landscape.json TPE/landscape.json
    python3 benchmarks/tune_gpu.py random-model --shape smollm2|llama8b --out DIR

study: one tuning study through eval.tune.study.Study (the code `squeeze tune` runs), its
landscape files copied to --copy-to, one JSONL record: every trial, the best, the gain over
the defaults with its noise range.
cross: the published experiment (Martinez, 2024): settings tuned on GPU A used on GPU B
against settings re-tuned on B, and the reverse; both grids cover the same points, so the
other GPU's best is looked up in this GPU's own grid (so both figures come from this GPU's
own study).
tpe-vs-grid: the TPE study's best against the grid's best on the same workload, and the
trials each needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from gpu_common import ROOT, record  # noqa: F401 - ROOT puts the repo on sys.path


def cmd_study(args) -> None:
    from compress.spec import ModelSpec
    from eval.config import TuneConfig, VLLMOptions
    from squeeze.cli.engines import _parse_set
    from eval.tune.study import Study

    wl = {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
          "warmup": 2}
    wl.update({"concurrency": [args.concurrency], "rates": []} if args.concurrency else {"rates": [float("inf")]})
    cfg = TuneConfig.model_validate({"engine": args.engine, "strategy": args.strategy, "budget": args.budget,
                                     "repeats": args.repeats, "seed": args.seed, "workload": wl,
                                     "space": dict(_parse_set(s) for s in args.set) or None})
    st = Study(Path(args.model), cfg, ModelSpec(dtype=args.dtype), VLLMOptions(max_model_len=args.max_model_len),
               device=args.device, out_dir=Path(args.study_dir), log=lambda s: print(s, file=sys.stderr, flush=True),
               server_extra={"load_format": "dummy"} if args.dummy else None)
    res = st.run()
    if args.copy_to:
        dst = Path(args.copy_to)
        dst.mkdir(parents=True, exist_ok=True)
        for f in ("landscape.json", "landscape.md", "landscape.png"):
            if (st.dir / f).is_file():
                shutil.copy(st.dir / f, dst / f"{args.label}-{f}")
    print((st.dir / "landscape.md").read_text(), file=sys.stderr)
    record(args, {"label": args.label, "model": Path(args.model).name, "engine": args.engine,
                  "strategy": args.strategy, "budget": args.budget, "workload": cfg.workload.model_dump(mode="json"), "space": st.space,
                  "measured": res["measured"], "failed": res["failed"], "defaults": res["defaults"],
                  "best": res["best"], "gain": res["gain"], "apply": res["apply"],
                  "trials": [{k: t.get(k) for k in ("number", "settings", "state", "value", "min", "max", "error")}
                             for t in res["trials"]]})


def cmd_random_model(args) -> None:
    """A model directory of a real shape with random bf16 weights (speed does not depend on the
    values) and a small tokenizer (prompts are random ids; only the model's vocabulary counts)."""
    import tempfile

    import torch
    from transformers import LlamaConfig

    from gpu_common import LLAMA_8B, SMOLLM2, random_llama
    from tests.conftest import make_tiny_llama

    cfg = LlamaConfig(**{"smollm2": SMOLLM2, "llama8b": LLAMA_8B}[args.shape], torch_dtype="bfloat16")
    model = random_llama(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    model.save_pretrained(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tiny_llama(Path(tmp) / "t")
        for f in tok.glob("*token*"):
            shutil.copy(f, Path(args.out) / f.name)
    print(f"{args.shape} with random weights in {args.out}", file=sys.stderr)


def _value_at(res: dict, settings: dict) -> float | None:
    for t in res["trials"]:
        if t["state"] == "ok" and t["settings"] == settings:
            return t["value"]
    return None


def cmd_cross(args) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    rows = []
    for here, other in ((a, b), (b, a)):
        own, moved = here["best"], _value_at(here, other["best"]["settings"])
        gain = own["value"] / moved - 1 if moved else None
        rows.append({"on": here["hardware"], "tuned_on": other["hardware"], "settings_moved": other["best"]["settings"],
                     "moved_value": moved, "retuned_settings": own["settings"], "retuned_value": own["value"],
                     "gain_of_retuning_pct": None if gain is None else round(100 * gain, 2)})
        print(f"on {here['hardware']}: {other['hardware']}'s best {other['best']['settings']} -> {moved}; "
              f"re-tuned {own['settings']} -> {own['value']:.1f} ({'' if gain is None else f'{100 * gain:+.1f} %'})")
    record(args, {"engine": a["engine"], "unit": a["unit"], "workload": a["workload"], "rows": rows})


def cmd_tpe_vs_grid(args) -> None:
    g, t = (json.loads(Path(p).read_text()) for p in (args.grid, args.tpe))
    gap = 100 * (1 - t["best"]["value"] / g["best"]["value"])
    at_grid = _value_at(g, t["best"]["settings"])
    out = {"grid_trials": g["measured"], "tpe_trials": t["measured"], "grid_best": g["best"]["value"],
           "grid_best_settings": g["best"]["settings"], "tpe_best": t["best"]["value"],
           "tpe_best_settings": t["best"]["settings"], "tpe_gap_pct": round(gap, 2),
           "tpe_setting_in_grid": at_grid, "trial_ratio": round(t["measured"] / g["measured"], 3)}
    print(json.dumps(out, indent=1))
    record(args, {"engine": g["engine"], "hardware": g["hardware"], **out})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("study")
    p.add_argument("--engine", choices=["hf", "vllm"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--dummy", action="store_true", help="vLLM: random weights (load_format dummy)")
    p.add_argument("--strategy", default="grid")
    p.add_argument("--budget", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--study-dir", default="/tmp/squeeze-home/tune-bench")
    p.add_argument("--copy-to", default=None)
    p = sub.add_parser("random-model")
    p.add_argument("--shape", choices=["smollm2", "llama8b"], required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("cross")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("tpe-vs-grid")
    p.add_argument("grid")
    p.add_argument("tpe")
    for p in sub.choices.values():
        p.add_argument("--jsonl", default=str(ROOT / "benchmarks" / "results" / "tune_gpu.jsonl"))
    args = ap.parse_args()
    {"study": cmd_study, "cross": cmd_cross, "tpe-vs-grid": cmd_tpe_vs_grid,
     "random-model": cmd_random_model}[args.cmd](args)


if __name__ == "__main__":
    main()
