#!/usr/bin/env python3
"""Collect fxp-train run summaries into tables and draw the paper's figures.

Reads every summary.json below the given directories (sweep outputs or single
runs), writes runs.csv (one row per run) and stats.csv (accuracy over seeds
per configuration), heat maps as PNG (the paper's Figures 3-10), the accuracy
against memory plot (Figure 11), and report.md, which sets the measured
results beside the paper's stated numbers. AdaPT runs add adapt.csv and their
bit widths over training; MSQ runs add msq.csv, each configuration's bit
widths per layer over training, and accuracy against compression rate.
Where one grid, model, dataset and batch size hold two methods or more (the
paper's grids exp1-exp3 apart), the methods are compared side by side:
methods.csv, a "Methods compared" table (accuracy over seeds, model size,
measured training-step memory and images/s against the float32 runs) and
accuracy against model size.

A run directory counts once, however many of the given directories hold it.
Runs are seeds of one configuration where every setting but the seed is equal
(output paths and threads apart); a run with the grid, settings and seed of one
before it is left out with a warning. Unfinished runs (a checkpoint.pt or
sweep-run.json, no summary.json or failed.json) are counted and named.
A file that cannot be read (a summary.json, sweep-run.json, failed.json or
config.json that is not a JSON object, a metrics.jsonl line that is not one,
a summary.json without best_val_accuracy or config, or with a field the report
reads of the wrong type or out of range) is skipped with a warning on stderr
that names it and the problem (the field).

Examples:
  scripts/report results/exp1 results/exp2 --out results/report
  scripts/report results/compare-lenet5 --out results/compare   # the three methods side by side

Exit status: 0 the report is written; 1 no finished runs below the
directories, or --out or stdout cannot be written (a read-only or full file
system); 2 a usage error (a root that is not a directory, --out under a
regular file).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import re
import sys
import textwrap

import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "numpy", "pandas", "matplotlib", "yaml")
import numpy as np
import pandas as pd
from sweeplib import plural, varying_keys  # scripts/: the sweep's rules, written once

METHODS = ["ste", "sqpu", "hteqpu"]
CONFIG_COLUMNS = ["model", "dataset", "method", "param_bits", "param_frac", "out_bits", "out_frac", "inference_rounding",
                  "batch_size", "lr", "lr_scaling", "weight_decay", "scheduler", "epochs", "seed", "update",
                  "msq_start_bits", "msq_min_bits", "msq_lambda", "msq_alpha", "msq_hessian", "msq_finetune_epochs",
                  "init_from"]


# Config keys that do not change what a run is: where it reads and writes, and its seed and thread count.
NOT_SETTINGS = {"seed", "output_dir", "data_dir", "threads"}


def _settings(config: dict) -> dict:
    """The settings of a run's config that define its experiment: all but NOT_SETTINGS."""
    return {k: v for k, v in config.items() if k not in NOT_SETTINGS}

_warned: set[str] = set()


def warn(path, problem: str) -> None:
    """A broken file is skipped, and said so once on stderr, naming the file and the problem."""
    text = f"report: warning: skipping {path}: {problem}"
    if text not in _warned:
        _warned.add(text)
        print(text, file=sys.stderr)


def read_json(path: pathlib.Path, kind=dict):
    """The JSON value in `path`, of type `kind`; None (and a warning naming the file) when it cannot be
    read, is not JSON, or is of another type."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        warn(path, f"cannot read it ({e})")
        return None
    except ValueError as e:
        warn(path, f"not valid JSON ({e})")
        return None
    if not isinstance(value, kind):
        warn(path, f"expected a JSON {'object' if kind is dict else kind.__name__}, got {type(value).__name__}")
        return None
    return value


def _dig(obj, *keys):
    """obj[k1][k2]...; None where a level is missing or not a mapping."""
    for k in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(k)
    return obj


def _whole(low: int = -2**63, high: int = 2**63 - 1):
    """A summary field's check: a whole number in [low, high], at most 64 bits (fxp-train's int64_t)."""
    def text(x):
        return {-2**63: "-2^63", 2**63 - 1: "2^63 - 1"}.get(x, str(x))
    return (lambda v: type(v) is int and low <= v <= high), f"a whole number in [{text(low)}, {text(high)}]"


def _finite(v) -> bool:
    """A JSON number (not a boolean) that is finite as a float: 1e400 and a 400-digit int are not."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:
        return False


FRACTION = (lambda v: _finite(v) and 0 <= v <= 1), "a number in [0, 1]"
NON_NEGATIVE = (lambda v: _finite(v) and v >= 0), "a non-negative number"
POSITIVE = (lambda v: _finite(v) and v > 0), "a positive number"
STRING = (lambda v: isinstance(v, str)), "a string"
BOOLEAN = (lambda v: isinstance(v, bool)), "true or false"
WIDTHS = (lambda v: isinstance(v, dict) and all(_whole(0, 64)[0](b) for b in v.values()),
          "an object of whole numbers in [0, 64]")

# What the report reads from a summary.json (collect, msq_table), and what each field must be where it is
# given (absent or null: not given); best_val_accuracy and config are required. fxp-train writes them so
# (csrc/train/summary.cpp, its config's checks); a summary with another value is skipped with a warning
# naming the field, not a traceback from the table or figure that would use it.
REQUIRED_FIELDS = {("best_val_accuracy",), ("config",)}
SUMMARY_FIELDS = {
    ("best_val_accuracy",): FRACTION, ("final_val_accuracy",): FRACTION,
    ("best_epoch",): _whole(0), ("epochs_completed",): _whole(0), ("stop_reason",): STRING,
    ("wall_time_s",): NON_NEGATIVE, ("train_images_per_s",): NON_NEGATIVE,
    ("memory_model", "paper", "ratio_to_ste"): NON_NEGATIVE, ("memory_model", "paper", "ratio_to_fp32"): NON_NEGATIVE,
    ("adapt", "training_state_ratio_to_fp32"): NON_NEGATIVE, ("adapt", "model_size"): NON_NEGATIVE,
    ("measured_memory", "step", "total_bytes"): NON_NEGATIVE,
    ("measured_memory", "step", "step_peak_bytes"): NON_NEGATIVE,
    ("msq", "compression_rate"): NON_NEGATIVE, ("msq", "export", "measured_compression"): POSITIVE,
    ("msq", "bits"): WIDTHS,
    ("config",): ((lambda v: isinstance(v, dict)), "a JSON object"),
    **{("config", k): STRING for k in ("model", "dataset", "method", "inference_rounding", "lr_scaling",
                                       "scheduler", "update", "init_from")},
    ("config", "param_bits"): _whole(2, 32), ("config", "out_bits"): _whole(2, 32),
    ("config", "param_frac"): _whole(0, 31), ("config", "out_frac"): _whole(0, 31),
    ("config", "batch_size"): _whole(1), ("config", "epochs"): _whole(1), ("config", "seed"): _whole(),
    ("config", "msq_start_bits"): _whole(1, 15), ("config", "msq_min_bits"): _whole(1, 15),
    ("config", "msq_finetune_epochs"): _whole(0),
    ("config", "lr"): POSITIVE, ("config", "weight_decay"): NON_NEGATIVE, ("config", "msq_lambda"): NON_NEGATIVE,
    ("config", "msq_alpha"): FRACTION, ("config", "msq_hessian"): BOOLEAN,
}


def summary_problem(summary: dict) -> str | None:
    """Why the report cannot take this summary.json (the first field that is missing or not what
    SUMMARY_FIELDS says, in words); None when it can."""
    for path, (check, what) in SUMMARY_FIELDS.items():
        value = _dig(summary, *path)
        name = ".".join(path)
        if value is None:
            if path in REQUIRED_FIELDS:
                return f"it has no {name}"
            continue
        if not check(value):
            shown = json.dumps(value)
            return f"its {name} must be {what}, but is {shown if len(shown) <= 40 else shown[:37] + '...'}"
    return None


def _sweep_record(d: pathlib.Path) -> dict | None:
    """<run>/sweep-run.json ({"grid", "id", "settings"}), None when absent or broken (with a warning)."""
    path = d / "sweep-run.json"
    if not path.exists():
        return None
    sweep = read_json(path)
    if sweep is None:
        return None
    if not isinstance(sweep.get("grid"), str) or not isinstance(sweep.get("id"), str) \
            or not isinstance(sweep.get("settings", {}), dict):
        warn(path, "expected grid and id (strings) and settings (an object)")
        return None
    return sweep


def unique_roots(roots: list[pathlib.Path]) -> list[pathlib.Path]:
    """The roots without repeats: one directory given twice (or as two paths) counts once."""
    seen, out = set(), []
    for root in roots:
        key = root.resolve()
        if key not in seen:
            seen.add(key)
            out.append(root)
    return out


def collect(roots: list[pathlib.Path]) -> pd.DataFrame:
    """One row per run summary found below the roots (failed runs: status failed;
    a finished run repeated: status repeat, see _configurations). A run
    directory found twice (a root given twice, or inside another root) counts
    once; a broken file is skipped with a warning. attrs["unfinished"]: the
    run directories without summary.json or failed.json (a run stopped or
    still going), in the roots' order."""
    rows, unfinished = [], []
    seen: set[pathlib.Path] = set()
    for root in unique_roots(roots):
        for summary_path in sorted(root.rglob("summary.json")):
            d = summary_path.parent
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            s = read_json(summary_path)
            if s is None:
                continue
            problem = summary_problem(s)
            if problem:
                warn(summary_path, problem)
                continue
            c = s["config"]
            sweep = _sweep_record(d) or {}
            rows.append({
                "grid": sweep.get("grid", "single"), "id": sweep.get("id", d.name), "dir": str(d), "status": "finished",
                **{k: c.get(k) for k in CONFIG_COLUMNS},
                "best_val_accuracy": s.get("best_val_accuracy"), "best_epoch": s.get("best_epoch"),
                "final_val_accuracy": s.get("final_val_accuracy"), "epochs_completed": s.get("epochs_completed"),
                "stop_reason": s.get("stop_reason"), "wall_time_s": s.get("wall_time_s"),
                "train_images_per_s": s.get("train_images_per_s"),
                "memory_ratio_to_ste": _dig(s, "memory_model", "paper", "ratio_to_ste"),
                "memory_ratio_to_fp32": _dig(s, "memory_model", "paper", "ratio_to_fp32"),
                # AdaPT: parameters, momentum and accumulators at each layer's final width (absent before it).
                "adapt_state_ratio_to_fp32": _dig(s, "adapt", "training_state_ratio_to_fp32"),
                # One measured training step (docs/memory.md); absent in runs older than issue 6.
                "measured_step_bytes": _dig(s, "measured_memory", "step", "total_bytes"),
                "measured_step_peak_bytes": _dig(s, "measured_memory", "step", "step_peak_bytes"),
                # MSQ: the paper-style rate (weights' widths, no sign) and the export's measured one.
                "msq_compression_rate": _dig(s, "msq", "compression_rate"),
                "msq_measured_compression": _dig(s, "msq", "export", "measured_compression"),
                "msq_bits": _dig(s, "msq", "bits"),  # {layer: final width}
                # AdaPT: the performance model's final model size relative to float32 (SZ).
                "adapt_model_size": _dig(s, "adapt", "model_size"),
                # Every setting that defines the experiment (methods_table tells configurations apart by them).
                "settings": json.dumps(_settings(c), sort_keys=True),
            })
        for failed in sorted(root.rglob("failed.json")):
            d = failed.parent
            if d.resolve() in seen or (d / "summary.json").exists() or not (d / "sweep-run.json").exists():
                continue
            seen.add(d.resolve())
            sweep = _sweep_record(d)
            record = read_json(failed)
            if sweep is None or record is None:
                continue
            # The grid's settings, and fxp-train's resolution of them (defaults included) where it got as far
            # as writing its config.json: a grid that relies on the default format still gets its format.
            settings = dict(sweep.get("settings", {}))
            if (d / "config.json").exists():
                settings.update(read_json(d / "config.json") or {})
            rows.append({"grid": sweep["grid"], "id": sweep["id"], "dir": str(d), "status": "failed",
                         **{k: settings.get(k) for k in CONFIG_COLUMNS}, "error": record.get("error")})
        # fxp-train writes checkpoint.pt after every epoch, the sweep sweep-run.json before it starts a run.
        started = {p.parent for p in root.rglob("*") if p.name in ("checkpoint.pt", "sweep-run.json")}  # one walk
        for d in sorted(started):
            if d.resolve() in seen or (d / "summary.json").exists() or (d / "failed.json").exists():
                continue
            seen.add(d.resolve())
            unfinished.append(str(d))
    df = pd.DataFrame(rows)
    df.attrs["unfinished"] = unfinished
    if df.empty:
        return df
    # Columns of whole numbers (widths, epochs, seeds): a run without one (a failed run) makes pandas
    # hold the column as float, and runs.csv would print 16.0; write_report writes them as integers.
    given = {column: [r[column] for r in rows if r.get(column) is not None] for column in df.columns}
    df.attrs["integer_columns"] = [column for column, values in given.items()
                                   if values and all(type(v) is int for v in values)]  # bool is no int here
    # Runs older than issue 13 (model, dataset) and than AdaPT's update key.
    for column, default in (("model", "paper_cnn"), ("dataset", "fashion-mnist"), ("update", "float")):
        df[column] = df[column].fillna(default)
    df["fxp"] = [_fxp_label(r) for r in df.itertuples()]
    _configurations(df)
    return df


# collect's columns for the tables, not for runs.csv (settings holds what they are made of; msq_bits, a
# {layer: width} object, is summarized by msq.csv's min_bits and max_bits). A report of failed runs alone
# has no msq_bits.
INTERNAL_COLUMNS = ["method_label", "configuration", "source", "msq_bits"]


def _configurations(df: pd.DataFrame) -> None:
    """Gives each finished run its configuration, in place: "configuration", a
    key: every setting of its config but NOT_SETTINGS, where a run that starts
    from a checkpoint is known by the settings of the run that wrote it, where
    that run is among the results (so seeds that fine-tune their own seed's run
    are one configuration); "source": "from scratch", "from <the writer's
    method>" or "from <the checkpoint>"; "method_label". The tables' runs over
    seeds are the runs of one configuration. A finished run with the grid,
    configuration and seed of one before it (in the roots' order: the same run
    made twice, say a grid run again into another directory) is no second
    seed: its status becomes "repeat", with a warning naming both directories."""
    df["method_label"] = [_method_label(r) for r in df.itertuples()]
    done = df.index[df.status == "finished"]
    settings = {i: json.loads(df.at[i, "settings"]) for i in done}
    sources = {i: c.pop("init_from", "") or "" for i, c in settings.items()}
    # A run's checkpoint stands for the settings of the run that wrote it (its directory holds the checkpoint).
    writers = {pathlib.Path(df.at[i, "dir"]).resolve(): (c, df.at[i, "method_label"]) for i, c in settings.items()}
    keys, source_names = {}, {}
    for i, c in settings.items():
        source = sources[i]
        writer = writers.get(pathlib.Path(source).parent.resolve()) if source else None
        if source and writer is None:  # a writer outside the given directories: its config.json, where it lies
            writer = _writer_on_disk(pathlib.Path(source).parent)
            if writer is not None:
                writers[pathlib.Path(source).parent.resolve()] = writer
        config = {**c, "init_from": writer[0] if writer else source} if source else c
        source_names[i] = f"from {writer[1]}" if writer else f"from {source}" if source else "from scratch"
        keys[i] = json.dumps(config, sort_keys=True)
    df["configuration"] = pd.Series(keys, dtype=object)
    df["source"] = pd.Series(source_names, dtype=object)
    first: dict[tuple, str] = {}
    for i in done:
        key = (df.at[i, "grid"], keys[i], _int_text(df.at[i, "seed"]))
        if key in first:
            warn(df.at[i, "dir"], f"the same grid, settings and seed as {first[key]}, which counts, as the first "
                                  "given (a repeat is no second seed)")
            df.at[i, "status"] = "repeat"
        else:
            first[key] = df.at[i, "dir"]


def _writer_on_disk(directory: pathlib.Path) -> tuple[dict, str] | None:
    """(settings as collect keeps them, method) of the run in `directory`, from its config.json; None
    without one. So seeds that each start from their own seed's checkpoint stay one configuration when
    the runs that wrote them are not in the report (report results/msq-resnet20 alone)."""
    if not (directory / "config.json").is_file():
        return None
    config = read_json(directory / "config.json")
    if config is None:
        return None
    settings = _settings(config)
    settings.pop("init_from", None)  # as _configurations keeps a run's settings
    return settings, str(config.get("method", "?"))


def _varying(runs: pd.DataFrame, alike: list[str]) -> list[str]:
    """The settings that tell configurations apart among the runs equal in the columns `alike`."""
    names = set()
    for _, group in runs.groupby(alike, dropna=False):
        names |= varying_keys([json.loads(key) for key in group.configuration.unique()])
    return sorted(names)


def _settings_text(run, names: list[str]) -> str:
    """The run's value of each setting of `names`, "name=value", and its source for init_from ("from fp32")."""
    config = json.loads(run.configuration)
    return " ".join(run.source if n == "init_from" else f"{n}={config.get(n)}" for n in names)


def _failures_text(df: pd.DataFrame) -> str:
    """What the failed runs of a report without finished runs say: their count, and the first one's error
    (a grid whose every run fails usually fails for one reason)."""
    failed = df[df.status == "failed"] if not df.empty else df
    if failed.empty:
        return ""
    first = failed.iloc[0]
    error = str(first.error).strip().splitlines()[0] if isinstance(first.error, str) and first.error.strip() else "?"
    return (f"; {plural(len(failed), 'run')} failed, the first with: {error} "
            f"({pathlib.Path(first.dir) / 'failed.json'})")


def _unfinished_text(dirs: list[str]) -> str:
    """What stderr and report.md say of the unfinished runs, before naming them."""
    return f"{plural(len(dirs), 'unfinished run')} (no summary.json or failed.json) left out"


def _missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _int_text(x) -> str:
    """A width as text: "?" where a failed run's record does not give it."""
    if _missing(x):
        return "?"
    try:
        return str(int(x))
    except (TypeError, ValueError):
        return str(x)


def _fxp_label(r) -> str:
    """A run's configuration label: total/param frac/output frac bits, fp32, adapt or an MSQ name;
    "?" for what a failed run's record does not give (its grid relied on a default and fxp-train
    refused it before writing its config.json)."""
    if _missing(r.method):
        return "?"
    try:
        if r.method == "msq":
            return _msq_name(r)
        if r.method == "adapt":
            return _adapt_name(r.update)
        if r.method == "fp32":
            return "fp32"
    except (TypeError, ValueError):
        return f"{r.method} ?"
    return "/".join(_int_text(x) for x in (r.param_bits, r.param_frac, r.out_frac))


def _msq_name(r) -> str:
    """An MSQ configuration's label: "uniform 4b" for uniform quantization-aware
    training (λ = 0, α = 1: the widths never move), else "msq λ=… α=… from
    …b", with "no Hessian" when k is always 1 (a run that does not say is a
    Hessian run, fxp-train's default)."""
    if r.msq_lambda == 0 and not _missing(r.msq_alpha) and r.msq_alpha >= 1:
        return f"uniform {_int_text(r.msq_start_bits)}b"
    no_hessian = r.msq_hessian is False or r.msq_hessian == False  # noqa: E712 - numpy bools; NaN is neither
    lam, alpha = ("?" if _missing(x) else f"{x:g}" for x in (r.msq_lambda, r.msq_alpha))
    return (f"msq λ={lam} α={alpha} from {_int_text(r.msq_start_bits)}b"
            + (" no Hessian" if no_hessian else ""))


def _adapt_name(update: str) -> str:
    """AdaPT with a float32 master copy is "adapt"; without one, "adapt-qpu"."""
    return "adapt" if update == "float" else f"adapt-{update}"


def _adapt_title(update: str) -> str:
    """_adapt_name as a figure's title says it: "AdaPT", "AdaPT (qpu updates)"."""
    return "AdaPT" if update == "float" else f"AdaPT ({update} updates)"


# A heat map's cell: its figure (grid, inference rounding), panel (method), row (format) and column (batch size).
HEATMAP_CELL = ["grid", "method", "fxp", "inference_rounding", "batch_size"]


def seed_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Validation accuracy (each run's best epoch) over seeds, per configuration
    (_configurations'). variant: the settings that tell configurations apart
    within one heat-map cell, with their values, for every row of such a grid
    ("train_limit=512"; empty where each cell holds one configuration)."""
    done = df[df.status == "finished"].copy()
    done["variant"] = ""
    for _, runs in done.groupby("grid"):
        names = _varying(runs, HEATMAP_CELL)
        done.loc[runs.index, "variant"] = [_settings_text(r, names) for r in runs.itertuples()]
    keys = ["grid", "model", "dataset", "method", "fxp", "param_bits", "param_frac", "out_frac", "inference_rounding",
            "batch_size", "variant", "configuration"]
    g = done.groupby(keys, dropna=False)["best_val_accuracy"]
    stats = g.agg(max="max", min="min", mean="mean", std="std", runs="count").reset_index()
    return stats.drop(columns="configuration")


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported only when a figure is drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save_figure(fig, path: pathlib.Path, tight_layout: bool = True) -> pathlib.Path:
    """Writes fig to path at the report's resolution and frees it. The image
    grows to hold every title and label: a title wider than a narrow figure
    (one heat-map panel) would lose its ends."""
    if tight_layout:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _heatmap(ax, matrix: pd.DataFrame, title: str, fmt, vmin: float, vmax: float, cmap: str):
    """matrix as an image with each cell's value written in it: format(v, fmt), or fmt(v) where fmt is a
    function."""
    text = fmt if callable(fmt) else lambda v: format(v, fmt)
    values = matrix.to_numpy(dtype=float)
    im = ax.imshow(values, vmin=vmin, vmax=vmax, cmap=cmap, aspect="auto")
    ax.set_xticks(range(matrix.shape[1]), [str(c) for c in matrix.columns])
    ax.set_yticks(range(matrix.shape[0]), [str(i) for i in matrix.index])
    ax.set_title(title)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not math.isnan(values[i, j]):
                v = values[i, j]
                r, g, b, _ = im.cmap(im.norm(v))
                ax.text(j, i, text(v), ha="center", va="center", fontsize=7,
                        color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")
    return im


def _fxp_order(labels):
    return sorted(labels, key=lambda s: [-int(x) for x in s.split("/")])


def _variant_suffix(variant: str, variants) -> str:
    """A figure file name's suffix for one of `variants` (_settings_text's): "-train_limit=512", or
    "-variant<N>" (its place among them) where the settings make too long a name (a checkpoint's path, or
    many settings: the figure's title says them); empty for none."""
    if not variant:
        return ""
    suffix = "-" + re.sub(r"[^\w.=+-]+", "-", variant).strip("-")
    return suffix if len(suffix) <= 80 else f"-variant{sorted(set(variants)).index(variant) + 1}"


def draw_heatmaps(stats: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """One panel per method, numbers in the cells. A grid that varies the batch
    size (Exp 2/3) gets one figure per statistic (max, mean, std over seeds)
    with the configurations as rows and the batch sizes as columns (Figures
    5-10); otherwise (Exp 1) one figure per inference rounding with the
    configurations as rows and the best and worst run as columns (Figures 3-4).
    A grid whose cells hold several configurations (seed_stats' variant) gets
    these figures for each, its variant in the title and the file name."""
    plt = _pyplot()

    written = []
    q = stats[stats.method.isin(METHODS)]
    for (grid, variant), g in q.groupby(["grid", "variant"]):
        # The float32 runs of the same variant; of the grid where they have but one.
        baseline = stats[(stats.grid == grid) & (stats.method == "fp32")]
        if (baseline.variant == variant).any() or baseline.variant.nunique() > 1:
            baseline = baseline[baseline.variant == variant]
        by_batch = q[q.grid == grid].batch_size.nunique() > 1
        if by_batch:
            figures = [(stat, None) for stat in ["max", "mean", "std"]]
        else:
            figures = [(f"best-worst-{r}", r) for r in sorted(g.inference_rounding.dropna().unique())]
        suffix = _variant_suffix(variant, q.variant[q.grid == grid])
        for name, rounding in figures:
            sub = g if rounding is None else g[g.inference_rounding == rounding]
            methods = [m for m in METHODS if m in set(sub.method)]
            rows = _fxp_order(sub.fxp.unique())
            what = {"max": "max over seeds", "mean": "mean over seeds", "std": "std over seeds"}.get(
                name, f"best and worst run, {str(rounding).upper()} inference")
            # The grid's one float32 variant may be another than the figure's: then it says which.
            other = sorted(set(baseline.variant) - {variant})
            base_text = (f"; fp32 best {100 * baseline['max'].max():.1f}%" + (f" ({other[0]})" if other else "")
                         if not baseline.empty else "")
            # A variant of many settings on lines of its own: the image grows to the title's width.
            title = f"{grid}: validation accuracy, {what}{base_text}" + (
                f"\n{textwrap.fill(variant, 70)}" if variant else "")
            # Height for the title's lines, and for the y label beside one row.
            fig, axes = plt.subplots(1, len(methods), squeeze=False, sharey=True, constrained_layout=True,
                                     figsize=(1.2 + (0.55 * sub.batch_size.nunique() + 0.6 if by_batch else 1.9)
                                              * len(methods), 1.2 + 0.2 * title.count("\n") + 0.42 * max(len(rows), 2)))
            is_std = name == "std"
            for col, method in enumerate(methods):
                m = sub[sub.method == method]
                if by_batch:
                    matrix = m.pivot_table(index="fxp", columns="batch_size", values=name, aggfunc="first")
                    # Every batch size of the figure: pivot_table drops a column without values (the std of one
                    # seed), and a panel without columns draws nothing and warns of identical xlims.
                    matrix = matrix.reindex(index=rows, columns=sorted(sub.batch_size.unique(), reverse=True))
                    matrix.columns = [_int_text(b) for b in matrix.columns]  # 64, not 64.0 beside a failed run's NaN
                    xlabel = "batch size"
                else:
                    matrix = m.set_index("fxp")[["max", "min"]].rename(columns={"max": "best", "min": "worst"})
                    matrix = matrix.reindex(index=rows)
                    xlabel = ""
                ax = axes[0][col]
                im = _heatmap(ax, 100 * matrix, method.upper(), ".1f", 0, 20 if is_std else 100,
                              "viridis_r" if is_std else "viridis")
                ax.set_xlabel(xlabel)
            # On two lines: a few rows make a short figure.
            axes[0][0].set_ylabel("total / param frac /\noutput frac bits")
            fig.colorbar(im, ax=axes, shrink=0.9, label="std of accuracy (points)" if is_std else "accuracy (%)")
            fig.suptitle(title)
            written.append(_save_figure(fig, out / f"{grid}-{name}{suffix}.png", tight_layout=False))
    return written


def draw_memory_plot(df: pd.DataFrame, out: pathlib.Path) -> pathlib.Path | None:
    """Figure 11: best accuracy over seeds against the paper-model memory
    relative to fp32 training at the same batch size, for STE and SQPU; one
    point per configuration."""
    plt = _pyplot()

    done = df[(df.status == "finished") & df.method.isin(["ste", "sqpu"]) & df.memory_ratio_to_fp32.notna()]
    if done.empty:
        return None
    best = done.groupby(["grid", "method", "fxp", "batch_size", "configuration"], dropna=False).agg(
        accuracy=("best_val_accuracy", "max"), memory=("memory_ratio_to_fp32", "first")).reset_index()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (grid, method), g in best.groupby(["grid", "method"]):
        ax.scatter(g.memory, 100 * g.accuracy, label=f"{grid} {method.upper()}", alpha=0.8,
                   marker="o" if method == "sqpu" else "x")
    ax.set_xlabel("training memory relative to fp32 (paper accounting, docs/train.md)")
    ax.set_ylabel("max validation accuracy over seeds (%)")
    ax.set_title("Accuracy against memory (Figure 11)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_figure(fig, out / "memory-accuracy.png")


# The paper's stated numbers, with how to read the same quantity off our runs.
def _pick(stats, grid, method, stat, **where):
    s = stats[(stats.grid == grid) & (stats.method == method)]
    for k, v in where.items():
        s = s[s[k] == v]
    return float(s[stat].max()) if not s.empty else float("nan")


CLAIMS = [
    ("exp1", "fp32 baseline, best run", 0.90, lambda st: _pick(st, "exp1", "fp32", "max")),
    ("exp1", "fp32 baseline, worst run", 0.76, lambda st: _pick(st, "exp1", "fp32", "min")),
    ("exp1", "SQPU 16/10, SR inference, best run (equals STE's)", None,
     lambda st: _pick(st, "exp1", "sqpu", "max", fxp="16/10/10", inference_rounding="sr")),
    ("exp1", "STE 16/10, SR inference, best run", None,
     lambda st: _pick(st, "exp1", "ste", "max", fxp="16/10/10", inference_rounding="sr")),
    ("exp1", "HTEQPU 12/6, HTE inference, best run (paper: under 12% below 16 bits)", 0.12,
     lambda st: _pick(st, "exp1", "hteqpu", "max", fxp="12/6/6", inference_rounding="hte")),
    ("exp2", "fp32 baseline, batch 256, max over seeds", 0.92,
     lambda st: _pick(st, "exp2", "fp32", "max", batch_size=256)),
    ("exp2", "STE 16/10/8, batch 256, max", 0.92, lambda st: _pick(st, "exp2", "ste", "max", fxp="16/10/8",
                                                                   batch_size=256)),
    ("exp2", "SQPU 16/10/8, batch 256, max (paper: at least 91%)", 0.91,
     lambda st: _pick(st, "exp2", "sqpu", "max", fxp="16/10/8", batch_size=256)),
    ("exp2", "SQPU 8/5/3, batch 64, max (paper: 4 points below baseline)", 0.88,
     lambda st: _pick(st, "exp2", "sqpu", "max", fxp="8/5/3", batch_size=64)),
    ("exp3", "STE 6/4/2, max over batch sizes (paper: about 78%)", 0.78,
     lambda st: _pick(st, "exp3", "ste", "max", fxp="6/4/2")),
    ("exp3", "SQPU 16/10/8, batch 16, max (Fig. 11: near baseline at 0.57 of STE's memory)", 0.92,
     lambda st: _pick(st, "exp3", "sqpu", "max", fxp="16/10/8", batch_size=16)),
    ("exp3", "SQPU 12/8/6, batch 16, max (Fig. 11: 1.5 points below, under 0.50 of STE's memory)", 0.905,
     lambda st: _pick(st, "exp3", "sqpu", "max", fxp="12/8/6", batch_size=16)),
]


def _epochs(run_dir: str) -> list[dict]:
    """A run's metrics.jsonl, one record per epoch; a line that is not a JSON object is skipped with a warning."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        warn(path, f"cannot read it ({e})")
        return []
    epochs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            warn(f"{path} line {n}", f"not valid JSON ({e})")
            continue
        if not isinstance(record, dict):
            warn(f"{path} line {n}", f"expected a JSON object, got {type(record).__name__}")
            continue
        epochs.append(record)
    return epochs


# The runs that one AdaPT figure could stand for; "variant" tells their configurations apart.
ADAPT_FIGURE = ["grid", "model", "dataset", "batch_size", "update"]


def adapt_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished AdaPT run, beside the float32 run of the same grid,
    model, dataset, batch and seed: accuracies, and the performance model's
    SU1, SU2 (AdaPT stopped at the first epoch that reaches the float32 run's
    best accuracy; NaN if none does), SZ and the inference speed-up. variant:
    the settings that tell AdaPT configurations of one ADAPT_FIGURE apart
    ("adapt_buffer_bits=12"; empty where there is one)."""
    done = df[df.status == "finished"]
    keys = ["grid", "model", "dataset", "batch_size", "seed"]
    baseline = {tuple(r[k] for k in keys): r["best_val_accuracy"] for _, r in done[done.method == "fp32"].iterrows()}
    adapt = done[done.method == "adapt"]
    variants = pd.Series("", index=adapt.index, dtype=object)
    for _, group in adapt.groupby(ADAPT_FIGURE, dropna=False):  # as seed_stats, per group
        names = _varying(group, ADAPT_FIGURE)
        variants[group.index] = [_settings_text(r, names) for r in group.itertuples()]
    rows = []
    for i, r in adapt.iterrows():
        epochs = [e for e in _epochs(r["dir"]) if "adapt" in e]
        if not epochs:
            continue
        perf = epochs[-1]["adapt"]["performance"]
        target = baseline.get(tuple(r[k] for k in keys))
        su2 = math.nan
        if target is not None:
            reached = [e for e in epochs if e["val_accuracy"] >= target]
            if reached:
                su2 = perf["float32_cost"] / reached[0]["adapt"]["performance"]["cost"]
        rows.append({**{k: r[k] for k in keys}, "update": r["update"], "variant": variants[i], "dir": r["dir"],
                     "state_ratio_to_fp32": r["adapt_state_ratio_to_fp32"], "fp32_best_val_accuracy": target,
                     "best_val_accuracy": r["best_val_accuracy"], "su1": perf["training_speedup"], "su2": su2,
                     "model_size": perf["model_size"], "inference_speedup": perf["inference_speedup"]})
    return pd.DataFrame(rows)


def _figure_runs(table: pd.DataFrame):
    """adapt_table's runs that the AdaPT figures draw: the lowest seed of each
    configuration, with its ADAPT_FIGURE key, and its variant as a title's
    words and a file name's suffix (both empty where it has no variant)."""
    if table.empty:
        return
    for key, alike in table.groupby(ADAPT_FIGURE):
        for variant, group in alike.groupby("variant"):
            yield (key, f", {variant}" if variant else "", _variant_suffix(variant, alike.variant),
                   group.sort_values("seed").iloc[0])


def draw_adapt_bits(table: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """The bit width of every layer over training (the AdaPT paper's Figures 4
    and 5), for the lowest seed of each AdaPT configuration: each epoch's mean
    over its steps (from the cumulative bit_samples / samples), or the width at
    the epoch's end for runs that lack them."""
    plt = _pyplot()

    paths = []
    for (grid, model, dataset, batch, update), variant, suffix, run in _figure_runs(table):
        epochs = [e for e in _epochs(run["dir"]) if "adapt" in e]
        names = [layer["name"] for layer in epochs[0]["adapt"]["layers"]]
        fig, ax = plt.subplots(figsize=(7, 4))
        mean = all("bit_samples" in layer for layer in epochs[0]["adapt"]["layers"])
        for i, name in enumerate(names):
            if mean:
                bits, before = [], (0.0, 0)
                for e in epochs:
                    layer = e["adapt"]["layers"][i]
                    now = (layer["bit_samples"], layer["samples"])
                    bits.append((now[0] - before[0]) / max(now[1] - before[1], 1))
                    before = now
            else:
                bits = [e["adapt"]["layers"][i]["bits"] for e in epochs]
            ax.plot([e["epoch"] for e in epochs], bits, marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("mean bit width BW over the epoch" if mean else "bit width BW at the epoch's end")
        ax.set_title(f"{_adapt_title(update)} bit width per layer: {model} on {dataset}, batch {batch}, "
                     f"seed {run['seed']}{variant}", fontsize=10)
        if len(names) <= 12:
            ax.legend(fontsize=7, ncol=2)
        paths.append(_save_figure(
            fig, out / f"{_adapt_name(update).replace('adapt', 'adapt-bits', 1)}-{grid}-{model}-{dataset}-b{batch}"
                       f"{suffix}.png"))
    return paths


SATURATION_SHOWN_ABOVE = 0.01  # fxp-train's epoch line names the same layers (Note [Saturation in the epoch line])


def _percent_text(share: float) -> str:
    """A share in percent as a cell shows it: whole percents, and one decimal under 10% (0.4% is not 0,
    and a share under 0.05% shows as 0.0, not as an exact 0)."""
    return f"{share:.1f}" if 0 < share < 9.95 else f"{share:.0f}"


def _network_position(name: str, order: list[str]) -> tuple:
    """name's place in the network's layer order: its index, or for a layer that AdaPT's record leaves
    out (a block's residual add, "layer1_0.add"), just after the last layer of its block; the rest last."""
    if name in order:
        return order.index(name), 0, name
    block = name.rpartition(".")[0]
    mates = [i for i, other in enumerate(order) if block and other.rpartition(".")[0] == block]
    return (mates[-1], 1, name) if mates else (len(order), 1, name)


def saturation_matrix(run_dir: str) -> pd.DataFrame:
    """A run's layers that saturated more than 1% of their outputs in some
    epoch's validation (metrics.jsonl's output_saturated_fraction), in the
    network's order where AdaPT's record gives it (_network_position): their
    saturated share (%) per epoch. Empty when no layer did."""
    epochs = [e for e in _epochs(run_dir) if isinstance(e.get("layers"), dict) and type(e.get("epoch")) is int]
    shares = {}
    for e in epochs:
        for name, layer in e["layers"].items():
            share = layer.get("output_saturated_fraction") if isinstance(layer, dict) else None
            if _finite(share):
                shares.setdefault(name, {})[e["epoch"]] = share
    shown = [name for name, by_epoch in shares.items() if max(by_epoch.values()) > SATURATION_SHOWN_ABOVE]
    last = epochs[-1] if epochs else {}
    order = [layer.get("name") for layer in (_dig(last, "adapt", "layers") or []) if isinstance(layer, dict)]
    shown.sort(key=lambda name: _network_position(name, order))
    return pd.DataFrame([[100.0 * shares[name].get(e["epoch"], math.nan) for e in epochs] for name in shown],
                        index=shown, columns=[e["epoch"] for e in epochs], dtype=float)


def draw_adapt_saturation(table: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """For the lowest seed of each AdaPT configuration, saturation_matrix as a
    heat map, where some layer saturated more than 1% of its outputs. AdaPT
    sizes the outputs' range from the weights' integer bits plus the buffer
    bits; when the weights outgrow it, this shows where and when (docs/adapt.md,
    ResNet-20)."""
    paths = []
    for (grid, model, dataset, batch, update), variant, suffix, run in _figure_runs(table):
        matrix = saturation_matrix(run["dir"])
        if matrix.empty:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * matrix.shape[1] + 3.0), 0.3 * matrix.shape[0] + 1.6))
        im = _heatmap(ax, matrix, f"{_adapt_title(update)}: outputs saturated in validation (%), layers over "
                      f"{100 * SATURATION_SHOWN_ABOVE:g}%\n{model} on {dataset}, batch {batch}, seed {run['seed']}"
                      f"{variant}", _percent_text, 0.0, 100.0, "Reds")
        ax.title.set_fontsize(9)
        ax.set_xlabel("epoch")
        fig.colorbar(im, ax=ax, fraction=0.04)
        paths.append(_save_figure(
            fig, out / f"{_adapt_name(update).replace('adapt', 'adapt-saturation', 1)}-{grid}-{model}-{dataset}"
                       f"-b{batch}{suffix}.png"))
    return paths


def msq_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finished MSQ run, and the float32 runs of the same model and
    dataset (at compression 1): accuracies, the paper-style compression rate,
    the export's measured compression, and the final widths. The tables and
    plots use the final accuracy: the one at the final widths (an MSQ run's
    best epoch may come before its last cuts)."""
    done = df[(df.status == "finished") & df.method.isin(["msq", "fp32"])]
    models = set(zip(done[done.method == "msq"].model, done[done.method == "msq"].dataset))
    rows = []
    for _, r in done.iterrows():
        if (r["model"], r["dataset"]) not in models:
            continue
        bits = r["msq_bits"] if isinstance(r["msq_bits"], dict) else {}
        rows.append({"grid": r["grid"], "model": r["model"], "dataset": r["dataset"], "config": r["fxp"],
                     "seed": r["seed"], "dir": r["dir"], "best_val_accuracy": r["best_val_accuracy"],
                     "final_val_accuracy": r["final_val_accuracy"],
                     "compression_rate": r["msq_compression_rate"] if r["method"] == "msq" else 1.0,
                     "measured_compression": r["msq_measured_compression"] if r["method"] == "msq" else 1.0,
                     "min_bits": min(bits.values()) if bits else None, "max_bits": max(bits.values()) if bits else None,
                     "wall_time_s": r["wall_time_s"]})
    return pd.DataFrame(rows)


def draw_msq_bits(table: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """Each layer's bit width at the end of every epoch, as a layers x epochs
    map with the widths in the cells, for the lowest seed of each MSQ
    configuration (ResNet-20 has 22 layers: too many lines for one plot)."""
    plt = _pyplot()

    paths = []
    msq = table[table.config != "fp32"] if not table.empty else table
    for (grid, model, dataset, config), group in msq.groupby(["grid", "model", "dataset", "config"]):
        run = group.sort_values("seed").iloc[0]
        epochs = [e for e in _epochs(run["dir"]) if "msq" in e]
        if not epochs:
            continue
        names = [layer["name"] for layer in epochs[0]["msq"]["layers"]]
        matrix = pd.DataFrame([[e["msq"]["layers"][i]["bits"] for e in epochs] for i in range(len(names))],
                              index=names, columns=[e["epoch"] for e in epochs])
        fig, ax = plt.subplots(figsize=(max(6.0, 2.5 + 0.45 * matrix.shape[1]), max(3.0, 1.4 + 0.28 * matrix.shape[0])))
        im = _heatmap(ax, matrix, f"MSQ widths per layer: {model} on {dataset}\n{config}, seed {run['seed']}", ".0f", 0,
                      max(8, int(matrix.to_numpy().max())), "viridis")
        ax.title.set_fontsize(9)
        ax.set_xlabel("epoch (width at its end)")
        fig.colorbar(im, ax=ax, label="bits (sign not counted)")
        slug = config.replace(" ", "-").replace("λ=", "lambda").replace("α=", "alpha")
        paths.append(_save_figure(fig, out / f"msq-bits-{grid}-{model}-{dataset}-{slug}.png"))
    return paths


# MSQ's stated result (ResNet-20 on CIFAR-10), drawn beside the measured ones for scale.
MSQ_PAPER_POINT = ("MSQ paper, ResNet-20 on CIFAR-10", 20.13, 0.9215)


def draw_msq_tradeoff(table: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """Best validation accuracy against the compression rate, one marker per
    configuration (mean over seeds, the bars the min and max), per model and
    dataset; hollow markers give the export's measured compression."""
    plt = _pyplot()

    paths = []
    for (model, dataset), group in table.groupby(["model", "dataset"]):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        several_grids = group.grid.nunique() > 1
        for (grid, config), runs in sorted(group.groupby(["grid", "config"]),
                                           key=lambda kv: kv[1].compression_rate.mean()):
            acc = runs.final_val_accuracy
            x = runs.compression_rate.mean()
            label = f"{config} [{grid}]" if several_grids else config
            line = ax.errorbar([x], [acc.mean()], yerr=[[acc.mean() - acc.min()], [acc.max() - acc.mean()]],
                               fmt="o", capsize=3, label=f"{label} ({plural(len(runs), 'seed')})")
            if config != "fp32":
                ax.plot([runs.measured_compression.mean()], [acc.mean()], marker="o", mfc="none",
                        color=line[0].get_color())
        label, x, y = MSQ_PAPER_POINT
        ax.plot([x], [y], marker="*", markersize=12, color="black", linestyle="none", label=label)
        ax.set_xscale("log")
        ax.set_xlabel("compression rate vs float32 (filled: 32 / mean width; hollow: the export's measured size)")
        ax.set_ylabel("final validation accuracy (at the final widths)")
        ax.set_title(f"MSQ: accuracy against compression, {model} on {dataset}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        paths.append(_save_figure(fig, out / f"msq-accuracy-compression-{model}-{dataset}.png"))
    return paths


def _method_label(r) -> str:
    """A run's method as the comparison names it: AdaPT without a master copy is "adapt-qpu"."""
    return _adapt_name(r.update) if r.method == "adapt" else r.method


def _model_size(r) -> float:
    """The trained model's size relative to float32's (NaN where the run does
    not say): fp32 1; STE and the QPU methods their parameter width over 32;
    AdaPT its performance model's SZ (word lengths and sparsity at the end);
    MSQ its export's bytes over float32's (1 / measured compression)."""
    if r.method == "fp32":
        return 1.0
    if r.method in METHODS and not _missing(r.param_bits):
        return float(r.param_bits) / 32
    if r.method == "adapt" and not _missing(r.adapt_model_size):
        return float(r.adapt_model_size)
    if r.method == "msq" and not _missing(r.msq_measured_compression) and r.msq_measured_compression > 0:
        return 1.0 / float(r.msq_measured_compression)
    return math.nan


# The QPU paper's grids: their heat maps and tables compare their methods already.
PAPER_GRIDS = {"exp1", "exp2", "exp3"}
# Methods whose model size changes during training: their size is the final model's.
SIZE_AT_THE_END = {"adapt", "msq"}
# What the methods are compared within.
COMPARISON_GROUP = ["grid", "model", "dataset", "batch_size"]


def methods_table(df: pd.DataFrame) -> pd.DataFrame:
    """The methods side by side: one row per configuration of each grid,
    model, dataset and batch size that holds at least two methods (adapt and
    adapt-qpu count as two; the paper's grids exp1-exp3 are left to their
    own tables), over its seeds: the configurations of _configurations.
    A setting that tells two configurations of one method apart beyond its
    label is added to the label.

    accuracy is the model's whose size is given: the best epoch's for
    methods of a fixed size, the final epoch's for AdaPT and MSQ (whose size
    is the final model's); best_* is each run's best epoch whatever its
    size. Memory and images/s are against the same group's float32 runs
    (NaN without them)."""
    done = df[(df.status == "finished") & ~df.grid.isin(PAPER_GRIDS)].copy()
    if done.empty:
        return pd.DataFrame()
    done["model_size"] = [_model_size(r) for r in done.itertuples()]
    done["size_accuracy"] = [r.final_val_accuracy if r.method in SIZE_AT_THE_END else r.best_val_accuracy
                             for r in done.itertuples()]
    rows = []
    for key, group in done.groupby(COMPARISON_GROUP, dropna=False):
        if group.method_label.nunique() < 2:
            continue
        fp32 = group[group.method == "fp32"]
        memory_fp32 = pd.to_numeric(fp32.measured_step_bytes, errors="coerce").mean()
        speed_fp32 = pd.to_numeric(fp32.train_images_per_s, errors="coerce").mean()
        for label, runs in group.groupby("method_label"):
            # A setting joins the label where two configurations with one fxp label differ in it.
            varying = _varying(runs, ["fxp"])
            for _, g in runs.groupby("configuration"):
                first = g.iloc[0]
                extra = _settings_text(first, varying)
                acc = pd.to_numeric(g.size_accuracy, errors="coerce")
                memory = pd.to_numeric(g.measured_step_bytes, errors="coerce").mean()
                speed = pd.to_numeric(g.train_images_per_s, errors="coerce").mean()
                rows.append({**dict(zip(COMPARISON_GROUP, key)), "method": label,
                             "configuration": f"{first.fxp} {extra}".strip(), "runs": len(g),
                             "accuracy_mean": acc.mean(), "accuracy_std": acc.std(), "accuracy_min": acc.min(),
                             "accuracy_max": acc.max(),
                             "best_mean": pd.to_numeric(g.best_val_accuracy, errors="coerce").mean(),
                             "final_mean": pd.to_numeric(g.final_val_accuracy, errors="coerce").mean(),
                             "model_size": g.model_size.mean(), "step_memory_ratio": memory / memory_fp32,
                             "images_per_s": speed, "images_per_s_ratio": speed / speed_fp32})
    return pd.DataFrame(rows)


def draw_methods(table: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """Accuracy (methods_table's: mean over seeds, bars from the worst to the
    best seed) against model size, one point per configuration, coloured by
    method; one figure per grid, model, dataset and batch size. Where a
    configuration lies far below the others (more than 10 points), a second
    panel shows the 5 points below the best seed, where the others are told
    apart."""
    plt = _pyplot()
    paths = []
    for (grid, model, dataset, batch), g in table.groupby(COMPARISON_GROUP, dropna=False):
        g = g[g.model_size.notna()]
        if g.empty:
            continue
        top = 100 * g.accuracy_max.max()
        zoom = top - 100 * g.accuracy_min.min() > 10
        fig, axes = plt.subplots(1, 2 if zoom else 1, figsize=(12 if zoom else 7, 4.5), squeeze=False)
        colours = plt.get_cmap("tab10")
        for panel, ax in enumerate(axes[0]):
            low = top - 5 if panel == 1 else -math.inf
            for i, method in enumerate(sorted(g.method.unique())):
                m = g[(g.method == method) & (100 * g.accuracy_mean >= low)]
                mean = 100 * m.accuracy_mean
                ax.errorbar(m.model_size, mean, yerr=[mean - 100 * m.accuracy_min, 100 * m.accuracy_max - mean],
                            fmt="o", capsize=3, color=colours(i % 10), label=method)
                for r in m.itertuples():
                    if r.configuration != r.method:
                        ax.annotate(r.configuration, (r.model_size, 100 * r.accuracy_mean),
                                    textcoords="offset points", xytext=(4, 4), fontsize=7)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("model size / float32")
            ax.set_ylabel("validation accuracy (%)")
            ax.grid(True, alpha=0.3)
            if panel == 1:
                ax.set_ylim(top - 5, top + 0.5)
                ax.set_title("within 5 points of the best seed")
            else:
                ax.legend(fontsize=8)
        fig.suptitle(f"{grid}: {model} on {dataset}, batch {_int_text(batch)}")
        paths.append(_save_figure(fig, out / f"methods-{grid}-{model}-{dataset}-b{_int_text(batch)}.png"))
    return paths


def markdown_report(df: pd.DataFrame, stats: pd.DataFrame, images: list[pathlib.Path],
                    adapt: pd.DataFrame | None = None, msq: pd.DataFrame | None = None,
                    methods: pd.DataFrame | None = None) -> str:
    def pct(x):
        return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    grids = sorted(df.grid.unique())
    counts = [plural(int((df.status == "finished").sum()), "finished run"),
              f"{int((df.status == 'failed').sum())} failed"]
    repeats = int((df.status == "repeat").sum())
    if repeats:
        counts.append(f"{plural(repeats, 'repeat')} of a run before it (the same grid, settings and seed) left out")
    lines = ["# fxp sweep report", "",
             f"{', '.join(counts)}, in grid{'s' if len(grids) != 1 else ''} {', '.join(grids)}.", ""]
    unfinished = df.attrs.get("unfinished", [])
    if unfinished:
        lines += [f"{_unfinished_text(unfinished)}: {', '.join(f'`{d}`' for d in unfinished)}.", ""]
    # The paper's grids only; a grid whose cells hold several configurations gets a row for each.
    claims = []
    for grid, text, paper, measure in CLAIMS:
        for variant in sorted(set(stats.variant[stats.grid == grid])):
            measured = measure(stats[stats.variant == variant])
            if variant and math.isnan(measured):
                continue
            claims.append(f"| {grid}{f' ({variant})' if variant else ''} | {text} | {pct(paper)} | {pct(measured)} |")
    if claims:
        lines += ["## Beside the paper's stated numbers", "",
                  "| grid | quantity | paper | measured |", "| --- | --- | --- | --- |"] + claims + [""]
    lines += ["## Accuracy over seeds", "",
              "| grid | method | FxP | inference | batch | runs | max | mean | std | min |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in stats.sort_values(["grid", "method", "param_bits", "batch_size"],
                               ascending=[True, True, False, False]).itertuples():
        std = "–" if pd.isna(r.std) else f"{100 * r.std:.1f}"
        lines.append(f"| {r.grid} | {r.method} | {f'{r.fxp} {r.variant}'.strip()} | "
                     f"{r.inference_rounding if r.method != 'fp32' else '–'} | "
                     f"{r.batch_size} | {r.runs} | {pct(r.max)} | {pct(r.mean)} | {std} | {pct(r.min)} |")
    if adapt is not None and not adapt.empty:
        lines += ["", "## AdaPT (performance model, docs/adapt.md)", "",
                  "State: parameters, momentum and the controller's accumulators, each layer at its final width, "
                  "against float32 SGD's parameters and momentum; update qpu keeps no float32 master copy.", "",
                  "| grid | model | dataset | batch | update | seed | fp32 best | AdaPT best | SU¹ | SU² | SZ | "
                  "inference SU | state / fp32 |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in adapt.sort_values(["grid", "model", "dataset", "update", "variant", "seed"]).itertuples():
            su2 = "–" if math.isnan(r.su2) else f"{r.su2:.2f}"
            mem = "–" if pd.isna(r.state_ratio_to_fp32) else f"{r.state_ratio_to_fp32:.2f}"
            update = f"{r.update} {r.variant}".strip()
            lines.append(f"| {r.grid} | {r.model} | {r.dataset} | {r.batch_size} | {update} | {r.seed} | "
                         f"{pct(r.fp32_best_val_accuracy)} | {pct(r.best_val_accuracy)} | {r.su1:.2f} | {su2} | "
                         f"{r.model_size:.2f} | {r.inference_speedup:.2f} | {mem} |")
    if msq is not None and not msq.empty:
        lines += ["", "## MSQ (docs/msq.md)", "",
                  "Compression: 32 / the mean width of the quantized weights (the sign not counted, as the paper "
                  "reports it); measured: float32 model bytes / the export's bytes.", "",
                  "| grid | model | dataset | configuration | seeds | final accuracy (mean) | min | max | compression | "
                  "measured | widths |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for (grid, model, dataset, config), g in msq.groupby(["grid", "model", "dataset", "config"]):
            widths = "–" if g.min_bits.isna().all() else f"{int(g.min_bits.min())}–{int(g.max_bits.max())}"
            acc = g.final_val_accuracy
            lines.append(f"| {grid} | {model} | {dataset} | {config} | {len(g)} | {pct(acc.mean())} | "
                         f"{pct(acc.min())} | {pct(acc.max())} | "
                         f"{g.compression_rate.mean():.2f}× | {g.measured_compression.mean():.2f}× | {widths} |")
    if methods is not None and not methods.empty:
        def ratio(x):
            return "–" if pd.isna(x) else f"{x:.2f}"
        lines += ["", "## Methods compared", "",
                  "Over each configuration's seeds. Accuracy: the validation accuracy of the model whose size is "
                  "given: each run's best epoch for methods of a fixed size, its final epoch for AdaPT and MSQ, "
                  "whose size is the final model's (best: each run's best epoch, whatever its size then). Model "
                  "size against float32: STE and QPU their parameter width over 32, AdaPT its performance model's "
                  "SZ, MSQ its export's bytes. Step memory: what one training step held, measured "
                  "(docs/memory.md), against the float32 runs'; images/s: the runs' own measurement, comparable "
                  "when they shared one machine and its load. The QPU paper's grids (exp1-exp3) are left to the "
                  "tables above."]
        for (grid, model, dataset, batch), g in methods.groupby(COMPARISON_GROUP, dropna=False):
            lines += ["", f"**{grid}: {model} on {dataset}, batch {_int_text(batch)}**", "",
                      "| method | configuration | runs | accuracy | std | worst – best seed | best | final | "
                      "model size / fp32 | step memory / fp32 | images/s / fp32 |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for r in g.sort_values(["accuracy_mean"], ascending=False).itertuples():
                std = "–" if pd.isna(r.accuracy_std) else f"{100 * r.accuracy_std:.1f}"
                lines.append(f"| {r.method} | {r.configuration} | {r.runs} | {pct(r.accuracy_mean)} | {std} | "
                             f"{pct(r.accuracy_min)} – {pct(r.accuracy_max)} | {pct(r.best_mean)} | "
                             f"{pct(r.final_mean)} | {ratio(r.model_size)} | {ratio(r.step_memory_ratio)} | "
                             f"{ratio(r.images_per_s_ratio)} |")
    if images:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in images]
    return "\n".join(lines) + "\n"


def write_report(df: pd.DataFrame, out: pathlib.Path) -> list[pathlib.Path]:
    """Writes the tables, the figures and report.md of the runs `df` (collect's) into `out`, making it;
    returns the figures."""
    out.mkdir(parents=True, exist_ok=True)
    stats = seed_stats(df)
    runs = df.drop(columns=INTERNAL_COLUMNS, errors="ignore")
    for column in df.attrs.get("integer_columns", []):
        runs[column] = runs[column].astype("Int64")
    runs.to_csv(out / "runs.csv", index=False)
    stats.to_csv(out / "stats.csv", index=False)
    images = draw_heatmaps(stats, out)
    memory = draw_memory_plot(df, out)
    if memory:
        images.append(memory)
    adapt = adapt_table(df)
    if not adapt.empty:
        adapt.to_csv(out / "adapt.csv", index=False)
        images += draw_adapt_bits(adapt, out) + draw_adapt_saturation(adapt, out)
    msq = msq_table(df)
    if not msq.empty:
        msq.to_csv(out / "msq.csv", index=False)
        images += draw_msq_tradeoff(msq, out) + draw_msq_bits(msq, out)
    methods = methods_table(df)
    if not methods.empty:
        methods.to_csv(out / "methods.csv", index=False)
        images += draw_methods(methods, out)
    (out / "report.md").write_text(markdown_report(df, stats, images, adapt, msq, methods))
    return images


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("roots", nargs="+", type=pathlib.Path, help="directories holding run outputs")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/report"),
                   help="where the CSV, PNG and markdown files go (default: results/report)")
    args = p.parse_args(argv)
    _warned.clear()
    missing = [str(r) for r in args.roots if not r.is_dir()]
    if missing:
        print(f"report: not a directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    existing = next(q for q in (args.out, *args.out.parents) if q.exists())  # "." or "/" at the latest
    if not existing.is_dir():
        print(f"report: --out {args.out}: {existing} is not a directory", file=sys.stderr)
        return 2
    args.roots = unique_roots(args.roots)
    df = collect(args.roots)
    unfinished = df.attrs.get("unfinished", [])
    if unfinished:
        shown = ", ".join(unfinished[:10]) + (f" and {len(unfinished) - 10} more (report.md names them all)"
                                              if len(unfinished) > 10 else "")
        print(f"report: {_unfinished_text(unfinished)}: {shown}", file=sys.stderr)
    if df.empty or not (df.status == "finished").any():
        print(f"report: no finished runs (summary.json) below {', '.join(map(str, args.roots))}"
              f"{_failures_text(df)}", file=sys.stderr)
        return 1
    try:
        images = write_report(df, args.out)
    except OSError as e:  # a read-only or full file system; a full disk's error names no file: --out
        print(f"report: cannot write {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        # Flushed here, so that a closed pipe or a full disk shows now and not as a traceback at exit.
        print(f"report: {plural(len(df), 'run')} -> {args.out}/runs.csv, stats.csv, report.md and "
              f"{plural(len(images), 'figure')}",
              flush=True)
    except OSError as e:
        # Python's note on SIGPIPE: what is left in the buffer goes nowhere, or exit would fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(e, BrokenPipeError):  # the reader is gone (`report ... | head`): end quietly
            print(f"report: cannot write to stdout: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
