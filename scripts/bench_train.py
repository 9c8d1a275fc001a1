#!/usr/bin/env python3
"""Training throughput of fxp-train per method and batch size, as images/s and
as a ratio to the fp32 baseline measured in the same run.

Each point is a short fxp-train run (two epochs on a slice of the training
set; the second epoch is timed, so start-up and warm-up do not count). The
CSV it writes is what `scripts/sweep --estimate` extrapolates full grids from.

  scripts/bench_train.py --csv results/throughput-cpu.csv --markdown results/throughput-cpu.md
  scripts/bench_train.py --device cuda --csv gpu.csv
  scripts/bench_train.py --methods fp32,sqpu,sqpu:packed --batch-sizes 16,256   # the cost of packed storage
  scripts/bench_train.py --device cuda --methods fp32,sqpu,sqpu:graphs --batch-sizes 1,4   # CUDA graphs
  scripts/bench_train.py --device cuda --methods sqpu:packed,sqpu:packed:graphs --batch-sizes 1

Rows with :graphs also give their speed-up over the same method without it, where both ran.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from argtypes import output_file, positive_list, whole_number  # noqa: E402
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich")
from bench_report import BenchReport, finish  # noqa: E402


VARIANTS = ("packed", "graphs")  # METHOD:VARIANT[:VARIANT]


def split_method(method: str) -> tuple[str, list[str]]:
    """'sqpu:packed:graphs' -> ('sqpu', ['packed', 'graphs']): fxp-train --packed --cuda-graphs."""
    name, *variants = method.split(":")
    if any(v not in VARIANTS for v in variants) or len(set(variants)) != len(variants):
        raise SystemExit(f"bench_train.py: unknown method variant {method!r} (use METHOD, METHOD:packed, "
                         "METHOD:graphs or METHOD:packed:graphs)")
    return name, variants


def method_flags(method: str, model: str, device: str) -> list[str]:
    """fxp-train's flags for one METHOD[:VARIANT...] of the table."""
    name, variants = split_method(method)
    return ["--model", model, "--method", name, f"--packed={'true' if 'packed' in variants else 'false'}",
            f"--cuda-graphs={'true' if 'graphs' in variants else 'false'}", "--device", device]


def check_flags(fxp_train: str, flags: list[str], prefix: str, script: str = "bench_train.py") -> None:
    """Exits with fxp-train's own message, after `script` and `prefix`, where it would refuse `flags`,
    before minutes of measuring."""
    try:
        p = subprocess.run([fxp_train, *flags, "--print-config"], capture_output=True, text=True)
    except OSError as e:
        raise SystemExit(f"{script}: cannot run {fxp_train}: {e} (build it with scripts/setup.sh)") from None
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"fxp-train exited with {p.returncode}"])[0]
        raise SystemExit(f"{script}: {prefix}{why}")


def check_method(fxp_train: str, method: str, model: str, device: str) -> None:
    """Exits with fxp-train's own message where it would refuse the method (an unknown name, packed
    storage on a model without it, ...)."""
    check_flags(fxp_train, method_flags(method, model, device), f"--methods {method}: ")


def check_model(fxp_train: str, model: str, device: str, script: str = "bench_train.py") -> None:
    """Exits with fxp-train's own message (`--model: ...`) where it would refuse the model or the device
    whatever the method: checked before the methods, so that such an error is not named as a method's."""
    check_flags(fxp_train, ["--model", model, "--device", device], "", script)


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The options of every benchmark of fxp-train runs: the device, the data, the binary and the outputs."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (default: fxp-train's)")
    p.add_argument("--fxp-train", default=str(ROOT / "build" / "fxp-train"))
    p.add_argument("--csv", type=output_file, help="write the measurements as CSV")
    p.add_argument("--markdown", type=output_file, help="write the table as markdown")


def measure(fxp_train: str, method: str, batch: int, images: int, val_images: int, device: str,
            threads: int, data_dir: str | None, model: str = "paper_cnn", extra: tuple[str, ...] = (),
            script: str = "bench_train.py") -> dict:
    """One point: fxp-train for two epochs; the second epoch's training images/s (NaN, after `script`'s
    line with fxp-train's error, where it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [fxp_train, *method_flags(method, model, device), "--batch-size", str(batch), "--epochs", "2",
               "--train-limit", str(images), "--val-limit", str(val_images), "--eval-batch-size", "1000",
               "--threads", str(threads), "-o", tmp, "--quiet"]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        cmd += list(extra)
        p = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:  # the other points still run; this one reports why it has no figure
            print(f"{script}: {method} at batch {batch} failed (exit {p.returncode}):\n{p.stderr[-2000:]}",
                  file=sys.stderr, flush=True)
            return {"model": model, "method": method, "batch_size": batch, "device": device, "threads": threads,
                    "train_images_per_s": float("nan"), "val_images_per_s": float("nan")}
        epoch = [json.loads(line) for line in open(pathlib.Path(tmp) / "metrics.jsonl")][-1]
    val_time = epoch["epoch_time_s"] - epoch["train_time_s"]
    return {"model": model, "method": method, "batch_size": batch, "device": device, "threads": threads,
            "train_images_per_s": epoch["images_per_s"], "val_images_per_s": val_images / max(val_time, 1e-9)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="fp32,ste,sqpu,hteqpu",
                   help="comma-separated; METHOD:packed runs fxp-train --packed, METHOD:graphs --cuda-graphs, "
                        "METHOD:packed:graphs both")
    p.add_argument("--batch-sizes", type=positive_list, default=positive_list("1,4,16,64,256,1024"),
                   help="comma-separated (default: 1,4,16,64,256,1024)")
    p.add_argument("--model", default="paper_cnn", help="fxp-train --model (docs/models.md)")
    p.add_argument("--steps", type=whole_number(1), default=64,
                   help="timed training steps per point (at least 1024 images)")
    p.add_argument("--val-images", type=whole_number(1), default=2000)
    p.add_argument("--threads", type=whole_number(0), default=0, help="CPU threads (0: LibTorch's default)")
    add_run_args(p)
    args = p.parse_args(argv)

    rows = []
    check_model(args.fxp_train, args.model, args.device)
    for method in args.methods.split(","):  # every name checked before minutes of measuring
        check_method(args.fxp_train, method, args.model, args.device)
    for batch in args.batch_sizes:
        images = min(60000, max(1024, args.steps * batch))
        for method in args.methods.split(","):
            r = measure(args.fxp_train, method, batch, images, args.val_images, args.device, args.threads,
                        args.data_dir, args.model)
            rows.append(r)
            print(f"{method:7s} batch {batch:5d}: {r['train_images_per_s']:9.0f} train img/s, "
                  f"{r['val_images_per_s']:9.0f} validation img/s", flush=True)
    baseline = {r["batch_size"]: r["train_images_per_s"] for r in rows if r["method"] == "fp32"}
    speed = {(r["method"], r["batch_size"]): r["train_images_per_s"] for r in rows}
    table = []
    for r in rows:
        ratio = baseline[r["batch_size"]] / r["train_images_per_s"] if r["batch_size"] in baseline else float("nan")
        r["time_over_fp32"] = ratio
        parts = r["method"].split(":")
        eager = speed.get((":".join(v for v in parts if v != "graphs"), r["batch_size"])) if "graphs" in parts else None
        table.append([r["method"], str(r["batch_size"]), f"{r['train_images_per_s']:.0f}",
                      f"{r['val_images_per_s']:.0f}", f"{ratio:.2f}x",
                      f"{r['train_images_per_s'] / eager:.2f}x" if eager else ""])
    report = BenchReport(f"fxp-train throughput on {args.device} ({args.threads or 'default'} threads)",
                         "Training images/s of the second of two epochs; time per image relative to fp32 "
                         "at the same batch size, measured in the same run.")
    report.table("fxp-train throughput", ["method", "batch", "train images/s", "validation images/s",
                                          "time / fp32", "graphs speed-up"], table)
    return finish("bench_train.py", report, args.markdown, args.csv, rows, "train_images_per_s",
                  lambda r: f"{r['method']} at batch {r['batch_size']}")


if __name__ == "__main__":
    sys.exit(main())
