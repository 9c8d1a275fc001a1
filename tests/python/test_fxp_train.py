"""fxp-train as a process (issue 11): a run directory is locked while a run
holds it, and a write that fails (a full disk) is a clear error that keeps the
previous checkpoint, from which the run resumes bit for bit. And --cuda-graphs
(issue 15): refused where it cannot run, the same bits as eager steps on a GPU."""

from __future__ import annotations

import fcntl
import os
import resource
import shutil
import subprocess

import json

import pytest
import torch

from environment import (FASHION, FXP_TRAIN, FXP_TRAIN_DATA, epoch_metrics, requires_cuda_fxp_train_and_run_data,
                         requires_fxp_train, requires_fxp_train_and_data, run_fxp_train)

SMALL = ["--data-dir", str(FASHION), "--train-limit", "500", "--val-limit", "200", "--threads", "1", "--no-progress",
         "--quiet"]


def _train(out, *args, preexec_fn=None):
    return run_fxp_train(*SMALL, "-o", str(out), *args, preexec_fn=preexec_fn)


@requires_fxp_train_and_data
def test_a_second_fxp_train_on_a_busy_directory_exits_75(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = _train(out, "--epochs", "1")
    assert p.returncode == 75, p.stderr
    assert f"output directory {out} is in use by another fxp-train" in p.stderr
    assert not (out / "config.json").exists()


@requires_fxp_train_and_data
def test_a_full_disk_is_a_clear_error_and_the_run_resumes_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _train(whole, "--epochs", "2").returncode == 0
    assert _train(split, "--epochs", "1").returncode == 0
    checkpoint = (split / "checkpoint.pt").read_bytes()

    def small_files():  # writes past 100 kB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        # SIGXFSZ keeps its default (subprocess restores it: killing the process), as under `ulimit -f`;
        # fxp-train ignores it itself.

    p = _train(split, "--epochs", "2", "--resume", preexec_fn=small_files)
    assert p.returncode == 1, p.stderr  # an error, not an abort (134)
    assert f"cannot write {split}/checkpoint.pt.tmp: File too large ({split}/checkpoint.pt is unchanged)" in p.stderr
    assert not (split / "checkpoint.pt.tmp").exists()
    assert (split / "checkpoint.pt").read_bytes() == checkpoint
    assert _train(split, "--epochs", "2", "--resume").returncode == 0  # space again
    assert epoch_metrics(split) == epoch_metrics(whole)


@requires_fxp_train
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device whose writes fail")
@pytest.mark.parametrize("args", [["--print-config"], ["--describe-model"], ["--describe-model", "--json"],
                                  ["--print-configs", "-"]])
def test_output_that_cannot_be_written_is_an_error(args):
    """A mode whose output is its result fails when the output is lost (a full disk), not exit 0."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([str(FXP_TRAIN), *args], input="{}\n", stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=60)
    assert p.returncode == 1 and p.stderr == "fxp-train: error: cannot write to standard output\n"


def _read_only_copy(source, mount_point):
    """`source` copied into a tmpfs at `mount_point`, mounted read-only; False where this process may
    not mount (not root, or no CAP_SYS_ADMIN in a container)."""
    mount_point.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True).returncode != 0:
        return False
    shutil.copytree(source, mount_point / source.name)
    if subprocess.run(["mount", "-o", "remount,ro", str(mount_point)], capture_output=True).returncode != 0:
        subprocess.run(["umount", str(mount_point)])
        return False
    return True


@requires_fxp_train_and_data
def test_a_copied_finished_run_is_shown_where_it_now_lies(tmp_path):
    run, copy = tmp_path / "run", tmp_path / "copy"
    assert _train(run, "--epochs", "1").returncode == 0
    shutil.copytree(run, copy)
    p = run_fxp_train(*SMALL[:-1], "-o", str(copy), "--epochs", "1")  # not --quiet: the summary
    assert p.returncode == 0, p.stderr
    assert f"{copy} already holds this finished run" in p.stdout and f"output in {copy}\n" in p.stdout, p.stdout
    assert str(run) + "\n" not in p.stdout
    assert (copy / "summary.json").read_bytes() == (run / "summary.json").read_bytes()  # shown, not rewritten


@requires_fxp_train_and_data
def test_a_finished_run_on_read_only_storage_is_shown_again(tmp_path):
    """train.md: running a finished run again prints its summary, so it can be repeated; on storage this
    process may not write (a read-only file system, another user's results) too, under a shared lock."""
    run = tmp_path / "run"
    assert _train(run, "--epochs", "1").returncode == 0
    mount_point = tmp_path / "ro"
    if not _read_only_copy(run, mount_point):
        pytest.skip("needs to mount a read-only tmpfs (root with CAP_SYS_ADMIN)")
    try:
        copy = mount_point / "run"
        p = run_fxp_train(*SMALL[:-1], "-o", str(copy), "--epochs", "1")  # not --quiet: the summary
        assert p.returncode == 0, p.stderr
        assert "already holds this finished run" in p.stdout and "best validation accuracy" in p.stdout.lower()
        with open(copy / ".lock") as lock:  # an owner training there: busy, as on writable storage
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert _train(copy, "--epochs", "1").returncode == 75
        p = _train(copy, "--epochs", "2", "--resume")  # more epochs: a write, which fails naming the file
        assert p.returncode == 1 and "Read-only file system" in p.stderr and str(copy) in p.stderr
    finally:
        subprocess.run(["umount", str(mount_point)])


@requires_fxp_train_and_data
def test_a_corrupted_checkpoint_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1").returncode == 0
    data = bytearray((out / "checkpoint.pt").read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(data))
    p = _train(out, "--epochs", "2", "--resume")
    assert p.returncode == 1 and f"checkpoint {out}/checkpoint.pt is corrupted" in p.stderr


@requires_fxp_train_and_data
@pytest.mark.parametrize("text, message", [
    ("lr: &a [*a]\n", "nested deeper than 16 levels"),
    ("lr: 0.1\nlr: 0.2\n", "key 'lr' is given twice"),
])
def test_configs_that_crashed_fxp_train_are_usage_errors(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    p = subprocess.run([str(FXP_TRAIN), "-c", str(config), "--print-config"], capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr  # the first was a segmentation fault


@requires_fxp_train
def test_print_configs_refuses_a_directory_and_a_key_given_twice(tmp_path):
    """--print-configs DIR printed nothing and exited 0 (a directory opens as a stream that reads
    nothing); a line's repeated key took its last value, where -c refuses it."""
    p = run_fxp_train("--print-configs", str(tmp_path))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"fxp-train: --print-configs {tmp_path} is a directory, not a file of settings\n"
    lines = tmp_path / "runs.jsonl"
    lines.write_text('{"seed": 1}\n\n{"seed": 3, "seed": 4}\n')
    p = run_fxp_train("--print-configs", str(lines))
    assert p.returncode == 0, p.stderr
    first, second = [json.loads(line) for line in p.stdout.splitlines()]
    assert first["config"]["seed"] == 1
    assert second == {"error": f"{lines} line 3: key 'seed' is given twice"}


# ---- --cuda-graphs (Note [CUDA-graph training steps], csrc/train/epoch.cpp) -------------------------

@requires_fxp_train
@pytest.mark.parametrize("args, message", [
    (["--device", "cpu"], "cuda_graphs: captures CUDA work: it needs device cuda, but device is cpu"),
    (["--device", "cuda", "--method", "adapt"], "cuda_graphs: supports methods fp32, ste, sqpu and hteqpu; adapt"),
    (["--device", "cuda", "--method", "msq"], "cuda_graphs: supports methods fp32, ste, sqpu and hteqpu; msq"),
])
def test_cuda_graphs_are_refused_where_they_cannot_run(args, message):
    p = run_fxp_train("--cuda-graphs", *args, "--print-config")
    assert p.returncode == 2 and message in p.stderr, p.stderr


@requires_fxp_train
def test_cuda_graphs_accept_packed_storage():
    """Packed steps read nothing back (Note [Deferred pack checks in training]), so they may be captured."""
    p = run_fxp_train("--cuda-graphs", "--device", "cuda", "--packed", "--print-config")
    assert p.returncode == 0, p.stderr
    config = json.loads(p.stdout)
    assert config["cuda_graphs"] is True and config["packed"] is True


@requires_fxp_train
def test_cuda_graphs_is_a_key_that_leaves_the_run_name_alone():
    config = json.loads(run_fxp_train("--print-config").stdout)
    assert config["cuda_graphs"] is False
    with_graphs = json.loads(run_fxp_train("--print-config", "--cuda-graphs", "--device", "cuda").stdout)
    assert with_graphs["cuda_graphs"] is True
    # The run's name, which the sweep keys runs by, does not depend on it.
    names = [run_fxp_train("--print-config", *a).stdout for a in ([], ["--cuda-graphs", "--device", "cuda"])]
    assert json.loads(names[0])["output_dir"] == json.loads(names[1])["output_dir"]


@requires_cuda_fxp_train_and_run_data
@pytest.mark.parametrize("method", ["sqpu", "hteqpu", "ste", "fp32", "sqpu --packed", "ste --packed",
                                    "sqpu --packed --param-bits 12 --param-frac 8 --out-bits 12 --out-frac 6",
                                    # the other models; ResNet-20's batch norm updates its running
                                    # statistics inside the captured step
                                    "sqpu --model resnet20", "ste --model lenet5", "hteqpu --model alexnet"])
def test_cuda_graphs_give_the_bits_of_eager_steps(tmp_path, method):
    # 202 images at batch 4: 3 eager warm-up steps, 47 replays and a short last batch per epoch.
    # The plateau schedule with patience 0 may change the lr between epochs (each epoch captures anew).
    # Packed runs count what packed storage cannot hold on the device (Note [Deferred pack checks in
    # training]), so their steps are captured too; 12 bits store codes as bit streams.
    common = ["--method", *method.split(), "--device", "cuda", "--data-dir", str(FXP_TRAIN_DATA), "--batch-size", "4",
              "--train-limit", "202", "--val-limit", "300", "--scheduler", "plateau", "--plateau-patience", "0",
              "--no-progress", "--quiet"]

    def train(name, *args):
        p = run_fxp_train(*common, *args, "-o", str(tmp_path / name))
        assert p.returncode == 0, p.stderr
        return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    eager = train("eager", "--epochs", "3")
    graphs = train("graphs", "--epochs", "3", "--cuda-graphs")
    assert [e["cuda_graph_steps"] for e in eager] == [0, 0, 0]
    assert [e["cuda_graph_steps"] for e in graphs] == [47, 47, 47]
    assert epoch_metrics(tmp_path / "graphs") == epoch_metrics(tmp_path / "eager")
    # Two epochs with graphs, resumed without them for the third: the checkpoint holds the QPU step
    # count of the device (else the third epoch would draw other numbers), and cuda_graphs may change.
    train("resumed", "--epochs", "2", "--cuda-graphs")
    train("resumed", "--epochs", "3", "--resume")
    assert epoch_metrics(tmp_path / "resumed") == epoch_metrics(tmp_path / "eager")


@requires_fxp_train_and_data
def test_the_epoch_line_names_the_layers_whose_outputs_saturate(tmp_path):
    """Note [Saturation in the epoch line]: outputs in FxP(4, 3), whose range is [-1, 0.875], saturate;
    the line under the epoch's names the worst layer first, with its share as metrics.jsonl records
    it, and the flags that set the range, in a solo run and under a fleet member's line. The default
    FxP(16, 8) saturates nothing, and the line is absent."""
    common = [a for a in SMALL if a != "--quiet"] + ["--epochs", "1"]

    def note_of(run_dir, stdout):
        [epoch] = epoch_metrics(run_dir)
        shares = {name: layer["output_saturated_fraction"] for name, layer in epoch["layers"].items()}
        worst = max(shares, key=shares.get)
        assert shares[worst] > 0.01
        [note] = [line for line in stdout.splitlines() if "saturated outputs" in line]
        assert note.startswith(f"  saturated outputs in validation: {worst} {100 * shares[worst]:.2f}%")
        assert note.endswith("(range: --out-bits, --out-frac)")
        return note

    p = run_fxp_train(*common, "--out-bits", "4", "--out-frac", "3", "-o", str(tmp_path / "narrow"))
    assert p.returncode == 0, p.stderr
    note_of(tmp_path / "narrow", p.stdout)
    p = run_fxp_train(*common, "-o", str(tmp_path / "default"))
    assert p.returncode == 0, p.stderr
    assert "saturated outputs" not in p.stdout

    members = tmp_path / "fleet.jsonl"
    members.write_text(json.dumps({"output_dir": str(tmp_path / "member-narrow"), "out_bits": 4, "out_frac": 3}) +
                       "\n" + json.dumps({"output_dir": str(tmp_path / "member-default"), "seed": 1}) + "\n")
    p = run_fxp_train("--fleet", str(members), *common)
    assert p.returncode == 0, p.stderr
    note = note_of(tmp_path / "member-narrow", p.stdout)
    lines = p.stdout.splitlines()
    assert "-o4.3-" in lines[lines.index(note) - 1]  # under the narrow member's epoch line
