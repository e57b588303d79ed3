"""Safe YAML loading and validation errors as one line per problem.

`load_yaml` reads a file with a SafeLoader that also rejects duplicate keys; `format_errors`
turns a pydantic ValidationError into '<file>: <field path>: <what is wrong and what is
allowed>' lines. Recipes, task specs, eval configs and gate files all report through them.
"""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from compress.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader (no object-building tags) that also rejects duplicate mapping keys."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such recipe file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read recipe: {e}") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise UserError(f"{path}{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _walk(cls: Any, loc: tuple) -> tuple[Any, Any]:
    """(annotation, FieldInfo or None) found by walking `loc` from the model class `cls`."""
    info = None
    for part in loc:
        cls = _unwrap(cls)
        if isinstance(cls, type) and issubclass(cls, BaseModel) and isinstance(part, str):
            info = cls.model_fields.get(part)
            if info is None:
                return None, None
            cls = info.annotation
        else:
            args = typing.get_args(cls)
            if not args:
                return None, None
            cls, info = args[-1], None
    return _unwrap(cls), info


def _fields_at(cls: Any, loc: tuple) -> list[str] | None:
    """Field names of the model at `loc` (for 'unknown field' errors)."""
    t, _ = _walk(cls, loc)
    return list(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else None


def _unwrap(t: Any) -> Any:
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        non_none = [a for a in typing.get_args(t) if a is not type(None)]
        if len(non_none) == 1:
            return non_none[0]
    return t


def format_errors(e: ValidationError, cls: type[BaseModel], where: str, prefix: tuple | str) -> list[str]:
    """One line per error: '<where>: <field path>: <what is wrong and what is allowed>'; `prefix` is
    the path of `cls` in the file (a tuple of keys, or a path string such as 'stages[1]')."""
    lines = []
    for err in e.errors(include_url=False):
        if isinstance(prefix, str):
            rest = _path(tuple(err["loc"]))
            path = prefix + ("." + rest if rest and not rest.startswith("[") else rest)
        else:
            path = _path(prefix + tuple(err["loc"]))
        got = err.get("input")
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(cls, tuple(err["loc"])[:-1])
            msg = "unknown field" + (f"; allowed: {', '.join(allowed)}" if allowed else "")
        elif err["type"] == "missing":
            msg = "required field is missing"
        elif err["type"] == "string_pattern_mismatch" and (info := _walk(cls, tuple(err["loc"]))[1]):
            msg = f"must be {info.description} (got {got!r})"
        else:
            msg = f"{err['msg']} (got {got!r})" if not isinstance(got, (dict, list)) else err["msg"]
        lines.append(f"{where}: {path}: {msg}")
    return lines
