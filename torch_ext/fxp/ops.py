"""Typed wrappers over ``torch.ops.fxp.*``. See docs/design.md for the exact semantics."""

from __future__ import annotations

from typing import Literal, Optional, Tuple, Union

import torch
from torch import Tensor

from .format import FxpFormat

Rounding = Literal["nearest_even", "stochastic", "floor", "nearest_away"]
Overflow = Literal["saturate", "wrap"]
FormatLike = Union[FxpFormat, int]

_ops = torch.ops.fxp


def _bits(fmt: FormatLike, frac_bits: Optional[int]) -> Tuple[int, int]:
    if isinstance(fmt, FxpFormat):
        if frac_bits is not None:
            raise TypeError("fxp: pass either an FxpFormat or total_bits and frac_bits, not both")
        return fmt.total_bits, fmt.frac_bits
    if frac_bits is None:
        raise TypeError("fxp: frac_bits is required when the format is given as total_bits")
    return int(fmt), int(frac_bits)


def quantize(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Rounds ``x`` onto the grid of FxP(total_bits, frac_bits).

    ``fmt`` is an :class:`FxpFormat` or ``total_bits`` (then ``frac_bits`` follows).
    ``rounding`` is ``nearest_even`` (ties to the even code), ``stochastic``
    (up with probability equal to the fractional part, unbiased), ``floor`` or
    ``nearest_away``. Out-of-range values ``saturate`` (clamp) or ``wrap``
    (two's complement). NaN stays NaN; +-Inf saturates. Stochastic rounding
    draws a fresh Philox key (CPU) or counter offset (CUDA) from ``generator``
    or the default generator. The result is contiguous, with the dtype of x.

    >>> quantize(torch.tensor([0.03125, 0.09375, 100.0]), 8, 4)
    tensor([0.0000, 0.1250, 7.9375])
    """
    b, f = _bits(fmt, frac_bits)
    if out is not None:
        _ops.quantize.out(x, b, f, rounding, overflow, generator, out=out)
        return out
    return _ops.quantize(x, b, f, rounding, overflow, generator)


def quantize_(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """In-place :func:`quantize`; returns ``x``."""
    b, f = _bits(fmt, frac_bits)
    _ops.quantize_(x, b, f, rounding, overflow, generator)
    return x


def quantize_seeded(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "stochastic",
    *,
    seed: int,
    offset: int = 0,
    overflow: Overflow = "saturate",
    out: Optional[Tensor] = None,
) -> Tensor:
    """:func:`quantize` with an explicit Philox4x32-10 counter.

    Element ``i`` of ``x`` (logical row-major order) uses lane ``i % 4`` of the
    Philox block with key ``seed`` and counter ``(offset, i // 4)``. The same
    ``(seed, offset)`` gives the same bits on CPU and CUDA, for any strides or
    thread count; different offsets give independent streams.
    """
    b, f = _bits(fmt, frac_bits)
    if out is not None:
        _ops.quantize_seeded.out(x, b, f, rounding, seed, offset, overflow, out=out)
        return out
    return _ops.quantize_seeded(x, b, f, rounding, seed, offset, overflow)


def quantize_seeded_(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "stochastic",
    *,
    seed: int,
    offset: int = 0,
    overflow: Overflow = "saturate",
) -> Tensor:
    """In-place :func:`quantize_seeded`; returns ``x``."""
    b, f = _bits(fmt, frac_bits)
    _ops.quantize_seeded_(x, b, f, rounding, seed, offset, overflow)
    return x


def quantize_stats(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`quantize` that also returns, from the same pass, the number of
    saturated elements (rounded code outside the format's range) as an int64
    0-dim tensor on x's device."""
    b, f = _bits(fmt, frac_bits)
    return _ops.quantize_stats(x, b, f, rounding, overflow, generator)


def quantize_seeded_stats(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "stochastic",
    *,
    seed: int,
    offset: int = 0,
    overflow: Overflow = "saturate",
) -> Tuple[Tensor, Tensor]:
    """:func:`quantize_seeded` plus the saturation count, as :func:`quantize_stats`."""
    b, f = _bits(fmt, frac_bits)
    return _ops.quantize_seeded_stats(x, b, f, rounding, seed, offset, overflow)


def quantize_mask(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`quantize` plus a bool tensor that is True where the element saturated."""
    b, f = _bits(fmt, frac_bits)
    return _ops.quantize_mask(x, b, f, rounding, overflow, generator)


def quantize_ste(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
    zero_grad_saturated: bool = False,
) -> Tensor:
    """:func:`quantize` with a straight-through gradient: the incoming gradient
    passes unchanged, or is zeroed where the element saturated when
    ``zero_grad_saturated`` is set. The gradient is registered in C++, so
    LibTorch programs get it too."""
    b, f = _bits(fmt, frac_bits)
    return _ops.quantize_ste(x, b, f, rounding, overflow, generator, zero_grad_saturated)
