"""Shared output of the benchmark scripts: each table goes to the terminal
(rich) and, in the same words, to a markdown report."""

from __future__ import annotations

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
