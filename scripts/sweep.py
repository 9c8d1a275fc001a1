#!/usr/bin/env python3
"""Run an experiment grid of fxp-train runs: locally, on one GPU, or sharded
across a cluster (scripts/slurm/). Finished runs are skipped, killed runs
resume from their checkpoints, failed runs are recorded and the sweep goes on.

Examples:
  scripts/sweep configs/grids/exp1.yaml --dry-run
  scripts/sweep configs/grids/exp2.yaml --estimate throughput.csv   # implies --dry-run
  scripts/sweep configs/grids/exp1.yaml --seeds 1 --set epochs=5 --jobs 2
  scripts/sweep configs/grids/exp2.yaml --device cuda --jobs 4 --filter batch_size=256,1024
  scripts/sweep configs/grids/exp3.yaml --shard 3/16          # one machine's share

A grid's values may use ${out} (the output directory) and ${KEY} (the run's
setting KEY): a run whose init_from is another run's checkpoint,
${out}/<run id>/checkpoint.pt, starts once that run has finished
(docs/sweeps.md, "Runs that start from other runs").

Exit status: 0 every selected run is done; 1 some failed or conflict; 2 a usage
or grid error, or runs to start on a GPU fxp-train does not find; 75 some are
busy (another fxp-train trains them) or wait for the run whose checkpoint they
start from, none failed; 130 interrupted.
"""
from __future__ import annotations

import argparse
import collections
import os
import pathlib
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "yaml", "tqdm")
import sweeplib  # noqa: E402
from argtypes import positive_number, whole_number  # noqa: E402


# Options that only print (a dry run's): each implies --dry-run.
DRY_RUN_OPTIONS = ("list", "estimate", "fleet_throughput", "typical_epochs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", help="grid file (configs/grids/*.yaml)")
    p.add_argument("--out", help="root of the run directories (default: results/<grid name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the run counts (by method and by status) and the first runs; run nothing. "
                        "--list, --estimate, --fleet-throughput and --typical-epochs imply it")
    p.add_argument("--list", action="store_true", help="print every selected run id (implies --dry-run)")
    p.add_argument("--estimate", metavar="CSV",
                   help="extrapolate the wall time of the pending runs on --jobs processes (a run after the run "
                        "whose checkpoint it starts from) from a throughput CSV of "
                        "scripts/bench_train.py (images/s per model, method and batch size; every model and method "
                        "of the grid must be in it; only its rows of the runs' device count); implies --dry-run")
    p.add_argument("--fleet-throughput", metavar="CSV",
                   help="with --estimate: scripts/bench_fleet.py's CSV; runs in fleets train faster by their "
                        "fleet's measured speed-up (docs/benchmarks.md); implies --dry-run")
    p.add_argument("--typical-epochs", type=positive_number,
                   help="with --estimate: epochs a run with early stopping lasts (a positive number; default: the "
                        "midpoint of its minimum and maximum); bounds are printed too; implies --dry-run")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=V[,V]",
                   help="keep runs whose KEY is one of the values (repeatable): fxp-train's resolved setting, "
                        "defaults included, against each value read as YAML (weight_decay=5e-4, "
                        "msq_hessian=false); format=16/10/8 also works")
    p.add_argument("--seeds", type=whole_number(1), help="keep only the first N seeds of the grid")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting in every run, e.g. epochs=5 or train_limit=10000; run ids follow "
                        "the overridden settings, and overrides that merge two runs or make a run invalid are "
                        "errors")
    p.add_argument("--limit", type=whole_number(1), help="run at most N runs (after filters and sharding)")
    p.add_argument("--shard", default="0/1", metavar="i/N",
                   help="run only shard i of N (0-based); a run stays in the shard of the run it starts from")
    p.add_argument("--jobs", type=whole_number(1),
                   help="concurrent fxp-train processes (default: on the CPU one per CPU, or per --threads CPUs, "
                        "at most one per GiB of memory; on a GPU 1)")
    p.add_argument("--threads", type=whole_number(1),
                   help="CPU threads per process (default: the CPUs divided among the jobs)")
    p.add_argument("--device", help="cpu, cuda or cuda:N for every run (default: the grid's, else cpu)")
    p.add_argument("--fxp-train", default=str(sweeplib.DEFAULT_FXP_TRAIN),
                   help="the fxp-train executable (default: $FXP_TRAIN, else build/fxp-train)")
    p.add_argument("--fleet", type=whole_number(1), metavar="K",
                   help="train runs that can share one in fleets of up to K (fxp-train --fleet: same model, "
                        "dataset, method and batch size); 1: every run alone (default: K from the batch size, "
                        "threads and device, docs/sweeps.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def sweep_device(args, runs) -> str | None:
    """The device this sweep's processes share: --device, else its first run's (the grid's)."""
    return args.device or next((r.full_config.get("device") for r in runs if r.full_config.get("device")), None)


def estimate_tables(args, device: str | None = None) -> tuple:
    """(--fleet-throughput's speed-ups or None, --estimate's throughput or None): the rows measured on
    `device` (None: every row, which checks the files). Errors name the option and the file."""
    tables = []
    for option, path, load in (("--fleet-throughput", args.fleet_throughput, sweeplib.load_fleet_speedups),
                               ("--estimate", args.estimate, sweeplib.load_throughput)):
        try:
            tables.append(load(path, device) if path else None)
        except ValueError as e:
            raise ValueError(f"{option} {path}: {e}") from None
    return tuple(tables)


def estimate_line(args, runs, pending, sources, units, jobs, throughput, speedups) -> str:
    """--estimate's line: the wall time of the pending runs (in their fleets, `units`) on `jobs` jobs.
    A run fxp-train would refuse, or a model or method the table lacks, is a ValueError."""
    # Only what is left to run: done, conflicting and busy runs are not started.
    resolved = sweeplib.resolved_runs(pending, args.fxp_train)  # a run's settings: "run ID: ..."
    try:
        size = {r.id: len(u) for u in units for r in u}
        per_run = sweeplib.run_seconds(resolved, throughput, args.typical_epochs, speedups,
                                       [size.get(r.id, 1) for r in pending])
    except ValueError as e:  # a model or method the table lacks
        raise ValueError(f"--estimate {args.estimate}: {e}") from None
    index = {r.id: i for i, r in enumerate(pending)}
    low, mid, high = sweeplib.wall_seconds(per_run, [index.get(sources[r.id]) for r in pending], jobs,
                                           [[index[r.id] for r in unit] for unit in units])
    fleets = " in fleets" if speedups else ""
    # No number of jobs makes a run, a fleet, or a chain of runs that start from each other, shorter.
    spread = sum(s[1] for s in per_run) / jobs
    chained = (" (set by its longest run or fleet, or chain of runs that start from each other's "
               "checkpoints)" if mid > spread * (1 + 1e-9) else "")
    return (f"  estimated wall time of the {sweeplib.plural(len(pending), 'pending run')} (of {len(runs)} "
            f"selected){fleets} on {sweeplib.plural(jobs, 'job')} at the measured throughput: "
            f"{mid / 3600:.1f} h{chained} (from {low / 3600:.1f} h if every run stops at its minimum "
            f"epochs to {high / 3600:.1f} h if none stops early)")


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("fleet_throughput", "typical_epochs"):
        if getattr(args, name) is not None and not args.estimate:
            print(f"sweep: --{name.replace('_', '-')} needs --estimate CSV", file=sys.stderr)
            return 2
    if any(getattr(args, name) not in (None, False) for name in DRY_RUN_OPTIONS):
        args.dry_run = True  # they only print: never start the sweep
    try:
        estimate_tables(args)  # before the grid: a mistyped file name is told at once
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if not os.access(args.fxp_train, os.X_OK):  # it names the runs and checks their settings, dry runs included
        print(f"sweep: {args.fxp_train} is not an executable; build it (scripts/setup.sh) or pass --fxp-train",
              file=sys.stderr)
        return 2
    try:
        keys = sweeplib.config_keys(args.fxp_train)
        grid = sweeplib.load_grid(args.grid, keys)
        out = pathlib.Path(args.out) if args.out else sweeplib.default_out(grid["name"])
        sweeplib.check_out(out)
        grid_runs = sweeplib.expand(grid, args.fxp_train, out)
        overrides = sweeplib.parse_assignments(args.set, keys)
        # --set and --device are resolved by fxp-train here, so that an override it would refuse, or one
        # that merges two runs, is an error before anything runs.
        runs = sweeplib.select(grid_runs, sweeplib.parse_filters(args.filter, keys), args.seeds, overrides,
                               args.fxp_train, args.device, out)
        if args.filter and not runs:  # a typo in a value selects nothing: say so, not a silent "0 runs"
            print(f"sweep: warning: no run matches the filters ({' '.join('--filter ' + f for f in args.filter)})",
                  file=sys.stderr)
        runs = sweeplib.shard(runs, *sweeplib.parse_shard(args.shard), out)
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        runs = runs[: args.limit]
    # run_settings gives every run the sweep's threads and directory, whatever the grid says.
    ignored = sorted({k for r in runs for k in ("threads", "output_dir") if k in r.config})
    if ignored:
        print(f"sweep: warning: {' and '.join(ignored)} in the grid or --set {'is' if len(ignored) == 1 else 'are'} "
              "ignored: the sweep sets each run's threads (--threads) and directory (--out/<run id>)",
              file=sys.stderr)
    invalid = [r for r in runs if r.invalid]
    for r in invalid[:5]:
        print(f"sweep: warning: run {r.id} will fail: {r.invalid}", file=sys.stderr)
    if len(invalid) > 5:
        print(f"sweep: warning: ... and {sweeplib.plural(len(invalid) - 5, 'more run')} with invalid settings",
              file=sys.stderr)
    # Sources whose directories hold other settings: their runs wait, whether selected or not.
    conflicting = sweeplib.conflicting_sources(runs, grid_runs, out, overrides, args.fxp_train, args.device)
    device = sweep_device(args, runs)
    jobs, threads = sweeplib.jobs_and_threads(args.jobs, args.threads, device, sweeplib.usable_cpus(),
                                              sweeplib.usable_memory_gib())

    try:
        # The measurements of the runs' device: a CPU's images/s would price GPU runs, or the reverse.
        kinds = sorted({sweeplib.device_kind(r.full_config.get("device") or "cpu") for r in runs})  # --device in
        if len(kinds) > 1 and (args.estimate or args.fleet_throughput):
            raise ValueError(f"the selected runs are on {' and '.join(kinds)}: price one device at a time "
                             f"(--filter device=...)")
        speedups, throughput = estimate_tables(args, (device or "cpu") if runs else None)
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2

    if args.dry_run:
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--list | head` ends quietly
        statuses = {r.id: sweeplib.status(out, r) for r in runs}
        pending = [r for r in runs if statuses[r.id] not in ("done", "conflict", "busy")]
        sources = {r.id: sweeplib.source_run(r, out) for r in pending}
        units = sweeplib.plan_fleets(pending, args.fxp_train, threads, args.device, args.fleet)
        try:  # before anything is printed: an error is not lost after the summary
            estimate = estimate_line(args, runs, pending, sources, units, jobs, throughput, speedups) \
                if args.estimate else ""
        except ValueError as e:
            print(f"sweep: {e}", file=sys.stderr)
            return 2
        by_method = collections.Counter(r.full_config.get("method") for r in runs)
        quantized = sum(n for m, n in by_method.items() if m != "fp32")
        by_status = collections.Counter(statuses.values())
        print(f"grid {grid['name']}: {sweeplib.plural(len(runs), 'run')} ({quantized} quantized, "
              f"{by_method.get('fp32', 0)} fp32 baseline); shard {args.shard}; output {out}")
        print("  by method: " + ", ".join(f"{m} {n}" for m, n in sorted(by_method.items())))
        print("  by status: " + ", ".join(f"{s} {n}" for s, n in sorted(by_status.items())))
        after = sum(s in sources for s in sources.values())
        if after:
            print(f"  {sweeplib.plural(after, 'pending run')} will start from another pending run's checkpoint, "
                  "once that run finishes")
        waits = [why for r in pending
                 if sources[r.id] not in sources and (why := sweeplib.waits_for(r, out, conflicting))]
        if waits:
            print(f"  {sweeplib.plural(len(waits), 'pending run')} would wait, not start: {waits[0]}"
                  + (f" (and {len(waits) - 1} more)" if len(waits) > 1 else ""))
        in_fleets = [u for u in units if len(u) > 1]
        alone = len(units) - len(in_fleets)
        if args.fleet != 1 and in_fleets:
            print(f"  fleets: {sweeplib.plural(sum(len(u) for u in in_fleets), 'pending run')} in "
                  f"{sweeplib.plural(len(in_fleets), 'fleet')} (up to "
                  f"{sweeplib.plural(max(len(u) for u in in_fleets), 'member')}), {alone} alone")
        elif args.fleet != 1:
            print(f"  fleets: none; {sweeplib.plural(alone, 'pending run')} alone")
        if estimate:
            print(estimate)
        for r in runs if args.list else runs[:5]:
            print(f"  {r.id}")
        if not args.list and len(runs) > 5:
            print(f"  ... ({len(runs) - 5} more; --list shows all)")
        return 0

    # Without the GPU the runs ask for, each would start and fail (Exp 2: 2,750 failed.json): ask fxp-train
    # once, before any starts. Only here: a dry run, an estimate, or sbatch (its tasks run on GPU nodes) need none.
    gpu = next((d for r in runs if sweeplib.device_kind(d := r.full_config.get("device")) == "cuda"
                and sweeplib.status(out, r) not in ("done", "conflict", "busy")), None)
    if gpu and (why := sweeplib.missing_gpu(args.fxp_train, gpu)):
        print(f"sweep: {why} (fxp-train says); no run was started", file=sys.stderr)
        return 2
    try:
        if runs:  # a selection of none writes nothing
            sweeplib.make_out(out)
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    if why := sweeplib.oversubscription(jobs, threads, device, sweeplib.usable_cpus()):
        print(f"sweep: warning: {why}", file=sys.stderr)
    processes = sweeplib.Processes()
    runner = sweeplib.fxp_train_runner(args.fxp_train, threads, args.device, processes)
    fleet_runner = sweeplib.fxp_train_fleet_runner(args.fxp_train, threads, args.device, processes)
    def plan(todo):
        return sweeplib.plan_fleets(todo, args.fxp_train, threads, args.device, args.fleet)
    def stop_on_term(signum, frame):  # SLURM (and kill) ask with TERM: stop like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, stop_on_term)

    bar = None
    if not args.no_progress and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(runs), unit="run", desc=grid["name"], dynamic_ncols=True)

    def on_update(counts):
        if bar is not None:
            bar.n = sum(counts[k] for k in ("done", "failed", "skipped", "conflict", "busy", "waiting"))
            bar.set_postfix(done=counts["done"] + counts["skipped"], failed=counts["failed"], busy=counts["busy"],
                            waiting=counts["waiting"], pending=counts["pending"], refresh=False)
            bar.refresh()

    print(f"sweep {grid['name']}: {sweeplib.plural(len(runs), 'run')}, {sweeplib.plural(jobs, 'job')} x "
          f"{sweeplib.plural(threads, 'thread')} -> {out}", file=sys.stderr)
    try:
        counts = sweeplib.execute(runs, out, runner, jobs, on_update, plan, fleet_runner, conflicting)
    except KeyboardInterrupt:
        processes.stop()
        if bar is not None:
            bar.close()
        print("sweep: interrupted; unfinished runs resume from their checkpoints next time", file=sys.stderr)
        return 130
    if bar is not None:
        bar.close()
    print(f"sweep {grid['name']}: {counts['done']} run now, {counts['skipped']} already done, "
          f"{counts['failed']} failed, {counts['conflict']} conflicting, {counts['busy']} busy, "
          f"{counts['waiting']} waiting for other runs", file=sys.stderr)
    for r in runs:
        s = sweeplib.status(out, r)
        if s == "failed":
            print(f"  {r.id}: failed: {sweeplib.failure(out / r.id)}", file=sys.stderr)
        elif s == "conflict":
            differ = sweeplib.differences(sweeplib.finished_settings(out / r.id) or {}, r)
            print(f"  {r.id}: its directory holds a finished run with other settings: {differ}", file=sys.stderr)
        elif s == "busy":
            print(f"  {r.id}: busy, another fxp-train is training it", file=sys.stderr)
        elif s == "pending" and (why := sweeplib.waits_for(r, out, conflicting)):
            print(f"  {r.id}: waiting, not started: {why}", file=sys.stderr)
    if counts["failed"] or counts["conflict"]:
        return 1
    # Busy or waiting runs are not failed, but not done either: run the sweep again later.
    return sweeplib.BUSY_EXIT if counts["busy"] or counts["waiting"] else 0


if __name__ == "__main__":
    sys.exit(main())
