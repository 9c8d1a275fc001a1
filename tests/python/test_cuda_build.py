"""How the CUDA kernels are compiled (issue 11): the newest architecture also
as PTX, so a GPU newer than the list still runs them, and TORCH_CUDA_ARCH_LIST
from the environment is respected. CI builds the CUDA kernels (FXP_CUDA=ON)
without a GPU, so these run there."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from environment import ROOT

# The build that `import fxp` loads: $FXP_LIBRARY's folder where set (gpu_check.sh's build-gpu), else build/.
BUILD = pathlib.Path(os.environ["FXP_LIBRARY"]).parent if os.environ.get("FXP_LIBRARY") else ROOT / "build"


def _gencode(commands: list[dict]) -> set[str]:
    flags = set()
    for entry in commands:
        if entry["file"].endswith(".cu"):
            flags |= set(re.findall(r"arch=compute_\d+a?,code=\w+", entry["command"]))
    return flags


@pytest.mark.skipif(not (BUILD / "compile_commands.json").exists(), reason=f"needs {BUILD}/compile_commands.json (scripts/setup.sh)")
def test_the_newest_architecture_is_also_compiled_to_ptx():
    commands = json.loads((BUILD / "compile_commands.json").read_text())
    flags = _gencode(commands)
    if not flags:
        pytest.skip("this build has no CUDA kernels (FXP_CUDA=OFF, or no nvcc)")
    versions = {int(m) for m in re.findall(r"compute_(\d+)", " ".join(flags))}
    assert f"arch=compute_{max(versions)},code=compute_{max(versions)}" in flags, sorted(flags)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="needs the CUDA toolkit (nvcc) to configure a CUDA build")
def test_torch_cuda_arch_list_from_the_environment_is_respected(tmp_path):
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="8.6 7.5")
    if shutil.which("nvcc") is None:
        env["CUDACXX"] = "/usr/local/cuda/bin/nvcc"
    p = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-DFXP_CUDA=ON", "-DFXP_BUILD_TESTS=OFF",
                        f"-DFXP_PYTHON={sys.executable}"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "fxp: CUDA architectures 8.6+PTX;7.5" in p.stdout
    flags = _gencode(json.loads((tmp_path / "compile_commands.json").read_text()))
    assert flags == {"arch=compute_86,code=sm_86", "arch=compute_86,code=compute_86", "arch=compute_75,code=sm_75"}
