"""MSQ's RoundClamp ops (issue 14; Note [RoundClamp]): exact values against a
float64 reference of the formula, the nesting of the (n-1)-bit grid in the
n-bit grid, ties, the clamp, NaN, the straight-through gradients, opcheck, bad
input, and CUDA == CPU bit for bit where a GPU is present."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import fxp
import fxp.msq as msq

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def reference(w: torch.Tensor, scale: float, bits: int):
    """(codes, quantized, lsb) from the Note's formula, in float64 NumPy."""
    x = w.double().numpy()
    m = np.abs(x) / scale
    c = np.minimum(np.rint(m * 2.0**bits), 2.0**bits - 1)
    lower = np.minimum(np.rint(m * 2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1)
    sign = np.sign(x)
    step = scale * 2.0**-bits
    codes = sign * c
    return codes, torch.from_numpy(codes * step).to(w.dtype), torch.from_numpy(sign * (c - 2 * lower) * step).to(w.dtype)


def weights(n=20000, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=gen) * 0.3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8, 12, 16])
def test_values_codes_and_lsb_equal_the_formula(dtype, bits):
    w = weights(dtype=dtype)
    scale = float(w.abs().max().float())  # a float32 value, as fxp's MSQ uses
    codes, quantized, lsb = reference(w, scale, bits)
    q, l1, nonzero = msq.round_clamp(w, scale, bits)
    assert q.dtype == dtype and q.shape == w.shape
    assert torch.equal(q, quantized)
    assert torch.equal(msq.round_clamp_lsb(w, scale, bits), lsb)
    got_codes = msq.round_clamp_codes(w, scale, bits)
    assert got_codes.dtype == (torch.int8 if bits <= 7 else torch.int16 if bits <= 15 else torch.int32)
    assert torch.equal(got_codes.double(), torch.from_numpy(codes))
    # The L1 sum and the count, exactly: each non-zero LSB is scale * 2^-bits.
    assert nonzero.dtype == torch.int64 and nonzero.dim() == 0
    assert int(nonzero) == int((lsb != 0).sum()) > 0
    assert l1.dtype == dtype and l1.dim() == 0
    assert float(l1) == float(torch.tensor(int(nonzero) * scale * 2.0**-bits, dtype=dtype))
    assert math.isclose(float(l1), float(lsb.double().abs().sum()), rel_tol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("bits", [2, 3, 5, 8, 16])
def test_the_lower_grid_nests_in_the_upper(bits):
    # float64 weights and a float32 scale: every value below is exact, so the identities hold exactly.
    w = weights(seed=1, dtype=torch.float64)
    scale = float(w.abs().max().float())
    lower, _, _ = msq.round_clamp(w, scale, bits - 1)
    # Every (n-1)-bit value is an n-bit value with LSB 0 ...
    upper, l1, nonzero = msq.round_clamp(lower, scale, bits)
    assert torch.equal(upper, lower)
    assert int(nonzero) == 0 and float(l1) == 0.0
    assert torch.equal(msq.round_clamp_codes(lower, scale, bits), 2 * msq.round_clamp_codes(w, scale, bits - 1).int())
    # ... and a weight's LSB is 0 exactly when dropping the bit leaves it unchanged.
    q, _, _ = msq.round_clamp(w, scale, bits)
    lsb = msq.round_clamp_lsb(w, scale, bits)
    assert torch.equal(lsb == 0, q == lower)
    assert torch.equal(q - lsb, lower)
    assert set(torch.unique(lsb / (scale * 2.0**-bits)).tolist()) == {-1.0, 0.0, 1.0}


def test_ties_round_half_to_even_at_both_widths():
    # scale 1, 3 bits: codes of 1/8; the 2-bit grid is the even codes.
    w = torch.tensor([2.5, 3.5, -2.5, 1.5, 0.5, -0.5, 3.0, 5.0, -1.0]) / 8
    q, _, nonzero = msq.round_clamp(w, 1.0, 3)
    assert (q * 8).tolist() == [2.0, 4.0, -2.0, 2.0, 0.0, 0.0, 3.0, 5.0, -1.0]
    # 3/8 is a 2-bit tie (1.5 quarters): it rounds to 2 quarters, so its LSB is 3 - 4 = -1.
    lsb = msq.round_clamp_lsb(w, 1.0, 3) * 8
    assert lsb.tolist() == [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0, 1.0, -1.0]
    assert int(nonzero) == 3


def test_the_clamp_at_the_largest_code():
    # 3 bits: the largest magnitude code is 7 (7/8 of the scale); 7.5/8 is a tie that would round to 8.
    w = torch.tensor([0.9, 1.0, 3.0, 7.5 / 8, math.inf, -math.inf, -2.0, 6.9 / 8])
    q, _, _ = msq.round_clamp(w, 1.0, 3)
    assert (q * 8).tolist() == [7.0, 7.0, 7.0, 7.0, 7.0, -7.0, -7.0, 7.0]
    # The 2-bit clamp is 3 quarters (6/8), so a clamped weight's LSB is 7 - 6 = 1.
    assert (msq.round_clamp_lsb(w, 1.0, 3) * 8).tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, -1.0, -1.0, 1.0]
    assert msq.round_clamp_codes(w, 1.0, 3).tolist() == [7, 7, 7, 7, 7, -7, -7, 7]


def test_nan_stays_nan_and_has_no_code():
    w = torch.tensor([0.25, math.nan, -0.5])
    q, l1, nonzero = msq.round_clamp(w, 1.0, 4)
    assert q[0] == 0.25 and math.isnan(q[1]) and q[2] == -0.5
    assert math.isnan(float(l1)) and int(nonzero) == 1  # the NaN counts as a non-zero LSB
    assert math.isnan(msq.round_clamp_lsb(w, 1.0, 4)[1])
    with pytest.raises(RuntimeError, match="1 of the 3 weights are NaN"):
        msq.round_clamp_codes(w, 1.0, 4)


def test_gradients_are_straight_through():
    w = weights(n=3000, seed=2).requires_grad_()
    scale, bits, lam = float(w.detach().abs().max()), 4, 0.01
    q, l1, nonzero = msq.round_clamp(w, scale, bits)
    assert not nonzero.requires_grad
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
    ((q * upstream).sum() + lam * l1).backward()
    sign = torch.sign(msq.round_clamp_lsb(w.detach(), scale, bits))
    assert torch.equal(w.grad, upstream + torch.tensor(lam) * sign)
    # The quantizer alone: the identity; the penalty alone: lam * sign(LSB).
    w.grad = None
    msq.round_clamp(w, scale, bits)[0].sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    w.grad = None
    (lam * msq.round_clamp(w, scale, bits)[1]).backward()
    assert torch.equal(w.grad, torch.tensor(lam) * sign)
    w.grad = None
    msq.round_clamp_lsb(w, scale, bits).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    # The penalty's gradient pulls a weight with a non-zero LSB toward its (n-1)-bit value.
    lower = msq.round_clamp(w.detach(), scale, bits - 1)[0]
    moved = w.detach() - 1e-3 * sign
    assert bool(((moved - lower).abs() <= (w.detach() - lower).abs()).all())


def test_non_contiguous_and_empty_inputs():
    w = weights(n=600, seed=4).reshape(20, 30)
    q, l1, nonzero = msq.round_clamp(w.t(), 1.0, 5)
    want, want_l1, want_nonzero = msq.round_clamp(w.t().contiguous(), 1.0, 5)
    assert torch.equal(q, want) and torch.equal(l1, want_l1) and torch.equal(nonzero, want_nonzero)
    q, l1, nonzero = msq.round_clamp(torch.empty(0, 3), 1.0, 5)
    assert q.shape == (0, 3) and float(l1) == 0.0 and int(nonzero) == 0


def test_bad_input_is_refused():
    w = weights(n=10)
    for bits in (0, 17, -3):
        with pytest.raises(RuntimeError, match=rf"fxp::round_clamp: bits must be in \[1, 16\], but got {bits}"):
            msq.round_clamp(w, 1.0, bits)
    for scale in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(RuntimeError, match="scale must be a positive finite number"):
            msq.round_clamp(w, scale, 4)
    with pytest.raises(RuntimeError, match="w must be float32 or float64, but got Half"):
        msq.round_clamp(w.half(), 1.0, 4)
    with pytest.raises(RuntimeError, match="fxp::round_clamp_codes: w must be float32 or float64, but got Int"):
        msq.round_clamp_codes(w.int(), 1.0, 4)
    with pytest.raises(TypeError, match="bits must be an int"):
        msq.round_clamp(w, 1.0, 4.0)
    with pytest.raises(TypeError, match="scale must be a number"):
        msq.round_clamp(w, "1", 4)
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        msq.round_clamp([1.0], 1.0, 4)
    with pytest.raises(RuntimeError, match="grad_lsb_l1 must be a 0-dim tensor"):
        torch.ops.fxp.round_clamp_backward(w, w, w, 1.0, 4)
    with pytest.raises(RuntimeError, match="grad_quantized must match w's dtype, shape and device"):
        torch.ops.fxp.round_clamp_backward(w[:5], torch.tensor(1.0), w, 1.0, 4)


def _op_args(device):
    w = weights(n=500, seed=5).to(device)
    return [
        (torch.ops.fxp.round_clamp.default, (w.clone().requires_grad_(), 0.9, 4)),
        (torch.ops.fxp.round_clamp_lsb.default, (w.clone().requires_grad_(), 0.9, 6)),
        (torch.ops.fxp.round_clamp_codes.default, (w, 0.9, 8)),
        (torch.ops.fxp.round_clamp_backward.default, (torch.randn_like(w), torch.tensor(0.5, device=device), w, 0.9, 3)),
    ]


def test_opcheck_cpu():
    for op, args in _op_args("cpu"):
        torch.library.opcheck(op, args)


@requires_cuda
def test_opcheck_cuda():
    for op, args in _op_args("cuda"):
        torch.library.opcheck(op, args)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_equals_cpu(dtype):
    w = torch.cat([weights(n=3_000_001, dtype=dtype, seed=6), torch.tensor([math.nan, math.inf, -0.0], dtype=dtype)])
    for bits in (1, 2, 4, 7, 8, 15, 16):  # 1, 7 and 15: the edges of the int8 and int16 codes
        scale = 1.25
        cpu = msq.round_clamp(w, scale, bits)
        assert (cpu[0].abs() == scale * (1 - 2.0**-bits)).sum() > 1  # clamped at the largest code (and inf)
        cuda = msq.round_clamp(w.cuda(), scale, bits)
        bits_of = lambda t: t.view(torch.int64 if t.dtype in (torch.float64, torch.int64) else torch.int32)  # noqa: E731
        for got, want in zip(cuda, cpu):  # bit for bit: the sign of zero and NaN's bits too
            assert got.device.type == "cuda" and torch.equal(bits_of(got.cpu()), bits_of(want))
        assert torch.equal(bits_of(msq.round_clamp_lsb(w.cuda(), scale, bits).cpu()),
                           bits_of(msq.round_clamp_lsb(w, scale, bits)))
        finite = w[:-3]
        codes = msq.round_clamp_codes(finite, scale, bits)
        assert codes.dtype == (torch.int8 if bits <= 7 else torch.int16 if bits <= 15 else torch.int32)
        assert int(codes.abs().max()) == 2**bits - 1 and (codes == 0).any()
        assert torch.equal(msq.round_clamp_codes(finite.cuda(), scale, bits).cpu(), codes)
        g, gl1 = torch.randn_like(w), torch.tensor(0.3, dtype=dtype)
        assert torch.equal(torch.ops.fxp.round_clamp_backward(g.cuda(), gl1.cuda(), w.cuda(), scale, bits).cpu(),
                           torch.ops.fxp.round_clamp_backward(g, gl1, w, scale, bits))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [1, 7, 15, 16])
def test_cuda_empty_tensor_equals_cpu(dtype, bits):
    """An empty w: empty results of w's shape and dtype (codes: int8/int16/int32),
    an L1 norm of 0 and a count of 0, on the device, as on the CPU."""
    w, g = torch.empty(0, 3, dtype=dtype), torch.empty(0, 3, dtype=dtype)
    gl1 = torch.tensor(0.3, dtype=dtype)
    cpu = (*msq.round_clamp(w, 1.25, bits), msq.round_clamp_lsb(w, 1.25, bits), msq.round_clamp_codes(w, 1.25, bits),
           torch.ops.fxp.round_clamp_backward(g, gl1, w, 1.25, bits))
    w_cuda = w.cuda()
    cuda = (*msq.round_clamp(w_cuda, 1.25, bits), msq.round_clamp_lsb(w_cuda, 1.25, bits),
            msq.round_clamp_codes(w_cuda, 1.25, bits),
            torch.ops.fxp.round_clamp_backward(g.cuda(), gl1.cuda(), w_cuda, 1.25, bits))
    assert [t.shape for t in cpu] == [(0, 3), (), (), (0, 3), (0, 3), (0, 3)]
    assert cpu[4].dtype == (torch.int8 if bits <= 7 else torch.int16 if bits <= 15 else torch.int32)
    assert float(cpu[1]) == 0.0 and int(cpu[2]) == 0
    for got, want in zip(cuda, cpu):
        assert got.device == w_cuda.device and got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.cpu(), want)
