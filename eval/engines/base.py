"""The engine interface every evaluator talks to: everything callers use of an engine.

An engine class says what the engine is (class-level: its name, version, options, the facts
the compression stages ask for); `load` gives one instance wrapping one loaded model.
Perplexity calls `score`; speed calls `stream`; task accuracy hands `lm_eval_model()` (lm-eval's
own backend around the loaded model) to lm-eval; smoke checks call `generate_text`,
distillation `generate_ids`. Engines own their device and release it in `close`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from compress.engine_facts import EngineFacts
from eval.speed.workload import RequestTiming


class Engine(Protocol):
    # -- what the engine is (class level) ------------------------------------------------------
    name: ClassVar[str]  # its name in recipes and eval.engines.registry
    # tunable setting -> (check, what is allowed, as said in errors): eval.tune's search spaces
    tunable: ClassVar[dict[str, tuple[Any, str]]]
    # its paired speed rounds run in a fresh process (eval.paired, eval.isolated; absent: False)
    fresh_process_pairs: ClassVar[bool]

    @classmethod
    def version(cls) -> str | None:
        """The installed version (None: not installed); keys the facts and each result's provenance."""

    @classmethod
    def check_installed(cls) -> None:
        """Raise UserError, saying how to install it, where this machine lacks the engine."""

    @classmethod
    def load(cls, model_dir: Path, **options) -> "Engine":
        """Open the engine on a local model directory (`options`: dtype, device, and its own)."""

    @classmethod
    def check_config(cls, cfg, device: str) -> None:
        """Raise UserError, before any work, on options of its own (eval.config.EvalConfig) that
        `device` cannot run."""

    @classmethod
    def fresh_process_evaluations(cls, device: str) -> bool:
        """Whether a run measures this engine's evaluations on `device` in one fresh process of
        their own (squeeze.pipeline.evaluation, eval.isolated)."""

    @classmethod
    def check_model(cls, cfg, model, model_dir: Path) -> None:
        """Raise UserError, before any work, where the evaluation cannot run on this model
        (`model_dir`: the input model, compress.spec.ModelSpec `model`)."""

    @classmethod
    def options(cls, cfg, model) -> dict:
        """What it is opened with for an evaluation (eval.config.EvalConfig, compress.spec.ModelSpec),
        beyond device and model: `dtype` always; part of the evaluation cache key."""

    @classmethod
    def paired_options(cls, options: dict, device: str) -> dict:
        """`options` for two instances open at once on `device` (eval.paired)."""

    @classmethod
    def alternate_options(cls, options: dict, device: str) -> dict:
        """`options` for two instances used one at a time (eval.engine_pair); with the engine's
        sleep mode (`enable_sleep_mode`) where the instance then has `sleep()` and `wake()`."""

    @classmethod
    def free_memory(cls, device: str) -> int | None:
        """Bytes a second instance on `device` could use (None: the engine's own share decides)."""

    @classmethod
    def facts(cls, device: str, dtype: str) -> EngineFacts:
        """What it can run of a compressed checkpoint on `device` at `dtype` (eval.engines.facts)."""

    @classmethod
    def tune_space(cls, device: str) -> dict[str, list]:
        """The settings a tuning study searches where the recipe gives no space."""

    # -- one loaded model ----------------------------------------------------------------------
    vocab_size: int  # token ids it accepts
    tokenizer: Any  # the model's tokenizer (transformers-compatible)
    device: str
    stats: dict  # what the engine knows of the loaded model (params, memory, kernels, ...)

    score_rows: int  # how many equal-length rows (perplexity windows) one score() call should take

    def score(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Log-probabilities [B, T-1] (float32, CPU) of input_ids[:, 1:] given the tokens before."""

    def stream(self, prompts: list[list[int]], output_len: int, concurrency: int,
               stream_every: int = 1) -> list[RequestTiming]:
        """Greedy-generate exactly `output_len` tokens per prompt (EOS ignored), at most
        `concurrency` at once; stamp each output token of every `stream_every`-th request when
        it comes back (the others: their end)."""

    def generate_text(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy completions of text prompts (for smoke checks)."""

    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                     seed: int = 0) -> list[list[int]]:
        """Continuations (token ids, up to and including EOS) of token-id prompts, greedy at
        temperature 0, else sampled from the full distribution (seeded); for sequence-level
        distillation."""

    def lm_eval_model(self, batch_size: int | str = 32):
        """lm-eval's own backend (an lm_eval LM) around the loaded model, with no second load."""

    def close(self) -> None: ...
