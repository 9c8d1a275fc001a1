"""Straightforward reference implementations the tests compare against."""

from __future__ import annotations

import numpy as np

M0, M1 = 0xD2511F53, 0xCD9E8D57
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK32 = 0xFFFFFFFF


def philox4x32_10(seed: int, offset: int, block: int) -> list[int]:
    """Philox4x32-10 with key seed and counter (offset, block), in plain Python integers."""
    c = [offset & MASK32, (offset >> 32) & MASK32, block & MASK32, (block >> 32) & MASK32]
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for r in range(10):
        p0, p1 = M0 * c[0], M1 * c[2]
        c = [((p1 >> 32) ^ c[1] ^ k0) & MASK32, p1 & MASK32, ((p0 >> 32) ^ c[3] ^ k1) & MASK32, p0 & MASK32]
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c


def philox_word(seed: int, offset: int, index: int) -> int:
    """The 32-bit draw of element ``index``: lane index % 4 of block index // 4."""
    return philox4x32_10(seed % (1 << 64), offset, index // 4)[index % 4]


def quantize_nearest_even(x: np.ndarray, total_bits: int, frac_bits: int, overflow: str = "saturate") -> np.ndarray:
    """float64 reference: np.rint rounds half to even; x * 2**F is exact in float64."""
    codes = np.rint(np.asarray(x, dtype=np.float64) * 2.0**frac_bits)
    return codes_to_values(codes, total_bits, frac_bits, overflow)


def codes_to_values(codes: np.ndarray, total_bits: int, frac_bits: int, overflow: str) -> np.ndarray:
    lo, hi = -(2 ** (total_bits - 1)), 2 ** (total_bits - 1) - 1
    if overflow == "saturate":
        codes = np.clip(codes, lo, hi)
    else:
        finite = np.isfinite(codes)
        wrapped = np.mod(np.where(finite, codes, 0) - lo, 2.0**total_bits) + lo
        codes = np.where(finite, wrapped, np.clip(codes, lo, hi))
    return codes * 2.0**-frac_bits
