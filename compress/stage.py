"""What a stage is and what it sees.

A stage is a frozen pydantic config plus a pure `apply(model, cfg, ctx) -> (model, info)`:
`info` is a JSON-able dict of what the stage measured (it lands in stage.json and the
report). An optional `check(cfg, model, ctx)` runs before any work on a *meta* copy of the
input model (structure and shapes, no weights) and raises `UserError` on bad input, so a
recipe fails in seconds instead of after an hour of calibration.

These types live apart from the registry so that stage modules import them without the
registry importing them back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from pydantic import BaseModel

from compress.engine_facts import EngineFacts


@dataclass
class StageContext:
    """What a stage may use besides the model.

    device: where the stage computes (the model itself stays in host memory; stages move
    what they work on, one layer at a time where it matters). model_dir: the directory the
    input model came from (its config.json tells, e.g., whether it is already quantized).
    """

    device: str
    seed: int
    tokenizer: Any = None
    model_dir: Path | None = None
    progress: bool = True
    # what each engine of the recipe can run, at its platform, version and dtype (see
    # compress.engine_facts): supplied by the layer above from eval.engines; stages ask it
    # before any work
    engine_facts: tuple[EngineFacts, ...] = ()
    # the recipe's input model (a distillation teacher), and a directory a long stage keeps its
    # checkpoints in across a crash (removed once the stage is complete)
    base_dir: Path | None = None
    work_dir: Path | None = None
    # open_engine(name, model_dir, **options) -> an inference engine with generate_ids() and
    # close(): supplied by the layer above (the pipeline, from eval.engines), so that a stage that
    # generates text (distillation's teacher data) never imports the evaluator itself
    open_engine: Callable[..., Any] | None = None

    def calibration(self, cfg) -> torch.Tensor:
        """[n_samples, seq_len] LongTensor of calibration tokens for a CalibrationConfig (seeded by
        the recipe's seed); UserError when the data set is shorter than that."""
        from compress.calibration import calibration_batches, check_calibration

        check_calibration(self.tokenizer, cfg)
        return calibration_batches(self.tokenizer, cfg.dataset, cfg.n_samples, cfg.seq_len, self.seed)


@dataclass(frozen=True)
class Stage:
    name: str
    config: type[BaseModel]
    apply: Callable[[Any, BaseModel, StageContext], tuple[Any, dict]]
    summary: str
    # check(cfg, meta_model, ctx): raise UserError before any work (optional)
    check: Callable[[BaseModel, torch.nn.Module, StageContext], None] | None = None
    # a stage that writes quantized weights: later stages may not change the weights again
    quantizes: bool = False
    # it changes no weight (the FP8 KV cache's scales): it may follow a quantization stage
    keeps_weights: bool = False
    # a stage that compresses weight matrices: the pipeline records its coverage, and refuses it
    # before any work where it would leave fused (3-D) expert weights it cannot handle untouched
    weights: bool = False
    # it works on nn.Linear and covers a mixture-of-experts layer once its fused experts are
    # turned into per-expert linears (compress.moe.linearize), which the pipeline does for it
    experts: bool = False
