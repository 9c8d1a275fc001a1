"""Shared output of the benchmark scripts: each table goes to the terminal
(rich) and, in the same words, to a markdown report; rows go to CSV."""

from __future__ import annotations

import argparse
import csv
import math
import pathlib
import platform
import sys
from datetime import datetime, timezone
from typing import Callable

from rich.console import Console
from rich.table import Table

from argtypes import output_file, positive_number, whole_number


class BenchReport:
    def __init__(self, header: str, notes: str) -> None:
        self.console = Console(width=120)
        self.console.print(header)
        self.markdown = [f"### {header}", "", notes, ""]

    def table(self, title: str, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for c in columns:
            table.add_column(c, justify="right")
        self.markdown += [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            table.add_row(*row)
            self.markdown.append("| " + " | ".join(row) + " |")
        self.markdown.append("")
        self.console.print(table)

    def save(self, path: str | None) -> None:
        if path:
            # Its directory made, as write_csv's: a missing one would lose minutes of measuring here.
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as fh:
                fh.write("\n".join(self.markdown) + "\n")
            self.console.print(f"wrote {path}")


def add_timing_args(parser: argparse.ArgumentParser, min_run_time: float) -> None:
    """The arguments of the benchmarks that time ops in this process: --device, --min-run-time,
    --threads and --markdown."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--min-run-time", type=positive_number, default=min_run_time,
                        help=f"seconds per measurement (default {min_run_time:g})")
    parser.add_argument("--threads", type=whole_number(1), default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--markdown", type=output_file, help="also write the tables to this markdown file")


def apply_timing_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Checks --device and --threads, sets the threads, and returns what a report's header says of
    the run: device (its name, threads), torch version, date."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    return (f"{args.device} ({name}, {torch.get_num_threads()} threads), torch {torch.__version__}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d}")


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """Rows of dicts (the keys of the first are the columns) as a CSV file, making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def finish(script: str, report: BenchReport, markdown, csv, rows: list[dict], measured: str,
           point: Callable[[dict], str]) -> int:
    """A benchmark's end: the markdown report, the CSV of the rows whose `measured` column is a number
    (a failed point has NaN there, which sweep --estimate could not use), and the exit code: 1, after
    naming the failed points (`point` says which point a row measured), when some failed."""
    report.save(str(markdown) if markdown else None)
    good = [r for r in rows if not math.isnan(r[measured])]
    failed = [point(r) for r in rows if math.isnan(r[measured])]
    if csv and good:
        write_csv(csv, good)
    if failed:
        what = f"every point ({len(failed)})" if len(failed) == len(rows) else f"{len(failed)} of {len(rows)} points"
        print(f"{script}: {what} failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
