#!/usr/bin/env python3
"""Benchmark fxp's fused ReLU + 2x2 max-pool against ATen's pair, measured in the same run.

For the pooled layers of the paper's CNN (conv1's [N, 32, 24, 24] and conv2's
[N, 64, 8, 8] outputs) at a few batch sizes, it times (median of
torch.utils.benchmark's blocked_autorange):
  torch   F.max_pool2d(F.relu(x), 2)
  fxp     fxp.ops.relu_max_pool2d(x, 2)
each as a forward alone (no grad) and as forward plus backward, and prints
ATen's time over fxp's (above 1: fxp is faster). Both give the same values and
gradient bits (tests/python/test_packed.py); fxp-train pools with fxp's.
"""

from __future__ import annotations

import argparse

from argtypes import positive_list
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich")
from bench_report import BenchReport, add_timing_args, apply_timing_args


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=positive_list, default=positive_list("1,16,64,256"),
                        help="comma-separated (default 1,16,64,256)")
    add_timing_args(parser, min_run_time=0.5)
    return parser


if __name__ == "__main__":
    make_parser().parse_args()  # --help and bad arguments answer before torch loads (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.benchmark as tbench  # noqa: E402

import fxp  # noqa: E402,F401  (registers torch.ops.fxp)


def pools():
    def torch_pool(x):
        return F.max_pool2d(F.relu(x), 2)

    def fxp_pool(x):
        return torch.ops.fxp.relu_max_pool2d(x, [2, 2])

    return {"torch": torch_pool, "fxp": fxp_pool}


def time_it(fn, x, grad, backward, device, min_run_time):
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward_only():
        with torch.no_grad():
            fn(x)
        sync()

    def forward_backward():
        x.grad = None
        fn(x).backward(grad)
        sync()

    step = forward_backward if backward else forward_only
    step()
    timer = tbench.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    run = apply_timing_args(parser, args)
    batches = args.batch_sizes

    header = f"fxp ReLU + 2x2 max-pool benchmark, float32, {run}"
    report = BenchReport(header, "Speed-up = ATen's time / fxp's, measured in the same run; the same values and "
                                 "gradient bits.")
    rows = []
    for shape in ([32, 24, 24], [64, 8, 8]):
        for n in batches:
            gen = torch.Generator().manual_seed(n)
            x = torch.randn([n, *shape], generator=gen).to(args.device).requires_grad_()
            grad = torch.randn([n, shape[0], shape[1] // 2, shape[2] // 2], generator=gen).to(args.device)
            t = {(name, bwd): time_it(fn, x, grad, bwd, args.device, args.min_run_time)
                 for name, fn in pools().items() for bwd in (False, True)}
            rows.append([f"[{n}, {', '.join(map(str, shape))}]",
                         f"{t['torch', False] * 1e6:.1f}", f"{t['fxp', False] * 1e6:.1f}",
                         f"{t['torch', False] / t['fxp', False]:.2f}x",
                         f"{t['torch', True] * 1e6:.1f}", f"{t['fxp', True] * 1e6:.1f}",
                         f"{t['torch', True] / t['fxp', True]:.2f}x"])
    report.table("ReLU + 2x2 max-pool", ["input", "torch forward (us)", "fxp forward (us)", "forward speed-up",
                                         "torch fwd+bwd (us)", "fxp fwd+bwd (us)", "fwd+bwd speed-up"], rows)
    report.save(args.markdown)


if __name__ == "__main__":
    main()
