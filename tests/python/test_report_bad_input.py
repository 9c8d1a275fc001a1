"""scripts/report where it cannot write: an --out on a read-only or full file system, and a stdout
that is a closed pipe or a full device. One line on stderr, `report: ...`, never a traceback."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys

import pytest

from environment import ROOT
from test_sweep import SQPU, finished_run, report_rows
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


@pytest.mark.parametrize("change, problem", [
    (lambda s: s.update(best_val_accuracy="high"), 'its best_val_accuracy must be a number in [0, 1], but is "high"'),
    (lambda s: s["config"].update(seed=10**30),
     "its config.seed must be a whole number in [-2^63, 2^63 - 1], but is 1000000000000000000000000000000"),
    (lambda s: s["config"].update(param_bits="sixteen"),
     'its config.param_bits must be a whole number in [2, 32], but is "sixteen"'),
    (lambda s: s["config"].update(batch_size="x"),
     'its config.batch_size must be a whole number in [1, 2^63 - 1], but is "x"'),
    (lambda s: s.clear(), "it has no best_val_accuracy"),
    (lambda s: s.pop("config"), "it has no config"),
    (lambda s: s.update(config=[1]), "its config must be a JSON object, but is [1]"),
    (lambda s: s.update(best_val_accuracy=True), "its best_val_accuracy must be a number in [0, 1], but is true"),
    (lambda s: s.update(train_images_per_s=1e400),  # Python's json reads it as inf
     "its train_images_per_s must be a non-negative number, but is Infinity"),
    (lambda s: s.update(msq={"bits": {"conv1": "8"}}),
     'its msq.bits must be an object of whole numbers in [0, 64], but is {"conv1": "8"}'),
])
def test_a_summary_field_of_the_wrong_type_is_skipped_with_a_warning_naming_it(tmp_path, capsys, change, problem):
    """A summary.json whose field the report reads is of the wrong type or out of range is skipped, with a
    warning naming the file and the field; the other runs make the report (before: a traceback from the
    table or figure that used the field, or a {} taken as a finished run with blank columns)."""
    finished_run(tmp_path / "r" / "good", SQPU)
    for name in ("bad", "other"):  # two seeds and two batch sizes beside the good run: the heat maps draw
        finished_run(tmp_path / "r" / name, {**SQPU, "seed": 1 if name == "bad" else 2, "batch_size": 16})
    path = tmp_path / "r" / "bad" / "summary.json"
    summary = json.loads(path.read_text())
    change(summary)
    path.write_text(json.dumps(summary))
    assert report.main([str(tmp_path / "r"), "--out", str(tmp_path / "report")]) == 0
    assert capsys.readouterr().err == f"report: warning: skipping {path}: {problem}\n"
    rows = report_rows(tmp_path / "report")
    assert sorted(rows.id) == ["good", "other"]
