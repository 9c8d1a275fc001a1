"""MSQ (bit-sparsity mixed-precision training) in any PyTorch training loop (docs/msq.md).

The RoundClamp quantizer (Note [RoundClamp] in kernels/round_clamp/round_clamp_math.h)
quantizes a layer's weights at ``bits`` bits with a per-layer ``scale`` and a
separate sign. Its least significant bit (LSB) is the difference between the
weight's values at ``bits`` and at ``bits - 1``; MSQ's L1 penalty on the LSBs
makes them zero, and a layer whose LSBs are zero enough drops a bit::

    quantized, lsb_l1, lsb_nonzero = fxp.msq.round_clamp(layer.weight, scale, bits)
    loss = F.cross_entropy(forward_with(quantized), y) + lam * lsb_l1
    sparsity = 1 - lsb_nonzero / layer.weight.numel()

Gradients are straight through: ``d quantized / d w = 1`` and
``d lsb_l1 / d w = sign(LSB)``. The arithmetic is fxp's C++ op
(``torch.ops.fxp.round_clamp``); this module only checks the argument types.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .ops import _int, _tensor

__all__ = ["round_clamp", "round_clamp_codes", "round_clamp_lsb"]

_ops = torch.ops.fxp


def _scale(op: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fxp.msq.{op}: scale must be a number, but got {value!r}")
    return float(value)


def round_clamp(w: Tensor, scale: float, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(quantized, lsb_l1, lsb_nonzero)`` in one pass: ``w`` at ``bits`` bits
    (1 to 16) with the layer's ``scale``, the L1 norm of its LSBs (0-dim, ``w``'s
    dtype) and the number of non-zero LSBs (0-dim int64)."""
    return _ops.round_clamp(_tensor("round_clamp", "w", w), _scale("round_clamp", scale),
                            _int("round_clamp", "bits", bits))


def round_clamp_lsb(w: Tensor, scale: float, bits: int) -> Tensor:
    """The LSBs of ``w``: its value at ``bits`` minus its value at ``bits - 1``
    (each -1, 0 or 1 times ``scale * 2**-bits``, signed like ``w``)."""
    return _ops.round_clamp_lsb(_tensor("round_clamp_lsb", "w", w), _scale("round_clamp_lsb", scale),
                                _int("round_clamp_lsb", "bits", bits))


def round_clamp_codes(w: Tensor, scale: float, bits: int) -> Tensor:
    """The signed integer codes of ``w`` at ``bits`` bits: the quantized value is
    ``codes * scale * 2**-bits``. NaN weights are an error."""
    return _ops.round_clamp_codes(_tensor("round_clamp_codes", "w", w), _scale("round_clamp_codes", scale),
                                  _int("round_clamp_codes", "bits", bits))
