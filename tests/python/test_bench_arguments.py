"""The benchmark scripts' argument checks: a bad method or list is refused,
with fxp-train's own reason, before any point is measured (a run of
bench_train.py is minutes; a bad name used to cost them and leave a NaN row)."""

from __future__ import annotations

import importlib.util
import math
import sys
import threading

import pytest

from environment import FXP_TRAIN, ROOT, requires_fxp_train

sys.path.insert(0, str(ROOT / "scripts"))
import sweeplib  # noqa: E402


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_train = _script("bench_train")
bench_fleet = _script("bench_fleet")


@requires_fxp_train
@pytest.mark.parametrize("methods, message", [
    ("foo", "--methods foo: --method: foo not in {fp32,ste,sqpu,hteqpu,adapt,msq}"),
    ("ste:packed", "--methods ste:packed: fxp-train: packed: lenet5 packs the QPU methods' weights and momentum only"),
    ("sqpu:fast", "unknown method variant 'sqpu:fast'"),
])
def test_bench_train_refuses_a_method_fxp_train_refuses(methods, message):
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--fxp-train", str(FXP_TRAIN), "--methods", methods, "--model", "lenet5"])
    assert message in str(e.value)


@pytest.mark.parametrize("main", [bench_train.main, bench_fleet.main])
@pytest.mark.parametrize("sizes, message", [
    ("1,a", "expected comma-separated integers, but got '1,a'"),
    ("4,0", "every value must be at least 1, but got '4,0'"),
])
def test_batch_size_lists_are_positive_integers(main, sizes, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--batch-sizes", sizes])
    assert e.value.code == 2  # argparse's usage error, before anything runs
    assert message in capsys.readouterr().err


def test_bench_fleet_refuses_fewer_than_one_job(capsys):
    with pytest.raises(SystemExit) as e:
        bench_fleet.main(["--jobs", "0"])
    assert e.value.code == 2 and "argument --jobs: must be at least 1, got 0" in capsys.readouterr().err


def test_bench_fleet_jobs_run_at_once_and_sum():
    # Each copy waits for the other at the barrier: copies run one after another would time out there.
    barrier = threading.Barrier(3, timeout=30)

    def one_copy():
        barrier.wait()
        return 2.5

    assert bench_fleet.at_once(3, one_copy) == 7.5
    assert bench_fleet.at_once(1, lambda: 4.0) == 4.0
    assert math.isnan(bench_fleet.at_once(2, lambda: float("nan")))


def test_bench_fleet_runs_as_a_sweep_does_unless_told(monkeypatch, capsys):
    # bench_fleet takes its jobs and threads from sweeplib.jobs_and_threads (test_sweep_threads.py), as
    # scripts/sweep does; a point that ran here would name them in its row.
    monkeypatch.setattr(sweeplib, "usable_cpus", lambda: 6)
    monkeypatch.setattr(sweeplib, "usable_memory_gib", lambda: 64.0)
    seen = []
    monkeypatch.setattr(bench_fleet, "at_once", lambda jobs, measure_one: seen.append(jobs) or float("nan"))
    assert bench_fleet.main(["--batch-sizes", "1", "--fleet-sizes", "2"]) == 1  # NaN points: failed, named
    assert seen == [6, 6]  # one solo point and one fleet point, 6 copies each
    with pytest.raises(SystemExit) as e:
        bench_fleet.main(["--threads", "-1"])
    assert e.value.code == 2 and "argument --threads: must be at least 0, got -1" in capsys.readouterr().err


bench_adapt = _script("bench_adapt")
# The scripts that time ops in this process (their main() reads sys.argv).
bench_optim, bench_pool, bench_quantize = (_script(name) for name in ("bench_optim", "bench_pool", "bench_quantize"))

# What each script measures with: a test that got past the argument checks would measure for minutes.
MEASURING = {bench_adapt: ("measure", "bench_step", "bench_python_loop"),
             bench_train: ("measure", "check_method", "check_model"), bench_fleet: ("measure", "at_once"),
             bench_optim: ("time_step",), bench_pool: ("time_it",), bench_quantize: ("time_one", "load_qtorch")}


def refused(script, args: list[str], monkeypatch, capsys) -> str:
    """The stderr of `script` run with `args`, which its argument checks must refuse (argparse's exit
    status 2) before anything is measured."""
    def measured(*_, **__):
        raise AssertionError(f"{script.__name__} {' '.join(args)}: the arguments were taken")
    for name in MEASURING[script]:
        monkeypatch.setattr(script, name, measured)
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *args])
    with pytest.raises(SystemExit) as e:
        script.main()
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("lookback, message", [
    ("25", "expected MIN,MAX, two whole numbers, got '25'"),  # was a ValueError traceback
    ("a,b", "expected MIN,MAX, two whole numbers, got 'a,b'"),
    ("1,2,3", "expected MIN,MAX, two whole numbers, got '1,2,3'"),
    ("100,25", "needs 1 <= MIN <= MAX, got '100,25'"),
    ("0,25", "needs 1 <= MIN <= MAX, got '0,25'"),
])
@pytest.mark.parametrize("mode", [[], ["--python-loop"]])  # the Python loop did not check it at all
def test_bench_adapt_lookback_is_two_ordered_whole_numbers(lookback, message, mode, monkeypatch, capsys):
    err = refused(bench_adapt, ["--lookback", lookback, *mode], monkeypatch, capsys)
    assert err.endswith(f"error: argument --lookback: {message}\n")


@pytest.mark.parametrize("script, args, message", [
    (bench_adapt, ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),  # was a StatisticsError
    (bench_adapt, ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (bench_adapt, ["--batch-size", "-4"], "argument --batch-size: must be at least 1, got -4"),
    (bench_adapt, ["--threads", "-1"], "argument --threads: must be at least 0, got -1"),
    (bench_adapt, ["--repeats", "two"], "argument --repeats: expected a whole number, got 'two'"),
    (bench_adapt, ["--step-only", "--step-params", "nan"],
     "argument --step-params: must be a positive number, got nan"),
    (bench_train, ["--steps", "0"], "argument --steps: must be at least 1, got 0"),
    (bench_train, ["--val-images", "0"], "argument --val-images: must be at least 1, got 0"),
    (bench_train, ["--threads", "-2"], "argument --threads: must be at least 0, got -2"),
    (bench_fleet, ["--steps", "-1"], "argument --steps: must be at least 1, got -1"),
    (bench_fleet, ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
    (bench_pool, ["--batch-sizes", "1,0"], "argument --batch-sizes: every value must be at least 1, but got '1,0'"),
    (bench_pool, ["--threads", "0"], "argument --threads: must be at least 1, got 0"),
    # --min-run-time nan or inf was taken, and inf measures forever
    (bench_optim, ["--min-run-time", "nan"], "argument --min-run-time: must be a positive number, got nan"),
    (bench_optim, ["--min-run-time", "inf"], "argument --min-run-time: must be a positive number, got inf"),
    (bench_optim, ["--min-run-time", "0"], "argument --min-run-time: must be a positive number, got 0"),
    (bench_optim, ["--min-run-time", "soon"], "argument --min-run-time: expected a number, got 'soon'"),
    (bench_optim, ["--large-total", "inf"], "argument --large-total: must be a positive number, got inf"),
    (bench_optim, ["--large-tensors", "0"], "argument --large-tensors: must be at least 1, got 0"),
    (bench_optim, ["--large-total", "5", "--large-tensors", "10"],
     "--large-total must be at least --large-tensors (10), got 5"),  # empty tensors: a ZeroDivisionError
    (bench_pool, ["--min-run-time", "-1"], "argument --min-run-time: must be a positive number, got -1"),
    (bench_quantize, ["--min-run-time", "nan"], "argument --min-run-time: must be a positive number, got nan"),
    (bench_quantize, ["--sizes", "1e4,inf"], "argument --sizes: expected numbers like 1e4,1e6, got '1e4,inf'"),
    # was "--format: invalid literal for int() with base 10: '16/20'"
    (bench_quantize, ["--format", "16/20"],
     "argument --format: expected TOTAL,FRAC, two whole numbers such as 8,4, got '16/20'"),
    (bench_quantize, ["--format", "8"],
     "argument --format: expected TOTAL,FRAC, two whole numbers such as 8,4, got '8'"),
])
def test_bench_numbers_are_checked_before_measuring(script, args, message, monkeypatch, capsys):
    assert refused(script, args, monkeypatch, capsys).endswith(f"error: {message}\n")


def test_bench_markdown_goes_into_a_directory_it_makes(tmp_path):
    # The file is opened once every point is measured: a missing directory lost them to a traceback.
    from bench_report import BenchReport
    report = BenchReport("header", "notes")
    report.table("t", ["a"], [["1"]])
    path = tmp_path / "new" / "dir" / "t.md"
    report.save(str(path))
    assert path.read_text().startswith("### header\n\nnotes\n")


@requires_fxp_train
def test_bench_train_names_a_bad_model_as_the_model():
    # It was named as the first method's: `--methods fp32: --model: bogus not in ...`.
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--fxp-train", str(FXP_TRAIN), "--model", "bogus"])
    assert str(e.value).startswith("bench_train.py: --model: bogus not in {paper_cnn,")


@pytest.mark.parametrize("script, option", [
    (bench_quantize, "--markdown"), (bench_pool, "--markdown"), (bench_optim, "--markdown"),
    (bench_train, "--csv"), (bench_train, "--markdown"), (bench_fleet, "--csv"), (bench_fleet, "--markdown"),
    (bench_adapt, "--csv"), (bench_adapt, "--markdown"),
])
def test_bench_output_files_are_checked_before_measuring(script, option, tmp_path, monkeypatch, capsys):
    # A file under a regular file, or a directory, was a FileExistsError (IsADirectoryError) once every
    # point was measured.
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "below" / "x"
    err = refused(script, [option, str(path)], monkeypatch, capsys)
    assert err.endswith(f"error: argument {option}: {path}: {tmp_path / 'file'} is not a directory\n")
    err = refused(script, [option, str(tmp_path)], monkeypatch, capsys)
    assert err.endswith(f"error: argument {option}: {tmp_path} is a directory\n")


def failing_fxp_train(tmp_path):
    """A stand-in fxp-train that fails every run, as a bad --data-dir makes the real one fail."""
    fxp_train = tmp_path / "fxp-train"
    fxp_train.write_text("#!/bin/sh\necho 'fxp-train: no data here' >&2\nexit 2\n")
    fxp_train.chmod(0o755)
    return fxp_train


def test_bench_fleet_names_itself_when_a_solo_run_fails(tmp_path, capsys):
    # Its solo runs go through bench_train.measure, whose failure lines said bench_train.py.
    assert bench_fleet.main(["--fxp-train", str(failing_fxp_train(tmp_path)), "--methods", "sqpu",
                             "--batch-sizes", "1", "--fleet-sizes", "2", "--steps", "1", "--jobs", "1",
                             "--threads", "1"]) == 1
    err = capsys.readouterr().err
    assert "bench_fleet.py: sqpu at batch 1 failed (exit 2):\nfxp-train: no data here\n" in err
    assert "bench_train.py" not in err
    assert err.endswith("bench_fleet.py: every point (1) failed: sqpu at batch 1, K = 2\n")


def test_bench_adapt_fails_when_its_points_fail(tmp_path, monkeypatch, capsys):
    # Every fxp-train run failing (a bad --data-dir) printed a table of NaN and exited 0; bench_train exits 1.
    # Each failed run's line named bench_train.py, whose measure() ran it.
    monkeypatch.setattr(bench_adapt, "check_model", lambda *args: None)
    fxp_train = failing_fxp_train(tmp_path)
    csv_path = tmp_path / "adapt.csv"
    assert bench_adapt.main(["--fxp-train", str(fxp_train), "--repeats", "1", "--batch-size", "16",
                             "--csv", str(csv_path)]) == 1
    err = capsys.readouterr().err
    assert "bench_adapt.py: fp32 at batch 16 failed (exit 2):\nfxp-train: no data here\n" in err
    assert "bench_train.py" not in err
    assert err.endswith(
        "bench_adapt.py: every point (4) failed: fp32 repeat 0, ste repeat 0, adapt repeat 0, adapt-qpu repeat 0\n")
    assert not csv_path.exists()  # no row was measured


@requires_fxp_train
def test_bench_adapt_refuses_a_model_fxp_train_refuses():
    with pytest.raises(SystemExit) as e:
        bench_adapt.main(["--fxp-train", str(FXP_TRAIN), "--model", "foo"])
    assert str(e.value).startswith("bench_adapt.py: --model: foo not in {paper_cnn,")
