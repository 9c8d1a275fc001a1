"""Reading the benchmark scripts' CSV files (bench_train's and bench_fleet's for
sweep --estimate, memory_table's for its table): rows with their row numbers,
and errors that name the row and the field. Standard library only, so a reader
pulls in no other dependency."""
from __future__ import annotations

import csv


def device_kind(device: str | None) -> str:
    """cpu or cuda: what a measurement's device says of a run's speed (cuda:1 runs as fast as cuda)."""
    return (device or "").partition(":")[0]


def shown(text) -> str:
    """A CSV field as an error message shows it: a missing or empty one is "nothing"."""
    return text if text else "nothing"


def read_rows(path, columns: tuple[str, ...], device: str | None = None, bench: str = "") -> list[tuple[int, dict]]:
    """The rows of a CSV file whose header holds `columns` (and maybe more, as an optional model), each
    with its row number in the file (the header is row 1). With `device`, only the rows measured on its
    kind (device_kind) where the table has a device column (bench_train's and bench_fleet's have): a
    CPU's images/s would price GPU runs, or the reverse. A file that cannot be read, a missing column, a
    malformed file, or a table without a row of `device` (`bench`, the script that measures one, is
    named) is a ValueError."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            try:
                header = reader.fieldnames or []  # none in an empty file: no measurements
                missing = [c for c in columns if c not in header]
                if header and missing:
                    raise ValueError(f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
                rows = [(reader.line_num, row) for row in reader]
            except csv.Error as e:
                raise ValueError(f"row {reader.line_num}: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError as e:  # a binary file
        raise ValueError(f"cannot read it: not UTF-8 text (byte {e.start}: {e.reason})") from None
    if device is None or "device" not in header:
        return rows
    kept = [(n, row) for n, row in rows if device_kind(row["device"]) == device_kind(device)]
    if rows and not kept:
        measured = sorted({shown(device_kind(row["device"])) for _, row in rows})
        raise ValueError(f"no measurements on {device_kind(device)}, the runs' device (the table has "
                         f"{', '.join(measured)}); measure it with {bench} --device {device_kind(device)}")
    return kept
