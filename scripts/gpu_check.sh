#!/usr/bin/env bash
# Builds and tests fxp on a CUDA machine, then runs the benchmark there.
# Reference machine: one H200, python3 with torch 2.11.0+cu130, nvcc 13.0,
# cmake and ninja, no apt and no network. Logs go to $OUT (or gpu-logs/).
#
# That machine lacks GoogleTest, CLI11, nlohmann-json, Gloo's headers, Fashion-MNIST and QPyTorch.
# On the development machine run
#   scripts/gpu_check.sh --prepare
# which copies Debian's GoogleTest sources, the CLI11, nlohmann-json and Gloo headers
# and the Fashion-MNIST files, and downloads the QPyTorch wheel, into .deps/
# (git-ignored), and packs build/libfxp.so (brought up to date) into
# .deps/devbuild where build/ is a CUDA build, for the error_paths_devbuild
# stage; carry .deps to the GPU machine. Without it the C++ tests,
# fxp-train and the QPyTorch baseline are skipped, and the rest still runs.
#
#   scripts/gpu_check.sh --budget 540
# runs the stages most important first (build, C++ tests, the CUDA pytest cases,
# the optimizer and quantize benchmarks, training throughput, then the rest) and
# starts no stage once the budget, in seconds of wall time, is spent; a running
# stage is cut at the deadline. Without it every stage runs to the end.
#   scripts/gpu_check.sh --budget 300 --only pytest_cuda,bench_train
# builds, then runs only the named stages (a rerun after a fix). With
# FXP_CPU_CAPABILITIES=default_ in the environment the build skips the AVX2 and
# AVX-512 CPU kernels, the longest compiles (about a minute less on 16 cores).
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [[ "${1:-}" == "--prepare" ]]; then
  set -e
  [[ -d /usr/src/googletest ]] || { echo "gpu_check --prepare: /usr/src/googletest missing (apt-get install googletest)" >&2; exit 1; }
  rm -rf "$ROOT/.deps/googletest" && mkdir -p "$ROOT/.deps/wheels"
  cp -r /usr/src/googletest "$ROOT/.deps/googletest"
  for h in /usr/include/CLI /usr/include/nlohmann /usr/include/gloo; do
    [[ -d $h ]] || { echo "gpu_check --prepare: $h missing (run scripts/setup.sh)" >&2; exit 1; }
  done
  rm -rf "$ROOT/.deps/include" "$ROOT/.deps/fashion-mnist" && mkdir -p "$ROOT/.deps/include"
  cp -r /usr/include/CLI /usr/include/nlohmann /usr/include/gloo "$ROOT/.deps/include/"
  cp -r /usr/share/datasets/fashion-mnist "$ROOT/.deps/fashion-mnist"
  qtorch=$(grep -E '^qtorch==' "$ROOT/scripts/requirements.txt")
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$ROOT/.deps/wheels" "$qtorch"
  # This machine's CUDA build of libfxp, for the error_paths_devbuild stage: the same source built by
  # another compiler, to tell a fault of the GPU machine's build from one of the code (docs/gpu-check.md).
  rm -rf "$ROOT/.deps/devbuild"
  # (grep -c reads all of nm's output: grep -q would end the pipeline early, and pipefail fail it)
  if [[ -f $ROOT/build/libfxp.so ]] && (($(nm -DC "$ROOT/build/libfxp.so" | grep -c "fxp::kernels::pack_bits_cuda"))); then
    cmake --build "$ROOT/build" --target fxp >/dev/null
    mkdir -p "$ROOT/.deps/devbuild"
    xz -T0 -6 -c "$ROOT/build/libfxp.so" >"$ROOT/.deps/devbuild/libfxp.so.xz"
    # What the GPU machine compares with its own: the source, the compiler build/ used, the torch.
    cxx=$(sed -n 's/^CMAKE_CXX_COMPILER:[A-Z]*=//p' "$ROOT/build/CMakeCache.txt")
    torch_python=$(sed -n 's/^FXP_PYTHON:[A-Z]*=//p' "$ROOT/build/CMakeCache.txt")
    {
      echo "source $(git -C "$ROOT" describe --always --dirty)"
      echo "compiler $("${cxx:-c++}" --version | head -n 1)"
      echo "torch $("${torch_python:-python3}" -c 'import torch; print(torch.__version__)')"
    } >"$ROOT/.deps/devbuild/info.txt"
  else
    echo "gpu_check --prepare: build/libfxp.so is not a CUDA build (FXP_CUDA=ON scripts/setup.sh): the"
    echo "  error_paths_devbuild stage will be skipped"
  fi
  echo "prepared $ROOT/.deps ($(du -sh "$ROOT/.deps" | cut -f1)); carry .deps to the GPU machine"
  exit 0
fi
BUDGET='' ONLY=''
while (($#)); do
  if [[ "$1" == "--budget" && "${2:-}" =~ ^[0-9]+$ ]]; then BUDGET=$2; shift 2
  elif [[ "$1" == "--only" && -n "${2:-}" ]]; then ONLY=",$2,"; shift 2
  else echo "usage: scripts/gpu_check.sh [--prepare | [--budget SECONDS] [--only STAGE,STAGE...]]" >&2; exit 2
  fi
done
# The stages --only may name (the train_* stages by their full names).
STAGES="ctest_cuda pytest_cuda error_paths error_paths_devbuild bench_optim bench_quantize bench_pool bench_train bench_fleet bench_adapt
bench_adapt_python train_distributed_nccl train_exp2-fp32 train_exp2-ste-16 train_exp2-sqpu-16 train_exp2-hteqpu-16
train_exp2-sqpu-8 train_lenet5_adapt train_resnet20_adapt train_alexnet_adapt train_lenet5_adapt_qpu train_lenet5_msq
memory_table ctest_rest demo pytest_rest train_default"
if [[ -n $ONLY ]]; then
  IFS=, read -ra wanted <<<"${ONLY:1:-1}"
  for stage in "${wanted[@]}"; do
    [[ " ${STAGES//$'\n'/ } " == *" $stage "* ]] || { echo "gpu_check: no stage '$stage'; the stages: $STAGES" >&2; exit 2; }
  done
fi
ran=0  # stages run, besides configure and build
DEADLINE=$(( ${BUDGET:-10000000} ))  # in bash's $SECONDS, which counts from the script's start
LOGS=${OUT:-$ROOT/gpu-logs}
mkdir -p "$LOGS"
PYTHON=${PYTHON:-python3}
status=0
skipped=()
# run NAME NEED CMD...: log to $LOGS/NAME.log and remember failures; skip the stage when
# less than NEED seconds of the budget are left, and cut it at the deadline.
run() {
  local name=$1 need=$2; shift 2
  if [[ -n $ONLY && $name != configure && $name != build && $ONLY != *",$name,"* ]]; then return; fi
  [[ $name == configure || $name == build ]] || ran=$((ran + 1))
  local left=$(( DEADLINE - SECONDS )) start=$SECONDS
  if (( left < need )); then
    echo "==> $name skipped: ${left}s of the budget left, it needs about ${need}s"; skipped+=("$name"); return
  fi
  echo "==> $name"
  if timeout --kill-after=10 "$left" "$@" >"$LOGS/$name.log" 2>&1; then
    echo "    ok ($(( SECONDS - start ))s)"
  else
    local rc=$?
    if (( rc == 124 || rc == 137 )); then echo "    CUT at the budget's deadline ($(( SECONDS - start ))s, see $name.log)"
    else echo "    FAILED, exit $rc ($(( SECONDS - start ))s, see $name.log)"; fi
    status=1
  fi
  tail -n 25 "$LOGS/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  nvcc --version | tail -n 2
  # The Python packages the stages use: a missing one explains a failed stage at a glance.
  "$PYTHON" -c 'import importlib.util as u
print("python packages:", *(m + ("" if u.find_spec(m) else " MISSING") for m in
      ("pytest", "xdist", "numpy", "yaml", "pandas", "matplotlib", "rich", "tqdm", "expecttest")))'
} >"$LOGS/machine.txt" 2>&1
cat "$LOGS/machine.txt"

gtest_args=()
[[ -d $ROOT/.deps/googletest ]] && gtest_args=(-DFXP_GTEST_SOURCE_DIR="$ROOT/.deps/googletest")
arch=$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
BUILD=$ROOT/build-gpu  # its own build tree; `import fxp` is pointed at it below
# The CPU kernel builds: $FXP_CPU_CAPABILITIES, else CMake's default (all); never a kept tree's earlier choice.
cpu_capabilities=(-UFXP_CPU_CAPABILITIES)
[[ -n ${FXP_CPU_CAPABILITIES:-} ]] && cpu_capabilities=(-DFXP_CPU_CAPABILITIES="$FXP_CPU_CAPABILITIES")
run configure 30 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFXP_CUDA=ON \
  -DFXP_PYTHON="$(command -v "$PYTHON")" -DTORCH_CUDA_ARCH_LIST="$arch" "${gtest_args[@]}" \
  "${cpu_capabilities[@]}"
run build 60 cmake --build "$BUILD" -j "$(nproc)" -- -k 0  # every error at once
if [[ $status != 0 || ! -f $BUILD/libfxp.so ]]; then  # a build skipped for the budget fails too
  echo "gpu_check: FAILED to build; logs in $LOGS"; exit 1
fi
# Make `import fxp` find this checkout's package and build/libfxp.so without installing,
# and QPyTorch from the carried wheel.
export PYTHONPATH=$ROOT/torch_ext${PYTHONPATH:+:$PYTHONPATH} FXP_LIBRARY=$BUILD/libfxp.so FXP_TRAIN=$BUILD/fxp-train
if compgen -G "$ROOT/.deps/wheels/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/fxp-site "$ROOT"/.deps/wheels/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/fxp-site
fi
# fxp-train runs here read Fashion-MNIST from here (the pytest cases that need it skip): the carried .gz files,
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
# Most important first: the CUDA C++ tests, then the CUDA pytest cases (CUDA against CPU, bit
# for bit), the kernel benchmarks, training throughput; the rest of the suite last.
have_gtest=0
if [[ -x $BUILD/tests/cpp/fxp_tests ]]; then
  have_gtest=1
  run ctest_cuda 10 ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" -R "[Cc]uda"
else
  echo "==> ctest skipped: GoogleTest was not available (see the header of this script)"
fi
# pytest-xdist, where installed, spreads the tests over the cores (two threads per worker for the CPU
# references) and replaces a worker that crashes. A test module that cannot be imported (a package
# this machine lacks) costs its own cases, not the run's.
export PYTEST_FLAGS="-ra -p no:cacheprovider --continue-on-collection-errors" XDIST_WORKERS=0
"$PYTHON" -c "import xdist" 2>/dev/null && XDIST_WORKERS=$(( $(nproc) < 8 ? $(nproc) : 8 ))
xdist=()
((XDIST_WORKERS)) && xdist=(-n "$XDIST_WORKERS")
# The CUDA cases (-k is case-insensitive: every test or parameter named for CUDA) and the 2^31-element
# one. Without xdist one process runs them all, so the cases that crashed their worker in earlier runs
# (docs/gpu-check.md; the error_paths stage diagnoses them), and a new one that raises the same way,
# run last, each in its own process.
# Node ids as pytest names them (relative to tests/python, its rootdir: pytest.ini), one per line: an
# exported string, since the stages run in child shells, which do not inherit arrays.
export CRASHED_CASES='test_bit_pack.py::test_cuda_inputs_errors_and_empty
test_packed.py::test_cuda_pack_unpack_bit_identical_to_cpu
test_qpu_sgd_capturable.py::test_packed_nan_is_counted_not_raised[cuda]
test_qpu_sgd_members.py::test_cuda_names_the_members_a_nan_hit_as_the_cpu_does'
pytest_cuda() {
  local crashes
  mapfile -t crashes <<<"$CRASHED_CASES"
  cd "$ROOT/tests/python" || return 1
  # shellcheck disable=SC2086  # PYTEST_FLAGS is a list of flags
  {
    if ((XDIST_WORKERS)); then
      OMP_NUM_THREADS=2 "$PYTHON" -m pytest $PYTEST_FLAGS -n "$XDIST_WORKERS" . -k "cuda or large"
      return
    fi
    local status=0 case
    "$PYTHON" -m pytest $PYTEST_FLAGS . -k "cuda or large" "${crashes[@]/#/--deselect=}" || status=1
    for case in "${crashes[@]}"; do "$PYTHON" -m pytest $PYTEST_FLAGS "$case" || status=1; done
    return $status
  }
}
export -f pytest_cuda
export PYTHON ROOT
run pytest_cuda 120 env FXP_LARGE_TESTS=1 bash -c pytest_cuda
# Each op's error path in its own process: an error raised after a device read crashed three
# CUDA cases of the first runs; this reports how each ends, with the native stack of a crash.
run error_paths 30 "$PYTHON" "$ROOT/scripts/diagnose/error_paths.py"
# This machine's libfxp comes back in the logs (libfxp-gpu.so.xz), to be run on a CPU machine under
# scripts/diagnose/fake_cuda. Then, where gpu_check.sh --prepare packed the development machine's build
# of the same source (.deps/devbuild), the error paths and the crashed cases run with it: passing there
# and crashing with this machine's build puts the fault in this build (compiler, flags), not the code.
error_paths_devbuild() {
  local lib=$BUILD/devbuild/libfxp.so status=0 case crashes packed=$ROOT/.deps/devbuild/libfxp.so.xz
  mapfile -t crashes <<<"$CRASHED_CASES"
  "$PYTHON" - "$BUILD/libfxp.so" "$LOGS/libfxp-gpu.so.xz" "$packed" "$lib" <<'PY' || return 1
import lzma, pathlib, shutil, sys
mine, back, packed, unpacked = map(pathlib.Path, sys.argv[1:])
with open(mine, "rb") as i, lzma.open(back, "wb", preset=6) as o:
    shutil.copyfileobj(i, o)
if packed.is_file():
    unpacked.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(packed) as i, open(unpacked, "wb") as o:
        shutil.copyfileobj(i, o)
PY
  if [[ ! -f $packed ]]; then
    echo "no .deps/devbuild/libfxp.so.xz (gpu_check.sh --prepare with a CUDA build/): no comparison"
    return 0
  fi
  echo "development machine's build:"; cat "$ROOT/.deps/devbuild/info.txt"
  echo "this machine: source $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)," \
    "torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
  echo "(a comparison means something only where the source and torch agree)"
  FXP_LIBRARY=$lib "$PYTHON" "$ROOT/scripts/diagnose/error_paths.py" || status=1
  cd "$ROOT/tests/python" || return 1
  for case in "${crashes[@]}"; do
    # shellcheck disable=SC2086  # PYTEST_FLAGS is a list of flags
    FXP_LIBRARY=$lib "$PYTHON" -m pytest $PYTEST_FLAGS "$case" || status=1
  done
  return $status
}
export -f error_paths_devbuild
export BUILD LOGS
run error_paths_devbuild 90 bash -c error_paths_devbuild
run bench_optim 30 "$PYTHON" "$ROOT/scripts/bench_optim.py" --device cuda --markdown "$LOGS/bench_optim_cuda.md"
run bench_quantize 20 "$PYTHON" "$ROOT/scripts/bench_quantize.py" --device cuda --no-qtorch \
  --markdown "$LOGS/bench_quantize_cuda.md"
run bench_pool 10 "$PYTHON" "$ROOT/scripts/bench_pool.py" --device cuda --min-run-time 0.2 \
  --markdown "$LOGS/bench_pool_cuda.md"
# Run directories (with checkpoints) stay in the build tree; only their summaries,
# in the logs, travel back: the logs folder stays small enough to ship as one archive.
RUNS=$BUILD/runs
if [[ -x $BUILD/fxp-train ]]; then
  # Training throughput per method and batch size (what sweep --estimate extrapolates from).
  run bench_train 150 "$PYTHON" "$ROOT/scripts/bench_train.py" --device cuda --fxp-train "$BUILD/fxp-train" \
    --methods fp32,ste,sqpu,hteqpu,sqpu:packed,fp32:graphs,sqpu:graphs,hteqpu:graphs,sqpu:packed:graphs \
    --batch-sizes 1,4,16,256 \
    --data-dir "$FXP_FASHION_MNIST" --csv "$LOGS/throughput_cuda.csv" --markdown "$LOGS/bench_train_cuda.md"
  # Fleets against solo runs on the GPU (issue 16): what sweep --estimate --fleet-throughput turns into GPU-hours.
  run bench_fleet 150 "$PYTHON" "$ROOT/scripts/bench_fleet.py" --device cuda --fxp-train "$BUILD/fxp-train" \
    --methods sqpu --batch-sizes 1,4,16,64 --fleet-sizes 8,32,80 \
    --data-dir "$FXP_FASHION_MNIST" --csv "$LOGS/fleet_cuda.csv" --markdown "$LOGS/bench_fleet_cuda.md"
  # AdaPT's per-step overhead against float32 training (issue 13's goal: under 10%), before the short runs below.
  run bench_adapt 60 "$PYTHON" "$ROOT/scripts/bench_adapt.py" --model resnet20 --batch-size 512 --device cuda \
    --fxp-train "$BUILD/fxp-train" --data-dir "$FXP_FASHION_MNIST" --markdown "$LOGS/bench_adapt_cuda.md"
  # fxp.adapt's fused steps in a Python loop (the CUDA paths of AdaptController.step).
  run bench_adapt_python 30 "$PYTHON" "$ROOT/scripts/bench_adapt.py" --python-loop --device cuda --repeats 3 \
    --steps 60 --batch-size 256 --markdown "$LOGS/bench_adapt_python_cuda.md"
  # fxp-train --distributed through NCCL (issue 16): one rank on the one GPU, started by torchrun.
  run train_distributed_nccl 20 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 --no-python \
    "$BUILD/fxp-train" --distributed --device cuda --method sqpu --packed --epochs 1 --train-limit 8192 \
    --batch-size 256 --data-dir "$FXP_FASHION_MNIST" -o "$RUNS/distributed-nccl" --overwrite --no-progress
  # Two epochs of each Exp 2 method at batch 256. The configs go over as JSON, which
  # fxp-train reads without yaml-cpp (the GPU box may lack it).
  mkdir -p "$BUILD/configs"
  for config in exp2-fp32 exp2-ste-16 exp2-sqpu-16 exp2-hteqpu-16 exp2-sqpu-8; do
    "$PYTHON" -c 'import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), open(sys.argv[2], "w"))' \
      "$ROOT/configs/runs/$config.yaml" "$BUILD/configs/$config.json"
    run "train_$config" 20 "$BUILD/fxp-train" -c "$BUILD/configs/$config.json" --device cuda --epochs 2 \
      --data-dir "$FXP_FASHION_MNIST" -o "$RUNS/$config" --overwrite --no-progress
  done
  # The new models and AdaPT on the GPU (issue 13): a short run of each, and AdaPT's step cost.
  for model in lenet5 resnet20 alexnet; do
    run "train_${model}_adapt" 20 "$BUILD/fxp-train" --model "$model" --method adapt --device cuda --epochs 1 \
      --train-limit 8192 --data-dir "$FXP_FASHION_MNIST" -o "$RUNS/${model}-adapt" --overwrite --no-progress
  done
  run train_lenet5_adapt_qpu 20 "$BUILD/fxp-train" --model lenet5 --method adapt --update qpu --device cuda \
    --epochs 1 --train-limit 8192 --data-dir "$FXP_FASHION_MNIST" -o "$RUNS/lenet5-adapt-qpu" \
    --overwrite --no-progress
  # MSQ on the GPU: its Hessian traces, RoundClamp and width checks.
  run train_lenet5_msq 20 "$BUILD/fxp-train" --model lenet5 --method msq --device cuda --epochs 2 \
    --train-limit 8192 --data-dir "$FXP_FASHION_MNIST" -o "$RUNS/lenet5-msq" --overwrite --no-progress
  # Measured training memory from the CUDA caching allocator (docs/memory.md), packed and float.
  run memory_table 150 "$PYTHON" "$ROOT/scripts/memory_table.py" --device cuda --fxp-train "$BUILD/fxp-train" \
    --data-dir "$FXP_FASHION_MNIST" --csv "$LOGS/memory_cuda.csv" --figure "$LOGS/memory_cuda.png"
fi
# The C++ tests that CI runs too (the longest take about two minutes here).
((have_gtest)) && run ctest_rest 130 ctest --test-dir "$BUILD" --output-on-failure -j "$(nproc)" -E "[Cc]uda"
run demo 30 "$PYTHON" "$ROOT/scripts/demo.py" --device cuda
rest_threads=()  # two threads per xdist worker; one process alone takes every core
((XDIST_WORKERS)) && rest_threads=(OMP_NUM_THREADS=2)
# shellcheck disable=SC2086  # PYTEST_FLAGS is a list of flags
run pytest_rest 120 env "${rest_threads[@]}" "$PYTHON" -m pytest $PYTEST_FLAGS "$ROOT/tests/python" "${xdist[@]}" \
  -k "not (cuda or large)"
if [[ -x $BUILD/fxp-train ]]; then  # the default run: up to 100 epochs with early stopping
  run train_default 300 "$BUILD/fxp-train" --device cuda --data-dir "$FXP_FASHION_MNIST" -o "$RUNS/default" \
    --overwrite --no-progress
fi
((${#skipped[@]})) && echo "gpu_check: skipped for the budget: ${skipped[*]}"
if [[ -n $ONLY ]] && ((ran == 0)); then
  echo "gpu_check: FAILED: none of the stages --only named ran here (they need what this machine lacks?)"; exit 1
fi
if [[ $status != 0 ]]; then
  echo "gpu_check: FAILED; logs in $LOGS"
elif ((${#skipped[@]})); then
  echo "gpu_check: INCOMPLETE: what ran passed, ${#skipped[@]} stages were skipped for the budget; logs in $LOGS"
  exit 3
else
  echo "gpu_check: PASSED; logs in $LOGS"
fi
exit $status
