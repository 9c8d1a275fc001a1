#!/usr/bin/env python3
"""Runs each error path of fxp's ops in its own process and reports how it
ended: the expected exception, or a crash with its native stack.

The first GPU runs saw three CUDA pytest cases kill their worker with a
segmentation fault, each where an op raises after reading a count back from
the device (pack_bits' out-of-range codes, pack's NaN, the packed QPU step's
NaN), while errors raised before any kernel ran were fine. This separates
the suspects: the same errors on the CPU, a torch op that raises after a
device read, and each crash again with C++ stack traces on, with
CUDA_LAUNCH_BLOCKING, and under a native backtrace handler
(native_backtrace.c, compiled here with cc when there is one).

  scripts/diagnose/error_paths.py            # every case this machine can run
  scripts/diagnose/error_paths.py --case pack_bits_cuda_outside   # one, in this process
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent


def _bad_codes(device):
    import torch
    bad = torch.zeros(100003, dtype=torch.int64)
    bad[::1000] = -33  # outside the 6-bit signed range
    return bad.to(device)


def _packed_nan_step(device):
    import torch
    _fxp()  # loads the op library
    w = [torch.tensor([16, 32, -8], dtype=torch.int8, device=device)]
    g = [torch.tensor([1.0, float("nan"), 2.0], device=device)]
    v = [torch.zeros(3, dtype=torch.int8, device=device)]
    torch.ops.fxp.qpu_sgd_step_(w, g, v, 0.5, 0.9, 0.0, False, 8, 4, 8, 4, "nearest_even", 0, 0, "standard", None)


def _round_clamp_codes_nan(device):
    import torch
    return _fxp().msq.round_clamp_codes(torch.tensor([0.5, float("nan")], device=device), 1.0, 4)


# name -> (needs CUDA, the call, the exception it must raise)
CASES = {
    "pack_bits_cpu_outside": (False, lambda: _pack_bits(_bad_codes("cpu")), RuntimeError),
    "round_clamp_codes_cpu_nan": (False, lambda: _round_clamp_codes_nan("cpu"), RuntimeError),
    "pack_cpu_nan": (False, lambda: _fxp().pack(_torch().tensor([1.0, float("nan")]), 8, 4), ValueError),
    "qpu_step_cpu_packed_nan": (False, lambda: _packed_nan_step("cpu"), ValueError),
    "quantize_cuda_device_mismatch": (True, lambda: _fxp().quantize(_torch().randn(4), 8, 4,
                                                                   out=_torch().empty(4, device="cuda")), RuntimeError),
    "pack_bits_cuda_bad_dtype": (True, lambda: _pack_bits(_torch().zeros(3, device="cuda")), RuntimeError),
    "torch_bincount_cuda_negative": (True, lambda: _torch().bincount(_torch().tensor([-1], device="cuda")),
                                     RuntimeError),
    "pack_bits_cuda_outside": (True, lambda: _pack_bits(_bad_codes("cuda")), RuntimeError),
    "pack_cuda_nan": (True, lambda: _fxp().pack(_torch().tensor([1.0, float("nan")], device="cuda"), 8, 4),
                      ValueError),
    "qpu_step_cuda_packed_nan": (True, lambda: _packed_nan_step("cuda"), ValueError),
    # Raises after a device read too, and has not run on a GPU yet.
    "round_clamp_codes_cuda_nan": (True, lambda: _round_clamp_codes_nan("cuda"), RuntimeError),
}
# The crashes seen on the GPU, rerun with each of these environments.
VARIANTS = {"plain": {}, "cpp_stacktraces": {"TORCH_SHOW_CPP_STACKTRACES": "1"},
            "launch_blocking": {"CUDA_LAUNCH_BLOCKING": "1"}}


def _torch():
    import torch
    return torch


def _fxp():
    import fxp
    return fxp


def _pack_bits(codes):
    from fxp.ops import pack_bits
    return pack_bits(codes, 6)


def run_case(name: str) -> int:
    _, call, expected = CASES[name]
    try:
        call()
    except expected as e:
        print(f"{name}: raised {type(e).__name__} as expected: {str(e).splitlines()[0][:120]}")
        return 0
    print(f"{name}: raised nothing")
    return 1


def native_handler(workdir: pathlib.Path) -> str | None:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    lib = workdir / "native_backtrace.so"
    p = subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(HERE / "native_backtrace.c")],
                       capture_output=True, text=True)
    return str(lib) if p.returncode == 0 else None


FRAME = re.compile(r"^(?P<lib>/[^(]+)\((?P<sym>[^)+]*)\+(?P<off>0x[0-9a-f]+)\)")


def symbolized(stderr: str) -> str:
    """The native backtrace's `lib(+0xoffset)` frames, each with its function (addr2line, where installed)."""
    addr2line = shutil.which("addr2line")
    out = []
    for line in stderr.splitlines():
        m = FRAME.match(line)
        if m and addr2line and not m["sym"]:
            r = subprocess.run([addr2line, "-f", "-C", "-e", m["lib"], m["off"]], capture_output=True, text=True)
            name = r.stdout.splitlines()[0] if r.returncode == 0 and r.stdout else "?"
            line = f"{line}  {name}"
        out.append(line)
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", choices=sorted(CASES), help="run this case in this process")
    args = p.parse_args(argv)
    if args.case:
        return run_case(args.case)
    import torch
    cuda = torch.cuda.is_available()
    print(f"libfxp: {os.environ.get('FXP_LIBRARY') or 'as import fxp finds it'}", flush=True)
    failures = 0
    with tempfile.TemporaryDirectory() as tmp:
        handler = native_handler(pathlib.Path(tmp))
        for name, (needs_cuda, _, _) in CASES.items():
            if needs_cuda and not cuda:
                print(f"{name}: skipped, no CUDA device")
                continue
            for variant, env in VARIANTS.items():
                if variant != "plain" and not needs_cuda:
                    continue
                full_env = {**os.environ, **env, **({"LD_PRELOAD": handler} if handler else {})}
                r = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True, text=True,
                                   env=full_env, timeout=120)
                outcome = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                print(f"[{variant}] exit {r.returncode}: {outcome or name}", flush=True)
                if r.returncode != 0:
                    failures += 1
                    print("\n".join(symbolized(r.stderr).splitlines()[-60:]), flush=True)
                if variant == "plain" and r.returncode == 0:
                    break  # the variants are for cases that fail
    print(f"error_paths: {failures} runs failed" if failures else "error_paths: every error path raised as expected")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
