#!/usr/bin/env bash
# The two ways to install fxp, each used the way its users would (docs/design.md,
# "Installing"):
#   1. PyTorch users: build a wheel (pip, scikit-build-core), install it into a
#      fresh venv that sees the pinned torch, and run a smoke test from outside
#      the checkout, without LD_LIBRARY_PATH.
#   2. LibTorch users: `cmake --install` the build in build/, then build
#      csrc/examples as a project of its own against the installed package
#      (find_package(fxp), fxp::fxp, <fxp/fxp.h>) and run it.
# Called by scripts/test.sh after the build. The wheel is CPU-only unless
# FXP_WHEEL_CUDA=ON|AUTO (CI has no GPU; build/ compiles the CUDA code already).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${FXP_SYSTEM_PYTHON:-0}" == 1 ]]; then PYTHON=$(command -v python3); else PYTHON=${FXP_VENV:-$HOME/.cache/fxp/venv}/bin/python; fi
BUILD=$ROOT/build
[[ -f $BUILD/CMakeCache.txt ]] || { echo "test_install.sh: no build in $BUILD (run scripts/setup.sh)" >&2; exit 1; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fxp-install.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# scikit-build-core's build tree, kept outside the checkout so that reruns are incremental.
WHEEL_BUILD=${XDG_CACHE_HOME:-$HOME/.cache}/fxp/wheel-build/$(printf %s "$ROOT" | sha1sum | cut -c1-12)
step() { printf '\n==> %s\n' "$*"; }

# --- 1. pip install ----------------------------------------------------------
step "building the fxp wheel (FXP_CUDA=${FXP_WHEEL_CUDA:-OFF}; build tree $WHEEL_BUILD)"
# (a -D define, not the environment: the kept build tree has FXP_CUDA cached)
"$PYTHON" -m pip wheel -q --no-build-isolation --no-deps --config-settings=build-dir="$WHEEL_BUILD" \
  --config-settings=cmake.define.FXP_CUDA="${FXP_WHEEL_CUDA:-OFF}" --config-settings=cmake.define.FXP_CCACHE=ON \
  -w "$WORK/dist" "$ROOT"
wheel=$(ls "$WORK"/dist/fxp-*.whl)

step "installing $(basename "$wheel") into a fresh venv"
# The interpreter behind the pinned venv, so that its torch loads in the fresh one.
"$("$PYTHON" -c 'import sys; print(sys._base_executable)')" -m venv "$WORK/venv"
# The pinned torch is several GB: the fresh venv sees the cached one's packages
# through a .pth file instead of installing it again.
torch_site=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
fresh_site=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$torch_site" >"$fresh_site/pinned-torch.pth"
"$WORK/venv/bin/python" -m pip install -q --no-index --no-deps "$wheel"
# The cached venv may put a checkout's torch_ext on the path (scripts/setup.sh,
# fxp-checkout.pth); the wheel's fxp still wins: site-packages itself comes
# before any directory a .pth file adds.

step "smoke test of the installed package, from outside the checkout"
(cd "$WORK" && env -u LD_LIBRARY_PATH -u PYTHONPATH -u FXP_LIBRARY "$WORK/venv/bin/python" - "$fresh_site" <<'PY'
import pathlib, sys
import torch
import fxp, fxp._library
site = pathlib.Path(sys.argv[1]).resolve()
library = fxp._library.load().resolve()
assert pathlib.Path(fxp.__file__).resolve().is_relative_to(site), f"fxp imported from {fxp.__file__}"
assert library == site / "fxp" / "libfxp.so", f"libfxp loaded from {library}"
# Exact values: ties go to even; out of range saturates.
x = torch.tensor([0.03125, 0.09375, -0.03125, 100.0, -100.0])
q = torch.ops.fxp.quantize(x, 8, 4)
assert q.tolist() == [0.0, 0.125, -0.0, 7.9375, -8.0], q.tolist()
# A QPU step keeps the weights on the FxP(16, 10) grid.
fmt = fxp.FxpFormat(16, 10)
layer = torch.nn.Linear(8, 2)
fxp.optim.quantize_parameters_(layer.parameters(), fmt)
optimizer = fxp.optim.QPUSGD(layer.parameters(), lr=0.1, momentum=0.9, format=fmt, seed=1)
layer(torch.randn(4, 8)).square().sum().backward()
optimizer.step()
for p in layer.parameters():
    assert torch.equal(torch.ops.fxp.quantize(p.detach(), 16, 10), p.detach())
print(f"fxp wheel OK: {library}")
PY
)
readelf -d "$fresh_site/fxp/libfxp.so" | grep -q 'R.*PATH.*\$ORIGIN/../torch/lib' \
  || { echo "test_install.sh: the wheel's libfxp lacks RUNPATH \$ORIGIN/../torch/lib" >&2; exit 1; }

# --- 2. cmake --install ------------------------------------------------------
step "cmake --install $BUILD"
cmake --install "$BUILD" --prefix "$WORK/prefix" >/dev/null
expected=(include/fxp/fxp.h include/fxp/ops/ops.h include/fxp/nn/modules.h include/fxp/optim/qpu_sgd.h
          'lib*/cmake/fxp/fxpConfig.cmake' 'lib*/libfxp.so' 'lib*/libfxp_frontend.so')
[[ -x $BUILD/fxp-train ]] && expected+=(bin/fxp-train)  # optional: it needs CLI11 and nlohmann-json
for f in "${expected[@]}"; do
  compgen -G "$WORK/prefix/$f" >/dev/null || { echo "test_install.sh: $f was not installed" >&2; exit 1; }
done

step "building csrc/examples against the installed package"
# Only fxp's prefix: the package finds LibTorch where fxp was built against it.
cmake -S "$ROOT/csrc/examples" -B "$WORK/examples" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$WORK/prefix" >"$WORK/examples.configure.log" 2>&1 \
  || { cat "$WORK/examples.configure.log" >&2; exit 1; }
cmake --build "$WORK/examples" >"$WORK/examples.build.log" 2>&1 || { cat "$WORK/examples.build.log" >&2; exit 1; }
(cd "$WORK" && env -u LD_LIBRARY_PATH "$WORK/examples/fxp-quantize-demo" | grep "grid: yes")
if [[ -x $BUILD/fxp-train ]]; then env -u LD_LIBRARY_PATH "$WORK/prefix/bin/fxp-train" --help >/dev/null; fi
step "both install paths work"
