"""Config documentation for `squeeze stages`: every field of a stage's pydantic config, with its
type, choices, bounds, default and meaning, as JSON-able dicts and as indented text.

A field whose type holds another config (`LossConfig`, `CalibrationConfig | None`,
`list[Mapping] | None`) carries that config's own fields under "fields", recursively, so every
knob a recipe can set is listed (distill's `loss.kind` with its four choices, `data.generated`'s
fields, each calibrated stage's `calibration.n_samples`), not one folded default value.
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel

# constraint attribute -> how it reads (annotated-types objects carry one each)
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"), ("min_length", "length >="),
           ("max_length", "length <="))


def _constraints(metadata) -> dict:
    """{"ge": 0.0, "lt": 1} from a field's metadata (annotated-types objects, or a Field(...)
    inside Annotated[...], whose own metadata holds them)."""
    out = {}
    for m in metadata:
        out.update({a: getattr(m, a) for a, _ in _BOUNDS if getattr(m, a, None) is not None})
        out.update(_constraints(getattr(m, "metadata", ())))
    return out


def _bound_text(c: dict) -> str:
    return ", ".join(f"{sym} {c[a]}" for a, sym in _BOUNDS if a in c)


def type_name(t: Any) -> str:
    """Readable type: float, list[str], dict[str, float (>= 0.0, < 1.0)], int | None, 'a' | 'b'."""
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Annotated:
        b = _bound_text(_constraints(args[1:]))
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


def _members(t: Any) -> tuple:
    """The members of a union (the type itself otherwise), Annotated unwrapped."""
    if typing.get_origin(t) is typing.Annotated:
        t = typing.get_args(t)[0]
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        return tuple(m for a in typing.get_args(t) for m in _members(a))
    return (t,)


def choices(t: Any) -> list:
    """The literal values a field accepts ('forward', 'reverse', ...); [] where none."""
    return [v for m in _members(t) if typing.get_origin(m) is typing.Literal for v in typing.get_args(m)]


def nested(t: Any) -> tuple[type[BaseModel], bool] | None:
    """(the config class a field holds, whether as a list of them): X, X | None, list[X], list[X] | None."""
    for m in _members(t):
        if isinstance(m, type) and issubclass(m, BaseModel):
            return m, False
        if typing.get_origin(m) is list:
            inner = nested(typing.get_args(m)[0]) if typing.get_args(m) else None
            if inner is not None:
                return inner[0], True
    return None


def _plain(v: Any) -> Any:
    return v.model_dump() if hasattr(v, "model_dump") else v


def describe_fields(config: type[BaseModel]) -> list[dict]:
    """One dict per field: name, type (bounds included), required, default, help; choices and
    bounds where there are any; fields (the same, recursively) where the type holds a config."""
    out = []
    for name, f in config.model_fields.items():
        c = _constraints(f.metadata)
        d = {"name": name, "type": type_name(f.annotation) + (f" ({_bound_text(c)})" if c else ""),
             "required": f.is_required(),
             "default": None if f.is_required() else _plain(f.get_default(call_default_factory=True)),
             "help": f.description or ""}
        if ch := choices(f.annotation):
            d["choices"] = ch
        if c:
            d["bounds"] = c
        if (sub := nested(f.annotation)) is not None:
            d["fields"] = describe_fields(sub[0])
            d["list"] = sub[1]
        out.append(d)
    return out


def describe(stage) -> dict:
    """A registered stage's name, summary and config fields (for `squeeze stages --json`)."""
    return {"name": stage.name, "summary": stage.summary, "fields": describe_fields(stage.config)}


def text_lines(fields: list[dict], prefix: str = "", indent: str = "  ") -> list[str]:
    """`name: type (default ...)  - help` per field, a nested config's fields indented below it
    under their dotted path (loss.kind; mappings[].smooth for a list of configs)."""
    lines = []
    for f in fields:
        sub = f.get("fields")
        if f["required"]:
            default = "required"
        elif sub is not None and isinstance(f["default"], dict):
            default = "defaults below"  # made of its own fields' defaults
        else:
            default = f"default {json.dumps(f['default'], default=str)}"
        lines.append(f"{indent}{prefix}{f['name']}: {f['type']} ({default}){'  - ' + f['help'] if f['help'] else ''}")
        if sub is not None:
            lines += text_lines(sub, f"{prefix}{f['name']}{'[].' if f.get('list') else '.'}", indent + "  ")
    return lines
