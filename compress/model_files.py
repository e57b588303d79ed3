"""Whether a local Hugging Face model directory can be loaded: config.json parses, every
safetensors file is whole (its header read, its tensors not), and pickled weights (which can
run code when loaded) are refused unless allowed. Each failure is a one-line UserError.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from compress.errors import UserError

PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")   # weight files that torch unpickles


def check_model_dir(d: Path, allow_pickle: bool) -> None:
    """A readable HF directory: config.json that parses, and weights whose files are whole."""
    if not (d / "config.json").is_file():
        raise UserError(f"model.source: {d} has no config.json; it is not a Hugging Face model directory")
    try:
        json.loads((d / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{d / 'config.json'}: unreadable or not JSON ({e})") from None
    files = sorted(d.glob("*.safetensors"))
    if files:
        for f in files:
            check_safetensors(f)
        return
    pickled = [f.name for pat in PICKLED for f in d.glob(pat)]
    if pickled and not allow_pickle:
        raise UserError(
            f"model.source: {d} has only pickled weights ({', '.join(sorted(pickled))}); loading them can run "
            "arbitrary code: set model.allow_pickle: true (or --allow-pickle) if you trust the source")
    if not pickled:
        raise UserError(f"model.source: {d} has no weights (*.safetensors)")


def safetensors_header(f: Path) -> tuple[int, dict]:
    """(header length, header) of a safetensors file, read without its tensors. Raises ValueError
    or OSError when the file is too short or the header is not JSON."""
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > f.stat().st_size - 8:
            raise ValueError(f"header length {n} exceeds the file ({f.stat().st_size} bytes)")
        return n, json.loads(fh.read(n))


def check_safetensors(f: Path) -> None:
    """Raise a one-line UserError if `f` is not a whole safetensors file (a truncated copy, a
    corrupt header), without reading the tensors."""
    try:
        n, header = safetensors_header(f)
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"{f}: not a readable safetensors file ({e}); the checkpoint is corrupt or incomplete") from None
    size = f.stat().st_size
    if 8 + n + end > size:
        raise UserError(f"{f}: truncated: its header needs {8 + n + end} bytes, the file has {size}; the checkpoint "
                        "is incomplete (copy it again)")
