"""fxp-train --distributed (issue 16, "One run across processes"): 2 and 3 local Gloo ranks on the
CPU, launched as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Every rank compares
its parameters, buffers and optimizer state (momentum codes included) bit for bit with rank 0's
after every epoch and stops the run naming any difference (test_distributed.cpp tests that check);
these tests run it on every method, packed storage and batch norm, and compare with one process."""

from __future__ import annotations

import gzip
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from environment import (FXP_TRAIN, FXP_TRAIN_DATA, checkpoint_state, epoch_metrics, requires_fxp_train_and_run_data,
                         run_fxp_train)

pytestmark = requires_fxp_train_and_run_data

# 1 thread per rank: ranks must agree on it (fxp-train refuses otherwise), and CI has 2 cores.
COMMON = ["--data-dir", str(FXP_TRAIN_DATA), "--threads", "1", "--no-progress", "--val-limit", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args: str, environment: dict | None = None,
           common: list[str] = COMMON) -> list[subprocess.CompletedProcess]:
    """fxp-train --distributed on `world` local ranks; each rank's result, rank 0's first."""
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
            **(environment or {})}
    ranks = [subprocess.Popen([str(FXP_TRAIN), "--distributed", *common, *args], env={**base, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for rank in ranks:
        out, err = rank.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(rank.args, rank.returncode, out, err))
    return results


def succeeded(results: list[subprocess.CompletedProcess]) -> None:
    for r, p in enumerate(results):
        assert p.returncode == 0, f"rank {r}: {p.stderr}"


# compared: the tensors each epoch's replica check compares, which the test knows from the model: every
# parameter (packed: its codes instead), buffer (batch norm's statistics) and momentum buffer, AdaPT's
# accumulated gradients, and one hash of the host's state. The paper CNN has 6 parameters, LeNet-5 10,
# ResNet-20 65 and 63 buffers.
@pytest.mark.parametrize("world,args,compared", [
    (2, ["--method", "sqpu"], 6 + 6 + 1),
    (3, ["--method", "sqpu", "--packed"], 6 + 6 + 1),
    (2, ["--method", "hteqpu", "--packed", "--param-bits", "12", "--param-frac", "8"], 6 + 6 + 1),  # bit streams
    (3, ["--method", "ste", "--model", "resnet20", "--bn-recalibration-batches", "2"], 65 + 63 + 65 + 1),
    (2, ["--method", "adapt", "--model", "lenet5"], 10 + 10 + 10 + 1),
    (2, ["--method", "msq", "--model", "lenet5"], 10 + 10 + 1),
    (2, ["--method", "fp32", "--scheduler", "plateau", "--plateau-patience", "0"], 6 + 6 + 1),
], ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_replicas_stay_bit_identical_and_rank_0_alone_writes(tmp_path, world, args, compared):
    # 91 images at batch 10: the last batch of 1 leaves some ranks an empty share.
    results = launch(world, *args, "--train-limit", "91", "--batch-size", "10", "--epochs", "2",
                     "-o", str(tmp_path / "run"))
    succeeded(results)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": world, "backend": "gloo",
                                      "replicas_identical_after_every_epoch": True,
                                      "tensors_compared_per_epoch": compared}
    assert summary["config"]["distributed"] and summary["run_name"].endswith("-dist")
    assert len(epoch_metrics(tmp_path / "run")) == 2
    assert "data parallel over" in results[0].stdout
    assert all(p.stdout == "" and p.stderr == "" for p in results[1:])


def test_one_process_takes_the_solo_runs_steps_and_two_and_three_match_it(tmp_path):
    # Nearest-even activations draw nothing, so only the gradients' summation order differs.
    run = ["--method", "sqpu", "--inference-rounding", "hte", "--train-limit", "256", "--batch-size", "16",
           "--epochs", "1"]
    solo = run_fxp_train(*COMMON, *run, "-o", str(tmp_path / "solo"), "--quiet")
    assert solo.returncode == 0, solo.stderr
    expected = checkpoint_state(tmp_path / "solo")
    succeeded(launch(1, *run, "-o", str(tmp_path / "one")))
    one = checkpoint_state(tmp_path / "one")
    assert expected.keys() == one.keys() and all(torch.equal(expected[k], one[k]) for k in expected)
    for world in (2, 3):
        succeeded(launch(world, *run, "-o", str(tmp_path / f"w{world}")))
        got = checkpoint_state(tmp_path / f"w{world}")
        # 16 SQPU steps: a gradient's last bits flip a stochastic rounding rarely (none in practice here).
        differing = sum(int((expected[k] != got[k]).sum()) for k in expected if expected[k].is_floating_point())
        total = sum(t.numel() for t in expected.values() if t.is_floating_point())
        assert differing <= total // 1000, f"{world} ranks: {differing} of {total} values differ"
    # In float32 the parameters agree to float rounding: each tensor within 1e-5 of its largest value after 4
    # steps (measured: about 1e-7). Over more steps training amplifies the last bits until a ReLU or a pooling
    # choice flips (on an AVX-512 machine: 1e-7 after 8 steps, 5e-4 after 16), and per element near zero a
    # relative bound means nothing, so neither measures the reduction order.
    fp32 = ["--method", "fp32", "--train-limit", "64", "--batch-size", "16", "--epochs", "1"]
    assert run_fxp_train(*COMMON, *fp32, "-o", str(tmp_path / "fp32"), "--quiet").returncode == 0
    succeeded(launch(2, *fp32, "-o", str(tmp_path / "fp32-w2")))
    a, b = checkpoint_state(tmp_path / "fp32"), checkpoint_state(tmp_path / "fp32-w2")
    assert a.keys() == b.keys()
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        scale = a[k].abs().max().item() or 1.0
        worst = (b[k] - a[k]).abs().max().item()
        assert worst <= 1e-5 * scale, f"{k}: {worst:.3g} against a largest value of {scale:.3g}"


def test_sharded_validation_gives_the_figures_of_one_process(tmp_path):
    # An lr far below the grid's step with nearest-even updates leaves the weights as initialized, so
    # one process and 3 ranks validate the same model: 3 shards of 1000 images, batches of 128.
    run = ["--method", "hteqpu", "--lr", "1e-12", "--inference-rounding", "hte", "--out-bits", "6", "--out-frac",
           "4", "--train-limit", "30", "--batch-size", "10", "--epochs", "1", "--val-limit", "1000",
           "--eval-batch-size", "128"]
    common = [a for a in COMMON if a not in ("--val-limit", "64")]
    solo = run_fxp_train(*common, *run, "-o", str(tmp_path / "solo"), "--quiet")
    assert solo.returncode == 0, solo.stderr
    succeeded(launch(3, *run, "-o", str(tmp_path / "sharded"), common=common))
    [one], [three] = epoch_metrics(tmp_path / "solo"), epoch_metrics(tmp_path / "sharded")
    assert three["val_accuracy"] == one["val_accuracy"]
    # Each batch's loss is a float32 sum, and the shards' batches group other images.
    assert three["val_loss"] == pytest.approx(one["val_loss"], rel=1e-6)
    assert three["layers"] == one["layers"]
    assert sum(layer["output_saturated"] for layer in one["layers"].values()) > 0


def test_a_resumed_run_repeats_the_uninterrupted_one_bit_for_bit(tmp_path):
    run = ["--method", "sqpu", "--model", "resnet20", "--train-limit", "91", "--batch-size", "10"]
    succeeded(launch(3, *run, "--epochs", "2", "-o", str(tmp_path / "full")))
    succeeded(launch(3, *run, "--epochs", "1", "-o", str(tmp_path / "resumed")))
    results = launch(3, *run, "--epochs", "2", "--resume", "-o", str(tmp_path / "resumed"))
    succeeded(results)
    assert "resuming" in results[0].stdout
    assert epoch_metrics(tmp_path / "resumed") == epoch_metrics(tmp_path / "full")


def test_torchrun_starts_a_run(tmp_path):
    # torchrun's agent serves the rendezvous store (TORCHELASTIC_USE_AGENT_STORE): every rank joins as a client.
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "--no-python", str(FXP_TRAIN), "--distributed", *COMMON, "--train-limit", "40",
                        "--batch-size", "8", "--epochs", "1", "-o", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["distributed"]["world_size"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (NCCL joins CUDA ranks)")
def test_one_cuda_rank_joins_through_nccl_and_takes_the_solo_runs_steps(tmp_path):
    run = [*COMMON, "--device", "cuda", "--method", "sqpu", "--packed", "--inference-rounding", "hte",
           "--train-limit", "256", "--batch-size", "16", "--epochs", "1"]
    solo = run_fxp_train(*run, "-o", str(tmp_path / "solo"), "--quiet")
    assert solo.returncode == 0, solo.stderr
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                        "--no-python", str(FXP_TRAIN), "--distributed", *run, "-o", str(tmp_path / "nccl")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "nccl" / "summary.json").read_text())["distributed"]["backend"] == "nccl"
    expected, got = checkpoint_state(tmp_path / "solo"), checkpoint_state(tmp_path / "nccl")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_rank_with_other_settings_stops_the_run_on_every_rank_with_the_reason(tmp_path):
    port = str(free_port())
    environment = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "3"}
    args = [str(FXP_TRAIN), "--distributed", *COMMON, "--train-limit", "20", "-o", str(tmp_path / "run")]
    ranks = [subprocess.Popen(args + extra, env={**environment, "RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for r, extra in enumerate([[], [], ["--lr", "0.02"]])]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1, 1]
    reason = 'rank 2 was started with other settings than rank 0 ("in the run" is rank 0\'s): ' \
             "lr (0.01 in the run, 0.02 now)"
    assert f"distributed: {reason}" in errors[0]
    assert f"distributed: stopping with rank 0, because {reason}" in errors[1]  # rank 1 had agreed
    assert f"distributed: {reason}" in errors[2]


def test_ranks_that_read_other_data_are_stopped_before_training(tmp_path):
    # data_dir may differ between ranks (each node its own copy), so what they read is compared.
    other = tmp_path / "other-copy"
    other.mkdir()
    for f in FXP_TRAIN_DATA.iterdir():
        (other / f.name).symlink_to(f)
    labels = other / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(gzip.decompress(labels.read_bytes()))
    labels.unlink()
    data[8] = (data[8] + 1) % 10  # the first test image's label
    labels.write_bytes(gzip.compress(bytes(data)))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    common = [a for a in COMMON if a not in ("--data-dir", str(FXP_TRAIN_DATA))]
    ranks = [subprocess.Popen([str(FXP_TRAIN), "--distributed", *common, "--data-dir", str(data_dir), "--train-limit",
                               "20", "-o", str(tmp_path / "run")], env={**base, "RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, data_dir in enumerate([FXP_TRAIN_DATA, other])]
    errors = [rank.communicate(timeout=120)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [1, 1]
    for error in errors:
        assert "distributed: before training, these differ from rank 0's: the run's state and data" in error


def test_a_batch_smaller_than_the_ranks_is_refused_and_a_resume_may_change_their_number(tmp_path):
    results = launch(3, "--train-limit", "20", "--batch-size", "2", "-o", str(tmp_path / "small"))
    assert all(p.returncode == 1 and "batch_size 2 is smaller than the 3 processes" in p.stderr for p in results)
    succeeded(launch(2, "--train-limit", "20", "--batch-size", "4", "--epochs", "1", "-o", str(tmp_path / "run")))
    results = launch(3, "--train-limit", "20", "--batch-size", "4", "--epochs", "2", "--resume",
                     "-o", str(tmp_path / "run"))
    succeeded(results)
    assert "note: resuming with 3 processes instead of 2" in results[0].stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["distributed"]["world_size"] == 3


def test_rank_0s_refusal_reaches_the_other_ranks(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint.pt").write_bytes(b"")  # an unfinished run
    results = launch(2, "--train-limit", "20", "-o", str(tmp_path / "run"))
    assert [p.returncode for p in results] == [1, 1]
    assert "holds an unfinished run" in results[0].stderr
    assert "distributed: rank 0 stopped: output directory" in results[1].stderr


@pytest.mark.parametrize("environment,message", [
    ({"RANK": None, "WORLD_SIZE": None, "SLURM_PROCID": None, "SLURM_NTASKS": None},
     "launch fxp-train with torchrun (RANK, WORLD_SIZE)"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": None}, "MASTER_ADDR is not set"),
    ({"RANK": "1", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}, "RANK 1 is outside 0..0"),
])
def test_a_missing_or_bad_environment_is_a_clear_error(environment, message):
    env = {k: v for k, v in os.environ.items() if k not in environment}
    env.update({k: v for k, v in environment.items() if v is not None})
    p = subprocess.run([str(FXP_TRAIN), "--distributed", *COMMON], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and message in p.stderr, p.stderr


def test_distributed_cuda_graphs_are_refused():
    p = run_fxp_train("--distributed", "--cuda-graphs", "--device", "cuda")
    assert p.returncode != 0 and "cannot be combined with cuda_graphs yet" in p.stderr, p.stderr


def test_the_slurm_example_starts_one_run_across_its_tasks(tmp_path):
    # Stand-ins for SLURM's tools: scontrol names this host, srun starts SLURM_NTASKS copies with
    # their SLURM_PROCID and SLURM_LOCALID, as it would across nodes.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        "[[ $1 == --kill-on-bad-exit=1 ]] && shift\n"
        "for ((i = 0; i < SLURM_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i \"$@\" & done\n"
        "status=0; for ((i = 0; i < SLURM_NTASKS; i++)); do wait -n || status=1; done; exit $status\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node[01-02]", SLURM_NTASKS="2",
               SLURM_JOB_ID="4242", MASTER_PORT=str(free_port()), FXP_TRAIN=str(FXP_TRAIN), OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "scripts", "slurm",
                          "distributed.sbatch")
    run = [*COMMON, "--train-limit", "40", "--batch-size", "8", "--epochs", "1", "-o", str(tmp_path / "run")]
    p = subprocess.run(["bash", script, *run], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["distributed"]["world_size"] == 2 and summary["epochs_completed"] == 1
    # Submitted again (a requeue), it finds the finished run and trains nothing.
    p = subprocess.run(["bash", script, *run], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "already holds this finished run" in p.stdout, p.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    env.pop("SLURM_JOB_NODELIST")
    p = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "submit it with sbatch" in p.stderr
