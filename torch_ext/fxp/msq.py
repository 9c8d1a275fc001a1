"""MSQ (bit-sparsity mixed-precision training) in any PyTorch training loop (docs/msq.md).

:class:`MsqController` runs the whole method on a model's ``nn.Conv2d`` and
``nn.Linear`` layers: each weight is read through RoundClamp at its layer's
width, the LSB penalty joins the loss, and pruning checks lower the widths.
The controller is fxp's C++ one (``torch.classes.fxp.MsqController``, the code
``fxp-train --method msq`` runs)::

    controller = fxp.msq.MsqController(model, start_bits=8, lam=1e-3, alpha=0.9)
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y) + controller.penalty()
            loss.backward()
            optimizer.step()
        model.eval()
        controller.check(lambda: F.cross_entropy(model(x0), y0), seed=epoch)  # x0, y0: one batch
        model.train()
    controller.freeze()  # then fine-tune at the final widths
    print(controller.compression_rate)

The ops alone: the RoundClamp quantizer (Note [RoundClamp] in kernels/round_clamp/round_clamp_math.h)
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

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .ops import _bool, _int, _module, _number, _seed, _tensor

__all__ = ["MsqController", "round_clamp", "round_clamp_codes", "round_clamp_lsb"]

_ops = torch.ops.fxp


def _scale(op: str, value) -> float:
    return _number(f"msq.{op}", "scale", value)


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


class _RoundClampWeight(nn.Module):
    """The parametrization of an MSQ layer's weight (Note [MSQ layers] in
    csrc/nn/modules.h): RoundClamp at the layer's width and scale, keeping the
    LSBs' L1 norm of the last forward for the penalty. On the float path (the
    Hessian's loss) the weight is ``Q_n(w)`` as a constant plus ``w - w``
    detached: the same values, differentiable twice."""

    def __init__(self, bits: int, scale: float) -> None:
        super().__init__()
        self.bits, self.scale = bits, scale
        self.float_path = False
        self.lsb_l1: Optional[Tensor] = None

    def forward(self, w: Tensor) -> Tensor:
        if self.float_path:
            quantized = _ops.round_clamp(w.detach(), self.scale, self.bits)[0]
            return quantized + (w - w.detach())
        quantized, self.lsb_l1, _ = _ops.round_clamp(w, self.scale, self.bits)
        return quantized

    def __getstate__(self):
        # The last L1 norm belongs to a graph, which neither pickles nor deep-copies.
        return {**super().__getstate__(), "lsb_l1": None}

    def extra_repr(self) -> str:
        return f"bits={self.bits}, scale={self.scale:g}"


class MsqController:
    """MSQ over ``model``'s ``nn.Conv2d`` and ``nn.Linear`` layers (module order).

    Each layer's weight becomes a parametrization (``torch.nn.utils.parametrize``):
    the parameter itself, the float master copy the optimizer updates, moves to
    ``layer.parametrizations.weight.original`` (the same tensor object), and
    ``layer.weight`` reads it through RoundClamp at the layer's width, with
    scale ``max |w|`` at the start, fixed for the run. Biases, batch norm and
    activations stay float, as in ``fxp-train --method msq``.

    Options (docs/msq.md): ``start_bits`` (at most 15) and ``min_bits``, the
    penalty weight ``lam`` (λ), the sparsity ``alpha`` at which a layer drops
    bits, and ``hessian``: Hessian-guided pruning, where layers below the mean
    sensitivity drop 2 bits at once, estimated with ``hessian_samples``
    Hutchinson vectors per check.

    Build it after loading the float weights (the scales are their ``max |w|``)
    and after moving the model to its device and dtype. While it is on, the
    model's ``state_dict`` has ``….parametrizations.weight.original`` keys in
    place of ``….weight``, so a plain checkpoint loads before it, not after.
    :meth:`remove` gives the model back its plain weights and ends the
    controller.
    """

    def __init__(self, model: nn.Module, *, start_bits: int = 8, min_bits: int = 1, lam: float = 1e-4,
                 alpha: float = 0.95, hessian: bool = True, hessian_samples: int = 16) -> None:
        _module("msq", model)
        hessian = _bool("msq", "hessian", hessian)
        from .nn import QConv2d, QLinear  # fxp's layers quantize by themselves: only their fp32 mode is plain

        self._names: List[str] = []
        self._layers: List[nn.Module] = []
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            label = name or type(module).__name__
            if parametrize.is_parametrized(module, "weight"):
                raise ValueError(f"fxp.msq: the weight of layer {label} is parametrized already (another "
                                 f"MsqController?); remove that first")
            if isinstance(module, (QConv2d, QLinear)) and (module.weight_mode != "fp32" or module.packed_weights):
                raise ValueError(f"fxp.msq: layer {label} quantizes its weights itself (weight_mode "
                                 f"{module.weight_mode!r}); MSQ needs plain float layers (weight_mode='fp32')")
            if not module.weight.requires_grad:
                raise ValueError(f"fxp.msq: the weight of layer {label} does not require grad; MSQ trains every "
                                 f"Conv2d and Linear weight (unfreeze it, or quantize a submodule without it)")
            self._names.append(name)
            self._layers.append(module)
        if not self._layers:
            raise ValueError("fxp.msq: the model has no nn.Conv2d or nn.Linear layer to quantize")
        self._hessian = hessian
        self._core = torch.classes.fxp.MsqController(
            self._names, [layer.weight for layer in self._layers], _int("msq", "start_bits", start_bits),
            _int("msq", "min_bits", min_bits), _number("msq", "lam", lam), _number("msq", "alpha", alpha), hessian,
            _int("msq", "hessian_samples", hessian_samples))
        self._removed = False
        self._weights: List[_RoundClampWeight] = []
        for layer, bits, scale in zip(self._layers, self._core.bits(), self._core.scales()):
            weight = _RoundClampWeight(bits, scale)
            parametrize.register_parametrization(layer, "weight", weight, unsafe=True)
            self._weights.append(weight)

    def _apply_widths(self) -> None:
        for weight, bits, scale in zip(self._weights, self._core.bits(), self._core.scales()):
            weight.bits, weight.scale = bits, scale

    def _check_attached(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"fxp.msq: {what} after remove(): the layers no longer read through this controller")

    def penalty(self) -> Tensor:
        """λ·Σ|LSB| over the layers, from their last forward (with autograd):
        add it to the task loss. 0 once frozen."""
        self._check_attached("penalty()")
        return self._core.penalty([w.lsb_l1 for w in self._weights])

    def check(self, float_path_loss: Optional[Callable[[], Tensor]] = None, *, seed: int = 0) -> Dict[str, int]:
        """A pruning check: measures each layer's LSB sparsity and, with the
        Hessian, its Hessian trace from ``float_path_loss()``, a callable that
        computes the loss of one batch (the layers are on their float path
        while it runs; use ``model.eval()`` so that batch norm's statistics
        stay), with Hutchinson vectors from ``seed``. Every layer whose
        sparsity reaches α drops 1 or 2 bits. Returns the bits each layer
        dropped, by module name."""
        self._check_attached("check()")
        loss = None
        if self._hessian:
            if not callable(float_path_loss):
                raise TypeError("fxp.msq: a check with the Hessian needs float_path_loss, a callable that "
                                "returns the loss of one batch")
            for w in self._weights:
                w.float_path = True
            try:
                loss = float_path_loss()
            finally:
                for w in self._weights:
                    w.float_path = False
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise TypeError(f"fxp.msq: float_path_loss must return a 0-dim tensor, but returned {loss!r}")
            if not loss.requires_grad:  # the Hessian-vector products differentiate it twice
                raise ValueError("fxp.msq: float_path_loss returned a loss without a graph (computed under "
                                 "torch.no_grad(), or detached); the Hessian trace differentiates it")
        dropped = self._core.check(loss, _seed("msq", "seed", seed))
        self._apply_widths()
        return dict(zip(self._names, dropped))

    def freeze(self) -> None:
        """Fixes the widths for the final fine-tuning: no penalty, no more checks."""
        self._check_attached("freeze()")
        self._core.freeze()

    @property
    def frozen(self) -> bool:
        return self._core.frozen()

    def bits(self) -> Dict[str, int]:
        """Each layer's width (magnitude bits; the sign takes one more), by module name."""
        return dict(zip(self._names, self._core.bits()))

    def sparsities(self) -> Dict[str, float]:
        """Each layer's LSB sparsity now (the fraction of weights whose LSB is 0)."""
        return dict(zip(self._names, self._core.sparsities()))

    @property
    def compression_rate(self) -> float:
        """32 × the weights ÷ Σ width × weights over the layers (the sign not
        counted, as BSQ and CSQ report it)."""
        return self._core.compression_rate()

    def record(self) -> dict:
        """The state fxp-train records per epoch in metrics.jsonl's ``msq``:
        each layer's width, weights, LSB sparsity now and at the last check,
        Hessian trace and scale; the compression rate; whether frozen."""
        layers = [{"name": name, **{k: int(v) if k in ("bits", "weights") else v for k, v in record.items()}}
                  for name, record in zip(self._names, self._core.layer_records())]
        return {"layers": layers, "compression_rate": self.compression_rate, "frozen": self.frozen}

    def state_dict(self) -> Dict[str, Tensor]:
        """The widths, scales, last check and frozen flag (the weights are the model's)."""
        return dict(self._core.state_dict())

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict` (of a controller over the same layers) and the layers' widths."""
        self._check_attached("load_state_dict()")
        if not isinstance(state, dict):
            raise TypeError(f"fxp.msq: load_state_dict takes the dict state_dict() returns, but got "
                            f"{type(state).__name__}")
        self._core.load_state_dict(state)
        self._apply_widths()

    def remove(self, leave_quantized: bool = True) -> None:
        """Takes the parametrizations off: each layer's weight becomes a plain
        parameter again, holding its quantized values ``Q_n(w)``
        (``leave_quantized``) or the float master copy."""
        leave_quantized = _bool("msq", "leave_quantized", leave_quantized)
        for layer in self._layers:
            if parametrize.is_parametrized(layer, "weight"):
                parametrize.remove_parametrizations(layer, "weight", leave_parametrized=leave_quantized)
        self._removed = True

    def __deepcopy__(self, memo):
        raise TypeError("fxp.msq: an MsqController cannot be deep-copied: it is bound to its model's layers. Copy "
                        "the model, build a controller over the copy, and load_state_dict() this one's state")

    def __repr__(self) -> str:
        widths = ", ".join(f"{n or '<model>'}={b}" for n, b in self.bits().items())
        return f"MsqController(compression_rate={self.compression_rate:.2f}, {widths})"
