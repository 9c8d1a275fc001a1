"""scripts/diagnose/error_paths.py: every error path of the ops it knows raises
its exception, each in its own process (on a GPU, the CUDA ones too; a crash
fails this test with the native stack in its output)."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from environment import ROOT, fxp_has_cuda_kernels


def test_every_error_path_raises_its_exception():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "torch_ext"),
                                                                      os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose" / "error_paths.py")], capture_output=True,
                       text=True, env=env, timeout=900)
    assert p.returncode == 0 and "every error path raised as expected" in p.stdout, p.stdout + p.stderr
    assert "pack_bits_cpu_outside: raised RuntimeError as expected" in p.stdout


FAKE_CUDA = ROOT / "scripts" / "diagnose" / "fake_cuda" / "run.sh"
CUDA_HOME = pathlib.Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda")
# fxp's CUDA cases of error_paths.py: each raises after a count is read back from the device, or before a launch.
FXP_CUDA_CASES = ("pack_bits_cuda_outside", "pack_cuda_nan", "qpu_step_cuda_packed_nan", "round_clamp_codes_cuda_nan",
                  "quantize_cuda_device_mismatch", "pack_bits_cuda_bad_dtype")


def _fake_cuda_skip_reason() -> str | None:
    import torch

    if torch.cuda.is_available():
        return "a real GPU is here: error_paths.py runs these cases on it (test above)"
    if not fxp_has_cuda_kernels():
        return "libfxp was built without CUDA kernels"
    if not any((CUDA_HOME / d / "libcudart.so.13").is_file() for d in ("lib64", "targets/x86_64-linux/lib")):
        return f"no CUDA 13 toolkit under {CUDA_HOME} to build the stand-in runtime from"
    if shutil.which("gcc") is None or shutil.which("nm") is None:
        return "the stand-in runtime needs gcc and nm"
    return None


def test_fxp_cuda_error_paths_raise_under_the_stand_in_runtime(tmp_path):
    """scripts/diagnose/fake_cuda: with a stand-in CUDA runtime (no kernels run, the counts read back forced
    nonzero), libfxp's CUDA host code takes each error path that crashed on the GPU machine (docs/gpu-check.md)
    and raises, here, on a machine without a GPU. Keeps the diagnostic tool working between GPU runs."""
    reason = _fake_cuda_skip_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "FXP_FAKE_CUDA_BUILD": str(tmp_path / "fake-cuda"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "torch_ext"), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([str(FAKE_CUDA), "--counts", "--", sys.executable,
                        str(ROOT / "scripts" / "diagnose" / "error_paths.py")],
                       capture_output=True, text=True, env=env, timeout=900)
    for case in FXP_CUDA_CASES:
        assert re.search(rf"^\[plain\] exit 0: {case}: raised \w+ as expected", p.stdout, re.M), p.stdout + p.stderr
    # torch's own negative-bincount check is a kernel, which the stand-in does not run: it raises nothing there.
    assert "torch_bincount_cuda_negative: raised nothing" in p.stdout, p.stdout + p.stderr
