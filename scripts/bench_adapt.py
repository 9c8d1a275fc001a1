#!/usr/bin/env python3
"""AdaPT's per-step cost against plain float32 SGD training of the same model,
measured in the same run (docs/adapt.md).

Each point is the second epoch of a short fxp-train run (scripts/bench_train.py
measures it), repeated and interleaved across methods; the median counts.
Four methods: fp32 (float32 SGD), ste (the same quantized reads of the weights
and activations at a fixed format, no controller), adapt, and adapt-qpu (AdaPT
without a master copy, --update qpu). adapt / fp32 is AdaPT's whole overhead
in this simulation of fixed point on float hardware; adapt / ste is the
controller's part (Eq. 3.4 normalization, GD accumulation, PD, PU) at the given
lookbacks (the paper's 25..100 by default).

  scripts/bench_adapt.py --model lenet5 --batch-size 256
  scripts/bench_adapt.py --model resnet20 --batch-size 512 --device cuda --markdown gpu.md
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_report import BenchReport, write_csv  # noqa: E402
from bench_train import measure  # noqa: E402

METHODS = ("fp32", "ste", "adapt", "adapt-qpu")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5", help="fxp-train --model")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=120,
                   help="timed training steps per measurement (more than the lookback's upper bound, so that "
                        "every layer switches in the timed epoch)")
    p.add_argument("--repeats", type=int, default=3, help="measurements per method (interleaved; the median counts)")
    p.add_argument("--lookback", default="25,100", help="AdaPT's lookback bounds MIN,MAX (the paper's: 25,100)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: LibTorch's default)")
    p.add_argument("--data-dir", help="Fashion-MNIST directory (default: fxp-train's)")
    p.add_argument("--fxp-train", default=str(ROOT / "build" / "fxp-train"))
    p.add_argument("--csv", type=pathlib.Path, help="write the measurements as CSV")
    p.add_argument("--markdown", type=pathlib.Path, help="write the table as markdown")
    args = p.parse_args(argv)
    low, high = (int(v) for v in args.lookback.split(","))
    if not 1 <= low <= high:
        p.error("--lookback needs 1 <= MIN <= MAX")
    if not pathlib.Path(args.fxp_train).exists():
        p.error(f"no fxp-train at {args.fxp_train} (scripts/setup.sh builds it)")

    images = min(60000, args.steps * args.batch_size)
    lookback = ("--adapt-lookback-min", str(low), "--adapt-lookback-max", str(high))
    runs = {"fp32": ("fp32", ()), "ste": ("ste", ()), "adapt": ("adapt", lookback),
            "adapt-qpu": ("adapt", lookback + ("--update", "qpu"))}
    rows = []
    for repeat in range(args.repeats):
        for method in METHODS:
            train_method, extra = runs[method]
            r = measure(args.fxp_train, train_method, args.batch_size, images, 1000, args.device, args.threads,
                        args.data_dir, args.model, extra)
            r["method"], r["repeat"] = method, repeat
            rows.append(r)
            print(f"{method:9s} repeat {repeat}: {r['train_images_per_s']:9.0f} train img/s", flush=True)
    median = {m: statistics.median(r["train_images_per_s"] for r in rows if r["method"] == m) for m in METHODS}
    table = [[m, f"{median[m]:.0f}", f"{median['fp32'] / median[m]:.3f}x", f"{median['ste'] / median[m]:.3f}x"]
             for m in METHODS]
    report = BenchReport(
        f"AdaPT step cost: {args.model}, batch {args.batch_size}, {args.device} ({args.threads or 'default'} threads)",
        f"Median training images/s of {args.repeats} interleaved measurements ({args.steps} steps each); time per "
        f"step relative to fp32 and to ste, measured in the same run. AdaPT lookback {low}..{high}.")
    report.table("AdaPT overhead", ["method", "train images/s", "time / fp32", "time / ste"], table)
    report.save(str(args.markdown) if args.markdown else None)
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
