"""Stage registry: stage name -> (frozen config class, pure apply function).

Built-in stages are listed explicitly in `_builtin()` (no package walking, no code from
YAML). A stage is a pydantic config with `extra="forbid"` plus
`apply(model, cfg, ctx) -> (model, info)`, where `info` is a JSON-able dict of what the
stage measured (it lands in the stage manifest and the report).
"""

from __future__ import annotations

import types
import typing
from typing import Any

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
    from compress.quant import awq, bnb, gptq, rtn, smoothquant, w8a8

    for stage in (magnitude.STAGE, wanda.STAGE, sparsegpt.STAGE, *structured.STAGES, rtn.STAGE, gptq.STAGE,
                  awq.STAGE, smoothquant.STAGE, w8a8.INT8, w8a8.FP8, bnb.STAGE, distill.STAGE):
        register(stage)


def get(name: str) -> Stage | None:
    _builtin()
    return _REGISTRY.get(name)


def all_stages() -> dict[str, Stage]:
    _builtin()
    return dict(sorted(_REGISTRY.items()))


# -- config documentation (`squeeze stages`) ----------------------------------------------

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _bounds(metadata) -> str:
    return ", ".join(f"{sym} {getattr(m, a)}" for m in metadata for a, sym in _BOUNDS if hasattr(m, a))


def type_name(t: Any) -> str:
    """Readable type: float, list[str], dict[str, float (>= 0.0, < 1.0)], int | None, 'a' | 'b'."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated:
        b = _bounds(args[1:])
        return type_name(args[0]) + (f" ({b})" if b else "")
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t))


def _plain(v: Any) -> Any:
    return v.model_dump() if hasattr(v, "model_dump") else v


def describe(stage) -> dict:
    """Config fields of a stage with their types, bounds, defaults and help (for `squeeze stages`)."""
    fields = []
    for fname, f in stage.config.model_fields.items():
        b = _bounds(f.metadata)
        fields.append({
            "name": fname,
            "type": type_name(f.annotation) + (f" ({b})" if b else ""),
            "required": f.is_required(),
            "default": None if f.is_required() else _plain(f.get_default(call_default_factory=True)),
            "help": f.description or "",
        })
    return {"name": stage.name, "summary": stage.summary, "fields": fields}
