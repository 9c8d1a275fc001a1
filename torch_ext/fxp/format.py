"""The fixed-point format FxP(B, F)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

MIN_TOTAL_BITS = 2
MAX_TOTAL_BITS = 32


@dataclass(frozen=True)
class FxpFormat:
    """Signed fixed point with ``total_bits`` bits (sign included), ``frac_bits`` of them fractional.

    An integer code ``q`` in ``[-2**(B-1), 2**(B-1) - 1]`` stands for ``q * 2**-F``.

    >>> FxpFormat(8, 4).max_value
    7.9375
    """

    total_bits: int
    frac_bits: int

    def __post_init__(self) -> None:
        for name in ("total_bits", "frac_bits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's ints too
                raise TypeError(f"FxpFormat: {name} must be an int, but got {value!r}")
            object.__setattr__(self, name, int(value))  # a plain int, so that equal formats print and hash alike
        if not MIN_TOTAL_BITS <= self.total_bits <= MAX_TOTAL_BITS:
            raise ValueError(
                f"FxpFormat: total_bits must be in [{MIN_TOTAL_BITS}, {MAX_TOTAL_BITS}], "
                f"but got {self.total_bits}"
            )
        if not 0 <= self.frac_bits <= self.total_bits - 1:
            raise ValueError(
                f"FxpFormat: frac_bits must be in [0, total_bits - 1] = [0, {self.total_bits - 1}], "
                f"but got {self.frac_bits}"
            )

    @property
    def code_min(self) -> int:
        return -(1 << (self.total_bits - 1))

    @property
    def code_max(self) -> int:
        return (1 << (self.total_bits - 1)) - 1

    @property
    def resolution(self) -> float:
        """The value of one LSB, ``2**-F``."""
        return 2.0**-self.frac_bits

    @property
    def min_value(self) -> float:
        return self.code_min * self.resolution

    @property
    def max_value(self) -> float:
        return self.code_max * self.resolution

    @property
    def storage_bits(self) -> int:
        """Bits of the smallest integer type that holds a code (8, 16 or 32)."""
        return 8 if self.total_bits <= 8 else 16 if self.total_bits <= 16 else 32

    @property
    def storage_dtype(self):
        """The ``torch`` integer dtype of packed codes: int8, int16 or int32 (see :attr:`storage_bits`)."""
        import torch

        return {8: torch.int8, 16: torch.int16, 32: torch.int32}[self.storage_bits]

    def __str__(self) -> str:
        return f"FxP({self.total_bits},{self.frac_bits})"
