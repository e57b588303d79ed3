#!/usr/bin/env bash
# The main job: set up .venv if needed, then run recipes/demo.yaml on the built-in SmolLM2
# (50 % magnitude pruning + evaluation) and print the report. Extra arguments go to
# `squeeze run` (e.g. --force).
# On a machine whose NVIDIA GPU answers `nvidia-smi -L`: the GPU stack of
# .ci/constraints-gpu.txt in .venv-gpu instead (.ci/env-gpu.sh: SQUEEZE_WHEELS=DIR installs it
# from a directory of wheels, for hosts without a package index) and recipes/demo-gpu.yaml.
#   SQUEEZE_STACK=cpu|gpu  choose instead of asking nvidia-smi
#   SQUEEZE_DRY_RUN=1      print the plan (the GPU install's commands, the recipe), run nothing
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
stack="${SQUEEZE_STACK:-}"
if [ -z "$stack" ]; then
  stack=cpu
  if command -v nvidia-smi >/dev/null 2>&1; then
    if nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then stack=gpu
    else echo "nvidia-smi lists no GPU: the CPU stack and recipes/demo.yaml" >&2; fi
  fi
fi
if [ "$stack" = gpu ]; then
  . .ci/env-gpu.sh
  recipe=recipes/demo-gpu.yaml
else
  [ -n "${SQUEEZE_DRY_RUN:-}" ] || . .ci/env.sh
  recipe=recipes/demo.yaml
fi
if [ -n "${SQUEEZE_DRY_RUN:-}" ]; then echo "would run: squeeze run $recipe $*"; exit 0; fi
exec squeeze run "$recipe" "$@"
