"""Properties of the fxp quantize ops: exact values, ties, saturation, unbiased
stochastic rounding, reproducibility, layout independence, errors, opcheck."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import fxp
from environment import bits
from reference import philox_word, quantize_nearest_even

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ROUNDINGS = ["nearest_even", "stochastic", "floor", "nearest_away"]
OVERFLOWS = ["saturate", "wrap"]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

# Statistical bounds: a mean of N independent Bernoulli(p) draws has standard
# deviation sqrt(p (1 - p) / N). Six of them bound a false failure by ~2e-9.
SIGMAS = 6.0


def codes(y: torch.Tensor, frac_bits: int) -> torch.Tensor:
    return y.double() * 2.0**frac_bits


# --- the format value type -------------------------------------------------
def test_format_properties_and_validation():
    f = fxp.FxpFormat(8, 4)
    assert (f.code_min, f.code_max, f.resolution, f.min_value, f.max_value) == (-128, 127, 0.0625, -8.0, 7.9375)
    assert str(f) == "FxP(8,4)" and f.storage_bits == 8 and fxp.FxpFormat(12, 6).storage_bits == 16
    with pytest.raises(ValueError, match=r"total_bits must be in \[2, 32\], but got 33"):
        fxp.FxpFormat(33, 4)
    with pytest.raises(ValueError, match=r"frac_bits must be in \[0, total_bits - 1\] = \[0, 7\], but got 8"):
        fxp.FxpFormat(8, 8)
    with pytest.raises(TypeError, match="total_bits must be an int"):
        fxp.FxpFormat(8.0, 4)
    x = torch.randn(100)
    assert torch.equal(fxp.quantize(x, f), fxp.quantize(x, 8, 4))


# --- round half to even ----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_tie_rounds_to_even_code(dtype):
    for total_bits, frac_bits in [(8, 4), (12, 0), (16, 10), (24, 20)]:
        k = torch.arange(-(2 ** (total_bits - 1)), 2 ** (total_bits - 1) - 1, dtype=torch.float64)
        x = ((k + 0.5) * 2.0**-frac_bits).to(dtype)
        q = codes(fxp.quantize(x, total_bits, frac_bits), frac_bits)
        assert torch.all(torch.fmod(q, 2) == 0)
        assert torch.all((q - k).abs() <= 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("overflow", OVERFLOWS)
def test_nearest_even_exhaustive_small_formats(dtype, overflow):
    """Every code of FxP(B, F), B <= 12, +-1/4 and +-1/2 LSB, and past both ends."""
    for total_bits in range(2, 13):
        for frac_bits in sorted({0, 1, total_bits // 2, total_bits - 1}):
            lo, hi = -(2 ** (total_bits - 1)), 2 ** (total_bits - 1) - 1
            q = np.arange(lo - 4, hi + 5, dtype=np.float64)
            t = (q[:, None] + np.array([-0.5, -0.25, 0.0, 0.25, 0.5])[None, :]).ravel()
            x = t * 2.0**-frac_bits
            expect = quantize_nearest_even(x, total_bits, frac_bits, overflow)
            got = fxp.quantize(torch.from_numpy(x).to(dtype), total_bits, frac_bits, overflow=overflow)
            np.testing.assert_array_equal(got.double().numpy(), expect, err_msg=f"B={total_bits} F={frac_bits}")


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_saturation_at_both_ends(rounding):
    x = torch.tensor([1e9, 7.97, 7.9375, -8.0, -8.03, -1e9])
    y, count = fxp.quantize_stats(x, 8, 4, rounding, generator=torch.Generator().manual_seed(0))
    assert y[0] == 7.9375 and y[-1] == -8.0 and y[2] == 7.9375 and y[3] == -8.0
    assert count.dtype == torch.int64 and count.dim() == 0
    _, mask = fxp.quantize_mask(x, 8, 4, rounding, generator=torch.Generator().manual_seed(0))
    assert int(count) == int(mask.sum()) and bool(mask[0]) and bool(mask[-1]) and not mask[2] and not mask[3]


def test_wrap_at_both_ends():
    x = torch.tensor([8.0, 7.9375, -8.0, -8.0625, 100.0, -100.0, 16.0])
    got = fxp.quantize(x, 8, 4, overflow="wrap")
    np.testing.assert_array_equal(got.numpy(), [-8.0, 7.9375, -8.0, 7.9375, 4.0, -4.0, 0.0])
    np.testing.assert_array_equal(got.numpy(), quantize_nearest_even(x.numpy(), 8, 4, "wrap"))
    # float32 at B = 32: wrap-around of a huge integer code is still exact
    big = torch.tensor([2.0**31, 2.0**40 + 2.0**31, -(2.0**31) - 256], dtype=torch.float32)
    np.testing.assert_array_equal(fxp.quantize(big, 32, 0, overflow="wrap").numpy(), [-(2.0**31), -(2.0**31), 2.0**31 - 256])



def _wrapped_codes(values: np.ndarray, total_bits: int) -> list[int]:
    """Two's-complement wrap of integer-valued floats into B bits, in Python's exact integers."""
    half = 1 << (total_bits - 1)
    return [((int(v) + half) % (2 * half)) - half for v in values.tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wrap_matches_integer_arithmetic_at_every_width_and_magnitude(dtype):
    """Note [Wrap without fmod]: floor(x) wrapped into B bits equals the wrap of
    the exact integer, for B from 2 to 32 and integers from 0 to 2^101 and the
    type's largest in magnitude, many of them at the range's ends and at odd
    multiples of 2^(B-1) (rint's ties), through the vectorized loop and its
    scalar tail, in quantize and in pack. (The other CPU builds run a few of
    these in test_every_cpu_build_gives_the_same_bits.)"""
    gen = np.random.default_rng(0)
    digits = 24 if dtype == torch.float32 else 53
    for total_bits in (2, 3, 7, 8, 9, 15, 16, 17, 24, 25, 26, 31, 32):
        half = 2.0 ** (total_bits - 1)
        exponents = gen.integers(0, 101, 3000)
        mantissas = gen.integers(0, 2**digits, 3000, dtype=np.uint64).astype(np.float64)
        far = np.ldexp(mantissas, exponents - digits + 1)  # magnitudes up to 2^101, any ulp
        top = float(torch.finfo(dtype).max)
        near = np.concatenate([half + np.arange(-3, 4), -half + np.arange(-3, 4), 2 * half + np.arange(-3, 4),
                               3 * half + np.arange(-3, 4), np.ldexp(1.0, np.arange(0, 100)), [top, top / 3]])
        values = np.concatenate([far, near])
        values = values * gen.choice([-1.0, 1.0], values.size)
        x = torch.from_numpy(values).to(dtype)
        x = torch.floor(x)  # integers, as the dtype holds them
        expected = _wrapped_codes(x.double().numpy(), total_bits)
        got = fxp.quantize(x, total_bits, 0, "floor", "wrap")
        assert [int(v) for v in got.double().tolist()] == expected, f"B={total_bits}"
        assert fxp.pack(x, total_bits, 0, "floor", "wrap").tolist() == expected, f"B={total_bits}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrap_beyond_the_float_range_gives_code_zero(dtype):
    """Note [Wrapping beyond the float range]: x 2^F overflows float32 to
    infinity, but x is a multiple of 2^B, so its code wraps to 0, as in float64
    and in pack (which computes in float64); only an infinite x saturates."""
    x = torch.tensor([1e38, -3e38, 2.0**127, float("inf"), 5.0], dtype=torch.float32).to(dtype)
    expected = fxp.quantize(x.double(), 8, 4, overflow="wrap")
    assert expected.tolist() == [0.0, 0.0, 0.0, 7.9375, 5.0]
    assert fxp.quantize(x, 8, 4, overflow="wrap").double().tolist() == expected.tolist()
    assert fxp.unpack(fxp.pack(x[:3], 8, 4, overflow="wrap"), 8, 4).tolist() == [0.0, 0.0, 0.0]
    _, saturated = fxp.quantize_stats(x, 8, 4, overflow="wrap")
    assert int(saturated) == 4  # wrapped or clamped: all but 5.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("overflow", OVERFLOWS)
def test_nan_stays_nan_and_inf_saturates(dtype, rounding, overflow):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0], dtype=dtype)
    y, count = fxp.quantize_stats(x, 8, 4, rounding, overflow)
    assert torch.isnan(y[0]) and y[1] == 7.9375 and y[2] == -8.0 and y[3] == 1.0
    assert int(count) == 2


# Note [NaN keeps its bits]: a NaN input comes out with its own bits, whatever
# its payload and sign, in every dtype, rounding and variant, so the CPU and
# CUDA kernels agree bit for bit (CUDA arithmetic would canonicalize it).
NAN_BITS = {
    torch.float32: (np.uint32, [0x7FC00000, 0x7FC00123, 0xFFC00001, 0x7F800001, 0xFFFFFFFF]),
    torch.float64: (np.uint64, [0x7FF8000000000000, 0x7FF8000000000ABC, 0xFFF8000000000001, 0x7FF0000000000001]),
    torch.float16: (np.uint16, [0x7E00, 0x7E12, 0xFE01, 0x7C01, 0xFFFF]),
    torch.bfloat16: (np.uint16, [0x7FC0, 0x7FC5, 0xFFC1, 0x7F81, 0xFFFF]),
}


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]).numpy()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_nan_inputs_keep_their_bits(dtype, rounding):
    unsigned, payloads = NAN_BITS[dtype]
    signed = {np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}[unsigned]
    raw = np.array(payloads + [0] * 11, dtype=unsigned).view(signed)  # 16 elements: the vector loop sees them
    x = torch.from_numpy(raw.copy()).view(dtype)
    x[len(payloads):] = 1.5
    expect = _raw(x)[: len(payloads)]
    results = [
        fxp.quantize(x, 8, 4, rounding, generator=torch.Generator().manual_seed(0)),
        fxp.quantize(x, 12, 3, rounding, "wrap", generator=torch.Generator().manual_seed(0)),
        fxp.quantize_seeded(x, 16, 8, rounding, seed=1),
        fxp.quantize_stats(x, 8, 4, rounding, generator=torch.Generator().manual_seed(0))[0],
        fxp.quantize_mask(x, 8, 4, rounding, generator=torch.Generator().manual_seed(0))[0],
        fxp.quantize_seeded_(x.clone(), 8, 4, rounding, seed=2),
        fxp.quantize(x[::1], 8, 4, rounding, generator=torch.Generator().manual_seed(0), out=torch.empty_like(x)),
    ]
    for y in results:
        np.testing.assert_array_equal(_raw(y)[: len(payloads)], expect)


def test_float32_saturation_bound_for_wide_formats():
    """Note [Saturation bound in float32]: the largest float32 code that fits FxP(32, F)."""
    y = fxp.quantize(torch.tensor([1e30, -1e30]), 32, 24)
    assert y[0].item() == (2.0**31 - 128) * 2.0**-24 and y[1].item() == -128.0
    y64 = fxp.quantize(torch.tensor([1e30], dtype=torch.float64), 32, 24)
    assert y64.item() == (2.0**31 - 1) * 2.0**-24


@pytest.mark.parametrize("dtype,max_exact_bits", [(torch.float16, 12), (torch.bfloat16, 9)])
def test_half_types_are_exact_while_codes_fit_their_significand(dtype, max_exact_bits):
    """float16 (11 significant bits) and bfloat16 (8) hold every code of FxP(B, F)
    for B <= 12 and B <= 9 (when the values stay in their normal range)."""
    for frac_bits in (0, 3, max_exact_bits - 1):
        x = torch.linspace(-300, 300, 100003, dtype=torch.float64) * 2.0**-frac_bits
        for rounding in ("nearest_even", "floor"):
            got = fxp.quantize(x.to(dtype), max_exact_bits, frac_bits, rounding)
            ref = fxp.quantize(x.to(dtype).double(), max_exact_bits, frac_bits, rounding)
            assert torch.equal(got.double(), ref), (dtype, frac_bits, rounding)


# --- stochastic rounding ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stochastic_output_is_a_neighbouring_code(dtype):
    x = (torch.randn(200000, dtype=torch.float64) * 3).to(dtype)
    y = fxp.quantize_seeded(x, 16, 10, "stochastic", seed=1, offset=0)
    t = x.double() * 2.0**10
    q = codes(y, 10)
    assert torch.all((q == torch.floor(t)) | (q == torch.floor(t) + 1))
    assert torch.all(q[t == torch.floor(t)] == t[t == torch.floor(t)])


def sr_mean_offset(x: torch.Tensor, total_bits: int, frac_bits: int, n: int, seed: int = 123):
    """Mean over n draws of (code - floor(t)), i.e. the empirical P(round up)."""
    y = fxp.quantize_seeded(x.expand(n).contiguous(), total_bits, frac_bits, "stochastic", seed=seed, offset=0)
    t = x.double().item() * 2.0**frac_bits
    return (codes(y, frac_bits) - math.floor(t)).mean().item(), t - math.floor(t)


@pytest.mark.parametrize(
    "x,dtype,total_bits,frac_bits",
    [
        ((2**20 + 0.25) / 256, torch.float32, 32, 8),  # t = 2^20 + 0.25: naive float32 SR is biased here
        (0.0012345, torch.float32, 32, 24),  # large F
        (3.14159265358979, torch.float64, 32, 24),
        (-1.7, torch.float64, 8, 4),
        (0.3, torch.float16, 8, 4),
        (0.3, torch.bfloat16, 8, 3),
    ],
)
def test_stochastic_rounding_is_unbiased(x, dtype, total_bits, frac_bits):
    n = 1 << 20
    xt = torch.tensor([x], dtype=dtype)
    mean_up, p = sr_mean_offset(xt, total_bits, frac_bits, n)
    bound = SIGMAS * math.sqrt(max(p * (1 - p), 1e-12) / n)
    assert abs(mean_up - p) <= bound, f"P(up) {mean_up} vs fraction {p} (bound {bound})"


def test_naive_float_stochastic_rounding_is_biased_where_fxp_is_not():
    """The test above can see the bias DESIGN.md warns about: round(x + (U - 1/2) 2^-F) in float32."""
    n, frac_bits = 1 << 20, 8
    x = torch.full((n,), (2**20 + 0.25) / 256, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    noise = (torch.rand(n, generator=g) - 0.5) * 2.0**-frac_bits
    naive = torch.round((x + noise) * 2.0**frac_bits)
    p_naive = (naive.double() - 2**20).mean().item()
    bound = SIGMAS * math.sqrt(0.25 * 0.75 / n)
    assert abs(p_naive - 0.25) > 10 * bound


def test_stochastic_rounding_is_unbiased_over_many_values():
    n = 1 << 20
    x = torch.randn(n, dtype=torch.float64) * 4
    err = (fxp.quantize_seeded(x, 16, 8, "stochastic", seed=9) - x) * 2.0**8  # in LSBs
    t = x * 2.0**8
    p = t - torch.floor(t)
    bound = SIGMAS * math.sqrt((p * (1 - p)).mean().item() / n)
    assert abs(err.mean().item()) <= bound


def test_generator_driven_stochastic_rounding_is_unbiased_and_reproducible():
    n = 1 << 20
    x = torch.full((n,), 0.3)  # t = 4.8 in FxP(8, 4)
    g = torch.Generator().manual_seed(5)
    y1 = fxp.quantize(x, 8, 4, "stochastic", generator=g)
    y2 = fxp.quantize(x, 8, 4, "stochastic", generator=g)
    assert not torch.equal(y1, y2)  # the generator advanced
    g.manual_seed(5)
    assert torch.equal(fxp.quantize(x, 8, 4, "stochastic", generator=g), y1)
    p = 0.3 * 16 - 4
    up = (codes(y1, 4) - 4).mean().item()
    assert abs(up - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)


def test_deterministic_roundings_leave_the_generator_untouched():
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    fxp.quantize(torch.randn(10), 8, 4, "nearest_even", generator=g)
    assert torch.equal(g.get_state(), state)


def test_philox_counter_layout():
    """Element i rounds up iff its draw u = r 2^-32 is below p; with p = 1/2 that
    is the top bit of lane i % 4 of Philox block (offset, i // 4) being 0."""
    seed, offset, n = 0x0123456789ABCDEF, 77, 64
    x = torch.full((n,), 0.5 / 16, dtype=torch.float64)  # t = 0.5 in FxP(8, 4)
    y = fxp.quantize_seeded(x, 8, 4, "stochastic", seed=seed, offset=offset)
    expect = [1.0 if philox_word(seed, offset, i) < 2**31 else 0.0 for i in range(n)]
    np.testing.assert_array_equal(codes(y, 4).numpy(), expect)
    # a negative int64 seed is the same 64-bit key
    y_neg = fxp.quantize_seeded(x, 8, 4, "stochastic", seed=-1, offset=offset)
    expect_neg = [1.0 if philox_word(2**64 - 1, offset, i) < 2**31 else 0.0 for i in range(n)]
    np.testing.assert_array_equal(codes(y_neg, 4).numpy(), expect_neg)


def test_same_seed_and_offset_give_same_bits_and_offsets_are_independent():
    n = 1 << 20
    x = torch.full((n,), 0.5 / 16)  # p = 1/2
    a = fxp.quantize_seeded(x, 8, 4, seed=7, offset=0)
    assert torch.equal(a, fxp.quantize_seeded(x, 8, 4, seed=7, offset=0))
    bound = SIGMAS / math.sqrt(n)
    for other in (fxp.quantize_seeded(x, 8, 4, seed=7, offset=1), fxp.quantize_seeded(x, 8, 4, seed=8, offset=0)):
        u, v = codes(a, 4) * 2 - 1, codes(other, 4) * 2 - 1  # +-1 with mean 0
        assert abs((u * v).mean().item()) <= bound, "streams are correlated"
        assert abs(u.mean().item()) <= bound and abs(v.mean().item()) <= bound
    # neighbouring elements (lanes of one block, and adjacent blocks) are uncorrelated too
    u = codes(a, 4) * 2 - 1
    for lag in (1, 4):
        assert abs((u[lag:] * u[:-lag]).mean().item()) <= SIGMAS / math.sqrt(n - lag)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_result_independent_of_strides_contiguity_and_threads(rounding):
    base = torch.randn(64, 96, 3, dtype=torch.float64)
    layouts = [base.transpose(0, 1), base[:, ::2, :], base.permute(2, 0, 1), base.unsqueeze(1).expand(64, 2, 96, 3)]
    for x in layouts:
        assert not x.is_contiguous()
        got = fxp.quantize_seeded(x, 12, 6, rounding, seed=11, offset=2)
        assert torch.equal(got, fxp.quantize_seeded(x.contiguous(), 12, 6, rounding, seed=11, offset=2))
    threads = torch.get_num_threads()
    x = torch.randn(3_000_000, dtype=torch.float32)
    results = []
    try:
        for t in (1, 2, 5):
            torch.set_num_threads(t)
            results.append(fxp.quantize_seeded_stats(x, 10, 6, rounding, seed=4, offset=0))
    finally:
        torch.set_num_threads(threads)
    for y, c in results[1:]:
        assert torch.equal(y, results[0][0]) and int(c) == int(results[0][1])


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill a block of memory exactly (ATen's is_non_overlapping_and_dense)."""
    order = sorted(range(x.dim()), key=lambda d: x.stride(d))
    expected = 1
    for d in order:
        if x.size(d) != 1 and x.stride(d) != expected:
            return False
        expected *= x.size(d)
    return True


def _layout_cases(device):
    base = torch.randn(4, 6, 5, 3, generator=torch.Generator().manual_seed(5)).mul(4).to(device)
    return [base.to(memory_format=torch.channels_last), base.permute(3, 1, 0, 2), base[0, 0].t()]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_dense_results_keep_the_layout_of_x_and_the_bits_of_its_contiguous_copy(device, rounding):
    # Note [Result layout] and Note [Quantizing in memory order].
    for x in _layout_cases(device):
        assert not x.is_contiguous() and _dense(x)
        expect = fxp.quantize_seeded(x.contiguous(), 8, 4, rounding, seed=9, offset=3)
        got = fxp.quantize_seeded(x, 8, 4, rounding, seed=9, offset=3)
        assert got.stride() == x.stride() and torch.equal(got, expect)
        y, count = fxp.quantize_seeded_stats(x, 5, 1, rounding, seed=9, offset=3)
        y0, count0 = fxp.quantize_seeded_stats(x.contiguous(), 5, 1, rounding, seed=9, offset=3)
        assert y.stride() == x.stride() and torch.equal(y, y0) and int(count) == int(count0) > 0
        in_place = x.clone(memory_format=torch.preserve_format)
        pointer = in_place.data_ptr()
        fxp.quantize_seeded_(in_place, 8, 4, rounding, seed=9, offset=3)
        assert in_place.data_ptr() == pointer and in_place.stride() == x.stride() and torch.equal(in_place, expect)
        if rounding != "stochastic":
            expect_mask = fxp.quantize_mask(x.contiguous(), 5, 1, rounding)
            got_mask = fxp.quantize_mask(x, 5, 1, rounding)
            assert got_mask[1].stride() == x.stride() and got_mask[1].any()
            assert torch.equal(got_mask[0], expect_mask[0]) and torch.equal(got_mask[1], expect_mask[1])
    # Not dense (slices): the layout torch's elementwise ops give (empty_like's Preserve), the bits of
    # the contiguous copy.
    channels_last = _layout_cases(device)[0]
    for sliced, layout in ((channels_last.contiguous()[:, :, ::2], torch.contiguous_format),
                           (channels_last[:, :, ::2], torch.channels_last)):
        assert not _dense(sliced)
        got = fxp.quantize_seeded(sliced, 8, 4, rounding, seed=9, offset=3)
        assert got.is_contiguous(memory_format=layout)
        assert torch.equal(got, fxp.quantize_seeded(sliced.contiguous(), 8, 4, rounding, seed=9, offset=3))


def test_stochastic_rounding_of_a_channels_last_tensor_draws_in_logical_order():
    # Element i of the contiguous (NCHW) order takes lane i % 4 of Philox block i / 4, whatever the layout:
    # a tie at every element shows the draws, which must be those of the contiguous copy, not permuted.
    x = torch.full((2, 8, 4, 4), 0.5 + 2.0**-5).to(memory_format=torch.channels_last)
    got = fxp.quantize_seeded(x, 8, 4, "stochastic", seed=1, offset=0)
    contiguous = fxp.quantize_seeded(x.contiguous(), 8, 4, "stochastic", seed=1, offset=0)
    assert torch.equal(got, contiguous) and got.is_contiguous(memory_format=torch.channels_last)
    # Draws taken in memory order would give got's memory the contiguous result's sequence.
    assert not torch.equal(got.permute(0, 2, 3, 1).reshape(-1), contiguous.reshape(-1))


# --- variants, shapes, and bad input --------------------------------------
def test_in_place_and_out_variants_match():
    x = torch.randn(33, 7).t()
    expect = fxp.quantize_seeded(x, 12, 6, seed=1, offset=0)
    out = torch.empty(0)
    fxp.quantize_seeded(x, 12, 6, seed=1, offset=0, out=out)
    assert torch.equal(out, expect) and out.shape == x.shape
    y = x.clone()
    fxp.quantize_seeded_(y, 12, 6, seed=1, offset=0)
    assert torch.equal(y, expect)
    strided_out = torch.empty(14, 33)[::2]
    fxp.quantize(x, 12, 6, out=strided_out)
    assert torch.equal(strided_out, fxp.quantize(x, 12, 6))
    z = x.clone()
    assert fxp.quantize_(z, 12, 6) is z and torch.equal(z, fxp.quantize(x, 12, 6))


@pytest.mark.parametrize("shape", [(0,), (3, 0, 2), (), (1,), (5, 3)])
def test_shapes_and_empty_tensors(shape):
    x = torch.randn(shape)
    y, count = fxp.quantize_stats(x, 8, 4, "stochastic")
    assert y.shape == x.shape and y.dtype == x.dtype and int(count) == 0


def test_bad_input_errors():
    x = torch.randn(4)
    q = torch.ops.fxp.quantize
    with pytest.raises(RuntimeError, match=r"fxp::quantize: total_bits must be in \[2, 32\], but got 33"):
        q(x, 33, 4)
    with pytest.raises(RuntimeError, match=r"total_bits must be in \[2, 32\], but got 1"):
        q(x, 1, 0)
    with pytest.raises(RuntimeError, match=r"frac_bits must be in \[0, total_bits - 1\] = \[0, 7\], but got 8"):
        q(x, 8, 8)
    with pytest.raises(RuntimeError, match=r"frac_bits must be in .* but got -1"):
        q(x, 8, -1)
    with pytest.raises(RuntimeError, match="unknown rounding 'round'; expected one of nearest_even, stochastic"):
        q(x, 8, 4, "round")
    with pytest.raises(RuntimeError, match="unknown overflow 'clip'; expected one of saturate, wrap"):
        q(x, 8, 4, "nearest_even", "clip")
    for dtype in (torch.int32, torch.int8, torch.bool, torch.complex64):
        with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16, but got"):
            q(torch.zeros(3, dtype=dtype), 8, 4)
    with pytest.raises(RuntimeError, match="offset must be non-negative, but got -1"):
        torch.ops.fxp.quantize_seeded(x, 8, 4, "stochastic", 0, -1)  # the op's own check (fxp.ops checks first)
    with pytest.raises(RuntimeError, match=r"expected out on the same device as x \(cpu\), but got meta"):
        fxp.quantize(x, 8, 4, out=torch.empty(4, device="meta"))
    with pytest.raises(RuntimeError, match="expected out to have dtype Float like x, but got Double"):
        fxp.quantize(x, 8, 4, out=torch.empty(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="or total_bits and frac_bits as two arguments, but got 8 alone"):
        fxp.quantize(x, 8)
    with pytest.raises(TypeError, match=r"but got \(8, 4\) alone"):
        fxp.quantize(x, (8, 4))


# --- straight-through estimator -------------------------------------------
def test_ste_gradient_passes_through_or_is_masked():
    x = torch.tensor([0.3, 100.0, -100.0, 1.01], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = fxp.quantize_ste(x, 8, 4)
    assert torch.equal(y.detach(), fxp.quantize(x.detach(), 8, 4))
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, g)
    y = fxp.quantize_ste(x, 8, 4, "stochastic", zero_grad_saturated=True)
    (gx,) = torch.autograd.grad(y, x, g)
    assert torch.equal(gx, torch.tensor([1.0, 0.0, 0.0, 4.0]))


def test_ste_under_inference_mode_and_no_grad():
    x = torch.randn(10)
    with torch.inference_mode():
        assert torch.equal(fxp.quantize_ste(x, 8, 4), fxp.quantize(x, 8, 4))
    with torch.no_grad():
        assert not fxp.quantize_ste(x.requires_grad_(), 8, 4).requires_grad


# --- opcheck ---------------------------------------------------------------
def _opcheck_cases(device):
    x = torch.randn(5, 7, device=device, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    xcl = torch.randn(2, 3, 4, 5, device=device).to(memory_format=torch.channels_last)
    g = lambda: torch.Generator(device=device).manual_seed(0)  # noqa: E731
    ops = torch.ops.fxp
    return [
        (ops.quantize.default, (x, 8, 4), {}),
        (ops.quantize.default, (x, 8, 4, "stochastic", "wrap", g()), {}),
        (ops.quantize.out, (x, 8, 4, "floor", "saturate", None), {"out": torch.empty_like(x)}),
        (ops.quantize_.default, (x.clone(), 8, 4, "nearest_away"), {}),
        (ops.quantize_stats.default, (x, 8, 2), {}),
        (ops.quantize_stats.default, (x, 8, 2, "stochastic", "saturate", g()), {}),
        (ops.quantize_mask.default, (x, 8, 2), {}),
        (ops.quantize_mask.default, (x, 8, 2, "stochastic", "wrap", g()), {}),
        (ops.quantize_ste.default, (xr, 8, 4), {}),
        (ops.quantize_ste.default, (xr, 8, 2, "stochastic", "saturate", g(), True), {}),
        (ops.quantize_seeded.default, (x, 16, 8, "stochastic", 1, 2), {}),
        (ops.quantize_seeded_.default, (x.clone(), 16, 8, "stochastic", 1, 2), {}),
        (ops.quantize_seeded.out, (x, 16, 8, "stochastic", 1, 2), {"out": torch.empty_like(x)}),
        (ops.quantize_seeded_stats.default, (x, 6, 2, "stochastic", 1, 2, "wrap"), {}),
        # Note [Result layout]: a dense strided x keeps its strides, in the Meta kernel too.
        (ops.quantize.default, (xcl, 8, 4), {}),
        (ops.quantize_.default, (xcl.clone(memory_format=torch.channels_last), 8, 4), {}),
        (ops.quantize_mask.default, (xcl, 8, 2, "stochastic", "saturate", g()), {}),
        (ops.quantize_seeded.default, (x.t(), 16, 8, "stochastic", 1, 2), {}),
    ]


# FX cannot trace a torch.Generator argument, so test_aot_dispatch_dynamic is left
# out for the cases that pass one; every op also runs all checks without one.
ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _run_opcheck(device):
    for op, args, kwargs in _opcheck_cases(device):
        has_generator = any(isinstance(a, torch.Generator) for a in args)
        checks = ALL_CHECKS[:-1] if has_generator else ALL_CHECKS
        torch.library.opcheck(op, args, kwargs, test_utils=checks)


def test_opcheck_cpu():
    _run_opcheck("cpu")


@requires_cuda
def test_opcheck_cuda():
    _run_opcheck("cuda")


# --- CUDA ------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("overflow", OVERFLOWS)
def test_cuda_bit_identical_to_cpu(dtype, rounding, overflow):
    x = (torch.randn(1_000_003, dtype=torch.float64) * 40).to(dtype)
    x[::1000] = float("nan")
    x[1::1000] = float("inf")
    for total_bits, frac_bits in [(8, 3), (16, 10), (32, 24)]:
        kw = dict(seed=3, offset=5, overflow=overflow)
        cpu, cpu_count = fxp.quantize_seeded_stats(x, total_bits, frac_bits, rounding, **kw)
        gpu, gpu_count = fxp.quantize_seeded_stats(x.cuda(), total_bits, frac_bits, rounding, **kw)
        assert torch.equal(bits(cpu), bits(gpu.cpu())) and int(cpu_count) == int(gpu_count)
        # an unaligned start takes the kernel's scalar path: same bits
        cpu = fxp.quantize_seeded(x[1:], total_bits, frac_bits, rounding, **kw)
        gpu = fxp.quantize_seeded(x.cuda()[1:], total_bits, frac_bits, rounding, **kw)
        assert torch.equal(bits(cpu), bits(gpu.cpu()))


@requires_cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("overflow", OVERFLOWS)
def test_cuda_mask_and_masked_ste_gradient_equal_cpu(dtype, overflow):
    # The kernels that also write the saturation mask, and the gradient that mask zeroes.
    x = (torch.randn(300_007, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 40).to(dtype)
    x[::1000] = float("nan")
    x[1::1000] = float("inf")
    upstream = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)).to(dtype)
    for total_bits, frac_bits in [(8, 3), (16, 10)]:
        for rounding in ("nearest_even", "floor", "nearest_away"):
            y, mask = fxp.quantize_mask(x, total_bits, frac_bits, rounding, overflow)
            y_cuda, mask_cuda = fxp.quantize_mask(x.cuda(), total_bits, frac_bits, rounding, overflow)
            assert torch.equal(bits(y), bits(y_cuda.cpu())) and torch.equal(mask, mask_cuda.cpu())
        assert mask.any() and not mask.all()
        grads = []
        for device in ("cpu", "cuda"):
            xr = x.to(device).requires_grad_()
            y = fxp.quantize_ste(xr, total_bits, frac_bits, "nearest_away", overflow, zero_grad_saturated=True)
            grads.append(torch.autograd.grad(y, xr, upstream.to(device))[0].cpu())
        assert torch.equal(bits(grads[0]), bits(grads[1]))
        assert torch.equal(grads[0], torch.where(mask, torch.zeros_like(upstream), upstream))


@requires_cuda
def test_cuda_generator_and_stream_and_errors():
    x = torch.full((1 << 20,), 0.3, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y1 = fxp.quantize(x, 8, 4, "stochastic", generator=g)
        y2 = fxp.quantize(x, 8, 4, "stochastic", generator=g)
    s.synchronize()
    assert not torch.equal(y1, y2)
    p = 0.3 * 16 - 4
    assert abs((codes(y1, 4) - 4).mean().item() - p) <= SIGMAS * math.sqrt(p * (1 - p) / x.numel())
    with pytest.raises(RuntimeError, match="expected out on the same device as x"):
        fxp.quantize(torch.randn(4), 8, 4, out=torch.empty(4, device="cuda"))
    with pytest.raises(RuntimeError, match="expected a generator for cuda"):
        fxp.quantize(x, 8, 4, "stochastic", generator=torch.Generator())


@requires_cuda
def test_cuda_generator_draws_are_torchs_convention_and_do_not_overlap():
    """Note [Philox offsets from a generator]: at generator offset O fxp draws
    counter O / 4 and reserves 4, so torch's own random ops never repeat its draws."""
    g = torch.Generator(device="cuda").manual_seed(11)
    n = 4096  # torch.rand(n) then runs one element per thread: thread t draws lane 0 of subsequence t
    x = torch.full((4 * n,), 1 / 32, device="cuda")  # half an LSB of FxP(8,4): rounds up iff the draw < 2^31
    offset = 4 * 1000
    g.set_offset(offset)
    y = fxp.quantize(x, 8, 4, "stochastic", generator=g)
    assert g.get_offset() == offset + 4
    assert torch.equal(y.cpu(), fxp.quantize_seeded(x.cpu(), 8, 4, "stochastic", seed=11, offset=offset // 4))
    up = (y[::4] > 0.04).cpu()  # lane 0 of block t
    bound = SIGMAS * 0.5 / math.sqrt(n)
    # the next torch op, and one at offset 4 O, which drew exactly fxp's words under the old convention
    for later in (offset + 4, 4 * offset):
        g.set_offset(later)
        r = torch.rand(n, device="cuda", generator=g).cpu()
        agreement = ((r < 0.5) == up).double().mean().item()
        assert abs(agreement - 0.5) < bound, (later, agreement)


@requires_cuda
def test_cuda_nan_bits_equal_cpu():
    for dtype, (unsigned, payloads) in NAN_BITS.items():
        signed = {np.uint16: np.int16, np.uint32: np.int32, np.uint64: np.int64}[unsigned]
        x = torch.from_numpy(np.array(payloads * 5, dtype=unsigned).view(signed).copy()).view(dtype)
        for rounding in ROUNDINGS:
            cpu = fxp.quantize_seeded(x, 8, 4, rounding, seed=1)
            gpu = fxp.quantize_seeded(x.cuda(), 8, 4, rounding, seed=1).cpu()
            np.testing.assert_array_equal(_raw(gpu), _raw(cpu))
            np.testing.assert_array_equal(_raw(cpu), _raw(x))


@requires_cuda
def test_cuda_graph_capture_draws_fresh_randoms_on_replay():
    x = torch.full((1 << 16,), 0.5 / 16, device="cuda")
    fxp.quantize(x, 8, 4, "stochastic")  # warm up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fxp.quantize(x, 8, 4, "stochastic")
    graph.replay()
    first = y.clone()
    graph.replay()
    assert not torch.equal(first, y)


@pytest.mark.skipif(os.environ.get("FXP_LARGE_TESTS") != "1", reason="set FXP_LARGE_TESTS=1 (needs ~9 GB)")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_64bit_indexing(device):
    n = 2**31 + 12
    x = torch.full((n,), 0.5 / 16, dtype=torch.float16, device=device)
    y = fxp.quantize_seeded(x, 8, 4, "stochastic", seed=5, offset=1)
    tail = codes(y[-40:].cpu(), 4).numpy()
    expect = [1.0 if philox_word(5, 1, i) < 2**31 else 0.0 for i in range(n - 40, n)]
    np.testing.assert_array_equal(tail, expect)


# --- every CPU build gives the same bits ---------------------------------------
_CAPABILITY_SCRIPT = r"""
import sys, torch, fxp
torch.manual_seed(0)
outs = []
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    x = (torch.randn(10_007, dtype=torch.float64) * 30).to(dtype)
    x[::97] = float("nan"); x[1::97] = float("inf"); x[2::97] = -float("inf")
    for rounding in ("nearest_even", "stochastic", "floor", "nearest_away"):
        for overflow in ("saturate", "wrap"):
            for b, f in ((8, 3), (16, 10), (32, 24)):
                y, c = fxp.quantize_seeded_stats(x, b, f, rounding, seed=-3, offset=7, overflow=overflow)
                _, m = fxp.quantize_mask(x, b, f, rounding, overflow, torch.Generator().manual_seed(1))
                outs += [y.view(torch.uint8), c.view(1).view(torch.uint8), m.view(torch.uint8)]
                # pack and unpack (Note [Codes in float32]); NaN is an error there
                codes = fxp.pack_seeded(x.nan_to_num(0.0, float("inf"), -float("inf")), b, f, rounding, seed=-3,
                                        offset=7, overflow=overflow)
                outs += [codes.view(torch.uint8), fxp.unpack(codes, b, f, dtype=dtype).view(torch.uint8)]
# wrap at large magnitudes (Note [Wrap without fmod]; the default build emulates rint)
for dtype in (torch.float32, torch.float64):
    big = torch.ldexp(torch.rand(4096, dtype=torch.float64) + 1, torch.randint(0, 127, (4096,)))
    big = (big * torch.where(torch.rand(4096) < 0.5, -1.0, 1.0).double()).to(dtype).floor()
    for b in (3, 8, 17, 25, 32):
        outs += [fxp.quantize(big, b, 0, "floor", "wrap").view(torch.uint8), fxp.pack(big, b, 0, "floor", "wrap").view(torch.uint8)]
for dtype in (torch.float32, torch.float64):
    for rounding in ("nearest_even", "stochastic"):
        for form, momentum in (("standard", 0.9), ("paper_eq6", 0.9), ("standard", 0.0)):
            w = [fxp.quantize(torch.randn(n, dtype=dtype), 12, 8) for n in (5000, 37)]
            g = [torch.randn_like(t) for t in w]
            v = [torch.randn_like(t) * 0.1 for t in w] if momentum else []
            c = torch.ops.fxp.qpu_sgd_step_(w, g, v, 0.05, momentum, 1e-3, False, 12, 8, 10, 8, rounding, 9, 4, form)
            outs += [t.view(torch.uint8) for t in w + v] + [c.view(torch.uint8)]
# The QPU step on packed codes of every storage width, with nesterov, ties and saturation.
for rounding in ("nearest_even", "stochastic"):
    for form, momentum, nesterov in (("standard", 0.9, True), ("standard", 0.9, False), ("paper_eq6", 0.9, False)):
        for b, f in ((4, 2), (8, 5), (12, 8), (16, 12), (26, 20), (32, 28)):
            dtype = torch.int8 if b <= 8 else torch.int16 if b <= 16 else torch.int32
            w = [torch.randint(-(1 << (b - 1)), 1 << (b - 1), (n,)).to(dtype) for n in (5000, 37)]
            v = [torch.randint(-(1 << (b - 1)), 1 << (b - 1), (n,)).to(dtype) for n in (5000, 37)]
            g = [torch.randn(n) * 2.0 ** (8 - f) for n in (5000, 37)]
            g[0][::9] = 2.0 ** (2 - f)  # exact ties at lr 0.125
            c = torch.ops.fxp.qpu_sgd_step_(w, g, v, 0.125, momentum, 1e-3, nesterov, b, f, b, f - 1, rounding, 9,
                                            4, form)
            outs += [t.view(torch.uint8) for t in w + v] + [c.view(torch.uint8)]
torch.save(torch.cat([o.flatten() for o in outs]), sys.argv[1])
"""


def test_every_cpu_build_gives_the_same_bits(tmp_path):
    """The default (SSE2), AVX2 and AVX-512 builds of the CPU kernels, forced with
    FXP_CPU_CAPABILITY, agree bit for bit: quantize, pack and unpack on every
    dtype, rounding and overflow, and the QPU step on every form, on float and
    packed storage."""
    import subprocess
    import sys

    results = {}
    for cap in ("default", "avx2", "avx512"):
        path = tmp_path / f"{cap}.pt"
        env = dict(os.environ, FXP_CPU_CAPABILITY=cap)
        proc = subprocess.run([sys.executable, "-c", _CAPABILITY_SCRIPT, str(path)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 and "is not available" in proc.stderr:
            continue  # this CPU lacks it
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[cap] = torch.load(path)
    assert "default" in results
    if len(results) < 2:
        pytest.skip("this CPU has only the default build; nothing to compare it with")
    for cap, bits in results.items():
        assert torch.equal(bits, results["default"]), f"{cap} differs from default"


def test_docstring_examples():
    import doctest

    import fxp.format
    import fxp.ops

    for module in (fxp.ops, fxp.format):
        result = doctest.testmod(module, extraglobs={"torch": torch}, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__
