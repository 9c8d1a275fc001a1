"""fxp::quantize_members, the per-member form of quantize_seeded for fleets (issue 16; Note [Per-member
quantization]): each member of a stacked tensor is quantized with its own format, rounding and Philox
stream, with the bits it would get alone."""

from __future__ import annotations

import pytest
import torch

import fxp
from fxp import FxpFormat

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

FORMATS = [FxpFormat(16, 10), FxpFormat(8, 4), FxpFormat(12, 6), FxpFormat(4, 2), FxpFormat(16, 8)]
ROUNDINGS = ["stochastic", "nearest_even", "stochastic", "floor", "stochastic"]
SEEDS = [11, -3, 2**62 + 5, 0, 11]  # the first and last share a key but not an offset
OFFSETS = [0, 4, 8, 12, 16]


def solo(x, m, member_dim, overflow="saturate"):
    """Member m quantized alone, as its solo run would."""
    return fxp.quantize_seeded(x.select(member_dim, m), FORMATS[m], rounding=ROUNDINGS[m], seed=SEEDS[m],
                               offset=OFFSETS[m], overflow=overflow)


def members(x, member_dim, **kw):
    return fxp.quantize_members(x, member_dim, FORMATS, ROUNDINGS, seeds=SEEDS, offsets=OFFSETS, **kw)


@pytest.mark.parametrize("member_dim", [0, 1, 2, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_each_member_gets_the_bits_it_gets_alone(member_dim, dtype):
    shape = [3, 7, 9, 4]
    shape[member_dim] = 5
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 9).to(dtype)
    out = members(x, member_dim, overflow="wrap")
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    for m in range(5):
        torch.testing.assert_close(out.select(member_dim, m), solo(x, m, member_dim, "wrap"), rtol=0, atol=0)


def test_a_member_does_not_depend_on_the_fleet_around_it_or_on_strides():
    x = torch.randn(5, 64, 33, generator=torch.Generator().manual_seed(2))
    fleet = members(x, 0)
    alone = fxp.quantize_members(x[3:4], 0, FORMATS[3:4], ROUNDINGS[3:4], seeds=SEEDS[3:4], offsets=OFFSETS[3:4])
    assert torch.equal(fleet[3], alone[0])
    # The same members laid out along the last dimension of a transposed (strided) view.
    strided = x.permute(1, 2, 0)
    assert not strided.is_contiguous()
    assert torch.equal(members(strided, 2).permute(2, 0, 1), fleet)


@pytest.mark.parametrize("shape, member_dim", [((10, 3, 700), 0), ((1, 10, 700), 1), ((3, 10, 700), 1)])
def test_members_spread_over_the_threads_get_the_bits_they_get_alone(shape, member_dim):
    # Note [Members over the threads]: 10 members on 2 threads (4 or more per thread) with dense
    # slices (member-major, or a grouped layout at batch 1) are quantized in one parallel_for, split 5 and
    # 5; strided slices (a grouped layout at batch 3) run member after member. Each keeps its solo bits.
    formats, roundings = [FORMATS[m % 5] for m in range(10)], [ROUNDINGS[m % 5] for m in range(10)]
    seeds, offsets = list(range(100, 110)), [4 * m for m in range(10)]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 9
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = fxp.quantize_members(x, member_dim, formats, roundings, seeds=seeds, offsets=offsets)
    finally:
        torch.set_num_threads(threads)
    for m in range(10):
        alone = fxp.quantize_seeded(x.select(member_dim, m), formats[m], rounding=roundings[m], seed=seeds[m],
                                    offset=offsets[m])
        assert torch.equal(out.select(member_dim, m), alone), f"member {m}"


def test_stochastic_members_draw_independent_streams():
    # Five members with one format and value but their own (seed, offset): their rounding noise differs.
    x = torch.full((5, 4096), 0.3)
    out = fxp.quantize_members(x, 0, [FxpFormat(8, 2)] * 5, "stochastic", seeds=SEEDS, offsets=OFFSETS)
    rows = [tuple(r.tolist()) for r in out]
    assert len(set(rows)) == 5
    # Unbiased: 0.3 lies 1.2 steps above 0 (step 0.25), so each element is 0.25 or 0.5, with mean 0.3.
    assert set(out.unique().tolist()) == {0.25, 0.5}
    assert abs(out.mean().item() - 0.3) < 4 * (0.25 * 0.4**0.5 * 0.6**0.5) / (5 * 4096) ** 0.5


@pytest.mark.parametrize("call,message", [
    (lambda x: fxp.quantize_members(x, 0, FORMATS[:4], ROUNDINGS, seeds=SEEDS, offsets=OFFSETS),
     "expected one total_bits per member (x has 5 members along dim 0), but got 4"),
    (lambda x: fxp.quantize_members(x, 0, FORMATS, ROUNDINGS, seeds=SEEDS[:2], offsets=OFFSETS),
     "expected one seed per member (x has 5 members along dim 0), but got 2"),
    (lambda x: fxp.quantize_members(x, 0, FORMATS, ["stochastic"] * 4 + ["upwards"], seeds=SEEDS, offsets=OFFSETS),
     "fxp::quantize_members (member 4)"),
    (lambda x: fxp.quantize_members(x, 0, FORMATS[:4] + [FxpFormat(8, 4)], ROUNDINGS, seeds=SEEDS,
                                    offsets=[0, 0, 0, 0, -4]),
     "fxp.quantize_members: offsets[4] must be in [0, 2**63)"),
    (lambda x: torch.ops.fxp.quantize_members(x, 0, [8] * 5, [4] * 5, ["stochastic"] * 5, SEEDS, [0, 0, 0, 0, -4],
                                              "saturate"),  # the op's own check, for callers without fxp.ops
     "fxp::quantize_members (member 4)"),
    (lambda x: fxp.quantize_members(x, 3, FORMATS, ROUNDINGS, seeds=SEEDS, offsets=OFFSETS),
     "fxp::quantize_members: member_dim must be in [-3, 2] for x of shape [5, 3, 2], but got 3"),  # was a bare
    (lambda x: torch.ops.fxp.quantize_members(x, 5, [8] * 5, [4] * 5, ["stochastic"] * 5, SEEDS, [0] * 5,
                                              "saturate"),  # IndexError that named no op
     "fxp::quantize_members: member_dim must be in [-3, 2] for x of shape [5, 3, 2], but got 5"),
    (lambda x: fxp.quantize_members(x.sum(), 0, FORMATS, ROUNDINGS, seeds=SEEDS, offsets=OFFSETS),
     "x needs a member dimension, but is a scalar"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises((ValueError, IndexError, RuntimeError), match=None) as error:
        call(torch.randn(5, 3, 2))
    assert message in str(error.value)


def test_python_types_are_checked():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match=r"formats\[1\] must be an FxpFormat"):
        fxp.quantize_members(x, 0, [FxpFormat(8, 4), (8, 4)], "nearest_even", seeds=[1, 2])
    with pytest.raises(TypeError, match=r"seeds\[1\] must be an int"):
        fxp.quantize_members(x, 0, [FxpFormat(8, 4)] * 2, "nearest_even", seeds=[1, 2.5])


def test_the_straight_through_form_has_the_same_bits_and_passes_the_gradient():
    x = (torch.randn(5, 6, 7, generator=torch.Generator().manual_seed(4)) * 9).requires_grad_()
    y = members(x, 0, straight_through=True)
    assert y.requires_grad and torch.equal(y.detach(), members(x.detach(), 0))
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    assert torch.equal(grad, upstream)  # saturated elements too (quantize_ste's default)
    with pytest.raises(RuntimeError, match="does not require grad|not differentiable|derivative"):
        torch.autograd.grad(members(x, 0), x, upstream)


def _opcheck(device):
    x = torch.randn(6, 7, 5, device=device)
    lists = ([f.total_bits for f in FORMATS], [f.frac_bits for f in FORMATS], ROUNDINGS, SEEDS, OFFSETS)
    torch.library.opcheck(torch.ops.fxp.quantize_members.default, (x, -1, *lists))
    strided = torch.randn(5, 7, 6, device=device).transpose(0, 2)
    torch.library.opcheck(torch.ops.fxp.quantize_members.default, (strided, 2, *lists), {"overflow": "wrap"})
    ste = torch.ops.fxp.quantize_members_ste.default
    torch.library.opcheck(ste, (x.clone().requires_grad_(), -1, *lists))
    torch.library.opcheck(ste, (strided.clone().requires_grad_(), 2, *lists), {"overflow": "wrap"})


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    _opcheck(device)


@requires_cuda
@pytest.mark.parametrize("member_dim", [0, 1])
def test_cuda_gives_the_cpu_bits(member_dim):
    x = torch.randn(5, 5, 1000, generator=torch.Generator().manual_seed(3)) * 20
    assert torch.equal(members(x.cuda(), member_dim).cpu(), members(x, member_dim))
