"""Recipe matrices: many variants of one base model in one recipe, one comparison at the end.

A recipe's ``matrix:`` section names the variants; each variant is the recipe's own
``stages`` (a shared prefix, often empty) followed by its own stages::

    matrix:
      axes:                       # every combination, stages concatenated in axis order
        prune:
          none: []
          wanda-50: [{type: wanda, sparsity: 0.5}]
        quant:
          none: []
          int8: [{type: int8, activations: dynamic}]
      variants:                   # extra variants, listed one by one
        magnitude-50: [{type: magnitude_prune, sparsity: 0.5}]
      exclude: [wanda-50+int8]    # combinations to leave out

A combination is named by its non-empty options joined with '+' ('wanda-50+int8'); the
combination of empty options is the baseline, which every run measures anyway.

Stage outputs of a matrix run are content-addressed (``stages/<key>-<type>/``, the key a
hash of model, seed and the stages up to that one), so variants that share a prefix of
stages compute it once, and a resumed or extended matrix reuses every stage already made.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from compress.spec import StageSpec, Variant, parse_stage

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEYS = ("axes", "variants", "exclude")


def _stage_list(raw: Any, at: str, where: str, errors: list[str]) -> list[StageSpec] | None:
    if raw is None:
        return []
    if not isinstance(raw, list):
        errors.append(f"{where}: {at}: must be a list of stages (or [] for none), got {type(raw).__name__}")
        return None
    out = [parse_stage(st, i, where, errors, at=f"{at}[{i}]") for i, st in enumerate(raw)]
    return None if any(s is None for s in out) else out


def _named(raw: Any, at: str, where: str, errors: list[str]) -> dict[str, list[StageSpec]]:
    """A mapping of option name -> stage list, checked."""
    if not isinstance(raw, dict) or not raw:
        errors.append(f"{where}: {at}: must be a non-empty mapping of name -> list of stages")
        return {}
    out = {}
    for name, stages in raw.items():
        if not isinstance(name, str) or not _NAME.match(name):
            errors.append(f"{where}: {at}: option name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
            continue
        parsed = _stage_list(stages, f"{at}.{name}", where, errors)
        if parsed is not None:
            out[name] = parsed
    return out


def parse_matrix(raw: Any, where: str, errors: list[str]) -> list[Variant]:
    """The variants a `matrix:` section names, in order (axes' combinations, then `variants`)."""
    if not isinstance(raw, dict):
        errors.append(f"{where}: matrix: must be a mapping with axes, variants and/or exclude")
        return []
    for k in raw:
        if k not in _KEYS:
            errors.append(f"{where}: matrix.{k}: unknown field; allowed: {', '.join(_KEYS)}")
    n_before = len(errors)
    variants: list[Variant] = []
    axes = raw.get("axes")
    if axes is not None:
        if not isinstance(axes, dict) or not axes:
            errors.append(f"{where}: matrix.axes: must be a non-empty mapping of axis -> options")
        else:
            options = [list(_named(opts, f"matrix.axes.{axis}", where, errors).items()) for axis, opts in axes.items()]
            for combo in itertools.product(*options):
                parts = [(n, st) for n, st in combo if st]
                if parts:
                    variants.append(Variant(name="+".join(n for n, _ in parts),
                                            stages=[s for _, st in parts for s in st]))
    if raw.get("variants") is not None:
        variants += [Variant(name=n, stages=st) for n, st in _named(raw["variants"], "matrix.variants", where,
                                                                     errors).items()]
    exclude = raw.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(x, str) for x in exclude):
        errors.append(f"{where}: matrix.exclude: must be a list of variant names")
        exclude = []
    names = [v.name for v in variants]
    for x in exclude:
        if x not in names and len(errors) == n_before:
            errors.append(f"{where}: matrix.exclude: {x!r} is not a variant; variants: {', '.join(names)}")
    variants = [v for v in variants if v.name not in exclude]
    if len(errors) > n_before:
        return []
    seen: dict[str, str] = {}
    for v in variants:
        if v.name in seen:
            errors.append(f"{where}: matrix: variant name {v.name!r} appears twice")
        key = repr([(s.type, s.config) for s in v.stages])
        if key in seen and seen[key] != v.name:
            errors.append(f"{where}: matrix: variants {seen[key]!r} and {v.name!r} have the same stages")
        seen.setdefault(v.name, v.name)
        seen.setdefault(key, v.name)
    if not variants and not errors[n_before:]:
        errors.append(f"{where}: matrix: names no variant (every combination is empty or excluded)")
    return variants
