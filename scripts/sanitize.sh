#!/usr/bin/env bash
# Builds fxp and its C++ tests with AddressSanitizer and UndefinedBehaviorSanitizer
# (CMake option FXP_SANITIZE, CUDA off) in build-sanitize/, then runs the ctest
# suite under them: the libraries (ops, kernels, front end, data readers) and
# fxp_tests. fxp-train, its tests and the C++ example are left out
# (FXP_BUILD_APPS=OFF): they are LibTorch, CLI11 and JSON glue over the same
# libraries, and would double the build's time in CI. Findings inside LibTorch, which is not instrumented,
# are suppressed by tests/sanitizers/*.supp; fxp's own code must be clean.
# Extra arguments go to ctest (e.g. -R QpuSgd).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FXP_SETUP_BUILD=0 "$ROOT/scripts/setup.sh"  # Debian packages and the Python environment, not build/
if [[ "${FXP_SYSTEM_PYTHON:-0}" == 1 ]]; then PYTHON=$(command -v python3); else PYTHON=${FXP_VENV:-$HOME/.cache/fxp/venv}/bin/python; fi
BUILD=${FXP_SANITIZE_BUILD:-$ROOT/build-sanitize}

printf '\n==> building with -fsanitize=address,undefined into %s\n' "$BUILD"
cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFXP_CUDA=OFF -DFXP_SANITIZE=ON -DFXP_BUILD_APPS=OFF \
  -DFXP_PYTHON="$PYTHON" >"$BUILD.configure.log" 2>&1 || { tail -n 40 "$BUILD.configure.log" >&2; exit 1; }
cmake --build "$BUILD"

printf '\n==> C++ tests under ASan and UBSan (ctest)\n'
SUPP=$ROOT/tests/sanitizers
# LibTorch is not instrumented: containers it fills look overflowed to ASan
# (detect_container_overflow), and its allocations outlive main (leaks, suppressed by name).
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_container_overflow=0:detect_odr_violation=0:abort_on_error=0:strict_string_checks=0}
export LSAN_OPTIONS=${LSAN_OPTIONS:-suppressions=$SUPP/lsan.supp:print_suppressions=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-suppressions=$SUPP/ubsan.supp:print_stacktrace=1:halt_on_error=1}
ctest --test-dir "$BUILD" --output-on-failure --no-tests=error --timeout 1200 "$@"
