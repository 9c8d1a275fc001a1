"""Shared output of the benchmark scripts: each table goes to the terminal
(rich) and, in the same words, to a markdown report; rows go to CSV."""

from __future__ import annotations

import csv
import pathlib
import sys

from rich.console import Console
from rich.table import Table


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
            with open(path, "w") as fh:
                fh.write("\n".join(self.markdown) + "\n")
            self.console.print(f"wrote {path}")


def write_csv(path: pathlib.Path, rows: list[dict]) -> None:
    """Rows of dicts (the keys of the first are the columns) as a CSV file, making its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def finish(script: str, report: BenchReport, markdown, csv, rows: list[dict], measured: str,
           failed: list[str]) -> int:
    """A benchmark's end: the markdown report, the CSV of the rows whose `measured` column is a number
    (a failed point has NaN there, which sweep --estimate could not use), and the exit code: 1, after
    naming them, when some points failed."""
    import math
    report.save(str(markdown) if markdown else None)
    good = [r for r in rows if not math.isnan(r[measured])]
    if csv and good:
        write_csv(csv, good)
    if failed:
        print(f"{script}: {len(failed)} points failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
