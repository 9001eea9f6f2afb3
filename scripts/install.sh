#!/usr/bin/env bash
# Create .venv in the project root with a Python 3.12 interpreter and install
# the requirements.  Usage: bash scripts/install.sh [--gpu] [--dry-run]
#   --gpu      also build Transformer Engine (GPU machines with a CUDA toolkit only): torch
#              first (requirements.txt), then the transformer-engine pin of
#              requirements-gpu.txt with --no-build-isolation, so TE's PyTorch extension
#              compiles against that torch; its build log is shown (it takes many minutes).
#   --dry-run  print the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

GPU=0
DRY=0
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --dry-run) DRY=1 ;;
    *) echo "error: unknown option $arg (usage: bash scripts/install.sh [--gpu] [--dry-run])" >&2
       exit 2 ;;
  esac
done

quoted() {  # quoted WORD: WORD as the shell reads it back (single quotes when needed)
  if [[ $1 =~ ^[A-Za-z0-9_./=:,+@-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

run() {  # run CMD...: the command, or with --dry-run its line, ready to paste
  if [ "$DRY" = 1 ]; then
    printf '+'; for word in "$@"; do printf ' %s' "$(quoted "$word")"; done; printf '\n'
  else
    "$@"
  fi
}

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
if [ "$DRY" = 1 ] || [ ! -x .venv/bin/python ]; then run "$PY" -m venv .venv; fi
run .venv/bin/python -m pip install --quiet --upgrade pip
# torch (and everything else) first: Transformer Engine's extension builds against it.
run .venv/bin/python -m pip install --quiet -r requirements.txt
if [ "$GPU" = 1 ]; then
  TE=$(grep -E '^transformer-engine' requirements-gpu.txt)
  # TE's core library comes as a wheel per CUDA major (core_cu12 / core_cu13): match torch's.
  PROBE='import torch; print((torch.version.cuda or "").split(".")[0])'
  if [ "$DRY" = 1 ]; then
    echo "+ CUDA_MAJOR=\$(.venv/bin/python -c '$PROBE')"
    CUDA_MAJOR='${CUDA_MAJOR}'
  else
    CUDA_MAJOR=$(.venv/bin/python -c "$PROBE")
    if [ -z "$CUDA_MAJOR" ]; then
      echo "error: the installed torch has no CUDA build; Transformer Engine needs one" >&2
      exit 1
    fi
  fi
  TE=${TE/\[pytorch\]/[pytorch,core_cu$CUDA_MAJOR]}
  echo "Building $TE against this torch (many minutes; the build log follows)"
  if [ "$DRY" = 1 ]; then  # "…${CUDA_MAJOR}…" stays a variable for the line above
    echo "+ env NVTE_FRAMEWORK=pytorch .venv/bin/python -m pip install --no-build-isolation -v \"$TE\""
  else
    run env NVTE_FRAMEWORK=pytorch .venv/bin/python -m pip install --no-build-isolation -v "$TE"
  fi
fi
# The project itself, editable: `import parcae_megatron`, `torchrun -m parcae_megatron.train`,
# the benchmarks and the parcae-* commands work from any directory.
run .venv/bin/python -m pip install --quiet --no-deps -e .
run .venv/bin/python -c 'import torch, megatron.core; print("torch", torch.__version__, "megatron-core", megatron.core.__version__)'
if [ "$GPU" = 1 ]; then
  run .venv/bin/python -c 'import transformer_engine.pytorch as te, transformer_engine; print("transformer-engine", transformer_engine.__version__)'
fi
