"""Scripts started by a Python without their modules (scripts/project_env.py):
they restart under the project's environment, or say what is missing and how
to make it, instead of an ImportError's traceback. ``python -S`` stands in for
such a Python: without site-packages it has neither torch nor rich."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from environment import ROOT

SCRIPTS = ["bench_train", "bench_optim", "bench_fleet", "bench_adapt", "bench_pool", "bench_quantize",
           "memory_table", "demo", "report", "sweep"]


def _run(script: str, env: dict, args=("--help",)) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FXP_VENV", "FXP_SYSTEM_PYTHON")} | env
    return subprocess.run([sys.executable, "-S", str(ROOT / "scripts" / f"{script}.py"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


# The tests' own environment, when they run in one (CI's, a developer's); ``-S`` leaves its site-packages out.
IN_A_VENV = sys.prefix != sys.base_prefix


@pytest.mark.skipif(not IN_A_VENV, reason="the tests' Python is not a virtual environment to restart under")
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_restarts_under_the_project_python(script):
    result = _run(script, {"FXP_VENV": sys.prefix})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:"), result.stdout


@pytest.mark.skipif(not IN_A_VENV, reason="the tests' Python is not a virtual environment to restart under")
def test_the_demo_restarts_before_it_needs_torch():
    """demo.py imports torch only after its arguments, so its --help runs anywhere; a demo needs the restart."""
    result = _run("demo", {"FXP_VENV": sys.prefix}, ["--numel", "64"])
    assert result.returncode == 0, result.stderr
    assert "FxP" in result.stdout, result.stdout


def test_without_the_project_python_the_script_says_what_to_do(tmp_path):
    result = _run("bench_train", {"FXP_VENV": str(tmp_path / "none")})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "bench_train.py: needs the Python modules torch, rich" in result.stderr
    assert f"scripts/setup.sh installs them into {tmp_path / 'none'}" in result.stderr


def test_fxp_system_python_keeps_this_python():
    result = _run("report", {"FXP_VENV": sys.prefix, "FXP_SYSTEM_PYTHON": "1"})
    assert result.returncode == 1 and "report.py: needs the Python modules numpy, pandas" in result.stderr
