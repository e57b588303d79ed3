"""Which facts answer for an engine: keyed by engine, platform (cpu, or cuda: an NVIDIA GPU) and
version; a row holds from the version it was measured on until a newer row (eval.engines.facts)."""

from __future__ import annotations

from eval.engines.facts import HFFacts, RunsEverything, VLLMFacts
from eval.engines.facts_vllm_cpu import VLLMCpuFacts


def facts_table() -> dict[tuple[str, str], list[tuple[str, type[RunsEverything]]]]:
    return {("hf", "cpu"): [("5.19", HFFacts)], ("hf", "cuda"): [("5.19", HFFacts)],
            ("vllm", "cpu"): [("0.32", VLLMCpuFacts)], ("vllm", "cuda"): [("0.26", VLLMFacts)]}


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).release[:2]
    except InvalidVersion:
        return ()


def lookup(engine: str, device: str, version: str | None, dtype: str | None) -> RunsEverything:
    """The facts of `engine` at `version` on `device`'s platform, running at `dtype`."""
    rows = facts_table()[(engine, "cuda" if device.startswith("cuda") else "cpu")]
    since, cls = rows[0]
    detected = _release(version) if version else ()
    for s, c in rows:
        if detected and detected >= _release(s):
            since, cls = s, c
    return cls(engine, ".".join(map(str, detected)) if detected else since, dtype, device)
