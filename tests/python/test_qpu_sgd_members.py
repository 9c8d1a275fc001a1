"""fxp::qpu_sgd_members_step_, the per-member QPU step for fleets (issue 16; Note [Per-member QPU step]): a
fleet's tensors stacked along dim 0, each active member stepped exactly as qpu_sgd_step_ steps its solo run."""

from __future__ import annotations

import pytest
import torch

import fxp

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

members_op = torch.ops.fxp.qpu_sgd_members_step_
solo_op = torch.ops.fxp.qpu_sgd_step_

SHAPES = [(33,), (4, 5, 3), (70,)]
# Four members that differ in everything a fleet may vary.
MEMBERS = [
    dict(lr=0.05, momentum=0.9, wd=0.0, bits=16, frac=10, mbits=16, mfrac=10, rounding="stochastic", seed=1),
    dict(lr=0.01, momentum=0.0, wd=1e-3, bits=8, frac=4, mbits=8, mfrac=5, rounding="nearest_even", seed=1),
    dict(lr=0.2, momentum=0.5, wd=1e-4, bits=12, frac=8, mbits=16, mfrac=12, rounding="stochastic", seed=-7),
    dict(lr=0.05, momentum=0.9, wd=0.0, bits=16, frac=10, mbits=16, mfrac=10, rounding="stochastic", seed=2),
]


def member_args(members, field):
    return [m[field] for m in members]


def fleet_tensors(seed, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.stack([fxp.quantize(torch.randn(s, generator=g, dtype=dtype), m["bits"], m["frac"])
                           for m in MEMBERS]) for s in SHAPES]
    grads = [torch.randn((len(MEMBERS),) + s, generator=g, dtype=dtype) for s in SHAPES]
    momentum = [torch.zeros_like(p) for p in params]
    return [[t.to(device) for t in ts] for ts in (params, grads, momentum)]


def step_members(params, grads, momentum, steps, active=None, members=MEMBERS):
    return members_op(params, grads, momentum, member_args(members, "lr"), member_args(members, "momentum"),
                      member_args(members, "wd"), False, member_args(members, "bits"), member_args(members, "frac"),
                      member_args(members, "mbits"), member_args(members, "mfrac"),
                      member_args(members, "rounding"), member_args(members, "seed"), steps,
                      active if active is not None else [True] * len(members))


def step_solo(params, grads, momentum, m, step):
    c = MEMBERS[m]
    momentum = momentum if c["momentum"] else []  # a solo run without momentum has no buffers
    return solo_op(params, grads, momentum, c["lr"], c["momentum"], c["wd"], False, c["bits"], c["frac"], c["mbits"],
                   c["mfrac"], c["rounding"], c["seed"], step)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_member_steps_as_its_solo_run(dtype):
    params, grads, momentum = fleet_tensors(1, dtype=dtype)
    solo = [[[t[m].clone() for t in ts] for ts in (params, grads, momentum)] for m in range(len(MEMBERS))]
    for step in (1, 2, 3):  # members at their own step counts
        steps = [step, step + 10, step, 2 * step]
        counts = step_members(params, grads, momentum, steps)
        assert counts.shape == (len(MEMBERS), len(SHAPES), 2) and counts.dtype == torch.int64
        for m, (p, g, v) in enumerate(solo):
            solo_counts = step_solo(p, g, v, m, steps[m])
            assert torch.equal(counts[m], solo_counts)
            for stacked, alone in zip(params + momentum, p + v):
                assert torch.equal(stacked[m], alone), f"member {m}, step {step}"
    # Members 0 and 3 share all but the seed: their streams differ.
    assert not torch.equal(params[0][0], params[0][3])


def test_an_inactive_member_is_left_as_it_is():
    params, grads, momentum = fleet_tensors(2)
    before = [t.clone() for t in params + momentum]
    counts = step_members(params, grads, momentum, [1] * 4, active=[True, False, True, False])
    for stacked, old in zip(params + momentum, before):
        assert torch.equal(stacked[1], old[1]) and torch.equal(stacked[3], old[3])
        assert not torch.equal(stacked[0], old[0])
    assert counts[1].eq(0).all() and counts[3].eq(0).all()


def test_packed_codes_of_each_member():
    # int16 codes stacked per member (stacked codes share a dtype, so the members share FxP(16, 10) here):
    # as the solo step on each member's codes.
    params, grads, momentum = fleet_tensors(3)
    fmt = [(m["bits"], m["frac"]) for m in MEMBERS]
    codes = [torch.stack([fxp.pack(p[m], *fmt[m]).to(torch.int16) for m in range(4)]) for p in params]
    members = [dict(m, bits=16, frac=10, mbits=16, mfrac=10) for m in MEMBERS]
    mcodes = [torch.zeros_like(c) for c in codes]
    solo = [([c[m].clone() for c in codes], [g[m].clone() for g in grads], [v[m].clone() for v in mcodes])
            for m in range(4)]
    step_members(codes, grads, mcodes, [5] * 4, members=members)
    for m, (p, g, v) in enumerate(solo):
        c = members[m]
        solo_op(p, g, v if c["momentum"] else [], c["lr"], c["momentum"], c["wd"], False, 16, 10, 16, 10,
                c["rounding"], c["seed"], 5)
        assert all(torch.equal(a[m], b) for a, b in zip(codes + mcodes, p + v))


def test_members_with_and_without_momentum_mix_under_nesterov_and_stream_indices():
    params, grads, momentum = fleet_tensors(7)
    solo = [[[t[m].clone() for t in ts] for ts in (params, grads, momentum)] for m in range(len(MEMBERS))]
    streams = [2, 0, 1]
    args = [member_args(MEMBERS, f) for f in ("lr", "momentum", "wd")]
    formats = [member_args(MEMBERS, f) for f in ("bits", "frac", "mbits", "mfrac", "rounding", "seed")]
    members_op(params, grads, momentum, *args, True, *formats, [3] * 4, [True] * 4, "standard", streams)
    for m, (p, g, v) in enumerate(solo):
        c = MEMBERS[m]
        has_momentum = c["momentum"] != 0
        solo_op(p, g, v if has_momentum else [], c["lr"], c["momentum"], c["wd"], has_momentum, c["bits"],
                c["frac"], c["mbits"], c["mfrac"], c["rounding"], c["seed"], 3, "standard", streams)
        assert all(torch.equal(a[m], b) for a, b in zip(params + momentum, p + v)), f"member {m}"


@pytest.mark.parametrize("packed", [False, True])
def test_members_spread_over_the_threads_step_as_their_solo_runs(packed):
    # Note [Members over the threads]: 9 members on 2 threads (4 or more per thread) are stepped in one
    # parallel_for, split 5 and 4; each member keeps its solo bits, and packed NaNs are still named.
    members = [dict(MEMBERS[m % 4], seed=m) for m in range(9)]
    if packed:
        members = [dict(m, bits=16, frac=10, mbits=16, mfrac=10) for m in members]
    g = torch.Generator().manual_seed(11)
    params = [torch.stack([fxp.quantize(torch.randn(s, generator=g), m["bits"], m["frac"]) for m in members])
              for s in SHAPES]
    if packed:
        params = [torch.stack([fxp.pack(p[m], 16, 10).to(torch.int16) for m in range(9)]) for p in params]
    grads = [torch.randn((9,) + s, generator=g) for s in SHAPES]
    momentum = [torch.zeros_like(p) for p in params]
    solo = [[[t[m].clone() for t in ts] for ts in (params, grads, momentum)] for m in range(9)]
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        step_members(params, grads, momentum, list(range(1, 10)), members=members)
        if packed:
            grads[2][7, 1] = float("nan")
            with pytest.raises(ValueError, match=r"members 7 \(every active member was stepped\)"):
                step_members([p.clone() for p in params], grads, [v.clone() for v in momentum], [1] * 9,
                             members=members)
    finally:
        torch.set_num_threads(threads)
    for m, (p, gr, v) in enumerate(solo):
        c = members[m]
        solo_op(p, gr, v if c["momentum"] else [], c["lr"], c["momentum"], c["wd"], False, c["bits"], c["frac"],
                c["mbits"], c["mfrac"], c["rounding"], c["seed"], m + 1)
        assert all(torch.equal(a[m], b) for a, b in zip(params + momentum, p + v)), f"member {m}"


def test_members_may_not_share_memory():
    params, grads, momentum = fleet_tensors(8)
    base = torch.zeros(5, 33)
    with pytest.raises(ValueError, match=r"params\[0\] must be contiguous, so that its members do not share memory"):
        step_members([torch.zeros(33).expand(4, 33)] + params[1:], grads, momentum, [1] * 4)
    with pytest.raises(ValueError, match=r"grads\[1\] must be contiguous"):  # each member's rows must be
        step_members(params, grads[:1] + [grads[1].transpose(1, 2)] + grads[2:], momentum, [1] * 4)
    with pytest.raises(RuntimeError, match="overlap|share"):
        step_members([base[:4]] + params[1:], [base[1:]] + grads[1:], momentum, [1] * 4)


def test_a_nan_in_packed_storage_steps_every_member_then_names_the_ones_it_hit():
    params, grads, momentum = fleet_tensors(9)
    codes = [torch.stack([fxp.pack(p[m], 16, 10).to(torch.int16) for m in range(4)]) for p in params]
    mcodes = [torch.zeros_like(c) for c in codes]
    members = [dict(m, bits=16, frac=10, mbits=16, mfrac=10) for m in MEMBERS]
    grads[1][2, 0] = float("nan")  # member 2's tensor 1
    grads[0][0, 5] = float("nan")  # member 0's tensor 0
    before = [c.clone() for c in codes]
    with pytest.raises(ValueError, match=r"members 0, 2 \(every active member was stepped\)"):
        step_members(codes, grads, mcodes, [1] * 4, members=members)
    for m in range(4):  # every member moved: none was left behind by the error
        assert not all(torch.equal(c[m], b[m]) for c, b in zip(codes, before)), f"member {m}"


def test_empty_lists_are_a_clear_error():
    with pytest.raises(ValueError, match="expected at least one parameter tensor"):
        members_op([], [], [], [], [], [], False, [], [], [], [], [], [], [], [])


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(lr=a["lr"][:3]), "expected one lr per member (4), but got 3"),
    (lambda a: a.update(active=[True] * 5), "expected one active per member (4), but got 5"),
    (lambda a: a.update(grads=[g[:3] for g in a["grads"]]), "grads[0] must hold the 4 members of params[0]"),
    (lambda a: a.update(frac=[4, 4, 20, 4]), "member 2"),
    (lambda a: a.update(params=[]), "expected at least one parameter tensor"),
])
def test_bad_arguments_are_named(change, message):
    params, grads, momentum = fleet_tensors(4)
    a = dict(params=params, grads=grads, momentum=momentum, lr=member_args(MEMBERS, "lr"),
             frac=member_args(MEMBERS, "frac"), active=[True] * 4)
    change(a)
    with pytest.raises((ValueError, RuntimeError)) as error:
        members_op(a["params"], a["grads"], a["momentum"], a["lr"], member_args(MEMBERS, "momentum"),
                   member_args(MEMBERS, "wd"), False, member_args(MEMBERS, "bits"), a["frac"],
                   member_args(MEMBERS, "mbits"), member_args(MEMBERS, "mfrac"), member_args(MEMBERS, "rounding"),
                   member_args(MEMBERS, "seed"), [1] * 4, a["active"])
    assert message in str(error.value)


def _opcheck(device):
    params, grads, momentum = fleet_tensors(5, device)
    args = (params, grads, momentum, member_args(MEMBERS, "lr"), member_args(MEMBERS, "momentum"),
            member_args(MEMBERS, "wd"), False, member_args(MEMBERS, "bits"), member_args(MEMBERS, "frac"),
            member_args(MEMBERS, "mbits"), member_args(MEMBERS, "mfrac"), member_args(MEMBERS, "rounding"),
            member_args(MEMBERS, "seed"), [1, 2, 3, 4], [True] * 4)
    torch.library.opcheck(members_op.default, args)  # member 1 has no momentum
    torch.library.opcheck(members_op.default, args[:-1] + ([True, False, True, False],))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _opcheck(device)


@requires_cuda
def test_cuda_steps_the_cpu_bits():
    cpu = fleet_tensors(6)
    cuda = fleet_tensors(6, "cuda")
    counts = step_members(*cpu, [3, 4, 5, 6])
    counts_cuda = step_members(*cuda, [3, 4, 5, 6])
    assert torch.equal(counts, counts_cuda.cpu())
    for a, b in zip(cpu[0] + cpu[2], cuda[0] + cuda[2]):
        assert torch.equal(a, b.cpu())


def _packed_fleet(seed, device):
    params, grads, _ = fleet_tensors(seed)
    codes = [torch.stack([fxp.pack(p[m], 16, 10).to(torch.int16) for m in range(4)]) for p in params]
    mcodes = [torch.zeros_like(c) for c in codes]
    return [[t.to(device) for t in ts] for ts in (codes, grads, mcodes)]


@requires_cuda
def test_cuda_steps_the_cpu_bits_on_codes_with_inactive_members_nesterov_and_streams():
    members = [dict(m, bits=16, frac=10, mbits=16, mfrac=10) for m in MEMBERS]
    args = [member_args(members, f) for f in ("lr", "momentum", "wd")]
    formats = [member_args(members, f) for f in ("bits", "frac", "mbits", "mfrac", "rounding", "seed")]
    fleets = [_packed_fleet(10, "cpu"), _packed_fleet(10, "cuda")]
    before = [t.clone() for t in fleets[0][0]]
    for step in (1, 2, 3):
        counts = [members_op(codes, grads, mcodes, *args, True, *formats, [step, step + 4, step, 2 * step],
                             [True, True, True, False], "standard", [2, 0, 1])
                  for codes, grads, mcodes in fleets]
        assert torch.equal(counts[0], counts[1].cpu())
    for a, b in zip(fleets[0][0] + fleets[0][2], fleets[1][0] + fleets[1][2]):
        assert torch.equal(a, b.cpu())
    assert all(torch.equal(c[3], b[3]) for c, b in zip(fleets[0][0], before))  # the inactive member
    # The active ones moved, member 1 too: it has no momentum buffer, under nesterov.
    assert not all(torch.equal(c[0], b[0]) for c, b in zip(fleets[0][0], before))
    assert not all(torch.equal(c[1], b[1]) for c, b in zip(fleets[0][0], before))


@requires_cuda
def test_cuda_names_the_members_a_nan_hit_as_the_cpu_does():
    # An error raised after a count is read back from the device (docs/gpu-check.md: such errors
    # crashed three other CUDA cases in earlier runs).
    messages = []
    for device in ("cpu", "cuda"):
        codes, grads, mcodes = _packed_fleet(11, device)
        grads[1][2, 0] = float("nan")
        with pytest.raises(ValueError, match=r"members 2 \(every active member was stepped\)") as error:
            step_members(codes, grads, mcodes, [1] * 4,
                         members=[dict(m, bits=16, frac=10, mbits=16, mfrac=10) for m in MEMBERS])
        messages.append(str(error.value))
    assert messages[0] == messages[1]
