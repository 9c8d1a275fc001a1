"""The per-capability CPU builds share no code (issue 11). Note [One copy of
the math per instruction set] (kernels/common/fxp_math.h): an inline function that two
capability objects both define is one weak symbol, and the linker keeps one
copy for every caller, so an AVX-512 copy could run on a baseline CPU. These
tests read the objects the build made (build/compile_commands.json) and the
linked libfxp.so."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from environment import ROOT

BUILD = ROOT / "build"
pytestmark = pytest.mark.skipif(
    not (BUILD / "compile_commands.json").exists() or shutil.which("nm") is None or shutil.which("objdump") is None,
    reason="needs build/compile_commands.json (scripts/setup.sh) and binutils (nm, objdump)")

# Mangled names in namespace fxp: _ZN3fxp..., _ZNK3fxp... (const members).
FXP_SYMBOL = re.compile(r"^_ZN[KVR]*3fxp")


def capability_objects() -> dict[str, list[Path]]:
    """The objects of libfxp by CPU capability; "" holds the ones built once (baseline flags, or nvcc)."""
    objects: dict[str, list[Path]] = {}
    for entry in json.loads((BUILD / "compile_commands.json").read_text()):
        args = shlex.split(entry["command"])
        output = Path(entry["directory"]) / args[args.index("-o") + 1]
        cap = next((a.split("=", 1)[1] for a in args if a.startswith("-DFXP_CPU_CAPABILITY=")), None)
        if cap is not None:
            objects.setdefault(cap, []).append(output)
        elif "/fxp.dir/" in str(output):
            objects.setdefault("", []).append(output)
    return objects


def defined(objects: list[Path]) -> dict[str, str]:
    """Externally visible symbols the objects define: name -> nm type letter."""
    out = subprocess.run(["nm", "-g", "--defined-only", "--format=posix", *map(str, objects)], check=True,
                         capture_output=True, text=True).stdout
    symbols = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.endswith(":"):
            symbols[parts[0]] = parts[1]
    return symbols


def test_no_fxp_function_is_shared_between_cpu_builds():
    objects = capability_objects()
    # Exactly the builds CMake was asked for (FXP_CPU_CAPABILITIES; all three by default on x86-64).
    configured = re.search(r"^FXP_CPU_CAPABILITIES:STRING=(.*)$", (BUILD / "CMakeCache.txt").read_text(), re.M)
    assert configured is not None and set(objects) - {""} == set(configured.group(1).split(";")), objects
    assert "default_" in objects
    symbols = {cap: defined(objs) for cap, objs in objects.items() if cap}
    caps = sorted(symbols)
    for i, a in enumerate(caps):
        for b in caps[i + 1:]:
            shared = sorted(s for s in set(symbols[a]) & set(symbols[b]) if FXP_SYMBOL.match(s))
            assert shared == [], f"{a} and {b} both define {shared[:5]}"


def _functions(disassembly: str, wanted: set[str]) -> dict[str, list[str]]:
    bodies, current = {}, None
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            current = header.group(1) if header.group(1) in wanted else None
            if current:
                bodies[current] = []
        elif current and line.strip():
            bodies[current].append(line)
    return bodies


def test_functions_the_builds_share_are_linked_as_baseline_code():
    """A regression guard for the link order. Inline functions of LibTorch's
    headers (c10::Half conversions, error messages) are compiled into every
    capability object too; the one libfxp keeps must be the baseline build's,
    or a CPU without AVX would fault. The link order (baseline objects first,
    CMakeLists.txt) guarantees it today, as it did before issue 11; this test
    fails if a change to the build reorders the objects."""
    objects = capability_objects()
    symbols = {cap: defined(objs) for cap, objs in objects.items()}
    vector_caps = [cap for cap in objects if cap not in ("", "default_")]
    if not vector_caps:
        pytest.skip("this build has no AVX capabilities (not x86-64)")
    shared = set()  # weak symbols of a vector build that another object defines as well
    for cap in vector_caps:
        others = set().union(*(set(syms) for other, syms in symbols.items() if other != cap))
        shared |= {s for s, kind in symbols[cap].items() if kind in "WVwv" and s in others}
    library = BUILD / "libfxp.so"
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], check=True,
                                 capture_output=True, text=True).stdout
    bodies = _functions(disassembly, shared)
    assert bodies, "found none of the shared functions in libfxp.so"
    vex = re.compile(r"^\s*[0-9a-f]+:\s+v[a-z0-9]+\s|%[yz]mm")
    offending = {name: next(l for l in body if vex.search(l)) for name, body in bodies.items()
                 if any(vex.search(l) for l in body)}
    assert offending == {}, f"AVX code kept for shared functions: {offending}"
