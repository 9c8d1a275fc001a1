"""Experiment grids for fxp-train: expansion into runs, selection, sharding and
a resumable runner. Used by scripts/sweep.py and the tests; docs/sweeps.md
describes the grid format.

A grid (configs/grids/*.yaml) has a `name`, `base` settings shared by all runs,
and `blocks`. Each block may `set` more settings and has `axes`: an ordered
mapping from a key to a list of values. A block's runs are the Cartesian
product of its axes, in order. A value that is a mapping sets several keys at
once (the `format` axis sets the four format keys).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import pathlib
import subprocess
import time
from typing import Callable, Iterable

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Run:
    grid: str
    id: str  # stable, filesystem-safe; unique within the grid
    settings: tuple  # sorted (key, value) pairs: fxp-train config keys

    @property
    def config(self) -> dict:
        return dict(self.settings)


def run_name(s: dict) -> str:
    """A readable id from the settings, e.g. sqpu-p16.10-o16.8-sr-b256-s3: the
    name fxp-train gives the run (TrainConfig::run_name; a test keeps the two equal)."""
    parts = [s.get("method", "sqpu")]
    if parts[0] != "fp32":
        parts.append(f"p{s.get('param_bits', 16)}.{s.get('param_frac', 10)}")
        parts.append(f"o{s.get('out_bits', 16)}.{s.get('out_frac', 8)}")
        parts.append(s.get("inference_rounding", "sr"))
    parts.append(f"b{s.get('batch_size', 64)}")
    parts.append(f"s{s.get('seed', 0)}")
    if s.get("packed", False):
        parts.append("packed")
    return "-".join(str(p) for p in parts)


def load_grid(path: str | os.PathLike) -> dict:
    path = pathlib.Path(path)
    try:
        grid = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"cannot read grid {path}: {e}") from e
    if not isinstance(grid, dict) or "blocks" not in grid:
        raise ValueError(f"grid {path}: expected a mapping with 'name', 'base' and 'blocks'")
    grid.setdefault("name", path.stem)
    return grid


def expand(grid: dict) -> list[Run]:
    """Every run of the grid, in grid order. Run ids must come out unique."""
    runs: list[Run] = []
    base = dict(grid.get("base") or {})
    for b, block in enumerate(grid["blocks"]):
        fixed = {**base, **(block.get("set") or {})}
        axes = block.get("axes") or {}
        if not isinstance(axes, dict):
            raise ValueError(f"grid {grid['name']}, block {b}: axes must be a mapping of key to values")
        values = []
        for key, options in axes.items():
            if not isinstance(options, list) or not options:
                raise ValueError(f"grid {grid['name']}, block {b}: axis {key} needs a non-empty list")
            values.append([opt if isinstance(opt, dict) else {key: opt} for opt in options])
        for combo in itertools.product(*values):
            settings = dict(fixed)
            for part in combo:
                settings.update(part)
            runs.append(Run(grid["name"], run_name(settings), tuple(sorted(settings.items()))))
    seen: dict[str, Run] = {}
    for r in runs:
        if r.id in seen:
            raise ValueError(f"grid {grid['name']}: two runs share the id {r.id}; "
                             f"their settings are {seen[r.id].config} and {r.config}")
        seen[r.id] = r
    return runs


def parse_filters(filters: Iterable[str]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in filters:
        key, sep, value = f.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"--filter {f!r}: expected KEY=VALUE[,VALUE...]")
        out.setdefault(key, set()).update(value.split(","))
    return out


def parse_assignments(items: Iterable[str]) -> dict:
    """--set KEY=VALUE: the value is read as YAML, so 5 is a number and sr a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


def select(runs: list[Run], filters: dict[str, set[str]] | None = None, seeds: int | None = None,
           overrides: dict | None = None) -> list[Run]:
    """Keeps the runs whose settings match every filter (values compared as
    text, `method=sqpu,ste`), and only the first `seeds` seeds of the grid;
    then applies `overrides` to every run (the run ids do not change)."""
    filters = filters or {}
    if seeds is not None:
        kept = sorted({r.config.get("seed", 0) for r in runs})[:seeds]
        runs = [r for r in runs if r.config.get("seed", 0) in kept]
    for key, allowed in filters.items():
        runs = [r for r in runs if str(r.config.get(key)) in allowed or
                (key == "format" and f"{r.config.get('param_bits')}/{r.config.get('param_frac')}/"
                 f"{r.config.get('out_frac')}" in allowed)]
    if overrides:
        runs = [dataclasses.replace(r, settings=tuple(sorted({**r.config, **overrides}.items()))) for r in runs]
    return runs


def shard(runs: list[Run], index: int, count: int) -> list[Run]:
    """Shard `index` of `count`: runs sorted by id, every count-th from index.
    Every run lands in exactly one shard, and shards differ by at most one run."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {index}/{count}: need 0 <= i < N")
    ordered = sorted(runs, key=lambda r: r.id)
    return ordered[index::count]


def parse_shard(text: str) -> tuple[int, int]:
    i, sep, n = text.partition("/")
    try:
        return int(i), int(n)
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None


# ---- run state on disk ----------------------------------------------------------

def atomic_write_json(path: pathlib.Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_dir(out: pathlib.Path, run: Run) -> pathlib.Path:
    return out / run.id


def status(out: pathlib.Path, run: Run) -> str:
    """done (its summary exists and is of these settings), conflict (a summary
    of other settings), failed (the last attempt failed), or pending."""
    d = run_dir(out, run)
    summary = d / "summary.json"
    if summary.exists():
        try:
            config = json.loads(summary.read_text()).get("config", {})
        except json.JSONDecodeError:
            return "pending"  # cannot happen with atomic writes; treat as unfinished
        mismatch = {k: v for k, v in run.config.items() if k not in config or config[k] != v}
        return "conflict" if mismatch else "done"
    return "failed" if (d / "failed.json").exists() else "pending"


Runner = Callable[[Run, pathlib.Path], None]  # raises RunFailed on failure


class RunFailed(Exception):
    pass


class Interrupted(Exception):
    """The sweep is stopping; the run is not failed and resumes next time."""


class Processes:
    """The fxp-train processes a sweep has running, so that stopping the sweep stops them."""

    def __init__(self):
        self.running: set = set()
        self.stopping = False

    def stop(self) -> None:
        self.stopping = True
        for p in list(self.running):
            p.terminate()
        for p in list(self.running):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def fxp_train_runner(fxp_train: str | os.PathLike, threads: int, device: str | None = None,
                     processes: Processes | None = None) -> Runner:
    """Runs fxp-train for one run: config from the run's settings, --resume
    (so a killed run continues from its checkpoint), quiet, stderr to a log."""
    def run(r: Run, d: pathlib.Path) -> None:
        settings = dict(r.config)
        settings["threads"] = threads
        if device:
            settings["device"] = device
        settings["output_dir"] = str(d)
        atomic_write_json(d / "run.json", settings)
        cmd = [str(fxp_train), "-c", str(d / "run.json"), "--resume", "--quiet"]
        with open(d / "stderr.log", "ab") as err:
            if processes is not None and processes.stopping:
                raise Interrupted(r.id)
            p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            if processes is not None:
                processes.running.add(p)
            try:
                code = p.wait()
            finally:
                if processes is not None:
                    processes.running.discard(p)
        if processes is not None and processes.stopping:
            raise Interrupted(r.id)
        if code != 0:
            tail = (d / "stderr.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise RunFailed(f"fxp-train exited with {code}: " + " | ".join(tail))
    return run


def execute(runs: list[Run], out: pathlib.Path, runner: Runner, jobs: int = 1,
            on_update: Callable[[dict], None] | None = None) -> dict:
    """Runs every run that is not done, `jobs` at a time. A failure is recorded
    in <run>/failed.json and the rest go on. Returns the counts by status.
    Interrupting (KeyboardInterrupt) stops waiting; unfinished runs keep their
    checkpoints and resume next time."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    counts = {"done": 0, "failed": 0, "conflict": 0, "pending": 0, "skipped": 0}
    todo = []
    for r in runs:
        s = status(out, r)
        if s == "done":
            counts["skipped"] += 1
        elif s == "conflict":
            counts["conflict"] += 1
        else:
            todo.append(r)
    counts["pending"] = len(todo)
    if on_update:
        on_update(counts)

    def attempt(r: Run) -> tuple[Run, str | None]:
        d = run_dir(out, r)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_json(d / "sweep-run.json", {"grid": r.grid, "id": r.id, "settings": r.config})
        start = time.time()
        try:
            runner(r, d)
        except RunFailed as e:
            atomic_write_json(d / "failed.json", {"error": str(e), "seconds": time.time() - start,
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
            return r, str(e)
        (d / "failed.json").unlink(missing_ok=True)
        if not (d / "summary.json").exists():
            atomic_write_json(d / "failed.json", {"error": "the run ended without a summary.json"})
            return r, "no summary"
        return r, None

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    futures = set()
    queue = iter(todo)
    try:
        for r in itertools.islice(queue, max(1, jobs)):
            futures.add(pool.submit(attempt, r))
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                _, error = f.result()
                counts["pending"] -= 1
                counts["failed" if error else "done"] += 1
                nxt = next(queue, None)
                if nxt is not None:
                    futures.add(pool.submit(attempt, nxt))
            if on_update:
                on_update(counts)
    finally:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
    return counts


# ---- wall-time estimates -----------------------------------------------------------

def load_throughput(path) -> dict:
    """{method: [(batch_size, train images/s, validation images/s), ...]} from bench_train.py's CSV."""
    import csv
    table: dict = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            table.setdefault(row["method"], []).append(
                (int(row["batch_size"]), float(row["train_images_per_s"]), float(row["val_images_per_s"])))
    if not table:
        raise ValueError("no measurements")
    return {m: sorted(v) for m, v in table.items()}


def _interpolate(points, batch: int, column: int) -> float:
    """Log-log interpolation over batch size, constant beyond the measured range."""
    import math
    if batch <= points[0][0]:
        return points[0][column]
    if batch >= points[-1][0]:
        return points[-1][column]
    for (b0, *v0), (b1, *v1) in zip(points, points[1:]):
        if b0 <= batch <= b1:
            t = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp((1 - t) * math.log(v0[column - 1]) + t * math.log(v1[column - 1]))
    raise AssertionError("unreachable")


def estimate_seconds(runs: list[Run], throughput: dict, typical_epochs: float | None = None):
    """(earliest, typical, latest) total seconds of the runs, one at a time.
    A run without early stopping lasts its epochs; one with it lasts between
    its minimum and its maximum, `typical_epochs` (default: the midpoint)."""
    totals = [0.0, 0.0, 0.0]
    for r in runs:
        c = r.config
        points = throughput[c.get("method", "sqpu")]
        batch = c.get("batch_size", 64)
        per_epoch = ((c.get("train_limit") or 60000) / _interpolate(points, batch, 1)
                     + (c.get("val_limit") or 10000) / _interpolate(points, batch, 2))
        most = c.get("epochs", 3)
        if c.get("early_stopping"):
            least = min(most, c.get("early_stopping_min_epochs", 20))
            typical = typical_epochs if typical_epochs is not None else (least + most) / 2
        else:
            least = typical = most
        for i, e in enumerate((least, min(typical, most), most)):
            totals[i] += e * per_epoch
    return tuple(totals)
