"""fxp::pack_bits and fxp::unpack_bits (Note [Bit-packed codes],
kernels/bit_pack/bit_pack_kernel.h): the exact byte layout against references
built independently of the kernels, exact round trips at every width, the
errors, opcheck, and CUDA == CPU bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fxp
from fxp.ops import pack_bits, unpack_bits

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

ALL_BITS = range(1, 17)
LENGTHS = (1, 7, 9, 13, 1001)  # none of them fills the last byte at every width


def code_range(bits: int, is_signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if is_signed else (0, (1 << bits) - 1)


def python_stream(codes: list[int], bits: int) -> bytes:
    """The layout written out bit by bit: code i's bit t is stream bit
    i * bits + t, and stream bit j is bit j % 8 of byte j // 8."""
    out = bytearray((len(codes) * bits + 7) // 8)
    for i, code in enumerate(codes):
        pattern = code % (1 << bits)  # the bits-bit two's complement
        for t in range(bits):
            j = i * bits + t
            out[j // 8] |= ((pattern >> t) & 1) << (j % 8)
    return bytes(out)


def numpy_stream(codes: np.ndarray, bits: int) -> np.ndarray:
    """The same layout, vectorized, for long inputs."""
    codes = codes.astype(np.int64)
    stream = ((codes[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(stream, bitorder="little")


def random_codes(n: int, bits: int, is_signed: bool, seed: int = 0, dtype=torch.int64) -> torch.Tensor:
    """n codes with both extremes of the range (when n >= 2)."""
    lo, hi = code_range(bits, is_signed)
    gen = torch.Generator().manual_seed(seed * 1000 + bits * 2 + is_signed)
    codes = torch.randint(lo, hi + 1, (n,), generator=gen, dtype=torch.int64)
    codes[0] = lo
    if n > 1:
        codes[-1] = hi
    return codes.to(dtype)


def default_dtype(bits: int, is_signed: bool) -> torch.dtype:
    lo, hi = code_range(bits, is_signed)
    return next(t for t in (torch.int8, torch.int16, torch.int32) if torch.iinfo(t).min <= lo and hi <= torch.iinfo(t).max)


# --- the layout --------------------------------------------------------------------------

@pytest.mark.parametrize("codes, bits, is_signed, expected", [
    # 1 = 001, -1 = 111, 2 = 010, -4 = 100 (t = 0 first): stream 100 111 01|0 001,
    # byte 0 = 0b10111001, byte 1 = 0b00001000.
    ([1, -1, 2], 3, True, [0xB9, 0x00]),
    ([1, -1, 2, -4], 3, True, [0xB9, 0x08]),
    ([-1, -1, -1], 3, True, [0xFF, 0x01]),  # the last byte's unused high bits are 0
    ([1, 0, 1, 1, 0, 0, 0, 0, 1], 1, False, [0x0D, 0x01]),
    ([-1, 0, -1], 1, True, [0x05]),
    ([0x1, 0xF, 0x3], 4, False, [0xF1, 0x03]),
    ([-8, 7], 4, True, [0x78]),
    ([0xABC, 0x123], 12, False, [0xBC, 0x3A, 0x12]),
    ([0x1F, 0x00, 0x15], 5, False, [0x1F, 0x54]),
    ([255, 0, 128], 8, False, [0xFF, 0x00, 0x80]),
    ([-128, 127, -1], 8, True, [0x80, 0x7F, 0xFF]),
    ([-2, 0x1234], 16, True, [0xFE, 0xFF, 0x34, 0x12]),
    ([0xFFFF, 0x8001], 16, False, [0xFF, 0xFF, 0x01, 0x80]),
    ([-1], 9, True, [0xFF, 0x01]),
])
def test_hand_computed_bytes(codes, bits, is_signed, expected):
    packed = pack_bits(torch.tensor(codes), bits, is_signed)
    assert packed.dtype == torch.uint8 and packed.shape == (len(expected),)
    assert packed.tolist() == expected
    assert python_stream(codes, bits) == bytes(expected)  # the reference agrees with the hand
    assert unpack_bits(packed, bits, [len(codes)], is_signed).tolist() == codes


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("is_signed", [True, False])
def test_bytes_equal_the_bit_by_bit_reference(bits, is_signed):
    for n in (1, 2, 3, 7, 8, 9, 13, 17, 101):
        codes = random_codes(n, bits, is_signed, seed=n)
        assert bytes(pack_bits(codes, bits, is_signed).tolist()) == python_stream(codes.tolist(), bits), n


@pytest.mark.parametrize("bits", [1, 3, 5, 7, 8, 11, 13, 16])
def test_long_inputs_equal_the_vectorized_reference(bits):
    # Long enough for several parallel tasks; 300001 fills no last byte at odd widths.
    for is_signed in (True, False):
        codes = random_codes(300001, bits, is_signed, seed=7)
        packed = pack_bits(codes, bits, is_signed)
        assert np.array_equal(packed.numpy(), numpy_stream(codes.numpy(), bits))
        # unchecked, the whole groups skip the count (a pass of its own) and pack alike
        assert torch.equal(pack_bits(codes, bits, is_signed, check_range=False), packed)
        assert torch.equal(unpack_bits(packed, bits, codes.shape, is_signed, torch.int64), codes)


# --- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("is_signed", [True, False])
def test_round_trip_is_exact(bits, is_signed):
    lo, hi = code_range(bits, is_signed)
    every = torch.arange(lo, hi + 1)
    for codes in [random_codes(n, bits, is_signed, seed=n) for n in LENGTHS] + [every, every.flip(0)]:
        n = codes.numel()
        packed = pack_bits(codes, bits, is_signed)
        assert packed.dtype == torch.uint8 and packed.shape == ((n * bits + 7) // 8,)
        out = unpack_bits(packed, bits, [n], is_signed)
        assert out.dtype == default_dtype(bits, is_signed) and out.is_contiguous()
        assert torch.equal(out.long(), codes), n


@pytest.mark.parametrize("bits", ALL_BITS)
def test_unpack_at_every_length_around_the_whole_word_loads(bits):
    """Note [Unpacking with whole-word loads]: groups load 16 bytes at once
    unless those would pass the tensor's end. Every length from 1 to 80 codes
    (packed tensors of 1 to 160 bytes) puts that boundary at every group, and
    the input is a view into a longer buffer of 0xFF bytes. (A load past the
    end would not change the codes: the sanitizer run of the C++ test
    BitPack.UnpacksEveryLengthWithinThePackedBytes catches that.)"""
    for is_signed in (True, False):
        for n in range(1, 81):
            codes = random_codes(n, bits, is_signed, seed=n)
            packed = pack_bits(codes, bits, is_signed)
            padded = torch.full((packed.numel() + 32,), 0xFF, dtype=torch.uint8)
            padded[: packed.numel()] = packed
            assert torch.equal(unpack_bits(padded[: packed.numel()], bits, [n], is_signed, torch.int64), codes), n


def test_codes_of_a_type_narrower_than_the_range_are_counted_right():
    """The whole-group path tests the range in the codes' own type, clamped to
    it: int8 codes at 12 bits and uint8 codes at 3 signed bits, 8 codes or more
    (whole groups), give the reference bytes and count exactly the codes outside."""
    int8_codes = torch.tensor([-128, -1, 0, 1, 127, 100, -100, 5] * 3, dtype=torch.int8)
    packed = pack_bits(int8_codes, 12)  # all inside [-2048, 2047]
    assert np.array_equal(packed.numpy(), numpy_stream(int8_codes.numpy().astype(np.int64), 12))
    assert torch.equal(unpack_bits(packed, 12, [24], dtype=torch.int64), int8_codes.long())
    uint8_codes = torch.tensor([0, 1, 2, 3, 4, 200, 255, 3] * 2, dtype=torch.uint8)  # 4, 200, 255 outside [-4, 3]
    with pytest.raises(RuntimeError, match="6 codes lie outside"):
        pack_bits(uint8_codes, 3)
    inside = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0] * 2, dtype=torch.uint8)
    assert np.array_equal(pack_bits(inside, 3).numpy(), numpy_stream(inside.numpy().astype(np.int64), 3))


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8])
def test_every_code_dtype_gives_the_same_bytes(dtype):
    for bits, is_signed in ((3, True), (7, False), (8, False), (8, True), (1, False)):
        lo, hi = code_range(bits, is_signed)
        if lo < torch.iinfo(dtype).min or hi > torch.iinfo(dtype).max:
            continue
        codes = random_codes(1001, bits, is_signed, seed=3)
        assert torch.equal(pack_bits(codes.to(dtype), bits, is_signed), pack_bits(codes, bits, is_signed))


def test_default_and_explicit_dtypes():
    assert [default_dtype(b, True) for b in (1, 8, 9, 16)] == [torch.int8, torch.int8, torch.int16, torch.int16]
    assert [default_dtype(b, False) for b in (7, 8, 15, 16)] == [torch.int8, torch.int16, torch.int16, torch.int32]
    for bits in ALL_BITS:
        for is_signed in (True, False):
            packed = pack_bits(torch.tensor(list(code_range(bits, is_signed))), bits, is_signed)
            assert unpack_bits(packed, bits, [2], is_signed).dtype == default_dtype(bits, is_signed)
    codes = torch.tensor([0, 255, 17])
    packed = pack_bits(codes, 8, is_signed=False)
    for dtype in (torch.uint8, torch.int16, torch.int32, torch.int64):
        out = unpack_bits(packed, 8, [3], is_signed=False, dtype=dtype)
        assert out.dtype == dtype and out.tolist() == [0, 255, 17]
    signed = pack_bits(torch.tensor([-2, 1]), 2)
    assert unpack_bits(signed, 2, [2], dtype=torch.int64).tolist() == [-2, 1]


def test_shapes_non_contiguous_and_empty():
    codes = random_codes(7 * 11 * 3, 5, True, seed=5).reshape(7, 11, 3)
    packed = pack_bits(codes, 5)
    assert torch.equal(unpack_bits(packed, 5, codes.shape).long(), codes)
    assert torch.equal(unpack_bits(packed, 5, (21, 11)).long(), codes.reshape(21, 11))
    # Non-contiguous codes are packed in row-major order.
    view = codes.transpose(0, 2)[:, ::2]
    assert not view.is_contiguous()
    assert torch.equal(pack_bits(view, 5), pack_bits(view.contiguous(), 5))
    assert torch.equal(unpack_bits(pack_bits(view, 5), 5, view.shape).long(), view)
    # A non-contiguous packed tensor (every other byte of a longer one).
    wide = torch.zeros(2 * packed.numel(), dtype=torch.uint8)
    wide[::2] = packed
    assert torch.equal(unpack_bits(wide[::2], 5, codes.shape).long(), codes)
    # A 0-dim tensor is one code.
    assert pack_bits(torch.tensor(-3), 4).tolist() == [0x0D]
    scalar = unpack_bits(torch.tensor([0x0D], dtype=torch.uint8), 4, [])
    assert scalar.shape == () and int(scalar) == -3
    # Empty.
    for bits in (1, 7, 16):
        empty = pack_bits(torch.empty(0, 4, dtype=torch.int16), bits)
        assert empty.dtype == torch.uint8 and empty.shape == (0,)
        out = unpack_bits(empty, bits, [3, 0, 2])
        assert out.shape == (3, 0, 2) and out.dtype == default_dtype(bits, True)


def test_meta_gives_shapes_only():
    codes = torch.empty(3, 13, dtype=torch.int16, device="meta")
    packed = pack_bits(codes, 11)
    assert packed.device.type == "meta" and packed.dtype == torch.uint8 and packed.shape == ((39 * 11 + 7) // 8,)
    out = unpack_bits(packed, 11, [39], is_signed=False)
    assert out.device.type == "meta" and out.shape == (39,) and out.dtype == torch.int16
    with pytest.raises(RuntimeError, match="take 54 bytes, but packed has 53"):
        unpack_bits(torch.empty(53, dtype=torch.uint8, device="meta"), 11, [39])


# --- errors ------------------------------------------------------------------------------

def test_out_of_range_codes_are_counted():
    with pytest.raises(RuntimeError, match=r"fxp::pack_bits: 3 codes lie outside \[-4, 3\], the range of 3-bit "
                                           r"signed codes"):
        pack_bits(torch.tensor([4, -5, 3, -4, 100, 0]), 3)
    with pytest.raises(RuntimeError, match=r"2 codes lie outside \[0, 7\], the range of 3-bit unsigned codes"):
        pack_bits(torch.tensor([-1, 8, 7, 0], dtype=torch.int8), 3, is_signed=False)
    with pytest.raises(RuntimeError, match=r"1 code lies outside \[-32768, 32767\], the range of 16-bit signed"):
        pack_bits(torch.tensor([32768, -32768]), 16)
    with pytest.raises(RuntimeError, match=r"1 code lies outside \[0, 65535\]"):
        pack_bits(torch.tensor([65536, 65535], dtype=torch.int32), 16, is_signed=False)
    with pytest.raises(RuntimeError, match=r"1 code lies outside \[-1, 0\], the range of 1-bit signed codes"):
        pack_bits(torch.tensor([0, -1, 1]), 1)
    with pytest.raises(RuntimeError, match=r"fxp::pack_bits: 1 code lies outside \[0, 127\]"):
        pack_bits(torch.tensor([200], dtype=torch.uint8), 7, is_signed=False)
    # Counted over a long tensor, across parallel tasks.
    codes = torch.zeros(100003, dtype=torch.int64)
    codes[::1000] = 9
    with pytest.raises(RuntimeError, match="101 codes lie outside"):
        pack_bits(codes, 4)


def test_bad_arguments_are_clear_errors():
    codes = torch.tensor([1, 2, 3])
    packed = pack_bits(codes, 3)
    for bits in (0, 17, -1):
        with pytest.raises(RuntimeError, match=rf"fxp::pack_bits: bits must be in \[1, 16\], but got {bits}"):
            pack_bits(codes, bits)
        with pytest.raises(RuntimeError, match=rf"fxp::unpack_bits: bits must be in \[1, 16\], but got {bits}"):
            unpack_bits(packed, bits, [3])
    for bad in (codes.float(), codes.double(), codes.bool()):
        with pytest.raises(RuntimeError, match="fxp::pack_bits: codes must be an integer tensor"):
            pack_bits(bad, 3)
    with pytest.raises(RuntimeError, match=r"fxp::unpack_bits: 10 codes of 3 bits \(size \[10\]\) take 4 bytes, "
                                           r"but packed has 2"):
        unpack_bits(packed, 3, [10])
    with pytest.raises(RuntimeError, match="take 2 bytes, but packed has 3"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 3, [2, 2])
    for bad in (packed.to(torch.int8), packed.to(torch.int32), packed.reshape(1, 2)):
        with pytest.raises(RuntimeError, match="fxp::unpack_bits: packed must be a 1-D uint8 tensor"):
            unpack_bits(bad, 3, [3])
    with pytest.raises(RuntimeError, match=r"dtype Char cannot hold every code of \[0, 255\], the range of 8-bit "
                                           r"unsigned codes"):
        unpack_bits(pack_bits(codes, 8, False), 8, [3], is_signed=False, dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"dtype Short cannot hold every code of \[0, 65535\]"):
        unpack_bits(pack_bits(codes, 16, False), 16, [3], is_signed=False, dtype=torch.int16)
    with pytest.raises(RuntimeError, match=r"dtype Char cannot hold every code of \[-256, 255\]"):
        unpack_bits(pack_bits(codes, 9), 9, [3], dtype=torch.int8)
    with pytest.raises(RuntimeError, match=r"dtype Byte cannot hold every code of \[-4, 3\]"):
        unpack_bits(packed, 3, [3], dtype=torch.uint8)
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(RuntimeError, match="fxp::unpack_bits: dtype must be an integer type"):
            unpack_bits(packed, 3, [3], dtype=dtype)
    with pytest.raises(RuntimeError, match="size must not have negative entries"):
        unpack_bits(packed, 3, [-3])
    with pytest.raises(RuntimeError, match="has too many elements"):
        unpack_bits(packed, 3, [1 << 40, 1 << 40])
    # Wrong Python types, before the dispatcher.
    with pytest.raises(TypeError, match="fxp.pack_bits: bits must be an int"):
        pack_bits(codes, 3.0)
    with pytest.raises(TypeError, match="fxp.pack_bits: is_signed must be a bool"):
        pack_bits(codes, 3, 1)
    with pytest.raises(TypeError, match="fxp.unpack_bits: size must be an int"):
        unpack_bits(packed, 3, [3.0])
    with pytest.raises(TypeError, match="fxp.unpack_bits: dtype must be a torch.dtype"):
        unpack_bits(packed, 3, [3], dtype="int8")


def test_not_differentiable_and_integer_only():
    # Integer tensors cannot require grad; the ops' outputs never do.
    assert not pack_bits(torch.tensor([1, 2]), 3).requires_grad
    with torch.enable_grad():
        assert not unpack_bits(pack_bits(torch.tensor([1, 2]), 3), 3, [2]).requires_grad


# --- opcheck and CUDA -------------------------------------------------------------------

def _opcheck(device):
    codes = random_codes(7 * 13, 5, True, seed=1).reshape(7, 13).to(device)
    for args in ((codes, 5), (codes, 5, True), (codes.to(torch.int8), 3 + 2), (codes.abs(), 7, False),
                 (codes.t(), 16), (codes[:0], 4)):
        torch.library.opcheck(torch.ops.fxp.pack_bits.default, args)
    packed = pack_bits(codes, 5)
    for args in ((packed, 5, [7, 13]), (packed, 5, [91], True, torch.int64), (packed, 5, [13, 7], False),
                 (packed[:0], 5, [0, 3])):
        torch.library.opcheck(torch.ops.fxp.unpack_bits.default, args)


def test_opcheck_cpu():
    _opcheck("cpu")


@requires_cuda
def test_opcheck_cuda():
    _opcheck("cuda")


@requires_cuda
@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("is_signed", [True, False])
def test_cuda_equals_cpu(bits, is_signed):
    for n in LENGTHS + (8, 100003, 1 << 20):
        codes = random_codes(n, bits, is_signed, seed=n)
        cpu = pack_bits(codes, bits, is_signed)
        cuda = pack_bits(codes.cuda(), bits, is_signed)
        assert cuda.device.type == "cuda" and torch.equal(cuda.cpu(), cpu), n
        out = unpack_bits(cuda, bits, [n], is_signed)
        assert out.device.type == "cuda" and torch.equal(out.cpu(), unpack_bits(cpu, bits, [n], is_signed)), n
        assert torch.equal(out.cpu().long(), codes), n
        # Any bytes unpack the same on both (including set unused high bits).
        noise = torch.randint(0, 256, cpu.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
        for dtype in (None, torch.int64):
            assert torch.equal(unpack_bits(noise.cuda(), bits, [n], is_signed, dtype).cpu(),
                               unpack_bits(noise, bits, [n], is_signed, dtype)), n


@requires_cuda
def test_cuda_inputs_errors_and_empty():
    codes = random_codes(1001, 6, True, seed=2)
    for dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        assert torch.equal(pack_bits(codes.to(dtype).cuda(), 6).cpu(), pack_bits(codes, 6))
    view = codes.reshape(13, 77).cuda().t()[::3]
    assert torch.equal(pack_bits(view, 6).cpu(), pack_bits(view.cpu(), 6))
    bad = torch.zeros(100003, dtype=torch.int64)
    bad[::1000] = -33
    with pytest.raises(RuntimeError, match=r"101 codes lie outside \[-32, 31\], the range of 6-bit signed codes"):
        pack_bits(bad.cuda(), 6)
    assert pack_bits(torch.empty(0, dtype=torch.int8, device="cuda"), 3).shape == (0,)
    assert unpack_bits(torch.empty(0, dtype=torch.uint8, device="cuda"), 3, [0, 2]).shape == (0, 2)


def test_wrappers_are_reachable_from_the_package():
    assert fxp.ops.pack_bits is pack_bits and fxp.ops.unpack_bits is unpack_bits
