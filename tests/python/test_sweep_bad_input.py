"""scripts/sweep on bad input: an --out it cannot create, throughput tables that --estimate cannot
use (or that measured another device), settings JSON cannot carry (NaN, infinity), filters that keep
no run and runs on a GPU the machine lacks. Each is one line on stderr, `sweep: ...`, never a
traceback."""
from __future__ import annotations

import errno
import os
import pathlib
import sys

import pytest
import torch

from environment import FXP_TRAIN, ROOT, no_cuda_device, requires_fxp_train
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


def estimate(tmp_path, capsys, throughput: str, fleet: str | None = None, *extra: str,
             base: str = "") -> tuple[int, str]:
    """sweep --estimate over a two-run grid with the given tables (and `extra` arguments, `base`
    settings): its exit status and stderr; stdout, the summary, must be empty on an error."""
    (tmp_path / "t.csv").write_text(throughput)
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800"
                                f"{base}}}\n" + GOOD_BLOCKS)
    cmd = [str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv"), *extra]
    if fleet is not None:
        (tmp_path / "f.csv").write_text(fleet)
        cmd += ["--fleet-throughput", str(tmp_path / "f.csv")]
    code = sweep.main(cmd)
    captured = capsys.readouterr()
    assert code == 0 or captured.out == ""  # no summary before the error
    return code, captured.err


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


@requires_fxp_train
@pytest.mark.parametrize("option", ["--estimate", "--fleet-throughput"])
def test_a_table_that_cannot_be_read_is_an_error_before_anything_else(tmp_path, capsys, option):
    # It printed the whole summary, then "[Errno 2] No such file or directory: 'nothere.csv'".
    missing, good = tmp_path / "nothere.csv", tmp_path / "t.csv"
    good.write_text(ONE_IMAGE_PER_S)
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    tables = {"--estimate": missing} if option == "--estimate" else {"--estimate": good, option: missing}
    cmd = [str(grid), "--out", str(tmp_path / "out"), *(str(x) for kv in tables.items() for x in kv)]
    assert sweep.main(cmd) == 2
    assert capsys.readouterr() == ("", f"sweep: {option} {missing}: cannot read it: No such file or directory\n")
    tables[option] = tmp_path
    assert sweep.main([str(grid), *cmd[1:3], *(str(x) for kv in tables.items() for x in kv)]) == 2
    assert capsys.readouterr() == ("", f"sweep: {option} {tmp_path}: cannot read it: Is a directory\n")
    # Checked first, before the grid (here one that does not exist) is read and expanded.
    assert sweep.main([str(tmp_path / "no-grid.yaml"), *cmd[1:]]) == 2
    assert capsys.readouterr().err == f"sweep: {option} {missing}: cannot read it: No such file or directory\n"


DEVICE_HEADER = "model,method,batch_size,device,threads,train_images_per_s,val_images_per_s\n"


@requires_fxp_train
@pytest.mark.parametrize("table, extra, base, device, has", [
    (DEVICE_HEADER + "paper_cnn,sqpu,1,cpu,1,1,1\n", ["--device", "cuda"], "", "cuda", "cpu"),
    (DEVICE_HEADER + "paper_cnn,sqpu,1,cpu,1,1,1\n", ["--device", "cuda:1"], "", "cuda", "cpu"),
    (DEVICE_HEADER + "paper_cnn,sqpu,1,cpu,1,1,1\n", [], ", device: cuda", "cuda", "cpu"),  # the grid's device
    (DEVICE_HEADER + "paper_cnn,sqpu,1,cuda,0,1,1\npaper_cnn,fp32,1,cuda:0,0,1,1\n", [], "", "cpu", "cuda"),
    (DEVICE_HEADER + "paper_cnn,sqpu,1,cuda,0,1,1\npaper_cnn,sqpu,4,,0,1,1\n", [], "", "cpu", "cuda, nothing"),
])
def test_a_throughput_table_of_another_device_is_an_error(tmp_path, capsys, table, extra, base, device, has):
    # A CPU's images/s priced GPU runs, and the reverse, without a word.
    code, err = estimate(tmp_path, capsys, table, None, *extra, base=base)
    assert (code, err) == (2, f"sweep: --estimate {tmp_path / 't.csv'}: no measurements on {device}, the runs' "
                              f"device (the table has {has}); measure it with scripts/bench_train.py --device "
                              f"{device}\n")


@requires_fxp_train
def test_the_projects_throughput_tables_price_their_own_device_only(tmp_path, capsys):
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    cmd = [str(grid), "--out", str(tmp_path / "out")]
    for table, device, other in (("throughput-cpu.csv", "cuda", "cpu"), ("throughput-cuda.csv", "cpu", "cuda")):
        path = ROOT / "docs" / table
        assert sweep.main([*cmd, "--estimate", str(path), "--device", device]) == 2
        assert f"sweep: --estimate {path}: no measurements on {device}, the runs' device (the table has " \
               f"{other})" in capsys.readouterr().err
        assert sweep.main([*cmd, "--estimate", str(path), "--device", other]) == 0
        assert "estimated wall time of the 2 pending runs" in capsys.readouterr().out


@requires_fxp_train
def test_the_estimate_takes_the_rows_of_the_runs_device(tmp_path, capsys):
    # One table, both devices: 1,800 images a run at 1 image/s on the CPU, 2 on a GPU; two runs on one job.
    (tmp_path / "t.csv").write_text(DEVICE_HEADER + "paper_cnn,sqpu,1,cpu,1,1,1\npaper_cnn,sqpu,1,cuda:0,0,2,2\n")
    for extra, base, hours in (([], "", "1.0"), (["--device", "cuda:1"], "", "0.5"), ([], ", device: cuda", "0.5"),
                               (["--device", "cpu"], ", device: cuda", "1.0")):
        grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800"
                                    f"{base}}}\n" + GOOD_BLOCKS)
        assert sweep.main([str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv"),
                           "--jobs", "1", "--fleet", "1", *extra]) == 0
        assert f"on 1 job at the measured throughput: {hours} h" in capsys.readouterr().out, (extra, base)
    # bench_fleet's speed-ups too: a CPU's fleet gains are no GPU's.
    fleet = "method,batch_size,members,device,threads,speedup\nsqpu,1,8,cpu,1,2.0\n"
    code, err = estimate(tmp_path, capsys, (tmp_path / "t.csv").read_text(), fleet, "--device", "cuda")
    assert (code, err) == (2, f"sweep: --fleet-throughput {tmp_path / 'f.csv'}: no measurements on cuda, the runs' "
                              "device (the table has cpu); measure it with scripts/bench_fleet.py --device cuda\n")
    # Runs on both devices are priced one device at a time, not all at the first one's speed.
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800}\n"
                                "blocks:\n  - axes: {seed: [0]}\n  - set: {device: cuda}\n    axes: {seed: [1, 2]}\n")
    assert sweep.main([str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv")]) == 2
    assert "sweep: the selected runs are on cpu and cuda: price one device at a time (--filter device=...)" \
        in capsys.readouterr().err
    assert sweep.main([str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv"),
                       "--filter", "device=cuda", "--jobs", "1", "--fleet", "1"]) == 0
    assert "on 1 job at the measured throughput: 0.5 h" in capsys.readouterr().out


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


@requires_fxp_train
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_runs_on_a_gpu_the_machine_lacks_are_refused_before_any_starts(tmp_path, capsys):
    # Every run started, and each wrote its failed.json (Exp 2: 2,750 of them).
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    out = tmp_path / "out"
    cmd = [str(grid), "--out", str(out), "--no-progress", "--fxp-train", str(fake_fxp_train(tmp_path))]
    for device in ("cuda", "cuda:1"):
        assert sweep.main([*cmd, "--device", device]) == 2
        assert capsys.readouterr().err == f"sweep: {no_cuda_device(device)} (fxp-train says); no run was started\n"
        assert not out.exists()
    cuda_grid = tmp_path / "cuda.yaml"
    cuda_grid.write_text("base: {device: cuda}\n" + GOOD_BLOCKS)
    assert sweep.main([str(cuda_grid), *cmd[1:]]) == 2  # the grid's device alike
    assert "no CUDA device is available" in capsys.readouterr().err
    # Only running needs the GPU: not a dry run, an estimate (of the GPU's table), or a sweep with nothing to run.
    (tmp_path / "t.csv").write_text(DEVICE_HEADER + "paper_cnn,sqpu,64,cuda,0,1000,1000\n")
    assert sweep.main([*cmd, "--device", "cuda", "--dry-run"]) == 0
    assert sweep.main([*cmd, "--device", "cuda", "--estimate", str(tmp_path / "t.csv")]) == 0
    assert "estimated wall time of the 2 pending runs" in capsys.readouterr().out
    assert not out.exists()
    assert sweep.main(cmd) == 0  # on the CPU (the stand-in trains them)
    capsys.readouterr()
    for r in sweeplib.select(sweeplib.expand(sweeplib.load_grid(grid), out=out), device="cuda", out=out):
        sweeplib.atomic_write_json(out / r.id / "summary.json", {"config": r.full_config})  # finished on a GPU
    assert sweep.main([*cmd, "--device", "cuda"]) == 0  # done already: nothing starts, no GPU is needed
    assert "no CUDA device" not in capsys.readouterr().err


@requires_fxp_train
def test_the_gpu_probe_is_fxp_trains_own_answer(tmp_path):
    """sweeplib.missing_gpu asks fxp-train, whose message it passes on: on this machine's GPU, or its lack."""
    for device in ("cuda", "cuda:0"):
        assert sweeplib.missing_gpu(FXP_TRAIN, device) == ("" if torch.cuda.is_available() else no_cuda_device(device))
    assert sweeplib.missing_gpu(FXP_TRAIN, "cpu") == ""
    assert sweeplib.missing_gpu(FXP_TRAIN, None) == ""


@requires_fxp_train
@pytest.mark.parametrize("blocks, message", [
    # The axis's values replaced set's in every run: `set: {seed: 1}` ran seed 0 only, unsaid.
    ("  - name: one\n    set: {seed: 1}\n    axes: {seed: [0]}\n",
     "block 0 (one): seed is in both set and axes, whose every value replaces set's (seed: 1), which no run keeps; "
     "give it in one of them"),
    ("  - axes: {seed: [0]}\n  - set: {out_frac: 8}\n    axes: {seed: [0], format: [{param_bits: 16, param_frac: 10, "
     "out_frac: 6}, {param_bits: 8, param_frac: 4, out_frac: 3}]}\n",
     "block 1: out_frac is in both set and axis format, whose every value replaces set's (out_frac: 8), which no run "
     "keeps; give it in one of them"),
])
def test_a_key_in_both_a_blocks_set_and_its_axes_is_an_error(tmp_path, capsys, blocks, message):
    grid = write_grid(tmp_path, "blocks:\n" + blocks)
    assert sweep.main([str(grid), "--dry-run", "--out", str(tmp_path / "out"),
                       "--fxp-train", str(fake_fxp_train(tmp_path))]) == 2
    assert capsys.readouterr().err == f"sweep: grid {grid}, {message}\n"


@requires_fxp_train
def test_a_block_overrides_base_with_its_set_and_its_axes(tmp_path):
    # base < set < axes: a block may override base either way; only set and axes together are refused.
    grid = sweeplib.load_grid(write_grid(tmp_path, "base: {seed: 5, lr: 0.1}\nblocks:\n"
                                                   "  - set: {lr: 0.2}\n    axes: {seed: [0, 1]}\n"))
    assert grid["blocks"][0]["set"] == {"lr": 0.2}
    runs = sweeplib.expand(grid, FXP_TRAIN, tmp_path / "out")
    assert sorted((dict(r.settings)["seed"], dict(r.settings)["lr"]) for r in runs) == [(0, 0.2), (1, 0.2)]


@requires_fxp_train
def test_a_set_value_is_the_default_of_mapping_options_that_do_not_give_it(tmp_path):
    # Only the second option gives out_frac: the first keeps set's, so nothing is lost and the grid is valid.
    grid = sweeplib.load_grid(write_grid(tmp_path, "blocks:\n  - set: {method: sqpu, out_frac: 8}\n"
                                                   "    axes: {format: [{param_bits: 16, param_frac: 10}, "
                                                   "{param_bits: 8, param_frac: 4, out_frac: 3}]}\n"))
    runs = sweeplib.expand(grid, FXP_TRAIN, tmp_path / "out")
    assert sorted(dict(r.settings)["out_frac"] for r in runs) == [3, 8]


@requires_fxp_train
@pytest.mark.parametrize("value, bad", [("abc", "abc"), ("16/10", "16/10"), ("16/10/8/4", "16/10/8/4"),
                                        ("16/10/x", "16/10/x"), ("16/10/8,", ""), ("16/-10/8", "16/-10/8")])
def test_a_malformed_format_filter_is_a_usage_error(tmp_path, capsys, value, bad):
    # It matched no run: a warning and exit status 0, as a well-formed format no run has.
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    assert sweep.main([str(grid), "--dry-run", "--out", str(tmp_path / "out"), "--fxp-train",
                       str(fake_fxp_train(tmp_path)), "--filter", f"format={value}"]) == 2
    assert capsys.readouterr() == ("", f"sweep: --filter format={value}: expected format=TOTAL/FRAC/OUTFRAC[,...], "
                                       "whole numbers (param_bits/param_frac/out_frac, e.g. format=16/10/8), "
                                       f"got {bad!r}\n")


def test_a_format_filter_is_read_as_numbers():
    assert sweeplib.parse_filters(["format=016/10/08,12/8/6"]) == {"format": {"16/10/8", "12/8/6"}}
