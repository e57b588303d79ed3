"""The documentation stays true to the tree. README.md stays short; every `squeeze <command>` that
README.md and docs/*.md show is a command of the CLI parser; every repository path and every
relative link in README.md, docs/*.md and benchmarks/BENCHMARKS.md exists (a link's #anchor
too); every recipe in recipes/ is named in README.md or docs/; and none of these pages holds
words of the project's issue tracker or of how its benchmark machines are scheduled. Each
failure names the file and line. Fast and offline: it reads files and builds the parser."""

from __future__ import annotations

import argparse
import glob
import itertools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BENCHMARKS = REPO / "benchmarks" / "BENCHMARKS.md"
MAX_README_LINES = 300

# top-level directories whose paths the pages may name; anything under them must exist
ROOTS = (".ci", "recipes", "benchmarks", "tests", "docs", "compress", "eval")
PATH = re.compile(r"(?<![\w./$~-])((?:" + "|".join(re.escape(r) for r in ROOTS) + r")/(?:[\w./*-]|\{[\w.,-]*\})*)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?<![\w-])squeeze\s+([a-z][a-z0-9-]*)")
FENCE = re.compile(r"^\s*```")
# words of the issue tracker and of the benchmark machines' scheduling: never in user-facing pages
FORBIDDEN = [re.compile(p, re.IGNORECASE) for p in (
    r"\bissues?\b", r"\bsessions?\b", r"closing note", r"\bdevice[ -](time|calls?|budget)\b", r"\blent\b",
    r"\bwarm machine\b", r"\bGPU time\b", r"\bbudget_left", r"\bnvidia-h[12]00(-x\d)?\b")]


def docs_pages() -> list[Path]:
    return sorted((REPO / "docs").glob("*.md"))


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def split_fences(text: str) -> tuple[list[tuple[int, str]], str]:
    """(line number, line) of every line inside ``` fences, and the text with those lines blanked
    (line numbers kept), for looking at prose and inline code."""
    fenced, prose, inside = [], [], False
    for n, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            inside = not inside
            prose.append("")
        elif inside:
            fenced.append((n, line))
            prose.append("")
        else:
            prose.append(line)
    return fenced, "\n".join(prose)


def code(text: str) -> list[tuple[int, str]]:
    """(line number, code) for every fenced line and every inline `code` span."""
    fenced, prose = split_fences(text)
    spans = [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in re.finditer(r"`([^`]+)`", prose)]
    return fenced + spans


def expand_braces(path: str) -> list[str]:
    """recipes/prune-{mlp,heads}-25.yaml -> both names (shell brace expansion, no nesting)."""
    parts = re.split(r"\{([^{}]*)\}", path)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def named_paths(page: Path) -> list[tuple[int, str]]:
    """(line number, path) of every repository path the page names, braces expanded."""
    out = []
    for n, line in enumerate(page.read_text().splitlines(), 1):
        for m in PATH.finditer(line):
            for p in expand_braces(m.group(1).rstrip(".,")):
                out.append((n, p))
    return out


def path_exists(page: Path, path: str) -> bool:
    for base in (REPO, page.parent):
        if any(ch in path for ch in "*?["):
            if glob.glob(str(base / path)):
                return True
        elif (base / path).exists():
            return True
    return False


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = split_fences(page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for line in prose.splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


# ---------------------------------------------------------------------------- the checks

def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (f"README.md: {n} lines, at most {MAX_README_LINES}: move reference material "
                                   "to docs/<topic>.md and measured tables to benchmarks/BENCHMARKS.md")


def test_every_squeeze_command_in_the_docs_exists():
    from squeeze.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    real = set(sub.choices)
    assert {"run", "eval", "gate"} <= real
    bad = [f"{rel(page)}:{n}: `squeeze {cmd}` is not a squeeze command (they are: {', '.join(sorted(real))})"
           for page in [README, *docs_pages()] for n, snippet in code(page.read_text())
           for cmd in COMMAND.findall(snippet) if cmd not in real]
    assert not bad, "\n".join(bad)


def test_every_named_path_and_relative_link_exists():
    bad = []
    for page in [README, *docs_pages(), BENCHMARKS]:
        for n, path in named_paths(page):
            if not path_exists(page, path):
                bad.append(f"{rel(page)}:{n}: names {path}, which does not exist")
        for n, line in enumerate(page.read_text().splitlines(), 1):
            for target in LINK.findall(line):
                if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                    continue
                file, _, anchor = target.partition("#")
                dest = (page.parent / file).resolve() if file else page
                if not dest.exists():
                    bad.append(f"{rel(page)}:{n}: link {target}: {file} does not exist")
                elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                    bad.append(f"{rel(page)}:{n}: link {target}: no heading #{anchor} in {rel(dest)}")
    assert not bad, "\n".join(bad)


def test_every_recipe_is_documented():
    named = {p for page in [README, *docs_pages()] for _, p in named_paths(page)}
    recipes = sorted([*(REPO / "recipes").glob("*.yaml"), *(REPO / "recipes").glob("*.sh")])
    assert recipes
    missing = [f"{rel(r)}: not named in README.md or docs/*.md (add it to docs/recipes.md, 'Ready recipes')"
               for r in recipes if rel(r) not in named]
    assert not missing, "\n".join(missing)


def test_no_tracker_or_scheduling_words_in_user_pages():
    bad = [f"{rel(page)}:{n}: '{m.group(0)}' in: {line.strip()}"
           for page in [README, *docs_pages(), BENCHMARKS]
           for n, line in enumerate(page.read_text().splitlines(), 1)
           for rx in FORBIDDEN for m in [rx.search(line)] if m]
    assert not bad, "user-facing pages name the issue tracker or the benchmark machines' scheduling; " \
                    "say what was measured and where (e.g. 'measured on an H200'):\n" + "\n".join(bad)
