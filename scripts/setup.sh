#!/usr/bin/env bash
# One-time (and idempotent) setup of everything fxp needs on this machine:
#   1. Debian packages: compilers, CMake, Ninja, GoogleTest, Python venv, Fashion-MNIST;
#   2. the Python environment ${FXP_VENV:-$HOME/.cache/fxp/venv} with the pinned torch;
#   3. the fxp package of this checkout, on that environment's path (a .pth file);
#   4. the build in build/ (libfxp, tests, examples).
# Environment: FXP_VENV (venv path), FXP_CUDA=AUTO|ON|OFF (CUDA kernels),
# FXP_SKIP_APT=1 (no apt-get, e.g. on a box without it),
# FXP_SYSTEM_PYTHON=1 (use the python3 on PATH as is, with its torch; no venv),
# FXP_SETUP_BUILD=0 (everything but the build in build/).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${FXP_VENV:-$HOME/.cache/fxp/venv}
BUILD=$ROOT/build
REQUIREMENTS=$ROOT/scripts/requirements.txt

step() { printf '\n==> %s\n' "$*"; }
fail() { printf '\nsetup.sh: FAILED: %s\n' "$*" >&2; exit 1; }

# --- 1. Debian packages ------------------------------------------------------
APT_PACKAGES=(build-essential cmake ninja-build git libgtest-dev zlib1g-dev libcli11-dev nlohmann-json3-dev libyaml-cpp-dev libgloo-dev python3-venv python3-dev dataset-fashion-mnist)
if [[ "${FXP_SKIP_APT:-0}" != 1 ]] && command -v apt-get >/dev/null; then
  missing=()
  for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
  done
  if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    $SUDO apt-get update -qq || fail "apt-get update"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
      || fail "apt-get install ${missing[*]}"
  fi
  # Optional: the compiler cache only makes rebuilds faster, so its absence never fails setup.
  if ! command -v ccache >/dev/null; then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq ccache >/dev/null 2>&1 \
      || printf 'setup.sh: ccache not installed; building without a compiler cache\n' >&2
  fi
fi

# --- 2. Python environment ---------------------------------------------------
if [[ "${FXP_SYSTEM_PYTHON:-0}" == 1 ]]; then
  PYTHON=$(command -v python3) || fail "FXP_SYSTEM_PYTHON=1 but no python3 on PATH"
  "$PYTHON" -c "import torch" 2>/dev/null || fail "FXP_SYSTEM_PYTHON=1 but $PYTHON cannot import torch"
else
  PYTHON=$VENV/bin/python
  if [[ ! -x $PYTHON ]]; then
    step "creating the Python environment $VENV"
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV" || fail "python3 -m venv $VENV (is python3-venv installed?)"
  fi
  stamp=$VENV/.fxp-requirements.sha256
  want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    step "installing the pinned Python packages into $VENV (torch is a large download the first time)"
    "$PYTHON" -m pip install -q --upgrade pip || fail "pip upgrade in $VENV"
    "$PYTHON" -m pip install -q -r "$REQUIREMENTS" || fail "pip install -r scripts/requirements.txt"
    echo "$want" >"$stamp"
  fi
fi

# --- 3. the fxp package --------------------------------------------------------
# The checkout's torch_ext/ goes on the environment's path (a .pth file: what an
# editable install amounts to), and fxp loads build/libfxp.so. `pip install .`
# is the other way, for users (README.md); it would shadow the checkout, so a
# pip-installed fxp is removed first.
if ! "$PYTHON" -c "import fxp._library, pathlib, sys; sys.exit(pathlib.Path(fxp._library.__file__).resolve().parents[2] != pathlib.Path('$ROOT'))" 2>/dev/null; then
  step "putting $ROOT/torch_ext on the path of $PYTHON"
  if "$PYTHON" -m pip show -q fxp >/dev/null 2>&1; then
    "$PYTHON" -m pip uninstall -q -y fxp || fail "pip uninstall fxp"
  fi
  site=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") || fail "no site-packages for $PYTHON"
  echo "$ROOT/torch_ext" >"$site/fxp-checkout.pth" || fail "cannot write $site/fxp-checkout.pth"
fi

# --- 4. build --------------------------------------------------------------------
if [[ "${FXP_SETUP_BUILD:-1}" == 0 ]]; then  # scripts/sanitize.sh builds its own tree
  step "ready: $PYTHON (build/ not built: FXP_SETUP_BUILD=0)"
  exit 0
fi
if [[ -z "${CUDACXX:-}" ]] && ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
step "building into $BUILD (FXP_CUDA=${FXP_CUDA:-AUTO})"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DFXP_CUDA="${FXP_CUDA:-AUTO}" -DFXP_PYTHON="$PYTHON" ${FXP_CMAKE_ARGS:-} >"$ROOT/.cmake-configure.log" 2>&1 \
  || { tail -n 40 "$ROOT/.cmake-configure.log" >&2; fail "cmake configure (full log: .cmake-configure.log)"; }
cmake --build "$BUILD" || fail "build"
"$PYTHON" -c "import fxp" || fail "import fxp with $PYTHON"
step "ready: $PYTHON can import fxp; libfxp is $BUILD/libfxp.so"
