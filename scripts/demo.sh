#!/usr/bin/env bash
# Sets everything up, then runs the quantize demo.
# Arguments go to scripts/demo.py (see --help). The main job is now scripts/train.sh.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$ROOT/scripts/setup.sh" >&2
if [[ "${FXP_SYSTEM_PYTHON:-0}" == 1 ]]; then PYTHON=$(command -v python3); else PYTHON=${FXP_VENV:-$HOME/.cache/fxp/venv}/bin/python; fi
exec "$PYTHON" "$ROOT/scripts/demo.py" "$@"
