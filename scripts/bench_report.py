"""Shared output of the benchmark scripts: each table goes to the terminal
(rich) and, in the same words, to a markdown report; rows go to CSV."""

from __future__ import annotations

import csv
import pathlib

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
