"""fxp-train as a process (issue 11): a run directory is locked while a run
holds it, and a write that fails (a full disk) is a clear error that keeps the
previous checkpoint, from which the run resumes bit for bit."""

from __future__ import annotations

import fcntl
import resource
import signal
import subprocess

import pytest

from environment import FASHION, FXP_TRAIN, epoch_metrics, requires_fxp_train_and_data, run_fxp_train

pytestmark = requires_fxp_train_and_data

SMALL = ["--data-dir", str(FASHION), "--train-limit", "500", "--val-limit", "200", "--threads", "1", "--no-progress",
         "--quiet"]


def _train(out, *args, preexec_fn=None):
    return run_fxp_train(*SMALL, "-o", str(out), *args, preexec_fn=preexec_fn)


def test_a_second_fxp_train_on_a_busy_directory_exits_75(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        p = _train(out, "--epochs", "1")
    assert p.returncode == 75, p.stderr
    assert f"output directory {out} is in use by another fxp-train" in p.stderr
    assert not (out / "config.json").exists()


def test_a_full_disk_is_a_clear_error_and_the_run_resumes_bit_for_bit(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _train(whole, "--epochs", "2").returncode == 0
    assert _train(split, "--epochs", "1").returncode == 0
    checkpoint = (split / "checkpoint.pt").read_bytes()

    def small_files():  # writes past 100 kB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    p = _train(split, "--epochs", "2", "--resume", preexec_fn=small_files)
    assert p.returncode == 1, p.stderr  # an error, not an abort (134)
    assert f"cannot write {split}/checkpoint.pt.tmp: File too large ({split}/checkpoint.pt is unchanged)" in p.stderr
    assert not (split / "checkpoint.pt.tmp").exists()
    assert (split / "checkpoint.pt").read_bytes() == checkpoint
    assert _train(split, "--epochs", "2", "--resume").returncode == 0  # space again
    assert epoch_metrics(split) == epoch_metrics(whole)


def test_a_corrupted_checkpoint_is_refused_naming_the_file(tmp_path):
    out = tmp_path / "run"
    assert _train(out, "--epochs", "1").returncode == 0
    data = bytearray((out / "checkpoint.pt").read_bytes())
    data[len(data) // 3] ^= 0x01
    (out / "checkpoint.pt").write_bytes(bytes(data))
    p = _train(out, "--epochs", "2", "--resume")
    assert p.returncode == 1 and f"checkpoint {out}/checkpoint.pt is corrupted" in p.stderr


@pytest.mark.parametrize("text, message", [
    ("lr: &a [*a]\n", "nested deeper than 16 levels"),
    ("lr: 0.1\nlr: 0.2\n", "key 'lr' is given twice"),
])
def test_configs_that_crashed_fxp_train_are_usage_errors(tmp_path, text, message):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    p = subprocess.run([str(FXP_TRAIN), "-c", str(config), "--print-config"], capture_output=True, text=True)
    assert p.returncode == 2 and message in p.stderr  # the first was a segmentation fault
