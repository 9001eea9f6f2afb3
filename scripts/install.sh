#!/usr/bin/env bash
# Create .venv in the project root with a Python 3.12 interpreter and install
# the requirements.  Usage: bash scripts/install.sh [--gpu]
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local c
  for c in "${PYTHON:-}" python3.12 "$(command -v pyenv >/dev/null 2>&1 && pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12"; do
    [ -n "$c" ] || continue
    if PYENV_VERSION=3.12.1 "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      # Resolve pyenv shims to the real interpreter so the venv does not depend on PYENV_VERSION.
      PYENV_VERSION=3.12.1 "$c" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  # Any pyenv-installed 3.12.x.
  if command -v pyenv >/dev/null 2>&1; then
    for c in "$(pyenv root)"/versions/3.12*/bin/python3.12; do
      [ -x "$c" ] && { echo "$c"; return 0; }
    done
  fi
  return 1
}

PY=$(find_python312) || {
  echo "error: Python 3.12 is required (megatron-core >= 0.17 needs it) and none was found." >&2
  echo "       Install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
  exit 1
}
echo "Using $PY"
REQ=requirements.txt
if [ "${1:-}" = "--gpu" ]; then REQ=requirements-gpu.txt; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$REQ"
# The project itself, editable: `import parcae_megatron`, `torchrun -m parcae_megatron.train`,
# the benchmarks and the parcae-* commands work from any directory.
.venv/bin/python -m pip install --quiet --no-deps -e .
.venv/bin/python -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
