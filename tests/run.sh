#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest (arguments go to pytest,
# e.g. `-m "not slow"` to skip the SmolLM2 end-to-end tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SQUEEZE_BROWSER=1 . .ci/env.sh  # + Debian's chromium for the HTML report's browser tests
exec python -m pytest "$@"
