"""The project's Python environment for the scripts a user starts directly.

`scripts/bench_train.py` and the others begin with ``#!/usr/bin/env python3``,
which is whatever Python comes first on PATH; their modules (torch, rich,
pandas, ...) are in the environment `scripts/setup.sh` makes,
``${FXP_VENV:-~/.cache/fxp/venv}``. A script started by a Python that lacks
them restarts itself under that environment's Python, as `scripts/report` and
`scripts/sweep` start theirs; where there is none (or ``FXP_SYSTEM_PYTHON=1``
asks for this Python), it says what is missing and how to make it, instead of
an ImportError's traceback.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

_RESTARTED = "FXP_PROJECT_ENV_RESTARTED"  # set before the restart: never restart twice


def project_venv() -> pathlib.Path:
    return pathlib.Path(os.environ.get("FXP_VENV") or pathlib.Path.home() / ".cache" / "fxp" / "venv")


def ensure(name: str, *modules: str) -> None:
    """In a script's ``__main__`` (``name``): restart under the project's
    Python unless this one has every module in ``modules``."""
    if name != "__main__":
        return
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if not missing:
        return
    venv = project_venv()
    python = venv / "bin" / "python"
    script = pathlib.Path(sys.argv[0]).name
    if (python.exists() and os.environ.get(_RESTARTED) != "1" and os.environ.get("FXP_SYSTEM_PYTHON") != "1"
            and pathlib.Path(sys.prefix).resolve() != venv.resolve()):
        os.environ[_RESTARTED] = "1"
        os.execv(str(python), [str(python), sys.argv[0], *sys.argv[1:]])
    where = "the project's environment" if pathlib.Path(sys.prefix).resolve() == venv.resolve() else sys.executable
    raise SystemExit(f"{script}: needs the Python modules {', '.join(missing)}, which {where} lacks; "
                     f"scripts/setup.sh installs them into {venv} (FXP_VENV chooses another place)")
