#!/usr/bin/env bash
# The test suite: set up .venv if needed, then run pytest (arguments go to pytest,
# e.g. `-m "not slow"` to skip the SmolLM2 end-to-end tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. .ci/env.sh
exec python -m pytest "$@"
