"""scripts/diagnose/error_paths.py: every error path of the ops it knows raises
its exception, each in its own process (on a GPU, the CUDA ones too; a crash
fails this test with the native stack in its output)."""

from __future__ import annotations

import os
import subprocess
import sys

from environment import ROOT


def test_every_error_path_raises_its_exception():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "torch_ext"),
                                                                      os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose" / "error_paths.py")], capture_output=True,
                       text=True, env=env, timeout=900)
    assert p.returncode == 0 and "every error path raised as expected" in p.stdout, p.stdout + p.stderr
    assert "pack_bits_cpu_outside: raised RuntimeError as expected" in p.stdout
