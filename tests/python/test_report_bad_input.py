"""scripts/report where it cannot write: an --out on a read-only or full file system, and a stdout
that is a closed pipe or a full device. One line on stderr, `report: ...`, never a traceback."""
from __future__ import annotations

import errno
import os
import pathlib
import subprocess
import sys

import pytest

from environment import ROOT
from test_sweep import SQPU, finished_run
from test_sweep_bad_input import refuse_mkdir

sys.path.insert(0, str(ROOT / "scripts"))
import report  # noqa: E402


def test_an_out_on_a_read_only_file_system_is_an_error(tmp_path, capsys, monkeypatch):
    finished_run(tmp_path / "r" / "done", SQPU)
    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro" / "report"
    refuse_mkdir(monkeypatch, tmp_path / "ro", errno.EROFS)
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"report: cannot write {out}: Read-only file system\n"


def test_a_full_disk_is_an_error_naming_out(tmp_path, capsys, monkeypatch):
    # PIL's write error on a full disk names no file: the report names --out.
    import matplotlib.figure

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    finished_run(tmp_path / "r" / "done", SQPU)
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"report: cannot write {out}: No space left on device\n"


def test_a_file_it_cannot_open_is_named(tmp_path, capsys):
    finished_run(tmp_path / "r" / "done", SQPU)
    (tmp_path / "report" / "runs.csv").mkdir(parents=True)
    assert report.main([str(tmp_path / "r"), "--out", str(tmp_path / "report")]) == 1
    assert capsys.readouterr().err == f"report: cannot write {tmp_path / 'report' / 'runs.csv'}: Is a directory\n"


def run_report(tmp_path, stdout) -> subprocess.CompletedProcess:
    finished_run(tmp_path / "r" / "done", SQPU)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path / "r"), "--out",
                           str(tmp_path / "report")], stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=300)


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    # `scripts/report ... | head`, where head is gone: a BrokenPipeError traceback, twice.
    read, write = os.pipe()
    os.close(read)
    try:
        p = run_report(tmp_path, write)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (1, "")
    assert (tmp_path / "report" / "report.md").exists()  # written before the pipe was


@pytest.mark.skipif(not pathlib.Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_an_error(tmp_path):
    with open("/dev/full", "w") as full:
        p = run_report(tmp_path, full)
    assert (p.returncode, p.stderr) == (1, "report: cannot write to stdout: No space left on device\n")
