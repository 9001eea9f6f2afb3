#!/usr/bin/env bash
# Create .venv in the project root and install the requirements.  Three routes:
#   bash scripts/install.sh                 CPU: Python 3.12 venv, requirements.txt, the project.
#   bash scripts/install.sh --gpu [--cuda X] GPU: torch from PyTorch's wheel index for CUDA X
#              (12.6, 12.8, 12.9 or 13.0; default: the newest the driver supports, read
#              from nvidia-smi), then requirements.txt, then Transformer Engine built against
#              that torch with TE's core wheel for the same CUDA major (core_cu12 / core_cu13).
#              A driver below CUDA X's own but within its major family's minimum runs it
#              through CUDA minor-version compatibility (a note says so); older is refused,
#              naming the --cuda that fits.
#   bash scripts/install.sh --container     inside an NGC PyTorch image (torch, Transformer
#              Engine and Apex already there): a venv that sees the image's packages
#              (--system-site-packages) gets megatron-core, the other requirements and the
#              project, with the image's torch/TE/Apex/CUDA packages pinned so pip never
#              replaces them.
#   --dry-run  print the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."

USAGE="usage: bash scripts/install.sh [--gpu [--cuda 12.6|12.8|12.9|13.0] | --container] [--dry-run]"
GPU=0
CONTAINER=0
DRY=0
CUDA=""
while [ $# -gt 0 ]; do
  case "$1" in
    --gpu) GPU=1 ;;
    --container) CONTAINER=1 ;;
    --dry-run) DRY=1 ;;
    --cuda) [ $# -ge 2 ] || { echo "error: --cuda needs a version ($USAGE)" >&2; exit 2; }
            CUDA=$2; shift ;;
    --cuda=*) CUDA=${1#--cuda=} ;;
    *) echo "error: unknown option $1 ($USAGE)" >&2
       exit 2 ;;
  esac
  shift
done

# CUDA release, its minimum NVIDIA driver, and "wheel" for the builds this script installs:
# one table, shared with the trainer's start-up check (platform/gpu_check.py).
DRIVER_TABLE=$(grep -v '^#' parcae_megatron/platform/cuda_drivers.txt)
SUPPORTED_CUDA=$(awk '$3 == "wheel" { printf "%s%s", sep, $1; sep = " " }' <<<"$DRIVER_TABLE")

if [ "$GPU" = 1 ] && [ "$CONTAINER" = 1 ]; then
  echo "error: --gpu and --container are two routes: choose one ($USAGE)" >&2
  exit 2
fi
if [ -n "$CUDA" ] && [ "$GPU" = 0 ]; then
  echo "error: --cuda goes with --gpu (the container route uses the image's CUDA) ($USAGE)" >&2
  exit 2
fi
if [ -n "$CUDA" ] && [[ " $SUPPORTED_CUDA " != *" $CUDA "* ]]; then
  echo "error: --cuda $CUDA is not one of ${SUPPORTED_CUDA// /, }" >&2
  exit 2
fi

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

version_ge() {  # version_ge A B: A >= B, comparing dotted numbers field by field
  [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | head -n 1)" = "$2" ]
}

min_driver() {  # min_driver CUDA: the oldest driver that runs it natively (its GA driver)
  awk -v c="$1" '$1 == c && $3 != "family" { print $2 }' <<<"$DRIVER_TABLE"
}

family_min() {  # family_min CUDA: the oldest driver that runs it through minor-version
  # compatibility (the minimum of its major release family, the table's "family" rows)
  awk -v f="${1%%.*}.x" '$1 == f && $3 == "family" { print $2 }' <<<"$DRIVER_TABLE"
}

newest_cuda() {  # newest_cuda DRIVER [LIST]: the newest CUDA in LIST (default: table) it runs natively
  local driver=$1 list=${2:-} best="" cuda minimum kind
  while read -r cuda minimum kind; do
    if [ "$kind" = family ]; then continue; fi
    if [ -n "$list" ] && [[ " $list " != *" $cuda "* ]]; then continue; fi
    if version_ge "$driver" "$minimum"; then best=$cuda; fi
  done <<<"$DRIVER_TABLE"
  echo "$best"
}

compatible_cuda() {  # compatible_cuda DRIVER: the newest installable CUDA it runs through
  local best="" cuda minimum  # minor-version compatibility (empty: none)
  for cuda in $SUPPORTED_CUDA; do
    minimum=$(family_min "$cuda")
    if [ -n "$minimum" ] && version_ge "$1" "$minimum"; then best=$cuda; fi
  done
  echo "$best"
}

upgrade_hint() {  # the driver to upgrade to when no build here runs on this one
  local oldest newest floor="" cuda minimum
  for cuda in $SUPPORTED_CUDA; do
    minimum=$(family_min "$cuda")
    if [ -n "$minimum" ] && { [ -z "$floor" ] || version_ge "$floor" "$minimum"; }; then
      floor=$minimum; oldest=$cuda
    fi
  done
  newest=${SUPPORTED_CUDA##* }
  echo "upgrade the driver to >= $floor (the CUDA ${oldest%%.*}.x builds, through minor-version" \
       "compatibility) or >= $(min_driver "$newest") (every build natively, --cuda $newest)"
}

compat_note() {  # compat_note DRIVER SUPPORTS: the one line for a build above the driver's CUDA
  echo "note: NVIDIA driver $1 supports CUDA up to ${2:-an older release} natively; the CUDA" \
       "$CUDA build runs on it through CUDA minor-version compatibility (limited: no JIT of PTX" \
       "newer than the driver's CUDA); confirm on a GPU node with" \
       "\`.venv/bin/python benchmarks/gpu_acceptance.py\`"
}

driver_version() {  # the NVIDIA driver of this machine's first GPU; empty without a working
  local version       # nvidia-smi (a failing one prints its complaint on stdout)
  command -v nvidia-smi >/dev/null 2>&1 || return 0
  version=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null \
      | head -n 1 | tr -d ' ') || true
  if [[ $version =~ ^[0-9]+(\.[0-9]+)*$ ]]; then echo "$version"; fi
}

choose_cuda() {  # sets CUDA from --cuda or the driver; refuses a driver too old for it
  # A build the driver runs natively first (its GA driver or newer); else the newest build
  # of a major family whose minimum the driver meets (minor-version compatibility, with a note).
  local driver fits compatible supports
  driver=$(driver_version)
  if [ -z "$driver" ]; then
    if [ -z "$CUDA" ]; then
      echo "error: no working nvidia-smi here to read the driver version from: pass --cuda" \
           "${SUPPORTED_CUDA// /|} (the newest your GPU nodes' driver supports)" >&2
      exit 1
    fi
    echo "No working nvidia-smi here: the driver is not checked against CUDA $CUDA"
    return 0
  fi
  fits=$(newest_cuda "$driver" "$SUPPORTED_CUDA")
  compatible=$(compatible_cuda "$driver")
  supports=$(newest_cuda "$driver")
  if [ -z "$CUDA" ]; then
    if [ -z "$fits$compatible" ]; then
      echo "error: NVIDIA driver $driver ${supports:+supports CUDA up to $supports; it }is older" \
           "than every CUDA build installed here: $(upgrade_hint)" >&2
      exit 1
    fi
    CUDA=${fits:-$compatible}
    echo "NVIDIA driver $driver: installing the CUDA $CUDA build (pass --cuda to choose)"
    if [ -z "$fits" ]; then compat_note "$driver" "$supports"; fi
  elif version_ge "$driver" "$(min_driver "$CUDA")"; then
    return 0
  elif version_ge "$driver" "$(family_min "$CUDA")"; then
    compat_note "$driver" "$supports"
  else
    local fix="use --cuda $fits" needs
    if [ -z "$fits" ]; then
      fix="use --cuda $compatible (through minor-version compatibility)"
      [ -n "$compatible" ] || fix=$(upgrade_hint)
    fi
    needs="NVIDIA driver >= $(min_driver "$CUDA")"
    if [ "$(family_min "$CUDA")" != "$(min_driver "$CUDA")" ]; then
      needs="$needs (>= $(family_min "$CUDA") through minor-version compatibility)"
    fi
    echo "error: CUDA $CUDA needs $needs, this node has" \
         "$driver${supports:+ (CUDA up to $supports)}: $fix" >&2
    exit 1
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

CHECK='import torch, megatron.core; print("torch", torch.__version__, "CUDA", torch.version.cuda, "megatron-core", megatron.core.__version__)'
CHECK_TE='import transformer_engine.pytorch as te, transformer_engine; print("transformer-engine", transformer_engine.__version__)'

if [ "$CONTAINER" = 1 ]; then
  # The image's own Python (python3 in NGC PyTorch images). A venv, not the image's
  # site-packages: under pyxis/enroot every job starts from the pristine image, so packages
  # installed into it would be gone; .venv lives in the (mounted) repository and persists.
  # --system-site-packages lets it see the image's torch, Transformer Engine and Apex.
  PY=${PYTHON:-python3}
  echo "Using $PY (the container's Python)"
  if [ "$DRY" = 0 ] && [ -f .venv/pyvenv.cfg ] \
      && ! grep -qx 'include-system-site-packages = true' .venv/pyvenv.cfg; then
    echo "error: .venv exists and does not see the container's packages (not made by" \
         "--container): move it away and run this again" >&2
    exit 1
  fi
  run "$PY" -m venv --system-site-packages .venv
  # Pins every package of the image's CUDA stack (torch, TE, Apex, triton, nvidia-*) in a
  # constraints file, refuses an image without CUDA torch or TE, and writes requirements.txt
  # without the pinned packages (its torch pin is for the pip routes).
  run .venv/bin/python scripts/container_pins.py requirements.txt \
      .venv/container-constraints.txt .venv/container-requirements.txt
  # NGC images set PIP_CONSTRAINT to their own file, which pins versions of general packages
  # (numpy, transformers, ...) that our requirements may need newer; ours pins what matters.
  run env PIP_CONSTRAINT= .venv/bin/python -m pip install --quiet \
      -c .venv/container-constraints.txt -r .venv/container-requirements.txt
  run env PIP_CONSTRAINT= .venv/bin/python -m pip install --quiet --no-deps -e .
  run .venv/bin/python -c "$CHECK"
  run .venv/bin/python -c "$CHECK_TE"
  exit 0
fi

if [ "$GPU" = 1 ]; then
  choose_cuda
fi
PY=$(find_python312) || {
  echo "error: Python 3.12 is required (megatron-core >= 0.17 needs it) and none was found." >&2
  echo "       Install it (e.g. 'pyenv install 3.12') or set PYTHON=/path/to/python3.12." >&2
  exit 1
}
echo "Using $PY"
if [ "$DRY" = 1 ] || [ ! -x .venv/bin/python ]; then run "$PY" -m venv .venv; fi
run .venv/bin/python -m pip install --quiet --upgrade pip
if [ "$GPU" = 1 ]; then
  # torch of requirements.txt's version, built for CUDA $CUDA, from PyTorch's own index
  # (PyPI's build is for one CUDA only); requirements.txt then finds its pin satisfied.
  # --force-reinstall: an existing .venv's torch of the same version but another CUDA build
  # would otherwise count as installed and stay.
  TORCH=$(grep -E '^torch==' requirements.txt)
  run .venv/bin/python -m pip install --quiet --force-reinstall --index-url \
      "https://download.pytorch.org/whl/cu${CUDA//./}" "$TORCH"
  run .venv/bin/python -c "import sys, torch; c = torch.version.cuda; sys.exit(None if c == '$CUDA' else f'error: torch {torch.__version__} is built for CUDA {c}, not $CUDA')"
fi
# torch (and everything else) first: Transformer Engine's extension builds against it.
run .venv/bin/python -m pip install --quiet -r requirements.txt
if [ "$GPU" = 1 ]; then
  TE=$(grep -E '^transformer-engine' requirements-gpu.txt)
  TE=${TE/\[pytorch\]/[pytorch,core_cu${CUDA%%.*}]}  # TE's core library for the CUDA major
  echo "Building $TE against this torch (many minutes; the build log follows)"
  run env NVTE_FRAMEWORK=pytorch .venv/bin/python -m pip install --no-build-isolation -v "$TE"
fi
# The project itself, editable: `import parcae_megatron`, `torchrun -m parcae_megatron.train`,
# the benchmarks and the parcae-* commands work from any directory.
run .venv/bin/python -m pip install --quiet --no-deps -e .
run .venv/bin/python -c "$CHECK"
if [ "$GPU" = 1 ]; then
  run .venv/bin/python -c "$CHECK_TE"
fi
