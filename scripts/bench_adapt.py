#!/usr/bin/env python3
"""AdaPT's per-step cost against plain float32 SGD training of the same model,
measured in the same run (docs/adapt.md).

Each point is the second epoch of a short fxp-train run (scripts/bench_train.py
measures it), repeated and interleaved across methods; the median counts.
Four methods: fp32 (float32 SGD), ste (the same quantized reads of the weights
and activations at a fixed format, no controller), adapt, and adapt-qpu (AdaPT
without a master copy, --update qpu). adapt / fp32 is AdaPT's whole overhead
in this simulation of fixed point on float hardware; adapt / ste is the
controller's part (Eq. 3.4 normalization, GD accumulation, PD, PU) at the given
lookbacks (the paper's 25..100 by default).

  scripts/bench_adapt.py --model lenet5 --batch-size 256
  scripts/bench_adapt.py --model resnet20 --batch-size 512 --device cuda --markdown gpu.md
  scripts/bench_adapt.py --step-only --step-params 10000000   # the optimizer step alone

--python-loop times whole training steps of a LeNet-5 built from fxp.nn layers
in a Python loop (random images, 28x28), as fxp.adapt's users train: float32
layers and torch SGD against fxp.adapt.AdaptController driving STE layers,
with after_backward before torch SGD (two passes) and with controller.step
(torch SGD fused), and driving QPU layers with controller.step and
fxp.optim.QPUSGD (no master copy); each relative to float32 and to the same
layers with a fixed format and no controller (STE with torch SGD, SQPU with
QPUSGD).

--step-only times the step alone on a set of random parameters: torch's SGD
against AdaPT's gradient work before it (after_backward's two passes:
fxp::layer_gradient_norms, fxp::normalize_accumulate_) and against fxp-train's
fused form (the norms, then fxp::adapt_sgd_step_), in the same run; and the
same for --update qpu: the plain SQPU step, after_backward's passes before it,
and fxp-train's fused form (the norms, then qpu_sgd_step_.adapt).
"""
from __future__ import annotations

import argparse
import itertools
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from argtypes import positive_number, whole_number  # noqa: E402
import project_env  # noqa: E402  (restarts under the project's Python where this one lacks a module)
project_env.ensure(__name__, "torch", "rich")
from bench_report import BenchReport, finish  # noqa: E402
from bench_train import add_run_args, check_model, measure  # noqa: E402

METHODS = ("fp32", "ste", "adapt", "adapt-qpu")


def lookback_bounds(text: str) -> tuple[int, int]:
    """--lookback MIN,MAX: whole numbers with 1 <= MIN <= MAX; argparse reports anything else."""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX, two whole numbers, got {text!r}") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"needs 1 <= MIN <= MAX, got {text!r}")
    return low, high


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5", help="fxp-train --model")
    p.add_argument("--batch-size", type=whole_number(1), default=256)
    p.add_argument("--steps", type=whole_number(1), default=120,
                   help="timed training steps per measurement (more than the lookback's upper bound, so that "
                        "every layer switches in the timed epoch)")
    p.add_argument("--repeats", type=whole_number(1), default=3,
                   help="measurements per method (interleaved; the median counts)")
    p.add_argument("--lookback", type=lookback_bounds, default="25,100",
                   help="AdaPT's lookback bounds MIN,MAX (the paper's: 25,100)")
    p.add_argument("--threads", type=whole_number(0), default=0, help="CPU threads (0: LibTorch's default)")
    add_run_args(p)
    p.add_argument("--step-only", action="store_true", help="time the optimizer step alone (no fxp-train runs)")
    p.add_argument("--step-params", type=positive_number, default=1e7,
                   help="with --step-only: parameters, in 60 tensors")
    p.add_argument("--python-loop", action="store_true",
                   help="time training steps of fxp.adapt in a Python loop (no fxp-train runs)")
    args = p.parse_args(argv)
    if args.step_only and args.python_loop:
        p.error("--step-only and --python-loop are two separate benchmarks; choose one")
    if args.step_only:
        return bench_step(args)
    if args.python_loop:
        return bench_python_loop(args)
    low, high = args.lookback
    if not pathlib.Path(args.fxp_train).exists():
        p.error(f"no fxp-train at {args.fxp_train} (scripts/setup.sh builds it)")
    check_model(args.fxp_train, args.model, args.device, "bench_adapt.py")  # fxp-train's word, before measuring

    images = min(60000, args.steps * args.batch_size)
    lookback = ("--adapt-lookback-min", str(low), "--adapt-lookback-max", str(high))
    runs = {"fp32": ("fp32", ()), "ste": ("ste", ()), "adapt": ("adapt", lookback),
            "adapt-qpu": ("adapt", lookback + ("--update", "qpu"))}
    rows = []
    for repeat in range(args.repeats):
        for method in METHODS:
            train_method, extra = runs[method]
            r = measure(args.fxp_train, train_method, args.batch_size, images, 1000, args.device, args.threads,
                        args.data_dir, args.model, extra, "bench_adapt.py")
            r["method"], r["repeat"] = method, repeat
            rows.append(r)
            print(f"{method:9s} repeat {repeat}: {r['train_images_per_s']:9.0f} train img/s", flush=True)
    median = {m: statistics.median(r["train_images_per_s"] for r in rows if r["method"] == m) for m in METHODS}
    table = [[m, f"{median[m]:.0f}", f"{median['fp32'] / median[m]:.3f}x", f"{median['ste'] / median[m]:.3f}x"]
             for m in METHODS]
    report = BenchReport(
        f"AdaPT step cost: {args.model}, batch {args.batch_size}, {args.device} ({args.threads or 'default'} threads)",
        f"Median training images/s of {args.repeats} interleaved measurements ({args.steps} steps each); time per "
        f"step relative to fp32 and to ste, measured in the same run. AdaPT lookback {low}..{high}.")
    report.table("AdaPT overhead", ["method", "train images/s", "time / fp32", "time / ste"], table)
    return finish("bench_adapt.py", report, args.markdown, args.csv, rows, "train_images_per_s",
                  lambda r: f"{r['method']} repeat {r['repeat']}")


def bench_python_loop(args) -> int:
    import time

    import torch

    import fxp

    low, high = args.lookback
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    fmt = fxp.FxpFormat(8, 4)

    def lenet5(mode):
        q = {} if mode == "fp32" else dict(param_format=fmt, act_format=fmt)
        return torch.nn.Sequential(
            fxp.nn.QConv2d(1, 6, 5, padding=2, weight_mode=mode, **q), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            fxp.nn.QConv2d(6, 16, 5, weight_mode=mode, **q), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), fxp.nn.QLinear(400, 120, weight_mode=mode, **q), torch.nn.ReLU(),
            fxp.nn.QLinear(120, 84, weight_mode=mode, **q), torch.nn.ReLU(),
            fxp.nn.QLinear(84, 10, weight_mode=mode, **q)).to(device)

    def setup(name):
        torch.manual_seed(0)
        mode = "fp32" if name == "fp32" else "qpu" if "qpu" in name else "ste"
        model = lenet5(mode)
        controller = None
        if name.startswith("adapt"):
            controller = fxp.adapt.AdaptController(model, lookback=(low, high), l1=1e-5)
        if mode == "qpu":
            fxp.nn.quantize_layer_parameters_(model, seed=0)
            groups = controller.parameter_groups() if controller else model.parameters()
            optimizer = fxp.optim.QPUSGD(groups, lr=0.01, momentum=0.9, format=fmt, seed=0)
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        return model, controller, optimizer

    # The batches, made once on the device: their making is no part of a step.
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, 1, 28, 28, generator=gen).to(device),
                torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)) for _ in range(8)]

    def train(name, model, controller, optimizer, steps):
        for s in range(steps):
            x, y = batches[s % len(batches)]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            value = loss.item()  # every method reads the loss (AdaPT needs it), as a loop that logs it does
            if name == "adapt: after_backward + SGD":
                controller.after_backward(value, args.batch_size)
                optimizer.step()
            elif controller is not None:
                controller.step(optimizer, value, args.batch_size)
            else:
                optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    names = ["fp32", "ste", "adapt: after_backward + SGD", "adapt: step(SGD)", "sqpu", "adapt-qpu: step(QPUSGD)"]
    times = {n: [] for n in names}
    for _ in range(args.repeats):
        for name in names:
            model, controller, optimizer = setup(name)
            train(name, model, controller, optimizer, 3)  # warm-up
            start = time.perf_counter()
            train(name, model, controller, optimizer, args.steps)
            times[name].append((time.perf_counter() - start) / args.steps)
            print(f"{name:28s} {times[name][-1] * 1e3:8.2f} ms/step", flush=True)
    median = {n: statistics.median(t) for n, t in times.items()}
    # Each AdaPT form against the same layers without a controller: STE's, or SQPU's for AdaPT-QPU.
    table = [[n, f"{median[n] * 1e3:.2f}", f"{min(times[n]) * 1e3:.1f}-{max(times[n]) * 1e3:.1f}",
              f"{median[n] / median['fp32']:.3f}x", f"{median[n] / median['ste']:.3f}x",
              f"{median[n] / median['sqpu']:.3f}x"] for n in names]
    report = BenchReport(
        f"fxp.adapt in a Python loop: LeNet-5 (fxp.nn layers), batch {args.batch_size}, {args.device} "
        f"({args.threads or 'default'} threads)",
        f"Median of {args.repeats} interleaved measurements of {args.steps} training steps each (random 28x28 "
        f"images, 8 batches made on the device before timing; every method reads the loss each step); time per "
        f"step relative to float32, and to STE and SQPU at FxP(8, 4) without a controller (the baselines of "
        f"AdaPT and AdaPT-QPU), measured in the same run. AdaPT lookback {low}..{high}, L1 1e-5; with fewer "
        f"steps than {low}, no switch falls in the timed steps.")
    report.table("AdaPT in Python", ["method", "ms / step", "range (ms)", "time / fp32", "time / ste", "time / sqpu"],
                 table)
    report.save(str(args.markdown) if args.markdown else None)
    return 0


def bench_step(args) -> int:
    import time

    import torch

    import fxp  # noqa: F401  (loads the ops)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_tensors = 60
    per = max(1, int(args.step_params) // n_tensors)
    params = [torch.randn(per, device=device) for _ in range(n_tensors)]
    grads = [torch.randn(per, device=device) for _ in range(n_tensors)]
    for p, g in zip(params, grads):
        p.grad = g
    layers = [k // 2 for k in range(n_tensors)]  # weight and bias pairs
    n_layers = n_tensors // 2
    acc = [torch.zeros_like(p) for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    lr, mu, wd, l1 = 1e-9, 0.9, 5e-4, 1e-4  # a tiny lr keeps the values where they are
    sgd = torch.optim.SGD(params, lr=lr, momentum=mu, weight_decay=wd)
    ops = torch.ops.fxp

    def torch_sgd():
        sgd.step()

    def two_pass_then_sgd():
        norms = ops.layer_gradient_norms(params, grads, layers, n_layers, l1)
        ops.normalize_accumulate_(grads, acc, params, norms, layers, l1)
        sgd.step()

    def fused():
        norms = ops.layer_gradient_norms(params, grads, layers, n_layers, l1)
        ops.adapt_sgd_step_(params, grads, buffers, acc, norms, layers, l1, lr, mu, wd, False)

    # --update qpu: SQPU at FxP(16, 10), parameters and momentum on the grid.
    qparams = [ops.quantize(p, 16, 10) for p in params]
    qbuffers = [torch.zeros_like(p) for p in params]
    steps = itertools.count()  # a fresh step each call: fresh draws, as in training

    def qpu_args():
        return (lr, mu, wd, False, 16, 10, 16, 10, "stochastic", 0, next(steps))

    def qpu_step():
        ops.qpu_sgd_step_(qparams, grads, qbuffers, *qpu_args())

    def two_pass_then_qpu():
        norms = ops.layer_gradient_norms(qparams, grads, layers, n_layers, l1)
        ops.normalize_accumulate_(grads, acc, qparams, norms, layers, l1)
        ops.qpu_sgd_step_(qparams, grads, qbuffers, *qpu_args())

    def fused_qpu():
        norms = ops.layer_gradient_norms(qparams, grads, layers, n_layers, l1)
        ops.qpu_sgd_step_.adapt(qparams, grads, qbuffers, acc, norms, layers, l1, *qpu_args())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    methods = {"torch SGD": torch_sgd, "after_backward + torch SGD": two_pass_then_sgd, "fused (fxp-train)": fused,
               "SQPU step": qpu_step, "after_backward + SQPU step": two_pass_then_qpu,
               "fused SQPU (fxp-train --update qpu)": fused_qpu}
    times = {m: [] for m in methods}
    for fn in methods.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in methods.items():
            sync()
            start = time.perf_counter()
            for _ in range(5):
                fn()
            sync()
            times[name].append((time.perf_counter() - start) / 5)
    median = {m: statistics.median(t) for m, t in times.items()}
    base = median["torch SGD"]
    report = BenchReport(
        f"AdaPT's optimizer step: {per * n_tensors:,} parameters in {n_tensors} tensors, {args.device} "
        f"({args.threads or 'default'} threads)",
        f"Median of {args.repeats} interleaved measurements of 5 steps each; momentum and weight decay on; "
        f"time relative to torch.optim.SGD measured in the same run.")
    qpu_base = median["SQPU step"]
    report.table("step time", ["step", "ms", "time / torch SGD", "time / SQPU step"],
                 [[m, f"{median[m] * 1e3:.2f}", f"{median[m] / base:.2f}x", f"{median[m] / qpu_base:.2f}x"]
                  for m in methods])
    report.save(str(args.markdown) if args.markdown else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
