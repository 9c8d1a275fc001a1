"""fxp-train --method adapt (issue 13): AdaPT's per-layer formats switch
during the run, are recorded per epoch, and a run is bit-reproducible with
the same seed and thread count, and resumes bit for bit with the
controller's whole state in the checkpoint."""

from __future__ import annotations

import json

import pytest

from environment import (FASHION, FXP_TRAIN, epoch_metrics, requires_fxp_train, requires_fxp_train_and_data,
                         run_fxp_train)

# Small lookbacks, so that every layer switches several times in 2 x 16 batches.
ADAPT = ["--method", "adapt", "--adapt-lookback-min", "3", "--adapt-lookback-max", "8", "--adapt-resolution-min",
         "20", "--adapt-resolution-max", "40", "--l1-decay", "1e-5", "--data-dir", str(FASHION), "--train-limit",
         "512", "--val-limit", "128", "--batch-size", "32", "--threads", "1", "--no-progress", "--quiet"]


@requires_fxp_train_and_data
@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_adapt_switches_and_is_bit_reproducible(tmp_path, model):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        p = run_fxp_train(*ADAPT, "--model", model, "--epochs", "2", "-o", str(out))
        assert p.returncode == 0, p.stderr
    assert epoch_metrics(first) == epoch_metrics(second)
    last = epoch_metrics(first)[-1]["adapt"]
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
    assert run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "3", "-o", str(whole)).returncode == 0
    assert run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "1", "-o", str(split)).returncode == 0
    p = run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "3", "-o", str(split), "--resume")
    assert p.returncode == 0, p.stderr
    assert epoch_metrics(whole) == epoch_metrics(split)


@requires_fxp_train
@pytest.mark.parametrize("args, message", [
    (["--adapt-buffer-bits", "0"], "adapt_buffer_bits: must be in [1, 31], but got 0"),
    (["--adapt-lookback-min", "30", "--adapt-lookback-max", "20"], "adapt_lookback_max: must be at least 30"),
    (["--adapt-strategy", "median"], "median"),
    (["--adapt-start-bits", "4", "--adapt-start-frac", "4"], "adapt_start_frac: fractional bits must be in [0, 3]"),
    (["--packed"], "packed: AdaPT keeps a float32 master copy"),
])
def test_bad_adapt_settings_are_usage_errors(args, message):
    p = run_fxp_train("--method", "adapt", *args)
    assert p.returncode == 2
    assert message in p.stderr, p.stderr


@requires_fxp_train
def test_l1_decay_belongs_to_adapt():
    p = run_fxp_train("--method", "sqpu", "--l1-decay", "0.1")
    assert p.returncode == 2 and "l1_decay: is AdaPT's (method adapt) only" in p.stderr


def test_report_computes_su2_and_draws_the_bit_widths(tmp_path):
    """scripts/report on a float32 run and an AdaPT run written here: SU2 is the
    float32 cost of the whole run over AdaPT's cost at the first epoch that
    reaches the float32 run's best accuracy."""
    import sys
    sys.path.insert(0, str(FXP_TRAIN.parents[1] / "scripts"))
    import report

    def run(name, method, best, epochs):
        d = tmp_path / "g" / name
        d.mkdir(parents=True)
        config = {"model": "lenet5", "dataset": "fashion-mnist", "method": method, "param_bits": 16,
                  "param_frac": 10, "out_bits": 16, "out_frac": 8, "inference_rounding": "sr", "batch_size": 256,
                  "lr": 0.01, "lr_scaling": "none", "weight_decay": 0, "scheduler": "none", "epochs": len(epochs),
                  "seed": 0}
        (d / "sweep-run.json").write_text(json.dumps({"grid": "g", "id": name, "settings": config}))
        (d / "summary.json").write_text(json.dumps({
            "config": config, "best_val_accuracy": best, "best_epoch": 1, "final_val_accuracy": best,
            "epochs_completed": len(epochs), "stop_reason": "epochs", "wall_time_s": 1.0,
            "train_images_per_s": 1.0, "memory_model": {"paper": {"ratio_to_ste": 1, "ratio_to_fp32": 1}}}))
        (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))

    def adapt_epoch(epoch, accuracy, cost, bits):
        return {"epoch": epoch, "val_accuracy": accuracy, "adapt": {
            "strategy": "min",
            "layers": [{"name": "conv1", "bits": bits}, {"name": "fc1", "bits": bits + 2}],
            "performance": {"cost": cost, "float32_cost": 300.0 * epoch, "training_speedup": 300.0 * epoch / cost,
                            "model_size": 0.5, "inference_speedup": 2.0}}}

    run("fp32", "fp32", 0.80, [{"epoch": e, "val_accuracy": 0.8} for e in (1, 2, 3)])
    run("adapt", "adapt", 0.85, [adapt_epoch(1, 0.70, 100.0, 8), adapt_epoch(2, 0.81, 190.0, 10),
                                 adapt_epoch(3, 0.85, 280.0, 12)])
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "g"), "--out", str(out)]) == 0
    import pandas as pd
    table = pd.read_csv(out / "adapt.csv")
    [row] = table.itertuples()
    assert row.su1 == pytest.approx(900.0 / 280.0)
    assert row.su2 == pytest.approx(900.0 / 190.0)  # epoch 2 first reaches 80%
    assert row.fp32_best_val_accuracy == pytest.approx(0.80)
    assert (out / "adapt-bits-g-lenet5-fashion-mnist-b256.png").stat().st_size > 0
    assert "| g | lenet5 | fashion-mnist | 256 | 0 | 80.0% | 85.0% | 3.21 | 4.74 | 0.50 | 2.00 |" in (
        out / "report.md").read_text()
