"""fxp-train --method adapt (issue 13): AdaPT's per-layer formats switch
during the run, are recorded per epoch, and a run is bit-reproducible with
the same seed and thread count, and resumes bit for bit with the
controller's whole state in the checkpoint."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import fxp
from fxp import FxpFormat
from environment import (FASHION, FXP_TRAIN, epoch_metrics, requires_fxp_train, requires_fxp_train_and_data,
                         run_fxp_train)

# Small lookbacks, so that every layer switches several times in 2 x 16 batches.
ADAPT = ["--method", "adapt", "--adapt-lookback-min", "3", "--adapt-lookback-max", "8", "--adapt-resolution-min",
         "20", "--adapt-resolution-max", "40", "--l1-decay", "1e-5", "--data-dir", str(FASHION), "--train-limit",
         "512", "--val-limit", "128", "--batch-size", "32", "--threads", "1", "--no-progress", "--quiet"]


@requires_fxp_train_and_data
@pytest.mark.parametrize("model", ["lenet5", "resnet20"])
def test_adapt_switches_and_is_bit_reproducible(tmp_path, model):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        p = run_fxp_train(*ADAPT, "--model", model, "--epochs", "2", "-o", str(out))
        assert p.returncode == 0, p.stderr
    assert epoch_metrics(first) == epoch_metrics(second)
    last = epoch_metrics(first)[-1]["adapt"]
    assert last["strategy"] in ("min", "mean", "max")
    for layer in last["layers"]:
        assert layer["switches"] >= 3, layer
        assert 3 <= layer["lookback"] <= 8
        assert 20 <= layer["resolution"] <= 40
        assert layer["frac"] < layer["bits"] <= 32
        assert layer["bits"] >= layer["frac"] + 4  # the range buffer
        assert 0 <= layer["sparsity"] <= 1
    assert json.loads((first / "summary.json").read_text())["config"]["method"] == "adapt"


@requires_fxp_train_and_data
def test_adapt_resumes_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "3", "-o", str(whole)).returncode == 0
    assert run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "1", "-o", str(split)).returncode == 0
    p = run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "3", "-o", str(split), "--resume")
    assert p.returncode == 0, p.stderr
    assert epoch_metrics(whole) == epoch_metrics(split)


@requires_fxp_train
@pytest.mark.parametrize("args, message", [
    (["--adapt-buffer-bits", "0"], "adapt_buffer_bits: must be in [1, 31], but got 0"),
    (["--adapt-lookback-min", "30", "--adapt-lookback-max", "20"], "adapt_lookback_max: must be at least adapt_lookback_min = 30"),
    (["--adapt-strategy", "median"], "median"),
    (["--adapt-start-bits", "4", "--adapt-start-frac", "4"], "adapt_start_frac: fractional bits must be in [0, 3]"),
    (["--packed"], "packed: AdaPT keeps a float32 master copy"),
    (["--update", "qpu", "--packed"], "packed: AdaPT's formats change during training"),
    (["--update", "sr"], "--update: sr not in {float,qpu}"),
])
def test_bad_adapt_settings_are_usage_errors(args, message):
    p = run_fxp_train("--method", "adapt", *args)
    assert p.returncode == 2
    assert message in p.stderr, p.stderr


@requires_fxp_train
def test_update_belongs_to_adapt():
    p = run_fxp_train("--method", "ste", "--update", "qpu")
    assert p.returncode == 2 and "update: chooses AdaPT's update (method adapt)" in p.stderr


@requires_fxp_train_and_data
def test_adapt_with_qpu_keeps_no_master_copy_and_resumes_bit_for_bit(tmp_path):
    """--update qpu (Note [AdaPT with QPU]): SQPU steps at each layer's format;
    bit-reproducible, resumable, and its summary's memory model is SQPU's."""
    qpu = [*ADAPT, "--model", "lenet5", "--update", "qpu"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_fxp_train(*qpu, "--epochs", "3", "-o", str(whole)).returncode == 0
    assert run_fxp_train(*qpu, "--epochs", "1", "-o", str(split)).returncode == 0
    p = run_fxp_train(*qpu, "--epochs", "3", "-o", str(split), "--resume")
    assert p.returncode == 0, p.stderr
    metrics = epoch_metrics(whole)
    assert metrics == epoch_metrics(split)
    assert all(e["vanished_update_fraction"] is not None for e in metrics)  # QPU's statistics
    layers = metrics[-1]["adapt"]["layers"]
    assert any((l["bits"], l["frac"]) != (8, 4) for l in layers) and all(l["switches"] >= 3 for l in layers)
    # The optimizer follows the switches: were it left at the start format FxP(8, 4), its steps would round
    # LeNet-5's small weights onto a 1/16 grid, most of them to zero.
    assert all(l["sparsity"] < 0.3 for l in layers), [l["sparsity"] for l in layers]
    summary = json.loads((whole / "summary.json").read_text())
    assert "-qpu-" in summary["run_name"]
    for accounting in ("paper", "full"):
        model = summary["memory_model"][accounting]
        assert model["ratio_to_ste"] < 1, "no master copy: less memory than STE's"
        assert model["counted_as"] == "sqpu"
    # The training state by hand: parameters and momentum at each layer's width, float32 accumulators.
    n = sum(l["parameters"] for l in layers)
    bits = sum(l["parameters"] * l["bits"] for l in layers)
    assert summary["adapt"]["training_state_bytes"] == pytest.approx(2 * bits / 8 + 4 * n)
    assert summary["adapt"]["training_state_ratio_to_fp32"] == pytest.approx((2 * bits / 8 + 4 * n) / (8 * n))
    plain = tmp_path / "plain"
    assert run_fxp_train(*ADAPT, "--model", "lenet5", "--epochs", "1", "-o", str(plain)).returncode == 0
    plain_summary = json.loads((plain / "summary.json").read_text())
    assert plain_summary["memory_model"]["full"]["ratio_to_ste"] == pytest.approx(1.0)
    assert plain_summary["adapt"]["training_state_ratio_to_fp32"] == pytest.approx(1.5)  # 4 + 4 + 4 against 4 + 4


@requires_fxp_train
def test_l1_decay_belongs_to_adapt():
    p = run_fxp_train("--method", "sqpu", "--l1-decay", "0.1")
    assert p.returncode == 2 and "l1_decay: is AdaPT's (method adapt) only" in p.stderr


def _report():
    import sys
    sys.path.insert(0, str(FXP_TRAIN.parents[1] / "scripts"))
    import report
    return report


def _write_run(grid_dir, name, method, best, epochs, **extra):
    """A finished run of the sweep grid in grid_dir, as fxp-train and the sweep write it: LeNet-5, batch 256."""
    d = grid_dir / name
    d.mkdir(parents=True)
    config = {"model": "lenet5", "dataset": "fashion-mnist", "method": method, "param_bits": 16,
              "param_frac": 10, "out_bits": 16, "out_frac": 8, "inference_rounding": "sr", "batch_size": 256,
              "lr": 0.01, "lr_scaling": "none", "weight_decay": 0, "scheduler": "none", "epochs": len(epochs),
              "seed": 0, **extra}  # no update key: a run from before it existed (float)
    (d / "sweep-run.json").write_text(json.dumps({"grid": grid_dir.name, "id": name, "settings": config}))
    (d / "summary.json").write_text(json.dumps({
        "config": config, "best_val_accuracy": best, "best_epoch": 1, "final_val_accuracy": best,
        "epochs_completed": len(epochs), "stop_reason": "epochs", "wall_time_s": 1.0,
        "train_images_per_s": 1.0, "memory_model": {"paper": {"ratio_to_ste": 1, "ratio_to_fp32": 1}}}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))


def _adapt_epoch(epoch, accuracy, cost, bits, saturated=None, layers=("conv1", "fc1")):
    """An AdaPT epoch's metrics.jsonl record: `layers` in the network's order, each at `bits`; saturated:
    {layer: share of its outputs saturated in validation}."""
    return {"epoch": epoch, "val_accuracy": accuracy, "layers": {
        name: {"output_saturated_fraction": share} for name, share in (saturated or {}).items()}, "adapt": {
        "strategy": "min",
        "layers": [{"name": name, "bits": bits + 2 * i} for i, name in enumerate(layers)],
        "performance": {"cost": cost, "float32_cost": 300.0 * epoch, "training_speedup": 300.0 * epoch / cost,
                        "model_size": 0.5, "inference_speedup": 2.0}}}


def test_report_computes_su2_and_draws_the_bit_widths_and_the_saturation(tmp_path):
    """scripts/report on a float32 run and AdaPT runs written here: SU2 is the
    float32 cost of the whole run over AdaPT's cost at the first epoch that
    reaches the float32 run's best accuracy."""
    report = _report()

    def run(name, method, best, epochs, **extra):
        _write_run(tmp_path / "g", name, method, best, epochs, **extra)

    def adapt_epoch(epoch, accuracy, cost, bits, conv1_saturated=0.0):
        return _adapt_epoch(epoch, accuracy, cost, bits, {"conv1": conv1_saturated, "fc1": 0.01,
                                                          "layer1_0.add": 0.02 * (epoch == 2), "pool": None})

    run("fp32", "fp32", 0.80, [{"epoch": e, "val_accuracy": 0.8} for e in (1, 2, 3)])
    run("adapt", "adapt", 0.85, [adapt_epoch(1, 0.70, 100.0, 8), adapt_epoch(2, 0.81, 190.0, 10, 0.005),
                                 adapt_epoch(3, 0.85, 280.0, 12, 0.3)])
    run("adapt-qpu", "adapt", 0.75, [adapt_epoch(1, 0.75, 100.0, 8)], update="qpu")
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "g"), "--out", str(out)]) == 0
    import pandas as pd
    table = pd.read_csv(out / "adapt.csv")
    [row, qpu] = table.sort_values("update").itertuples()
    assert qpu.update == "qpu" and math.isnan(qpu.su2)  # never reaches 80%
    assert row.su1 == pytest.approx(900.0 / 280.0)
    assert row.su2 == pytest.approx(900.0 / 190.0)  # epoch 2 first reaches 80%
    assert row.fp32_best_val_accuracy == pytest.approx(0.80)
    assert (out / "adapt-bits-g-lenet5-fashion-mnist-b256.png").stat().st_size > 0
    assert (out / "adapt-bits-qpu-g-lenet5-fashion-mnist-b256.png").stat().st_size > 0
    # Saturation: only the layers over 1% in some epoch (fc1's 1.0% is not), in the network's order, then the rest.
    matrix = report.saturation_matrix(str(tmp_path / "g" / "adapt"))
    assert list(matrix.index) == ["conv1", "layer1_0.add"] and list(matrix.columns) == [1, 2, 3]
    assert matrix.loc["conv1"].tolist() == pytest.approx([0.0, 0.5, 30.0])
    assert matrix.loc["layer1_0.add"].tolist() == pytest.approx([0.0, 2.0, 0.0])
    assert (out / "adapt-saturation-g-lenet5-fashion-mnist-b256.png").stat().st_size > 0
    assert not (out / "adapt-saturation-qpu-g-lenet5-fashion-mnist-b256.png").exists()  # nothing over 1%
    # A run from before the training state was recorded shows "–".
    assert "| g | lenet5 | fashion-mnist | 256 | float | 0 | 80.0% | 85.0% | 3.21 | 4.74 | 0.50 | 2.00 | – |" in (
        out / "report.md").read_text()


def test_report_draws_each_adapt_configuration_and_orders_a_blocks_add_after_it(tmp_path):
    """Two AdaPT configurations of one grid, model, dataset and batch that
    differ in their buffer get a figure each, named by the setting that tells
    them apart, and their rows in adapt.csv and report.md say it; another
    grid's one configuration has no variant. In the saturation
    map a residual add (not among AdaPT's layers) follows its block's layers,
    and a share under 10% keeps one decimal."""
    report = _report()
    resnet = ("conv1", "layer1_0.conv1", "layer1_0.conv2", "fc")
    saturated = {"conv1": 0.05, "layer1_0.conv1": 0.02, "layer1_0.add": 0.5, "fc": 0.03, "extra.x": 0.04,
                 "layer1_0.conv2": 0.0}
    for buffer in (8, 12):
        _write_run(tmp_path / "g", f"adapt-b{buffer}", "adapt", 0.85, [
            _adapt_epoch(1, 0.85, 100.0, 8, saturated if buffer == 8 else None, resnet)], adapt_buffer_bits=buffer)
    _write_run(tmp_path / "h", "adapt", "adapt", 0.85, [_adapt_epoch(1, 0.85, 100.0, 8)], adapt_buffer_bits=16)
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "g"), str(tmp_path / "h"), "--out", str(out)]) == 0
    assert (out / "adapt-bits-h-lenet5-fashion-mnist-b256.png").stat().st_size > 0  # one configuration: no variant
    for buffer in (8, 12):
        assert (out / f"adapt-bits-g-lenet5-fashion-mnist-b256-adapt_buffer_bits={buffer}.png").stat().st_size > 0
    assert (out / "adapt-saturation-g-lenet5-fashion-mnist-b256-adapt_buffer_bits=8.png").stat().st_size > 0
    assert not (out / "adapt-saturation-g-lenet5-fashion-mnist-b256-adapt_buffer_bits=12.png").exists()
    import pandas as pd
    table = pd.read_csv(out / "adapt.csv", keep_default_na=False)
    assert sorted(zip(table.grid, table.variant)) == [
        ("g", "adapt_buffer_bits=12"), ("g", "adapt_buffer_bits=8"), ("h", "")]
    assert "| g | lenet5 | fashion-mnist | 256 | float adapt_buffer_bits=12 | 0 |" in (out / "report.md").read_text()
    matrix = report.saturation_matrix(str(tmp_path / "g" / "adapt-b8"))
    assert list(matrix.index) == ["conv1", "layer1_0.conv1", "layer1_0.add", "fc", "extra.x"]
    assert [report._percent_text(v) for v in (0.0, 0.4, 9.94, 9.96, 78.4, 100.0)] == [
        "0", "0.4", "9.9", "10", "78", "100"]


# --- fxp::format_histogram (Note [Fused quantize and histogram]) -----------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def _composed_histogram(x, bins, lo, hi, fmt=None, saturate=True):
    """Rounding, then torch.histc, in float64: what the fused op must equal."""
    v = x.double()
    if fmt is not None:
        codes = torch.round(v * 2.0 ** fmt.frac_bits)  # half to even
        if saturate:
            top = 2.0 ** (fmt.total_bits - 1)
            codes = codes.clamp(-top, top - 1)
        v = codes * 2.0 ** -fmt.frac_bits
    return torch.histc(v.clamp(lo, hi), bins, lo, hi).long()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_format_histogram_equals_round_then_histc(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(20000, generator=gen) * 1.5).to(dtype)
    x[:64] = torch.arange(-32, 32) / 8  # on bin edges
    for bins in (1, 7, 50, 150):
        for fmt in (None, FxpFormat(8, 4), FxpFormat(4, 2), FxpFormat(12, 0), FxpFormat(32, 20)):
            for saturate in (True, False):
                got = fxp.format_histogram(x, bins, -2.5, 3.0, fmt, saturate=saturate)
                assert got.dtype == torch.int64 and got.shape == (bins,)
                assert torch.equal(got, _composed_histogram(x, bins, -2.5, 3.0, fmt, saturate)), (bins, fmt, saturate)
                assert int(got.sum()) == x.numel()


def test_format_histogram_checks_its_arguments():
    x = torch.randn(10)
    with pytest.raises(RuntimeError, match="min < max"):
        fxp.format_histogram(x, 4, 1.0, 1.0)
    with pytest.raises(RuntimeError, match=r"bins must be in \[1, 2\^24\]"):
        fxp.format_histogram(x, 0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="must be floating point"):
        fxp.format_histogram(torch.ones(3, dtype=torch.int32), 4, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="is not a format"):
        torch.ops.fxp.format_histogram(x, 4, 0.0, 1.0, [4, 4])
    with pytest.raises(TypeError, match="bins must be an int"):
        fxp.format_histogram(x, 4.0, 0.0, 1.0)
    with pytest.raises(RuntimeError, match="overflows float64"):
        fxp.format_histogram(x, 16, -1e308, 1e308)


def _histogram_opcheck(device):
    x = torch.randn(3, 5, 7, device=device)
    for args in ((x, 10, -1.0, 1.0), (x, 10, -1.0, 1.0, [8, 4]), (x.double(), 3, -2.0, 2.0, [0, 3])):
        torch.library.opcheck(torch.ops.fxp.format_histogram.default, args)


def test_format_histogram_opcheck_cpu():
    _histogram_opcheck("cpu")


@requires_cuda
def test_format_histogram_opcheck_cuda():
    _histogram_opcheck("cuda")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_format_histogram_cuda_equals_cpu(dtype):
    gen = torch.Generator().manual_seed(1)
    for n in (1, 255, 70001, 3_000_000):
        x = torch.randn(n, generator=gen).to(dtype)
        x[: min(n, 6)] = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0, -2.0, 0.5])[: min(n, 6)]
        for bins in (1, 50, 150, 9000):  # 9000: more bins than shared memory holds
            for fmt in (None, FxpFormat(8, 4), FxpFormat(6, 5)):
                cpu = fxp.format_histogram(x, bins, -2.0, 2.0, fmt)
                assert torch.equal(fxp.format_histogram(x.cuda(), bins, -2.0, 2.0, fmt).cpu(), cpu), (n, bins, fmt)
                if fmt is None:
                    continue
                # Without saturation (format [0, frac_bits]): rounded, not clamped to the format's range.
                unsaturated = fxp.format_histogram(x, bins, -2.0, 2.0, fmt, saturate=False)
                assert torch.equal(fxp.format_histogram(x.cuda(), bins, -2.0, 2.0, fmt, saturate=False).cpu(),
                                   unsaturated), (n, bins, fmt, "saturate=False")
                assert int(unsaturated.sum()) == n - 1  # all but the NaN (x[0])
                # FxP(6, 5) holds [-1, 31/32]: saturation moves the values beyond into other bins.
                differs = not torch.equal(unsaturated, cpu)
                assert differs == (fmt == FxpFormat(6, 5) and bins > 1 and n >= 6), (n, bins, fmt)


# --- fxp.adapt: the controller in a PyTorch training loop ---------------------------
def _small_model(weight_mode="ste"):
    fmt = FxpFormat(16, 8)
    return torch.nn.Sequential(
        fxp.nn.QConv2d(1, 4, 3, weight_mode=weight_mode, param_format=fmt, act_format=fmt),
        torch.nn.ReLU(), torch.nn.Flatten(),
        fxp.nn.QLinear(4 * 6 * 6, 10, weight_mode=weight_mode, param_format=fmt, act_format=fmt))


def _step(model, controller, optimizer, seed, batch=8):
    torch.manual_seed(seed)
    x, y = torch.randn(batch, 1, 8, 8), torch.randint(0, 10, (batch,))
    optimizer.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    switched = controller.after_backward(loss, batch)
    optimizer.step()
    return switched


def test_python_controller_normalizes_switches_and_sets_the_layers_formats():
    torch.manual_seed(0)
    model = _small_model()
    controller = fxp.adapt.AdaptController(model, lookback=(2, 4), resolution=(20, 30), buffer_bits=3)
    conv, linear = model[0], model[3]
    assert conv.param_format == conv.act_format == FxpFormat(8, 4)  # the start format, set on the layers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert not _step(model, controller, optimizer, 1)
    for layer in (conv, linear):  # Eq. 3.4: the layer's gradient, weight and bias together, has norm 1
        norm = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()
        assert norm.item() == pytest.approx(1.0, rel=1e-6)
    assert _step(model, controller, optimizer, 2)  # lookback 2: every layer switches at the second step
    record = controller.record()
    for layer, r in zip((conv, linear), record["layers"]):
        assert r["switches"] == 1 and r["gradient_diversity"] >= 1
        assert layer.param_format == layer.act_format == FxpFormat(r["bits"], r["frac"])
        assert r["bits"] >= r["frac"] + 3  # the range buffer
        assert 2 <= r["lookback"] <= 4 and 20 <= r["resolution"] <= 30
    assert controller.formats() == {"0": conv.param_format, "3": linear.param_format}
    assert record["strategy"] in ("min", "mean", "max")


@pytest.mark.parametrize("shape, keyword", [((5, 6), False), ((6,), False), ((5, 2, 6), False), ((5, 6), True)],
                         ids=["batch", "unbatched", "rows_per_sample", "keyword_input"])
def test_python_controller_counts_each_layers_multiply_adds(shape, keyword):
    """The performance model's float32 cost by hand for one QLinear(6, 3):
    3 M samples + P iterations, M = 3 outputs x 6 inputs (per row of a
    sample), P = 21. An unbatched input is one sample; an input passed by
    keyword counts as one passed by position."""
    fmt = FxpFormat(8, 4)
    model = fxp.nn.QLinear(6, 3, weight_mode="ste", param_format=fmt, act_format=fmt)
    controller = fxp.adapt.AdaptController(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    samples = shape[0] if len(shape) > 1 else 1
    rows = shape[1] if len(shape) > 2 else 1
    for _ in range(2):
        optimizer.zero_grad()
        x = torch.randn(shape)
        loss = (model(x=x) if keyword else model(x)).square().mean()
        loss.backward()
        controller.after_backward(loss, samples)
        optimizer.step()
    perf = controller.record()["performance"]
    assert perf["float32_cost"] == 3 * 18 * rows * samples * 2 + 21 * 2
    assert 0 < perf["training_speedup"]


@pytest.mark.parametrize("shape", [(2, 4, 5, 5), (4, 5, 5)], ids=["batch", "unbatched"])
def test_python_controller_counts_a_grouped_convolutions_multiply_adds(shape):
    """QConv2d(4, 6, 3, groups=2): the fan-in is 4 / 2 x 3 x 3 = 18 and one
    sample has 6 x 3 x 3 outputs, so M = 972 and P = 6 x 18 + 6 = 114
    (Note [Multiply-adds per sample]); a [C, H, W] input is one sample."""
    fmt = FxpFormat(8, 4)
    model = fxp.nn.QConv2d(4, 6, 3, groups=2, weight_mode="ste", param_format=fmt, act_format=fmt)
    controller = fxp.adapt.AdaptController(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    samples = shape[0] if len(shape) == 4 else 1
    optimizer.zero_grad()
    loss = model(torch.randn(shape)).square().mean()
    loss.backward()
    controller.after_backward(loss, samples)
    optimizer.step()
    assert controller.record()["performance"]["float32_cost"] == 3 * 972 * samples + 114


def test_python_controller_state_dict_continues_identically():
    torch.manual_seed(0)
    a = _small_model()
    b = _small_model()
    b.load_state_dict(a.state_dict())
    ca = fxp.adapt.AdaptController(a, lookback=(2, 5), resolution=(20, 30))
    oa = torch.optim.SGD(a.parameters(), lr=0.05)
    for s in range(5):
        _step(a, ca, oa, 10 + s)
    cb = fxp.adapt.AdaptController(b, lookback=(2, 5), resolution=(20, 30))
    b.load_state_dict(a.state_dict())
    cb.load_state_dict(ca.state_dict())
    ob = torch.optim.SGD(b.parameters(), lr=0.05)
    assert cb.formats() == ca.formats() and cb.record() == ca.record()
    for s in range(6):
        _step(a, ca, oa, 20 + s)
        _step(b, cb, ob, 20 + s)
    assert cb.record() == ca.record()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert max(layer["switches"] for layer in ca.record()["layers"]) >= 3


def test_python_controller_rejects_bad_input():
    with pytest.raises(ValueError, match="no fxp.nn.QLinear or QConv2d layers"):
        fxp.adapt.AdaptController(torch.nn.Linear(3, 2))
    with pytest.raises(ValueError, match="layers need weight_mode='ste'"):
        fxp.adapt.AdaptController(_small_model("fp32"))
    with pytest.raises(RuntimeError, match="lookback bounds must satisfy"):
        fxp.adapt.AdaptController(_small_model(), lookback=(5, 2))
    with pytest.raises(RuntimeError, match="strategy must be min, mean or max"):
        fxp.adapt.AdaptController(_small_model(), strategy="median")
    with pytest.raises(TypeError, match="resolution must be two ints"):
        fxp.adapt.AdaptController(_small_model(), resolution=50)
    controller = fxp.adapt.AdaptController(_small_model())
    other = fxp.adapt.AdaptController(fxp.nn.QLinear(3, 2, weight_mode="ste", param_format=FxpFormat(8, 4),
                                                     act_format=FxpFormat(8, 4)))
    with pytest.raises(RuntimeError, match="the saved controller has 1 layers, this one 2"):
        controller.load_state_dict(other.state_dict())
    with pytest.raises(TypeError, match="batch_size must be an int"):
        controller.after_backward(1.0, 2.5)
    tied = _small_model()
    tied.append(fxp.nn.QLinear(10, 10, weight_mode="ste", param_format=FxpFormat(8, 4), act_format=FxpFormat(8, 4)))
    tied.append(fxp.nn.QLinear(10, 10, weight_mode="ste", param_format=FxpFormat(8, 4), act_format=FxpFormat(8, 4)))
    tied[5].weight = tied[4].weight
    with pytest.raises(RuntimeError, match="layers 4 and 5 share a parameter"):
        fxp.adapt.AdaptController(tied)
    packed = fxp.nn.PaperCNN("ste", param_format=FxpFormat(8, 4), act_format=FxpFormat(8, 4))
    packed.pack_()
    with pytest.raises(ValueError, match="adapt a model that is not packed"):
        fxp.adapt.AdaptController(packed)


def test_a_model_with_a_controller_still_pickles():
    import io
    model = _small_model()
    controller = fxp.adapt.AdaptController(model)
    model(torch.randn(2, 1, 8, 8))
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the multiply-add counters are hooks that pickle
    assert controller.record()["layers"][0]["name"] == "0"


# --- AdaPT's per-step ops (Note [AdaPT's fused step]) -------------------------------
def _norms_reference(params, grads, layers, num_layers, l1):
    """Note [Deterministic gradient norms] in plain torch: chunks of 4096, 32
    lanes summed in order, lanes combined pairwise as a warp's shuffle-down."""
    def combine(lanes):
        lanes = lanes.clone()
        offset = 16
        while offset:
            lanes[:offset] = lanes[:offset] + lanes[offset:2 * offset]
            offset //= 2
        return lanes[0]

    def lane_sum(values):  # values: float64, summed lane by lane in order
        padded = torch.cat([values, values.new_zeros((-len(values)) % 32)]).view(-1, 32)
        lanes = torch.zeros(32, dtype=torch.float64)
        for row in padded:
            lanes = lanes + row
        return combine(lanes)

    sums = [[] for _ in range(num_layers)]
    for w, g, layer in zip(params, grads, layers):
        x = (g + l1 * torch.sign(w)).flatten().double() ** 2
        sums[layer] += [lane_sum(x[s:s + 4096]) for s in range(0, x.numel(), 4096)]
    return torch.stack([lane_sum(torch.stack(s)).sqrt() if s else torch.zeros((), dtype=torch.float64)
                        for s in sums])


def _step_tensors(dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(70, 100), (70,), (5000,), (3, 3, 3), (33,)]  # 7000 and 5000 elements: more than one chunk
    params = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    params[3].zero_()  # a zero gradient and zero weights: the layer's norm is 0 and its gradient stays 0
    grads = [torch.randn(s, generator=gen, dtype=dtype).to(device) for s in shapes]
    grads[3].zero_()
    params[0].view(-1)[:10] = 0  # sign(0) = 0: no L1 term there
    return params, grads, [0, 0, 1, 2, 1], 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l1", [0.0, 1e-3])
def test_layer_gradient_norms_sum_in_the_documented_order(dtype, l1):
    params, grads, layers, n = _step_tensors(dtype)
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, l1)
    assert norms.dtype == torch.float64 and norms.shape == (3,)
    assert torch.equal(norms, _norms_reference(params, grads, layers, n, l1))
    assert norms[2].item() == 0
    direct = torch.stack([torch.cat([(g + l1 * torch.sign(w)).double().flatten() for w, g, ly in
                                     zip(params, grads, layers) if ly == layer]).norm() for layer in range(n)])
    torch.testing.assert_close(norms, direct, rtol=1e-14, atol=0)


def test_layer_gradient_norms_do_not_depend_on_the_thread_count():
    params, grads, layers, n = _step_tensors()
    big_w, big_g = torch.randn(3_000_000), torch.randn(3_000_000)
    args = (params + [big_w], grads + [big_g], layers + [0], n, 1e-4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fxp.layer_gradient_norms(*args)
        torch.set_num_threads(max(2, threads))
        assert torch.equal(torch.ops.fxp.layer_gradient_norms(*args), one)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_accumulate_is_eq_3_4_rounded_once(dtype):
    params, grads, layers, n = _step_tensors(dtype)
    l1 = 1e-3
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, l1)
    accumulated = [torch.randn_like(g) for g in grads]
    expected_acc, expected_grads = [], []
    for w, g, a, layer in zip(params, grads, accumulated, layers):
        divisor = norms[layer].item() or 1.0
        normalized = ((g + l1 * torch.sign(w)).double() / divisor).to(dtype)
        expected_grads.append(normalized)
        expected_acc.append(a + normalized)
    torch.ops.fxp.normalize_accumulate_(grads, accumulated, params, norms, layers, l1)
    for got, want in zip(grads + accumulated, expected_grads + expected_acc):
        assert torch.equal(got, want)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))  # a zero gradient stays zero
    for layer in (0, 1):  # each layer's normalized gradient has norm 1
        norm = torch.cat([g.double().flatten() for g, ly in zip(grads, layers) if ly == layer]).norm()
        assert norm.item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_adapt_sgd_step_equals_normalize_accumulate_then_sgd(momentum, nesterov):
    """The fused step, against the two-pass form followed by SGD's formula in
    separate float32 operations, bit for bit; grads are left as they were."""
    l1, lr, wd = 1e-3, 0.05, 5e-4
    params, grads, layers, n = _step_tensors()
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, l1)
    acc = [torch.randn_like(g) for g in grads]
    buffers = [torch.randn_like(g) for g in grads] if momentum else []
    ref_params, ref_grads, ref_acc = ([t.clone() for t in ts] for ts in (params, grads, acc))
    ref_buffers = [b.clone() for b in buffers]
    raw_grads = [g.clone() for g in grads]
    torch.ops.fxp.adapt_sgd_step_(params, grads, buffers, acc, norms, layers, l1, lr, momentum, wd, nesterov)
    torch.ops.fxp.normalize_accumulate_(ref_grads, ref_acc, ref_params, norms, layers, l1)
    for k, (w, g) in enumerate(zip(ref_params, ref_grads)):
        d = g + wd * w
        if momentum:
            ref_buffers[k] = momentum * ref_buffers[k] + d
            d = d + momentum * ref_buffers[k] if nesterov else ref_buffers[k]
        ref_params[k] = w - lr * d
    for got, want in zip(params + acc + buffers + grads, ref_params + ref_acc + ref_buffers + raw_grads):
        assert torch.equal(got, want)


# Note [AdaPT's fused QPU step]: (rounding, momentum, nesterov, momentum_form,
# format). FxP(24, 14) takes the int64 code arithmetic (Note [QPU code arithmetic]).
QPU_ADAPT_CASES = [("stochastic", 0.9, False, "standard", (12, 8)), ("stochastic", 0.9, True, "standard", (12, 8)),
                   ("nearest_even", 0.9, False, "paper_eq6", (16, 12)), ("stochastic", 0.0, False, "standard", (24, 14)),
                   ("nearest_even", 0.0, False, "standard", (10, 6)), ("stochastic", 0.5, False, "paper_eq6", (24, 14))]


def _qpu_adapt_tensors(dtype, fmt, momentum, device="cpu"):
    params, grads, layers, n = _step_tensors(dtype, device)
    params = [fxp.quantize_seeded(p, FxpFormat(*fmt), rounding="stochastic", seed=1, offset=k)
              for k, p in enumerate(params)]  # on the grid, as QPU's parameters are
    acc = [torch.randn_like(g) for g in grads]
    buffers = [fxp.quantize_seeded(torch.randn_like(g) * 0.01, FxpFormat(*fmt), seed=2, offset=k)
               for k, g in enumerate(grads)] if momentum else []
    return params, grads, acc, buffers, layers, n


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding,momentum,nesterov,form,fmt", QPU_ADAPT_CASES)
def test_qpu_adapt_step_equals_normalize_accumulate_then_qpu_step(dtype, rounding, momentum, nesterov, form, fmt):
    """The QPU step with AdaPT's prologue, against normalize_accumulate_ then the
    plain step, bit for bit over two steps: parameters, momentum, accumulators
    and counts; grads are only read."""
    l1, lr, wd = 1e-3, 1.0, 5e-4  # normalized gradients are small: lr 1 moves nearest-even parameters too
    params, grads, acc, buffers, layers, n = _qpu_adapt_tensors(dtype, fmt, momentum)
    ref_params, ref_acc, ref_buffers = ([t.clone() for t in ts] for ts in (params, acc, buffers))
    raw_grads = [g.clone() for g in grads]
    moved = False
    for step in range(2):
        norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, l1)
        qpu = (lr, momentum, wd, nesterov, *fmt, *fmt, rounding, 5, step, form)
        before = [p.clone() for p in params]
        counts = torch.ops.fxp.qpu_sgd_step_.adapt(params, grads, buffers, acc, norms, layers, l1, *qpu)
        ref_grads = [g.clone() for g in raw_grads]
        torch.ops.fxp.normalize_accumulate_(ref_grads, ref_acc, ref_params, norms, layers, l1)
        ref_counts = torch.ops.fxp.qpu_sgd_step_(ref_params, ref_grads, ref_buffers, *qpu)
        assert torch.equal(counts, ref_counts)
        for got, want in zip(params + acc + buffers + grads, ref_params + ref_acc + ref_buffers + raw_grads):
            assert torch.equal(got, want)
        moved = moved or any(not torch.equal(a, b) for a, b in zip(params, before))
    assert moved, "no parameter moved: the test shows nothing"
    if not momentum:  # a zero layer's gradient stays zero (with momentum, its random buffer moves it)
        assert torch.equal(params[3], torch.zeros_like(params[3]))


def test_qpu_adapt_step_rejects_bad_input():
    params, grads, acc, buffers, layers, n = _qpu_adapt_tensors(torch.float32, (8, 4), 0.9)
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n)
    qpu = (0.1, 0.9, 0.0, False, 8, 4, 8, 4, "stochastic", 0, 0)
    step = torch.ops.fxp.qpu_sgd_step_.adapt
    with pytest.raises(RuntimeError, match=r"accumulated\[0\] and grads\[0\] share memory"):
        step(params, grads, buffers, [grads[0]] + acc[1:], norms, layers, 0.0, *qpu)
    with pytest.raises(RuntimeError, match=r"accumulated\[1\] has shape \[5\] but grads\[1\] has \[70\]"):
        step(params, grads, buffers, [acc[0], torch.zeros(5)] + acc[2:], norms, layers, 0.0, *qpu)
    with pytest.raises(RuntimeError, match=r"layers\[3\] is 2, outside \[0, 2\)"):
        step(params, grads, buffers, acc, norms[:2], layers, 0.0, *qpu)
    with pytest.raises(RuntimeError, match="l1 must be a non-negative finite number"):
        step(params, grads, buffers, acc, norms, layers, -1.0, *qpu)
    with pytest.raises(RuntimeError, match="packed storage cannot follow them"):
        step([fxp.pack(p, 8, 4) for p in params], grads, buffers, acc, norms, layers, 0.0, *qpu)
    with pytest.raises(RuntimeError, match=r"fxp::qpu_sgd_step_\.adapt: momentum > 0 needs one momentum buffer per param"):
        step(params, grads, [], acc, norms, layers, 0.0, *qpu)
    with pytest.raises(RuntimeError, match=r"fxp::qpu_sgd_step_\.adapt: stream index 0 is given twice"):
        step(params, grads, buffers, acc, norms, layers, 0.0, *qpu, "standard", [0] * len(params))


def _step_op_args(device):
    params, grads, layers, n = _step_tensors(device=device)
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, 1e-3)
    acc = [torch.zeros_like(g) for g in grads]
    buffers = [torch.zeros_like(g) for g in grads]
    return [
        (torch.ops.fxp.layer_gradient_norms.default, (params, grads, layers, n, 1e-3)),
        (torch.ops.fxp.normalize_accumulate_.default, ([g.clone() for g in grads], acc, params, norms, layers, 1e-3)),
        (torch.ops.fxp.adapt_sgd_step_.default,
         ([p.clone() for p in params], grads, buffers, [a.clone() for a in acc], norms, layers, 1e-3, 0.1, 0.9, 5e-4,
          True)),
        (torch.ops.fxp.qpu_sgd_step_.adapt,
         ([fxp.quantize(p, FxpFormat(16, 10)) for p in params], grads, [b.clone() for b in buffers],
          [a.clone() for a in acc], norms, layers, 1e-3, 0.1, 0.9, 5e-4, True, 16, 10, 16, 10, "stochastic", 3, 1)),
    ]


def test_adapt_step_ops_opcheck_cpu():
    for op, args in _step_op_args("cpu"):
        torch.library.opcheck(op, args)


@requires_cuda
def test_adapt_step_ops_opcheck_cuda():
    for op, args in _step_op_args("cuda"):
        torch.library.opcheck(op, args)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adapt_step_ops_cuda_equal_cpu(dtype):
    params, grads, layers, n = _step_tensors(dtype)
    params.append(torch.randn(3_000_001, dtype=dtype))
    grads.append(torch.randn(3_000_001, dtype=dtype))
    layers.append(1)
    cuda = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, 1e-3)
    assert torch.equal(torch.ops.fxp.layer_gradient_norms(cuda(params), cuda(grads), layers, n, 1e-3).cpu(), norms)
    acc, buffers = [torch.randn_like(g) for g in grads], [torch.randn_like(g) for g in grads]
    c_params, c_grads, c_acc, c_buffers = cuda(params), cuda(grads), cuda(acc), cuda(buffers)
    c_grads2, grads2, c_acc2, acc2 = cuda(grads), [g.clone() for g in grads], cuda(acc), [a.clone() for a in acc]
    torch.ops.fxp.adapt_sgd_step_(params, grads, buffers, acc, norms, layers, 1e-3, 0.1, 0.9, 5e-4, False)
    torch.ops.fxp.adapt_sgd_step_(c_params, c_grads, c_buffers, c_acc, norms.cuda(), layers, 1e-3, 0.1, 0.9, 5e-4,
                                  False)
    torch.ops.fxp.normalize_accumulate_(grads2, acc2, params, norms, layers, 1e-3)
    torch.ops.fxp.normalize_accumulate_(c_grads2, c_acc2, c_params, norms.cuda(), layers, 1e-3)
    for got, want in zip(c_params + c_acc + c_buffers + c_grads2 + c_acc2, params + acc + buffers + grads2 + acc2):
        assert torch.equal(got.cpu(), want)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rounding,momentum,nesterov,form,fmt", QPU_ADAPT_CASES)
def test_qpu_adapt_step_cuda_equals_cpu(dtype, rounding, momentum, nesterov, form, fmt):
    params, grads, acc, buffers, layers, n = _qpu_adapt_tensors(dtype, fmt, momentum)
    params.append(fxp.quantize(torch.randn(3_000_001, dtype=dtype), FxpFormat(*fmt)))  # many chunks and launches
    grads.append(torch.randn(3_000_001, dtype=dtype))
    acc.append(torch.randn(3_000_001, dtype=dtype))
    buffers += [torch.zeros(3_000_001, dtype=dtype)] if momentum else []
    layers.append(1)
    cuda = lambda ts: [t.cuda() for t in ts]  # noqa: E731
    c_params, c_grads, c_acc, c_buffers = cuda(params), cuda(grads), cuda(acc), cuda(buffers)
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, 1e-3)
    qpu = (0.05, momentum, 5e-4, nesterov, *fmt, *fmt, rounding, 5, 3, form)
    counts = torch.ops.fxp.qpu_sgd_step_.adapt(params, grads, buffers, acc, norms, layers, 1e-3, *qpu)
    c_counts = torch.ops.fxp.qpu_sgd_step_.adapt(c_params, c_grads, c_buffers, c_acc, norms.cuda(), layers, 1e-3, *qpu)
    assert torch.equal(c_counts.cpu(), counts)
    for got, want in zip(c_params + c_acc + c_buffers, params + acc + buffers):
        assert torch.equal(got.cpu(), want)


@requires_cuda
def test_layer_gradient_norms_cuda_equal_cpu_over_many_layers():
    # More layers than one launch of the CUDA layer sums takes (240), some without tensors.
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 9000, (600,), generator=gen)]
    params = [torch.randn(g.shape, generator=gen) for g in grads]
    layers = [k // 2 + (k % 7 == 0) for k in range(len(grads))]
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, 400, 1e-3)
    cuda = torch.ops.fxp.layer_gradient_norms([p.cuda() for p in params], [g.cuda() for g in grads], layers, 400, 1e-3)
    assert torch.equal(cuda.cpu(), norms)
    assert norms[301:].eq(0).all() and norms[:300].gt(0).all()


def test_adapt_step_ops_reject_bad_input():
    params, grads, layers, n = _step_tensors()
    norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, n)
    acc = [torch.zeros_like(g) for g in grads]
    with pytest.raises(RuntimeError, match=r"layers\[4\] is 3, outside \[0, 3\)"):
        torch.ops.fxp.layer_gradient_norms(params, grads, [0, 0, 1, 2, 3], n)
    with pytest.raises(RuntimeError, match="expected one layer index per tensor"):
        torch.ops.fxp.layer_gradient_norms(params, grads, [0, 0], n)
    with pytest.raises(RuntimeError, match=r"params\[1\] has shape \[5\] but grads\[1\] has \[70\]"):
        torch.ops.fxp.layer_gradient_norms([params[0], torch.zeros(5)] + params[2:], grads, layers, n)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        torch.ops.fxp.layer_gradient_norms([p.half() for p in params], [g.half() for g in grads], layers, n)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must be contiguous"):
        torch.ops.fxp.layer_gradient_norms(params, [grads[0].t()] + grads[1:], layers, n)
    with pytest.raises(RuntimeError, match="l1 must be a non-negative finite number"):
        torch.ops.fxp.layer_gradient_norms(params, grads, layers, n, -1.0)
    with pytest.raises(RuntimeError, match=r"norms must be float64 of shape \[num_layers\].*Float of shape \[3\]"):
        torch.ops.fxp.normalize_accumulate_(grads, acc, params, norms.float(), layers)
    with pytest.raises(RuntimeError, match="norms must be contiguous"):
        torch.ops.fxp.normalize_accumulate_(grads, acc, params, torch.zeros(6, dtype=torch.float64)[::2], layers)
    with pytest.raises(RuntimeError, match=r"layers\[3\] is 2, outside \[0, 2\)"):  # norms has 2 layers, not 3
        torch.ops.fxp.normalize_accumulate_(grads, acc, params, norms[:2], layers)
    with pytest.raises(RuntimeError, match=r"accumulated\[0\] and grads\[0\] share memory"):
        torch.ops.fxp.normalize_accumulate_(grads, [grads[0]] + acc[1:], params, norms, layers)
    with pytest.raises(RuntimeError, match="momentum > 0 needs one momentum buffer per param"):
        torch.ops.fxp.adapt_sgd_step_(params, grads, [], acc, norms, layers, 0.0, 0.1, 0.9)
    with pytest.raises(RuntimeError, match="nesterov needs momentum > 0"):
        torch.ops.fxp.adapt_sgd_step_(params, grads, [], acc, norms, layers, 0.0, 0.1, 0.0, 0.0, True)
    with pytest.raises(RuntimeError, match="lr must be a non-negative finite number"):
        torch.ops.fxp.adapt_sgd_step_(params, grads, [], acc, norms, layers, 0.0, float("nan"))
    # Empty lists: nothing to do, and the norms of layers without tensors are 0.
    assert torch.equal(torch.ops.fxp.layer_gradient_norms([], [], [], 2), torch.zeros(2, dtype=torch.float64))


def test_the_controller_refuses_what_would_fail_far_from_its_cause():
    fmt = fxp.FxpFormat(8, 4)
    adapt = fxp.adapt.AdaptController(fxp.nn.QLinear(6, 3, weight_mode="ste", param_format=fmt, act_format=fmt))
    with pytest.raises(TypeError, match=r"^fxp\.adapt: load_state_dict takes the dict state_dict\(\) returns, "
                                        r"but got NoneType$"):
        adapt.load_state_dict(None)
    with pytest.raises(TypeError, match=r"^fxp\.adapt: an AdaptController cannot be deep-copied"):
        copy.deepcopy(adapt)
    with pytest.raises(ValueError, match=r"^fxp\.adapt: loss must be a number or a one-element tensor, but got a "
                                         r"tensor of shape \(2,\)$"):
        adapt.after_backward(torch.ones(2), 4)


def test_one_controller_per_layer_and_none_after_remove():
    """As MsqController: a second controller over adapted layers is refused (it counted the multiply-adds
    twice and set formats against the first), and after remove() the controller's steps raise (they ran
    silently, on stale shapes). A copy of the model, whose hooks come along, may have a controller."""
    model = _small_model()
    controller = fxp.adapt.AdaptController(model)
    with pytest.raises(ValueError, match=r"^fxp\.adapt: layer 0 is adapted by another AdaptController already; "
                                         r"remove\(\) that first$"):
        fxp.adapt.AdaptController(model)
    with pytest.raises(ValueError, match="layer QLinear is adapted by another AdaptController already"):
        fxp.adapt.AdaptController(model[3])
    fxp.adapt.AdaptController(copy.deepcopy(model)).remove()
    state = controller.state_dict()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 8, 8)), torch.tensor([0, 1])).backward()
    controller.remove()
    for what, call in [("after_backward()", lambda: controller.after_backward(1.0, 2)),
                       ("step()", lambda: controller.step(optimizer, 1.0, 2)),
                       ("load_state_dict()", lambda: controller.load_state_dict(state))]:
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value) == (f"fxp.adapt: {what} after remove(): the controller no longer counts its layers' "
                                f"multiply-adds nor sets their formats")
    assert controller.formats() and controller.record()  # what it holds still reads
    fxp.adapt.AdaptController(model)  # the layers are free again
