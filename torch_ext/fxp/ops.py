"""Typed wrappers over ``torch.ops.fxp.*``. See docs/design.md for the exact semantics."""

from __future__ import annotations

import collections.abc
import numbers
from typing import Literal, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .format import FxpFormat

Rounding = Literal["nearest_even", "stochastic", "floor", "nearest_away"]
Overflow = Literal["saturate", "wrap"]
FormatLike = Union[FxpFormat, int]

_ops = torch.ops.fxp


# Note [Argument checks in Python]: the C++ ops check values (ranges, names,
# dtypes, devices); these checks catch the wrong *types* first, which the
# dispatcher would otherwise report as "failed to match any schema", or
# silently convert (int(8.7) == 8).
def _int(op: str, name: str, value, prefix: str = "fxp.") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{prefix}{op}: {name} must be an int, but got {value!r}")
    return int(value)


try:  # numpy is optional (torch does not need it); where it is, numpy.bool_ is a bool
    import numpy as _np

    _BOOLS: tuple = (bool, _np.bool_)
except ImportError:  # pragma: no cover
    _BOOLS = (bool,)


def _bool(op: str, name: str, value, prefix: str = "fxp.") -> bool:
    """A bool or numpy.bool_, as a Python bool: any other value is refused, a
    string ("no" is truthy) and 0 or 1 too."""
    if not isinstance(value, _BOOLS):
        raise TypeError(f"{prefix}{op}: {name} must be a bool, but got {value!r}")
    return bool(value)


# Note [64-bit Philox keys in Python]: a Philox key (seed) is a uint64 in C++,
# which the ops take as an int64 (a schema has no uint64) and read as its bits:
# the seed -1 is the key 2**64 - 1. Python takes either spelling, any int in
# [-2**63, 2**64), and passes the int64 with the same bits, so seed=2**64 - 1
# draws exactly what seed=-1 draws. The counter (offset) is a non-negative
# int64: 2**63 and above have no int64 to pass, so they are refused here (as
# negative ones are), before the dispatcher's "failed to match any schema".
def _seed(op: str, name: str, value, prefix: str = "fxp.") -> int:
    """A Philox key in [-2**63, 2**64), as the int64 with its bits."""
    value = _int(op, name, value, prefix)
    if not -(1 << 63) <= value < (1 << 64):
        raise ValueError(f"{prefix}{op}: {name} must be in [-2**63, 2**64) (a 64-bit Philox key; a negative "
                         f"seed s is the key 2**64 + s), but got {value}")
    return value - (1 << 64) if value >= (1 << 63) else value


def _offset(op: str, name: str, value, prefix: str = "fxp.") -> int:
    """A Philox counter: an int in [0, 2**63), the non-negative int64 the ops take."""
    value = _int(op, name, value, prefix)
    if not 0 <= value < (1 << 63):
        raise ValueError(f"{prefix}{op}: {name} must be in [0, 2**63) (the Philox counter is a non-negative "
                         f"int64), but got {value}")
    return value


def _number(op: str, name: str, value, prefix: str = "fxp.") -> float:
    """A real number: int or float, numpy's too (they register as ``numbers.Real``); not a bool or a str."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{prefix}{op}: {name} must be a number, but got {value!r}")
    return float(value)


def _tensor(op: str, name: str, value) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"fxp.{op}: {name} must be a torch.Tensor, but got {type(value).__name__}")
    return value


def _list(op: str, name: str, value, what: str) -> list:
    """An iterable of values (one per member: a list, a tuple, a range) as a list; a single value or a str
    is refused by name, not with Python's "object is not iterable"."""
    if isinstance(value, (str, bytes)) or not isinstance(value, collections.abc.Iterable):
        raise TypeError(f"fxp.{op}: {name} must be a list of {what}, but got {value!r}")
    return list(value)


def _optional_tensor(op: str, name: str, value) -> Optional[Tensor]:
    return None if value is None else _tensor(op, name, value)


def _str(op: str, name: str, value, prefix: str = "fxp.") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{prefix}{op}: {name} must be a str, but got {value!r}")
    return value


def _module(op: str, value, prefix: str = "fxp."):
    """An ``nn.Module`` (a model): anything else named, where ``model.modules()`` would say
    "'list' object has no attribute '_modules'"."""
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{prefix}{op}: model must be a torch.nn.Module, but got {type(value).__name__}")
    return value


def _generator(op: str, value) -> Optional[torch.Generator]:
    if value is not None and not isinstance(value, torch.Generator):
        raise TypeError(f"fxp.{op}: generator must be a torch.Generator or None, but got {type(value).__name__}")
    return value


def _bits(fmt: FormatLike, frac_bits: Optional[int], op: str = "quantize") -> Tuple[int, int]:
    if isinstance(fmt, FxpFormat):
        if frac_bits is not None:
            raise TypeError(f"fxp.{op}: pass either an FxpFormat or total_bits and frac_bits, not both")
        return fmt.total_bits, fmt.frac_bits
    if frac_bits is None:
        raise TypeError(f"fxp.{op}: the format is an FxpFormat, or total_bits and frac_bits as two arguments, "
                        f"but got {fmt!r} alone")
    return _int(op, "total_bits", fmt), _int(op, "frac_bits", frac_bits)


def _args(op: str, x, fmt, frac_bits, rounding, overflow) -> Tuple[Tensor, int, int, str, str]:
    """The checked common arguments of the quantize and pack wrappers."""
    b, f = _bits(fmt, frac_bits, op)
    return _tensor(op, "x", x), b, f, _str(op, "rounding", rounding), _str(op, "overflow", overflow)


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
    or the default generator of x's device. The result has the dtype of x and,
    as torch's elementwise ops give, the strides of a dense x (channels_last
    stays channels_last); the values never depend on the layout.

    >>> quantize(torch.tensor([0.03125, 0.09375, 100.0]), 8, 4)
    tensor([0.0000, 0.1250, 7.9375])
    """
    x, b, f, rounding, overflow = _args("quantize", x, fmt, frac_bits, rounding, overflow)
    generator = _generator("quantize", generator)
    if out is not None:
        _ops.quantize.out(x, b, f, rounding, overflow, generator, out=_tensor("quantize", "out", out))
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
    """In-place :func:`quantize`; returns ``x``. Not differentiable: in grad
    mode it refuses a leaf that requires grad, and bumps ``x``'s version, so a
    backward that needs the old values raises (as torch's in-place ops do)."""
    x, b, f, rounding, overflow = _args("quantize_", x, fmt, frac_bits, rounding, overflow)
    _ops.quantize_(x, b, f, rounding, overflow, _generator("quantize_", generator))
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
    x, b, f, rounding, overflow = _args("quantize_seeded", x, fmt, frac_bits, rounding, overflow)
    seed, offset = _seed("quantize_seeded", "seed", seed), _offset("quantize_seeded", "offset", offset)
    if out is not None:
        _ops.quantize_seeded.out(x, b, f, rounding, seed, offset, overflow, out=_tensor("quantize_seeded", "out", out))
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
    x, b, f, rounding, overflow = _args("quantize_seeded_", x, fmt, frac_bits, rounding, overflow)
    seed, offset = _seed("quantize_seeded_", "seed", seed), _offset("quantize_seeded_", "offset", offset)
    _ops.quantize_seeded_(x, b, f, rounding, seed, offset, overflow)
    return x


def quantize_members(
    x: Tensor,
    member_dim: int,
    formats: Sequence[FxpFormat],
    rounding: Union[Rounding, Sequence[Rounding]],
    *,
    seeds: Sequence[int],
    offsets: Union[int, Sequence[int]] = 0,
    overflow: Overflow = "saturate",
    straight_through: bool = False,
) -> Tensor:
    """Quantizes each member of a fleet (K runs trained as one) with its own format, rounding and Philox stream.

    Member ``m`` is ``x.select(member_dim, m)``; it is quantized exactly as
    ``quantize_seeded(x.select(member_dim, m), formats[m], rounding=rounding[m],
    seed=seeds[m], offset=offsets[m])`` would quantize it alone, so its bits do not
    depend on the other members or on where it sits (Note [Per-member quantization]).
    ``rounding`` and ``offsets`` may be one value for every member. With
    ``straight_through``, the gradient passes unchanged (as :func:`quantize_ste`'s).
    """
    op = "quantize_members"
    x, member_dim = _tensor(op, "x", x), _int(op, "member_dim", member_dim)
    formats = _list(op, "formats", formats, "FxpFormat, one per member")
    for m, fmt in enumerate(formats):
        if not isinstance(fmt, FxpFormat):
            raise TypeError(f"fxp.{op}: formats[{m}] must be an FxpFormat, but got {fmt!r}")
    members = len(formats)
    roundings = ([rounding] * members if isinstance(rounding, str) else
                 [_str(op, f"rounding[{m}]", r) for m, r in enumerate(_list(op, "rounding", rounding,
                                                                             "str, one per member, or one str"))])
    offsets = ([offsets] * members if isinstance(offsets, numbers.Integral) and not isinstance(offsets, bool) else
               _list(op, "offsets", offsets, "int, one per member, or one int"))
    seeds = _list(op, "seeds", seeds, "int, one per member")
    kernel = _ops.quantize_members_ste if _bool(op, "straight_through", straight_through) else _ops.quantize_members
    return kernel(x, member_dim, [f.total_bits for f in formats], [f.frac_bits for f in formats], roundings,
                  [_seed(op, f"seeds[{m}]", s) for m, s in enumerate(seeds)],
                  [_offset(op, f"offsets[{m}]", o) for m, o in enumerate(offsets)],
                  _str(op, "overflow", overflow))


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
    x, b, f, rounding, overflow = _args("quantize_stats", x, fmt, frac_bits, rounding, overflow)
    return _ops.quantize_stats(x, b, f, rounding, overflow, _generator("quantize_stats", generator))


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
    x, b, f, rounding, overflow = _args("quantize_seeded_stats", x, fmt, frac_bits, rounding, overflow)
    seed, offset = _seed("quantize_seeded_stats", "seed", seed), _offset("quantize_seeded_stats", "offset", offset)
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
    x, b, f, rounding, overflow = _args("quantize_mask", x, fmt, frac_bits, rounding, overflow)
    return _ops.quantize_mask(x, b, f, rounding, overflow, _generator("quantize_mask", generator))


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
    x, b, f, rounding, overflow = _args("quantize_ste", x, fmt, frac_bits, rounding, overflow)
    return _ops.quantize_ste(x, b, f, rounding, overflow, _generator("quantize_ste", generator),
                             _bool("quantize_ste", "zero_grad_saturated", zero_grad_saturated))


def pack(
    x: Tensor,
    fmt: FormatLike,
    frac_bits: Optional[int] = None,
    rounding: Rounding = "nearest_even",
    overflow: Overflow = "saturate",
    generator: Optional[torch.Generator] = None,
    *,
    counts: Optional[Tensor] = None,
) -> Tensor:
    """Rounds ``x`` like :func:`quantize` and returns the integer codes ``q``
    (value ``q * 2**-F``) in the smallest integer dtype that holds them: int8
    for B <= 8, int16 for B <= 16, int32 otherwise. Codes saturate to the
    format's exact bounds. NaN cannot be a code: packing NaN raises
    ``ValueError`` with the count (the code is 0). ``rounding="exact"`` is for
    values that are on the grid already (quantized activations, parameters):
    anything that would be rounded or saturated raises ``ValueError`` with the count.

    With ``counts`` (a contiguous int64 tensor of shape ``[2]`` on ``x``'s
    device), nothing raises and nothing is read back to the host: the NaN
    and off-grid elements are added to ``counts[0]`` and ``counts[1]``, for
    the caller to check where it synchronizes anyway (on CUDA the check costs
    a device-to-host read per call; this form can also be captured in a CUDA graph).

    >>> pack(torch.tensor([0.09375, 100.0, -3.0]), 8, 4)
    tensor([  2, 127, -48], dtype=torch.int8)
    """
    x, b, f, rounding, overflow = _args("pack", x, fmt, frac_bits, rounding, overflow)
    args = (x, b, f, rounding, overflow, _generator("pack", generator))
    return _ops.pack(*args) if counts is None else _ops.pack.counted(*args, counts=_tensor("pack", "counts", counts))


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
    x, b, f, rounding, overflow = _args("pack_seeded", x, fmt, frac_bits, rounding, overflow)
    seed, offset = _seed("pack_seeded", "seed", seed), _offset("pack_seeded", "offset", offset)
    return _ops.pack_seeded(x, b, f, rounding, seed, offset, overflow)


def unpack(codes: Tensor, fmt: FormatLike, frac_bits: Optional[int] = None,
           dtype: Optional[torch.dtype] = None) -> Tensor:
    """``codes * 2**-F`` as ``dtype`` (default float32), computed exactly and
    rounded once (to nearest even, also for float16 and bfloat16). ``codes``
    must have the dtype :func:`pack` gives the format, and lie in its range
    (checked on the CPU; on CUDA a check would cost a device-to-host copy)."""
    b, f = _bits(fmt, frac_bits, "unpack")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"fxp.unpack: dtype must be a torch.dtype or None, but got {dtype!r}")
    return _ops.unpack(_tensor("unpack", "codes", codes), b, f, dtype)


def pack_bits(codes: Tensor, bits: int, is_signed: bool = True, check_range: bool = True) -> Tensor:
    """Packs integer ``codes`` of ``bits`` bits each (1 to 16) into a 1-D
    uint8 tensor of ``ceil(codes.numel() * bits / 8)`` bytes (Note [Bit-packed
    codes], kernels/bit_pack/bit_pack_kernel.h): code ``i`` (row-major order)
    takes bits ``[i * bits, (i + 1) * bits)`` of a little-endian bit stream,
    whose bit ``j`` is bit ``j % 8`` of byte ``j // 8``; the last byte's unused
    high bits are 0. With ``is_signed`` the codes are stored in ``bits``-bit
    two's complement and must lie in ``[-2**(bits-1), 2**(bits-1) - 1]``,
    else in ``[0, 2**bits - 1]``; a code outside raises ``RuntimeError`` with
    the count. ``check_range=False`` is for codes known to be in range (from
    :func:`pack`, say): no check, and on CUDA no read-back (a code outside
    then keeps its low ``bits`` bits). CPU and CUDA give the same bytes.

    >>> pack_bits(torch.tensor([1, -1, 2, -4]), 3)
    tensor([185,   8], dtype=torch.uint8)
    """
    op = "pack_bits"
    return _ops.pack_bits(_tensor(op, "codes", codes), _int(op, "bits", bits), _bool(op, "is_signed", is_signed),
                          _bool(op, "check_range", check_range))


def unpack_bits(packed: Tensor, bits: int, size: Union[int, Sequence[int]], is_signed: bool = True,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """The codes that :func:`pack_bits` packed into ``packed``, with shape
    ``size`` (``packed`` must have exactly ``ceil(prod(size) * bits / 8)``
    bytes), sign-extended when ``is_signed``. ``dtype`` must be an integer
    dtype that holds every code; the default is the smallest of int8, int16
    and int32 that does (int16 for unsigned 8-bit codes, int32 for unsigned
    16-bit ones).

    >>> unpack_bits(torch.tensor([185, 8], dtype=torch.uint8), 3, [4])
    tensor([ 1, -1,  2, -4], dtype=torch.int8)
    """
    op = "unpack_bits"
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"fxp.{op}: dtype must be a torch.dtype or None, but got {dtype!r}")
    shape = [_int(op, "size", d) for d in size] if isinstance(size, (list, tuple)) else [_int(op, "size", size)]
    return _ops.unpack_bits(_tensor(op, "packed", packed), _int(op, "bits", bits), shape,
                            _bool(op, "is_signed", is_signed), dtype)


def store_codes(codes: Tensor, fmt: FormatLike) -> Tensor:
    """How packed storage keeps the integer ``codes`` of ``fmt`` (Note
    [Bit-stream storage], csrc/ops/bit_pack/code_storage.h): for widths up to
    16 other than 8 and 16, a bit stream of :func:`pack_bits` (1-D uint8,
    ``ceil(numel * B / 8)`` bytes); otherwise a copy of the codes. The layer
    ops and the QPU step take either form.

    >>> store_codes(torch.tensor([1, -1, 2, -4], dtype=torch.int8), FxpFormat(3, 1))
    tensor([185,   8], dtype=torch.uint8)
    """
    op = "store_codes"
    total_bits = fmt.total_bits if isinstance(fmt, FxpFormat) else _int(op, "fmt", fmt)
    return _ops.store_codes(_tensor(op, "codes", codes), total_bits)


def load_codes(stored: Tensor, fmt: FormatLike, size: Union[int, Sequence[int]]) -> Tensor:
    """The integer codes (int8, int16 or int32 as :attr:`FxpFormat.storage_dtype`)
    of shape ``size`` that :func:`store_codes` stored; a copy of ``stored`` when it
    is not a bit stream. A stream of the wrong length is an error."""
    op = "load_codes"
    total_bits = fmt.total_bits if isinstance(fmt, FxpFormat) else _int(op, "fmt", fmt)
    shape = [_int(op, "size", d) for d in size] if isinstance(size, (list, tuple, torch.Size)) else [_int(op, "size", size)]
    return _ops.load_codes(_tensor(op, "stored", stored), total_bits, shape)


def stored_dtype(fmt: FxpFormat) -> torch.dtype:
    """The dtype packed storage keeps codes of ``fmt`` in: uint8 for a bit stream,
    else :attr:`FxpFormat.storage_dtype` (the rule is :func:`store_codes`'s)."""
    return _ops.store_codes(torch.empty(0, dtype=fmt.storage_dtype), fmt.total_bits).dtype


def _format_list(op: str, name: str, fmt: Optional[FxpFormat]) -> Optional[list]:
    if fmt is not None and not isinstance(fmt, FxpFormat):
        raise TypeError(f"fxp.{op}: {name} must be an FxpFormat or None, but got {fmt!r}")
    return None if fmt is None else [fmt.total_bits, fmt.frac_bits]


def _pair(op: str, name: str, value) -> list:
    if isinstance(value, (list, tuple)):
        return [_int(op, name, v) for v in value]
    return [_int(op, name, value)] * 2


def _layer_args(op, x, weight, bias, input_format, weight_codes, bias_codes, param_format, output_format,
                output_rounding, generator) -> tuple:
    """The checked arguments of linear and conv2d that follow the geometry."""
    return (_tensor(op, "x", x), _tensor(op, "weight", weight), _optional_tensor(op, "bias", bias),
            _format_list(op, "input_format", input_format), _optional_tensor(op, "weight_codes", weight_codes),
            _optional_tensor(op, "bias_codes", bias_codes), _format_list(op, "param_format", param_format),
            _format_list(op, "output_format", output_format), _str(op, "output_rounding", output_rounding),
            _generator(op, generator))


def _layer_call(name: str, args: tuple, pack_counts: Optional[Tensor]) -> Tensor:
    """The op's plain overload, or its .counted one with pack_counts."""
    op = getattr(_ops, name)
    if pack_counts is None:
        return op(*args)
    return op.counted(*args, pack_counts=_tensor(name, "pack_counts", pack_counts))


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, input_format: Optional[FxpFormat] = None,
           weight_codes: Optional[Tensor] = None, bias_codes: Optional[Tensor] = None,
           param_format: Optional[FxpFormat] = None, output_format: Optional[FxpFormat] = None,
           output_rounding: Rounding = "nearest_even", generator: Optional[torch.Generator] = None,
           pack_counts: Optional[Tensor] = None) -> Tensor:
    """``torch.nn.functional.linear`` for quantized layers, with packed storage.

    With ``input_format``, autograd saves ``x`` as codes of that format: ``x``
    must lie on its grid, as a quantized activation does, or the call raises
    ``ValueError`` (its codes would give the weight gradient of another input).
    With ``pack_counts`` as well, the NaN and off-grid elements are added to
    it instead (see :func:`pack`'s ``counts``), so the call reads nothing back.
    With ``weight_codes``/``bias_codes`` (codes of ``param_format``), the weight and
    bias values come from the codes; ``weight``/``bias`` then only give shape
    and dtype and receive the gradients. With ``output_format``, the output is
    quantized in place (saturating, ``output_rounding``, draws from
    ``generator``) with a straight-through gradient: ``quantize_ste`` without
    the extra copy. The gradients equal those of ``F.linear`` bit for bit
    (2-D inputs)."""
    args = _layer_args("linear", x, weight, bias, input_format, weight_codes, bias_codes, param_format,
                       output_format, output_rounding, generator)
    return _layer_call("linear", args, pack_counts)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1, *,
           input_format: Optional[FxpFormat] = None, weight_codes: Optional[Tensor] = None,
           bias_codes: Optional[Tensor] = None, param_format: Optional[FxpFormat] = None,
           output_format: Optional[FxpFormat] = None, output_rounding: Rounding = "nearest_even",
           generator: Optional[torch.Generator] = None, pack_counts: Optional[Tensor] = None) -> Tensor:
    """``torch.conv2d`` with the packed storage and output options of
    :func:`linear`; the gradients equal ``torch.conv2d``'s bit for bit."""
    x, weight, bias, *rest = _layer_args("conv2d", x, weight, bias, input_format, weight_codes, bias_codes,
                                         param_format, output_format, output_rounding, generator)
    return _layer_call("conv2d", (x, weight, bias, _pair("conv2d", "stride", stride), _pair("conv2d", "padding", padding),
                                  _pair("conv2d", "dilation", dilation), _int("conv2d", "groups", groups), *rest),
                       pack_counts)


def relu_max_pool2d(x: Tensor, kernel_size: Union[int, Sequence[int]] = 2) -> Tensor:
    """``F.max_pool2d(F.relu(x), kernel_size)`` (stride = kernel size) whose
    autograd saves one byte per output (the window position of the maximum,
    or that it was not positive) instead of ReLU's float output and the
    pool's int64 indices. Values and gradients equal torch's bit for bit,
    also where a window's maximum is NaN (its gradient passes, as ReLU's does),
    and so do second derivatives through ``grad_out`` (double backward; x gets
    none, where torch's pair gives zeros: ask with ``allow_unused=True``). Its
    gradient is a C++ autograd function, so ``torch.func`` transforms do not
    apply. On the CPU, float32 2x2 windows run four at a time: several times
    faster than torch's pair."""
    return _ops.relu_max_pool2d(_tensor("relu_max_pool2d", "x", x), _pair("relu_max_pool2d", "kernel_size", kernel_size))


def format_histogram(x: Tensor, bins: int, min: float, max: float, fmt: Optional[FxpFormat] = None,
                     *, saturate: bool = True) -> Tensor:
    """int64 counts of ``x`` in ``bins`` equal bins over ``[min, max]``
    (``torch.histc`` of ``x.double()``: its bins, computed in float64; values
    beyond the range count in the end bins, NaN nowhere), AdaPT's push-down histogram. With ``fmt``, each value is
    first rounded half to even to ``fmt`` (without saturation when
    ``saturate`` is false) in the same pass: no quantized copy of ``x``."""
    op = "format_histogram"
    fmt_list = _format_list(op, "fmt", fmt)
    if fmt_list is not None and not _bool(op, "saturate", saturate):
        fmt_list[0] = 0
    return _ops.format_histogram(_tensor(op, "x", x), _int(op, "bins", bins), _number(op, "min", min),
                                 _number(op, "max", max), fmt_list)
