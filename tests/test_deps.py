"""What the code imports is what pyproject.toml declares, and the GPU constraints agree with it.

Every absolute import in compress/ and eval/ (module level or inside a function) whose top-level
module is neither the standard library's nor the project's must come from a distribution that
pyproject.toml names: in `dependencies` or in an extra (an engine's stack, `hub`). The module ->
distribution map is importlib.metadata.packages_distributions() of this environment; modules
this CPU machine does not have installed are named in NOT_HERE with their distribution.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from eval import stack

REPO = Path(__file__).resolve().parent.parent
LOCAL = {"compress", "eval"}
# imported only on GPU machines (guarded), so packages_distributions() here cannot say
NOT_HERE = {"pynvml": ["nvidia-ml-py"]}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def third_party_imports(roots=("compress", "eval")) -> dict[str, set[str]]:
    """Top-level module -> the files importing it, for every absolute import under `roots`."""
    out: dict[str, set[str]] = {}
    for root in roots:
        for f in sorted((REPO / root).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text(), str(f))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for n in names:
                    top = n.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL and top != "__future__":
                        out.setdefault(top, set()).add(str(f.relative_to(REPO)))
    return out


def declared() -> dict[str, list[Requirement]]:
    """Normalized distribution name -> its requirements in pyproject (base and every extra)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    out: dict[str, list[Requirement]] = {}
    for r in map(Requirement, reqs):
        out.setdefault(norm(r.name), []).append(r)
    return out


def test_every_third_party_import_is_declared():
    dists = md.packages_distributions()
    decl = declared()
    imports = third_party_imports()
    assert {"torch", "transformers", "vllm", "compressed_tensors", "jinja2", "pynvml"} <= imports.keys()
    undeclared = []
    for mod, files in sorted(imports.items()):
        providers = dists.get(mod) or NOT_HERE.get(mod)
        if not providers:
            undeclared.append(f"{mod} (imported by {sorted(files)[0]}): not installed here; name its distribution "
                              "in NOT_HERE and in pyproject.toml")
        elif not any(norm(p) in decl for p in providers):
            undeclared.append(f"{mod} (distribution {'/'.join(providers)}, imported by {sorted(files)[0]}) is not "
                              "declared in pyproject.toml")
    assert not undeclared, "\n".join(undeclared)


def test_gpu_constraints_pin_what_pyproject_allows():
    """Each pin in .ci/constraints-gpu.txt is a declared dependency whose every specifier in
    pyproject.toml (base and extras, the cpu stack's aside) admits the pinned version."""
    pins = stack.pins()
    assert set(pins) == {"vllm", "torch", "transformers", "compressed-tensors", "lm-eval", "bitsandbytes"}
    assert pins["vllm"] == "0.26.0" and pins["torch"] == "2.11.0" and pins["transformers"].startswith("5.17")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    gpu_side = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    for name, version in pins.items():
        mine = [r for r in gpu_side if norm(r.name) == norm(name)]
        assert mine, f"{name} is pinned for the GPU stack but not a dependency of it"
        for r in mine:
            assert r.specifier.contains(version, prereleases=True), f"pyproject's {r} refuses the pinned {name}=={version}"
