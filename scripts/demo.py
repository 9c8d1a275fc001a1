#!/usr/bin/env python3
"""A demo of the quantize operators (scripts/demo.sh; the main job is
scripts/train.sh): quantize tensors with round-half-to-even and with
stochastic rounding in a few FxP formats, and print the error statistics.

The last rows show the paper's point: an update far smaller than one LSB
vanishes under round-half-to-even but survives, on average, under stochastic rounding.
"""

from __future__ import annotations

import argparse

import project_env  # restarts under the project's Python where this one lacks a module

project_env.ensure(__name__, "torch", "rich")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=1 << 22, help="elements per tensor (default: 2^22)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data and the Philox stream")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    args = parser.parse_args()
    if args.numel <= 0:
        parser.error("--numel must be positive")
    # After the arguments: --help needs neither torch nor the built extension.
    import torch
    from rich.console import Console
    from rich.table import Table

    import fxp

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")

    torch.manual_seed(args.seed)
    x = torch.randn(args.numel, device=args.device)
    table = Table(title=f"fxp: quantizing {args.numel:,} N(0,1) values on {args.device}")
    for col in ("format", "input", "rounding", "bias", "mean |err|", "max |err|", "saturated"):
        table.add_column(col, justify="right")

    cases = [(fxp.FxpFormat(16, 10), x), (fxp.FxpFormat(8, 4), x), (fxp.FxpFormat(8, 5), x)]
    tiny = torch.full_like(x, 0.3 * fxp.FxpFormat(8, 4).resolution)  # 0.3 LSB, like a small SGD update
    cases.append((fxp.FxpFormat(8, 4), tiny))
    for fmt, data in cases:
        for rounding in ("nearest_even", "stochastic"):
            y, saturated = fxp.quantize_seeded_stats(data, fmt, rounding=rounding, seed=args.seed)
            err = (y - data).double()
            table.add_row(str(fmt), "N(0,1)" if data is x else "0.3 LSB", "HTE" if rounding == "nearest_even" else "SR", f"{err.mean().item():+.2e}", f"{err.abs().mean().item():.2e}",
                          f"{err.abs().max().item():.2e}", f"{int(saturated):,}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=100)  # rich would wrap a piped table at 80 columns
    console.print(table)
    console.print("bias = mean(q(x) - x). HTE has the smaller error per value, but it rounds a 0.3-LSB value "
                  "to 0 every time; SR keeps its mean, which is why the paper's SQPU keeps learning at 8 bits.")


if __name__ == "__main__":
    main()
