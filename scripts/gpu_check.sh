#!/usr/bin/env bash
# Builds and tests fxp on a CUDA machine, then runs the benchmark there.
# Reference machine: one H200, python3 with torch 2.11.0+cu130, nvcc 13.0,
# cmake and ninja, no apt and no network. Logs go to $OUT (or gpu-logs/).
#
# That machine lacks GoogleTest, CLI11, nlohmann-json, Fashion-MNIST and QPyTorch.
# On the development machine run
#   scripts/gpu_check.sh --prepare
# which copies Debian's GoogleTest sources, the CLI11 and nlohmann-json headers
# and the Fashion-MNIST files, and downloads the QPyTorch wheel, into .deps/
# (git-ignored); carry .deps to the GPU machine. Without it the C++ tests,
# fxp-train and the QPyTorch baseline are skipped, and the rest still runs.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  [[ -d /usr/src/googletest ]] || { echo "gpu_check --prepare: /usr/src/googletest missing (apt-get install googletest)" >&2; exit 1; }
  rm -rf "$ROOT/.deps/googletest" && mkdir -p "$ROOT/.deps/wheels"
  cp -r /usr/src/googletest "$ROOT/.deps/googletest"
  for h in /usr/include/CLI /usr/include/nlohmann; do
    [[ -d $h ]] || { echo "gpu_check --prepare: $h missing (run scripts/setup.sh)" >&2; exit 1; }
  done
  rm -rf "$ROOT/.deps/include" "$ROOT/.deps/fashion-mnist" && mkdir -p "$ROOT/.deps/include"
  cp -r /usr/include/CLI /usr/include/nlohmann "$ROOT/.deps/include/"
  cp -r /usr/share/datasets/fashion-mnist "$ROOT/.deps/fashion-mnist"
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
export PYTHONPATH=$ROOT/torch_ext${PYTHONPATH:+:$PYTHONPATH} FXP_LIBRARY=$BUILD/libfxp.so FXP_TRAIN=$BUILD/fxp-train
if compgen -G "$ROOT/.deps/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/fxp-site "$ROOT"/.deps/wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/fxp-site
fi
# fxp-train's tests and runs read Fashion-MNIST from here: the carried .gz files,
# decompressed by Python (the GPU box may have no zlib headers, so libfxp may lack gzip).
if [[ -z ${FXP_FASHION_MNIST:-} && -d $ROOT/.deps/fashion-mnist ]]; then
  export FXP_FASHION_MNIST=$BUILD/fashion-mnist
  "$PYTHON" - "$ROOT/.deps/fashion-mnist" "$FXP_FASHION_MNIST" <<'PY'
import gzip, pathlib, shutil, sys
src, dst = map(pathlib.Path, sys.argv[1:])
dst.mkdir(parents=True, exist_ok=True)
for f in src.glob("*.gz"):
    with gzip.open(f) as i, open(dst / f.stem, "wb") as o:
        shutil.copyfileobj(i, o)
PY
fi
export FXP_FASHION_MNIST=${FXP_FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [[ -x $BUILD/tests/cpp/fxp_tests ]]; then
  run ctest ctest --test-dir "$BUILD" --output-on-failure
else
  echo "==> ctest skipped: GoogleTest was not available (see the header of this script)"
fi
run pytest env FXP_LARGE_TESTS=1 "$PYTHON" -m pytest "$ROOT/tests/python" -ra
run bench_quantize "$PYTHON" "$ROOT/scripts/bench_quantize.py" --device cuda --markdown "$LOGS/bench_quantize_cuda.md"
run bench_optim "$PYTHON" "$ROOT/scripts/bench_optim.py" --device cuda --markdown "$LOGS/bench_optim_cuda.md"
run demo "$PYTHON" "$ROOT/scripts/demo.py" --device cuda
# fxp-train on the GPU: two epochs of each Exp 2 method at batch 256 (throughput),
# and the default run.
if [[ -x $BUILD/fxp-train ]]; then
  for config in exp2-fp32 exp2-ste-16 exp2-sqpu-16 exp2-hteqpu-16 exp2-sqpu-8; do
    run "train_$config" "$BUILD/fxp-train" -c "$ROOT/configs/runs/$config.yaml" --device cuda --epochs 2 \
      --data-dir "$FXP_FASHION_MNIST" -o "$LOGS/train/$config" --overwrite --no-progress
  done
  run train_default "$BUILD/fxp-train" --device cuda --data-dir "$FXP_FASHION_MNIST" -o "$LOGS/train/default" \
    --overwrite --no-progress
  run bench_train "$PYTHON" "$ROOT/scripts/bench_train.py" --device cuda --fxp-train "$BUILD/fxp-train" \
    --data-dir "$FXP_FASHION_MNIST" --csv "$LOGS/throughput_cuda.csv" --markdown "$LOGS/bench_train_cuda.md"
  # Measured training memory from the CUDA caching allocator (docs/memory.md), packed and float.
  run memory_table "$PYTHON" "$ROOT/scripts/memory_table.py" --device cuda --fxp-train "$BUILD/fxp-train" \
    --data-dir "$FXP_FASHION_MNIST" --csv "$LOGS/memory_cuda.csv" --figure "$LOGS/memory_cuda.png"
  # The new models and AdaPT on the GPU (issue 13): a short run of each, and AdaPT's step cost.
  for model in lenet5 resnet20 alexnet; do
    run "train_${model}_adapt" "$BUILD/fxp-train" --model "$model" --method adapt --device cuda --epochs 1 \
      --train-limit 8192 --data-dir "$FXP_FASHION_MNIST" -o "$LOGS/train/${model}-adapt" --overwrite --no-progress
  done
  run train_lenet5_adapt_qpu "$BUILD/fxp-train" --model lenet5 --method adapt --update qpu --device cuda --epochs 1 \
    --train-limit 8192 --data-dir "$FXP_FASHION_MNIST" -o "$LOGS/train/lenet5-adapt-qpu" --overwrite --no-progress
  run bench_adapt "$PYTHON" "$ROOT/scripts/bench_adapt.py" --model resnet20 --batch-size 512 --device cuda \
    --fxp-train "$BUILD/fxp-train" --data-dir "$FXP_FASHION_MNIST" --markdown "$LOGS/bench_adapt_cuda.md"
fi
echo "gpu_check: $([[ $status == 0 ]] && echo PASSED || echo FAILED); logs in $LOGS"
exit $status
