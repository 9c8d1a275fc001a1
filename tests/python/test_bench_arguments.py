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


def test_bench_fleet_refuses_fewer_than_one_job():
    with pytest.raises(SystemExit) as e:
        bench_fleet.main(["--jobs", "0"])
    assert "bench_fleet.py: --jobs must be at least 1" in str(e.value)


def test_bench_fleet_jobs_run_at_once_and_sum():
    # Each copy waits for the other at the barrier: copies run one after another would time out there.
    barrier = threading.Barrier(3, timeout=30)

    def one_copy():
        barrier.wait()
        return 2.5

    assert bench_fleet.at_once(3, one_copy) == 7.5
    assert bench_fleet.at_once(1, lambda: 4.0) == 4.0
    assert math.isnan(bench_fleet.at_once(2, lambda: float("nan")))


def test_bench_fleet_runs_as_a_sweep_does_unless_told(monkeypatch):
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
    assert "bench_fleet.py: --threads must be at least 0" in str(e.value)
