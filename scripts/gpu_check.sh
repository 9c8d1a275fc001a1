#!/usr/bin/env bash
# Builds and tests fxp on a CUDA machine, then runs the benchmark there.
# Reference machine: one H100, python3 with torch 2.11.0+cu130, nvcc 13.0,
# cmake and ninja, no apt and no network. Logs go to $OUT (or gpu-logs/).
#
# That machine lacks GoogleTest and QPyTorch. On the development machine run
#   scripts/gpu_check.sh --prepare
# which copies Debian's GoogleTest sources and downloads the QPyTorch wheel into
# .deps/ (git-ignored); carry .deps to the GPU machine. Without it the C++
# tests and the QPyTorch baseline are skipped, and the rest still runs.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  [[ -d /usr/src/googletest ]] || { echo "gpu_check --prepare: /usr/src/googletest missing (apt-get install googletest)" >&2; exit 1; }
  rm -rf "$ROOT/.deps/googletest" && mkdir -p "$ROOT/.deps/wheels"
  cp -r /usr/src/googletest "$ROOT/.deps/googletest"
  qtorch=$(grep -E '^qtorch==' "$ROOT/scripts/requirements.txt")
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$ROOT/.deps/wheels" "$qtorch"
  echo "prepared $ROOT/.deps ($(du -sh "$ROOT/.deps" | cut -f1)); carry .deps to the GPU machine"
  exit 0
elif [[ -n "${1:-}" ]]; then
  echo "usage: scripts/gpu_check.sh [--prepare]" >&2; exit 2
fi
LOGS=${OUT:-$ROOT/gpu-logs}
mkdir -p "$LOGS"
PYTHON=${PYTHON:-python3}
status=0
run() {  # run NAME CMD...: log to $LOGS/NAME.log, remember failures
  local name=$1; shift
  echo "==> $name"
  if "$@" >"$LOGS/$name.log" 2>&1; then echo "    ok"; else echo "    FAILED (see $name.log)"; status=1; fi
  tail -n 25 "$LOGS/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
} >"$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"

gtest_args=()
[[ -d $ROOT/.deps/googletest ]] && gtest_args=(-DFXP_GTEST_SOURCE_DIR="$ROOT/.deps/googletest")
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
BUILD=$ROOT/build-gpu  # its own build tree; `import fxp` is pointed at it below
run configure cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFXP_CUDA=ON \
  -DFXP_PYTHON="$(command -v "$PYTHON")" -DTORCH_CUDA_ARCH_LIST="$arch" "${gtest_args[@]}"
run build cmake --build "$BUILD" -j "$(nproc)"
if [[ $status != 0 ]]; then echo "gpu_check: FAILED to build; logs in $LOGS"; exit 1; fi
# Make `import fxp` find this checkout's package and build/libfxp.so without installing,
# and QPyTorch from the carried wheel.
export PYTHONPATH=$ROOT/torch_ext${PYTHONPATH:+:$PYTHONPATH} FXP_LIBRARY=$BUILD/libfxp.so
if compgen -G "$ROOT/.deps/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/fxp-site "$ROOT"/.deps/wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/fxp-site
fi
if [[ -x $BUILD/tests/cpp/fxp_tests ]]; then
  run ctest ctest --test-dir "$BUILD" --output-on-failure
else
  echo "==> ctest skipped: GoogleTest was not available (see the header of this script)"
fi
run pytest env FXP_LARGE_TESTS=1 "$PYTHON" -m pytest "$ROOT/tests/python" -ra
run bench_quantize "$PYTHON" "$ROOT/scripts/bench_quantize.py" --device cuda --markdown "$LOGS/bench_quantize_cuda.md"
run bench_optim "$PYTHON" "$ROOT/scripts/bench_optim.py" --device cuda --markdown "$LOGS/bench_optim_cuda.md"
run demo "$PYTHON" "$ROOT/scripts/demo.py" --device cuda
echo "gpu_check: $([[ $status == 0 ]] && echo PASSED || echo FAILED); logs in $LOGS"
exit $status
