"""Which modules a stage works on: `targets` / `ignore` globs over module names.

Globs are fnmatch patterns matched against the whole dotted name (``model.layers.*.mlp.*``);
an exact name matches itself. Unlike regex-based selectors, ``.`` is literal, so a pattern
cannot quietly match more than it says. Every glob must match at least one module: a typo
in a recipe is an error, not a stage that silently does nothing.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch

from compress.errors import UserError
from compress.moe import router_names


def matches(name: str, patterns: Iterable[str]) -> str | None:
    """The first pattern that matches `name`, or None."""
    for p in patterns:
        if name == p or fnmatch.fnmatchcase(name, p):
            return p
    return None


def linear_names(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def _explicit(name: str, targets: Iterable[str]) -> bool:
    """A target that names `name` on purpose: not a bare wildcard such as '*' or '*.mlp.*'."""
    return any((name == p or fnmatch.fnmatchcase(name, p)) and p.rsplit(".", 1)[-1] not in ("*", "") for p in targets)


def unmatched(patterns: Iterable[str], names: Iterable[str]) -> list[str]:
    names = list(names)
    return [p for p in patterns if not any(n == p or fnmatch.fnmatchcase(n, p) for n in names)]


def select_linears(model: torch.nn.Module, targets: list[str], ignore: list[str], stage: str,
                   allow_unmatched_ignore: Iterable[str] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear modules matched by `targets` and not by `ignore`, in model order.

    The routers of mixture-of-experts blocks (compress.moe.router_names) are left out unless a
    target names them (a pattern whose last part is not a bare `*`, e.g. `*.mlp.gate`).
    Raises UserError naming every glob that matches no nn.Linear (ignore patterns listed in
    `allow_unmatched_ignore`, the defaults, may match nothing: a model without a separate
    lm_head is fine), and when nothing is left to work on.
    """
    names = linear_names(model)
    bad = [f"targets: {p!r}" for p in unmatched(targets, names)]
    bad += [f"ignore: {p!r}" for p in unmatched(ignore, names) if p not in allow_unmatched_ignore]
    if bad:
        example = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(*(f"{stage}.{b} matches no nn.Linear module (names look like: {example})" for b in bad))
    routers = set(router_names(model))  # MoE routers stay in 16 bits unless a target names them
    out = [n for n in names if matches(n, targets) and not matches(n, ignore)
           and (n not in routers or _explicit(n, targets))]
    if not out:
        raise UserError(f"{stage}: targets {targets} minus ignore {ignore} leave no nn.Linear module to work on")
    return out
