"""Reading a GGUF file once per import (compress.models.import_gguf).

transformers (5.x) parses a GGUF file's metadata three times when it loads one: for the config,
for the weights and for the tokenizer, each through a new `gguf.GGUFReader`, which walks every
field (SmolLM2's 49,152-token vocabulary and its merges: about 10 s a time on 2 cores). Mapping
its tensor names, it rebuilds gguf's `TensorNameMap` for every module of the model (397 times for
SmolLM2: 15 s). Profiled on 2 cores (2026-12-07): those two are 46 of the import's 78 s.

Both are pure functions of their arguments over a file that does not change during the import,
so `read_once()` memoizes them for its duration (functools.cache, swapped in by the standard
library's mock.patch.multiple), through the names transformers imports from `gguf` at call
time; where gguf lacks either name the import runs as before.
"""

from __future__ import annotations

import contextlib
import functools
from unittest import mock


def read_once():
    """A context: within it one GGUFReader per (path, mode) and one TensorNameMap per (arch,
    blocks), each memoized afresh per call (mock.patch.multiple puts gguf's own back)."""
    try:
        import gguf
    except ImportError:
        return contextlib.nullcontext()
    if not (hasattr(gguf, "GGUFReader") and hasattr(gguf, "get_tensor_name_map")):
        return contextlib.nullcontext()
    return mock.patch.multiple(gguf, GGUFReader=functools.cache(gguf.GGUFReader),
                               get_tensor_name_map=functools.cache(gguf.get_tensor_name_map))
