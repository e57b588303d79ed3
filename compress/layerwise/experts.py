"""The runner's mixture-of-experts bits, for layers whose experts are linearized
(compress.moe.LinearExperts; the pipeline does that before a stage that covers experts).

  * `passes_for`: sequential passes in which every expert's gate/up (then every expert's
    down_proj) is collected in one run of the batches and may be solved together;
  * `all_tokens`: while statistics are collected, every token may go through every expert
    (the layer's output stays the routed one), so rarely routed experts are calibrated too;
    switched off again in `finally`;
  * `routed_tokens`: how many tokens the router sent each expert, counted in the pass that
    makes the next layer's inputs.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from compress.moe import LinearExperts, expert_index


def passes_for(groups: list[list[str]]) -> list[list[list[str]]]:
    """Sequential passes over `groups`: one group per pass, except that the experts of a
    mixture-of-experts layer share a pass per projection (every expert's gate/up, then every
    expert's down_proj): their statistics come from one run of the batches, and a stage solves
    them together, instead of one pass per expert."""
    passes: list[list[list[str]]] = []
    where: dict[str, int] = {}
    for g in groups:
        e = expert_index(g[0])
        key = f"{e[0]}.*.{e[2]}" if e else None
        if key is not None and key in where:
            passes[where[key]].append(g)
            continue
        if key is not None:
            where[key] = len(passes)
        passes.append([g])
    return passes


@contextlib.contextmanager
def all_tokens(experts: list[tuple[str, LinearExperts]], on: bool) -> Iterator[None]:
    """Within the block, every token goes through every expert of `experts` when `on`; then the
    routed tokens' counts start from zero for the next pass."""
    for _, m in experts:
        m.all_tokens = on
    try:
        yield
    finally:
        for _, m in experts:
            m.all_tokens = False
            m.reset_counts()


def routed_tokens(prefix: str, experts: list[tuple[str, LinearExperts]]) -> dict[str, list[int]]:
    """{full name of the experts module: tokens routed to each expert} since the counts were reset."""
    return {f"{prefix}.{rel}": m.tokens.tolist() for rel, m in experts}
