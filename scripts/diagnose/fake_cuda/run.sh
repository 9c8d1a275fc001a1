#!/usr/bin/env bash
# Runs a command under a stand-in CUDA runtime, so that torch's and libfxp's
# CUDA host code runs on a machine without a GPU. See --help and README.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<'EOF'
usage: scripts/diagnose/fake_cuda/run.sh [--library PATH/TO/libfxp.so] [--counts] [--log] -- COMMAND...

Runs COMMAND with a stand-in for the CUDA runtime (libcudart.so.13) and driver
(libcuda.so.1): torch sees one CUDA device, "device" memory is host memory, so
allocations, copies, memsets and reading values back (.item(), .cpu()) work,
but kernels are never run. Nothing a kernel computes is meaningful: outputs
are whatever the memory held (zeros, or a reused block's old contents), and
tests that compare CUDA results with the CPU's fail.

What it is for: running libfxp's host code after a launch, in particular the
error paths that raise after reading a count back from the device ("The open
crash" in docs/gpu-check.md), with gdb at hand, on a machine without a GPU.

  --library PATH  the libfxp.so to load (sets FXP_LIBRARY), e.g. the GPU
                  machine's own build, libfxp-gpu.so.xz from its logs (xz -d)
  --counts        launches of pack_bits_kernel, pack_kernel, qpu_sgd_kernel and
                  round_clamp_kernel set the count the op reads back to nonzero,
                  so the op takes its error path (table kCounted in cudart.c)
  --log           log allocations, copies and every launch (by kernel name) to stderr

The stand-in is built with gcc (and nm, python3) from the CUDA toolkit's
headers and libcudart.so.13 (CUDA_HOME, default /usr/local/cuda) into
FXP_FAKE_CUDA_BUILD (default ${TMPDIR:-/tmp}/fxp-fake-cuda), once, and again
when a source changes. It is loaded through LD_AUDIT, which child processes
inherit even where they set their own LD_PRELOAD.

Example, from the repository root:
  scripts/diagnose/fake_cuda/run.sh --counts --library libfxp-gpu.so -- \
      python scripts/diagnose/error_paths.py
EOF
}

die() { echo "fake_cuda/run.sh: $*" >&2; exit 2; }

library="" counts=0 log=0
while (($#)); do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --library) (($# >= 2)) || die "--library needs a path"; library=$2; shift 2 ;;
    --library=*) library=${1#--library=}; shift ;;
    --counts) counts=1; shift ;;
    --log) log=1; shift ;;
    --) shift; break ;;
    *) die "unknown argument '$1' (a COMMAND goes after --; see --help)" ;;
  esac
done
(($#)) || die "no COMMAND given (see --help)"

cuda_home=${CUDA_HOME:-/usr/local/cuda}
header=$cuda_home/include/cuda_runtime_api.h
real=""
for candidate in "$cuda_home/lib64/libcudart.so.13" "$cuda_home/targets/x86_64-linux/lib/libcudart.so.13"; do
  [[ -f $candidate ]] && { real=$candidate; break; }
done
[[ -n $real && -f $header ]] ||
  die "needs the CUDA 13 toolkit's cuda_runtime_api.h and libcudart.so.13 under $cuda_home (set CUDA_HOME)"
for tool in gcc nm python3; do
  command -v "$tool" >/dev/null || die "needs $tool on PATH to build the stand-in"
done

build=${FXP_FAKE_CUDA_BUILD:-${TMPDIR:-/tmp}/fxp-fake-cuda}
sources=("$HERE"/cudart.c "$HERE"/cudart.map "$HERE"/gen_stubs.py "$HERE"/libcuda.c "$HERE"/audit.c "$real")
stale=0
for out in libcudart.so.13 libcuda.so.1 audit.so; do
  [[ -f $build/$out ]] || stale=1
  for src in "${sources[@]}"; do [[ $src -nt $build/$out ]] && stale=1; done
done
if ((stale)); then
  echo "fake_cuda: building the stand-in in $build" >&2
  mkdir -p "$build"
  tmp=$(mktemp -d "$build/tmp.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  cflags=(-O1 -g -fPIC -Wall -Wno-unused-parameter)
  gcc "${cflags[@]}" -I"$cuda_home/include" -c "$HERE/cudart.c" -o "$tmp/cudart.o"
  python3 "$HERE/gen_stubs.py" "$real" "$tmp/cudart.o" "$tmp/stubs.c"
  gcc "${cflags[@]}" -shared -o "$tmp/libcudart.so.13" "$tmp/cudart.o" "$tmp/stubs.c" -lpthread \
    -Wl,--version-script="$HERE/cudart.map" -Wl,-soname,libcudart.so.13
  gcc "${cflags[@]}" -shared -o "$tmp/libcuda.so.1" "$HERE/libcuda.c" -Wl,-soname,libcuda.so.1
  gcc "${cflags[@]}" -shared -o "$tmp/audit.so" "$HERE/audit.c"
  mv -f "$tmp"/libcudart.so.13 "$tmp"/libcuda.so.1 "$tmp"/audit.so "$tmp"/stubs.c "$build"/
  rm -rf "$tmp"
  trap - EXIT
fi

if [[ -n $library ]]; then
  [[ $library == *.xz ]] && die "$library is compressed: unpack it first (xz -dk $library)"
  [[ -f $library ]] || die "no library at $library"
  export FXP_LIBRARY
  FXP_LIBRARY=$(realpath "$library")
fi
export FXP_FAKE_CUDA_DIR=$build
export LD_AUDIT=$build/audit.so${LD_AUDIT:+:$LD_AUDIT}
unset FXP_FAKE_CUDA_COUNTS FXP_FAKE_CUDA_LOG
((counts)) && export FXP_FAKE_CUDA_COUNTS=1
((log)) && export FXP_FAKE_CUDA_LOG=1
echo "fake_cuda: kernels do not run${FXP_FAKE_CUDA_COUNTS:+, the counts fxp reads back are forced nonzero};" \
  "libfxp: ${FXP_LIBRARY:-as import fxp finds it}" >&2
exec "$@"
