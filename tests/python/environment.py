"""What the Python tests find on this machine: the checkout, the built
fxp-train, the Debian Fashion-MNIST, the skip marks for tests that need them,
and the helpers that run fxp-train and read its metrics."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import warnings

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
FXP_TRAIN = pathlib.Path(os.environ.get("FXP_TRAIN") or ROOT / "build" / "fxp-train")  # as scripts/sweeplib.py
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
# The Fashion-MNIST directory fxp-train runs read: $FXP_FASHION_MNIST where set (scripts/gpu_check.sh
# points it at decompressed files on a machine without Debian's package), else Debian's.
FXP_TRAIN_DATA = pathlib.Path(os.environ.get("FXP_FASHION_MNIST") or FASHION)

requires_fxp_train_and_data = pytest.mark.skipif(
    not FXP_TRAIN.exists() or not FASHION.is_dir(),
    reason="needs build/fxp-train (scripts/setup.sh) and Fashion-MNIST (apt-get install dataset-fashion-mnist)")

# For tests that read FXP_TRAIN_DATA alone (gpu_check.sh's decompressed copy on the GPU machine qualifies).
requires_fxp_train_and_run_data = pytest.mark.skipif(
    not FXP_TRAIN.exists() or not FXP_TRAIN_DATA.is_dir(),
    reason=f"needs build/fxp-train (scripts/setup.sh) and Fashion-MNIST in {FXP_TRAIN_DATA} "
           "(apt-get install dataset-fashion-mnist, or set FXP_FASHION_MNIST)")

requires_cuda_fxp_train_and_run_data = pytest.mark.skipif(
    not torch.cuda.is_available() or not FXP_TRAIN.exists() or not FXP_TRAIN_DATA.is_dir(),
    reason="needs a CUDA device, build/fxp-train and Fashion-MNIST")

requires_fxp_train = pytest.mark.skipif(
    not FXP_TRAIN.exists(), reason="needs build/fxp-train (scripts/setup.sh; it needs CLI11 and nlohmann-json)")


def fxp_has_cuda_kernels() -> bool:
    """Whether libfxp, the build the tests load and fxp-train links, has CUDA kernels (FXP_CUDA)."""
    import fxp  # noqa: F401  (loads libfxp)
    return torch._C._dispatch_has_kernel_for_dispatch_key("fxp::pack_bits", "CUDA")


def no_cuda_device(device: str) -> str:
    """fxp-train's words for a CUDA device this machine lacks (csrc/train/run.cpp): a build without CUDA
    kernels says so too."""
    build = "" if fxp_has_cuda_kernels() else " (and this fxp build has no CUDA kernels)"
    return f"device {device} was requested, but no CUDA device is available{build}"


def bits(t: torch.Tensor) -> torch.Tensor:
    """A float tensor's raw bits, so that NaN compares equal to the same NaN and -0 differs from +0."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def run_fxp_train(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """fxp-train with these arguments; its output captured as text."""
    return subprocess.run([str(FXP_TRAIN), *args], capture_output=True, text=True, timeout=600, **kwargs)


def epoch_metrics(run_dir: pathlib.Path) -> list[dict]:
    """A run's metrics.jsonl without its timings and its count of CUDA-graph steps: what two
    identical runs (with or without --cuda-graphs) share bit for bit."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for line in lines:
        for key in ("epoch_time_s", "train_time_s", "images_per_s", "cuda_graph_steps"):
            line.pop(key)
    return lines


def checkpoint_state(run_dir) -> dict[str, torch.Tensor]:
    """The model's parameters (packed: their codes) and the optimizer's state in a run's checkpoint."""
    with warnings.catch_warnings():  # torch.jit.load reads LibTorch's archives; it warns that it is deprecated
        warnings.simplefilter("ignore", DeprecationWarning)
        archive = torch.jit.load(str(run_dir / "checkpoint.pt"))
    tensors = dict(archive.named_parameters())
    tensors.update(dict(archive.named_buffers()))
    return {name: t for name, t in tensors.items() if name.startswith(("model.", "optimizer."))}
