#!/usr/bin/env python3
"""Training throughput of fleets (fxp-train --fleet) against solo runs, measured
in the same run: images/s of K solo runs and of one fleet of K members, and the
fleet's speed-up, per batch size and K.

K solo runs of the same settings cost K times one (they differ only in their
seeds), so the solo figure is one run's (N runs' at once with `--jobs N`; its
timed epoch at least 1024 images). Each point trains two short epochs
(`--steps` steps each) and times the second, as scripts/bench_train.py does;
a fleet's images/s counts every member's images.

`--jobs N` runs N copies of every measurement at once, as `scripts/sweep --jobs
N` runs N processes: the figures are then the machine's images/s, summed over
the copies, so the speed-up compares N solo runs at a time with N fleets at a
time, each process on `--threads` threads. By default both are the sweep's
(on the CPU one one-thread process per CPU, on a GPU one process), so the
speed-up is what a sweep's fleets gain (on a 2-CPU machine `--jobs 1
--threads 2` compares a fleet with a two-thread solo run, which wastes much
of its second thread at small batches: docs/benchmarks.md).

  scripts/bench_fleet.py --markdown results/fleet-cpu.md --csv results/fleet-cpu.csv
  scripts/bench_fleet.py --batch-sizes 1,4 --fleet-sizes 8,32 --methods sqpu,ste
  scripts/bench_fleet.py --model lenet5 --batch-sizes 1,16
  scripts/bench_fleet.py --repeats 3     # medians of 3 interleaved rounds: for a machine whose speed varies
  scripts/bench_fleet.py --jobs 1 --threads 2   # one process at a time, on two threads
  scripts/bench_fleet.py --device cuda --fleet-sizes 8,32,80,160
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import pathlib
import subprocess
import sys
import tempfile
from statistics import median

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from argtypes import positive_list, whole_number  # noqa: E402
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich")
from bench_report import BenchReport, finish  # noqa: E402
from bench_train import add_run_args, measure  # noqa: E402
import sweeplib  # noqa: E402


def measure_fleet(fxp_train: str, method: str, batch: int, images: int, members: int, device: str, threads: int,
                  data_dir: str | None, model: str = "paper_cnn") -> float:
    """Training images/s of a fleet of `members` runs (seeds 0..K-1) over the second of two epochs; NaN on failure."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = [json.dumps({"seed": s, "output_dir": f"{tmp}/member-{s}"}) for s in range(members)]
        (pathlib.Path(tmp) / "fleet.jsonl").write_text("\n".join(lines) + "\n")
        cmd = [fxp_train, "--fleet", f"{tmp}/fleet.jsonl", "--model", model, "--method", method,
               "--batch-size", str(batch), "--epochs", "2", "--train-limit", str(images), "--val-limit", "100",
               "--device", device, "--threads", str(threads), "--quiet"]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        p = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print(f"bench_fleet.py: a fleet of {members} ({method}, batch {batch}) failed (exit {p.returncode}):\n"
                  f"{p.stderr[-2000:]}", file=sys.stderr, flush=True)
            return float("nan")
        epoch = [json.loads(line) for line in open(pathlib.Path(tmp) / "member-0" / "metrics.jsonl")][-1]
    return members * epoch["images_per_s"]  # each member's images/s is its images over the fleet's time


def at_once(jobs: int, measure_one) -> float:
    """The images/s of `jobs` copies of measure_one() run at once, summed (NaN if any failed)."""
    if jobs == 1:
        return measure_one()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # each copy waits on its own fxp-train
        return sum(pool.map(lambda _: measure_one(), range(jobs)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sqpu", help="comma-separated: fp32, ste, sqpu, hteqpu")
    p.add_argument("--model", default="paper_cnn", choices=["paper_cnn", "lenet5"])
    p.add_argument("--batch-sizes", type=positive_list, default=positive_list("1,4,16,64"),
                   help="comma-separated (default: 1,4,16,64)")
    p.add_argument("--fleet-sizes", type=positive_list, default=positive_list("8,32,80"),
                   help="K, the members of each fleet, comma-separated (default: 8,32,80)")
    p.add_argument("--steps", type=whole_number(1), default=32, help="timed training steps per point")
    p.add_argument("--repeats", type=whole_number(1), default=1,
                   help="rounds of every point, solo and fleets interleaved; the figures are the medians "
                        "(3 or more on a machine whose speed varies)")
    p.add_argument("--threads", type=whole_number(0),
                   help="CPU threads per process (default: the CPUs divided among the jobs, as scripts/sweep "
                        "does; 0: LibTorch's default)")
    p.add_argument("--jobs", type=whole_number(1),
                   help="copies of every measurement run at once, as sweep --jobs runs them; the figures are "
                        "summed over the copies (default: scripts/sweep's: on the CPU one per CPU, or per "
                        "--threads CPUs; on a GPU 1)")
    add_run_args(p)
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    for m in methods:
        if m not in ("fp32", "ste", "sqpu", "hteqpu"):
            raise SystemExit(f"bench_fleet.py: fleets train fp32, ste, sqpu and hteqpu, not {m!r}")
    sizes = args.fleet_sizes
    args.jobs, args.threads = sweeplib.jobs_and_threads(args.jobs, args.threads, args.device,
                                                        sweeplib.usable_cpus(), sweeplib.usable_memory_gib())

    rows, table = [], []
    for method in methods:
        for batch in args.batch_sizes:
            images = max(32, args.steps * batch)
            solos, fleets = [], {k: [] for k in sizes}
            for r in range(args.repeats):
                # Rounds interleave the solo run and the fleets, so a slow spell of the machine hits both.
                # The solo run's timed epoch is at least 1024 images (as bench_train.py's): a short one is noisy.
                solos.append(at_once(args.jobs, lambda: measure(
                    args.fxp_train, method, batch, max(1024, images), 100, args.device, args.threads, args.data_dir,
                    model=args.model, script="bench_fleet.py")["train_images_per_s"]))
                print(f"{method} batch {batch:4d}, round {r + 1}: solo {solos[-1]:8.0f} img/s", flush=True)
                for k in sizes:
                    fleets[k].append(at_once(args.jobs, lambda: measure_fleet(
                        args.fxp_train, method, batch, images, k, args.device, args.threads, args.data_dir,
                        args.model)))
                    print(f"{method} batch {batch:4d}, round {r + 1}: fleet of {k:3d} {fleets[k][-1]:8.0f} img/s, "
                          f"{fleets[k][-1] / solos[-1]:.2f}x", flush=True)
            # A failed round (NaN) fails its point: a median over the rest would hide it.
            solo = float("nan") if any(math.isnan(v) for v in solos) else median(solos)
            for k in sizes:
                fleet = float("nan") if any(math.isnan(v) for v in fleets[k]) else median(fleets[k])
                speedup = fleet / solo
                ratios = [f / s for f, s in zip(fleets[k], solos)]
                spread = f"{min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else ""
                rows.append({"model": args.model, "method": method, "batch_size": batch, "members": k,
                             "device": args.device, "threads": args.threads, "jobs": args.jobs,
                             "repeats": args.repeats,
                             "solo_images_per_s": solo,
                             "fleet_images_per_s": fleet, "speedup": speedup,
                             "speedup_min": min(ratios), "speedup_max": max(ratios)})
                table.append([method, str(batch), str(k), f"{solo:.0f}", f"{fleet:.0f}", f"{speedup:.2f}x", spread])
    report = BenchReport(f"Fleets of {args.model} against solo runs on {args.device} "
                         f"({args.jobs} at a time, {args.threads or 'default'} threads each)",
                         "Training images/s of the second of two epochs: one solo run (K of them take K times "
                         "as long) and one fleet of K members (all members' images), measured in the same run.")
    report.table("fleet throughput", ["method", "batch", "K", "solo images/s", "fleet images/s", "speed-up",
                                      "per-round speed-ups"], table)
    return finish("bench_fleet.py", report, args.markdown, args.csv, rows, "speedup",
                  lambda r: f"{r['method']} at batch {r['batch_size']}, K = {r['members']}")


if __name__ == "__main__":
    sys.exit(main())
