"""Stage registry: stage name -> (frozen config class, pure apply function).

Built-in stages are listed explicitly in `_builtin()` (no package walking, no code from
YAML). A stage is a pydantic config with `extra="forbid"` plus
`apply(model, cfg, ctx) -> (model, info)`, where `info` is a JSON-able dict of what the
stage measured (it lands in the stage manifest and the report).
"""

from __future__ import annotations

from compress.stage import Stage, StageContext  # noqa: F401  (re-exported for plugins)

_REGISTRY: dict[str, Stage] = {}
_BUILTINS_LOADED = False


def register(stage: Stage) -> None:
    """Add a stage (plugins call this); a name may be registered once."""
    if stage.name in _REGISTRY and _REGISTRY[stage.name] is not stage:
        raise ValueError(f"stage {stage.name!r} is already registered")
    _REGISTRY[stage.name] = stage


def _builtin() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from compress import distill
    from compress.prune import magnitude, sparsegpt, structured, wanda
    from compress.prune.structured import experts as prune_experts
    from compress.quant import awq, bnb, gptq, kv_cache, rotate, rtn, smoothquant, w8a8

    for stage in (magnitude.STAGE, wanda.STAGE, sparsegpt.STAGE, *structured.STAGES, prune_experts.STAGE, rotate.STAGE,
                  rtn.STAGE, gptq.STAGE, awq.STAGE, smoothquant.STAGE, w8a8.INT8, w8a8.FP8, kv_cache.STAGE, bnb.STAGE,
                  distill.STAGE):
        register(stage)


def get(name: str) -> Stage | None:
    _builtin()
    return _REGISTRY.get(name)


def all_stages() -> dict[str, Stage]:
    _builtin()
    return dict(sorted(_REGISTRY.items()))

