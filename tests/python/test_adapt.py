"""fxp-train --method adapt (issue 13): AdaPT's per-layer formats switch
during the run, are recorded per epoch, and a run is bit-reproducible with
the same seed and thread count, and resumes bit for bit with the
controller's whole state in the checkpoint."""

from __future__ import annotations

import json
import subprocess

import pytest

from environment import FASHION, FXP_TRAIN, requires_fxp_train, requires_fxp_train_and_data

# Small lookbacks, so that every layer switches several times in 2 x 16 batches.
ADAPT = ["--method", "adapt", "--adapt-lookback-min", "3", "--adapt-lookback-max", "8", "--adapt-resolution-min",
         "20", "--adapt-resolution-max", "40", "--l1-decay", "1e-5", "--data-dir", str(FASHION), "--train-limit",
         "512", "--val-limit", "128", "--batch-size", "32", "--threads", "1", "--no-progress", "--quiet"]


def _run(*args):
    return subprocess.run([str(FXP_TRAIN), *args], capture_output=True, text=True, timeout=600)


def _metrics(out):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for key in ("epoch_time_s", "train_time_s", "images_per_s"):
            line.pop(key)
    return lines


@requires_fxp_train_and_data
@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_adapt_switches_and_is_bit_reproducible(tmp_path, model):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        p = _run(*ADAPT, "--model", model, "--epochs", "2", "-o", str(out))
        assert p.returncode == 0, p.stderr
    assert _metrics(first) == _metrics(second)
    last = _metrics(first)[-1]["adapt"]
    assert last["strategy"] in ("min", "mean", "max")
    for layer in last["layers"]:
        assert layer["switches"] >= 3, layer
        assert 3 <= layer["lookback"] <= 8
        assert 20 <= layer["resolution"] <= 40
        assert layer["frac"] < layer["bits"] <= 32
        assert layer["bits"] >= layer["frac"] + 4  # the range buffer
        assert 0 <= layer["sparsity"] <= 1
    assert json.loads((first / "summary.json").read_text())["config"]["method"] == "adapt"


@requires_fxp_train_and_data
def test_adapt_resumes_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _run(*ADAPT, "--model", "lenet5", "--epochs", "3", "-o", str(whole)).returncode == 0
    assert _run(*ADAPT, "--model", "lenet5", "--epochs", "1", "-o", str(split)).returncode == 0
    p = _run(*ADAPT, "--model", "lenet5", "--epochs", "3", "-o", str(split), "--resume")
    assert p.returncode == 0, p.stderr
    assert _metrics(whole) == _metrics(split)


@requires_fxp_train
@pytest.mark.parametrize("args, message", [
    (["--adapt-buffer-bits", "0"], "adapt_buffer_bits: must be in [1, 31], but got 0"),
    (["--adapt-lookback-min", "30", "--adapt-lookback-max", "20"], "adapt_lookback_max: must be at least 30"),
    (["--adapt-strategy", "median"], "median"),
    (["--adapt-start-bits", "4", "--adapt-start-frac", "4"], "adapt_start_frac: fractional bits must be in [0, 3]"),
    (["--packed"], "packed: AdaPT keeps a float32 master copy"),
])
def test_bad_adapt_settings_are_usage_errors(args, message):
    p = _run("--method", "adapt", *args)
    assert p.returncode == 2
    assert message in p.stderr, p.stderr


@requires_fxp_train
def test_l1_decay_belongs_to_adapt():
    p = _run("--method", "sqpu", "--l1-decay", "0.1")
    assert p.returncode == 2 and "l1_decay: is AdaPT's (method adapt) only" in p.stderr
