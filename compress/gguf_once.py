"""Reading a GGUF file once per import (compress.models.import_gguf).

transformers (5.x) parses a GGUF file's metadata three times when it loads one: for the config,
for the weights and for the tokenizer, each through a new `gguf.GGUFReader`, which walks every
field (SmolLM2's 49,152-token vocabulary and its merges: about 10 s a time on 2 cores). Mapping
its tensor names, it rebuilds gguf's `TensorNameMap` for every module of the model (397 times for
SmolLM2: 15 s). Profiled on 2 cores (2026-12-07): those two are 46 of the import's 78 s.

Both are pure functions of their arguments over a file that does not change during the import,
so `read_once()` memoizes them for its duration, through the names transformers imports from
`gguf` at call time. Nothing maintained offers this; the patch is undone on the way out, and
where gguf lacks either name the import runs as before.
"""

from __future__ import annotations

import contextlib
import functools


@contextlib.contextmanager
def read_once():
    """Within the block: one GGUFReader per (path, mode), one TensorNameMap per (arch, blocks)."""
    try:
        import gguf
    except ImportError:
        yield
        return
    reader, name_map = getattr(gguf, "GGUFReader", None), getattr(gguf, "get_tensor_name_map", None)
    if reader is None or name_map is None:
        yield
        return
    readers: dict = {}

    def shared_reader(path, mode: str = "r"):
        key = (str(path), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = shared_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map
