#!/usr/bin/env bash
# The README's main-job command: sets everything up (scripts/setup.sh), then
# runs fxp-train with the given arguments. With none it trains SQPU (16-bit
# parameters, 16-bit outputs, SR inference, batch 64) for 3 epochs on the
# Debian Fashion-MNIST and prints a summary. See `scripts/train.sh --help`.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# --help (and --version) need no setup once fxp-train is built: setup checks packages and rebuilds, minutes.
wants_help() { local a; for a in "$@"; do [[ $a == -h || $a == --help || $a == --version ]] && return 0; done; return 1; }
if ! { wants_help "$@" && [[ -x $ROOT/build/fxp-train ]]; }; then "$ROOT/scripts/setup.sh" >&2; fi
[[ -x $ROOT/build/fxp-train ]] || { echo "train.sh: build/fxp-train was not built (see the CMake warnings above)" >&2; exit 1; }
exec "$ROOT/build/fxp-train" "$@"
