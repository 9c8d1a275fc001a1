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


def philox_words(seed: int, offset: int, n: int) -> np.ndarray:
    """The draws of elements 0 .. n-1 (philox_word), as uint64 so that comparisons stay exact."""
    words = []
    for block in range((n + 3) // 4):
        words.extend(philox4x32_10(seed % (1 << 64), offset, block))
    return np.array(words[:n], dtype=np.uint64)


def split_exact(t: np.ndarray, total_bits: int):
    """Note [QPU code arithmetic]: t clamped to +-2^(B+1), then trunc(t) and the exact rest; NaN flagged."""
    nan = np.isnan(t)
    limit = 2.0 ** (total_bits + 1)
    c = np.clip(np.where(nan, t.dtype.type(0), t), -limit, limit).astype(t.dtype)
    whole = np.trunc(c)
    return whole.astype(np.int64), c - whole, nan


def below(bits: np.ndarray, frac: np.ndarray) -> np.ndarray:
    """[u < frac] with u = bits * 2^-32, decided exactly: frac * 2^32 is exact in float64."""
    return bits.astype(np.float64) < frac.astype(np.float64) * 2.0**32


def qpu_code_bounds(total_bits: int, float32_storage: bool) -> tuple[int, int]:
    half = 1 << (total_bits - 1)
    top = half - (1 << (total_bits - 25)) if float32_storage and total_bits > 25 else half - 1
    return -half, top


def qpu_reference_element_step(w, g, v, *, lr, momentum, wd, nesterov, fmt, mfmt, rounding, param_bits,
                               momentum_bits, form="standard", param_codes=False, momentum_codes=False):
    """One tensor of the QPU step, written from Note [QPU update on codes] in numpy
    scalars of the grads' float type T and Python-sized integers.

    w, v: numpy arrays of values (float storage, dtype T) or of integer codes
    (param_codes / momentum_codes). Returns the new (w, v) in the same form: NaN
    results are NaN in float storage and keep the old code in packed storage."""
    T = g.dtype.type
    F, Fm = fmt.frac_bits, mfmt.frac_bits
    scale, inv_scale, mscale, minv = T(2.0**F), T(2.0**-F), T(2.0**Fm), T(2.0**-Fm)
    f32 = g.dtype == np.float32
    lo, hi = qpu_code_bounds(fmt.total_bits, f32 and not param_codes)
    mlo, mhi = qpu_code_bounds(mfmt.total_bits, f32 and not momentum_codes)
    stochastic = rounding == "stochastic"
    lr, mu, wd = T(lr), T(momentum), T(wd)

    if param_codes:
        base, wfrac, wnan = w.astype(np.int64), np.zeros_like(g), np.zeros(g.shape, bool)
        wval = w.astype(np.int32).astype(g.dtype) * inv_scale
    else:
        wval = w
        base, wfrac, wnan = split_exact(w * scale, fmt.total_bits)
    has_v = v is not None
    vval = None if not has_v else (v.astype(np.int32).astype(g.dtype) * minv if momentum_codes else v)

    def rounding_step(part, candidate, bits):
        """Note [QPU rounding on codes]: 1 to move one code away from zero, by |part|."""
        m = np.abs(part)
        if stochastic:
            return below(bits, m).astype(np.int64)
        return ((m > 0.5) | ((m == 0.5) & (candidate % 2 == 1))).astype(np.int64)

    def round_value(whole, part, bits):
        return whole + np.where(part < 0, -1, 1) * rounding_step(part, whole, bits)

    grad = g + wd * wval
    mcode, mnan = None, np.zeros(g.shape, bool)
    if form == "paper_eq6":
        step = (mu * vval + grad) * lr if has_v else grad * lr
        whole, part, mnan = split_exact(step * mscale, mfmt.total_bits)
        mcode = np.clip(round_value(whole, part, momentum_bits), mlo, mhi)
        t = mcode.astype(np.int32).astype(g.dtype) * T(2.0 ** (F - Fm))
    else:
        d = grad
        if has_v:
            v_new = mu * vval + grad
            d = grad + mu * v_new if nesterov else v_new
            whole, part, mnan = split_exact(v_new * mscale, mfmt.total_bits)
            mcode = np.clip(round_value(whole, part, momentum_bits), mlo, mhi)
        step = lr * d
        t = step * scale
    if not param_codes:
        t = t - wfrac
    whole, part, tnan = split_exact(t, fmt.total_bits)
    a = base - whole
    code = a - np.where(part < 0, -1, 1) * rounding_step(part, a, param_bits)
    code = np.clip(code, lo, hi)
    pnan = tnan | wnan | (mnan if form == "paper_eq6" else False)

    def stored(new_codes, nan, old, codes_form, inv):
        if codes_form:
            return np.where(nan, old, new_codes).astype(old.dtype)
        return np.where(nan, np.nan, new_codes.astype(np.int32).astype(g.dtype) * inv).astype(g.dtype)

    new_w = stored(code, pnan, w, param_codes, inv_scale)
    new_v = None if not has_v else stored(mcode, mnan, v, momentum_codes, minv)
    return new_w, new_v
