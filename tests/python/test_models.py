"""fxp-train's networks and datasets as a user runs them (issue 13): every
model describes itself with its published parameter count, trains with every
method, resumes bit for bit (batch norm's statistics included), and reads
CIFAR's binary files (written here) with their 32x32 RGB images fitted to
each model's input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from environment import (FASHION, epoch_metrics, requires_fxp_train, requires_fxp_train_and_data,
                         run_fxp_train)

PUBLISHED = {"paper_cnn": 184_490, "lenet5": 61_706, "resnet20": 272_474, "alexnet": 2_472_266}
QUIET = ["--threads", "1", "--no-progress", "--quiet"]


@requires_fxp_train
@pytest.mark.parametrize("model", PUBLISHED)
def test_describe_model_counts_the_published_parameters(model):
    dataset = "fashion-mnist" if model in ("paper_cnn", "lenet5") else "cifar10"
    p = run_fxp_train("--describe-model", "--json", "--model", model, "--dataset", dataset)
    assert p.returncode == 0, p.stderr
    report = json.loads(p.stdout)
    assert report["table1"]["totals"]["parameters"] == PUBLISHED[model]
    assert report["model"] == model
    text = run_fxp_train("--describe-model", "--model", model, "--dataset", dataset).stdout
    assert f"{PUBLISHED[model]}" in text.split("SUM")[1].splitlines()[0]


@requires_fxp_train
def test_bad_models_and_packed_where_unsupported_are_usage_errors():
    p = run_fxp_train("--model", "vgg16")
    assert p.returncode == 2 and "vgg16" in p.stderr
    p = run_fxp_train("--dataset", "svhn")
    assert p.returncode == 2 and "svhn" in p.stderr
    p = run_fxp_train("--model", "resnet20", "--packed")
    assert p.returncode == 2
    assert "packed storage is supported for models paper_cnn and lenet5 only (yet), not resnet20" in p.stderr
    p = run_fxp_train("--model", "lenet5", "--method", "ste", "--packed")
    assert p.returncode == 2 and "lenet5 packs the QPU methods' weights and momentum only" in p.stderr


@requires_fxp_train_and_data
@pytest.mark.parametrize("model", ["lenet5", "resnet20", "alexnet"])
@pytest.mark.parametrize("method", ["fp32", "ste", "sqpu", "hteqpu", "adapt", "adapt --update qpu",
                                    "msq --msq-hessian-samples 2"])
def test_every_model_trains_with_every_method(tmp_path, model, method):
    out = tmp_path / "run"
    p = run_fxp_train("--model", model, "--method", *method.split(), "--data-dir", str(FASHION), "--train-limit", "128",
             "--val-limit", "64", "--batch-size", "32", "--epochs", "1", "-o", str(out), *QUIET)
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"] == model
    [epoch] = epoch_metrics(out)
    assert np.isfinite(epoch["train_loss"]) and np.isfinite(epoch["val_loss"])
    if method == "ste":
        # Parameter statistics go to the quantized layer that owns the parameter (layer1_0.conv1), not its block.
        for name, layer in epoch["layers"].items():
            assert layer.get("output_saturated") is not None and "param_saturated" in layer, name


@requires_fxp_train_and_data
def test_resnet20_resumes_bit_for_bit(tmp_path):
    """Batch norm's running statistics are buffers of the checkpointed model."""
    common = ["--model", "resnet20", "--method", "sqpu", "--data-dir", str(FASHION), "--train-limit", "96",
              "--val-limit", "64", "--batch-size", "32", *QUIET]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_fxp_train(*common, "--epochs", "2", "-o", str(whole)).returncode == 0
    assert run_fxp_train(*common, "--epochs", "1", "-o", str(split)).returncode == 0
    assert run_fxp_train(*common, "--epochs", "2", "-o", str(split), "--resume").returncode == 0
    assert epoch_metrics(whole) == epoch_metrics(split)


@requires_fxp_train_and_data
def test_batch_norm_recalibration_changes_what_validation_sees_and_nothing_else(tmp_path):
    """Note [Batch norm recalibration]: training is bit for bit the same (the
    generator's state is restored after the recalibration passes), validation
    is not, and the run name and config record the setting."""
    common = ["--model", "resnet20", "--method", "adapt", "--data-dir", str(FASHION), "--train-limit", "96",
              "--val-limit", "64", "--batch-size", "32", "--epochs", "2", *QUIET]
    plain, recalibrated = tmp_path / "plain", tmp_path / "recalibrated"
    assert run_fxp_train(*common, "-o", str(plain)).returncode == 0
    p = run_fxp_train(*common, "--bn-recalibration-batches", "2", "-o", str(recalibrated))
    assert p.returncode == 0, p.stderr
    a, b = epoch_metrics(plain), epoch_metrics(recalibrated)
    assert [e["train_loss"] for e in a] == [e["train_loss"] for e in b]
    assert all(x["val_loss"] != y["val_loss"] for x, y in zip(a, b))
    summary = json.loads((recalibrated / "summary.json").read_text())
    assert summary["config"]["bn_recalibration_batches"] == 2
    resolved = json.loads(run_fxp_train("--print-config", "--model", "resnet20", "--bn-recalibration-batches", "3").stdout)
    assert resolved["output_dir"].endswith("-bnr3-b64-s0")
    # Note [Settings without effect]: a model without batch norm does not read it.
    resolved = json.loads(run_fxp_train("--print-config", "--bn-recalibration-batches", "3").stdout)
    assert "bnr" not in resolved["output_dir"]
    p = run_fxp_train("--bn-recalibration-batches", "-1")
    assert p.returncode == 2 and "bn_recalibration_batches" in p.stderr


def _write_cifar10(directory, n_train=60, n_test=20, seed=0):
    """CIFAR-10's binary layout: 5 training batches and a test batch of
    records [label, 3072 pixels], learnable: the label sets the mean colour."""
    rng = np.random.default_rng(seed)
    folder = directory / "cifar-10-batches-bin"
    folder.mkdir(parents=True)

    def batch(n):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        pixels = rng.integers(0, 64, (n, 3072), dtype=np.uint8) + (labels[:, None] * 19).astype(np.uint8)
        return np.concatenate([labels[:, None], pixels], axis=1).tobytes()

    for i in range(1, 6):
        (folder / f"data_batch_{i}.bin").write_bytes(batch(n_train // 5))
    (folder / "test_batch.bin").write_bytes(batch(n_test))


@requires_fxp_train
@pytest.mark.parametrize("model", ["paper_cnn", "lenet5", "resnet20"])
def test_cifar10_files_train_every_model_size(tmp_path, model):
    """3x32x32 inputs: cropped to 28x28 for paper_cnn, as they are for the 32x32 models."""
    data = tmp_path / "cifar"
    _write_cifar10(data)
    out = tmp_path / "run"
    p = run_fxp_train("--model", model, "--dataset", "cifar10", "--data-dir", str(data), "--method", "ste", "--epochs", "1",
             "--batch-size", "20", "-o", str(out), *QUIET)
    assert p.returncode == 0, p.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["dataset"] == "cifar10"
    assert summary["config"]["normalize_mean"] == 0.4734


@requires_fxp_train
def test_a_damaged_cifar_file_is_named_in_the_error(tmp_path):
    data = tmp_path / "cifar"
    _write_cifar10(data)
    batch = data / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-1])
    p = run_fxp_train("--dataset", "cifar10", "--data-dir", str(data), "-o", str(tmp_path / "run"), *QUIET)
    assert p.returncode == 1
    assert f"{batch}: 36875 bytes is not a whole number of 3073-byte records" in p.stderr
    p = run_fxp_train("--dataset", "cifar100", "--data-dir", str(data), "-o", str(tmp_path / "run2"), *QUIET)
    assert p.returncode == 1
    assert "missing dataset file" in p.stderr and "scripts/get_data.sh cifar100" in p.stderr
