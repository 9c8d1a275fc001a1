"""fxp-train --fleet (issue 16, "Fleets"): many runs trained as one batched model, each member writing
its own run directory. Every member is its solo run bit for bit (a fleet of one in every method, and
members of larger fleets with their own seeds, formats, rounding and schedules); a killed fleet
resumes every member bit-identically; compaction changes no member. test_fleet.cpp checks the same
bit-identity step by step in float32 and float64."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
import torch

from environment import (FXP_TRAIN, FXP_TRAIN_DATA, checkpoint_state, epoch_metrics,
                         requires_cuda_fxp_train_and_run_data, requires_fxp_train_and_run_data, run_fxp_train)

pytestmark = requires_fxp_train_and_run_data

BASE = ["--data-dir", str(FXP_TRAIN_DATA), "--threads", "1", "--no-progress", "--batch-size", "16"]
COMMON = [*BASE, "--train-limit", "192", "--val-limit", "128"]


def members_file(tmp_path, members: list[dict], name: str = "fleet.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(m) + "\n" for m in members))
    return path


def run_fleet(tmp_path, members: list[dict], *args: str, name: str = "fleet.jsonl",
              common: list[str] = COMMON) -> subprocess.CompletedProcess:
    return run_fxp_train("--fleet", str(members_file(tmp_path, members, name)), *common, *args)


def solo_metrics(run_dir) -> list[dict]:
    """epoch_metrics without the fleet's own record of its size."""
    lines = epoch_metrics(run_dir)
    for line in lines:
        line.pop("fleet", None)
    return lines


def same_checkpoints(a, b) -> bool:
    sa, sb = checkpoint_state(a), checkpoint_state(b)
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_same_run(a, b):
    """Run directories a and b hold the same training, bit for bit: metrics (without a fleet's record
    of its size) and checkpoints."""
    assert solo_metrics(a) == solo_metrics(b)
    assert same_checkpoints(a, b)


def assert_members_are_their_solo_runs(tmp_path, members: list[dict], **shared):
    """Trains each member's solo run (its settings over `shared`) into solo-NAME beside the member's
    directory NAME, and asserts the two hold the same run."""
    for m in members:
        name = m["output_dir"].rsplit("/", 1)[1]
        settings = {**shared, **m, "output_dir": str(tmp_path / f"solo-{name}")}
        solo = run_fxp_train(*COMMON, *[f"--{k.replace('_', '-')}={v}" for k, v in settings.items()])
        assert solo.returncode == 0, solo.stderr
        assert_same_run(tmp_path / name, tmp_path / f"solo-{name}")


@pytest.mark.parametrize("method", ["fp32", "ste", "sqpu", "hteqpu"])
def test_a_fleet_of_one_is_its_solo_run_bit_for_bit(tmp_path, method):
    solo = run_fxp_train(*COMMON, "--method", method, "--seed", "4", "--epochs", "2", "-o", str(tmp_path / "solo"))
    assert solo.returncode == 0, solo.stderr
    fleet = run_fleet(tmp_path, [{"seed": 4, "output_dir": str(tmp_path / "member")}], "--method", method,
                      "--epochs", "2")
    assert fleet.returncode == 0, fleet.stderr
    assert_same_run(tmp_path / "member", tmp_path / "solo")
    summary = json.loads((tmp_path / "member" / "summary.json").read_text())
    assert summary["fleet"] == {"members": 1} and summary["epochs_completed"] == 2
    # The member's directory is a finished run of these settings: fxp-train returns it as it is.
    again = run_fxp_train(*COMMON, "--method", method, "--seed", "4", "--epochs", "2", "-o", str(tmp_path / "member"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "member" / "summary.json").read_text()) == summary


def test_members_keep_their_own_settings_and_write_their_own_runs(tmp_path):
    members = [{"seed": 1, "output_dir": str(tmp_path / "a")},
               {"seed": 2, "param_bits": 8, "param_frac": 5, "out_bits": 8, "out_frac": 3,
                "output_dir": str(tmp_path / "b")},
               {"seed": 3, "lr": 0.05, "momentum": 0, "inference_rounding": "hte", "epochs": 1,
                "scheduler": "plateau", "plateau_patience": 0, "output_dir": str(tmp_path / "c")}]
    p = run_fleet(tmp_path, members, "--method", "sqpu", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    for m in members:
        run_dir = tmp_path / m["output_dir"].rsplit("/", 1)[1]
        config = json.loads((run_dir / "config.json").read_text())
        assert all(config[k] == v for k, v in m.items())
        assert (run_dir / "checkpoint.pt").exists()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["epochs_completed"] == m.get("epochs", 2) and summary["stop_reason"] == "epochs"
    # Each member is its solo run bit for bit (Note [Fleet forward]).
    assert_members_are_their_solo_runs(tmp_path, members, method="sqpu", epochs=2)


@pytest.mark.parametrize("method", ["ste", "sqpu"])
def test_lenet5_members_are_their_solo_runs(tmp_path, method):
    # Every LeNet-5 convolution runs once per member (Note [Fleet member convolutions]); the inputs are
    # padded to 32 x 32 as for the solo runs.
    members = [{"seed": 1, "output_dir": str(tmp_path / "a")},
               {"seed": 2, "param_bits": 8, "param_frac": 5, "out_bits": 8, "out_frac": 3,
                "output_dir": str(tmp_path / "b")}]
    p = run_fleet(tmp_path, members, "--model", "lenet5", "--method", method, "--epochs", "2")
    assert p.returncode == 0, p.stderr
    assert_members_are_their_solo_runs(tmp_path, members, model="lenet5", method=method, epochs=2)


@requires_cuda_fxp_train_and_run_data
@pytest.mark.parametrize("model,method", [("paper_cnn", "sqpu"), ("paper_cnn", "ste"), ("lenet5", "sqpu")])
def test_cuda_fleet_members_are_their_cuda_solo_runs(tmp_path, model, method):
    # The CPU tests above, on a GPU: cuDNN picks its algorithms per shape, so a grouped convolution
    # (the paper CNN's second) may sum in another order than its solo call; this is where it would show.
    members = [{"seed": 1, "output_dir": str(tmp_path / "a")},
               {"seed": 2, "param_bits": 8, "param_frac": 5, "out_bits": 8, "out_frac": 3,
                "output_dir": str(tmp_path / "b")},
               {"seed": 3, "output_dir": str(tmp_path / "c")}]
    p = run_fleet(tmp_path, members, "--model", model, "--method", method, "--device", "cuda", "--epochs", "2")
    assert p.returncode == 0, p.stderr
    assert_members_are_their_solo_runs(tmp_path, members, model=model, method=method, device="cuda", epochs=2)


@pytest.mark.parametrize("method", ["fp32", "sqpu"])
def test_eight_seeds_reach_their_solo_accuracies(tmp_path, method):
    # The statistical check: over two short epochs and 8 seeds, the mean absolute difference
    # of the members' accuracies from their solo runs' is under 0.3 pp. Fleets keep the solo bits,
    # so it is 0 (fp32 is the method most sensitive to summation order: nothing rounds it).
    args = ["--method", method, "--epochs", "2", "--train-limit", "1024", "--val-limit", "2000"]
    members = [{"seed": s, "output_dir": str(tmp_path / f"member-{s}")} for s in range(8)]
    p = run_fleet(tmp_path, members, *args, common=BASE)
    assert p.returncode == 0, p.stderr
    differences = []
    for s in range(8):
        solo = run_fxp_train(*BASE, *args, "--seed", str(s), "-o", str(tmp_path / f"solo-{s}"))
        assert solo.returncode == 0, solo.stderr
        accuracy = [json.loads((tmp_path / f"{kind}-{s}" / "summary.json").read_text())["final_val_accuracy"]
                    for kind in ("member", "solo")]
        differences.append(abs(accuracy[0] - accuracy[1]))
    assert 100 * sum(differences) / len(differences) < 0.3
    assert differences == [0.0] * 8


def test_a_killed_fleet_resumes_every_member_bit_identically(tmp_path):
    members = [{"seed": s, "output_dir": str(tmp_path / f"killed-{s}")} for s in range(3)]
    whole = [{"seed": s, "output_dir": str(tmp_path / f"whole-{s}")} for s in range(3)]
    args = ["--method", "sqpu", "--epochs", "4", "--train-limit", "480", "--val-limit", "128"]
    p = run_fleet(tmp_path, whole, *args, name="whole.jsonl", common=BASE)
    assert p.returncode == 0, p.stderr
    killed = subprocess.Popen([str(FXP_TRAIN), "--fleet", str(members_file(tmp_path, members, "killed.jsonl")),
                               *BASE, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "killed-1" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while killed.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            break
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(epoch_metrics(tmp_path / "killed-1")) < 4, "the fleet finished before it was killed"
    resumed = run_fleet(tmp_path, members, *args, "--resume", name="killed.jsonl", common=BASE)
    assert resumed.returncode == 0, resumed.stderr
    for s in range(3):
        assert_same_run(tmp_path / f"killed-{s}", tmp_path / f"whole-{s}")


def test_compaction_changes_no_member(tmp_path):
    def members(tag):
        return [{"seed": 1, "epochs": 1, "output_dir": str(tmp_path / f"{tag}-short")},
                {"seed": 2, "output_dir": str(tmp_path / f"{tag}-a")},
                {"seed": 3, "output_dir": str(tmp_path / f"{tag}-b")}]
    compacted = run_fleet(tmp_path, members("compacted"), "--method", "ste", "--epochs", "3",
                          "--fleet-compact-below", "0.75", name="compacted.jsonl")
    assert compacted.returncode == 0, compacted.stderr
    assert "fleet: 2 members still training" in compacted.stdout
    kept = run_fleet(tmp_path, members("kept"), "--method", "ste", "--epochs", "3", "--fleet-compact-below", "0",
                     name="kept.jsonl")
    assert kept.returncode == 0, kept.stderr
    assert "still training" not in kept.stdout
    for name in ("short", "a", "b"):
        assert_same_run(tmp_path / f"compacted-{name}", tmp_path / f"kept-{name}")


@pytest.mark.parametrize("method", ["ste", "sqpu"])
def test_chunks_change_no_member(tmp_path, method):
    # Note [Fleet chunks]: members forwarded a chunk at a time (here 2, then 1) keep their bits; the
    # members differ in format and rounding, so each chunk reads its own members' settings and keys.
    def members(tag):
        return [{"seed": 1, "output_dir": str(tmp_path / f"{tag}-a")},
                {"seed": 2, "param_bits": 8, "param_frac": 5, "out_bits": 8, "out_frac": 3,
                 "output_dir": str(tmp_path / f"{tag}-b")},
                {"seed": 3, "inference_rounding": "hte", "output_dir": str(tmp_path / f"{tag}-c")}]
    chunked = run_fleet(tmp_path, members("chunked"), "--method", method, "--epochs", "2", "--fleet-chunk", "2",
                        name="chunked.jsonl")
    assert chunked.returncode == 0, chunked.stderr
    assert "fleet: 3 members, forward and backward in chunks of 2" in chunked.stdout
    whole = run_fleet(tmp_path, members("whole"), "--method", method, "--epochs", "2", "--fleet-chunk", "3",
                      name="whole.jsonl")
    assert whole.returncode == 0, whole.stderr
    assert "in chunks of" not in whole.stdout
    for name in ("a", "b", "c"):
        assert_same_run(tmp_path / f"chunked-{name}", tmp_path / f"whole-{name}")


def test_a_finished_fleet_is_returned_as_it_is(tmp_path):
    members = [{"seed": s, "output_dir": str(tmp_path / f"m{s}")} for s in range(2)]
    assert run_fleet(tmp_path, members, "--method", "hteqpu", "--epochs", "1").returncode == 0
    before = [(tmp_path / f"m{s}" / "summary.json").read_text() for s in range(2)]
    again = run_fleet(tmp_path, members, "--method", "hteqpu", "--epochs", "1")
    assert again.returncode == 0, again.stderr
    assert [(tmp_path / f"m{s}" / "summary.json").read_text() for s in range(2)] == before


@pytest.mark.parametrize("members,args,message", [
    ([{"seed": 0}, {"seed": 1, "batch_size": 32}], [], "member 1's batch_size is 32, member 0's 16"),
    ([{"seed": 0}, {"seed": 1, "method": "ste"}], [], "member 1's method is \"ste\", member 0's \"sqpu\""),
    ([{"seed": 0}], ["--model", "resnet20"], "fleets train paper_cnn and lenet5 for now, not resnet20"),
    ([{"seed": 0}], ["--method", "adapt"], "fleets train fp32, ste, sqpu and hteqpu, not adapt"),
    ([{"seed": 0}], ["--packed"], "fleets do not hold packed storage yet"),
    ([{"seed": 0, "output_dir": "same"}, {"seed": 1, "output_dir": "same"}], [], "member 1 writes to same"),
    ([{"seed": 0, "lr": "fast"}], [], "line 1"),
], ids=["batch", "method", "model", "adapt", "packed", "directory", "bad value"])
def test_members_that_cannot_share_a_fleet_are_refused_naming_why(tmp_path, members, args, message):
    for m in members:
        m["output_dir"] = str(tmp_path / m.get("output_dir", f"m{members.index(m)}"))
    p = run_fleet(tmp_path, members, *args)
    assert p.returncode == 2, p.stderr  # a usage error, as a bad -c file is
    assert p.stderr.startswith("fxp-train: --fleet "), p.stderr
    assert message in p.stderr.replace(str(tmp_path) + "/", ""), p.stderr


def test_a_setting_the_members_do_not_read_does_not_part_them():
    # Note [Settings without effect]: bn_recalibration_batches on the paper CNN (no batch norm) is unread,
    # so runs that differ in it alone share a fleet group; on ResNet-20 (not a fleet model yet) it would not.
    lines = '{"seed": 0}\n{"seed": 1, "bn_recalibration_batches": 2}\n{"seed": 2, "batch_size": 32}\n'
    p = run_fxp_train("--print-configs", "-", input=lines)
    assert p.returncode == 0, p.stderr
    groups = [json.loads(line)["fleet_group"] for line in p.stdout.splitlines()]
    assert groups[0] is not None and groups[0] == groups[1] != groups[2]


def test_fleet_usage_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    p = run_fxp_train("--fleet", str(empty), *COMMON)
    # The members' settings are usage errors (exit 2), as a -c file's are.
    assert p.returncode == 2 and f"fxp-train: --fleet {empty} holds no member settings" in p.stderr
    not_json = tmp_path / "bad.jsonl"
    not_json.write_text("{seed: 1}\n")
    p = run_fxp_train("--fleet", str(not_json), *COMMON)
    assert p.returncode == 2 and "bad.jsonl line 1: not JSON" in p.stderr
    p = run_fxp_train("--fleet", str(tmp_path), *COMMON)
    assert p.returncode == 2 and f"fxp-train: --fleet {tmp_path} is a directory, not a file of settings" in p.stderr
    twice = tmp_path / "twice.jsonl"  # nlohmann kept the last value; -c refuses a key given twice, and so does a line
    twice.write_text('{"seed": 1}\n{"seed": 3, "seed": 4}\n')
    p = run_fxp_train("--fleet", str(twice), *COMMON)
    assert p.returncode == 2 and f"fxp-train: --fleet {twice} line 2: key 'seed' is given twice\n" in p.stderr
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"sed": 1}\n')
    p = run_fxp_train("--fleet", str(unknown), *COMMON)
    assert p.returncode == 2 and "unknown.jsonl line 1" in p.stderr and "sed" in p.stderr
    assert f"fxp-train: --fleet {unknown} line 1: unknown key 'sed' (did you mean 'seed'?)" in p.stderr
    p = run_fxp_train("--fleet", str(not_json), "--print-config")
    assert p.returncode == 2 and "cannot be combined" in p.stderr
    p = run_fxp_train("--fleet", str(not_json), "--fleet-chunk", "-1")
    assert p.returncode == 2 and "--fleet-chunk" in p.stderr
    p = run_fxp_train("--help")
    assert all(flag in p.stdout for flag in ("--fleet", "--fleet-compact-below", "--fleet-chunk"))
