"""Finds and loads libfxp, which registers the ``torch.ops.fxp`` operators."""

from __future__ import annotations

import os
from pathlib import Path

import torch

_LIBRARY_NAME = "libfxp.so"


def _candidates() -> list[Path]:
    if os.environ.get("FXP_LIBRARY"):  # explicit: use exactly this one
        return [Path(os.environ["FXP_LIBRARY"])]
    here = Path(__file__).resolve().parent
    found = []
    found.append(here / _LIBRARY_NAME)  # a non-editable install ships it here
    found.append(here.parent.parent / "build" / _LIBRARY_NAME)  # editable install of a checkout
    return found


def load() -> Path:
    """Loads libfxp once; returns its path. Raises a clear error if it is missing."""
    candidates = _candidates()
    for path in candidates:
        if path.is_file():
            try:
                torch.ops.load_library(str(path))
            except OSError as error:  # most often: built against another torch
                raise ImportError(
                    f"fxp: could not load {path} with torch {torch.__version__}: {error}\n"
                    "libfxp must be built against the torch that loads it: reinstall with "
                    "`pip install --no-build-isolation .`, or rebuild with scripts/setup.sh."
                ) from error
            return path
    tried = "\n  ".join(str(p) for p in candidates)
    raise ImportError(
        f"fxp: could not find {_LIBRARY_NAME}. Build it with scripts/setup.sh, or point "
        f"FXP_LIBRARY at it. Tried:\n  {tried}"
    )
