#!/usr/bin/env bash
# The test command: sets up (scripts/setup.sh), then runs the C++ tests under
# ctest, the Python tests under pytest (extra arguments go to pytest), and the
# install tests (scripts/test_install.sh; FXP_SKIP_INSTALL_TESTS=1 skips them).
# CUDA tests are compiled everywhere and skipped, with the reason, without a GPU.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh"
if [[ "${FXP_SYSTEM_PYTHON:-0}" == 1 ]]; then PYTHON=$(command -v python3); else PYTHON=${FXP_VENV:-$HOME/.cache/fxp/venv}/bin/python; fi

printf '\n==> C++ tests (ctest)\n'
ctest --test-dir "$ROOT/build" --output-on-failure --timeout 600

printf '\n==> Python tests (pytest)\n'
cd "$ROOT"
"$PYTHON" -m pytest tests/python "$@"

if [[ "${FXP_SKIP_INSTALL_TESTS:-0}" != 1 ]]; then
  printf '\n==> install tests (pip wheel, cmake --install)\n'
  "$ROOT/scripts/test_install.sh"
fi
