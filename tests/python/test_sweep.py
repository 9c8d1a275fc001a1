"""The experiment grids, the sweep runner (resume, sharding, failures) and the report."""
from __future__ import annotations

import fcntl
import json
import pathlib
import random
import sys
import subprocess
import threading
import time

import pytest

from environment import FXP_TRAIN, ROOT, requires_fxp_train, requires_fxp_train_and_data

sys.path.insert(0, str(ROOT / "scripts"))
import report  # noqa: E402
import sweep  # noqa: E402
import sweeplib  # noqa: E402

GRIDS = ROOT / "configs" / "grids"


def grid_runs(name):
    return sweeplib.expand(sweeplib.load_grid(GRIDS / f"{name}.yaml"))


@requires_fxp_train
@pytest.mark.parametrize("name,total,quantized", [("exp1", 395, 390), ("exp2", 2750, 2640), ("exp3", 2500, 2400)])
def test_grid_counts(name, total, quantized):
    runs = grid_runs(name)
    assert len(runs) == total
    assert sum(r.config["method"] != "fp32" for r in runs) == quantized
    assert len({r.id for r in runs}) == total


@requires_fxp_train
def test_compare_grid_trains_every_method_alike():
    """compare-lenet5.yaml: the three methods and their baselines, each configuration over the
    same 3 seeds on one model, dataset and batch size, 15 epochs from scratch; MSQ fine-tunes
    the grid's own float32 run of its seed for 5 (docs/compare.md), which the sweep runs first."""
    runs = grid_runs("compare-lenet5")
    assert len(runs) == 27 and len({r.id for r in runs}) == 27
    configs = [r.config for r in runs]
    for key, value in (("model", "lenet5"), ("batch_size", 256), ("lr", 0.01)):
        assert {c[key] for c in configs} == {value}, key
    out = sweeplib.default_out("compare-lenet5")
    fp32_dirs = {c["seed"]: f"{out}/{r.id}" for r, c in zip(runs, configs) if c["method"] == "fp32"}
    for c in configs:
        if c["method"] == "msq":
            assert (c["epochs"], c["init_from"]) == (5, f"{fp32_dirs[c['seed']]}/checkpoint.pt")
        else:
            assert (c["epochs"], c.get("init_from", "")) == (15, "")
    assert {sweeplib.source_run(r, out) for r in runs if r.config["method"] == "msq"} == \
        {pathlib.Path(d).name for d in fp32_dirs.values()}
    labels = {}
    for c in configs:
        label = (c["method"], c["update"] if c["method"] == "adapt" else None,
                 c["param_bits"] if c["method"] in ("ste", "sqpu", "hteqpu") else None)
        labels.setdefault(label, set()).add(c["seed"])
    assert set(labels) == {("fp32", None, None), ("ste", None, 8), ("sqpu", None, 16), ("sqpu", None, 8),
                           ("hteqpu", None, 16), ("hteqpu", None, 8), ("adapt", "float", None),
                           ("adapt", "qpu", None), ("msq", None, None)}
    assert all(seeds == {0, 1, 2} for seeds in labels.values())


@requires_fxp_train
def test_grid_contents_match_the_paper():
    exp1 = grid_runs("exp1")
    formats = {(r.config["param_bits"], r.config["param_frac"]) for r in exp1 if r.config["method"] != "fp32"}
    assert formats == {(32, 24), (32, 20), (32, 16), (24, 16), (24, 14), (24, 12), (16, 10), (16, 8), (12, 8),
                       (12, 6), (8, 5), (8, 4), (8, 3)}
    assert all(r.config["param_frac"] == r.config["out_frac"] for r in exp1 if r.config["method"] != "fp32")
    assert {r.config["batch_size"] for r in exp1} == {256}
    exp2 = grid_runs("exp2")
    assert {r.config["batch_size"] for r in exp2} == {1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1}
    assert {f"{r.config['param_bits']}/{r.config['param_frac']}/{r.config['out_frac']}" for r in exp2
            if r.config["method"] != "fp32"} == {"32/20/16", "24/16/12", "20/12/10", "16/10/8", "12/8/6", "10/6/4",
                                                 "8/5/3", "6/4/2"}
    assert all(r.config["weight_decay"] == 0.0005 and r.config["early_stopping"] for r in exp2)
    exp3 = grid_runs("exp3")
    assert 1024 not in {r.config["batch_size"] for r in exp3}
    assert all(r.config["lr_scaling"] == "linear" for r in exp3)


@requires_fxp_train_and_data
@pytest.mark.parametrize("settings", [{}, {"method": "fp32", "batch_size": 16, "seed": 3},
                                      {"method": "hteqpu", "param_bits": 8, "param_frac": 5, "out_bits": 8,
                                       "out_frac": 3, "inference_rounding": "hte", "packed": True}])
def test_run_ids_are_fxp_trains_run_names(settings):
    """The sweep's run ids are TrainConfig::run_name, as fxp-train --print-config shows it."""
    args = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    out = subprocess.run([str(FXP_TRAIN), "--print-config", *args], check=True, capture_output=True, text=True)
    run = sweeplib.expand({"name": "g", "blocks": [{"set": settings}]})[0]
    assert pathlib.Path(json.loads(out.stdout)["output_dir"]).name == run.id


@requires_fxp_train
def test_fxp_train_checks_every_runs_values(tmp_path):
    """A bad value leaves a named run that says why fxp-train will refuse it."""
    runs = sweeplib.expand({"name": "g", "base": {"lr": 0.5},
                            "blocks": [{"axes": {"seed": [0]}}, {"set": {"lr": -1, "seed": 1}},
                                       {"set": {"lr": "x", "seed": 2}}]})
    assert [r.id for r in runs] == [f"sqpu-p16.10-o16.8-sr-b64-s{s}" for s in range(3)]
    assert [r.invalid for r in runs] == ["", "lr: must be a positive number, but got -1",
                                         'settings: key \'lr\' needs a number, but got "x"']
    # A bad value of a key that names the run: the id clash says why.
    with pytest.raises(ValueError, match="two runs share the id .*needs a string"):
        sweeplib.expand({"name": "g", "blocks": [{"axes": {"method": ["sqpu", 7]}}]})


@requires_fxp_train
def test_run_ids_are_stable():
    r = grid_runs("exp2")[0]
    assert r.id == "ste-p32.20-o32.16-sr-b1024-s0"
    assert grid_runs("exp2")[0] == r


@requires_fxp_train
@pytest.mark.parametrize("count", [1, 2, 3, 7, 16])
def test_shards_cover_every_run_exactly_once(count):
    runs = grid_runs("exp1")
    shards = [sweeplib.shard(runs, i, count) for i in range(count)]
    ids = [r.id for s in shards for r in s]
    assert sorted(ids) == sorted(r.id for r in runs)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert sweeplib.shard(list(reversed(runs)), 0, count) == shards[0]  # independent of the input order


@requires_fxp_train
def test_select_filters_seeds_and_overrides():
    runs = grid_runs("exp2")
    sel = sweeplib.select(runs, sweeplib.parse_filters(["method=sqpu,ste", "batch_size=256"]), seeds=2,
                          overrides=sweeplib.parse_assignments(["epochs=3", "train_limit=1000"]))
    assert len(sel) == 2 * 8 * 2
    assert all(r.config["epochs"] == 3 and r.config["train_limit"] == 1000 for r in sel)
    assert {r.config["seed"] for r in sel} == {0, 1}
    assert len(sweeplib.select(runs, sweeplib.parse_filters(["format=16/10/8"]))) == 11 * 3 * 10
    with pytest.raises(ValueError, match="KEY=VALUE"):
        sweeplib.parse_filters(["method"])
    with pytest.raises(ValueError, match="i/N"):
        sweeplib.parse_shard("one")
    with pytest.raises(ValueError, match="0 <= i < N"):
        sweeplib.shard(runs, 4, 4)


@requires_fxp_train
def test_filters_compare_resolved_settings_read_as_yaml():
    """--filter matches fxp-train's resolved settings, defaults included, each value read as a grid's YAML."""
    def pick(runs, *filters):
        return sweeplib.select(runs, sweeplib.parse_filters(filters))

    adapt = grid_runs("adapt-lenet5")  # its float32-update block relies on the default update
    float_block = {r.id for r in adapt if r.config["method"] == "adapt" and "update" not in r.config}
    assert len(float_block) == 3
    assert {r.id for r in pick(adapt, "method=adapt", "update=float")} == float_block
    assert len(pick(adapt, "update=float")) == 6  # the fp32 runs resolve update: float too
    assert len(pick(adapt, "update=qpu")) == 3
    msq = grid_runs("msq-resnet20")
    assert len(pick(msq, "msq_hessian=false")) == len(pick(msq, "msq_hessian=False")) == 8
    assert len(pick(msq, "msq_hessian=true")) == 6  # the default, never written for these
    exp2 = grid_runs("exp2")
    assert len(pick(exp2, "weight_decay=5e-4")) == len(pick(exp2, "weight_decay=0.0005")) == 2750
    assert pick(exp2, "weight_decay=1e-3") == []
    assert len(pick(exp2, "lr=1e-2", "dataset=fashion-mnist", "batch_size=256")) == 250


@requires_fxp_train
def test_runs_named_alike_get_the_settings_that_differ(tmp_path):
    """Note [Run ids of runs fxp-train names alike]: lr, momentum and the like are not in fxp-train's
    name; a grid that varies them gets them after it, and the same ids under --filter and --set."""
    grid = {"name": "g", "blocks": [{"axes": {"lr": [0.1, 0.2], "momentum": [0.9, 0.8]}},
                                    {"set": {"method": "fp32"}}]}
    runs = sweeplib.expand(grid, out=tmp_path)
    base = "sqpu-p16.10-o16.8-sr-b64-s0"
    assert [r.id for r in runs] == [f"{base}-lr0.1-momentum0.9", f"{base}-lr0.1-momentum0.8",
                                    f"{base}-lr0.2-momentum0.9", f"{base}-lr0.2-momentum0.8", "fp32-b64-s0"]
    one = sweeplib.select(runs, filters={"lr": {"0.2"}, "momentum": {"0.8"}}, overrides={"epochs": 5}, out=tmp_path)
    assert [r.id for r in one] == [f"{base}-lr0.2-momentum0.8"]  # alone, it keeps its suffix
    # Runs that differ in nothing a run's result depends on are one run, named twice: still an error.
    with pytest.raises(ValueError, match="share the id"):
        sweeplib.expand({"name": "g", "blocks": [{"axes": {"threads": [1, 2]}}]}, out=tmp_path)
    # Nor in settings the runs do not read (fxp-train's "unread"): fp32 has no format.
    with pytest.raises(ValueError, match="share the id fp32-b64-s0"):
        sweeplib.expand({"name": "g", "blocks": [{"set": {"method": "fp32"}, "axes": {"param_frac": [10, 8]}}]},
                        out=tmp_path)
    # A checkpoint by its run's id, not by a path that holds --out.
    sources = sweeplib.expand({"name": "g", "blocks": [
        {"set": {"method": "fp32"}, "axes": {"seed": [0, 1]}},
        {"set": {"method": "sqpu", "seed": 0}, "axes": {"init_from": ["${out}/fp32-b64-s0/checkpoint.pt",
                                                                     "${out}/fp32-b64-s1/checkpoint.pt"]}}]},
        out=tmp_path)
    assert [r.id for r in sources][2:] == [f"{base}-init_fromfp32-b64-s0", f"{base}-init_fromfp32-b64-s1"]
    with pytest.raises(ValueError, match="become the same run"):
        sweeplib.select(runs, overrides={"lr": 0.3}, out=tmp_path)


# ---- the runner, with stub runs ---------------------------------------------------

EPOCHS = 3


class StubTrainer:
    """Acts like fxp-train --resume: EPOCHS epochs, a checkpoint after each, a
    summary at the end. Records every epoch it trains; can 'kill the sweep'
    after a given number of epochs in total."""

    def __init__(self, kill_after: int | None = None, fail: set[str] = frozenset()):
        self.epochs: list[tuple[str, int]] = []
        self.kill_after = kill_after
        self.fail = fail
        self.lock = threading.Lock()
        self.active = 0

    def wait_idle(self):
        """A killed sweep's process is gone; here its worker threads may still be
        finishing a write. Wait for them, so that they do not race the next sweep."""
        while self.active:
            time.sleep(0.001)

    def __call__(self, run, d: pathlib.Path):
        with self.lock:
            self.active += 1
        try:
            self.train(run, d)
        finally:
            with self.lock:
                self.active -= 1

    def train(self, run, d: pathlib.Path):
        if run.id in self.fail:
            raise sweeplib.RunFailed("diverged")
        ckpt = d / "checkpoint.json"
        done = json.loads(ckpt.read_text())["epochs"] if ckpt.exists() else 0
        for epoch in range(done + 1, EPOCHS + 1):
            with self.lock:
                if self.kill_after is not None and len(self.epochs) >= self.kill_after:
                    raise KeyboardInterrupt  # the sweep is killed here, mid-run
                self.epochs.append((run.id, epoch))
            sweeplib.atomic_write_json(ckpt, {"epochs": epoch})
        sweeplib.atomic_write_json(d / "summary.json", {"config": run.config, "best_val_accuracy": 0.5})


def small_runs():
    grid = {"name": "mini", "base": {"batch_size": 64},
            "blocks": [{"axes": {"method": ["ste", "sqpu"], "seed": [0, 1, 2, 3, 4]}}]}
    return sweeplib.expand(grid)


@requires_fxp_train
@pytest.mark.parametrize("jobs", [1, 3])
def test_killed_sweep_resumes_without_losing_or_repeating_work(tmp_path, jobs):
    runs = small_runs()
    first = StubTrainer(kill_after=13)  # 4 runs finished, the 5th killed after one epoch (jobs=1)
    with pytest.raises(KeyboardInterrupt):
        sweeplib.execute(runs, tmp_path, first, jobs=jobs)
    first.wait_idle()
    finished = [r for r in runs if sweeplib.status(tmp_path, r) == "done"]
    assert 0 < len(finished) < len(runs)
    second = StubTrainer()
    counts = sweeplib.execute(runs, tmp_path, second, jobs=jobs)
    assert counts["skipped"] == len(finished)
    assert counts["done"] == len(runs) - len(finished)
    assert all(sweeplib.status(tmp_path, r) == "done" for r in runs)
    trained = first.epochs + second.epochs
    assert sorted(trained) == sorted((r.id, e) for r in runs for e in range(1, EPOCHS + 1))  # each epoch once
    assert not any(run_id in {r.id for r in finished} for run_id, _ in second.epochs)  # finished runs not rerun
    third = StubTrainer()
    assert sweeplib.execute(runs, tmp_path, third)["skipped"] == len(runs)
    assert third.epochs == []


@requires_fxp_train
def test_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    runs = small_runs()
    bad = runs[2].id
    counts = sweeplib.execute(runs, tmp_path, StubTrainer(fail={bad}), jobs=2)
    assert counts["failed"] == 1 and counts["done"] == len(runs) - 1
    assert sweeplib.status(tmp_path, runs[2]) == "failed"
    assert "diverged" in json.loads((tmp_path / bad / "failed.json").read_text())["error"]
    # A later sweep retries it; success clears the record.
    assert sweeplib.execute(runs, tmp_path, StubTrainer())["done"] == 1
    assert not (tmp_path / bad / "failed.json").exists()


def test_failed_json_holds_fxp_trains_exit_code(tmp_path):
    """failed.json's exit_code is fxp-train's exit status, for a solo run and for each member of a fleet
    (docs/sweeps.md, "Failures"); it was only inside the error's text."""
    fake = tmp_path / "failing-fxp-train"
    fake.write_text("#!/bin/sh\necho 'fxp-train: error: lr: must be a positive number' >&2\nexit 3\n")
    fake.chmod(0o755)
    runs = [sweeplib.Run("g", f"r{i}", (("seed", i),)) for i in range(3)]
    counts = sweeplib.execute(runs, tmp_path / "out", sweeplib.fxp_train_runner(fake, 1),
                              plan=lambda todo: [todo[:1], todo[1:]],
                              fleet_runner=sweeplib.fxp_train_fleet_runner(fake, 1))
    assert counts["failed"] == 3
    solo, *members = (json.loads((tmp_path / "out" / r.id / "failed.json").read_text()) for r in runs)
    assert (solo["exit_code"], solo["error"]) == (3, "fxp-train exited with 3: fxp-train: error: lr: must be "
                                                     "a positive number")
    assert [m["exit_code"] for m in members] == [3, 3]
    assert all(m["error"].startswith("fxp-train --fleet exited with 3: ") for m in members)


@requires_fxp_train
def test_a_directory_holding_other_settings_is_a_conflict(tmp_path):
    runs = small_runs()
    sweeplib.execute(runs[:1], tmp_path, StubTrainer())
    changed = sweeplib.select(runs[:1], overrides={"epochs": 7})
    assert sweeplib.status(tmp_path, changed[0]) == "conflict"
    assert sweeplib.execute(changed, tmp_path, StubTrainer())["conflict"] == 1


@requires_fxp_train
def test_a_finished_run_is_done_only_if_its_resolved_settings_match(tmp_path, capsys):
    """The reviewer's repro: --set train_limit=256, then the grid alone. train_limit is written nowhere in
    the grid, but the finished run's record holds 256, where the grid's run resolves to 0: a conflict."""
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 32, val_limit: 128}\n"
                                "blocks:\n  - axes: {seed: [0]}\n")
    [run] = sweeplib.expand(sweeplib.load_grid(grid))
    [limited] = sweeplib.select([run], overrides={"train_limit": 256})
    assert limited.id == run.id
    out = tmp_path / "out"
    d = out / run.id
    d.mkdir(parents=True)
    # What fxp-train records: every setting, with the threads and directory it ran with.
    record = {**sweeplib.resolve([limited.config])[0]["config"], "threads": 1, "output_dir": str(d)}
    sweeplib.atomic_write_json(d / "summary.json", {"config": record})
    assert sweeplib.status(out, limited) == "done"
    assert sweeplib.status(out, run) == "conflict"
    assert sweeplib.differences(record, run) == "train_limit (256 in the run, 0 now)"
    # A record without a key (a run older than the key) had its default; keys fxp-train ignores never conflict.
    older = {k: v for k, v in record.items() if k != "update"}
    sweeplib.atomic_write_json(d / "summary.json", {"config": {**older, "cuda_graphs": True, "data_dir": "/d"}})
    assert sweeplib.status(out, limited) == "done"
    cmd = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress"]
    assert sweep.main([*cmd, "--dry-run"]) == 0
    assert "by status: conflict 1" in capsys.readouterr().out
    assert sweep.main(cmd) == 1
    err = capsys.readouterr().err
    assert "0 run now, 0 already done, 0 failed, 1 conflicting, 0 busy" in err
    assert f"  {run.id}: its directory holds a finished run with other settings: train_limit (256 in the run, " \
           "0 now)\n" in err
    assert sweep.main([*cmd, "--set", "train_limit=256", "--threads", "3"]) == 0
    assert "0 run now, 1 already done" in capsys.readouterr().err


def test_never_conflict_mirrors_fxp_trains_keys():
    """fxp-train's key_may_change_on_resume (csrc/train/config.cpp) less epochs, which it compares when it
    decides whether a directory holds this finished run."""
    import re
    source = (ROOT / "csrc" / "train" / "config.cpp").read_text()
    body = re.search(r"bool key_may_change_on_resume\(const std::string& key\) \{(.*?)\n\}", source, re.S).group(1)
    assert set(re.findall(r'key == "(\w+)"', body)) == sweeplib.NEVER_CONFLICT | {"epochs"}


@requires_fxp_train
def test_overrides_rename_the_runs_and_may_not_merge_or_break_them(tmp_path, capsys):
    grid = write_grid(tmp_path, "name: g\nbase: {batch_size: 32}\nblocks:\n  - axes: {seed: [0, 1]}\n"
                                "  - set: {seed: 2, lr: -1}\n")
    runs = sweeplib.expand(sweeplib.load_grid(grid))
    changed = sweeplib.select(runs, overrides={"batch_size": 16})
    assert [r.id for r in changed] == [f"sqpu-p16.10-o16.8-sr-b16-s{s}" for s in range(3)]
    assert [r.origin for r in changed] == [r.id for r in runs]
    with pytest.raises(ValueError, match=r"--set batch_size=16 --set seed=7: the grid's runs "
                                         r"sqpu-p16.10-o16.8-sr-b32-s0 and sqpu-p16.10-o16.8-sr-b32-s1 become the "
                                         r"same run, sqpu-p16.10-o16.8-sr-b16-s7"):
        sweeplib.select(runs, overrides={"batch_size": 16, "seed": 7})
    out = tmp_path / "out"
    cmd = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress"]
    assert sweep.main([*cmd, "--set", "batch_size=16", "--set", "seed=7"]) == 2
    assert "become the same run" in capsys.readouterr().err
    # An override fxp-train would refuse: an error before any run starts, not a failed run.
    assert sweep.main([*cmd, "--set", "epochs=abc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sweep: --set epochs=abc: run sqpu-p16.10-o16.8-sr-b32-s0 would fail (and 1 more run): "
                          "settings: key 'epochs'"), err
    assert err.count("\n") == 1, err
    assert not out.exists()
    # A run the grid itself makes invalid still only warns (and fails alone), overrides or not.
    assert sweep.main([*cmd, "--filter", "seed=2", "--set", "epochs=2", "--dry-run"]) == 0
    assert "sweep: warning: run sqpu-p16.10-o16.8-sr-b32-s2 will fail: lr: must be" in capsys.readouterr().err
    # The directories are named by the settings they hold.
    assert sweep.main([*cmd, "--filter", "seed=0,1", "--set", "batch_size=16"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["sqpu-p16.10-o16.8-sr-b16-s0", "sqpu-p16.10-o16.8-sr-b16-s1"]
    assert json.loads((out / "sqpu-p16.10-o16.8-sr-b16-s1" / "summary.json").read_text())["config"]["seed"] == 1


ONE_IMAGE_PER_S = "method,batch_size,train_images_per_s,val_images_per_s\nsqpu,1,1,1\n"


@requires_fxp_train
@pytest.mark.parametrize("extra", [["--list"], ["--estimate", "T"], ["--estimate", "T", "--typical-epochs", "2"],
                                   ["--estimate", "T", "--fleet-throughput", "F"]])
def test_options_that_only_print_imply_dry_run(tmp_path, capsys, extra):
    (tmp_path / "T").write_text(ONE_IMAGE_PER_S)
    (tmp_path / "F").write_text("method,batch_size,members,speedup\nsqpu,1,2,2.0\n")
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, train_limit: 1000, val_limit: 800}\n"
                                "blocks:\n  - axes: {seed: [0, 1]}\n")
    out = tmp_path / "out"
    extra = [str(tmp_path / x) if x in ("T", "F") else x for x in extra]
    assert sweep.main([str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), *extra]) == 0
    assert "grid g: 2 runs" in capsys.readouterr().out
    assert not out.exists()  # nothing ran


@requires_fxp_train
def test_the_estimate_counts_pending_runs_and_takes_positive_typical_epochs(tmp_path, capsys, monkeypatch):
    (tmp_path / "t.csv").write_text(ONE_IMAGE_PER_S)
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800}\n"
                                "blocks:\n  - axes: {seed: [0, 1]}\n")
    runs = sweeplib.expand(sweeplib.load_grid(grid))
    out = tmp_path / "out"
    (out / runs[0].id).mkdir(parents=True)
    sweeplib.atomic_write_json(out / runs[0].id / "summary.json",
                               {"config": sweeplib.resolve([runs[0].config])[0]["config"]})
    cmd = [str(grid), "--out", str(out), "--estimate", str(tmp_path / "t.csv"), "--fleet", "1", "--jobs", "1"]
    assert sweep.main(cmd) == 0
    # One pending run of 1,800 images at 1 image/s: 0.5 h (both runs would be 1.0 h).
    assert "estimated wall time of the 1 pending run (of 2 selected) on 1 job at the measured " \
           "throughput: 0.5 h" in capsys.readouterr().out
    # Without --jobs: sweeplib.jobs_and_threads' default, one process per usable CPU (here 3 of them);
    # three jobs do not make one run shorter.
    monkeypatch.setattr(sweeplib, "usable_cpus", lambda: 3)
    monkeypatch.setattr(sweeplib, "usable_memory_gib", lambda: 64.0)
    assert sweep.main(cmd[:-2]) == 0
    assert "on 3 jobs at the measured throughput: 0.5 h (set by its longest run" in capsys.readouterr().out
    (out / runs[0].id / "summary.json").unlink()  # two pending runs on three jobs: still one run's time
    assert sweep.main(cmd[:-2]) == 0
    assert "the 2 pending runs (of 2 selected) on 3 jobs at the measured throughput: 0.5 h" \
        in capsys.readouterr().out
    for bad in ("-1", "nan", "0", "inf"):
        with pytest.raises(SystemExit) as e:
            sweep.main([*cmd, "--typical-epochs", bad])
        assert e.value.code == 2
        assert "argument --typical-epochs: must be a positive number" in capsys.readouterr().err
    assert sweep.main([str(grid), "--out", str(out), "--typical-epochs", "3"]) == 2
    assert capsys.readouterr().err == "sweep: --typical-epochs needs --estimate CSV\n"
    with pytest.raises(ValueError, match="positive"):
        sweeplib.estimate_seconds([], {}, float("nan"))


@requires_fxp_train
def test_sweep_cli_dry_run(capsys, tmp_path):
    assert sweep.main([str(GRIDS / "exp2.yaml"), "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2750 runs (2640 quantized, 110 fp32 baseline)" in out
    assert sweep.main([str(GRIDS / "exp3.yaml"), "--dry-run", "--shard", "1/4", "--out", str(tmp_path)]) == 0
    assert "625 runs" in capsys.readouterr().out
    assert sweep.main([str(GRIDS / "exp1.yaml"), "--shard", "x"]) == 2
    assert "i/N" in capsys.readouterr().err
    assert sweep.main([str(tmp_path / "missing.yaml"), "--dry-run"]) == 2
    with pytest.raises(SystemExit) as e:
        sweep.main(["--help"])
    assert e.value.code == 0




@requires_fxp_train_and_data
def test_sweep_runs_fxp_train_end_to_end(tmp_path, capsys):
    grid = tmp_path / "tiny.yaml"
    grid.write_text("name: tiny\nbase: {epochs: 1, train_limit: 256, val_limit: 200, batch_size: 64}\n"
                    "blocks:\n  - axes: {method: [sqpu, hteqpu]}\n  - set: {method: ste, lr: -1}\n    axes: {seed: [5]}\n")
    out = tmp_path / "out"
    code = sweep.main([str(grid), "--out", str(out), "--jobs", "2", "--threads", "1", "--no-progress"])
    assert code == 1  # the ste run has a bad lr
    assert json.loads((out / "sqpu-p16.10-o16.8-sr-b64-s0" / "summary.json").read_text())["epochs_completed"] == 1
    assert (out / "hteqpu-p16.10-o16.8-sr-b64-s0" / "summary.json").exists()
    assert "lr: must be a positive number" in (out / "ste-p16.10-o16.8-sr-b64-s5" / "failed.json").read_text()
    # The closing list gives the error on one line, not the file's JSON.
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("  ste-p16.10-o16.8-sr-b64-s5: failed: fxp-train exited"))
    assert "lr: must be a positive number" in line and "{" not in line
    # Everything finished is skipped the second time.
    assert sweep.main([str(grid), "--out", str(out), "--filter", "method=sqpu,hteqpu", "--no-progress"]) == 0


@requires_fxp_train
def test_messages_count_one_thing_in_the_singular(tmp_path, capsys, monkeypatch):
    """"1 run", "1 job x 2 threads", "1 fleet (up to 2 members)": not "1 runs" or "job(s)"."""
    monkeypatch.setattr(sweeplib, "usable_cpus", lambda: 2)
    (tmp_path / "t.csv").write_text(ONE_IMAGE_PER_S)
    (tmp_path / "f.csv").write_text("method,batch_size,members,speedup\nsqpu,1,2,2.0\n")
    grid = write_grid(tmp_path, "name: g\nbase: {epochs: 1, batch_size: 1, train_limit: 1000, val_limit: 800}\n"
                                "blocks:\n  - axes: {seed: [0]}\n")
    out = tmp_path / "out"
    cmd = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--jobs", "1",
           "--threads", "2", "--no-progress"]
    assert sweep.main([*cmd, "--estimate", str(tmp_path / "t.csv"), "--fleet-throughput", str(tmp_path / "f.csv")]) == 0
    text = capsys.readouterr().out
    assert "grid g: 1 run (1 quantized, 0 fp32 baseline)" in text
    assert "  fleets: none; 1 pending run alone\n" in text  # was "0 pending runs in 0 fleets (up to 1 members)"
    assert "estimated wall time of the 1 pending run (of 1 selected) in fleets on 1 job at the measured " \
           "throughput: 0.5 h" in text  # was "with fleets with 1 job(s)"
    assert sweep.main(cmd) == 0
    assert capsys.readouterr().err.startswith(f"sweep g: 1 run, 1 job x 2 threads -> {out}\n")
    assert sweeplib.oversubscription(1, 3, "cpu", 1).startswith("1 job x 3 threads is more than the 1 CPU this")
    assert [sweeplib.plural(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]


# ---- grid and argument checks ---------------------------------------------------------

# fxp-train's config keys (csrc/train/config.cpp), for a stand-in that needs no build.
KEYS = ["model", "dataset", "method", "param_bits", "param_frac", "out_bits", "out_frac", "inference_rounding", "momentum_form",
        "packed", "adapt_start_bits", "adapt_start_frac", "adapt_resolution_min", "adapt_resolution_max",
        "adapt_lookback_min", "adapt_lookback_max", "adapt_lookback_momentum", "adapt_buffer_bits", "adapt_strategy",
        "adapt_log", "l1_decay", "batch_size", "lr", "lr_scaling", "momentum", "weight_decay", "scheduler", "plateau_patience",
        "plateau_factor", "epochs", "early_stopping", "early_stopping_patience", "early_stopping_min_epochs",
        "seed", "device", "threads", "cuda_graphs", "data_dir", "train_limit", "val_limit", "eval_batch_size", "bn_recalibration_batches",
        "normalize_mean",
        "normalize_std", "output_dir"]


def fake_fxp_train(tmp_path) -> pathlib.Path:
    """A stand-in for fxp-train that keeps its contract: --print-config prints
    every key; a run of the sweep's (-c run.json, or each member of a --fleet)
    holds <run dir>/.lock (exit 75 when another process has it), trains in no
    time and writes its summary. Anything else (naming and checking runs, the
    sweep's GPU probe) is the real fxp-train's."""
    path = tmp_path / "fake-fxp-train"
    path.write_text(f"""#!{sys.executable}
import fcntl, json, os, sys
if "-c" not in sys.argv and "--fleet" not in sys.argv:
    os.execv({str(FXP_TRAIN)!r}, [{str(FXP_TRAIN)!r}, *sys.argv[1:]])
if "--fleet" in sys.argv:  # a fleet: every member's settings, one JSON line each
    configs = [json.loads(line) for line in open(sys.argv[sys.argv.index("--fleet") + 1]) if line.strip()]
else:
    configs = [json.load(open(sys.argv[sys.argv.index("-c") + 1]))]
locks = []
for config in configs:
    locks.append(open(os.path.join(config["output_dir"], ".lock"), "a"))
    try:
        fcntl.flock(locks[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("fxp-train: " + config["output_dir"] + " is in use by another fxp-train", file=sys.stderr)
        sys.exit(75)
for config in configs:
    with open(os.path.join(config["output_dir"], "summary.json"), "w") as f:
        json.dump({{"config": config}}, f)
""")
    path.chmod(0o755)
    return path


def write_grid(tmp_path, text: str) -> pathlib.Path:
    path = tmp_path / "g.yaml"
    path.write_text(text)
    return path


GOOD_BLOCKS = "blocks:\n  - axes: {seed: [0, 1]}\n"


@pytest.mark.parametrize("text,place", [
    ("blocks: {axes: {seed: [0]}}\n", "blocks must be a non-empty list"),
    ("blocks: []\n", "blocks must be a non-empty list"),
    ("blocks:\n", "blocks must be a non-empty list"),
    ("name: g\n", "blocks must be a non-empty list"),
    ("base: [1, 2]\n" + GOOD_BLOCKS, ", base: expected a mapping"),
    ("blocks:\n  - set: [1, 2]\n", "block 0, set: expected a mapping"),
    ("blocks:\n  - axes: {seed: [0]}\n  -\n", "block 1: expected a mapping"),
    ("blocks:\n  - axes: [seed]\n", "block 0: axes must be a mapping"),
    ("blocks:\n  - axes: {seed: 3}\n", "block 0, axis seed: needs a non-empty list"),
    ("blocks:\n  - axes: {seed: []}\n", "block 0, axis seed: needs a non-empty list"),
    ("blocks:\n  - name: quick\n    axes: {seed: [[0, 1]]}\n",
     "block 0 (quick), axis seed: seed must be a single value"),
    ("[1, 2]\n", "expected a mapping with name, base and blocks"),
    ("blocks:\n  - axes: {seed: [0, 1}\n", "line 2, column 23: expected ',' or ']', but got '}'"),
    ("name: [1]\n" + GOOD_BLOCKS, "name must be a non-empty string"),
    ("name: ../../escape\n" + GOOD_BLOCKS, "name must be a non-empty string without '/'"),  # outside results/
    # typos
    ("blocks:\n  - axis: {method: [ste, sqpu, hteqpu], seed: [0, 1]}\n",
     "block 0: unknown key 'axis' (did you mean 'axes'?)"),  # was 1 run instead of 6
    ("bse: {lr: 0.1}\n" + GOOD_BLOCKS, "unknown key 'bse' (did you mean 'base'?)"),
    ("base: {bse: 3}\n" + GOOD_BLOCKS, ", base: unknown setting 'bse'"),
    ("blocks:\n  - set: {methd: ste}\n", "block 0, set: unknown setting 'methd' (did you mean 'method'?)"),
    ("blocks:\n  - axes: {sed: [0]}\n", "block 0, axis sed: unknown setting 'sed'"),  # was one run, silently
    ("blocks:\n  - axes: {format: [{param_bits: 8, param_frc: 4}]}\n", "axis format: unknown setting 'param_frc'"),
    # a key given twice: YAML keeps the last one silently
    ("base: {lr: 0.1, lr: 0.2}\n" + GOOD_BLOCKS, "line 1, column 17: key 'lr' is given twice"),
])
@requires_fxp_train
def test_malformed_grids_are_one_line_errors(tmp_path, capsys, text, place):
    grid = write_grid(tmp_path, text)
    assert sweep.main([str(grid), "--dry-run", "--out", str(tmp_path / "out"),
                       "--fxp-train", str(fake_fxp_train(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith((f"sweep: grid {grid}", f"sweep: cannot read grid {grid}")), err
    assert err.count("\n") == 1, err
    assert place in err, err


@pytest.mark.parametrize("args,message", [
    (["--filter", "metod=sqpu"], "--filter metod=sqpu: unknown setting 'metod' (did you mean 'method'?)"),
    (["--set", "bse=3"], "--set bse=3: unknown setting 'bse' (fxp-train --print-config lists them)"),
    (["--set", "lr=[1, 2]"], "--set lr=[1, 2]: lr must be a single value, got [1, 2]"),
    (["--set", "lr=[1"], "--set lr=[1: line 1, column 3: expected ',' or ']', but got '<stream end>'"),
])
@requires_fxp_train
def test_unknown_filter_and_set_keys_are_errors(tmp_path, capsys, args, message):
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    assert sweep.main([str(grid), "--dry-run", "--out", str(tmp_path / "out"),
                       "--fxp-train", str(fake_fxp_train(tmp_path)), *args]) == 2
    assert capsys.readouterr().err == f"sweep: {message}\n"


@requires_fxp_train
def test_setting_keys_come_from_fxp_train(tmp_path, capsys):
    grid = write_grid(tmp_path, "base: {lr: 0.1}\n" + GOOD_BLOCKS)
    fake = str(fake_fxp_train(tmp_path))
    common = [str(grid), "--dry-run", "--out", str(tmp_path / "out")]
    assert sweep.main([*common, "--fxp-train", fake, "--filter", "format=16/10/8", "--filter", "seed=0"]) == 0
    assert "sweep: warning" not in capsys.readouterr().err
    # fxp-train names the runs and checks their settings, so even a dry run needs it.
    missing = ["--fxp-train", str(tmp_path / "missing")]
    for extra in ([], ["--dry-run"]):
        assert sweep.main([str(grid), "--out", str(tmp_path / "out"), *missing, *extra]) == 2
        assert "not an executable" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\nexit 3\n")
    broken.chmod(0o755)
    assert sweep.main([*common, "--fxp-train", str(broken)]) == 2
    assert "--print-config" in capsys.readouterr().err


@requires_fxp_train_and_data
def test_the_grids_use_fxp_trains_keys():
    keys = sweeplib.config_keys(FXP_TRAIN)
    assert {"lr", "seed", "threads", "output_dir"} <= keys
    grids = sorted(GRIDS.glob("*.yaml"))
    assert {"exp1", "exp2", "exp3", "msq-resnet20"} <= {g.stem for g in grids}
    for grid in grids:
        sweeplib.load_grid(grid, keys)


@pytest.mark.parametrize("flag", ["--limit", "--seeds", "--jobs", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1", "-3", "two"])
def test_counts_below_one_are_errors(capsys, flag, value):
    with pytest.raises(SystemExit) as e:
        sweep.main([str(GRIDS / "exp1.yaml"), "--dry-run", flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and ("must be at least 1" in err or "whole number" in err), err


@requires_fxp_train
def test_out_under_a_regular_file_is_an_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    for extra in (["--dry-run"], []):
        assert sweep.main([str(grid), "--out", str(tmp_path / "file" / "out"), "--no-progress",
                           "--fxp-train", str(fake_fxp_train(tmp_path)), *extra]) == 2
        assert capsys.readouterr().err == f"sweep: --out {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} " \
                                          "is not a directory\n"


@requires_fxp_train
@pytest.mark.parametrize("text,value", [("1e-3", 0.001), ("1E5", 1e5), ("-2.5e+3", -2500.0), (".5", 0.5),
                                        ("1.0", 1.0), ("+1e3", 1000.0), ("1", 1), ("-7", -7), ('"1e-3"', "1e-3"),
                                        ("'1'", "1"), ("sr", "sr"), ("true", True), ("1e", "1e")])
def test_numbers_are_read_as_users_write_them(tmp_path, text, value):
    """YAML 1.2 floats (PyYAML's YAML 1.1 needs a dot), in grids and in --set alike."""
    run = sweeplib.expand(sweeplib.load_grid(write_grid(tmp_path, f"base: {{lr: {text}}}\n" + GOOD_BLOCKS)))[0]
    [override] = sweeplib.parse_assignments([f"lr={text}"]).values()
    for got in (sweeplib.parse_yaml(text), run.config["lr"], override):
        assert got == value and type(got) is type(value)


@requires_fxp_train
@pytest.mark.parametrize("text,value", [("010", 10), ("+7", 7), ("0x10", "0x10"), ("1_000", "1_000"),
                                        ("1:30", "1:30"), ("yes", "yes"), ("on", "on"), ("True", True)])
def test_integers_and_booleans_are_read_as_fxp_train_reads_them(tmp_path, text, value):
    """Decimal integers (PyYAML's YAML 1.1 reads 010 as 8) and booleans spelled
    true/false only, as fxp-train's config reader: a grid, --set and -c agree."""
    got = sweeplib.parse_yaml(text)
    assert got == value and type(got) is type(value)
    config = tmp_path / "run.yaml"
    config.write_text(f"seed: {text}\n")
    p = subprocess.run([str(sweeplib.DEFAULT_FXP_TRAIN), "-c", str(config), "--print-config"], capture_output=True,
                       text=True)
    if isinstance(value, int) and not isinstance(value, bool):
        assert p.returncode == 0 and json.loads(p.stdout)["seed"] == value
    else:  # not an integer to either reader
        assert p.returncode == 2 and "seed" in p.stderr


# ---- busy runs: another process holds the run directory's lock -----------------------

class LockHolder:
    """A process that holds flock(LOCK_EX) on a run directory's .lock, as a running fxp-train does."""

    def __init__(self, run_dir: pathlib.Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        code = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
                "print('locked', flush=True)\ntime.sleep(300)\n")
        self.p = subprocess.Popen([sys.executable, "-c", code, str(run_dir / ".lock")], stdout=subprocess.PIPE,
                                  text=True)
        assert self.p.stdout.readline() == "locked\n"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.p.kill()
        self.p.wait()
        self.p.stdout.close()


@requires_fxp_train
def test_a_run_locked_by_another_process_is_busy_and_not_started(tmp_path):
    runs = small_runs()
    busy = runs[1]
    with LockHolder(tmp_path / busy.id) as holder:
        assert sweeplib.status(tmp_path, busy) == "busy"
        assert sweeplib.status(tmp_path, runs[0]) == "pending"
        stub = StubTrainer()
        counts = sweeplib.execute(runs, tmp_path, stub, jobs=2)
        assert counts["busy"] == 1 and counts["failed"] == 0 and counts["done"] == len(runs) - 1
        assert busy.id not in {run_id for run_id, _ in stub.epochs}
        assert not (tmp_path / busy.id / "failed.json").exists()
        assert sweeplib.status(tmp_path, busy) == "busy"  # the probe took nothing from the holder
        assert holder.p.poll() is None
    # The probe leaves no lock behind: fxp-train gets it.
    with open(tmp_path / busy.id / ".lock") as f:
        assert sweeplib.status(tmp_path, busy) == "pending"
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sweeplib.execute(runs, tmp_path, StubTrainer())["done"] == 1


@requires_fxp_train
def test_fxp_train_finding_the_run_locked_makes_it_busy_not_failed(tmp_path):
    """The race after the probe: fxp-train itself finds the lock taken and exits with 75."""
    loser = tmp_path / "loser"
    loser.write_text("#!/bin/sh\necho 'fxp-train: this run is in use by another fxp-train' >&2\nexit 75\n")
    loser.chmod(0o755)
    runs = small_runs()[:3]
    counts = sweeplib.execute(runs, tmp_path, sweeplib.fxp_train_runner(loser, threads=1), jobs=2)
    assert counts["busy"] == 3 and counts["failed"] == 0
    assert not any((tmp_path / r.id / "failed.json").exists() for r in runs)


@requires_fxp_train
def test_sweep_cli_reports_busy_runs(tmp_path, capsys):
    grid = write_grid(tmp_path, "name: g\nblocks:\n  - axes: {method: [ste, sqpu]}\n")
    out = tmp_path / "out"
    cmd = [str(grid), "--out", str(out), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress"]
    with LockHolder(out / "ste-p16.10-o16.8-sr-b64-s0"):
        assert sweep.main([*cmd, "--dry-run"]) == 0
        assert "by status: busy 1, pending 1" in capsys.readouterr().out
        assert sweep.main(cmd) == 75
        err = capsys.readouterr().err
        assert "1 run now, 0 already done, 0 failed, 0 conflicting, 1 busy" in err
        assert "  ste-p16.10-o16.8-sr-b64-s0: busy, another fxp-train is training it\n" in err
        assert (out / "sqpu-p16.10-o16.8-sr-b64-s0" / "summary.json").exists()  # the sweep kept no lock
        assert not (out / "ste-p16.10-o16.8-sr-b64-s0" / "failed.json").exists()
    assert sweep.main(cmd) == 0
    assert "1 run now, 1 already done, 0 failed, 0 conflicting, 0 busy" in capsys.readouterr().err


@requires_fxp_train
def test_settings_that_cannot_change_results_never_conflict(tmp_path, capsys):
    runs = small_runs()
    sweeplib.execute(runs[:1], tmp_path, StubTrainer())
    for key, value in [("threads", 2), ("output_dir", "/elsewhere"), ("data_dir", "/data")]:
        assert sweeplib.status(tmp_path, sweeplib.select(runs[:1], overrides={key: value})[0]) == "done", key
    assert sweeplib.NEVER_CONFLICT == {"threads", "output_dir", "data_dir", "cuda_graphs"}
    # Through the CLI: fxp-train records the threads it ran with.
    grid = write_grid(tmp_path, GOOD_BLOCKS)
    cmd = [str(grid), "--out", str(tmp_path / "out"), "--fxp-train", str(fake_fxp_train(tmp_path)), "--no-progress"]
    assert sweep.main([*cmd, "--threads", "1"]) == 0
    assert sweep.main([*cmd, "--set", "threads=2"]) == 0
    assert "0 run now, 2 already done, 0 failed, 0 conflicting" in capsys.readouterr().err


# ---- the report on synthetic results ---------------------------------------------------

def synthetic_results(root: pathlib.Path, grid_name: str, runs) -> dict:
    rng = random.Random(0)
    accuracy = {}
    for r in runs:
        d = root / r.id
        d.mkdir(parents=True)
        acc = round(rng.uniform(0.1, 0.92), 4)
        accuracy[r.id] = acc
        sweeplib.atomic_write_json(d / "sweep-run.json", {"grid": grid_name, "id": r.id, "settings": r.config})
        sweeplib.atomic_write_json(d / "summary.json", {
            "config": r.config, "best_val_accuracy": acc, "best_epoch": 3, "final_val_accuracy": acc,
            "epochs_completed": 5, "stop_reason": "epochs", "wall_time_s": 1.0, "train_images_per_s": 1000.0,
            "memory_model": {"paper": {"ratio_to_ste": 0.6, "ratio_to_fp32": 0.5}}})
    return accuracy


@requires_fxp_train
def test_report_draws_the_figures_and_tables(tmp_path):
    exp1 = sweeplib.select(grid_runs("exp1"), seeds=2)
    exp2 = sweeplib.select(grid_runs("exp2"), sweeplib.parse_filters(["batch_size=256,16,1"]), seeds=3)
    acc1 = synthetic_results(tmp_path / "exp1", "exp1", exp1)
    synthetic_results(tmp_path / "exp2", "exp2", exp2)
    (tmp_path / "exp2" / "broken").mkdir()
    sweeplib.atomic_write_json(tmp_path / "exp2" / "broken" / "sweep-run.json",
                               {"grid": "exp2", "id": "broken", "settings": exp2[0].config})
    sweeplib.atomic_write_json(tmp_path / "exp2" / "broken" / "failed.json", {"error": "boom"})
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "exp1"), str(tmp_path / "exp2"), "--out", str(out)]) == 0
    for name in ["runs.csv", "stats.csv", "report.md", "exp1-best-worst-hte.png", "exp1-best-worst-sr.png",
                 "exp2-max.png", "exp2-mean.png", "exp2-std.png", "memory-accuracy.png"]:
        assert (out / name).stat().st_size > 0, name
    import pandas as pd
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == len(exp1) + len(exp2) + 1
    assert (runs.status == "failed").sum() == 1
    # Whole numbers stay whole where the failed run has none (pandas would hold them as float: 3.0).
    import csv
    rows = list(csv.DictReader(open(out / "runs.csv")))
    assert {r["best_epoch"] for r in rows} == {"3", ""} and {r["epochs_completed"] for r in rows} == {"5", ""}
    assert all(r["param_bits"].isdigit() for r in rows if r["method"] != "fp32")
    stats = pd.read_csv(out / "stats.csv")
    # best over the two seeds of one Exp 1 configuration, computed by hand
    ids = [r.id for r in exp1 if r.config["method"] == "sqpu" and r.config["param_bits"] == 16
           and r.config["param_frac"] == 10 and r.config["inference_rounding"] == "sr"]
    row = stats[(stats.grid == "exp1") & (stats.method == "sqpu") & (stats.fxp == "16/10/10")
                & (stats.inference_rounding == "sr")]
    assert row["max"].item() == pytest.approx(max(acc1[i] for i in ids))
    assert row["min"].item() == pytest.approx(min(acc1[i] for i in ids))
    assert row["runs"].item() == 2
    md = (out / "report.md").read_text()
    assert "| exp1 | fp32 baseline, best run | 90.0% |" in md
    assert "![exp2-max](exp2-max.png)" in md


def test_report_without_results_is_an_error(tmp_path, capsys):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "no finished runs" in capsys.readouterr().err
    assert report.main([str(tmp_path / "nope")]) == 2


def test_report_without_finished_runs_names_the_failures(tmp_path, capsys):
    """A grid whose every run failed: the message says how many failed and why the first did."""
    for i in range(3):
        failed_run(tmp_path / "g" / f"r{i}", {"method": "sqpu"})
    (tmp_path / "g" / "r0" / "failed.json").write_text(json.dumps({"error": "lr: must be a positive number\nmore"}))
    assert report.main([str(tmp_path / "g"), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert err == (f"report: no finished runs (summary.json) below {tmp_path / 'g'}; 3 runs failed, the first with: "
                   f"lr: must be a positive number ({tmp_path / 'g' / 'r0' / 'failed.json'})\n")
    assert not (tmp_path / "r").exists()


def finished_run(d: pathlib.Path, config: dict, accuracy: float = 0.5, grid: str = "g") -> pathlib.Path:
    d.mkdir(parents=True)
    sweeplib.atomic_write_json(d / "sweep-run.json", {"grid": grid, "id": d.name, "settings": config})
    sweeplib.atomic_write_json(d / "summary.json", {"config": config, "best_val_accuracy": accuracy})
    return d


def failed_run(d: pathlib.Path, settings: dict, config: dict | None = None, grid: str = "g") -> pathlib.Path:
    """A failed run as the sweep leaves it: its settings as the grid writes them, and fxp-train's
    config.json where fxp-train got as far as starting it."""
    d.mkdir(parents=True)
    sweeplib.atomic_write_json(d / "sweep-run.json", {"grid": grid, "id": d.name, "settings": settings})
    sweeplib.atomic_write_json(d / "failed.json", {"error": "boom"})
    if config is not None:
        sweeplib.atomic_write_json(d / "config.json", config)
    return d


SQPU = {"method": "sqpu", "param_bits": 16, "param_frac": 10, "out_frac": 8, "batch_size": 64, "seed": 0,
        "inference_rounding": "sr"}


def report_rows(out: pathlib.Path):
    import pandas as pd
    return pd.read_csv(out / "runs.csv")


def test_report_takes_failed_runs_whose_grid_relied_on_default_formats(tmp_path):
    finished_run(tmp_path / "r" / "done", SQPU)
    failed_run(tmp_path / "r" / "defaults", {"seed": 1})  # no method, no format: fxp-train's defaults
    failed_run(tmp_path / "r" / "sqpu", {"method": "sqpu", "seed": 2})
    failed_run(tmp_path / "r" / "msq", {"method": "msq", "seed": 3})
    failed_run(tmp_path / "r" / "started", {"seed": 4}, config={**SQPU, "seed": 4, "param_bits": 12})
    out = tmp_path / "report"
    assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 0
    rows = report_rows(out).set_index("id")
    assert list(rows.status[["defaults", "sqpu", "msq", "started"]]) == ["failed"] * 4
    assert rows.fxp["defaults"] == "?" and rows.fxp["sqpu"] == "?/?/?"
    assert rows.fxp["msq"].startswith("msq λ=?")
    assert rows.fxp["started"] == "12/10/8"  # from fxp-train's config.json


def test_report_skips_broken_files_with_a_warning_naming_them(tmp_path, capsys):
    root = tmp_path / "r"
    finished_run(root / "good", SQPU)
    (finished_run(root / "invalid", SQPU) / "summary.json").write_text("{not json")
    (finished_run(root / "list", SQPU) / "summary.json").write_text("[1, 2]\n")
    (finished_run(root / "sweep-list", SQPU) / "sweep-run.json").write_text("[]\n")
    (failed_run(root / "failed-broken", {"seed": 1}) / "failed.json").write_text("{")
    adapt = finished_run(root / "adapt", {"method": "adapt", "batch_size": 64, "seed": 0})
    layers = [{"name": "conv1", "bits": 8}]
    good = {"epoch": 1, "val_accuracy": 0.5, "adapt": {"layers": layers, "performance": {
        "float32_cost": 2.0, "cost": 1.0, "training_speedup": 2.0, "model_size": 0.5, "inference_speedup": 2.0}}}
    (adapt / "metrics.jsonl").write_text(json.dumps(good) + "\n{broken\n[3]\n")
    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for path, problem in [(root / "invalid" / "summary.json", "not valid JSON"),
                          (root / "list" / "summary.json", "expected a JSON object, got list"),
                          (root / "sweep-list" / "sweep-run.json", "expected a JSON object, got list"),
                          (root / "failed-broken" / "failed.json", "not valid JSON"),
                          (f"{adapt / 'metrics.jsonl'} line 2", "not valid JSON"),
                          (f"{adapt / 'metrics.jsonl'} line 3", "expected a JSON object, got list")]:
        assert f"report: warning: skipping {path}: {problem}" in err, (path, err)
    rows = report_rows(out)
    assert sorted(rows.dir.map(lambda d: pathlib.Path(d).name)) == ["adapt", "good", "sweep-list"]
    assert (out / "adapt.csv").exists()  # from the one good line


def test_report_out_on_a_regular_file_is_an_error(tmp_path, capsys):
    finished_run(tmp_path / "r" / "done", SQPU)
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        assert report.main([str(tmp_path / "r"), "--out", str(out)]) == 2
        assert capsys.readouterr().err == f"report: --out {out}: {tmp_path / 'file'} is not a directory\n"


def test_report_counts_every_run_once_however_its_root_is_given(tmp_path):
    finished_run(tmp_path / "r" / "a" / "one", SQPU)
    finished_run(tmp_path / "r" / "a" / "two", {**SQPU, "seed": 1})
    failed_run(tmp_path / "r" / "a" / "three", {**SQPU, "seed": 2})
    out = tmp_path / "report"
    roots = [tmp_path / "r", tmp_path / "r", tmp_path / "r" / ".." / "r", tmp_path / "r" / "a"]
    assert report.main([*map(str, roots), "--out", str(out)]) == 0
    rows = report_rows(out)
    assert len(rows) == 3 and rows.dir.is_unique
    import pandas as pd
    assert pd.read_csv(out / "stats.csv")["runs"].sum() == 2


def compared_run(root: pathlib.Path, name: str, config: dict, best: float, step_bytes: int, images_per_s: float,
                 grid: str = "cmp", **summary) -> None:
    """A finished run with what the methods' comparison reads: accuracies, the measured step, its speed."""
    d = root / name
    d.mkdir(parents=True)
    config = {"model": "lenet5", "dataset": "fashion-mnist", "batch_size": 256, "seed": 0, "lr": 0.01, "momentum": 0.9,
              **config}  # fxp-train writes every key; these are the ones the test varies
    sweeplib.atomic_write_json(d / "sweep-run.json", {"grid": grid, "id": name, "settings": config})
    sweeplib.atomic_write_json(d / "summary.json", {
        "config": config, "best_val_accuracy": best, "final_val_accuracy": best - 0.01,
        "train_images_per_s": images_per_s, "measured_memory": {"step": {"total_bytes": step_bytes}}, **summary})


def test_report_compares_the_methods_side_by_side(tmp_path):
    """Each method's model size by its own definition, the accuracy of the model of that size, and
    the measured step memory and speed against the same group's float32 runs; runs merge as seeds
    only where every setting but the seed is equal; a group with one method is not compared."""
    root = tmp_path / "cmp"
    compared_run(root, "fp32-s0", {"method": "fp32"}, 0.80, 1000, 100.0)
    compared_run(root, "fp32-s1", {"method": "fp32", "seed": 1}, 0.84, 1000, 300.0)
    qpu = {"method": "sqpu", "param_bits": 8, "param_frac": 5, "out_bits": 8, "out_frac": 3}
    compared_run(root, "sqpu-s0", qpu, 0.70, 600, 150.0)
    compared_run(root, "sqpu-s1", {**qpu, "seed": 1}, 0.76, 600, 250.0)
    # A setting the report's columns do not hold (momentum), and one the label does not show (out_bits).
    compared_run(root, "sqpu-no-momentum", {**qpu, "momentum": 0.0}, 0.65, 600, 200.0)
    compared_run(root, "sqpu-out16", {**qpu, "out_bits": 16}, 0.71, 600, 200.0)
    compared_run(root, "adapt-qpu", {"method": "adapt", "update": "qpu"}, 0.81, 1500, 100.0,
                 adapt={"model_size": 0.3})
    msq = {"method": "msq", "msq_lambda": 0.01, "msq_alpha": 0.9, "msq_start_bits": 8}
    # Each seed fine-tunes its own seed's float32 run: one configuration. From scratch is another.
    for seed, best in ((0, 0.78), (1, 0.80)):
        compared_run(root, f"msq-s{seed}", {**msq, "seed": seed, "init_from": str(root / f"fp32-s{seed}" / "ckpt.pt")},
                     best, 1000, 50.0, msq={"export": {"measured_compression": 4.0}})
    compared_run(root, "msq-scratch", msq, 0.50, 1000, 50.0, msq={"export": {"measured_compression": 4.0}})
    # Two HTEQPU configurations that only the learning rate tells apart: two rows, not one of two seeds.
    hte = {"method": "hteqpu", "param_bits": 16, "param_frac": 10, "out_bits": 16, "out_frac": 8}
    compared_run(root, "hte-lr0.01", hte, 0.60, 600, 200.0)
    compared_run(root, "hte-lr0.1", {**hte, "lr": 0.1}, 0.40, 600, 200.0)
    # Without float32 runs (batch 64): compared, with no ratios. With float32 alone (batch 16), and a grid
    # of the paper's: not compared.
    compared_run(root, "adapt-b64", {"method": "adapt", "batch_size": 64}, 0.70, 900, 80.0, adapt={"model_size": 0.5})
    compared_run(root, "adapt-qpu-b64", {"method": "adapt", "update": "qpu", "batch_size": 64}, 0.72, 900, 80.0,
                 adapt={"model_size": 0.4})
    compared_run(root, "fp32-b16", {"method": "fp32", "batch_size": 16}, 0.85, 900, 80.0)
    compared_run(root, "exp2-fp32", {"method": "fp32"}, 0.85, 900, 80.0, grid="exp2")
    compared_run(root, "exp2-sqpu", qpu, 0.85, 900, 80.0, grid="exp2")
    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 0
    import pandas as pd
    table = pd.read_csv(out / "methods.csv")
    assert set(table.batch_size) == {64, 256} and set(table.grid) == {"cmp"}
    main = table[table.batch_size == 256].set_index(["method", "configuration"])
    assert sorted(main.index) == [
        ("adapt-qpu", "adapt-qpu"), ("fp32", "fp32"), ("hteqpu", "16/10/8 lr=0.01"), ("hteqpu", "16/10/8 lr=0.1"),
        ("msq", "msq λ=0.01 α=0.9 from 8b from fp32"), ("msq", "msq λ=0.01 α=0.9 from 8b from scratch"),
        ("sqpu", "8/5/3 momentum=0.0 out_bits=8"), ("sqpu", "8/5/3 momentum=0.9 out_bits=16"),
        ("sqpu", "8/5/3 momentum=0.9 out_bits=8")]
    fp32 = main.loc[("fp32", "fp32")]
    assert (fp32.runs, fp32.accuracy_mean, fp32.model_size) == (2, pytest.approx(0.82), 1.0)
    sqpu = main.loc[("sqpu", "8/5/3 momentum=0.9 out_bits=8")]
    assert sqpu.runs == 2
    assert (sqpu.accuracy_min, sqpu.accuracy_max, sqpu.accuracy_mean) == (0.70, 0.76, pytest.approx(0.73))
    assert sqpu.accuracy_std == pytest.approx(0.06 / 2 ** 0.5)
    assert (sqpu.best_mean, sqpu.final_mean) == (pytest.approx(0.73), pytest.approx(0.72))
    assert sqpu.model_size == 8 / 32
    assert sqpu.step_memory_ratio == pytest.approx(0.6)
    assert sqpu.images_per_s_ratio == pytest.approx(1.0)  # 200 against 200 images/s
    # AdaPT and MSQ: the final model's size, so the final epoch's accuracy (compared_run: best - 0.01).
    adapt = main.loc[("adapt-qpu", "adapt-qpu")]
    assert (adapt.model_size, adapt.step_memory_ratio, adapt.images_per_s_ratio) == (0.3, 1.5, 0.5)
    assert (adapt.accuracy_mean, adapt.best_mean) == (pytest.approx(0.80), pytest.approx(0.81))
    tuned = main.loc[("msq", "msq λ=0.01 α=0.9 from 8b from fp32")]
    assert (tuned.runs, tuned.accuracy_mean, tuned.model_size) == (2, pytest.approx(0.78), 0.25)
    assert main.loc[("msq", "msq λ=0.01 α=0.9 from 8b from scratch")].runs == 1
    assert main.loc[("hteqpu", "16/10/8 lr=0.1")].accuracy_mean == 0.40
    no_baseline = table[table.batch_size == 64]
    assert set(no_baseline.method) == {"adapt", "adapt-qpu"}
    assert no_baseline.step_memory_ratio.isna().all() and no_baseline.images_per_s_ratio.isna().all()
    md = (out / "report.md").read_text()
    assert "## Methods compared" in md and "**cmp: lenet5 on fashion-mnist, batch 256**" in md
    assert ("| sqpu | 8/5/3 momentum=0.9 out_bits=8 | 2 | 73.0% | 4.2 | 70.0% – 76.0% | 73.0% | 72.0% | 0.25 | "
            "0.60 | 1.00 |") in md
    assert "| adapt-qpu | adapt-qpu | 1 | 71.0% | – | 71.0% – 71.0% | 72.0% | 71.0% | 0.40 | – | – |" in md
    assert "batch 16**" not in md and "**exp2" not in md
    for batch in (64, 256):
        assert (out / f"methods-cmp-lenet5-fashion-mnist-b{batch}.png").stat().st_size > 0


@requires_fxp_train
def test_slurm_array_task_runs_its_shard(tmp_path):
    import os
    import subprocess
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="5", SLURM_ARRAY_TASK_MIN="4", SLURM_ARRAY_TASK_COUNT="4",
               SLURM_CPUS_PER_TASK="8", SLURM_SUBMIT_DIR=str(ROOT), FXP_SYSTEM_PYTHON="1",
               PATH=f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    p = subprocess.run(["bash", str(ROOT / "scripts/slurm/sweep.sbatch"), str(GRIDS / "exp2.yaml"), "--dry-run",
                        "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "688 runs" in p.stdout and "shard 1/4" in p.stdout  # 2750 runs: shards of 688, 688, 687, 687
    env.pop("SLURM_ARRAY_TASK_ID")
    p = subprocess.run(["bash", str(ROOT / "scripts/slurm/sweep.sbatch"), str(GRIDS / "exp2.yaml")], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "job array" in p.stderr


def resolved(train: int = 60000, validation: int = 10000, **config) -> dict:
    """A run as sweeplib.resolved_runs gives it: fxp-train's full config and the images of an epoch."""
    return {"config": config, "epoch_images": {"train": train, "validation": validation}}


def test_wall_time_estimate(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("method,batch_size,train_images_per_s,val_images_per_s\n"
                   "sqpu,1,100,1000\nsqpu,100,10000,1000\nfp32,1,100,1000\n")
    table = sweeplib.load_throughput(csv)
    # No early stopping: 2 epochs x (60000/10000 + 10000/1000) s = 32 s, whatever the typical epochs.
    assert sweeplib.estimate_seconds([resolved(method="sqpu", batch_size=100, epochs=2)], table) == (32, 32, 32)
    # Batch 10 lies halfway between 1 and 100 in log space: 1000 images/s.
    low, mid, high = sweeplib.estimate_seconds(
        [resolved(1000, 1000, method="sqpu", batch_size=10, epochs=100, early_stopping=True,
                  early_stopping_min_epochs=20)], table)
    assert (low, mid, high) == pytest.approx((20 * 2, 60 * 2, 100 * 2))
    assert sweeplib.estimate_seconds([resolved(method="fp32", batch_size=1000, epochs=1)], table) == (610, 610, 610)


def test_wall_time_estimate_follows_the_model_and_the_variant(tmp_path):
    csv = tmp_path / "t.csv"
    csv.write_text("model,method,batch_size,train_images_per_s,val_images_per_s\n"
                   "paper_cnn,sqpu,1,100,1000\nlenet5,sqpu,1,200,2000\npaper_cnn,sqpu:packed,1,50,500\n")
    table = sweeplib.load_throughput(csv)
    one = dict(train=1000, validation=1000, method="sqpu", batch_size=1, epochs=1)
    assert sweeplib.estimate_seconds([resolved(**one)], table) == (11, 11, 11)  # paper_cnn: 10 s + 1 s
    assert sweeplib.estimate_seconds([resolved(**one, model="lenet5")], table) == (5.5, 5.5, 5.5)
    assert sweeplib.estimate_seconds([resolved(**one, packed=True)], table) == (22, 22, 22)  # sqpu:packed measured
    assert sweeplib.estimate_seconds([resolved(**one, model="lenet5", packed=True)], table) == (5.5, 5.5, 5.5)
    with pytest.raises(ValueError, match="no throughput measured for model resnet20, method sqpu .*lenet5 sqpu"):
        sweeplib.estimate_seconds([resolved(**one, model="resnet20")], table)


@requires_fxp_train
def test_wall_time_estimate_takes_each_runs_epoch_from_fxp_train(tmp_path):
    """fxp-train --print-configs gives an epoch's images (TrainConfig::epoch_images): the dataset's published
    splits, or the limits; an unknown dataset makes the run, and so the estimate, an error."""
    csv = tmp_path / "t.csv"
    csv.write_text("model,method,batch_size,train_images_per_s,val_images_per_s\nresnet20,sqpu,1,100,1000\n")
    table = sweeplib.load_throughput(csv)

    def run(**config):
        return sweeplib.Run("g", "r", tuple(sorted(config.items())))

    cifar = dict(model="resnet20", dataset="cifar10", method="sqpu", batch_size=1, epochs=1)
    whole = sweeplib.resolved_runs([run(**cifar)], FXP_TRAIN)
    assert whole[0]["epoch_images"] == {"train": 50000, "validation": 10000}
    # Whole datasets: CIFAR-10 has 50,000 training images.
    assert sweeplib.estimate_seconds(whole, table) == (510, 510, 510)
    limited = sweeplib.resolved_runs([run(**cifar, train_limit=1000, val_limit=2000)], FXP_TRAIN)
    assert limited[0]["epoch_images"] == {"train": 1000, "validation": 2000}
    emnist = sweeplib.resolved_runs([run(model="lenet5", dataset="emnist")], FXP_TRAIN)
    assert emnist[0]["epoch_images"] == {"train": 112800, "validation": 18800}  # the balanced split
    with pytest.raises(ValueError, match="run r: .*svhn"):
        sweeplib.resolved_runs([run(**cifar | {"dataset": "svhn"})], FXP_TRAIN)


def test_fleet_speedup_estimate(tmp_path):
    csv = tmp_path / "f.csv"
    csv.write_text("method,batch_size,members,device,threads,solo_images_per_s,fleet_images_per_s,speedup\n"
                   "sqpu,1,8,cpu,1,100,200,2.0\nsqpu,100,8,cpu,1,100,100,1.0\nsqpu,1,32,cpu,1,100,300,3.0\n")
    table = sweeplib.load_fleet_speedups(csv)
    assert sweeplib.fleet_speedup(table, "sqpu", 1, 1) == 1.0  # alone
    assert sweeplib.fleet_speedup(table, "fp32", 1, 32) == 1.0  # not measured: no speed-up assumed
    assert sweeplib.fleet_speedup(table, "sqpu", 1, 40) == 3.0  # the largest measured K not above 40
    assert sweeplib.fleet_speedup(table, "sqpu", 10, 8) == pytest.approx(2 ** 0.5)  # log-log over batch
    assert sweeplib.fleet_speedup(table, "sqpu", 1, 2) == pytest.approx(2.0 ** (1 / 3))  # log-linear in log K below 8
    assert sweeplib.fleet_speedup(table, "sqpu", 1, 8, "lenet5") == 1.0  # another model: not measured
    with_model = tmp_path / "m.csv"
    with_model.write_text("model,method,batch_size,members,speedup\n"
                          "lenet5,sqpu,1,8,1.5\npaper_cnn,sqpu,1,8,2.5\n")
    by_model = sweeplib.load_fleet_speedups(with_model)
    assert sweeplib.fleet_speedup(by_model, "sqpu", 1, 8, "lenet5") == 1.5
    assert sweeplib.fleet_speedup(by_model, "sqpu", 1, 8) == 2.5
    throughput = {("paper_cnn", "sqpu"): [(1, 100.0, 1000.0)]}
    # 100 training images at 100/s, twice as fast in a fleet; validation unchanged.
    runs = [resolved(100, 1000, method="sqpu", batch_size=1, epochs=1)]
    assert sweeplib.estimate_seconds(runs, throughput, None, table, [8]) == (1.5, 1.5, 1.5)


@requires_fxp_train
def test_runs_are_planned_into_fleets_by_fxp_trains_groups(tmp_path):
    grid = write_grid(tmp_path, "name: g\nbase: {batch_size: 4}\nblocks:\n"
                      "  - axes: {method: [sqpu, ste], seed: [0, 1, 2]}\n"
                      "  - set: {model: lenet5}\n    axes: {seed: [0, 1]}\n"
                      "  - set: {model: resnet20}\n    axes: {seed: [0, 1]}\n")
    runs = sweeplib.expand(sweeplib.load_grid(grid), FXP_TRAIN)
    units = sweeplib.plan_fleets(runs, FXP_TRAIN, threads=1, device=None, fleet=2)
    ids = [[r.id for r in u] for u in units]
    # Same model, method and batch in fleets of at most 2, in grid order; ResNet-20 runs cannot join a fleet.
    assert ids == [["sqpu-p16.10-o16.8-sr-b4-s0", "sqpu-p16.10-o16.8-sr-b4-s1"], ["sqpu-p16.10-o16.8-sr-b4-s2"],
                   ["ste-p16.10-o16.8-sr-b4-s0", "ste-p16.10-o16.8-sr-b4-s1"], ["ste-p16.10-o16.8-sr-b4-s2"],
                   ["lenet5-sqpu-p16.10-o16.8-sr-b4-s0", "lenet5-sqpu-p16.10-o16.8-sr-b4-s1"],
                   ["resnet20-sqpu-p16.10-o16.8-sr-b4-s0"], ["resnet20-sqpu-p16.10-o16.8-sr-b4-s1"]]
    assert all(len(u) == 1 for u in sweeplib.plan_fleets(runs, FXP_TRAIN, 1, None, fleet=1))
    # Without --fleet: K from the batch size and threads (32 on the CPU at batch 4), so each group is one fleet.
    assert [len(u) for u in sweeplib.plan_fleets(runs, FXP_TRAIN, 1, None, None)] == [3, 3, 2, 1, 1]
    assert [len(u) for u in sweeplib.plan_fleets(runs, FXP_TRAIN, 2, None, None)] == [3, 3, 2, 1, 1]
    # At batch 8 the threads decide: on one thread per process each run alone, on two one fleet.
    batch8 = sweeplib.expand(sweeplib.load_grid(write_grid(
        tmp_path, "name: h\nbase: {batch_size: 8}\nblocks:\n  - axes: {seed: [0, 1, 2]}\n")), FXP_TRAIN)
    assert [len(u) for u in sweeplib.plan_fleets(batch8, FXP_TRAIN, 1, None, None)] == [1, 1, 1]
    assert [len(u) for u in sweeplib.plan_fleets(batch8, FXP_TRAIN, 2, None, None)] == [3]


def test_fleet_sizes_follow_the_batch_size_device_and_threads():
    # docs/benchmarks.md, "Fleets against solo runs": on one thread per process fleets gain up to batch 4 only.
    assert [sweeplib.fleet_size_for(b, "cpu", 1) for b in (1, 2, 4, 8, 16, 64)] == [80, 80, 32, 1, 1, 1]
    assert [sweeplib.fleet_size_for(b, "cpu", 2) for b in (1, 2, 4, 8, 16, 32, 64)] == [80, 80, 32, 32, 8, 8, 1]
    assert [sweeplib.fleet_size_for(b, None, 4) for b in (1, 16, 64)] == [80, 8, 1]
    assert [sweeplib.fleet_size_for(b, "cuda:0", 1) for b in (1, 16, 64, 256)] == [80, 80, 32, 8]


@requires_fxp_train_and_data
def test_a_sweep_in_fleets_gives_every_run_its_solo_results(tmp_path):
    grid = tmp_path / "seeds.yaml"
    grid.write_text("name: seeds\nbase: {epochs: 2, train_limit: 128, val_limit: 100, batch_size: 8}\n"
                    "blocks:\n  - axes:\n      seed: [0, 1, 2]\n      format: [{param_bits: 16, param_frac: 10}, {param_bits: 8, param_frac: 5}]\n")
    outs = {k: tmp_path / f"fleet-{k}" for k in (1, 4)}
    for k, out in outs.items():
        assert sweep.main([str(grid), "--out", str(out), "--threads", "1", "--fleet", str(k), "--no-progress"]) == 0
    names = sorted(d.name for d in outs[1].iterdir() if d.is_dir())
    assert len(names) == 6 and names == sorted(d.name for d in outs[4].iterdir() if d.is_dir())
    for name in names:
        solo = [json.loads(line) for line in (outs[1] / name / "metrics.jsonl").read_text().splitlines()]
        fleet = [json.loads(line) for line in (outs[4] / name / "metrics.jsonl").read_text().splitlines()]
        for s, f in zip(solo, fleet):
            for key in ("epoch_time_s", "train_time_s", "images_per_s"):
                s.pop(key), f.pop(key)
            assert f.pop("fleet")["members"] in (2, 4)  # 6 runs in fleets of up to 4, in grid order
        assert fleet == solo
    # Finished runs are skipped the second time, fleets or not.
    assert sweep.main([str(grid), "--out", str(outs[4]), "--threads", "1", "--no-progress"]) == 0


@requires_fxp_train_and_data
def test_killed_sweep_resumes_the_real_run_from_its_checkpoint(tmp_path):
    import signal
    import subprocess
    import time
    grid = tmp_path / "one.yaml"
    grid.write_text("name: one\nbase: {epochs: 4, train_limit: 3000, val_limit: 200, batch_size: 32}\n"
                    "blocks:\n  - axes: {method: [sqpu]}\n")
    out = tmp_path / "out"
    run_dir = out / "sqpu-p16.10-o16.8-sr-b32-s0"
    cmd = [sys.executable, str(ROOT / "scripts/sweep.py"), str(grid), "--out", str(out), "--threads", "1",
           "--no-progress"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:  # after the checkpoint
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # what SLURM sends before the time limit
    assert p.wait(timeout=60) == 130, p.stderr.read()
    assert "interrupted" in p.stderr.read()
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "failed.json").exists()  # stopped, not failed
    before = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= len(before) < 4
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[: len(before)] == before  # the same records, timings included: resumed, not retrained
