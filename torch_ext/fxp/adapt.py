"""AdaPT in any PyTorch training loop (docs/adapt.md).

:class:`AdaptController` drives the per-layer formats of a model's
:class:`fxp.nn.QLinear` and :class:`fxp.nn.QConv2d` layers (``weight_mode="ste"``:
a float32 master copy read quantized). The controller itself is fxp's C++ one
(``torch.classes.fxp.AdaptController``, the same code ``fxp-train --method
adapt`` runs); this module only hands it the layers' parameters and gives the
layers the formats it chooses::

    model = ...  # with fxp.nn.QConv2d / QLinear layers, weight_mode="ste"
    controller = fxp.adapt.AdaptController(model, l1=1e-4)
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        controller.after_backward(loss, x.shape[0])  # normalizes the gradients, may switch formats
        optimizer.step()
"""

from __future__ import annotations

import numbers
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .format import FxpFormat
from .nn import QConv2d, QLinear

__all__ = ["AdaptController"]


def _pair(name: str, value) -> list:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)):
        raise TypeError(f"fxp.adapt: {name} must be two ints (lower, upper), but got {value!r}")
    return [int(v) for v in value]


def _fan_in(layer: nn.Module) -> int:
    """Multiply-adds per output element (the performance model's M_l / outputs)."""
    if isinstance(layer, QLinear):
        return layer.in_features
    kh, kw = layer.kernel_size
    return layer.in_channels // layer.groups * kh * kw


class _MaddsCounter:
    """A forward hook that keeps its layer's multiply-adds per sample from the
    last output (a module, not a closure, so that the model still pickles)."""

    def __init__(self, fan_in: int) -> None:
        self.fan_in = fan_in
        self.madds = 0

    def __call__(self, module: nn.Module, inputs, output: Tensor) -> None:
        if output.dim() > 0 and output.shape[0] > 0:
            self.madds = output.numel() // output.shape[0] * self.fan_in


class AdaptController:
    """AdaPT's controller over ``model``'s quantized layers (module order).

    Every :class:`~fxp.nn.QLinear` and :class:`~fxp.nn.QConv2d` of ``model``
    is adapted; its weight and bias share its format, and its activations take
    the same format. Options are the paper's defaults (docs/adapt.md): ``start``
    format, KL ``resolution`` and ``lookback`` bounds, ``lookback_momentum``
    (γ), ``buffer_bits``, the initial ``strategy`` (min, mean, max), the
    reading of log² (``log_form``: log2 or squared_ln) and ``l1``.

    The controller keeps the parameter tensors it is given: build it after
    moving the model to its device and dtype, and do not replace the layers'
    parameters afterwards. With a gradient scaler, unscale the gradients
    before :meth:`after_backward`, which normalizes them. A layer called
    twice in one forward counts its multiply-adds once.
    """

    def __init__(self, model: nn.Module, *, start: FxpFormat = FxpFormat(8, 4),
                 resolution: Sequence[int] = (50, 150), lookback: Sequence[int] = (25, 100),
                 lookback_momentum: float = 0.33, buffer_bits: int = 4, strategy: str = "min",
                 log_form: str = "log2", l1: float = 0.0) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"fxp.adapt: model must be a torch.nn.Module, but got {type(model).__name__}")
        if not isinstance(start, FxpFormat):
            raise TypeError(f"fxp.adapt: start must be an FxpFormat, but got {start!r}")
        self._names, self._layers = [], []
        for name, module in model.named_modules():
            if isinstance(module, (QLinear, QConv2d)):
                label = name or type(module).__name__
                if module.weight_mode != "ste":
                    raise ValueError(f"fxp.adapt: layer {label} has weight_mode {module.weight_mode!r}; AdaPT "
                                     f"reads a float32 master copy quantized, so its layers need weight_mode='ste'")
                if module.packed_weights or module.saved_input_format is not None:
                    raise ValueError(f"fxp.adapt: layer {label} saves its inputs or weights as codes of a fixed "
                                     f"format (pack_), but AdaPT changes the formats; adapt a model that is not packed")
                self._names.append(name)
                self._layers.append(module)
        if not self._layers:
            raise ValueError("fxp.adapt: the model has no fxp.nn.QLinear or QConv2d layers to adapt")
        parameters = [list(layer.parameters(recurse=False)) for layer in self._layers]
        self._core = torch.classes.fxp.AdaptController(
            self._names, [p for ps in parameters for p in ps], [len(ps) for ps in parameters],
            [start.total_bits, start.frac_bits], _pair("resolution", resolution), _pair("lookback", lookback),
            float(lookback_momentum), int(buffer_bits), str(strategy), str(log_form), float(l1))
        # Each layer's forward multiply-adds per sample, from its last output (the performance model).
        self._counters = [_MaddsCounter(_fan_in(layer)) for layer in self._layers]
        self._hooks = [layer.register_forward_hook(c) for layer, c in zip(self._layers, self._counters)]
        self._apply_formats()

    def _apply_formats(self) -> None:
        flat = self._core.formats()
        for i, layer in enumerate(self._layers):
            layer.param_format = layer.act_format = FxpFormat(flat[2 * i], flat[2 * i + 1])

    def after_backward(self, loss, batch_size: int) -> bool:
        """Between ``loss.backward()`` and ``optimizer.step()``: adds L1's
        gradient, normalizes each layer's gradient (Eq. 3.4), accumulates it,
        adapts the strategy from ``loss`` (a number or a 0-dim tensor), and
        switches the layers whose lookback is due. Returns whether a layer's
        format changed (the layers have their new formats already)."""
        if isinstance(loss, Tensor):
            loss = loss.detach().item()
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"fxp.adapt: batch_size must be an int, but got {batch_size!r}")
        self._core.set_madds([c.madds for c in self._counters])
        switched = self._core.after_backward(float(loss), int(batch_size))
        if switched:
            self._apply_formats()
        return switched

    def formats(self) -> Dict[str, FxpFormat]:
        """Each adapted layer's current format, by module name."""
        flat = self._core.formats()
        return {name: FxpFormat(flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(self._names)}

    @property
    def strategy(self) -> str:
        return self._core.strategy()

    def record(self) -> dict:
        """The state fxp-train records per epoch in metrics.jsonl's ``adapt``:
        the strategy, each layer's format, lookback, resolution, switches,
        gradient diversity, PD minimum and sparsity, and the performance
        model's figures so far (SU¹, SZ, inference speed-up)."""
        integers = ("bits", "frac", "lookback", "resolution", "switches", "min_bits", "min_frac", "parameters",
                    "samples")
        layers = []
        for i, name in enumerate(self._names):
            r = dict(self._core.layer_record(i))
            layer = {"name": name, **{k: int(v) if k in integers else v for k, v in r.items()}}
            if layer["switches"] == 0:
                layer["gradient_diversity"] = None
            layers.append(layer)
        return {"strategy": self.strategy, "layers": layers, "performance": dict(self._core.performance())}

    def state_dict(self) -> Dict[str, Tensor]:
        """Everything the controller carries between steps (copies)."""
        return dict(self._core.state_dict())

    def load_state_dict(self, state: Dict[str, Tensor]) -> None:
        """Restores :meth:`state_dict` (of a controller over the same layers) and the layers' formats."""
        self._core.load_state_dict(state)
        self._apply_formats()

    def remove(self) -> None:
        """Removes the forward hooks that count the layers' multiply-adds."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def __repr__(self) -> str:
        formats = ", ".join(f"{n}={f.total_bits}.{f.frac_bits}" for n, f in self.formats().items())
        return f"AdaptController(strategy={self.strategy}, {formats})"
