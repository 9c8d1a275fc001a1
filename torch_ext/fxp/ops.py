"""Typed wrappers over ``torch.ops.fxp.*``. See docs/design.md for the exact semantics."""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Tuple, Union

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


def pack(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Rounds ``x`` like :func:`quantize` and returns the integer codes ``q``
    (value ``q * 2**-F``) in the smallest integer dtype that holds them: int8
    for B <= 8, int16 for B <= 16, int32 otherwise. Codes saturate to the
    format's exact bounds. NaN cannot be a code: packing NaN raises
    ``ValueError`` with the count.

    >>> pack(torch.tensor([0.09375, 100.0, -3.0]), 8, 4)
    tensor([  2, 127, -48], dtype=torch.int8)
    """
    b, f = _bits(fmt, frac_bits)
    return _ops.pack(x, b, f, rounding, overflow, generator)


def pack_seeded(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "stochastic",
    *,
    seed: int,
    offset: int = 0,
    overflow: Overflow = "saturate",
) -> Tensor:
    """:func:`pack` with the explicit Philox counter of :func:`quantize_seeded`."""
    b, f = _bits(fmt, frac_bits)
    return _ops.pack_seeded(x, b, f, rounding, seed, offset, overflow)


def unpack(codes: Tensor, fmt: FormatLike, frac_bits: Optional[int] = None,
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """``codes * 2**-F`` as ``dtype`` (default float32), computed exactly and
    rounded once. ``codes`` must have the dtype :func:`pack` gives the format."""
    b, f = _bits(fmt, frac_bits)
    return _ops.unpack(codes, b, f, dtype)


def _format_list(fmt: Optional[FxpFormat]) -> Optional[list]:
    return None if fmt is None else [fmt.total_bits, fmt.frac_bits]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, input_format: Optional[FxpFormat] = None,
           weight_codes: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
           param_format: Optional[FxpFormat] = None, output_format: Optional[FxpFormat] = None,
           output_rounding: Rounding = "nearest_even", generator: Optional[torch.Generator] = None) -> Tensor:
    """``torch.nn.functional.linear`` for quantized layers, with packed storage.

    With ``input_format``, autograd saves ``x`` as codes of that format (``x``
    must lie on its grid, as a quantized activation does). With
    ``weight_codes``/``bias_codes`` (codes of ``param_format``), the weight and
    bias values come from the codes; ``weight``/``bias`` then only give shape
    and dtype and receive the gradients. With ``output_format``, the output is
    quantized in place (saturating, ``output_rounding``, draws from
    ``generator``) with a straight-through gradient: ``quantize_ste`` without
    the extra copy. The gradients equal those of ``F.linear`` bit for bit
    (2-D inputs)."""
    return _ops.linear(x, weight, bias, _format_list(input_format), weight_codes, bias_codes,
                       _format_list(param_format), _format_list(output_format), output_rounding, generator)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1, *,
           input_format: Optional[FxpFormat] = None, weight_codes: Optional[Tensor] = None,
           bias_codes: Optional[Tensor] = None, param_format: Optional[FxpFormat] = None,
           output_format: Optional[FxpFormat] = None, output_rounding: Rounding = "nearest_even",
           generator: Optional[torch.Generator] = None) -> Tensor:
    """``torch.conv2d`` with the packed storage and output options of
    :func:`linear`; the gradients equal ``torch.conv2d``'s bit for bit."""
    return _ops.conv2d(x, weight, bias, list(stride), list(padding), list(dilation), groups,
                       _format_list(input_format), weight_codes, bias_codes, _format_list(param_format),
                       _format_list(output_format), output_rounding, generator)


def relu_max_pool2d(x: Tensor, kernel_size: Union[int, Sequence[int]] = 2) -> Tensor:
    """``F.max_pool2d(F.relu(x), kernel_size)`` (stride = kernel size) whose
    autograd saves one byte per output (the window position of the maximum,
    or that it was not positive) instead of ReLU's float output and the
    pool's int64 indices. Values and gradients equal torch's bit for bit."""
    k = [kernel_size, kernel_size] if isinstance(kernel_size, int) else list(kernel_size)
    return _ops.relu_max_pool2d(x, k)
