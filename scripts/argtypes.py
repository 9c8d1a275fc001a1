"""argparse types shared by the sweep and the benchmark scripts: a bad number is a usage error
(exit 2) that names the flag, never a traceback or a silently odd run."""

from __future__ import annotations

import argparse
import math
import pathlib


def positive_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; argparse reports anything else."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, but got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be at least 1, but got {text!r}")
    return values


def whole_number(minimum: int, maximum: int | None = None):
    """An argparse type: a whole number of at least `minimum` (repeats, steps, sizes; threads from 0), and
    at most `maximum` where given (bit widths)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if n < minimum or (maximum is not None and n > maximum):
            wanted = f"at least {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {n}")
        return n
    return parse


def positive_number(text: str) -> float:
    """An argparse type: a positive finite number (seconds, parameter counts); NaN and infinity are not."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return x


def output_file(text: str) -> pathlib.Path:
    """An argparse type: a file a script writes at its end (--csv, --markdown, --figure), checked before
    anything is measured: not a directory, and under a directory (its missing directories are made when it
    is written, by write_csv and BenchReport.save), not under a regular file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a file name, got an empty one")
    path = pathlib.Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory")
    existing = nearest_existing(path.parent)
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {existing} is not a directory")
    return path


def nearest_existing(path: pathlib.Path) -> pathlib.Path:
    """`path` or its nearest ancestor that exists ("." or "/" at the latest): a directory where `path` can be
    made (an output file's folder, the sweep's --out), or not."""
    return next(p for p in (path, *path.parents) if p.exists())
