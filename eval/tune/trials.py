"""One trial: measure a model under one engine setting, and read the objective off it.

vLLM: start a server with the setting (eval.engines.server), warm it, run the workload's
load point `repeats` times with fresh prompts (eval.speed.serving), stop the server.
HF: open the transformers engine with the setting and run the offline workload in static
batches of `batch_size` (eval.speed.workload). Either way the trial's figure per repeat is
kept, so a gain over the defaults carries its noise (eval.speed.workload.compare). `TRIALS`
holds each engine's way: its checks, the settings under every trial, the measurement, and how
to use the best setting.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from compress.errors import UserError
from compress.spec import ModelSpec
from eval.config import ServingConfig, TuneConfig, VLLMOptions
from eval.speed.serving import Load, context_len, make_prompts, run_load
from eval.speed.serving_report import loads_of, slo_of
from eval.speed.workload import spread

INTERRUPTED = "interrupted (the study was stopped)"
# objective -> (direction, figure per repeat, unit)
OBJECTIVES = {
    "throughput": ("maximize", "output tok/s"),
    "goodput": ("maximize", "good req/s"),
    "p99_latency": ("minimize", "p99 E2E ms"),
}


def load_of(w: ServingConfig) -> Load:
    """A study's one load point."""
    return loads_of(w)[0]


def vllm_base(opts: VLLMOptions, model: ModelSpec, device: str) -> dict:
    """The recipe's vLLM options as server settings, under every trial's own setting."""
    base = {"dtype": opts.dtype or model.dtype, "max_model_len": opts.max_model_len,
            "kv_cache_dtype": opts.kv_cache_dtype, "tensor_parallel_size": opts.tensor_parallel_size,
            "enforce_eager": opts.enforce_eager, "trust_remote_code": model.trust_remote_code or None}
    if device.startswith("cuda"):
        base["gpu_memory_utilization"] = opts.gpu_memory_utilization
    if opts.tensor_parallel_size == 1:
        base.pop("tensor_parallel_size")
    return {**base, **opts.engine_args}


def measure_vllm(model_dir: Path, settings: dict, base: dict, cfg: TuneConfig, device: str, log_path: Path,
                 tokenizer) -> dict:
    from eval.engines.server import VLLMServer

    w = cfg.workload
    srv_settings = {**{k: v for k, v in base.items() if v is not None}, **settings}
    if srv_settings.get("max_model_len") is None:
        srv_settings["max_model_len"] = context_len(w)
    runs = []
    with VLLMServer(model_dir, srv_settings, device=device, log_path=log_path) as srv:
        for i in range(cfg.repeats):
            prompts = make_prompts(w, tokenizer, seed=cfg.seed * 1000 + i, as_text=False)
            runs.append(run_load(srv.endpoint, prompts, w.output_len, load_of(w), slo_of(w), seed=cfg.seed + i,
                                 warmup=w.warmup))
        startup = srv.startup_s
    failed = sum(r["failed"] for r in runs)
    if failed:
        errs = sorted({e for r in runs for e in r.get("errors", [])})
        raise RuntimeError(f"{failed} requests failed: {errs[0] if errs else 'no message'}")
    return {"runs": runs, "startup_s": startup, "kernels": kernels_in_log(log_path)}


# vLLM's kernel pickers log their choice at INFO: "Using MacheteLinearKernel for CompressedTensorsWNA16",
# "Selected CutlassFP8ScaledMMLinearKernel for CompressedTensorsW8A8Fp8"
KERNEL_LINE = re.compile(r"\b(?:Using|Selected) (\w+Kernel\w*) for (\w+)")


def kernels_in_log(log_path: Path) -> dict[str, str]:
    """{quantization scheme: the linear kernel vLLM chose for it} as a server's log says ({} when
    it names none: an unquantized model, or a log level above INFO)."""
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return {}
    return {scheme: kernel for kernel, scheme in KERNEL_LINE.findall(text)}


def measure_hf(model_dir: Path, settings: dict, model: ModelSpec, cfg: TuneConfig, device: str) -> dict:
    from eval.engines.hf import HFEngine
    from eval.speed.workload import workload_speed

    w = cfg.workload
    s = dict(settings)
    opts = {k: s[k] for k in ("attn_implementation", "decode", "compile_decode") if k in s}  # else the defaults
    if opts.get("compile_decode") and opts.get("decode", "dynamic") == "dynamic":
        raise ValueError("compile_decode needs decode static or cuda_graph")  # a failed trial, not a crash
    eng = HFEngine.load(model_dir, dtype=s.get("dtype", model.dtype), device=device,
                        trust_remote_code=model.trust_remote_code, allow_pickle=model.allow_pickle, **opts)
    note = None
    try:
        res = workload_speed(eng, num_prompts=w.num_prompts, input_len=w.input_len, output_len=w.output_len,
                             concurrency=s.get("batch_size", default_batch(w)), batch1_requests=0, warmup=1, repeats=cfg.repeats,
                             seed=cfg.seed, progress=False)["concurrent"]
        note = eng.decoder.fallback if eng.decoder is not None else None
    finally:
        eng.close()
    runs = [{"output_tok_s": t, "requests_s": r, "e2e_ms": {"p99": res["e2e_ms"]["p99"]}}
            for t, r in zip(res["output_tok_s"]["runs"], res["requests_s"]["runs"])]
    return {"runs": runs, "ttft_ms": res["ttft_ms"], "tpot_ms": res["tpot_ms"], **({"note": note} if note else {})}


class VLLMTrials:
    """vLLM trials: a server per setting, on the recipe's vLLM options (`base`)."""

    def check(self, cfg: TuneConfig) -> None:
        """Every objective can be measured on a server."""

    def base(self, vllm: VLLMOptions, model: ModelSpec, device: str, extra: dict | None) -> dict:
        """Every trial's settings under its own: the recipe's vLLM options and `extra` (more
        engine arguments, e.g. load_format: dummy)."""
        return {**vllm_base(vllm, model, device), **(extra or {})}

    def measure(self, study, settings: dict, label: str) -> dict:
        """One trial of `study` (eval.tune.study.Study)."""
        return measure_vllm(study.model_dir, settings, study.base, study.cfg, study.device,
                            study.dir / f"server-{label}.log", study.tokenizer)

    def apply(self, model_dir: Path, base: dict, settings: dict) -> dict:
        """How to use a setting: the `vllm serve` line and the engine arguments."""
        from eval.engines.server import serve_command

        base = {k: v for k, v in base.items() if v is not None}
        return {"vllm_serve": serve_command(str(model_dir), {**base, **settings}),
                "engine_args": {**base, **settings}}


class HFTrials:
    """transformers trials: the engine opened in this process per setting, at the model's dtype."""

    def check(self, cfg: TuneConfig) -> None:
        if cfg.objective == "goodput":
            raise UserError("eval.tune.objective: goodput needs a server's per-request latencies; with engine hf "
                            "use throughput or p99_latency")

    def base(self, vllm: VLLMOptions, model: ModelSpec, device: str, extra: dict | None) -> dict:
        return {"dtype": model.dtype}

    def measure(self, study, settings: dict, label: str) -> dict:
        return measure_hf(study.model_dir, settings, study.model, study.cfg, study.device)

    def apply(self, model_dir: Path, base: dict, settings: dict) -> dict:
        """How to use a setting: the HF engine's keywords."""
        return {"hf": {**base, **settings}}


# how each engine's trials run (eval.tune.study looks its engine up here)
TRIALS = {"vllm": VLLMTrials(), "hf": HFTrials()}


def default_batch(w: ServingConfig) -> int:
    """HF's batch size when the setting is not tuned: the workload's concurrency, else 8."""
    return w.concurrency[0] if w.concurrency else 8


def objective_runs(measurement: dict, objective: str) -> list[float]:
    """The objective's figure per repeat."""
    pick = {"throughput": lambda r: r["output_tok_s"], "goodput": lambda r: r["goodput_requests_s"],
            "p99_latency": lambda r: r["e2e_ms"]["p99"]}[objective]
    return [float(pick(r)) for r in measurement["runs"]]


def score(measurement: dict, cfg: TuneConfig) -> dict:
    """{value (median), spread, feasible, throughput}: what the study records for a trial."""
    vals = objective_runs(measurement, cfg.objective)
    tput = spread(objective_runs(measurement, "throughput"))
    feasible = cfg.objective != "p99_latency" or tput["median"] >= cfg.throughput_floor
    value = spread(vals)
    return {"value": value["median"], "spread": value, "throughput": tput, "feasible": feasible,
            "violation": 0.0 if feasible else (cfg.throughput_floor - tput["median"]) / cfg.throughput_floor}


def fmt_value(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"


def trial_line(n: int, settings: dict, m: dict, objective: str) -> str:
    """One measured trial, as a study logs it."""
    s = " ".join(f"{k}={v}" for k, v in settings.items())
    if "error" in m:
        return f"trial {n}: {s}: FAILED {m['error']}"
    sp_ = m["spread"]
    extra = "" if m["feasible"] else " (below the throughput floor)"
    return (f"trial {n}: {s}: {sp_['median']:.2f} {OBJECTIVES[objective][1]} "
            f"({sp_['min']:.2f}-{sp_['max']:.2f}){extra}")


def free_gpu() -> None:
    """What a failed trial left on the GPU, released."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
