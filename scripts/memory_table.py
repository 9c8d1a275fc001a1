#!/usr/bin/env python3
"""Measured training memory per method, bit width and batch size, with and
without packed storage (issue 6), beside the paper's model (Eq. 5).

Each cell is a short fxp-train run; fxp-train measures one training step by
category (parameters, gradients, optimizer state, activations) from the
allocator (CPU: its tracking allocator, exact; CUDA: the caching allocator).
Writes a CSV, a markdown table (replacing the block between the
`<!-- memory-table -->` markers of --markdown, or printing it) and a figure.

  scripts/memory_table.py --csv docs/memory.csv --markdown docs/memory.md --figure docs/figures/memory.png
"""
from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich", "matplotlib", "tqdm")
from argtypes import output_file, whole_number  # noqa: E402
from bench_report import write_csv  # noqa: E402
from measurement_csv import read_rows, shown  # noqa: E402

BITS = (32, 16, 12, 8)
BATCHES = (16, 256)
METHODS = ("fp32", "ste", "sqpu", "hteqpu")
MARKER = "<!-- memory-table -->"
CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations")
# The columns of a --csv file that the table and the figure read.
COLUMNS = ("method", "bits", "batch_size", "packed", *(f"{c}_bytes" for c in CATEGORIES), "total_bytes",
           "step_peak_bytes", "model_paper_bytes")


def cells(bits=BITS, batches=BATCHES):
    """(method, bits, batch, packed) for every cell; fp32 has no bit width and nothing to pack."""
    for batch in batches:
        yield "fp32", 32, batch, False
        for method in METHODS[1:]:
            for b in bits:
                for packed in (False, True):
                    yield method, b, batch, packed


def measure(fxp_train: str, method: str, bits: int, batch: int, packed: bool, device: str, data_dir: str | None):
    # Formats only choose the storage type; fractions as in the paper's Exp 2 style.
    param_frac, out_frac = max(bits - 6, 0), max(bits - 8, 0)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [fxp_train, "--method", method, "--param-bits", str(bits), "--param-frac", str(param_frac),
               "--out-bits", str(bits), "--out-frac", str(out_frac), "--batch-size", str(batch),
               "--epochs", "1", "--train-limit", str(2 * batch), "--val-limit", "100", "--device", device,
               "--threads", "1", f"--packed={'true' if packed else 'false'}", "-o", tmp, "--quiet"]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        try:
            p = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise SystemExit(f"memory_table.py: cannot run {fxp_train}: {e.strerror or e}") from None
        if p.returncode != 0:  # one line, fxp-train's own first (a usage error ends "Run with --help"): the
            # other cells would fail alike
            why = next((line.strip() for line in p.stderr.splitlines() if line.strip()), "no message")
            raise SystemExit(f"memory_table.py: fxp-train failed (exit {p.returncode}) on {method}, {bits} bits, "
                             f"batch {batch}, {'packed' if packed else 'float'} storage: {why}")
        sys.stderr.write(p.stderr)  # its warnings, as before
        summary = json.loads((pathlib.Path(tmp) / "summary.json").read_text())
    step = summary["measured_memory"]["step"]
    row = {"method": method, "bits": bits if method != "fp32" else 32, "batch_size": batch, "packed": packed,
           "device": device}
    row.update({f"{c}_bytes": step[f"{c}_bytes"] for c in CATEGORIES})
    row["total_bytes"] = step["total_bytes"]
    row["step_peak_bytes"] = step["step_peak_bytes"]
    for accounting in ("paper", "full"):
        row[f"model_{accounting}_bytes"] = summary["memory_model"][accounting]["total_bytes"]
    return row


def read_csv(path: pathlib.Path) -> list[dict]:
    """The rows of a CSV that --csv wrote. A ValueError that says what is wrong (and in which row) where
    the file cannot be read, lacks a column of COLUMNS, holds no rows, or a value that is not one."""
    rows = []
    for n, r in read_rows(path, COLUMNS):
        if r["packed"] not in ("True", "False"):
            raise ValueError(f"row {n}: packed must be True or False, got {shown(r['packed'])}")
        r["packed"] = r["packed"] == "True"
        for k in r:
            if k in ("bits", "batch_size") or (isinstance(k, str) and k.endswith("_bytes")):
                try:
                    r[k] = float(r[k]) if "." in r[k] else int(r[k])
                except (TypeError, ValueError):  # TypeError: a short row's missing field
                    raise ValueError(f"row {n}: {k} must be a number, got {shown(r[k])}") from None
        rows.append(r)
    if not rows:
        raise ValueError("holds no rows")
    return rows


def kb(x: float) -> str:
    return f"{x / 1e3:,.0f}"


def markdown(rows: list[dict]) -> str:
    """One table per batch size; ratios to STE with float storage (the usual STE) at the same bits."""
    out = []
    for batch in sorted({r["batch_size"] for r in rows}):
        sub = [r for r in rows if r["batch_size"] == batch]
        ste = {r["bits"]: r for r in sub if r["method"] == "ste" and not r["packed"]}
        out += [f"**Batch {batch}** (kB; ratio = total / STE's total with float storage at the same bits; "
                f"the paper's model gives the same ratio from Eq. 5)", "",
                "| method | bits | storage | parameters | gradients | optimizer state | activations | total "
                "| peak | ratio to STE | paper model ratio |",
                "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in sub:
            base = ste.get(r["bits"])
            ratio = f"{r['total_bytes'] / base['total_bytes']:.3f}" if base else "–"
            paper = f"{r['model_paper_bytes'] / base['model_paper_bytes']:.3f}" if base else "–"
            bits = "–" if r["method"] == "fp32" else str(r["bits"])
            out.append(f"| {r['method']} | {bits} | {'packed' if r['packed'] else 'float'} | "
                       f"{kb(r['parameters_bytes'])} | {kb(r['gradients_bytes'])} | {kb(r['optimizer_state_bytes'])} | "
                       f"{kb(r['activations_bytes'])} | {kb(r['total_bytes'])} | {kb(r['step_peak_bytes'])} | "
                       f"{ratio} | {paper} |")
        out.append("")
    return "\n".join(out)


def figure(rows: list[dict], path: pathlib.Path, bits: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch_size"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.2))
    axes = [axes] if len(batches) == 1 else axes
    colors = ("#4c72b0", "#dd8452", "#55a868", "#c44e52")
    for ax, batch in zip(axes, batches):
        sub = [r for r in rows if r["batch_size"] == batch and (r["method"] == "fp32" or r["bits"] == bits)]
        labels = [r["method"].upper() if r["method"] != "fp32" else "fp32" for r in sub]
        labels = [f"{l}\n{'packed' if r['packed'] else 'float'}" for l, r in zip(labels, sub)]
        bottom = [0.0] * len(sub)
        for cat, color in zip(CATEGORIES, colors):
            values = [r[f"{cat}_bytes"] / 1e6 for r in sub]
            ax.bar(range(len(sub)), values, bottom=bottom, color=color, label=cat.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, values)]
        ax.scatter(range(len(sub)), [r["step_peak_bytes"] / 1e6 for r in sub], marker="_", s=600, color="black",
                   linewidths=2, label="step peak", zorder=3)
        ax.set_xticks(range(len(sub)), labels, fontsize=8)
        ax.set_ylabel("MB per training step")
        ax.set_title(f"batch {batch}, {bits}-bit parameters and outputs")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--fxp-train", default=str(ROOT / "build" / "fxp-train"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--bits", type=whole_number(2, 32), nargs="+", default=list(BITS),
                   help="total bits of parameters and outputs, fxp-train's 2 to 32")
    p.add_argument("--batch-sizes", type=whole_number(1), nargs="+", default=list(BATCHES))
    p.add_argument("--csv", type=output_file, help="write the rows here")
    p.add_argument("--markdown", type=pathlib.Path, help="replace the table between the markers of this file")
    p.add_argument("--figure", type=output_file, help="stacked bars at 16 bits")
    p.add_argument("--from-csv", type=pathlib.Path, help="redraw the table and figure from this CSV; run nothing")
    args = p.parse_args(argv)
    if args.markdown:  # before the measuring: the table would be lost after minutes of it
        try:
            text = args.markdown.read_text()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--markdown {args.markdown}: cannot read it: {getattr(e, 'strerror', None) or e}")
        if text.count(MARKER) != 2:
            p.error(f"{args.markdown} must hold two {MARKER} lines around the table")
    if args.from_csv:
        try:
            rows = read_csv(args.from_csv)
        except ValueError as e:
            p.error(f"--from-csv {args.from_csv}: {e}")
    else:
        if not pathlib.Path(args.fxp_train).exists():
            p.error(f"{args.fxp_train} does not exist; build it with scripts/setup.sh")
        from tqdm import tqdm

        todo = list(cells(args.bits, args.batch_sizes))
        with tqdm(todo, desc="memory", unit="run") as bar:  # closed before an error's line, not beside it
            rows = [measure(args.fxp_train, m, b, n, packed, args.device, args.data_dir) for m, b, n, packed in bar]
    if args.csv and not args.from_csv:
        write_csv(args.csv, rows)
    table = markdown(rows)
    if args.markdown:
        head, _, tail = text.split(MARKER)
        args.markdown.write_text(f"{head}{MARKER}\n{table}\n{MARKER}{tail}")
    else:
        print(table)
    if args.figure:
        figure(rows, args.figure, bits=16 if 16 in args.bits else args.bits[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
