#!/usr/bin/env bash
# Builds and tests fxp on a CUDA machine, then runs the benchmark there.
# Reference machine: one H100, python3 with torch 2.11.0+cu130, nvcc 13.0,
# cmake and ninja, no apt and no network. Logs go to $OUT (or gpu-logs/).
#
# GoogleTest is not on that machine: copy Debian's sources into .deps/ first
# (on a machine with libgtest-dev:  mkdir -p .deps && cp -r /usr/src/googletest .deps/)
# and carry .deps along; without them only the Python tests run.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
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
run configure cmake -S "$ROOT" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFXP_CUDA=ON \
  -DFXP_PYTHON="$(command -v "$PYTHON")" -DTORCH_CUDA_ARCH_LIST="$arch" "${gtest_args[@]}"
run build cmake --build "$ROOT/build" -j "$(nproc)"
# Make `import fxp` find this checkout's package and build/libfxp.so without installing.
export PYTHONPATH=$ROOT/torch_ext${PYTHONPATH:+:$PYTHONPATH}
if [[ -x $ROOT/build/tests/cpp/fxp_tests ]]; then
  run ctest ctest --test-dir "$ROOT/build" --output-on-failure
else
  echo "==> ctest skipped: GoogleTest was not available (see the header of this script)"
fi
run pytest env FXP_LARGE_TESTS=1 "$PYTHON" -m pytest "$ROOT/tests/python" -ra
run bench_quantize "$PYTHON" "$ROOT/scripts/bench_quantize.py" --device cuda --markdown "$LOGS/bench_quantize_cuda.md"
run demo "$PYTHON" "$ROOT/scripts/demo.py" --device cuda
echo "gpu_check: $([[ $status == 0 ]] && echo PASSED || echo FAILED); logs in $LOGS"
exit $status
