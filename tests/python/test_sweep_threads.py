"""scripts/sweep's thread budget: jobs x threads beyond the usable CPUs is named
(docs/train.md, "Threads and a busy machine": runs that share cores can be
several times slower), and the default divides the CPUs this process may use."""

from __future__ import annotations

import sys

from environment import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import sweeplib  # noqa: E402


def test_more_threads_than_cpus_is_named():
    why = sweeplib.oversubscription(2, 2, "cpu", 2)
    assert why.startswith("2 jobs x 2 threads is more than the 2 CPUs this sweep may use")
    assert "lower --jobs or --threads" in why
    assert sweeplib.oversubscription(2, 2, None, 2)  # no --device: the CPU


def test_within_the_cpus_or_on_a_gpu_nothing_is_named():
    assert sweeplib.oversubscription(2, 1, "cpu", 2) == ""
    assert sweeplib.oversubscription(1, 4, "cpu", 4) == ""
    assert sweeplib.oversubscription(8, 2, "cuda", 2) == ""  # GPU runs use a thread or so each
    assert sweeplib.oversubscription(8, 2, "cuda:1", 2) == ""


def test_usable_cpus_is_the_affinity_mask():
    import os
    cpus = sweeplib.usable_cpus()
    assert cpus >= 1
    if hasattr(os, "sched_getaffinity"):
        mask = os.sched_getaffinity(0)
        assert cpus == len(mask)
        os.sched_setaffinity(0, {min(mask)})  # a SLURM-like allocation of one CPU, whatever the node has
        try:
            assert sweeplib.usable_cpus() == 1
        finally:
            os.sched_setaffinity(0, mask)
