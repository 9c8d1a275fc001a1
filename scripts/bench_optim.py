#!/usr/bin/env python3
"""Benchmark the fused QPU SGD step against torch's SGD, measured in the same run.

For two parameter sets (the paper's CNN, 184,490 parameters in 6 tensors, and
a large set of about 1e8 parameters in a few hundred tensors) it times one
optimizer step (median of torch.utils.benchmark's blocked_autorange) of:
  torch SGD foreach   torch.optim.SGD(momentum=0.9, foreach=True)
  torch SGD fused     torch.optim.SGD(momentum=0.9, fused=True)
  fxp SQPU / HTEQPU   fxp.optim.QPUSGD, one fused op per group
  packed SQPU / HTEQPU  the fused op on int16 codes (parameters and momentum), float32 grads
  unfused SQPU        a torch SGD (foreach) step, then fxp.quantize_seeded_ on every w and v
  fxp SQPU (CUDA graph)  QPUSGD(capturable=True), its step captured in a CUDA graph and replayed (CUDA only)
and prints each time relative to torch's fused SGD. A third set of 6 four-element
tensors shows the fixed cost of one call. Targets (CPU, large set): SQPU <= 1.5x,
HTEQPU <= 1.15x, packed no slower than the same method on float storage.
"""

from __future__ import annotations

import argparse

from argtypes import positive_number, whole_number
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich")
from bench_report import BenchReport, add_timing_args, apply_timing_args


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-total", type=positive_number, default=1e8,
                        help="parameters in the large set (default 1e8)")
    parser.add_argument("--large-tensors", type=whole_number(1), default=300,
                        help="tensors in the large set (default 300)")
    add_timing_args(parser, min_run_time=1.0)
    return parser


if __name__ == "__main__":
    make_parser().parse_args()  # --help and bad arguments answer before torch loads (seconds)

import torch  # noqa: E402
import torch.utils.benchmark as tbench  # noqa: E402

import fxp  # noqa: E402
from fxp.optim import QPUSGD  # noqa: E402

FMT = fxp.FxpFormat(16, 10)


def paper_cnn_shapes() -> list[tuple[int, ...]]:
    return [(32, 1, 5, 5), (64, 32, 5, 5), (128, 1024), (128,), (10, 128), (10,)]


def large_shapes(total: int, count: int) -> list[tuple[int, ...]]:
    # Mixed sizes around total / count, like the layers of a large network.
    base = total // count
    return [(base * (1 + (i % 3)) // 2,) for i in range(count)]


def make_params(shapes, device):
    params = [torch.nn.Parameter(fxp.quantize(torch.randn(s, device=device) * 0.1, FMT)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    return params


def optimizers(shapes, device):
    def torch_sgd(**kw):
        return torch.optim.SGD(make_params(shapes, device), lr=0.01, momentum=0.9, **kw)

    def qpu(rounding):
        return QPUSGD(make_params(shapes, device), lr=0.01, momentum=0.9, format=FMT, rounding=rounding)

    class UnfusedSQPU:
        """torch SGD, then quantize every parameter and momentum buffer separately."""

        def __init__(self):
            self.sgd = torch_sgd(foreach=True)
            self.count = 0

        def step(self):
            self.sgd.step()
            self.count += 1
            for k, p in enumerate(self.sgd.param_groups[0]["params"]):
                off = (self.count << 32) + 2 * k
                fxp.quantize_seeded_(p.data, FMT, seed=0, offset=off)
                buf = self.sgd.state[p].get("momentum_buffer")
                if buf is not None:
                    fxp.quantize_seeded_(buf, FMT, seed=0, offset=off + 1)

    class PackedQPU:
        """The fused op on int16 codes of FMT: 12 bytes moved per parameter against float storage's 20."""

        def __init__(self, rounding):
            params = make_params(shapes, device)
            self.codes = [fxp.pack(p.detach(), FMT) for p in params]
            self.momentum = [torch.zeros_like(c) for c in self.codes]
            self.grads = [p.grad for p in params]
            self.rounding = rounding
            self.count = 0

        def step(self):
            torch.ops.fxp.qpu_sgd_step_(self.codes, self.grads, self.momentum, 0.01, 0.9, 0.0, False,
                                        FMT.total_bits, FMT.frac_bits, FMT.total_bits, FMT.frac_bits,
                                        self.rounding, 0, self.count)
            self.count += 1

    class CapturedQPU:
        """QPUSGD(capturable=True), its step captured once in a CUDA graph and replayed (CUDA only):
        what a step costs without per-launch host work (Note [Capturable QPU step])."""

        def __init__(self, rounding):
            self.opt = QPUSGD(make_params(shapes, device), lr=0.01, momentum=0.9, format=FMT, rounding=rounding,
                              capturable=True)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: buffers and device scalars exist before capture
                for _ in range(2):
                    self.opt.step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.opt.step()

        def step(self):
            self.graph.replay()

    table = {
        "torch SGD foreach": lambda: torch_sgd(foreach=True),
        "torch SGD fused": lambda: torch_sgd(fused=True),
        "fxp SQPU (fused)": lambda: qpu("stochastic"),
        "fxp HTEQPU (fused)": lambda: qpu("nearest_even"),
        "packed SQPU (int16 codes)": lambda: PackedQPU("stochastic"),
        "packed HTEQPU (int16 codes)": lambda: PackedQPU("nearest_even"),
        "unfused SQPU": UnfusedSQPU,
    }
    if device == "cuda":
        table["fxp SQPU (CUDA graph)"] = lambda: CapturedQPU("stochastic")
    return table


def time_step(make, device, min_run_time):
    opt = make()
    opt.step()  # creates momentum buffers
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    # Timer runs on one thread unless told: time with the threads the header reports.
    timer = tbench.Timer(stmt="opt.step(); sync()", globals={"opt": opt, "sync": sync},
                         num_threads=torch.get_num_threads())
    t = timer.blocked_autorange(min_run_time=min_run_time).median
    del opt
    return t


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    run = apply_timing_args(parser, args)
    if int(args.large_total) < args.large_tensors:  # fewer: empty tensors, no time per parameter
        parser.error(f"--large-total must be at least --large-tensors ({args.large_tensors}), "
                     f"got {args.large_total:g}")

    header = f"fxp optimizer-step benchmark, {FMT} parameters and momentum, float32, {run}"
    report = BenchReport(header, "Targets (large set): SQPU <= 1.5x and HTEQPU <= 1.15x torch's fused SGD step "
                                 "on CPU (<= 1.1x on CUDA); packed no slower than float storage on CPU "
                                 "(<= 0.8x torch's fused SGD on CUDA).")
    sets = {
        "paper CNN (184,490 parameters, 6 tensors)": paper_cnn_shapes(),
        f"large set ({args.large_total:.0e} parameters, {args.large_tensors} tensors)":
            large_shapes(int(args.large_total), args.large_tensors),
        "per-call overhead (6 tensors of 4 parameters)": [(4,)] * 6,
    }
    for name, shapes in sets.items():
        numel = sum(torch.Size(s).numel() for s in shapes)
        times = {label: time_step(make, args.device, args.min_run_time)
                 for label, make in optimizers(shapes, args.device).items()}
        rows = [[label, f"{t * 1e3:.3f}", f"{t / numel * 1e9:.2f}", f"{t / times['torch SGD fused']:.2f}"]
                for label, t in times.items()]
        report.table(f"{name}: {numel:,} parameters",
                     ["method", "time per step (ms)", "ns / parameter", "time / torch fused"], rows)
    report.save(args.markdown)

if __name__ == "__main__":
    main()
