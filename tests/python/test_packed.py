"""Packed integer storage (issue 6): pack/unpack exactness and errors, the
fused QPU step on codes, conv/linear with packed saved inputs and weights,
packed layers and optimizer, bit-identity with float storage, opcheck, CUDA."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fxp
from environment import bits as _bits
from fxp import FxpFormat
from fxp.optim import QPUSGD

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
ops = torch.ops.fxp


# --- pack / unpack ----------------------------------------------------------
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_pack_unpack_exact_for_every_code(rounding):
    for total_bits in range(2, 11):
        for frac_bits in {0, total_bits // 2, total_bits - 1}:
            fmt = FxpFormat(total_bits, frac_bits)
            codes = torch.arange(fmt.code_min, fmt.code_max + 1, dtype=torch.int64)
            values = codes.double() * fmt.resolution
            for dtype in (torch.float32, torch.float64):
                packed = fxp.pack_seeded(values.to(dtype), fmt, rounding=rounding, seed=3)
                assert packed.dtype == fmt.storage_dtype
                assert torch.equal(packed.long(), codes)
                assert torch.equal(fxp.unpack(packed, fmt, dtype=dtype), values.to(dtype))


def _edge_values(fmt: FxpFormat, n_random: int, seed: int) -> torch.Tensor:
    """float64 values every one of which float32 holds exactly, around what pack decides: the code range's
    ends and a step beyond them, ties and quarter points of the grid, huge finite values (whose x * 2^F
    overflows float32), infinities, subnormals, zeros, and random values over the range and beyond it."""
    top, r = 2.0 ** (fmt.total_bits - 1), fmt.resolution
    codes = [top - 1, top, top + 1, -top, -top - 1, -top + 1, 2.0**24 - 1, 2.0**24 + 1, 0, 1, -1, 5, -5]
    values = [c * r for c in codes] + [(c + d) * r for c in codes for d in (0.25, 0.5, 0.75, -0.5)]
    values += [3.0e38, -3.0e38, 2.0**100, float("inf"), float("-inf"), 1e-40, -1e-40, 0.0, -0.0]
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor(values, dtype=torch.float64)
    x = torch.cat([x, (torch.rand(n_random, generator=gen, dtype=torch.float64) * 2.2 - 1.1) * top * r])
    return x.float().double()  # float32 values, as float64


def test_codes_computed_in_float32_equal_those_computed_in_float64():
    """Note [Codes in float32]: a float32 (float16, bfloat16) tensor's codes are computed in float32 and
    integers, a float64 tensor's in float64; both are exact, so the codes, the saturated and off-grid
    counts, and the values unpacked are the same, bit for bit, for every width, rounding and overflow,
    and the codes are those of quantize in float64 (with the exact bounds, and its own top step)."""
    for total_bits in (2, 3, 8, 12, 16, 17, 24, 25, 26, 31, 32):
        for frac_bits in sorted({0, 1, total_bits // 2, total_bits - 1}):
            fmt = FxpFormat(total_bits, frac_bits)
            x64 = _edge_values(fmt, 2000, total_bits * 64 + frac_bits)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                xs = x64.to(dtype)
                for overflow in ("saturate", "wrap"):
                    for rounding in ("nearest_even", "stochastic", "floor", "nearest_away"):
                        got = fxp.pack_seeded(xs, fmt, rounding=rounding, seed=5, offset=11, overflow=overflow)
                        want = fxp.pack_seeded(xs.double(), fmt, rounding=rounding, seed=5, offset=11,
                                               overflow=overflow)
                        assert torch.equal(got, want), (fmt, dtype, overflow, rounding)
                        # and quantize's in float64, which clamps and wraps at 2^(B-1) - 1 without pack's top step
                        value = fxp.quantize_seeded(xs.double(), fmt, rounding=rounding, seed=5, offset=11,
                                                    overflow=overflow)
                        assert torch.equal(want.long(), (value * 2.0**frac_bits).long()), (fmt, overflow, rounding)
                # NaN (code 0) and off the grid, counted alike
                with_nan = torch.cat([xs, torch.tensor([float("nan")], dtype=dtype)])
                counted = []
                for x in (with_nan, with_nan.double()):
                    counts = torch.zeros(2, dtype=torch.long)
                    counted.append((fxp.pack(x, fmt, rounding="exact", counts=counts), counts))
                assert torch.equal(counted[0][0], counted[1][0]) and torch.equal(counted[0][1], counted[1][1])
                assert counted[0][1][0] == 1 and counted[0][1][1] > 0
            codes = fxp.pack(x64, fmt)
            exact = fxp.unpack(codes, fmt, dtype=torch.float64)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):  # rounded once, from the exact value
                with np.errstate(over="ignore"):  # beyond 65504 both give inf
                    expect = torch.from_numpy(exact.numpy().astype(np.float16)) if dtype == torch.float16 else (
                        exact.to(dtype) if dtype == torch.float32 else None)
                got = fxp.unpack(codes, fmt, dtype=dtype)
                if expect is not None:
                    assert torch.equal(got, expect), (fmt, dtype)
                else:
                    assert torch.equal(got.double(), torch.tensor(
                        [_bfloat16_nearest_even(v) for v in exact.tolist()], dtype=torch.float64)), fmt


def test_storage_dtype_by_total_bits():
    for bits, dtype in [(2, torch.int8), (8, torch.int8), (9, torch.int16), (16, torch.int16), (17, torch.int32),
                        (32, torch.int32)]:
        assert fxp.pack(torch.zeros(3), bits, 1).dtype == dtype == FxpFormat(bits, 1).storage_dtype


def test_pack_matches_quantize_and_saturates_to_exact_bounds():
    torch.manual_seed(0)
    x = torch.randn(10_000) * 40
    for fmt in (FxpFormat(8, 4), FxpFormat(16, 10), FxpFormat(24, 12)):
        for rounding in ("nearest_even", "stochastic", "floor", "nearest_away"):
            expected = fxp.quantize_seeded(x.double(), fmt, rounding=rounding, seed=9, offset=4)
            packed = fxp.pack_seeded(x, fmt, rounding=rounding, seed=9, offset=4)
            assert torch.equal(fxp.unpack(packed, fmt, dtype=torch.float64), expected)
    # B = 32: the code bound is 2^31 - 1 (float32 storage of quantize stops at 2^31 - 128).
    big = torch.tensor([1e12, -1e12, float("inf"), float("-inf")])
    assert fxp.pack(big, 32, 0).tolist() == [2**31 - 1, -(2**31), 2**31 - 1, -(2**31)]
    assert fxp.pack(torch.tensor([100.0]), 8, 4, overflow="wrap").tolist() == [fxp.quantize(
        torch.tensor([100.0]), 8, 4, overflow="wrap").item() * 16]


def test_pack_unpack_any_layout_and_half_types():
    x = fxp.quantize(torch.randn(6, 8), 12, 6).t()  # not contiguous
    assert torch.equal(fxp.unpack(fxp.pack(x, 12, 6), 12, 6), x)
    for dtype in (torch.float16, torch.bfloat16):
        y = fxp.quantize(torch.randn(100).to(dtype), 8, 4)
        assert torch.equal(fxp.unpack(fxp.pack(y, 8, 4), 8, 4, dtype=dtype), y)


def _bfloat16_nearest_even(v: float) -> float:
    """v rounded once to bfloat16 (8 significant bits), ties to even: the reference."""
    if v == 0.0:
        return v
    m, e = math.frexp(v)  # v = m * 2**e, 0.5 <= |m| < 1
    return round(m * 256) / 256 * 2.0**e  # round() ties to even; m * 256 is exact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_unpack_rounds_once_from_the_exact_value(dtype):
    """Note [Rounding once to float16 and bfloat16]: code * 2^-F to nearest even,
    not through float32 (which rounds twice)."""
    gen = torch.Generator().manual_seed(0)
    for frac_bits in (0, 10, 20, 30, 31):
        codes = torch.randint(-(2**31), 2**31 - 1, (4000,), dtype=torch.int32, generator=gen)
        # codes just above a tie of the target type: where rounding twice goes wrong
        codes[:8] = torch.tensor([2**30 + 2**19 + 1, 2**30 + 2**22 + 1, -(2**30 + 2**19 + 1), 2**30 + 2**19,
                                  2**24 + 2**0, 2**30 + 2**22, 3, -3], dtype=torch.int32)
        got = fxp.unpack(codes, 32, frac_bits, dtype=dtype)
        exact = codes.double().numpy() * 2.0**-frac_bits
        if dtype == torch.float16:
            with np.errstate(over="ignore"):  # beyond 65504 both give inf
                expect = torch.from_numpy(exact.astype(np.float16))  # numpy rounds double to half once
        elif dtype == torch.float32:
            expect = torch.from_numpy(exact.astype(np.float32))
        else:
            expect = torch.tensor([_bfloat16_nearest_even(v) for v in exact.tolist()], dtype=torch.float64)
            expect = expect.to(torch.bfloat16)  # exact: each value already has 8 significant bits
        assert torch.equal(got, expect), f"F={frac_bits}"


def test_unpack_to_float16_example_of_the_issue():
    # 1 + 2^-11 + 2^-30: through float32 it became the tie 1 + 2^-11, then 1.0
    assert fxp.unpack(torch.tensor([2**30 + 2**19 + 1], dtype=torch.int32), 32, 30, dtype=torch.float16) == 1 + 2**-10


def test_unpack_refuses_codes_outside_the_format():
    with pytest.raises(ValueError, match=r"fxp::unpack: 2 of 3 codes lie outside the range \[-2048, 2047\] of FxP\(12,6\)"):
        fxp.unpack(torch.tensor([3000, 5, -2049], dtype=torch.int16), 12, 6)
    assert fxp.unpack(torch.tensor([2047, -2048], dtype=torch.int16), 12, 6).tolist() == [2047 / 64, -32.0]


def test_pack_exact_refuses_values_off_the_grid():
    on_grid = fxp.quantize(torch.randn(100), 8, 4)
    assert torch.equal(fxp.pack(on_grid, 8, 4, rounding="exact"), fxp.pack(on_grid, 8, 4))
    x = on_grid.clone()
    x[3] += 1 / 64
    x[7] = 100.0  # saturates
    with pytest.raises(ValueError, match=r"with rounding='exact' x must lie on the grid of FxP\(8,4\), but 2 of "
                                         r"100 elements do not"):
        fxp.pack(x, 8, 4, rounding="exact")
    with pytest.raises(ValueError, match="1 of 1 elements are NaN"):
        fxp.pack(torch.tensor([float("nan")]), 8, 4, rounding="exact")


def test_pack_nan_is_an_error_with_count():
    x = torch.tensor([1.0, float("nan"), 2.0, float("nan"), float("nan")])
    with pytest.raises(ValueError, match="cannot pack NaN into integer codes: 3 of 5 elements are NaN"):
        fxp.pack(x, 8, 4)
    with pytest.raises(ValueError, match="1 of 1 elements are NaN"):
        fxp.pack_seeded(torch.tensor([float("nan")]), 16, 8, seed=0)


def test_pack_unpack_errors():
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        fxp.pack(torch.zeros(2, dtype=torch.int32), 8, 4)
    with pytest.raises(RuntimeError, match=r"frac_bits must be in \[0, total_bits - 1\]"):
        fxp.pack(torch.zeros(2), 8, 8)
    with pytest.raises(RuntimeError, match=r"codes of FxP\(16,8\) must be Short, but got Char"):
        fxp.unpack(torch.zeros(2, dtype=torch.int8), 16, 8)
    with pytest.raises(RuntimeError, match="dtype must be float32, float64, float16 or bfloat16"):
        fxp.unpack(torch.zeros(2, dtype=torch.int8), 8, 4, dtype=torch.int32)


# --- the fused step on packed storage -----------------------------------------
STEP_CASES = [
    dict(rounding="stochastic", momentum=0.9, nesterov=False, form="standard", fmt=(16, 10), mfmt=(16, 10)),
    dict(rounding="nearest_even", momentum=0.9, nesterov=False, form="standard", fmt=(16, 10), mfmt=(16, 10)),
    dict(rounding="stochastic", momentum=0.9, nesterov=True, form="standard", fmt=(8, 5), mfmt=(12, 8)),
    dict(rounding="stochastic", momentum=0.5, nesterov=False, form="paper_eq6", fmt=(12, 9), mfmt=(8, 7)),
    dict(rounding="stochastic", momentum=0.0, nesterov=False, form="standard", fmt=(20, 14), mfmt=(20, 14)),
]


def _step(params, grads, buffers, case, step, lr=0.05, weight_decay=1e-3):
    return ops.qpu_sgd_step_(params, grads, buffers, lr, case["momentum"], weight_decay, case["nesterov"],
                             *case["fmt"], *case["mfmt"], case["rounding"], 11, step, case["form"])


@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float64])
def test_packed_step_equals_float_step(case, grad_dtype):
    torch.manual_seed(1)
    fmt, mfmt = FxpFormat(*case["fmt"]), FxpFormat(*case["mfmt"])
    shapes = [(3000,), (7, 9), (5,)]
    w = [fxp.quantize(torch.randn(s, dtype=grad_dtype), fmt) for s in shapes]
    w_codes = [fxp.pack(t, fmt) for t in w]
    has_momentum = case["momentum"] > 0
    v = [torch.zeros_like(t) for t in w] if has_momentum else []
    v_codes = [torch.zeros(t.shape, dtype=mfmt.storage_dtype) for t in w] if has_momentum else []
    # Note [Bit-stream storage]: the same step on bit streams (every case of at most 16 bits).
    use_streams = fmt.total_bits <= 16 and mfmt.total_bits <= 16
    w_streams = [fxp.pack_bits(c, fmt.total_bits) for c in w_codes] if use_streams else []
    v_streams = [fxp.pack_bits(c, mfmt.total_bits) for c in v_codes] if use_streams else []
    for step in range(4):
        g = [torch.randn_like(t) * 3 for t in w]
        counts_float = _step(w, g, v, case, step)
        counts_packed = _step(w_codes, g, v_codes, case, step)
        assert torch.equal(counts_float, counts_packed)
        if use_streams:
            assert torch.equal(_step(w_streams, g, v_streams, case, step), counts_float)
        for a, c in zip(w, w_codes):
            assert c.dtype == fmt.storage_dtype and torch.equal(fxp.unpack(c, fmt, dtype=grad_dtype), a)
        for a, c in zip(v, v_codes):
            assert torch.equal(fxp.unpack(c, mfmt, dtype=grad_dtype), a)
    for c, stream in zip(w_codes, w_streams):
        assert stream.dtype == torch.uint8 and torch.equal(fxp.load_codes(stream, fmt, c.shape), c)
    for c, stream in zip(v_codes, v_streams):
        assert torch.equal(fxp.load_codes(stream, mfmt, c.shape), c)


def test_packed_step_mixed_storage_and_errors():
    fmt = FxpFormat(16, 10)
    w = fxp.quantize(torch.randn(100), fmt)
    g = torch.randn(100)
    v_float, v_codes = torch.zeros(100), torch.zeros(100, dtype=torch.int16)
    w_codes = fxp.pack(w, fmt)
    case = STEP_CASES[0]
    _step([w], [g], [v_float], case, 0)
    _step([w_codes], [g], [v_codes], case, 0)
    assert torch.equal(fxp.unpack(w_codes, fmt), w)
    w2 = fxp.quantize(torch.randn(100), fmt)
    w2_codes, v2 = fxp.pack(w2, fmt), torch.zeros(100)
    _step([w2_codes], [g], [v2], case, 1)  # packed params, float momentum
    with pytest.raises(RuntimeError, match=r"params must be Float like the grads, or Short codes of FxP\(16,10\)"):
        _step([w.to(torch.int32)], [g], [v_float], case, 0)
    with pytest.raises(RuntimeError, match=r"momentum_buffers must be Float like the grads, or Short codes"):
        _step([w_codes], [g], [v_float.to(torch.int8)], case, 0)
    with pytest.raises(RuntimeError, match="grads must be float32 or float64"):
        _step([w_codes], [g.half()], [v_codes], case, 0)
    with pytest.raises(RuntimeError, match=r"params\[1\] has dtype Float but params\[0\] has Short"):
        _step([w_codes, w], [g, g], [v_codes, v_codes], case, 0)
    # Bit streams beside integer codes (params a 12-bit stream, momentum int16), and streams of the wrong length.
    case12 = dict(case, fmt=(12, 8), mfmt=(16, 10))
    w12 = fxp.pack(torch.randn(100), FxpFormat(12, 8))
    w12_stream, v12 = fxp.pack_bits(w12, 12), torch.zeros(100, dtype=torch.int16)
    v12_ref = v12.clone()
    assert torch.equal(_step([w12_stream], [g], [v12], case12, 0), _step([w12], [g], [v12_ref], case12, 0))
    assert torch.equal(fxp.load_codes(w12_stream, 12, [100]), w12) and torch.equal(v12, v12_ref)
    with pytest.raises(RuntimeError, match=r"params\[0\] is a bit stream \(uint8\) of 12-bit codes for shape "
                                           r"\[100\], so it must be 1-D with 150 bytes, but it has shape \[149\]"):
        _step([w12_stream[:149]], [g], [v12], case12, 1)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] is a bit stream .* must be 1-D with 200 bytes"):
        _step([w12_stream], [g], [torch.zeros(150, dtype=torch.uint8)], case12, 1)


@pytest.mark.parametrize("case", STEP_CASES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float64])
def test_packed_step_nan_is_an_error_and_keeps_old_codes(case, grad_dtype):
    """NaN grads in the middle of a vector's worth of elements: those parameters and momenta keep their old
    (nonzero) codes, every other element steps, and the error counts the NaN results."""
    fmt, mfmt = FxpFormat(*case["fmt"]), FxpFormat(*case["mfmt"])
    n, bad = 40, [2, 5, 21]
    w_codes = fxp.pack(torch.linspace(-0.9, 0.9, n), fmt)
    g = torch.ones(n, dtype=grad_dtype)
    g[bad] = float("nan")
    v = [fxp.pack(torch.linspace(0.4, -0.4, n), mfmt)] if case["momentum"] > 0 else []
    w_before, v_before = w_codes.clone(), [t.clone() for t in v]
    nan_results = len(bad) * (2 if v else 1)
    with pytest.raises(ValueError, match=f"{nan_results} updated values are NaN"):
        _step([w_codes], [g], v, case, 0)
    good = torch.ones(n, dtype=torch.bool)
    good[bad] = False
    assert torch.equal(w_codes[bad], w_before[bad]) and torch.all(w_before[bad] != 0)
    assert not torch.equal(w_codes[good], w_before[good])
    if v:
        assert torch.equal(v[0][bad], v_before[0][bad]) and torch.all(v_before[0][bad] != 0)
        assert not torch.equal(v[0][good], v_before[0][good])


# --- conv and linear with packed storage ------------------------------------------
def _grads(fn, inputs, grad_out):
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach().clone(), [None if t.grad is None else t.grad.clone() for t in inputs]


@pytest.mark.parametrize("bias", [True, False])
def test_linear_packed_gradients_equal_torch(bias):
    torch.manual_seed(2)
    in_fmt, p_fmt = FxpFormat(12, 6), FxpFormat(16, 10)
    x = fxp.quantize(torch.randn(33, 70), in_fmt).requires_grad_()
    w = fxp.quantize(torch.randn(20, 70), p_fmt).requires_grad_()
    b = fxp.quantize(torch.randn(20), p_fmt).requires_grad_() if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    g = torch.randn(33, 20)
    ref = _grads(lambda: F.linear(x, w, b), inputs, g)
    saved = _grads(lambda: fxp.ops.linear(x, w, b, input_format=in_fmt), inputs, g)
    stand_w = torch.zeros(()).expand(20, 70).requires_grad_()
    stand_b = torch.zeros(()).expand(20).requires_grad_() if bias else None
    w_codes, b_codes = fxp.pack(w.detach(), p_fmt), fxp.pack(b.detach(), p_fmt) if bias else None
    packed_inputs = [t for t in (x, stand_w, stand_b) if t is not None]
    packed = _grads(lambda: fxp.ops.linear(x, stand_w, stand_b, input_format=in_fmt, weight_codes=w_codes,
                                           bias_codes=b_codes, param_format=p_fmt), packed_inputs, g)
    for out, grads in (saved, packed):
        assert torch.equal(out, ref[0])
        assert all(torch.equal(a, b_) for a, b_ in zip(grads, ref[1]))


def test_conv2d_packed_gradients_equal_torch():
    torch.manual_seed(3)
    in_fmt, p_fmt = FxpFormat(8, 4), FxpFormat(12, 8)
    x = fxp.quantize(torch.randn(4, 3, 11, 11), in_fmt).requires_grad_()
    w = fxp.quantize(torch.randn(6, 3, 3, 3), p_fmt).requires_grad_()
    b = fxp.quantize(torch.randn(6), p_fmt).requires_grad_()
    g = torch.randn(4, 6, 6, 6)
    ref = _grads(lambda: torch.conv2d(x, w, b, 2, 1, 1, 1), [x, w, b], g)
    saved = _grads(lambda: fxp.ops.conv2d(x, w, b, (2, 2), (1, 1), input_format=in_fmt), [x, w, b], g)
    sw, sb = torch.zeros(()).expand(6, 3, 3, 3).requires_grad_(), torch.zeros(()).expand(6).requires_grad_()
    packed = _grads(lambda: fxp.ops.conv2d(x, sw, sb, (2, 2), (1, 1), input_format=in_fmt,
                                           weight_codes=fxp.pack(w.detach(), p_fmt),
                                           bias_codes=fxp.pack(b.detach(), p_fmt), param_format=p_fmt),
                    [x, sw, sb], g)
    for out, grads in (saved, packed):
        assert torch.equal(out, ref[0]) and all(torch.equal(a, c) for a, c in zip(grads, ref[1]))


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_fused_output_quantization_equals_quantize_ste(rounding):
    torch.manual_seed(10)
    out_fmt = FxpFormat(8, 3)
    x = torch.randn(9, 12, requires_grad=True)
    w = torch.randn(5, 12, requires_grad=True)
    g = torch.randn(9, 5)
    ref = _grads(lambda: fxp.quantize_ste(F.linear(x, w), out_fmt, rounding=rounding,
                                          generator=torch.Generator().manual_seed(4)), [x, w], g)
    fused = _grads(lambda: fxp.ops.linear(x, w, output_format=out_fmt, output_rounding=rounding,
                                          generator=torch.Generator().manual_seed(4)), [x, w], g)
    assert torch.equal(fused[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(fused[1], ref[1]))
    xc = torch.randn(2, 3, 7, 7, requires_grad=True)
    wc = torch.randn(4, 3, 3, 3, requires_grad=True)
    gc = torch.randn(2, 4, 5, 5)
    ref = _grads(lambda: fxp.quantize_ste(torch.conv2d(xc, wc), out_fmt, rounding=rounding,
                                          generator=torch.Generator().manual_seed(5)), [xc, wc], gc)
    fused = _grads(lambda: fxp.ops.conv2d(xc, wc, output_format=out_fmt, output_rounding=rounding,
                                          generator=torch.Generator().manual_seed(5)), [xc, wc], gc)
    assert torch.equal(fused[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(fused[1], ref[1]))


def test_linear_saves_codes_not_floats():
    """What the autograd keeps: the input as int16 codes, the weight as its codes."""
    in_fmt, p_fmt = FxpFormat(16, 8), FxpFormat(8, 4)
    x = fxp.quantize(torch.randn(4, 6), in_fmt).requires_grad_()
    w = torch.zeros(()).expand(3, 6).requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fxp.ops.linear(x, w, None, input_format=in_fmt, weight_codes=fxp.pack(torch.zeros(3, 6), p_fmt),
                       param_format=p_fmt)
    assert sorted(str(t.dtype) for t in saved) == ["torch.int16", "torch.int8"]


DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def _bits_up_to_zero_sign(t, device):
    """_bits, but on CUDA torch's relu (a max with 0) may give +0 for -0, where the
    fused op keeps -0 (relu(v) = v < 0 ? 0 : v): zeros of either sign compare as +0 there."""
    return _bits(torch.where(t == 0, torch.zeros_like(t), t) if device == "cuda" else t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", [2, 3, (2, 3)])
def test_relu_max_pool2d_equals_torch_values_and_gradients(kernel, device):
    torch.manual_seed(8)
    # Coarse quantization: many ties, zeros and negative zeros inside the windows.
    x = fxp.quantize(torch.randn(3, 4, 13, 11), 4, 1).to(device).requires_grad_()
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    g = torch.randn(F.max_pool2d(x, k).shape).to(device)
    g[0, 0, 0, 0] = -0.0
    ref = _grads(lambda: F.max_pool2d(F.relu(x), k), [x], g)
    fused = _grads(lambda: fxp.ops.relu_max_pool2d(x, kernel), [x], g)
    assert torch.equal(fused[0], ref[0])
    assert torch.equal(fused[1][0].view(torch.int32), ref[1][0].view(torch.int32))  # bits: +0 and -0 too


def test_relu_max_pool2d_saves_one_byte_per_output():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fxp.ops.relu_max_pool2d(x, 2)
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.uint8, 2 * 3 * 4 * 4)]
    with pytest.raises(RuntimeError, match="expected a 4-D x"):
        fxp.ops.relu_max_pool2d(torch.randn(3, 8, 8), 2)
    with pytest.raises(RuntimeError, match="is smaller than the kernel"):
        fxp.ops.relu_max_pool2d(torch.randn(1, 1, 1, 3), 2)


def test_layer_op_errors():
    w = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="weight_codes and param_format go together"):
        fxp.ops.linear(torch.randn(2, 4), w, weight_codes=fxp.pack(w, 8, 4))
    with pytest.raises(RuntimeError, match=r"input_format must be \[total_bits, frac_bits\]"):
        ops.linear(torch.randn(2, 4), w, None, [8])
    with pytest.raises(RuntimeError, match="weight_codes has shape"):
        fxp.ops.linear(torch.randn(2, 4), w, weight_codes=fxp.pack(torch.randn(4, 3), 8, 4),
                       param_format=FxpFormat(8, 4))
    with pytest.raises(RuntimeError, match="bias must be packed too"):
        fxp.ops.linear(torch.randn(2, 4), w, torch.randn(3), weight_codes=fxp.pack(w, 8, 4),
                       param_format=FxpFormat(8, 4))
    with pytest.raises(ValueError, match="cannot pack NaN"):
        x = torch.full((2, 4), float("nan"))
        fxp.ops.linear(x, w.requires_grad_(), input_format=FxpFormat(8, 4))


def test_layer_ops_name_codes_of_the_wrong_dtype_and_tensors_on_another_device():
    """The codes' dtype was reported as fxp::unpack's "codes"; a meta weight beside a CPU x gave a CPU result
    of uninitialized memory."""
    w, x = torch.randn(3, 4), torch.randn(2, 4)
    with pytest.raises(RuntimeError) as e:
        fxp.ops.linear(x, w, weight_codes=fxp.pack(w, 8, 4).to(torch.int16), param_format=FxpFormat(8, 4))
    assert str(e.value).splitlines()[0] == ("fxp::linear: weight_codes of FxP(8,4) must be Char codes or a uint8 bit "
                                            "stream of them, but got Short")
    meta = torch.empty(3, 4, device="meta")
    for call, name in [(lambda: fxp.ops.linear(x, meta), "weight"),
                       (lambda: fxp.ops.linear(x, w, torch.empty(3, device="meta")), "bias"),
                       (lambda: fxp.ops.linear(x, w, weight_codes=fxp.pack(meta, 8, 4), param_format=FxpFormat(8, 4)),
                        "weight_codes"),
                       (lambda: fxp.ops.conv2d(torch.randn(1, 1, 4, 4), torch.randn(2, 1, 3, 3, device="meta")),
                        "weight")]:
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value).splitlines()[0].endswith(
            f": expected {name} on the same device as x (cpu), but got meta"), str(e.value)
    with pytest.raises(RuntimeError, match=r"^fxp::linear: expected weight on the same device as x \(meta\), "
                                           "but got cpu"):
        fxp.ops.linear(torch.empty(2, 4, device="meta"), w)
    for fmt in (None, FxpFormat(8, 4)):  # checked whether or not there is an output to round
        with pytest.raises(RuntimeError, match=r"^fxp::linear output_rounding: unknown rounding 'exact'"):
            fxp.ops.linear(x, w, output_format=fmt, output_rounding="exact")


# --- layers, the network and the optimizer --------------------------------------------
def _paper_run(method, packed, steps=3, batch=8, fmt=FxpFormat(16, 10), act=FxpFormat(16, 8)):
    torch.manual_seed(0)
    model = fxp.nn.PaperCNN(method, fmt, act, act_rounding="sr")
    if method in ("sqpu", "hteqpu"):
        model.quantize_parameters_("stochastic" if method == "sqpu" else "nearest_even", 0)
    if packed:
        model.pack_()
    opt = fxp.optim.make_optimizer(model.parameters(), method, lr=0.05, momentum=0.9, format=fmt,
                                   packed=fxp.nn.packed_storage(model),
                                   seed=1)
    data = torch.Generator().manual_seed(5)
    losses = []
    for step in range(steps):
        x, y = torch.randn(batch, 1, 28, 28, generator=data), torch.randint(0, 10, (batch,), generator=data)
        torch.manual_seed(100 + step)  # the output rounding's draws
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, opt, losses


def _values(model):
    out = {}
    for name, layer in model.named_children():
        for p in ("weight", "bias"):
            if getattr(layer, p) is None:
                continue
            value = getattr(layer, p)
            out[f"{name}.{p}"] = (fxp.unpack(fxp.load_codes(getattr(layer, p + "_codes"), layer.param_format,
                                                            value.shape), layer.param_format)
                                  if layer.packed_weights else value.detach())
    return out


@pytest.mark.parametrize("method", ["sqpu", "hteqpu", "ste"])
def test_packed_training_is_bit_identical(method):
    model_f, opt_f, losses_f = _paper_run(method, packed=False)
    model_p, opt_p, losses_p = _paper_run(method, packed=True)
    assert losses_f == losses_p
    values_f, values_p = _values(model_f), _values(model_p)
    assert all(torch.equal(values_f[k], values_p[k]) for k in values_f)
    # The packed run really saved codes: no float tensor as large as a layer input or ReLU output.
    batch = 8
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model_p(torch.randn(batch, 1, 28, 28))
    floats = [t for t in saved if t.is_floating_point() and t.numel() > batch * 784]
    assert floats == [] if method != "ste" else all(t.shape[0] != batch for t in floats)  # STE: weights only
    assert {torch.int16, torch.uint8} <= {t.dtype for t in saved}
    if method != "ste":
        assert model_p.fc1.weight.stride() == (0, 0) and model_p.fc1.weight_codes.dtype == torch.int16
        buffer = opt_p.state[model_p.fc1.weight]["momentum_buffer"]
        assert buffer.dtype == torch.int16
        assert torch.equal(fxp.unpack(buffer, 16, 10), opt_f.state[model_f.fc1.weight]["momentum_buffer"])


@pytest.mark.parametrize("method", ["sqpu", "hteqpu"])
def test_twelve_bit_packed_training_stores_bit_streams(method):
    """Note [Bit-stream storage]: at 12 bits the weights, momentum and saved
    inputs are streams of 12-bit codes, and training is bit-identical to float storage."""
    fmt, act = FxpFormat(12, 6), FxpFormat(12, 4)
    model_f, opt_f, losses_f = _paper_run(method, packed=False, fmt=fmt, act=act)
    model_p, opt_p, losses_p = _paper_run(method, packed=True, fmt=fmt, act=act)
    assert losses_f == losses_p
    values_f, values_p = _values(model_f), _values(model_p)
    assert all(torch.equal(values_f[k], values_p[k]) for k in values_f)
    codes = model_p.fc1.weight_codes
    assert codes.dtype == torch.uint8 and codes.shape == (math.ceil(model_p.fc1.weight.numel() * 12 / 8),)
    buffer = opt_p.state[model_p.fc1.weight]["momentum_buffer"]
    assert buffer.dtype == torch.uint8 and buffer.numel() == codes.numel()
    assert torch.equal(fxp.unpack(fxp.load_codes(buffer, fmt, model_p.fc1.weight.shape), fmt),
                       opt_f.state[model_f.fc1.weight]["momentum_buffer"])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model_p(torch.randn(8, 1, 28, 28))
    dtypes = {t.dtype for t in saved}
    assert torch.uint8 in dtypes and torch.int16 not in dtypes  # inputs saved as 12-bit streams, not int16
    fc1_input = [t for t in saved if t.dtype == torch.uint8 and t.numel() == 8 * 1024 * 12 // 8]
    assert fc1_input, "fc1's input is saved as a stream of 8 x 1024 12-bit codes"


def test_bit_stream_state_dicts_load_either_way():
    fmt = FxpFormat(12, 6)
    packed = _packed_linear(fmt, seed=1)
    assert packed.weight_codes.dtype == torch.uint8 and packed.weight_codes.shape == (18,)  # 12 codes x 12 bits
    # Note [Packed state dicts]: the state dict holds integer codes of the value's shape, so shapes are checked.
    state = packed.state_dict()
    assert state["weight_codes"].dtype == torch.int16 and state["weight_codes"].shape == (3, 4)
    values = fxp.unpack(state["weight_codes"], fmt)
    fresh = _packed_linear(fmt, seed=2)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight_codes, packed.weight_codes)
    plain = fxp.nn.QLinear(4, 3, weight_mode="qpu", param_format=fmt, act_format=FxpFormat(16, 8))
    plain.load_state_dict(state)  # into an unpacked layer: unpacked exactly
    assert torch.equal(plain.weight.detach(), values)
    # A stream (the buffer itself) loads too, checked by its length.
    again = _packed_linear(fmt, seed=3)
    again.load_state_dict(dict(state, weight_codes=packed.weight_codes, bias_codes=packed.bias_codes))
    assert torch.equal(again.weight_codes, packed.weight_codes)
    with pytest.raises(RuntimeError, match=r"weight_codes is not a bit stream of FxP\(12,6\) codes for shape "
                                           r"\(3, 4\).*must be 1-D with 18 bytes"):
        again.load_state_dict(dict(state, weight_codes=packed.weight_codes[:17]))
    # A model of another shape with as many weights does not load (a stream alone could not tell).
    other = fxp.nn.QLinear(3, 4, weight_mode="qpu", param_format=fmt, act_format=FxpFormat(16, 8))
    fxp.nn.quantize_layer_parameters_(other)
    other.pack_weights_()
    with pytest.raises(RuntimeError, match=r"size mismatch for weight_codes: \(3, 4\) in the checkpoint, \(4, 3\)"):
        other.load_state_dict(dict(state, bias_codes=torch.zeros(4, dtype=torch.int16)))
    # The optimizer takes the form the layers store (a stream here) and nothing else.
    opt = QPUSGD(again.parameters(), lr=0.1, momentum=0.9, format=fmt, packed=fxp.nn.packed_storage(again))
    with pytest.raises(ValueError, match=r"set_packed_storage: .*must be 1-D with 18 bytes"):
        opt.set_packed_storage(again.weight, again.weight_codes[:17], fmt)
    with pytest.raises(ValueError, match=r"codes of FxP\(12,6\) are stored as torch.uint8, but got torch.int16"):
        opt.set_packed_storage(again.weight, state["weight_codes"], fmt)
    layer16 = _packed_linear(FxpFormat(16, 10))
    opt16 = QPUSGD(layer16.parameters(), lr=0.1, format=FxpFormat(16, 10))
    with pytest.raises(ValueError, match=r"codes of FxP\(16,10\) are stored as torch.int16, but got torch.uint8"):
        opt16.set_packed_storage(layer16.weight, fxp.pack_bits(layer16.weight_codes, 16), FxpFormat(16, 10))


def test_optimizer_state_of_integer_momentum_codes_loads_as_streams():
    """A QPUSGD state saved with int16 momentum codes of FxP(12, .) (before bit
    streams) loads in the form this version stores, and steps as it would have."""
    fmt = FxpFormat(12, 6)
    layer = _packed_linear(fmt, seed=4)
    opt = QPUSGD(layer.parameters(), lr=0.1, momentum=0.9, format=fmt, packed=fxp.nn.packed_storage(layer))
    for p in layer.parameters():
        p.grad = torch.full(p.shape, 0.3)
    opt.step()
    state = opt.state_dict()
    old_form = {pid: dict(s, momentum_buffer=fxp.load_codes(s["momentum_buffer"], fmt, p.shape))
                for (pid, s), p in zip(state["state"].items(), layer.parameters())}
    assert all(s["momentum_buffer"].dtype == torch.int16 for s in old_form.values())
    twin = _packed_linear(fmt, seed=4)
    twin.load_state_dict(layer.state_dict())
    opt_twin = QPUSGD(twin.parameters(), lr=0.1, momentum=0.9, format=fmt, packed=fxp.nn.packed_storage(twin))
    opt_twin.load_state_dict(dict(state, state=old_form))
    assert opt_twin.state[twin.weight]["momentum_buffer"].dtype == torch.uint8
    for model, o in ((layer, opt), (twin, opt_twin)):
        for p in model.parameters():
            p.grad = torch.full(p.shape, -0.2)
        o.step()
    assert torch.equal(twin.weight_codes, layer.weight_codes)
    assert torch.equal(opt_twin.state[twin.weight]["momentum_buffer"], opt.state[layer.weight]["momentum_buffer"])


def test_store_codes_and_load_codes():
    codes = torch.tensor([[1, -1], [2, -4]], dtype=torch.int8)
    assert fxp.store_codes(codes, FxpFormat(3, 1)).tolist() == [185, 8]
    assert torch.equal(fxp.load_codes(torch.tensor([185, 8], dtype=torch.uint8), 3, [2, 2]), codes)
    for bits, dtype in ((8, torch.int8), (16, torch.int16), (20, torch.int32)):  # no stream: a copy of the codes
        c = torch.tensor([3, -2], dtype=dtype)
        stored = fxp.store_codes(c, bits)
        assert torch.equal(stored, c) and stored.data_ptr() != c.data_ptr()
        loaded = fxp.load_codes(stored, bits, [2])
        assert torch.equal(loaded, c) and loaded.data_ptr() != stored.data_ptr()
    with pytest.raises(RuntimeError, match=r"streams hold at most 16 bits"):
        fxp.load_codes(torch.zeros(5, dtype=torch.uint8), 20, [2])
    with pytest.raises(RuntimeError, match=r"stored has shape \[3\] but the value has \[2\]"):
        fxp.load_codes(torch.zeros(3, dtype=torch.int16), 16, [2])
    assert torch.equal(fxp.load_codes(fxp.store_codes(torch.tensor([3, -2], dtype=torch.int16), 12), 12, 2),
                       torch.tensor([3, -2], dtype=torch.int16))  # an int size, as unpack_bits takes
    with pytest.raises(RuntimeError, match=r"store_codes: codes must be Char codes of 8 bits, but got Float"):
        fxp.store_codes(torch.randn(4), 8)
    with pytest.raises(RuntimeError, match=r"load_codes: stored must be Short codes of 12 bits \(or a uint8 bit "
                                           r"stream\), but got Float"):
        fxp.load_codes(torch.randn(2, 3), 12, [2, 3])
    with pytest.raises(RuntimeError, match=r"1 code lies outside \[-2048, 2047\]"):
        fxp.store_codes(torch.tensor([5000], dtype=torch.int16), 12)
    with pytest.raises(RuntimeError, match=r"must not be negative"):
        fxp.load_codes(torch.zeros(2, dtype=torch.uint8), 12, [-3])
    assert fxp.ops.stored_dtype(FxpFormat(12, 6)) == torch.uint8 and fxp.ops.stored_dtype(FxpFormat(8, 4)) == torch.int8


def test_packed_model_state_dict_round_trip():
    model, _, _ = _paper_run("sqpu", packed=True, steps=1)
    state = model.state_dict()
    # Codes and their format, not the zero stand-ins (issue 11: those loaded as zeros elsewhere).
    assert state["fc1.weight_codes"].dtype == torch.int16 and "fc1.weight" not in state
    assert state["fc1.codes_format"].tolist() == [16, 10]
    fresh = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    fresh.quantize_parameters_()  # packing refuses weights off the grid
    fresh.pack_()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.conv2.weight_codes, model.conv2.weight_codes)
    with pytest.raises(RuntimeError, match="size mismatch for fc2.weight"):
        bad = dict(state, **{"fc2.weight": torch.zeros(3, 3)})
        fresh.load_state_dict(bad)


def _one_more_step(*models_and_optimizers):
    """One training step of each (model, optimizer) on the same batch, with the same output-rounding draws."""
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    for model, opt in models_and_optimizers:
        opt.zero_grad()
        torch.manual_seed(3)
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_deep_copied_packed_model_trains_like_the_original():
    import copy

    model, opt, _ = _paper_run("sqpu", packed=True, steps=1)
    twin = copy.deepcopy(model)
    twin_opt = QPUSGD(twin.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10), seed=1,
                      packed=fxp.nn.packed_storage(twin))
    twin_opt.load_state_dict(opt.state_dict())
    assert twin_opt.state[twin.fc1.weight]["momentum_buffer"].dtype == torch.int16  # torch would cast it to float
    # The copy's packed storage is its own, not the original's.
    twin_storage = {s.parameter: s.codes for s in fxp.nn.packed_storage(twin)}
    assert twin_storage[twin.fc1.weight] is twin.fc1.weight_codes and twin.fc1.weight_codes is not model.fc1.weight_codes
    _one_more_step((model, opt), (twin, twin_opt))
    assert torch.equal(model.fc1.weight_codes, twin.fc1.weight_codes)
    assert twin.fc1.weight.stride() == (0, 0)  # the copy's full-size stand-ins shrank again


def test_packed_layer_errors():
    layer = fxp.nn.QLinear(4, 3, weight_mode="ste", param_format=FxpFormat(8, 4), act_format=FxpFormat(8, 4))
    with pytest.raises(ValueError, match="only QPU layers can pack their weights"):
        layer.pack_weights_()
    with pytest.raises(ValueError, match="fp32 has no grid"):
        fxp.nn.PaperCNN("fp32").pack_()
    model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    floats = [p.detach().clone() for p in model.parameters()]
    # Packing would round the float weights: refused, naming the layer's tensor, and nothing is packed.
    with pytest.raises(ValueError, match=r"QConv2d.pack_weights_: the weight is not on the grid of FxP\(16,10\)"):
        model.pack_()
    assert not model.conv1.packed_weights and all(torch.equal(p, q) for p, q in zip(model.parameters(), floats))
    model.quantize_parameters_()
    model.pack_()
    with pytest.raises(ValueError, match="the weights are packed"):
        model.quantize_parameters_()


def test_a_packed_model_in_channels_last_keeps_contiguous_codes_and_steps():
    """.to(memory_format=channels_last) would make 4-D conv codes channels_last, which the step does not take."""
    model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    model.quantize_parameters_()
    model.pack_()
    codes = model.conv2.weight_codes.clone()
    model.to(memory_format=torch.channels_last)
    assert model.conv2.weight_codes.is_contiguous() and torch.equal(model.conv2.weight_codes, codes)
    opt = QPUSGD(model.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10),
                 packed=fxp.nn.packed_storage(model))
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()
    assert not torch.equal(model.conv2.weight_codes, codes)


def test_a_layout_change_after_the_optimizer_keeps_the_codes_it_updates():
    """model.to(memory_format=channels_last) after QPUSGD(packed=...) once gave the layers new codes tensors,
    so the optimizer updated the old ones and the model stopped learning, silently."""
    model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    model.quantize_parameters_()
    model.pack_()
    opt = QPUSGD(model.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10),
                 packed=fxp.nn.packed_storage(model))
    held = [model.conv1.weight_codes, model.conv2.weight_codes, model.fc1.weight_codes]
    codes = [c.clone() for c in held]
    model.to(memory_format=torch.channels_last)
    assert all(now is was for now, was in zip([model.conv1.weight_codes, model.conv2.weight_codes,
                                                model.fc1.weight_codes], held))
    assert all(c.is_contiguous() and torch.equal(c, before) for c, before in zip(held, codes))
    x = torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2])).backward()
    opt.step()
    assert not torch.equal(model.conv2.weight_codes, codes[1])  # the model's own codes moved


def test_a_packed_conv_takes_unbatched_input_as_the_unpacked_one_does():
    fmt = FxpFormat(8, 4)
    layer = fxp.nn.QConv2d(2, 3, 3, weight_mode="qpu", param_format=fmt, act_format=fmt, act_rounding="hte")
    fxp.nn.quantize_layer_parameters_(layer)
    x = fxp.quantize(torch.randn(2, 5, 5), fmt)
    want = layer(x)
    layer.pack_weights_()
    got = layer(x)
    assert got.shape == want.shape == (3, 3, 3) and torch.equal(got, want)
    assert torch.equal(layer(x.unsqueeze(0)).squeeze(0), want)


@pytest.mark.parametrize("padding", [{"padding": "same"}, {"padding": 1, "padding_mode": "reflect"}],
                         ids=["same", "reflect"])
def test_a_conv_whose_padding_packed_storage_cannot_take_is_refused_at_packing(padding):
    """It packed, and then every forward raised; C++ refuses it at packing too."""
    fmt = FxpFormat(8, 4)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Conv2d(1, 2, 3, **padding))
    with pytest.raises(ValueError, match=r"^QConv2d: packed storage supports numeric zero padding only$"):
        fxp.nn.quantize_model(model, "sqpu", fmt, fmt, packed=True)
    assert not any(layer.packed_weights for layer in model)  # the linear layer before it too
    with pytest.raises(ValueError, match=r"^QConv2d: packed storage supports numeric zero padding only$"):
        model[1].pack_weights_()
    y = model[1](fxp.quantize(torch.randn(1, 1, 5, 5), fmt))  # unpacked, it pads as torch does
    assert y.shape[1] == 2


def test_packed_storage_must_be_contiguous_when_it_is_set():
    layer = fxp.nn.QLinear(4, 6, weight_mode="qpu", param_format=FxpFormat(8, 4), act_format=FxpFormat(8, 4))
    fxp.nn.quantize_layer_parameters_(layer)
    layer.pack_weights_()
    opt = QPUSGD(layer.parameters(), lr=0.05, format=FxpFormat(8, 4))
    strided = layer.weight_codes.t().contiguous().t()  # the codes' shape, column-major
    with pytest.raises(ValueError, match=r"^QPUSGD.set_packed_storage: the codes must be contiguous"):
        opt.set_packed_storage(layer.weight, strided, FxpFormat(8, 4))


def test_an_optimizer_without_the_packed_storage_refuses_to_step():
    """A forgotten packed= would write into a stand-in (or leave the codes as
    they are); the step refuses before it touches any group."""
    model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    model.quantize_parameters_()
    model.pack_()
    opt = QPUSGD(model.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10))
    torch.nn.functional.cross_entropy(model(torch.randn(2, 1, 28, 28)), torch.tensor([1, 2])).backward()
    codes = model.fc1.weight_codes.clone()
    with pytest.raises(ValueError, match=r"parameter 0 of group 0 is expanded .*packed=fxp.nn.packed_storage"):
        opt.step()
    assert opt.param_groups[0]["step"] == 0 and not opt.state and torch.equal(model.fc1.weight_codes, codes)
    opt.set_packed_storage(*fxp.nn.packed_storage(model)[0])  # one of them is not enough
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 is expanded"):
        opt.step()


def test_quantize_model_packed_switch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fxp.nn.quantize_model(model, "sqpu", FxpFormat(12, 8), FxpFormat(12, 6), packed=True)
    storage = fxp.nn.packed_storage(model)
    assert model[0].packed_weights and storage[0] == (model[0].weight, model[0].weight_codes, FxpFormat(12, 8))
    opt = QPUSGD(model.parameters(), lr=0.1, momentum=0.9, format=FxpFormat(12, 8), packed=storage)
    model(torch.randn(5, 6)).sum().backward()
    before = model[2].weight_codes.clone()
    opt.step()
    assert not torch.equal(before, model[2].weight_codes)


# --- opcheck ---------------------------------------------------------------------
def _opcheck_cases(device):
    x = torch.randn(5, 7, device=device, dtype=torch.float64)
    fmt = [16, 8]
    xq = fxp.quantize(x, 16, 8).requires_grad_()
    w = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, device=device, dtype=torch.float64, requires_grad=True)
    wc, bc = fxp.pack(w.detach(), 12, 8), fxp.pack(b.detach(), 12, 8)
    xc = fxp.quantize(torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64), 8, 4).requires_grad_()
    wconv = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    return [
        (ops.pack.default, (x, 8, 4), {}),
        (ops.pack.default, (x, 20, 4, "stochastic", "wrap", torch.Generator(device=device).manual_seed(0)), {}),
        (ops.pack_seeded.default, (x, 16, 8, "stochastic", 1, 2), {}),
        (ops.unpack.default, (fxp.pack(x, 12, 4), 12, 4), {}),
        (ops.unpack.default, (fxp.pack(x, 8, 4), 8, 4, torch.float64), {}),
        (ops.linear.default, (xq, w, b), {}),
        (ops.linear.default, (xq, w, b, fmt), {}),
        (ops.linear.default, (xq, w, b, fmt, wc, bc, [12, 8]), {}),
        (ops.linear.default, (xq, w, b, fmt, wc, bc, [12, 8], [8, 4]), {}),
        (ops.linear.default, (fxp.quantize(xq.detach(), 12, 8).requires_grad_(), w, b, [12, 8],
                              fxp.pack_bits(wc, 12), fxp.pack_bits(bc, 12), [12, 8]), {}),
        (ops.store_codes.default, (wc, 12), {}),
        (ops.store_codes.default, (wc, 16), {}),
        (ops.load_codes.default, (fxp.pack_bits(wc, 12), 12, [3, 7]), {}),
        (ops.load_codes.default, (wc, 16, [3, 7]), {}),
        (ops.linear.default, (xq, w, None, None, None, None, None, [8, 4], "stochastic",
                              torch.Generator(device=device).manual_seed(0)), {}),
        (ops.conv2d.default, (xc, wconv, None, [1, 1], [1, 1], [1, 1], 1, [8, 4]), {}),
        (ops.conv2d.default, (xc, wconv, None, [1, 1], [1, 1], [1, 1], 1, [8, 4], None, None, None, [12, 6]), {}),
        (ops.conv2d.default, (xc, wconv, None, [2, 2], [0, 0], [1, 1], 1, None, fxp.pack(wconv.detach(), 8, 6),
                              None, [8, 6]), {}),
        (ops.relu_max_pool2d.default, (xc, [2, 2]), {}),
        (ops.relu_max_pool2d.default, (torch.randn(2, 3, 7, 9, device=device, requires_grad=True), [3, 2]), {}),
        (ops.relu_max_pool2d_with_positions.default, (xc.detach(), [2, 2]), {}),
        (ops.relu_max_pool2d_backward.default, (torch.randn(2, 3, 3, 3, device=device, dtype=torch.float64),
                                                torch.randint(0, 4, (2, 3, 3, 3), device=device, dtype=torch.uint8),
                                                [2, 2], [2, 3, 6, 7]), {}),
    ]


def _run_opcheck(device):
    for op, args, kwargs in _opcheck_cases(device):
        has_generator = any(isinstance(a, torch.Generator) for a in args)
        checks = ("test_schema", "test_autograd_registration", "test_faketensor")
        torch.library.opcheck(op, args, kwargs, test_utils=checks if has_generator else checks + (
            "test_aot_dispatch_dynamic",))


def test_opcheck_cpu():
    _run_opcheck("cpu")


@requires_cuda
def test_opcheck_cuda():
    _run_opcheck("cuda")


# --- CUDA ----------------------------------------------------------------------
@requires_cuda
def test_cuda_pack_unpack_bit_identical_to_cpu():
    torch.manual_seed(6)
    x = torch.randn(100_003) * 50
    for fmt in (FxpFormat(8, 3), FxpFormat(16, 10), FxpFormat(32, 20)):
        for rounding in ("nearest_even", "stochastic"):
            cpu = fxp.pack_seeded(x, fmt, rounding=rounding, seed=4, offset=9)
            cuda = fxp.pack_seeded(x.cuda(), fmt, rounding=rounding, seed=4, offset=9)
            assert torch.equal(cpu, cuda.cpu())
            assert torch.equal(fxp.unpack(cpu, fmt), fxp.unpack(cuda, fmt).cpu())
    with pytest.raises(ValueError, match="1 of 2 elements are NaN"):
        fxp.pack(torch.tensor([1.0, float("nan")], device="cuda"), 8, 4)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("overflow", ["saturate", "wrap"])
def test_cuda_pack_every_rounding_and_dtype_equals_cpu(dtype, overflow):
    x = (torch.randn(100_003, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) * 50).to(dtype)
    x[::997] = float("inf")
    x[1::997] = float("-inf")
    for fmt in (FxpFormat(8, 3), FxpFormat(16, 10), FxpFormat(32, 20)):
        for rounding in ("nearest_even", "stochastic", "floor", "nearest_away"):
            cpu = fxp.pack_seeded(x, fmt, rounding=rounding, seed=4, offset=9, overflow=overflow)
            cuda = fxp.pack_seeded(x.cuda(), fmt, rounding=rounding, seed=4, offset=9, overflow=overflow)
            assert cpu.dtype == cuda.dtype == fmt.storage_dtype and torch.equal(cpu, cuda.cpu())
    # NaN counted on the device (pack.counted), code 0, as on the CPU.
    x[2::997] = float("nan")
    counts = [torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long, device="cuda")]
    codes = [fxp.pack(x.to(c.device), FxpFormat(16, 10), counts=c) for c in counts]
    assert torch.equal(codes[0], codes[1].cpu()) and torch.equal(counts[0], counts[1].cpu())
    assert int(counts[0][0]) == len(x[2::997])


@requires_cuda
@pytest.mark.parametrize("case", STEP_CASES)
def test_cuda_packed_step_bit_identical_to_cpu(case):
    torch.manual_seed(7)
    fmt, mfmt = FxpFormat(*case["fmt"]), FxpFormat(*case["mfmt"])
    shapes = [(100_003,), (7, 9)] + [(1000,)] * 40
    w = [fxp.pack(fxp.quantize(torch.randn(s), fmt), fmt) for s in shapes]
    v = [torch.zeros(s, dtype=mfmt.storage_dtype) for s in shapes] if case["momentum"] > 0 else []
    w_cuda, v_cuda = [t.cuda() for t in w], [t.cuda() for t in v]
    # Note [Bit-stream storage]: the same steps on CUDA bit streams, where the widths allow them.
    streams = fmt.total_bits <= 16 and mfmt.total_bits <= 16
    w_stream = [fxp.pack_bits(t, fmt.total_bits).cuda() for t in w] if streams else []
    v_stream = [fxp.pack_bits(t, mfmt.total_bits).cuda() for t in v] if streams else []
    for step in range(3):
        g = [torch.randn(s) for s in shapes]
        counts = _step(w, g, v, case, step)
        counts_cuda = _step(w_cuda, [t.cuda() for t in g], v_cuda, case, step)
        assert torch.equal(counts, counts_cuda.cpu())
        if streams:
            assert torch.equal(_step(w_stream, [t.cuda() for t in g], v_stream, case, step).cpu(), counts)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(w + v, w_cuda + v_cuda))
    assert all(torch.equal(fxp.pack_bits(a, fmt.total_bits), b.cpu()) for a, b in zip(w, w_stream))
    assert all(torch.equal(fxp.pack_bits(a, mfmt.total_bits), b.cpu()) for a, b in zip(v, v_stream))


@requires_cuda
def test_cuda_relu_max_pool2d_equals_torch():
    torch.manual_seed(9)
    x = fxp.quantize(torch.randn(8, 32, 24, 24, device="cuda"), 4, 1).requires_grad_()
    g = torch.randn(8, 32, 12, 12, device="cuda")
    ref = _grads(lambda: F.max_pool2d(F.relu(x), 2), [x], g)
    fused = _grads(lambda: fxp.ops.relu_max_pool2d(x, 2), [x], g)
    assert torch.equal(fused[0], ref[0]) and torch.equal(fused[1][0], ref[1][0])


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kernel", [2, 3, (2, 3), (3, 2)], ids=["k2", "k3", "k2x3", "k3x2"])
@pytest.mark.parametrize("shape", [(2, 3, 13, 11), (4, 16, 127, 139)], ids=["13x11", "127x139"])  # more than a grid
def test_cuda_relu_max_pool2d_equals_cpu_every_dtype(shape, kernel, dtype):
    """The CUDA kernels (one thread per output, per input element) equal the CPU
    ones (float32 2x2: four windows at a time) bit for bit: values with NaNs,
    infinities and zeros of both signs, window positions, and the gradient
    (0 + grad_out: -0 becomes +0), at sizes the windows do not cover."""
    gen = torch.Generator().manual_seed(13)
    x = fxp.quantize(torch.randn(shape, generator=gen), 4, 1).to(dtype)  # coarse: ties and zeros
    flat, n = x.view(-1), x.numel() // 40
    order = torch.randperm(x.numel(), generator=gen)
    flat[order[:n]] = float("nan")
    flat[order[n:2 * n]] = -0.0
    flat[order[2 * n:3 * n]] = float("inf")
    flat[order[3 * n:4 * n]] = -float("inf")
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    # Windows of every kind, in plane (0, 0):
    x[0, 0, :kh, :kw] = -1.0
    x[0, 0, 0, 0] = -0.0  # maximum -0 (the fused op keeps the first zero's sign), not positive
    x[0, 0, :kh, kw:2 * kw] = -float("inf")  # not positive: +0
    x[0, 0, kh:2 * kh, :kw] = 1.0
    x[0, 0, 2 * kh - 1, kw - 1] = float("inf")  # +inf at the last position
    x[0, 0, kh:2 * kh, kw:2 * kw] = 2.0  # a tie: the first wins
    x[0, 0, 2 * kh:3 * kh, :kw] = 3.0
    x[0, 0, 2 * kh, 0] = float("nan")  # a NaN before a larger value still wins
    out_shape = (shape[0], shape[1], shape[2] // kh, shape[3] // kw)
    g = torch.randn(out_shape, generator=gen).to(dtype)
    g.view(-1)[::5] = -0.0
    g[0, 0, 1, 0] = -0.0  # through the +inf maximum

    x_cuda = x.cuda()
    out, positions = ops.relu_max_pool2d_with_positions(x, [kh, kw])
    out_cuda, positions_cuda = ops.relu_max_pool2d_with_positions(x_cuda, [kh, kw])
    assert out_cuda.device == positions_cuda.device == x_cuda.device
    assert out_cuda.dtype == dtype and positions_cuda.dtype == torch.uint8
    # The cases are there: NaN, +inf and +-0 maxima, windows whose maximum is not positive, and both
    # kinds of zero gradient (-0 passed through a positive maximum, +0 elsewhere).
    assert _bits(out[0, 0, :2, :2]).tolist() == _bits(torch.tensor([[-0.0, 0.0], [math.inf, 2.0]], dtype=dtype)).tolist()
    assert torch.isnan(out[0, 0, 2, 0]) and int(positions[0, 0, 2, 0]) == 0
    assert positions[0, 0, :2, :2].tolist() == [[255, 255], [kh * kw - 1, 0]]
    assert torch.isnan(out).sum() > 1 and torch.isinf(out).sum() > 1 and (out == 0).sum() >= 2 and (out > 0).any()
    assert (positions == 255).sum() >= 2 and (positions < kh * kw).any() and ((positions < 255) & (g == 0)).sum() > 1
    # The CPU reference is itself right at this dtype: torch's relu then max_pool2d, everywhere.
    torch.testing.assert_close(out, F.max_pool2d(F.relu(x), (kh, kw)), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(_bits(out_cuda.cpu()), _bits(out))
    assert torch.equal(positions_cuda.cpu(), positions)

    grads = []
    for device_x, device_g in ((x, g), (x_cuda, g.cuda())):
        leaf = device_x.clone().requires_grad_()
        y = fxp.ops.relu_max_pool2d(leaf, kernel)
        y.backward(device_g)
        assert torch.equal(_bits(y.detach().cpu()), _bits(out))
        grads.append(leaf.grad.cpu())
    assert grads[0].dtype == dtype and torch.count_nonzero(grads[0]) > 0
    assert torch.equal(_bits(grads[1]), _bits(grads[0]))
    # The backward op itself, from the same positions on both devices.
    assert torch.equal(_bits(ops.relu_max_pool2d_backward(g.cuda(), positions.cuda(), [kh, kw], list(shape)).cpu()),
                       _bits(ops.relu_max_pool2d_backward(g, positions, [kh, kw], list(shape))))


@requires_cuda
def test_cuda_packed_training_is_bit_identical():
    def run(packed):
        torch.manual_seed(0)
        model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8), act_rounding="hte").cuda()
        model.quantize_parameters_("stochastic", 0)
        if packed:
            model.pack_()
        opt = QPUSGD(model.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10),
                     packed=fxp.nn.packed_storage(model))
        data = torch.Generator().manual_seed(5)
        for _ in range(3):
            x, y = torch.randn(16, 1, 28, 28, generator=data).cuda(), torch.randint(0, 10, (16,), generator=data).cuda()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return _values(model)

    torch.backends.cudnn.deterministic = True
    a, b = run(False), run(True)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- issue 11 ----------------------------------------------------------------------
def test_an_input_off_its_input_format_is_an_error():
    """Note [Packed saved inputs]: the codes of an off-grid input would give the
    weight gradient of another input, silently."""
    w = torch.randn(3, 4, requires_grad=True)
    x = fxp.quantize(torch.randn(2, 4), 8, 4)
    fxp.ops.linear(x, w, input_format=FxpFormat(8, 4)).sum().backward()  # on the grid: fine
    with pytest.raises(ValueError, match=r"fxp::linear: input_format promises an input on the grid of FxP\(8,4\) "
                                         r".* 1 of 8 elements do not"):
        fxp.ops.linear(x + torch.tensor([1 / 64, 0, 0, 0]).expand(2, 4) * torch.tensor([[1.0], [0.0]]), w,
                       input_format=FxpFormat(8, 4))
    wc = torch.randn(2, 1, 3, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"fxp::conv2d: input_format promises"):
        fxp.ops.conv2d(torch.randn(1, 1, 5, 5), wc, input_format=FxpFormat(8, 4))


@pytest.mark.parametrize("fmt,act", [(FxpFormat(16, 10), FxpFormat(16, 8)), (FxpFormat(12, 6), FxpFormat(12, 4))])
def test_packed_step_that_raises_has_stepped(fmt, act):
    """Note [Packed QPU step]: the step happened (other elements updated, step
    counted), so a caller that catches the error goes on with fresh streams.
    The same with bit streams (12 bits), where the tensors after the NaN's update too."""
    model, opt, _ = _paper_run("sqpu", packed=True, steps=1, fmt=fmt, act=act)
    shape = model.fc2.weight.shape
    codes = lambda: fxp.load_codes(model.fc2.weight_codes, fmt, shape)  # noqa: E731
    before, bias_before = codes().clone(), model.fc2.bias_codes.clone()
    for p in model.parameters():
        p.grad = torch.full(p.shape, 1e-2)
    model.fc2.weight.grad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="updated values are NaN"):
        opt.step()
    assert opt.param_groups[0]["step"] == 2
    after = codes()
    assert after[0, 0] == before[0, 0] and not torch.equal(after[1:], before[1:])
    assert not torch.equal(model.fc2.bias_codes, bias_before)  # the tensor after fc2.weight updated too


def test_a_packed_model_pickles_and_trains_on():
    import io

    model, opt, _ = _paper_run("sqpu", packed=True, steps=1)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # failed on a weakref before
    buffer.seek(0)
    twin = torch.load(buffer, weights_only=False)
    assert isinstance(twin.fc1.weight, fxp.nn.PackedParameter) and twin.fc1.weight.stride() == (0, 0)
    twin_opt = QPUSGD(twin.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10), seed=1,
                      packed=fxp.nn.packed_storage(twin))
    twin_opt.load_state_dict(opt.state_dict())
    _one_more_step((model, opt), (twin, twin_opt))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), twin.buffers()))


def _packed_linear(fmt: FxpFormat, seed: int = 0) -> fxp.nn.QLinear:
    torch.manual_seed(seed)
    layer = fxp.nn.QLinear(4, 3, weight_mode="qpu", param_format=fmt, act_format=FxpFormat(16, 8))
    fxp.nn.quantize_layer_parameters_(layer)
    layer.pack_weights_()
    return layer


def test_codes_load_only_into_their_format():
    state = _packed_linear(FxpFormat(8, 4)).state_dict()
    assert state["codes_format"].tolist() == [8, 4] and "weight" not in state
    with pytest.raises(RuntimeError, match=r"weight_codes holds codes of FxP\(8,4\), but the layer's format is "
                                           r"FxP\(8,2\)"):
        _packed_linear(FxpFormat(8, 2)).load_state_dict(state)  # would scale every value by 4
    wide = _packed_linear(FxpFormat(16, 4)).state_dict()
    wide["weight_codes"][0, 0] = 1000
    with pytest.raises(RuntimeError, match=r"holds codes of FxP\(16,4\), but the layer's format is FxP\(8,4\)"):
        _packed_linear(FxpFormat(8, 4)).load_state_dict(wide)  # int16 1000 would become int8 -24
    forged = dict(wide, codes_format=torch.tensor([8, 4]))
    with pytest.raises(RuntimeError, match=r"weight_codes has dtype torch.int16, but codes of FxP\(8,4\) are "
                                           r"torch.int8"):
        _packed_linear(FxpFormat(8, 4)).load_state_dict(forged)
    out_of_range = dict(state, weight_codes=torch.full((3, 4), -128, dtype=torch.int8))
    fmt6 = _packed_linear(FxpFormat(6, 4))
    with pytest.raises(RuntimeError, match=r"holds codes outside the range \[-32, 31\] of FxP\(6,4\)") as e:
        fmt6.load_state_dict(dict(out_of_range, codes_format=torch.tensor([6, 4])))
    # Said once: not again by torch as a size mismatch against the bit stream's byte count.
    assert str(e.value).splitlines()[1:] == ["\tweight_codes holds codes outside the range [-32, 31] of FxP(6,4)"]
    with pytest.raises(RuntimeError, match=r"codes_format is not a valid format: expected \[total_bits, frac_bits\] "
                                           r"as whole numbers, but got \[8\.5, 4\.0\]"):
        _packed_linear(FxpFormat(8, 4)).load_state_dict(dict(state, codes_format=torch.tensor([8.5, 4.0])))


def test_packed_and_unpacked_state_dicts_convert_exactly_or_refuse():
    packed = _packed_linear(FxpFormat(8, 4), seed=1)
    values = fxp.unpack(packed.weight_codes, FxpFormat(8, 4))
    # Packed into unpacked: the codes are unpacked, never the zero stand-ins.
    plain = fxp.nn.QLinear(4, 3, weight_mode="qpu", param_format=FxpFormat(8, 4), act_format=FxpFormat(16, 8))
    plain.load_state_dict(packed.state_dict())
    assert torch.equal(plain.weight.detach(), values)
    torch_linear = torch.nn.Linear(4, 3)
    kept = torch_linear.weight.detach().clone()
    result = torch_linear.load_state_dict(packed.state_dict(), strict=False)
    assert torch.equal(torch_linear.weight.detach(), kept) and "weight" in result.missing_keys
    # Unpacked into packed: values on the grid are packed; others are refused.
    fresh = _packed_linear(FxpFormat(8, 4), seed=2)
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh.weight_codes, packed.weight_codes)
    off_grid = dict(plain.state_dict(), weight=plain.weight.detach() + 1 / 64)
    with pytest.raises(RuntimeError, match=r"cannot pack weight into the codes of FxP\(8,4\)"):
        fresh.load_state_dict(off_grid)


def test_the_optimizer_keeps_to_the_codes_format():
    layer = _packed_linear(FxpFormat(8, 4))
    with pytest.raises(ValueError, match=r"the codes are of FxP\(8,4\), but the parameter's group updates "
                                         r"FxP\(8,2\)"):
        QPUSGD(layer.parameters(), lr=0.1, momentum=0.9, format=FxpFormat(8, 2), packed=fxp.nn.packed_storage(layer))
    opt = QPUSGD(layer.parameters(), lr=0.1, momentum=0.9, format=FxpFormat(8, 4), momentum_format=FxpFormat(8, 6),
                 packed=fxp.nn.packed_storage(layer))
    for p in layer.parameters():
        p.grad = torch.ones(p.shape)
    opt.step()
    other_layer = _packed_linear(FxpFormat(8, 4))
    other = QPUSGD(other_layer.parameters(), lr=0.1, momentum=0.9, format=FxpFormat(8, 4),
                   packed=fxp.nn.packed_storage(other_layer))
    with pytest.raises(ValueError, match=r"group 0 was saved with format FxP\(8,4\) and momentum format FxP\(8,6\), "
                                         r"but this optimizer has FxP\(8,4\) and FxP\(8,4\)"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match=r"^QLinear: param_format cannot become FxP\(8,2\): the packed weights are "
                                         r"codes of FxP\(8,4\), and a packed layer's format is fixed$"):
        layer.param_format = FxpFormat(8, 2)  # refused where it is set
    assert layer.param_format == FxpFormat(8, 4)
    layer.__dict__["param_format"] = FxpFormat(8, 2)  # past the check (an old pickle): the forward refuses it
    with pytest.raises(ValueError, match=r"param_format is FxP\(8,2\), but the packed weights are codes of "
                                         r"FxP\(8,4\)"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_relu_max_pool2d_passes_the_gradient_of_a_nan_maximum_as_torch_does(device):
    x = torch.tensor([[[[1.0, float("nan")], [3.0, -1.0]], [[-2.0, -3.0], [-1.0, -4.0]]]]).to(device).requires_grad_()
    g = torch.tensor([[[[5.0]], [[7.0]]]]).to(device)
    ref = _grads(lambda: F.max_pool2d(F.relu(x), 2), [x], g)
    fused = _grads(lambda: fxp.ops.relu_max_pool2d(x, 2), [x], g)
    assert torch.isnan(fused[0][0, 0, 0, 0]) and torch.equal(fused[0][0, 1], ref[0][0, 1])
    assert torch.equal(fused[1][0], ref[1][0]) and fused[1][0][0, 0, 0, 1] == 5.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(2, 3, 11, 21), (1, 2, 8, 8), (3, 1, 2, 40)])
def test_relu_max_pool2d_2x2_windows_four_at_a_time_equal_torch(shape, device):
    """Float 2x2 windows run four at a time (Note [Four 2x2 windows at once]), the
    rest of a row and the uncovered rows and columns one at a time: both are ATen's
    scan bit for bit, with NaNs, infinities, ties and zeros of both signs. (On CUDA
    the one-output-per-thread kernel, against torch's CUDA kernels.)"""
    gen = torch.Generator().manual_seed(11)
    x = fxp.quantize(torch.randn(shape, generator=gen), 4, 1)
    flat, n = x.view(-1), x.numel() // 8
    order = torch.randperm(x.numel(), generator=gen)
    flat[order[:n]] = float("nan")
    flat[order[n:2 * n]] = -0.0
    flat[order[2 * n:2 * n + 3]] = float("inf")
    flat[order[2 * n + 3:2 * n + 6]] = -float("inf")
    x = x.to(device).requires_grad_()
    g = torch.randn(F.max_pool2d(x.detach(), 2).shape, generator=gen)
    g.view(-1)[::5] = -0.0
    g = g.to(device)
    ref = _grads(lambda: F.max_pool2d(F.relu(x), 2), [x], g)
    fused = _grads(lambda: fxp.ops.relu_max_pool2d(x, 2), [x], g)
    assert torch.isnan(ref[0]).any() and (ref[0] == 0).any()  # the cases are there
    assert torch.equal(_bits_up_to_zero_sign(fused[0], device), _bits_up_to_zero_sign(ref[0], device))
    assert torch.equal(fused[1][0].view(torch.int32), ref[1][0].view(torch.int32))


@pytest.mark.parametrize("kernel", [2, (2, 3)])
def test_relu_max_pool2d_has_torchs_second_derivative(kernel):
    """Note [Double backward of the fused pool]: Hessian-vector products through the
    fused op (MSQ's Hessian traces take them) equal those through ATen's pair."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 13, dtype=torch.float64, generator=gen).requires_grad_()
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    c = torch.randn(F.max_pool2d(x.detach(), k).shape, dtype=torch.float64, generator=gen)
    v = torch.randn(x.shape, dtype=torch.float64, generator=gen)

    def hvp(pool):
        (g,) = torch.autograd.grad((pool(x) ** 2 * c).sum(), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    fused, ref = hvp(lambda t: fxp.ops.relu_max_pool2d(t, kernel)), hvp(lambda t: F.max_pool2d(F.relu(t), k))
    assert fused.count_nonzero() > 0 and torch.equal(fused, ref)
    assert torch.autograd.gradgradcheck(lambda t: fxp.ops.relu_max_pool2d(t, kernel), (x,))


def test_relu_max_pool2d_backward_counts_invalid_positions_four_at_a_time():
    positions = torch.zeros(1, 1, 2, 9, dtype=torch.uint8)
    positions[0, 0, 0, 1], positions[0, 0, 1, 2], positions[0, 0, 1, 8] = 4, 254, 7  # two in a group of four, one after
    positions[0, 0, 0, 3] = 255  # not positive: valid
    with pytest.raises(ValueError, match=r"3 of 18 positions are not window positions"):
        ops.relu_max_pool2d_backward(torch.ones(1, 1, 2, 9), positions, [2, 2], [1, 1, 4, 18])


@pytest.mark.parametrize("case, message", [
    (dict(input_size=[1, 1, 6, 4]), r"an input of size \[1, 1, 6, 4\] pooled by \[2, 2\] does not give"),
    (dict(input_size=[2, 1, 4, 4]), "disagree on N and C"),
    (dict(input_size=[1, 1, 4]), "input_size must have 4 entries"),
    (dict(kernel_size=[2, 0]), "kernel_size must be two positive sizes"),
    (dict(kernel_size=[16, 16]), "fewer than 255 positions"),
    (dict(positions_fill=4), r"1 of 4 positions are not window positions \(each must be below 4 = kh \* kw"),
    (dict(positions_dtype=torch.int64), "positions must be uint8"),
    (dict(positions_shape=[1, 1, 2, 3]), "but positions has"),
    (dict(grad_dtype=torch.int32), "grad_out must be floating point"),
    (dict(grad_shape=[1, 2, 2]), "expected a 4-D grad_out"),
])
def test_relu_max_pool2d_backward_checks_every_argument(case, message):
    """Once a malformed call wrote out of bounds (CPU) or faulted (CUDA)."""
    grad = torch.ones(case.get("grad_shape", [1, 1, 2, 2]), dtype=case.get("grad_dtype", torch.float32))
    positions = torch.zeros(case.get("positions_shape", [1, 1, 2, 2]), dtype=case.get("positions_dtype", torch.uint8))
    if "positions_fill" in case:
        positions[0, 0, 1, 1] = case["positions_fill"]
    with pytest.raises((RuntimeError, ValueError), match=message):
        ops.relu_max_pool2d_backward(grad, positions, case.get("kernel_size", [2, 2]),
                                     case.get("input_size", [1, 1, 4, 4]))


@requires_cuda
def test_cuda_relu_max_pool2d_backward_is_memory_safe_for_any_positions():
    """On CUDA invalid positions are not counted (a check would cost a
    device-to-host copy); they select nothing, and nothing is written out of bounds."""
    positions = torch.full((1, 1, 2, 2), 200, dtype=torch.uint8, device="cuda")
    grad = ops.relu_max_pool2d_backward(torch.ones(1, 1, 2, 2, device="cuda"), positions, [2, 2], [1, 1, 4, 4])
    torch.cuda.synchronize()
    assert int(grad.count_nonzero()) == 0
    with pytest.raises(RuntimeError, match="expected positions on the device of grad_out"):
        ops.relu_max_pool2d_backward(torch.ones(1, 1, 2, 2, device="cuda"), positions.cpu(), [2, 2], [1, 1, 4, 4])


@requires_cuda
def test_cuda_unpack_and_nan_bits_equal_cpu():
    codes = torch.randint(-(2**31), 2**31 - 1, (100_003,), dtype=torch.int32)
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        for frac_bits in (0, 17, 31):
            cpu = fxp.unpack(codes, 32, frac_bits, dtype=dtype)
            gpu = fxp.unpack(codes.cuda(), 32, frac_bits, dtype=dtype).cpu()
            assert torch.equal(cpu, gpu), (dtype, frac_bits)
    w = torch.zeros(8)
    g = torch.full((8,), float("nan"))
    wc, gc = w.cuda(), g.cuda()
    ops.qpu_sgd_step_([w], [g], [], 0.1, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0, 0)
    ops.qpu_sgd_step_([wc], [gc], [], 0.1, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0, 0)
    assert torch.equal(w.view(torch.int32), wc.cpu().view(torch.int32))  # the default quiet NaN on both
