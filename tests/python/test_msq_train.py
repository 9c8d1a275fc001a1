"""fxp-train --method msq (issue 14; docs/msq.md): pruning checks lower the
layers' widths by LSB sparsity and Hessian sensitivity, the widths and
sparsities go into metrics.jsonl and summary.json, a run is bit-reproducible
and resumes bit for bit with the controller's state in the checkpoint, and it
can start from an fp32 run's checkpoint (--init-from)."""

from __future__ import annotations

import json

import pytest

from environment import (FASHION, FXP_TRAIN_DATA, epoch_metrics, requires_cuda_fxp_train_and_run_data,
                         requires_fxp_train, requires_fxp_train_and_data, run_fxp_train)

SMALL = ["--data-dir", str(FASHION), "--train-limit", "256", "--val-limit", "128", "--batch-size", "32",
         "--threads", "1", "--no-progress", "--quiet", "--model", "lenet5"]
# alpha 0: every layer passes every check, so the widths fall by the Hessian's k alone.
MSQ = SMALL + ["--method", "msq", "--msq-start-bits", "6", "--msq-alpha", "0", "--msq-hessian-samples", "2",
               "--msq-lambda", "1e-3"]


@requires_cuda_fxp_train_and_run_data
def test_cuda_msq_runs_are_reproducible_and_prune(tmp_path):
    # MSQ on a GPU (the Hessian traces, RoundClamp and the width checks on CUDA): two runs give the
    # same bits, and each layer drops 1 or 2 bits at the first check, as on the CPU.
    cuda = [a if a != str(FASHION) else str(FXP_TRAIN_DATA) for a in MSQ] + ["--device", "cuda", "--epochs", "2"]
    for out in ("a", "b"):
        p = run_fxp_train(*cuda, "-o", str(tmp_path / out))
        assert p.returncode == 0, p.stderr
    metrics = epoch_metrics(tmp_path / "a")
    assert metrics == epoch_metrics(tmp_path / "b")
    widths = [layer["bits"] for layer in metrics[0]["msq"]["layers"]]
    assert len(widths) == 5 and all(6 - w in (1, 2) for w in widths), widths
    # By sensitivity, as on the CPU: some layers drop two bits and some one, from nonzero Hessian traces.
    assert 4 in widths and 5 in widths, widths
    assert all(layer["hessian_trace"] != 0 for layer in metrics[0]["msq"]["layers"])


@requires_fxp_train_and_data
def test_msq_prunes_by_sensitivity_and_records_it(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        p = run_fxp_train(*MSQ, "--epochs", "3", "--msq-finetune-epochs", "1", "-o", str(out))
        assert p.returncode == 0, p.stderr
    metrics = epoch_metrics(first)
    assert metrics == epoch_metrics(second)  # bit-reproducible
    widths = [[layer["bits"] for layer in m["msq"]["layers"]] for m in metrics]
    assert len(widths[0]) == 5  # LeNet-5's convs and linears
    for before, after in zip([[6] * 5] + widths[:-1], widths[:2]):  # two checks: each layer drops 1 or 2 bits
        assert all(b - a in (1, 2) for b, a in zip(before, after)), widths
        assert any(b - a == 2 for b, a in zip(before, after)) and any(b - a == 1 for b, a in zip(before, after))
    assert widths[2] == widths[1]  # the fine-tuning epoch keeps the widths
    assert [m["msq"]["frozen"] for m in metrics] == [False, True, True]
    for layer in metrics[0]["msq"]["layers"]:
        assert 0 <= layer["lsb_sparsity"] <= 1 and layer["hessian_trace"] != 0 and layer["scale"] > 0
        assert 0 < layer["check_sparsity"] <= 1
    # The scales stay for the run (the grids nest only at one scale).
    assert len({tuple(layer["scale"] for layer in m["msq"]["layers"]) for m in metrics}) == 1
    summary = json.loads((first / "summary.json").read_text())
    weights = [layer["weights"] for layer in metrics[-1]["msq"]["layers"]]
    rate = 32 * sum(weights) / sum(w * b for w, b in zip(weights, widths[-1]))
    assert summary["msq"]["compression_rate"] == pytest.approx(rate, rel=1e-12)
    assert list(summary["msq"]["bits"].values()) == widths[-1]
    # The export: each weight at its width plus a sign bit; its measured size against the float32 model.
    export = summary["msq"]["export"]
    assert export["bytes"] == (first / "model.msq").stat().st_size
    packed = sum((w * (b + 1) + 7) // 8 for w, b in zip(weights, widths[-1]))
    assert packed < export["bytes"] < packed + 4 * (summary["parameters"] - sum(weights)) + 8192
    assert export["measured_compression"] == pytest.approx(export["model_bytes"] / export["bytes"])
    assert 3 < export["measured_compression"] < rate


@requires_fxp_train_and_data
def test_msq_resumes_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run_fxp_train(*MSQ, "--epochs", "3", "-o", str(whole)).returncode == 0
    assert run_fxp_train(*MSQ, "--epochs", "1", "-o", str(split)).returncode == 0
    p = run_fxp_train(*MSQ, "--epochs", "3", "-o", str(split), "--resume")
    assert p.returncode == 0, p.stderr
    assert epoch_metrics(whole) == epoch_metrics(split)


@requires_fxp_train_and_data
def test_msq_starts_from_an_fp32_checkpoint(tmp_path):
    fp32, scratch, warm = tmp_path / "fp32", tmp_path / "scratch", tmp_path / "warm"
    assert run_fxp_train(*SMALL, "--method", "fp32", "--epochs", "2", "-o", str(fp32)).returncode == 0
    no_checks = MSQ + ["--epochs", "1", "--msq-check-every", "5"]
    assert run_fxp_train(*no_checks, "-o", str(scratch)).returncode == 0
    p = run_fxp_train(*no_checks, "--init-from", str(fp32 / "checkpoint.pt"), "-o", str(warm))
    assert p.returncode == 0, p.stderr
    # The fp32 weights start the run: its first epoch's training loss is below a fresh start's.
    assert epoch_metrics(warm)[0]["train_loss"] < epoch_metrics(scratch)[0]["train_loss"]
    p = run_fxp_train(*no_checks, "--init-from", str(tmp_path / "missing.pt"), "-o", str(tmp_path / "x"))
    assert p.returncode != 0 and "missing.pt" in p.stderr
    p = run_fxp_train(*no_checks, "--init-from", str(fp32), "-o", str(tmp_path / "z"))  # the run, not its file
    assert p.returncode == 1
    assert f"cannot read {fp32}: it is a directory (did you mean {fp32}/checkpoint.pt?)" in p.stderr, p.stderr
    other_model = [("paper_cnn" if a == "lenet5" else a) for a in no_checks]
    p = run_fxp_train(*other_model, "--init-from", str(fp32 / "checkpoint.pt"), "-o", str(tmp_path / "y"))
    assert p.returncode == 1
    assert "does not hold this model's weights: conv1.conv.weight has shape [6, 1, 5, 5]" in p.stderr, p.stderr


@requires_fxp_train
@pytest.mark.parametrize("args, message", [
    (["--msq-start-bits", "16"], "msq_start_bits <= 15"),
    (["--msq-min-bits", "4", "--msq-start-bits", "3"],
     "msq_start_bits: must be at most 15 and at least msq_min_bits, itself at least 1 (1 <= msq_min_bits <= "
     "msq_start_bits <= 15), but got msq_min_bits 4 and msq_start_bits 3"),
    (["--msq-alpha", "1.5"], "msq_alpha: must be in [0, 1]"),
    (["--msq-lambda", "-1"], "msq_lambda: must be a non-negative number"),
    (["--msq-check-every", "0"], "msq_check_every: must be at least 1"),
    (["--msq-finetune-epochs", "5", "--epochs", "3"], "msq_finetune_epochs: is more than the run's 3 epochs"),
    (["--packed"], "packed: is not supported by MSQ yet"),
])
def test_bad_msq_settings_are_usage_errors(args, message):
    p = run_fxp_train("--method", "msq", *args)
    assert p.returncode == 2
    assert message in p.stderr, p.stderr


def test_report_tables_msq_runs_and_draws_widths_and_the_tradeoff(tmp_path):
    """scripts/report on float32 and MSQ runs written here: each MSQ run is
    labelled by its configuration (uniform training at λ = 0 and α = 1), sits
    beside the float32 run at compression 1, and gets its widths drawn."""
    import sys
    from environment import FXP_TRAIN
    sys.path.insert(0, str(FXP_TRAIN.parents[1] / "scripts"))
    import pandas as pd
    import report

    def run(name, method, seed, best, rate=None, bits=None, **msq):
        d = tmp_path / "g" / name
        d.mkdir(parents=True)
        config = {"model": "resnet20", "dataset": "fashion-mnist", "method": method, "batch_size": 128, "seed": seed,
                  "epochs": 2, **msq}
        (d / "sweep-run.json").write_text(json.dumps({"grid": "g", "id": name, "settings": config}))
        # The tables read the final accuracy, at the final widths; the best epoch may precede the last cut.
        summary = {"config": config, "best_val_accuracy": best + 0.05, "final_val_accuracy": best,
                   "wall_time_s": 1.0}
        epochs = [{"epoch": e, "val_accuracy": best} for e in (1, 2)]
        if method == "msq":
            summary["msq"] = {"compression_rate": rate, "bits": {"conv1": bits[-1][0], "fc": bits[-1][1]},
                              "export": {"measured_compression": rate * 0.8}}
            for e, widths in zip(epochs, bits):
                e["msq"] = {"layers": [{"name": "conv1", "bits": widths[0]}, {"name": "fc", "bits": widths[1]}]}
        (d / "summary.json").write_text(json.dumps(summary))
        (d / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs))

    msq = {"msq_start_bits": 8, "msq_lambda": 1e-3, "msq_alpha": 0.9, "msq_hessian": True}
    run("fp32", "fp32", 0, 0.90)
    other = tmp_path / "g" / "pretrain"  # a float32 run of another grid: its own row, not averaged in
    run("pretrain", "fp32", 0, 0.70)
    sweep = json.loads((other / "sweep-run.json").read_text())
    (other / "sweep-run.json").write_text(json.dumps({**sweep, "grid": "pre"}))
    run("msq-s0", "msq", 0, 0.88, 10.0, [(6, 5), (3, 3)], **msq)
    run("msq-s1", "msq", 1, 0.86, 12.0, [(6, 4), (3, 2)], **msq)
    run("msq-noh", "msq", 0, 0.87, 8.0, [(7, 7), (4, 4)], **{**msq, "msq_hessian": False})
    run("msq-old", "msq", 0, 0.80, 9.0, [(7, 7), (4, 4)], **{k: v for k, v in msq.items() if k != "msq_hessian"})
    run("uniform4", "msq", 0, 0.85, 8.0, [(4, 4), (4, 4)], **{**msq, "msq_lambda": 0, "msq_alpha": 1.0,
                                                                "msq_start_bits": 4})
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "g"), "--out", str(out)]) == 0
    table = pd.read_csv(out / "msq.csv")
    main = "msq λ=0.001 α=0.9 from 8b"
    assert sorted(set(table.config)) == ["fp32", main, f"{main} no Hessian", "uniform 4b"]
    assert sorted(table[table.config == "fp32"].grid) == ["g", "pre"]
    assert table[table.config == "fp32"].compression_rate.tolist() == [1.0, 1.0]
    hessian = table[table.config == main]  # with the run that predates msq_hessian (a Hessian run)
    assert sorted(hessian.compression_rate) == [9.0, 10.0, 12.0] and sorted(hessian.min_bits) == [2, 3, 4]
    text = (out / "report.md").read_text()
    assert f"| g | resnet20 | fashion-mnist | {main} | 3 | 84.7% | 80.0% | 88.0% | 10.33× | 8.27× | 2–4 |" in text
    assert "| g | resnet20 | fashion-mnist | fp32 | 1 | 90.0% |" in text
    assert "| pre | resnet20 | fashion-mnist | fp32 | 1 | 70.0% |" in text
    for png in ("msq-accuracy-compression-resnet20-fashion-mnist.png",
                "msq-bits-g-resnet20-fashion-mnist-msq-lambda0.001-alpha0.9-from-8b.png",
                "msq-bits-g-resnet20-fashion-mnist-uniform-4b.png"):
        assert (out / png).stat().st_size > 0, png
