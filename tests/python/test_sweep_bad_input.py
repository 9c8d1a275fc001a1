"""scripts/sweep on bad input: an --out it cannot create, throughput tables that --estimate cannot
use, settings JSON cannot carry (NaN, infinity) and filters that keep no run. Each is one line on
stderr, `sweep: ...`, never a traceback."""
from __future__ import annotations

import errno
import os
import pathlib
import sys

import pytest

from environment import ROOT, requires_fxp_train
from test_sweep import GOOD_BLOCKS, ONE_IMAGE_PER_S, fake_fxp_train, write_grid

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402
import sweeplib  # noqa: E402


def refuse_mkdir(monkeypatch, below: pathlib.Path, code: int) -> None:
    """Path.mkdir fails with `code` below `below`, as on a read-only file system (EROFS) or in a
    directory this user may not write (EACCES): the tests run as root, whom chmod does not stop."""
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if below in self.parents:
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)


@requires_fxp_train
@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_out_that_cannot_be_created_is_an_error_before_anything_runs(tmp_path, capsys, monkeypatch, code):
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    (tmp_path / "ro").mkdir()
    out = tmp_path / "ro" / "out"
    refuse_mkdir(monkeypatch, tmp_path / "ro", code)
    cmd = [str(grid), "--out", str(out), "--no-progress", "--fxp-train", str(fake_fxp_train(tmp_path))]
    assert sweep.main(cmd) == 2
    assert capsys.readouterr().err == f"sweep: --out {out}: cannot create {out}: {os.strerror(code)}\n"
    # A dry run writes nothing: it may look at results it cannot write.
    assert sweep.main([*cmd, "--dry-run"]) == 0


@requires_fxp_train
def test_settings_the_sweep_sets_itself_are_warned_about(tmp_path, capsys):
    grid = write_grid(tmp_path, "name: g\nbase: {output_dir: /elsewhere}\n" + GOOD_BLOCKS)
    cmd = [str(grid), "--out", str(tmp_path / "out"), "--fxp-train", str(fake_fxp_train(tmp_path)), "--dry-run"]
    assert sweep.main(cmd) == 0
    assert capsys.readouterr().err == ("sweep: warning: output_dir in the grid or --set is ignored: the sweep sets "
                                       "each run's threads (--threads) and directory (--out/<run id>)\n")
    assert sweep.main([*cmd, "--set", "threads=3"]) == 0
    assert "sweep: warning: output_dir and threads in the grid or --set are ignored" in capsys.readouterr().err
    assert sweep.main([str(write_grid(tmp_path, GOOD_BLOCKS)), *cmd[1:]]) == 0
    assert "warning" not in capsys.readouterr().err


@requires_fxp_train
def test_an_out_that_exists_but_cannot_be_written_is_an_error_before_anything_runs(tmp_path, capsys, monkeypatch):
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    out = tmp_path / "out"
    out.mkdir()  # mkdir(exist_ok=True) succeeds on it even on a read-only file system
    real_access = os.access
    monkeypatch.setattr(sweeplib.os, "access", lambda p, mode, *a, **k: False if pathlib.Path(p) == out
                        else real_access(p, mode, *a, **k))
    cmd = [str(grid), "--out", str(out), "--no-progress", "--fxp-train", str(fake_fxp_train(tmp_path))]
    assert sweep.main(cmd) == 2
    assert capsys.readouterr().err == (f"sweep: --out {out}: cannot write into it (a read-only file system, "
                                       "or no permission)\n")
    assert list(out.iterdir()) == []


def estimate(tmp_path, capsys, throughput: str, fleet: str | None = None) -> tuple[int, str]:
    """sweep --estimate over a two-run grid with the given tables: its exit status and stderr."""
    (tmp_path / "t.csv").write_text(throughput)
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800}\n"
                                + GOOD_BLOCKS)
    cmd = [str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv")]
    if fleet is not None:
        (tmp_path / "f.csv").write_text(fleet)
        cmd += ["--fleet-throughput", str(tmp_path / "f.csv")]
    code = sweep.main(cmd)
    return code, capsys.readouterr().err


HEADER = "method,batch_size,train_images_per_s,val_images_per_s\n"


@requires_fxp_train
@pytest.mark.parametrize("table, message", [
    # 0 divided by zero, -5 gave -0.0 h, nan nan h, inf 0.0 h
    (HEADER + "sqpu,1,0,1\n", "row 2: train_images_per_s must be a positive finite number, got 0"),
    (HEADER + "sqpu,1,-5,1\n", "row 2: train_images_per_s must be a positive finite number, got -5"),
    (HEADER + "sqpu,1,nan,1\n", "row 2: train_images_per_s must be a positive finite number, got nan"),
    (HEADER + "sqpu,1,inf,1\n", "row 2: train_images_per_s must be a positive finite number, got inf"),
    (HEADER + "sqpu,1,1,1\nsqpu,4,2,0\n", "row 3: val_images_per_s must be a positive finite number, got 0"),
    (HEADER + "sqpu,1,fast,1\n", "row 2: train_images_per_s must be a positive finite number, got fast"),
    (HEADER + "sqpu,1\n", "row 2: train_images_per_s must be a positive finite number, got nothing"),
    (HEADER + "sqpu,0,1,1\n", "row 2: batch_size must be a whole number of at least 1, got 0"),
    (HEADER + "sqpu,1.5,1,1\n", "row 2: batch_size must be a whole number of at least 1, got 1.5"),
    # only the KeyError's repr, 'val_images_per_s', was printed
    ("method,batch_size,train_images_per_s\nsqpu,1,1\n", "missing column val_images_per_s"),
    ("method,batch\nsqpu,1\n", "missing columns batch_size, train_images_per_s, val_images_per_s"),
    (HEADER, "no measurements"),
])
def test_a_throughput_table_the_estimate_cannot_use_is_an_error(tmp_path, capsys, table, message):
    code, err = estimate(tmp_path, capsys, table)
    assert (code, err) == (2, f"sweep: --estimate {tmp_path / 't.csv'}: {message}\n")


FLEET_HEADER = "method,batch_size,members,speedup\n"


@requires_fxp_train
@pytest.mark.parametrize("table, message", [
    (FLEET_HEADER + "sqpu,1,2,0\n", "row 2: speedup must be a positive finite number, got 0"),
    (FLEET_HEADER + "sqpu,1,2,-1.5\n", "row 2: speedup must be a positive finite number, got -1.5"),
    (FLEET_HEADER + "sqpu,1,2,nan\n", "row 2: speedup must be a positive finite number, got nan"),
    (FLEET_HEADER + "sqpu,1,2,inf\n", "row 2: speedup must be a positive finite number, got inf"),
    (FLEET_HEADER + "sqpu,1,0,2\n", "row 2: members must be a whole number of at least 1, got 0"),
    ("method,batch_size,members\nsqpu,1,2\n", "missing column speedup"),
    ("method,members\nsqpu,2\n", "missing columns batch_size, speedup"),
])
def test_a_fleet_table_the_estimate_cannot_use_is_an_error_naming_it(tmp_path, capsys, table, message):
    # It named --estimate and the throughput table, which is good here.
    code, err = estimate(tmp_path, capsys, ONE_IMAGE_PER_S, table)
    assert (code, err) == (2, f"sweep: --fleet-throughput {tmp_path / 'f.csv'}: {message}\n")


def test_the_tables_loaders_take_good_rows(tmp_path):
    (tmp_path / "t.csv").write_text("model," + HEADER + "lenet5,sqpu,4,100,1000.5\nlenet5,sqpu,1,25,400\n")
    assert sweeplib.load_throughput(tmp_path / "t.csv") == {("lenet5", "sqpu"): [(1, 25.0, 400.0),
                                                                                 (4, 100.0, 1000.5)]}
    (tmp_path / "f.csv").write_text(FLEET_HEADER + "sqpu,1,8,1.5\n")
    assert sweeplib.load_fleet_speedups(tmp_path / "f.csv") == {("paper_cnn", "sqpu"): {8: [(1, 1.5)]}}


@requires_fxp_train
@pytest.mark.parametrize("grid_text, where, value", [
    ("base: {lr: .nan}\n" + GOOD_BLOCKS, "base", "nan"),
    ("blocks:\n  - set: {lr: .inf}\n    axes: {seed: [0]}\n", "block 0, set", "inf"),
    ("blocks:\n  - axes: {lr: [0.1, -.Inf]}\n", "block 0, axis lr", "-inf"),
])
def test_a_grid_value_json_cannot_carry_is_an_error(tmp_path, capsys, grid_text, where, value):
    # fxp-train's JSON parse error (`[json.exception.parse_error.101] ...`) came through.
    grid = write_grid(tmp_path, grid_text)
    assert sweep.main([str(grid), "--dry-run", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"sweep: grid {grid}, {where}: lr must be a finite number, got {value}\n"


@requires_fxp_train
@pytest.mark.parametrize("text, value", [(".nan", "nan"), (".NaN", "nan"), (".inf", "inf"), ("-.inf", "-inf"),
                                         ("+.inf", "inf")])
def test_a_set_value_json_cannot_carry_is_an_error(tmp_path, capsys, text, value):
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    assert sweep.main([str(grid), "--dry-run", "--out", str(tmp_path / "out"), "--set", f"lr={text}"]) == 2
    assert capsys.readouterr().err == f"sweep: --set lr={text}: lr must be a finite number, got {value}\n"


@requires_fxp_train
def test_filters_that_keep_no_run_are_warned_about(tmp_path, capsys):
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    out = tmp_path / "out"
    cmd = [str(grid), "--out", str(out), "--no-progress", "--fxp-train", str(fake_fxp_train(tmp_path))]
    filters = ["--filter", "method=nonexistent", "--filter", "seed=0"]
    warning = "sweep: warning: no run matches the filters (--filter method=nonexistent --filter seed=0)\n"
    assert sweep.main([*cmd, "--dry-run", *filters]) == 0
    assert capsys.readouterr().err == warning
    assert sweep.main([*cmd, *filters]) == 0
    assert capsys.readouterr().err.startswith(warning)
    assert not out.exists()  # nothing to run: nothing written
    assert sweep.main([*cmd, "--dry-run", "--filter", "seed=1"]) == 0
    assert "warning" not in capsys.readouterr().err
