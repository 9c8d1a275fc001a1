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


def test_default_jobs_one_process_per_cpu_on_the_cpu_one_on_a_gpu():
    # docs/benchmarks.md, "Fleets against solo runs": two one-thread runs outrun one two-thread run.
    assert sweeplib.default_jobs(None, None, 8, 64.0) == 8
    assert sweeplib.default_jobs("cpu", None, 2, 24.0) == 2
    assert sweeplib.default_jobs("cpu", 2, 8, 64.0) == 4  # --threads 2: one process per 2 CPUs
    assert sweeplib.default_jobs("cpu", 3, 2, 64.0) == 1
    assert sweeplib.default_jobs("cuda", None, 8, 64.0) == 1
    assert sweeplib.default_jobs("cuda:1", 1, 8, 64.0) == 1


def test_default_jobs_at_most_one_per_gib_of_memory():
    assert sweeplib.default_jobs(None, None, 8, 3.5) == 3
    assert sweeplib.default_jobs(None, None, 8, 0.25) == 1
    assert sweeplib.default_jobs(None, None, 8, None) == 8  # memory unknown


def test_usable_memory_is_slurms_allocation_else_the_machines(monkeypatch):
    monkeypatch.delenv("SLURM_MEM_PER_NODE", raising=False)
    monkeypatch.delenv("SLURM_MEM_PER_CPU", raising=False)
    machine = sweeplib.usable_memory_gib()
    if sys.platform.startswith("linux"):
        assert machine is not None and machine > 0
    monkeypatch.setenv("SLURM_MEM_PER_CPU", "1536")
    assert sweeplib.usable_memory_gib() == 1.5 * sweeplib.usable_cpus()
    monkeypatch.setenv("SLURM_MEM_PER_NODE", "4096")  # a node's allocation wins over the per-CPU one
    assert sweeplib.usable_memory_gib() == 4.0


def test_jobs_and_threads_as_given_else_the_sweeps_defaults():
    # On the CPU one one-thread process per CPU, on a GPU one process with the CPUs.
    assert sweeplib.jobs_and_threads(None, None, "cpu", 2, 24.0) == (2, 1)
    assert sweeplib.jobs_and_threads(None, None, "cuda", 16, 64.0) == (1, 16)
    assert sweeplib.jobs_and_threads(None, 2, "cpu", 8, 64.0) == (4, 2)
    assert sweeplib.jobs_and_threads(1, None, "cpu", 2, 24.0) == (1, 2)
    assert sweeplib.jobs_and_threads(None, 0, "cpu", 8, 64.0) == (1, 0)  # LibTorch's default threads: one process
    assert sweeplib.jobs_and_threads(3, 1, "cpu", 2, 24.0) == (3, 1)  # as asked, even beyond the CPUs
