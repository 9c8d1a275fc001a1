"""The benchmark scripts' argument checks: a bad method or list is refused,
with fxp-train's own reason, before any point is measured (a run of
bench_train.py is minutes; a bad name used to cost them and leave a NaN row)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from environment import FXP_TRAIN, ROOT, requires_fxp_train

sys.path.insert(0, str(ROOT / "scripts"))


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
