"""fxp.nn and fxp.optim.QPUSGD under torch.nn.parallel.DistributedDataParallel (issue 16, "One run across
processes"): local Gloo process groups on the CPU. QPU's stochastic rounding is keyed by the shared seed
and step, so every rank rounds the same averaged gradient the same way and the replicas stay
bit-identical without a broadcast after the first."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fxp
from fxp import FxpFormat
from fxp.optim import QPUSGD

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this torch has no Gloo process groups")
FMT, ACT = FxpFormat(16, 10), FxpFormat(16, 8)
GLOBAL_BATCH, STEPS = 12, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, packed: bool, method: str, act_rounding: str = "sr") -> dict:
    """STEPS steps of the paper CNN on rank's contiguous shard of a global batch; its state afterwards."""
    torch.manual_seed(0)  # every rank builds the same model
    model = fxp.nn.PaperCNN(method, FMT, ACT, act_rounding=act_rounding)
    model.quantize_parameters_(rounding="stochastic" if method == "sqpu" else "nearest_even", seed=0)
    if packed:
        model.pack_()
    # Packed stand-ins are expanded views, which DDP's first broadcast cannot write, and Gloo cannot
    # broadcast int16 codes (buffers): the ranks built the same model and round the same averaged
    # gradients the same way, so neither broadcast is needed (init_sync, broadcast_buffers off).
    net = model if world == 1 else DDP(model, init_sync=not packed, broadcast_buffers=not packed)
    opt = QPUSGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, format=FMT, seed=3,
                 rounding="stochastic" if method == "sqpu" else "nearest_even")
    if packed:
        for storage in fxp.nn.packed_storage(model):
            opt.set_packed_storage(*storage)
    gen = torch.Generator().manual_seed(1)
    shard = GLOBAL_BATCH // world
    for _ in range(STEPS):
        x, y = torch.randn(GLOBAL_BATCH, 1, 28, 28, generator=gen), torch.randint(0, 10, (GLOBAL_BATCH,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(net(x[rank * shard:(rank + 1) * shard]), y[rank * shard:(rank + 1) * shard]).backward()
        opt.step()
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for k, v in enumerate(opt.state.values()):
        state[f"momentum.{k}"] = v["momentum_buffer"].clone()
    return state


def _worker(rank: int, world: int, port: int, packed: bool, method: str, act_rounding: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(_train(rank, world, packed, method, act_rounding), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(tmp_path, world: int, packed: bool = False, method: str = "sqpu", act_rounding: str = "sr") -> list[dict]:
    mp.spawn(_worker, args=(world, _free_port(), packed, method, act_rounding, str(tmp_path)), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("world, packed, method", [(2, False, "sqpu"), (3, False, "sqpu"), (2, False, "hteqpu"),
                                                   (2, True, "sqpu")])
def test_replicas_stay_bit_identical(tmp_path, world, packed, method):
    states = _run(tmp_path, world, packed, method)
    assert any(k.startswith("momentum.") for k in states[0])
    for rank, state in enumerate(states[1:], 1):
        assert state.keys() == states[0].keys()
        for key in state:
            assert torch.equal(_bits(state[key]), _bits(states[0][key])), (rank, key)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """DDP averages the shards' mean-loss gradients: the global batch's gradient up to the float
    reduction order. After rounding, an element differs from the one-process run only where that
    order moved a value across a rounding boundary: by one step of the grid, in few elements.
    Activations round to nearest here: stochastic activation rounding draws from each process's own
    generator, for its own shard, so those draws differ from a single process's (the replicas stay
    identical all the same: only the averaged gradient updates them)."""
    two = _run(tmp_path, 2, act_rounding="hte")[0]
    one = _train(0, 1, False, "sqpu", act_rounding="hte")
    lsb = 2.0 ** -FMT.frac_bits
    differing = total = 0
    for key, value in one.items():
        if not value.is_floating_point():
            assert torch.equal(value, two[key]), key
            continue
        diff = (value.double() - two[key].double()).abs()
        assert float(diff.max()) <= 2 * lsb, key  # momentum is on its grid too (the parameter format)
        differing += int((diff > 0).sum())
        total += value.numel()
    assert differing <= total // 1000, (differing, total)
