"""scripts/get_data.sh's argument checks: each refusal comes before any
download, so these run without a network."""

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "get_data.sh"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("directory, dataset", [("data/cifar10", "cifar10"), ("data/cifar100", "cifar100"),
                                                ("cifar10x/", "cifar10"), ("out/emnist", "emnist"),
                                                ("data/mnist", "mnist")])
def test_a_directory_named_after_another_dataset_is_refused(tmp_path, directory, dataset):
    """The old form `get_data.sh DIR` gets Fashion-MNIST: into data/cifar10 it
    would have left Fashion-MNIST where --dataset cifar10 then looks."""
    p = run(directory, cwd=tmp_path)
    assert p.returncode == 2
    assert f"for {dataset} run: scripts/get_data.sh {dataset} {directory}" in p.stderr
    assert not any(tmp_path.iterdir())  # nothing made, nothing downloaded


def test_help_and_unknown_datasets(tmp_path):
    p = run("--help", cwd=tmp_path)
    assert p.returncode == 0 and "Usage: scripts/get_data.sh [DATASET] [DIR]" in p.stdout
    p = run("svhn", cwd=tmp_path)
    assert p.returncode == 2 and "unknown dataset 'svhn' (one of: fashion-mnist" in p.stderr
