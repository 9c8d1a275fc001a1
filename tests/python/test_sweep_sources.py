"""Runs that start from another run's checkpoint (Note [Runs that start from other runs] in
scripts/sweeplib.py): `${out}` and `${KEY}` in a grid, the checks on the source, shards that keep
a run with its source, and a sweep that starts a run only after its source has finished."""
from __future__ import annotations

import errno
import json
import os
import pathlib
import sys
import threading

import pytest

from environment import ROOT, requires_fxp_train, requires_fxp_train_and_data
from test_sweep import LockHolder, fake_fxp_train, write_grid

sys.path.insert(0, str(ROOT / "scripts"))
import sweep  # noqa: E402
import sweeplib  # noqa: E402

# fp32 runs and MSQ runs that fine-tune the fp32 run of their seed.
CHAINED = """name: chained
base: {batch_size: 64}
blocks:
  - set: {method: fp32}
    axes: {seed: [0, 1, 2]}
  - set: {method: msq, init_from: "${out}/fp32-b64-s${seed}/checkpoint.pt"}
    axes: {seed: [0, 1, 2]}
"""


def chained_runs(tmp_path, out):
    return sweeplib.expand(sweeplib.load_grid(write_grid(tmp_path, CHAINED)), out=out)


class ChainTrainer:
    """Acts like fxp-train: config.json when a run starts, checkpoint.pt after its first epoch,
    summary.json at the end. Records, for every run that starts from a checkpoint, whether that
    checkpoint's run had finished when it started; `fail` runs fail after their first epoch."""

    def __init__(self, fail: frozenset[str] = frozenset()):
        self.fail = fail
        self.started: list[str] = []
        self.source_finished: dict[str, bool] = {}
        self.lock = threading.Lock()

    def __call__(self, run, d: pathlib.Path):
        source = run.config.get("init_from")
        with self.lock:
            self.started.append(run.id)
            if source:
                self.source_finished[run.id] = (pathlib.Path(source).parent / "summary.json").exists()
        (d / "config.json").write_text(json.dumps(run.config))
        (d / "checkpoint.pt").write_text("weights")
        if run.id in self.fail:
            raise sweeplib.RunFailed("diverged")
        sweeplib.atomic_write_json(d / "summary.json", {"config": run.full_config})


@requires_fxp_train
def test_out_and_settings_fill_a_grids_values(tmp_path):
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    msq = [r for r in runs if r.config["method"] == "msq"]
    assert [r.config["init_from"] for r in msq] == [f"{out}/fp32-b64-s{s}/checkpoint.pt" for s in (0, 1, 2)]
    assert [sweeplib.source_run(r, out) for r in runs] == [None] * 3 + [f"fp32-b64-s{s}" for s in (0, 1, 2)]
    assert sweeplib.source_run(msq[0], tmp_path) is None  # under another directory: no source run
    # Without an output directory, the sweep's default one; $$ is a '$'.
    default = sweeplib.expand(sweeplib.load_grid(write_grid(tmp_path, CHAINED)))
    assert default[3].config["init_from"] == f"{sweeplib.default_out('chained')}/fp32-b64-s0/checkpoint.pt"
    grid = {"name": "g", "blocks": [{"set": {"method": "fp32", "data_dir": "/d/$$x/${seed}"}, "axes": {"seed": [4]}}]}
    assert sweeplib.expand(grid)[0].config["data_dir"] == "/d/$x/4"
    grid["blocks"][0]["set"]["init_from"] = "${data_dir}/c.pt"
    with pytest.raises(ValueError, match=r"block 0, init_from: '\$\{data_dir\}/c.pt': \$\{data_dir\} is filled in "
                                         r"itself; write its value out"):
        sweeplib.expand(grid)


@requires_fxp_train
def test_overrides_fill_the_grids_values_again(tmp_path):
    """--set batch_size=32 renames the fp32 runs, and the MSQ runs' ${batch_size} follows them;
    a relative --out gives the same absolute paths from any directory."""
    out = tmp_path / "out"
    grid = write_grid(tmp_path, CHAINED.replace("fp32-b64-s${seed}", "fp32-b${batch_size}-s${seed}"))
    runs = sweeplib.select(sweeplib.expand(sweeplib.load_grid(grid), out=out), overrides={"batch_size": 32}, out=out)
    assert {sweeplib.source_run(r, out) for r in runs[3:]} == {r.id for r in runs[:3]} == \
        {f"fp32-b32-s{s}" for s in (0, 1, 2)}
    assert runs[3].templates == (("init_from", "${out}/fp32-b${batch_size}-s${seed}/checkpoint.pt"),)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        relative = sweeplib.expand(sweeplib.load_grid(grid), out="out")
    finally:
        os.chdir(cwd)
    assert [r.config for r in relative] == [r.config for r in sweeplib.expand(sweeplib.load_grid(grid), out=out)]
    # An override may not make a run its own source.
    with pytest.raises(ValueError, match=r"--set init_from=\S+: run fp32-b64-s0 starts from its own checkpoint$"):
        sweeplib.select(sweeplib.expand(sweeplib.load_grid(grid), out=out)[:1],
                        overrides={"init_from": "${out}/fp32-b64-s0/checkpoint.pt"}, out=out)


@requires_fxp_train
@pytest.mark.parametrize("value,message", [
    ("${out}/x/${sed}/c.pt", r"\$\{sed\} is neither \$\{out\} nor a setting of this run \(batch_size, method, seed\)"),
    ("${out}/x/$", r"a '\$' starts \$\{out\} or \$\{KEY\}"),
    ("${out}/fp32-b64-s9/checkpoint.pt", r"run msq-\S+-s0 starts from \S+/fp32-b64-s9/checkpoint.pt, in the output "
                                         r"directory, but fp32-b64-s9 is no run of the grid \(did you mean fp32-b64-s0\?\)"),
    ("${out}/msq-n8-lam0.0001-a0.95-b64-s0/checkpoint.pt", r"run msq-n8-lam0.0001-a0.95-b64-s0 starts from its own "
                                                           r"checkpoint$"),
])
def test_a_bad_source_is_an_error_before_anything_runs(tmp_path, capsys, value, message):
    grid = write_grid(tmp_path, "name: g\nbase: {batch_size: 64}\nblocks:\n  - set: {method: fp32}\n"
                                f"    axes: {{seed: [0]}}\n  - set: {{method: msq, seed: 0, init_from: \"{value}\"}}\n")
    with pytest.raises(ValueError, match=message):
        sweeplib.expand(sweeplib.load_grid(grid), out=tmp_path)
    assert sweep.main([str(grid), "--out", str(tmp_path), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("sweep: grid g")


@requires_fxp_train
def test_a_chain_of_sources_may_not_come_back(tmp_path):
    out = tmp_path / "out"
    a = {"method": "sqpu", "seed": 0, "init_from": "${out}/hteqpu-p16.10-o16.8-sr-b64-s0/checkpoint.pt"}
    b = {"method": "hteqpu", "seed": 0, "init_from": "${out}/sqpu-p16.10-o16.8-sr-b64-s0/checkpoint.pt"}
    grid = {"name": "g", "base": {"batch_size": 64}, "blocks": [{"set": a}, {"set": b}]}
    with pytest.raises(ValueError, match=r"runs start from each other's checkpoints: (sqpu\S+ from hteqpu\S+ from "
                                         r"sqpu\S+)$"):
        sweeplib.expand(grid, out=out)
    # A run that only leads into a loop is not named as part of it.
    c = {"method": "ste", "seed": 0, "init_from": "${out}/sqpu-p16.10-o16.8-sr-b64-s0/checkpoint.pt"}
    grid["blocks"].insert(0, {"set": c})
    with pytest.raises(ValueError, match=r"checkpoints: sqpu\S+ from hteqpu\S+ from sqpu\S+$"):
        sweeplib.expand(grid, out=out)


@requires_fxp_train
@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
def test_shards_keep_a_run_with_its_source(tmp_path, count):
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    shards = [sweeplib.shard(runs, i, count, out) for i in range(count)]
    assert sorted(r.id for s in shards for r in s) == sorted(r.id for r in runs)
    for s in shards:
        ids = {r.id for r in s}
        assert all(sweeplib.source_run(r, out) in ids for r in s if r.config["method"] == "msq")
    assert max(map(len, shards)) - min(map(len, shards)) <= 2  # uneven by at most a chain: three pairs here
    # Without sources (or an output directory to judge them by) shard i is every count-th run from i.
    ordered = sorted(runs, key=lambda r: r.id)
    assert [sweeplib.shard(runs, i, count) for i in range(count)] == [ordered[i::count] for i in range(count)]
    alone = [r for r in runs if r.config["method"] == "fp32"]
    assert [sweeplib.shard(alone, i, count, out) for i in range(count)] == [alone[i::count] for i in range(count)]


@requires_fxp_train
@pytest.mark.parametrize("count", [2, 16])
def test_the_compare_grids_shards_hold_their_chains_and_stay_even(count):
    grid = sweeplib.load_grid(ROOT / "configs" / "grids" / "compare-lenet5.yaml")
    out = sweeplib.default_out(grid["name"])
    runs = sweeplib.expand(grid, out=out)
    shards = [sweeplib.shard(runs, i, count, out) for i in range(count)]
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for s in shards:
        assert all(sweeplib.source_run(r, out) in {x.id for x in s} for r in s if r.config["method"] == "msq")


@requires_fxp_train
@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_a_run_starts_after_its_source_has_finished(tmp_path, jobs):
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    msq_first = runs[3:] + runs[:3]  # the order the sweep is given does not matter
    trainer = ChainTrainer()
    counts = sweeplib.execute(msq_first, out, trainer, jobs=jobs)
    assert counts["done"] == 6 and counts["waiting"] == counts["failed"] == 0
    assert trainer.source_finished == {r.id: True for r in runs[3:]}


@requires_fxp_train
def test_other_runs_go_on_while_a_run_waits_for_its_source(tmp_path):
    """Two jobs, the MSQ run listed first: its source and an unrelated run train together (each
    waits for the other at a barrier), and the MSQ run starts after its source."""
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    together = threading.Barrier(2, timeout=20)

    class Trainer(ChainTrainer):
        def __call__(self, run, d):
            if run.config["method"] == "fp32":
                together.wait()
            super().__call__(run, d)
    trainer = Trainer()
    counts = sweeplib.execute([runs[3], runs[0], runs[1]], out, trainer, jobs=2)
    assert counts["done"] == 3 and not together.broken
    assert trainer.started[2] == runs[3].id and trainer.source_finished == {runs[3].id: True}


@requires_fxp_train
def test_a_run_waits_for_every_member_of_its_sources_fleet(tmp_path):
    """The fp32 runs train as one fleet; the MSQ runs start only after the fleet, and a member
    that failed leaves its MSQ run waiting."""
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    single = ChainTrainer()
    fleets = []

    def fleet_runner(members, dirs):
        fleets.append([r.id for r in members])
        for r, d in zip(members, dirs):  # every member trains an epoch; only the first finishes
            (d / "config.json").write_text(json.dumps(r.config))
            (d / "checkpoint.pt").write_text("weights")
        single(members[0], dirs[0])
        raise sweeplib.RunFailed("a member diverged")

    def plan(todo):
        fp32 = [r for r in todo if r.config["method"] == "fp32"]
        return [fp32] + [[r] for r in todo if r not in fp32]
    counts = sweeplib.execute(runs[3:] + runs[:3], out, single, jobs=3, plan=plan, fleet_runner=fleet_runner)
    assert fleets == [[r.id for r in runs[:3]]]
    assert (counts["done"], counts["failed"], counts["waiting"]) == (2, 2, 2)
    assert single.started == [runs[0].id, runs[3].id] and single.source_finished == {runs[3].id: True}


@requires_fxp_train
def test_a_run_whose_source_failed_waits_and_runs_once_it_is_there(tmp_path):
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    bad = runs[1].id  # fp32 seed 1
    trainer = ChainTrainer(fail=frozenset({bad}))
    counts = sweeplib.execute(runs, out, trainer, jobs=2)
    assert (counts["done"], counts["failed"], counts["waiting"]) == (4, 1, 1)
    assert runs[4].id not in trainer.started  # its source's checkpoint exists, but the run never finished
    assert sweeplib.status(out, runs[4]) == "pending" and not (out / runs[4].id / "failed.json").exists()
    assert sweeplib.waits_for(runs[4], out).endswith(f"whose run failed ({out / bad / 'failed.json'})")
    again = ChainTrainer()
    assert sweeplib.execute(runs, out, again, jobs=2)["done"] == 2
    assert again.started == [bad, runs[4].id]


@requires_fxp_train
def test_a_source_outside_the_sweep_is_waited_for(tmp_path):
    """A source from another grid (or filtered out) is not run here: its run must have finished."""
    out = tmp_path / "out"
    other = tmp_path / "other" / "fp32-b64-s0"
    grid = {"name": "g", "blocks": [{"set": {"method": "msq", "seed": 0, "batch_size": 64,
                                             "init_from": "${out}/../other/fp32-b64-s0/checkpoint.pt"}}]}
    runs = sweeplib.expand(grid, out=out)
    assert runs[0].config["init_from"] == f"{other}/checkpoint.pt"  # a path made of ${out} is made normal
    assert sweeplib.source_run(runs[0], out) is None
    assert sweeplib.waits_for(runs[0], out).endswith("/other/fp32-b64-s0/checkpoint.pt, which does not exist yet")
    assert sweeplib.execute(runs, out, ChainTrainer())["waiting"] == 1
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    (other / "checkpoint.pt").write_text("weights")  # after the first epoch
    assert sweeplib.execute(runs, out, ChainTrainer())["waiting"] == 1
    (other / "summary.json").write_text("{}")
    with LockHolder(other):  # another fxp-train extends the finished run: its checkpoint changes
        assert sweeplib.waits_for(runs[0], out).endswith("whose run is training (busy)")
    assert sweeplib.execute(runs, out, ChainTrainer())["done"] == 1
    # A finished source that this user may read but not write (another user's results, a read-only file
    # system) is taken; its lock is probed shared, on a read-only descriptor, as fxp-train takes it there.
    real_open = os.open
    for code in (errno.EACCES, errno.EROFS):  # EROFS is no PermissionError: it stopped status with a traceback
        def read_only(path, flags, *args):
            if str(path).startswith(str(other)) and flags & os.O_RDWR:
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, flags, *args)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(sweeplib.os, "open", read_only)
            assert sweeplib.waits_for(runs[0], out) == ""
            assert sweeplib.busy(other) is False  # the probe itself: what status and the sweep's checks use
            with LockHolder(other):  # an owner training there is seen, as on storage this user may write
                assert sweeplib.busy(other) is True
                assert sweeplib.waits_for(runs[0], out).endswith("whose run is training (busy)")
    # A checkpoint that is not in a run directory is taken as it is.
    loose = tmp_path / "loose.pt"
    loose.write_text("weights")
    assert sweeplib.waits_for(sweeplib.select(runs, overrides={"init_from": str(loose)})[0], out) == ""


@requires_fxp_train
def test_a_run_whose_source_conflicts_waits(tmp_path, capsys):
    """A source whose directory holds a finished run of other settings is not the grid's source:
    the run that starts from it waits (the sweep reports the conflict and exits 1)."""
    out = tmp_path / "out"
    runs = chained_runs(tmp_path, out)
    source, dependent = runs[0], runs[3]
    d = out / source.id
    d.mkdir(parents=True)
    (d / "checkpoint.pt").write_text("other weights")
    other = {**source.full_config, "epochs": source.full_config["epochs"] + 1}
    sweeplib.atomic_write_json(d / "summary.json", {"config": other})
    assert sweeplib.status(out, source) == "conflict"
    assert sweeplib.waits_for(dependent, out) == ""  # the files alone look finished
    assert sweeplib.waits_for(dependent, out, {source.id}) == (
        f"it starts from {d / 'checkpoint.pt'}, whose directory holds a run of other settings than the "
        "grid's (conflict)")
    trainer = ChainTrainer()
    counts = sweeplib.execute(runs, out, trainer, jobs=2)
    assert (counts["done"], counts["conflict"], counts["waiting"]) == (4, 1, 1)
    assert dependent.id not in trainer.started and not (out / dependent.id / "failed.json").exists()
    grid = write_grid(tmp_path, CHAINED)
    cmd = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress",
           "--filter", "seed=0"]
    assert sweep.main([*cmd, "--dry-run"]) == 0
    assert (f"1 pending run would wait, not start: it starts from {d / 'checkpoint.pt'}, whose directory holds "
            "a run of other settings than the grid's (conflict)\n") in capsys.readouterr().out
    assert sweep.main(cmd) == 1
    assert f"  {dependent.id}: waiting, not started: it starts from {d / 'checkpoint.pt'}, whose directory " \
           "holds a run of other settings than the grid's (conflict)\n" in capsys.readouterr().err
    # The source left out of the selection (--filter method=msq) still conflicts: its run waits too.
    msq_only = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress",
                "--filter", "method=msq", "--filter", "seed=0"]
    assert sweeplib.conflicting_sources([dependent], runs, out) == {source.id}
    assert sweep.main([*msq_only, "--dry-run"]) == 0
    assert "1 pending run would wait, not start: " in capsys.readouterr().out
    assert sweep.main(msq_only) == 75  # nothing failed or conflicted among the selected: waiting
    assert "(conflict)\n" in capsys.readouterr().err and not (out / dependent.id / "summary.json").exists()
    # After --set, the source is judged with the override too: here it names the source's own epochs.
    assert sweeplib.conflicting_sources(
        sweeplib.select([dependent], overrides={"epochs": other["epochs"]}, out=out),
        runs, out, {"epochs": other["epochs"]}) == set()


def test_chains_of_runs_bound_the_wall_time():
    # Runs 0 -> 1 -> 2 start from each other; run 3 alone. (earliest, typical, latest) seconds each.
    per_run = [(1, 2, 3), (1, 2, 3), (4, 4, 4), (10, 10, 10)]
    sources = [None, 0, 1, None]
    assert sweeplib.wall_seconds(per_run, sources, 1) == (16, 18, 20)  # one job: the total
    assert sweeplib.wall_seconds(per_run, sources, 2) == (10, 10, 10)  # run 3, or the chain's 6, 8, 10
    assert sweeplib.wall_seconds(per_run, [None, 0, 1, 2], 8) == (16, 18, 20)  # one chain: no job helps
    assert sweeplib.wall_seconds([(1, 2, 3)] * 8, [None] * 8, 4) == (2, 4, 6)
    assert sweeplib.wall_seconds([], [], 3) == (0, 0, 0)
    # Runs 0 and 1 in one fleet (one job of 2 s), 2 alone, 3 after 1: the fleet then 3, 3 s on any jobs.
    assert sweeplib.wall_seconds([(1, 1, 1)] * 4, [None, None, None, 1], 8, [[0, 1], [2], [3]]) == (3, 3, 3)
    assert sweeplib.wall_seconds([(1, 1, 1)] * 4, [None, None, None, 1], 1, [[0, 1], [2], [3]]) == (4, 4, 4)
    long = 5000  # a long chain is walked without recursion
    assert sweeplib.wall_seconds([(1, 1, 1)] * long, [None, *range(long - 1)], 100) == (long,) * 3


@requires_fxp_train
def test_the_estimate_knows_runs_wait_for_their_sources(tmp_path, capsys):
    (tmp_path / "t.csv").write_text("method,batch_size,train_images_per_s,val_images_per_s\nfp32,64,1,1\n"
                                    "msq,64,1,1\n")
    text = CHAINED.replace("base: {batch_size: 64}", "base: {batch_size: 64, epochs: 1, train_limit: 1000, "
                                                     "val_limit: 800}")
    grid = write_grid(tmp_path, text)
    cmd = [str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv"), "--fleet", "1"]
    # Six runs of 1,800 images at 1 image/s: 3.0 h in all; each MSQ run after its fp32 run, 1.0 h.
    assert sweep.main([*cmd, "--jobs", "1"]) == 0
    assert "on 1 job at the measured throughput: 3.0 h (from" in capsys.readouterr().out
    assert sweep.main([*cmd, "--jobs", "6"]) == 0
    assert ("on 6 jobs at the measured throughput: 1.0 h (set by its longest run or fleet, or chain of runs "
            "that start from each other's checkpoints) (from 1.0 h") in capsys.readouterr().out


@requires_fxp_train
def test_the_estimate_takes_a_fleet_as_one_job(tmp_path, capsys):
    """A fleet trains its members' images together (bench_fleet's speed-up is the fleet's images/s over
    one solo run's), as one job of --jobs: four runs in one fleet take four runs' time on any jobs."""
    (tmp_path / "t.csv").write_text("method,batch_size,train_images_per_s,val_images_per_s\nsqpu,1,1,1\n")
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800}\n"
                                "blocks:\n  - axes: {seed: [0, 1, 2, 3]}\n")
    cmd = [str(grid), "--out", str(tmp_path / "out"), "--estimate", str(tmp_path / "t.csv"), "--jobs", "4",
           "--threads", "1"]
    assert sweep.main([*cmd, "--fleet", "1"]) == 0  # four solo runs of 0.5 h on four jobs
    assert "on 4 jobs at the measured throughput: 0.5 h (from" in capsys.readouterr().out
    assert sweep.main([*cmd, "--fleet", "4"]) == 0  # one fleet: one job, 2.0 h without a measured speed-up
    text = capsys.readouterr().out
    assert "fleets: 4 pending runs in 1 fleet (up to 4 members)" in text
    assert "on 4 jobs at the measured throughput: 2.0 h (set by its longest run or fleet" in text


@requires_fxp_train
def test_the_sweep_runs_a_chained_grid_with_any_jobs_and_reports_what_waits(tmp_path, capsys, monkeypatch):
    grid = write_grid(tmp_path, CHAINED)
    out = tmp_path / "out"
    cmd = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress"]
    assert sweep.main([*cmd, "--dry-run"]) == 0
    assert "3 pending runs will start from another pending run's checkpoint" in capsys.readouterr().out
    # Only the MSQ runs: their sources are not there, so they wait (exit 75, not 1).
    assert sweep.main([*cmd, "--filter", "method=msq", "--dry-run"]) == 0
    assert (f"  3 pending runs would wait, not start: it starts from {out}/fp32-b64-s0/checkpoint.pt, which "
            "does not exist yet (and 2 more)\n") in capsys.readouterr().out
    assert sweep.main([*cmd, "--filter", "method=msq", "--jobs", "2"]) == 75
    err = capsys.readouterr().err
    assert "0 run now, 0 already done, 0 failed, 0 conflicting, 0 busy, 3 waiting for other runs" in err
    assert f"  msq-n8-lam0.0001-a0.95-b64-s2: waiting, not started: it starts from {out}/fp32-b64-s2/checkpoint.pt, " \
           "which does not exist yet\n" in err
    assert not any(out.glob("msq-*/failed.json"))
    # The fake fxp-train writes no checkpoint: give the fp32 runs theirs as they finish.
    real_execute = sweeplib.execute

    def execute(runs, out_, runner, *args):
        def with_checkpoint(r, d):
            runner(r, d)
            (d / "checkpoint.pt").write_text("weights")
        return real_execute(runs, out_, with_checkpoint, *args)
    monkeypatch.setattr(sweeplib, "execute", execute)
    assert sweep.main([*cmd, "--jobs", "2", "--fleet", "1"]) == 0
    assert "6 run now" in capsys.readouterr().err


@requires_fxp_train
def test_a_source_path_written_another_way_is_the_same_setting(tmp_path):
    """init_from compares the file it names (FILE_KEYS), as fxp-train's differing_settings does, so a
    grid that writes its sources through ${out} keeps the runs finished with a relative path."""
    out = tmp_path / "out"
    run = chained_runs(tmp_path, out)[3]
    d = out / run.id
    d.mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        relative = {**run.full_config, "init_from": "out/x/../fp32-b64-s0/checkpoint.pt"}
        sweeplib.atomic_write_json(d / "summary.json", {"config": relative})
        assert sweeplib.status(out, run) == "done"
        (tmp_path / "real").mkdir()
        (tmp_path / "link").symlink_to(tmp_path / "real")
        for a, b, same in [("link/c.pt", "real/c.pt", True), (str(tmp_path / "real/./c.pt"), "real/c.pt", True),
                           ("nothere/x/../c.pt", str(tmp_path / "nothere/c.pt"), True),
                           ("missing/../link/c.pt", "real/c.pt", False),  # links past a missing part stay
                           ("real/c.pt", "real/d.pt", False), ("", "real/c.pt", False)]:
            assert sweeplib.same_file(a, b) is same, (a, b)
        other = {**run.full_config, "init_from": "out/fp32-b64-s1/checkpoint.pt"}
        sweeplib.atomic_write_json(d / "summary.json", {"config": other})
        assert sweeplib.status(out, run) == "conflict"
        assert "init_from (\"out/fp32-b64-s1/checkpoint.pt\" in the run" in sweeplib.differences(other, run)
    finally:
        os.chdir(cwd)


def test_file_keys_mirror_fxp_trains():
    import re
    source = (ROOT / "csrc" / "train" / "config.cpp").read_text()
    body = re.search(r"bool key_names_a_file\(const std::string& key\) \{(.*?)\}", source, re.S).group(1)
    assert set(re.findall(r'key == "(\w+)"', body)) == sweeplib.FILE_KEYS


@requires_fxp_train_and_data
def test_the_real_fxp_train_fine_tunes_its_grids_own_run(tmp_path):
    """With fxp-train and Fashion-MNIST: two jobs, the MSQ run listed first, and it still starts from
    its float32 run's finished checkpoint (its config.json names that file)."""
    grid = write_grid(tmp_path, "name: tiny\nbase: {epochs: 2, train_limit: 256, val_limit: 128, batch_size: 64}\n"
                                "blocks:\n  - set: {method: msq, msq_finetune_epochs: 1, "
                                "init_from: \"${out}/fp32-b64-s0/checkpoint.pt\"}\n"
                                "  - set: {method: fp32}\n  - set: {method: sqpu}\n")
    out = tmp_path / "out"
    assert sweep.main([str(grid), "--out", str(out), "--jobs", "2", "--threads", "1", "--no-progress"]) == 0
    msq = next(out.glob("msq-*"))
    assert json.loads((msq / "config.json").read_text())["init_from"] == str(out / "fp32-b64-s0" / "checkpoint.pt")
    assert json.loads((msq / "summary.json").read_text())["epochs_completed"] == 2
