#!/usr/bin/env python3
"""Benchmark fxp.quantize against baselines measured in the same run.

For each size, times (median of torch.utils.benchmark's blocked_autorange):
  clone          x.clone(), the memory-bandwidth ceiling (one read, one write)
  fxp HTE/SR     fxp.quantize, nearest_even and stochastic (default generator)
  torch HTE/SR   the composite: mul/round/clamp/div, and mul/add rand_like/floor/clamp/div
  fake_quant     torch.fake_quantize_per_tensor_affine (HTE only)
  qtorch HTE/SR  QPyTorch's fixed_point_quantize, nearest and stochastic
  fxp pack HTE/SR  fxp.pack, the same rounding into integer codes (int8 at 8 bits)
  fxp unpack     fxp.unpack of those codes back to float32
and prints GB/s (bytes read + written, each method's own), each method's time
relative to clone, and fxp's speed-up over each baseline. --markdown writes the
same tables.
"""

from __future__ import annotations

import argparse
import sys

import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich")
from bench_report import BenchReport, add_timing_args, apply_timing_args


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(float(s)) for s in text.split(",") if s]
    except (ValueError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"expected numbers like 1e4,1e6, got {text!r}")
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("every size must be positive")
    return sizes


def parse_format(text: str) -> tuple[int, int]:
    """--format TOTAL,FRAC: two whole numbers (fxp.FxpFormat checks their ranges); argparse reports anything else."""
    try:
        total, frac = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TOTAL,FRAC, two whole numbers such as 8,4, got {text!r}") from None
    return total, frac


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1e4,1e5,1e6,1e7,1e8"),
                        help="comma-separated element counts (default 1e4,1e5,1e6,1e7,1e8)")
    parser.add_argument("--format", type=parse_format, default="8,4", help="TOTAL,FRAC bits (default 8,4)")
    parser.add_argument("--no-qtorch", action="store_true", help="leave QPyTorch out")
    add_timing_args(parser, min_run_time=0.3)
    return parser


if __name__ == "__main__":
    make_parser().parse_args()  # --help and bad arguments answer before torch loads (seconds)

import torch  # noqa: E402
import torch.utils.benchmark as tbench  # noqa: E402

import fxp  # noqa: E402

TARGETS = {
    "cpu": "HTE and SR within 1.5x of clone at >= 1e7 elements; >= 3x faster than the torch composite and QPyTorch",
    "cuda": ">= 85% of clone bandwidth; >= 2.5x QPyTorch",
}


def load_qtorch():
    try:
        from qtorch.quant import fixed_point_quantize  # JIT-builds its extension on first import
    except Exception as exc:  # noqa: BLE001 - any failure means "baseline unavailable"
        print(f"QPyTorch unavailable, skipping it: {exc}", file=sys.stderr)
        return None
    return fixed_point_quantize


def methods(fmt: fxp.FxpFormat, qtorch_fpq):
    b, f = fmt.total_bits, fmt.frac_bits
    scale, lo, hi = float(2**f), float(fmt.code_min), float(fmt.code_max)

    def torch_hte(x):
        return torch.clamp(torch.round(x * scale), lo, hi) / scale

    def torch_sr(x):
        return torch.clamp(torch.floor(x * scale + torch.rand_like(x)), lo, hi) / scale

    table = {
        "clone": lambda x: x.clone(),
        "fxp HTE": lambda x: fxp.quantize(x, b, f),
        "fxp SR": lambda x: fxp.quantize(x, b, f, "stochastic"),
        "torch HTE": torch_hte,
        "torch SR": torch_sr,
        "fake_quant HTE": lambda x: torch.fake_quantize_per_tensor_affine(x, 2.0**-f, 0, int(lo), int(hi)),
    }
    if qtorch_fpq is not None:
        table["qtorch HTE"] = lambda x: qtorch_fpq(x, b, f, rounding="nearest")
        table["qtorch SR"] = lambda x: qtorch_fpq(x, b, f, rounding="stochastic")
    # Packed storage's two ends: they round as quantize does (the speed-up
    # columns compare them with it) but write or read the narrower codes.
    table["fxp pack HTE"] = lambda x: fxp.pack(x, b, f)
    table["fxp pack SR"] = lambda x: fxp.pack(x, b, f, "stochastic")
    return table


def bytes_moved(name: str, x, codes) -> int:
    """Bytes read plus written by one call of ``name`` on ``x``: pack and unpack move a float and a code."""
    if name.startswith("fxp pack") or name == "fxp unpack":
        return x.numel() * (x.element_size() + codes.element_size())
    return 2 * x.numel() * x.element_size()


def time_one(fn, x, min_run_time: float) -> float:
    # Timer runs on one thread unless told: time with the threads the header reports.
    timer = tbench.Timer(stmt="fn(x)", globals={"fn": fn, "x": x}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    run = apply_timing_args(parser, args)
    try:
        fmt = fxp.FxpFormat(*args.format)
    except (TypeError, ValueError) as exc:
        parser.error(f"--format: {exc}")

    qtorch_fpq = None if args.no_qtorch else load_qtorch()
    fns = methods(fmt, qtorch_fpq)
    header = f"fxp quantize benchmark, {fmt}, float32, {run}"
    report = BenchReport(header, f"Targets: {TARGETS[args.device]}.")
    for n in args.sizes:
        x = torch.randn(n, device=args.device)
        codes = fxp.pack(x, fmt)
        fns_n = {**fns, "fxp unpack": lambda _x: fxp.unpack(codes, fmt)}
        times = {name: time_one(fn, x, args.min_run_time) for name, fn in fns_n.items()}
        rows = []
        for name, t in times.items():
            hte = f"{t / times['fxp HTE']:.2f}x" if "HTE" in name or name == "clone" else ""
            sr = f"{t / times['fxp SR']:.2f}x" if "SR" in name or name == "clone" else ""
            moved = bytes_moved(name, x, codes)
            rows.append([name, f"{t * 1e6:.1f}", f"{moved / t / 1e9:.1f}", f"{t / times['clone']:.2f}", hte, sr])
        report.table(f"{n:.0e} elements, float32 ({2 * n * x.element_size() / 1e6:.1f} MB read + written by clone)",
                     ["method", "time (us)", "GB/s", "time / clone", "fxp HTE speed-up", "fxp SR speed-up"], rows)
    report.save(args.markdown)

if __name__ == "__main__":
    main()
