"""The codebase's shape, checked on its source (ast, nothing imported):

- layering: compress/ (compression) never imports eval/ (evaluation) nor the top layer
  squeeze/ (the CLI, the pipeline and the recipe schema that composes both halves); eval/ never
  imports squeeze/;
- no import cycle between modules, counting imports inside functions;
- files under 300 lines; functions under 60 lines, or saying why in their docstring
  ("Kept as one function: ...", at most three of them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "eval", "squeeze")
TOP = "squeeze"
MAX_FILE, MAX_FUNCTION, MAX_LONG = 300, 60, 3
REASON = "Kept as one function:"


def modules(root: Path = REPO) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__)."""
    out = {}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = list(p.relative_to(root).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def import_graph(mods: dict[str, tuple[Path, bool]]) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}, every import statement anywhere in the file
    (inside functions too), relative imports resolved, names resolved to the deepest module."""

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, is_pkg) in mods.items():
        here = name.split(".") if is_pkg else name.split(".")[:-1]
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                    else node.module
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r is not None and r != name:
                    edges.setdefault(r, node.lineno)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(graph.get(w, {}))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def in_top(name: str) -> bool:
    return name == TOP or name.startswith(TOP + ".")


def wrong_way(graph: dict[str, dict[str, int]], mods, root: Path = REPO) -> list[str]:
    out = []
    for m, edges in graph.items():
        for t, line in edges.items():
            if m.startswith("compress") and (t.startswith("eval") or in_top(t)):
                out.append(f"{mods[m][0].relative_to(root)}:{line}: compress module {m} imports {t} (only the "
                           f"top layer, {TOP}/, may import both halves)")
            if m.startswith("eval") and in_top(t):
                out.append(f"{mods[m][0].relative_to(root)}:{line}: eval module {m} imports the top layer ({t})")
    return out


def long_functions(mods, root: Path = REPO) -> list[tuple[str, int, bool]]:
    """(where, lines, states its reason) for every function over MAX_FUNCTION lines."""
    out = []
    for path, _ in mods.values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION:
                    doc = ast.get_docstring(node) or ""
                    out.append((f"{path.relative_to(root)}:{node.lineno} {node.name}", n, REASON in doc))
    return out


def test_no_wrong_way_imports():
    mods = modules()
    bad = wrong_way(import_graph(mods), mods)
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    found = cycles(import_graph(modules()))
    assert not found, "import cycles (imports inside functions count):\n" + "\n".join(" <-> ".join(c) for c in found)


def test_files_under_300_lines():
    big = [f"{p.relative_to(REPO)}: {n} lines" for p, _ in modules().values()
           if (n := len(p.read_text().splitlines())) >= MAX_FILE]
    assert not big, f"files of {MAX_FILE} lines or more (split them by concern):\n" + "\n".join(big)


def test_long_functions_say_why():
    long = long_functions(modules())
    silent = [f"{w}: {n} lines" for w, n, why in long if not why]
    assert not silent, (f"functions over {MAX_FUNCTION} lines (split them, or say why in the docstring with "
                        f"{REASON!r}):\n" + "\n".join(silent))
    assert len(long) <= MAX_LONG, f"more than {MAX_LONG} long functions: {[w for w, _, _ in long]}"


def test_package_inits_only_export():
    """A package's __init__.py imports and exports; it defines no functions or classes."""
    bad = []
    for name, (path, is_pkg) in modules().items():
        if is_pkg:
            defs = [n.name for n in ast.parse(path.read_text()).body
                    if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
            if defs:
                bad.append(f"{path.relative_to(REPO)}: defines {', '.join(defs)}")
    assert not bad, "\n".join(bad)


# the checks themselves, on a small fake tree: each fails on what it is meant to catch

def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return modules(tmp_path)


def test_checks_catch_a_function_level_cycle_and_a_wrong_way_import(tmp_path):
    mods = _tree(tmp_path, {
        "compress/__init__.py": "", "eval/__init__.py": "", "squeeze/__init__.py": "",
        "compress/a.py": "def f():\n    from compress import b\n",
        "compress/b.py": "from . import a\n",
        "compress/c.py": "def g():\n    from eval.x import y\n",
        "eval/x.py": "from squeeze.pipeline import run\ny = 1\n",
        "eval/z.py": "",
        "squeeze/pipeline.py": "from eval import z\n",
    })
    graph = import_graph(mods)
    assert cycles(graph) == [["compress.a", "compress.b"]]
    bad = wrong_way(graph, mods, tmp_path)
    assert any("compress module compress.c imports eval.x" in b for b in bad)
    assert any("eval module eval.x imports the top layer (squeeze.pipeline)" in b for b in bad)
    assert not any("squeeze.pipeline imports" in b for b in bad)  # the top layer may import eval


@pytest.mark.parametrize("lines,why,flagged", [(61, False, True), (61, True, False), (60, False, False)])
def test_checks_flag_long_functions(tmp_path, lines, why, flagged):
    doc = f'    """{REASON} the steps share one open file."""\n' if why else '    """Short doc."""\n'
    body = "".join(f"    x{i} = {i}\n" for i in range(lines - 2))
    files = {"compress/__init__.py": "", "eval/__init__.py": "", "compress/m.py": "def f():\n" + doc + body}
    found = long_functions(_tree(tmp_path, files), tmp_path)
    assert [(w.split()[-1], n, not y) for w, n, y in found if not y] == ([("f", lines, True)] if flagged else [])
