"""What the Python tests find on this machine: the checkout, the built
fxp-train, the Debian Fashion-MNIST, and the skip mark for tests that need both."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FXP_TRAIN = pathlib.Path(os.environ.get("FXP_TRAIN") or ROOT / "build" / "fxp-train")  # as scripts/sweeplib.py
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")

requires_fxp_train_and_data = pytest.mark.skipif(
    not FXP_TRAIN.exists() or not FASHION.is_dir(),
    reason="needs build/fxp-train (scripts/setup.sh) and Fashion-MNIST (apt-get install dataset-fashion-mnist)")

requires_fxp_train = pytest.mark.skipif(
    not FXP_TRAIN.exists(), reason="needs build/fxp-train (scripts/setup.sh; it needs CLI11 and nlohmann-json)")
