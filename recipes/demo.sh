#!/usr/bin/env bash
# The main job: set up .venv if needed, then run recipes/demo.yaml on the built-in SmolLM2
# (50 % magnitude pruning + evaluation) and print the report. Extra arguments go to
# `squeeze run` (e.g. --force).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
. .ci/env.sh
exec squeeze run recipes/demo.yaml "$@"
