#!/usr/bin/env bash
# Sets everything up, then runs the quantize demo.
# Arguments go to scripts/demo.py (see --help). The main job is now scripts/train.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ "${FXP_SYSTEM_PYTHON:-0}" == 1 ]]; then PYTHON=$(command -v python3); else PYTHON=${FXP_VENV:-$HOME/.cache/fxp/venv}/bin/python; fi
# --help needs no setup once the environment is there (demo.py imports torch and fxp after its arguments).
wants_help() { local a; for a in "$@"; do [[ $a == -h || $a == --help ]] && return 0; done; return 1; }
if ! { wants_help "$@" && [[ -x $PYTHON ]]; }; then "$ROOT/scripts/setup.sh" >&2; fi
exec "$PYTHON" "$ROOT/scripts/demo.py" "$@"
