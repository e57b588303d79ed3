"""Text data sets for evaluation and calibration.

A data set spec is one of:
  * a built-in name (``wikitext2``, ...) read from the data directory, or from the hub
    where the file is missing and `datasets` can reach it;
  * ``hf:ID[:CONFIG[:SPLIT]]``: a hub data set's ``text`` column (needs `datasets` + network);
  * a path to a ``.txt``/``.raw`` file, or a ``.jsonl`` file with a ``text`` field.
The data directory is, in order: the ``--data-dir`` flag, ``$SQUEEZE_DATA_DIR``, then
``../shared/data`` beside the project checkout or the working directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from compress.errors import UserError

# name -> (file under the data dir, hub fallback (id, config, split))
BUILTIN_TEXT = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
    "wikitext2-valid": ("wikitext-2/valid.txt", ("wikitext", "wikitext-2-v1", "validation")),
    "tinyshakespeare": ("tinyshakespeare/input.txt", None),
    "gsm8k": ("gsm8k/train.jsonl", None),  # question + answer per item (distillation text)
}
_override: Path | None = None


def set_data_dir(path: str | Path | None) -> None:
    """Set the data directory for this process (the CLI's --data-dir)."""
    global _override
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise UserError(f"--data-dir: no such directory: {p}")
        _override = p


def data_dir() -> Path | None:
    if _override is not None:
        return _override
    env = os.environ.get("SQUEEZE_DATA_DIR")
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise UserError(f"SQUEEZE_DATA_DIR: no such directory: {p}")
        return p
    project = Path(__file__).resolve().parent.parent
    for cand in (project.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def load_text(spec: str) -> str:
    """The text of a data set spec (see module docstring)."""
    if spec in BUILTIN_TEXT:
        rel, hub = BUILTIN_TEXT[spec]
        d = data_dir()
        if d is not None and (d / rel).is_file():
            return _jsonl_text(d / rel) if rel.endswith(".jsonl") else (d / rel).read_text(encoding="utf-8")
        if hub is not None:
            try:
                return _hub_text(*hub)
            except UserError as e:
                raise UserError(
                    f"data set {spec!r}: {rel} not found under the data directory ({d or 'none found'}) "
                    f"and the hub fallback failed ({e}); set --data-dir or SQUEEZE_DATA_DIR") from None
        raise UserError(f"data set {spec!r}: {rel} not found under the data directory ({d or 'none found'}); "
                        "set --data-dir or SQUEEZE_DATA_DIR")
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if not parts[0] or len(parts) > 3:
            raise UserError(f"data set {spec!r}: expected hf:ID[:CONFIG[:SPLIT]]")
        return _hub_text(parts[0], parts[1] if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "test")
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix == ".jsonl":
            return _jsonl_text(p)
        return p.read_text(encoding="utf-8")
    raise UserError(f"data set {spec!r}: not a built-in ({', '.join(BUILTIN_TEXT)}), an hf: id, or an existing file")


def check_text_source(spec: str, where: str) -> None:
    """Refuse, before any work, a data set spec that names a local file that is not there
    (built-ins with a hub fallback and hf: ids are only known at run time)."""
    if spec in BUILTIN_TEXT:
        rel, hub = BUILTIN_TEXT[spec]
        d = data_dir()
        if hub is None and (d is None or not (d / rel).is_file()):
            raise UserError(f"{where}: {spec!r}: {rel} not found under the data directory ({d or 'none found'}); "
                            "set --data-dir or SQUEEZE_DATA_DIR")
        return
    if spec.startswith("hf:"):
        return
    p = Path(spec).expanduser()
    if not p.is_file():
        raise UserError(f"{where}: {spec!r}: no such file (nor a built-in: {', '.join(BUILTIN_TEXT)}, nor hf:ID)")


def _jsonl_text(p: Path) -> str:
    out = []
    with open(p, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out.append(row["text"] if "text" in row else f"{row['question']}\n{row['answer']}")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{p}:{i}: each line must be a JSON object with a 'text' field "
                                "(or 'question' and 'answer', as GSM8K's)") from None
    return "\n\n".join(out)


def _hub_text(ds_id: str, config: str | None, split: str) -> str:
    try:
        import datasets
    except ImportError:
        raise UserError("the `datasets` package is not installed (pip install 'squeeze[hub]')") from None
    try:
        ds = datasets.load_dataset(ds_id, config, split=split)
    except Exception as e:
        raise UserError(f"cannot load hf:{ds_id}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if "text" not in ds.column_names:
        raise UserError(f"hf:{ds_id} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "".join(ds["text"])
