"""The compression half of a recipe: the model a chain starts from (ModelSpec), its stages
(StageSpec, each validated against its stage's own config from the registry), matrix variants,
the order rule for quantization stages, and the content key of a chain's output. The recipe as a
whole (squeeze.recipe) adds the evaluation and gate sections, which eval/ owns."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import Field, ValidationError

from compress import registry
from compress.schema import Strict
from compress.yamlio import format_errors


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


def stage_dicts(stages: list[StageSpec]) -> list[dict]:
    return [{"type": s.type, **s.config.model_dump()} for s in stages]


def chain_key(model: ModelSpec, seed: int, stages: list[StageSpec]) -> str:
    """Content key of a chain's output: what determines it (model, seed, the stages in order)."""
    return content_hash({"model": model.model_dump(), "seed": seed, "stages": stage_dicts(stages)})


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def order_errors(stages: list[StageSpec], where: str, what: str = "") -> list[str]:
    """Quantized weights are final: nothing may change the weights after a quantization stage (a stage
    that keeps the weights, the FP8 KV cache's, may follow one)."""
    first = next((i for i, s in enumerate(stages) if registry.get(s.type).quantizes), None)
    if first is None:
        return []
    q = stages[first].type
    return [f"{where}: {what}stages[{i}].type: {s.type!r} after {q!r} (stages[{first}]): quantized checkpoints "
            "are final; put quantization last" for i, s in enumerate(stages)
            if i > first and not (registry.get(s.type).keeps_weights and not registry.get(q).keeps_weights)]


def parse_stage(st: Any, i: int, where: str, errors: list[str], at: str | None = None) -> StageSpec | None:
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
