"""The run directory: its layout, identity, lock and stage directory names.

Layout (default ``checkpoints/<recipe name>/``)::

    run.json                      identity: the recipe's compression hash (model, seed, stages)
    recipe.yaml, recipe.json      the recipe as given and as validated
    stages/01-<type>/             HF model dir + stage.json + manifest.json (complete, or absent)
    stages/<key>-<type>/          the same for a matrix recipe, content-addressed (compress.matrix)
    report.json, .md, .html       the evaluation report (eval.report); each evaluated stage directory
                                  gets its model card, README.md (eval.report.card)
    gate.json, gate.xml           the release gate's verdicts, where the recipe has a gate
    events.jsonl                  append-only: one line per stage computed and per evaluation or
                                  paired speed measured (nothing is done twice on a resume)
    tasks.json                    (run on a cluster) every task's state, node, GPUs and attempts

Every stage directory is written under a temporary name and renamed when complete, its
manifest last, so a crash never leaves a stage that looks done. Running the same recipe
again resumes after the last completed stage; a directory made by another recipe is never
overwritten without ``force``. A matrix run directory is only tied to its model and seed: its
stage directories are keyed by content, so adding variants to the matrix reuses every stage
already made.

With a store (``--store PATH``, squeeze.pipeline.fanout), each ``stages/<name>`` is a symbolic
link to ``PATH/stages/<content key>-<type>``: the names stay, the outputs are shared by
content. A stage is computed under a lock (``work/.<name>.lock`` beside ``stages/``), so two
writers (two nodes, two runs) never compute it twice: the second finds it complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

from compress.errors import UserError
from compress.fsutil import atomic_write_text
from compress.models import home
from squeeze.recipe import Recipe
from compress.spec import StageSpec, chain_key


def run_dir_for(recipe: Recipe, output: str | Path | None = None) -> Path:
    """The run directory: `output` if given, else <SQUEEZE_HOME>/<recipe name>."""
    return Path(output) if output else home() / recipe.name


def stage_dir(run_dir: Path, i: int, type_: str) -> Path:
    return run_dir / "stages" / f"{i + 1:02d}-{type_}"


def is_complete(d: Path) -> bool:
    return (d / "manifest.json").is_file()


def identity_hash(recipe: Recipe) -> str:
    """What a run directory is tied to: the compression hash, or for a matrix (whose stage
    directories are keyed by content) the model and seed only."""
    return chain_key(recipe.model, recipe.seed, []) if recipe.is_matrix else recipe.compression_hash()


def prepare_run_dir(recipe: Recipe, run_dir: Path, force: bool, recipe_text: str | None) -> None:
    """Claim `run_dir` for this recipe: new, same recipe (resume), or refuse/overwrite on `force`."""
    ident = run_dir / "run.json"
    h = identity_hash(recipe)
    if run_dir.exists() and any(run_dir.iterdir()):
        if force:
            shutil.rmtree(run_dir)
        elif not ident.is_file():
            raise UserError(f"{run_dir}: exists and is not a squeeze run directory; choose another --output "
                            "or pass --force to replace it")
        else:
            old = json.loads(ident.read_text())
            if old.get("compression_hash") != h:
                raise UserError(
                    f"{run_dir}: was made by a different recipe (model, seed or stages differ: "
                    f"{old.get('compression_hash', '?')[:12]} vs {h[:12]}); pass --force to replace it "
                    "or --output to run elsewhere")
    run_dir.mkdir(parents=True, exist_ok=True)
    if not ident.is_file():
        atomic_write_text(ident, json.dumps({"compression_hash": h, "created": time.strftime("%FT%T%z"),
                                             "recipe_name": recipe.name}, indent=1))
    if recipe_text is not None:
        atomic_write_text(run_dir / "recipe.yaml", recipe_text)
    atomic_write_text(run_dir / "recipe.json", json.dumps(recipe.as_dict(), indent=1))


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold an exclusive lock on `run_dir` (a sibling lock file) for the whole run."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f".{run_dir.name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{run_dir}: another squeeze run is using this directory") from None
        yield


def clear_partial(run_dir: Path) -> None:
    """Remove temporaries a killed run left behind (they never look like completed stages)."""
    for p in (run_dir / "stages").glob(".*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def stage_lock(out: Path):
    """Hold `out`'s writer lock (blocking): one writer of a stage directory at a time, on any
    host that sees the same file system with working locks (local disks, NFSv4)."""
    lock = Path(out).parent.parent / "work" / f".{Path(out).name}.lock"  # <run or store>/work/
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def record(events: Path | None, kind: str, **what) -> None:
    """Append one line to the run's events.jsonl (O_APPEND: whole lines from any process)."""
    if events is None:
        return
    line = json.dumps({"event": kind, "time": time.time(), **what}) + "\n"
    fd = os.open(events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(run_dir: Path) -> list[dict]:
    f = Path(run_dir) / "events.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.is_file() else []


def link_store(run_dir: Path, store: Path, recipe: Recipe, dirs: list[Path], stages: list[StageSpec]) -> list[Path]:
    """Point each of a chain's run-directory stage names at its content-addressed directory in
    `store` (made on first use); the stage directories to write into, in the store."""
    out = []
    for i, d in enumerate(dirs):
        target = Path(store).resolve() / "stages" / f"{chain_key(recipe.model, recipe.seed, stages[:i + 1])[:16]}-" \
                                                       f"{stages[i].type}"
        if d.is_symlink() and d.resolve() != target:
            d.unlink()
        if not d.is_symlink() and not d.exists():
            d.parent.mkdir(parents=True, exist_ok=True)
            d.symlink_to(target, target_is_directory=True)
        out.append(target if d.is_symlink() else d)  # a real directory from a run without the store stays
    return out


def chain_dirs(recipe: Recipe, run_dir: Path, stages: list[StageSpec]) -> list[Path]:
    """Output directory of each stage of a chain: numbered for one recipe, keyed by content for a
    matrix (so variants that share a prefix of stages share its directories)."""
    if not recipe.is_matrix:
        return [stage_dir(run_dir, i, s.type) for i, s in enumerate(stages)]
    return [run_dir / "stages" / f"{chain_key(recipe.model, recipe.seed, stages[:i + 1])[:12]}-{s.type}"
            for i, s in enumerate(stages)]


def artifact_names(recipe: Recipe) -> list[str]:
    """Names the report will give the artifacts (what a gate's `artifacts` glob matches)."""
    if recipe.is_matrix:
        return [v.name for v in recipe.variants]
    return [d.name for d in chain_dirs(recipe, Path(), recipe.stages)]
