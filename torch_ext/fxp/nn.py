"""Quantized layers for the paper's methods: fp32, STE, SQPU and HTEQPU.

Every layer keeps its formats and roundings as plain attributes, so they can be
changed between steps (AdaPT, MSQ) without rebuilding the model or optimizer.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .format import FxpFormat
from .ops import quantize_ste

__all__ = ["QLinear", "QConv2d", "PaperCNN", "quantize_model", "quantize_parameters_", "METHODS", "WEIGHT_MODES"]

Method = Literal["fp32", "ste", "sqpu", "hteqpu"]
WeightMode = Literal["fp32", "ste", "qpu"]
InferenceRounding = Literal["hte", "sr"]
METHODS = ("fp32", "ste", "sqpu", "hteqpu")
WEIGHT_MODES = {"fp32": "fp32", "ste": "ste", "sqpu": "qpu", "hteqpu": "qpu"}
_OP_ROUNDING = {"hte": "nearest_even", "sr": "stochastic"}


class _QuantizedLayer(nn.Module):
    """Shared state: the weight mode, the formats and the roundings."""

    def _setup(self, weight_mode: WeightMode, param_format: Optional[FxpFormat], act_format: Optional[FxpFormat],
               act_rounding: InferenceRounding) -> None:
        if weight_mode not in ("fp32", "ste", "qpu"):
            raise ValueError(f"{type(self).__name__}: weight_mode must be fp32, ste or qpu, but got {weight_mode!r}")
        if act_rounding not in _OP_ROUNDING:
            raise ValueError(f"{type(self).__name__}: act_rounding must be 'hte' or 'sr', but got {act_rounding!r}")
        if weight_mode != "fp32" and (param_format is None or act_format is None):
            raise ValueError(f"{type(self).__name__}: weight_mode {weight_mode!r} needs param_format and act_format")
        self.weight_mode = weight_mode
        self.param_format = param_format
        self.act_format = act_format
        self.act_rounding = act_rounding

    def _weight(self, w: Tensor) -> Tensor:
        if self.weight_mode == "ste":  # quantize on read; the fp32 master copy gets the gradient
            return quantize_ste(w, self.param_format, rounding=_OP_ROUNDING[self.act_rounding])
        return w  # fp32, or qpu: already on the grid

    def _output(self, y: Tensor) -> Tensor:
        if self.weight_mode == "fp32":
            return y
        return quantize_ste(y, self.act_format, rounding=_OP_ROUNDING[self.act_rounding])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, weight_mode={self.weight_mode}, param_format={self.param_format}, "
                f"act_format={self.act_format}, act_rounding={self.act_rounding}")


class QLinear(nn.Linear, _QuantizedLayer):
    """``nn.Linear`` whose weights follow ``weight_mode`` and whose output is
    quantized to ``act_format`` with a straight-through gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_mode: WeightMode = "fp32",
                 param_format: Optional[FxpFormat] = None, act_format: Optional[FxpFormat] = None,
                 act_rounding: InferenceRounding = "sr", **kwargs) -> None:
        super().__init__(in_features, out_features, bias, **kwargs)
        self._setup(weight_mode, param_format, act_format, act_rounding)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self._weight(self.bias)
        return self._output(F.linear(x, self._weight(self.weight), bias))


class QConv2d(nn.Conv2d, _QuantizedLayer):
    """``nn.Conv2d`` with the weight modes and output quantization of :class:`QLinear`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, weight_mode: WeightMode = "fp32",
                 param_format: Optional[FxpFormat] = None, act_format: Optional[FxpFormat] = None,
                 act_rounding: InferenceRounding = "sr", **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self._setup(weight_mode, param_format, act_format, act_rounding)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self._weight(self.bias)
        return self._output(self._conv_forward(x, self._weight(self.weight), bias))


class PaperCNN(nn.Module):
    """The network of the paper's Table 1 (Gupta et al. 2015): 184,490 parameters.

    conv 5x5 1->32, max-pool 2; conv 5x5 32->64, max-pool 2; linear 1024->128;
    linear 128->10. No conv bias, linear bias; ReLU after every layer but the last.
    Every conv and linear output is quantized (unless the method is fp32).
    """

    def __init__(self, method: Method = "fp32", param_format: Optional[FxpFormat] = None,
                 act_format: Optional[FxpFormat] = None, act_rounding: InferenceRounding = "sr") -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"PaperCNN: method must be one of {', '.join(METHODS)}, but got {method!r}")
        q = dict(weight_mode=WEIGHT_MODES[method], param_format=param_format, act_format=act_format,
                 act_rounding=act_rounding)
        self.method = method
        self.conv1 = QConv2d(1, 32, 5, bias=False, **q)
        self.conv2 = QConv2d(32, 64, 5, bias=False, **q)
        self.fc1 = QLinear(1024, 128, **q)
        self.fc2 = QLinear(128, 10, **q)

    def quantize_parameters_(self, rounding: str = "stochastic", seed: int = 0) -> None:
        """QPU's initialization: every parameter onto the grid (see :func:`quantize_parameters_`)."""
        quantize_parameters_(self, rounding, seed)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)  # logits; the softmax lives in the loss


def _replace_layers(model: nn.Module, layer_kwargs: dict) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, (QLinear, QConv2d)):
            child._setup(**layer_kwargs)
        elif isinstance(child, nn.Linear):
            new = QLinear(child.in_features, child.out_features, child.bias is not None, **layer_kwargs,
                          device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        elif isinstance(child, nn.Conv2d):
            new = QConv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                          padding=child.padding, dilation=child.dilation, groups=child.groups,
                          bias=child.bias is not None, padding_mode=child.padding_mode, **layer_kwargs,
                          device=child.weight.device, dtype=child.weight.dtype)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            _replace_layers(child, layer_kwargs)


def quantize_model(model: nn.Module, method: Method, param_format: Optional[FxpFormat] = None,
                   act_format: Optional[FxpFormat] = None, act_rounding: InferenceRounding = "sr",
                   seed: int = 0) -> nn.Module:
    """Replaces every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (in place) by
    its quantized twin, keeping the weights. For ``sqpu``/``hteqpu`` the weights
    are then put on the grid with the update rounding (SR/HTE). Returns ``model``."""
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {', '.join(METHODS)}, but got {method!r}")
    _replace_layers(model, dict(weight_mode=WEIGHT_MODES[method], param_format=param_format,
                                act_format=act_format, act_rounding=act_rounding))
    if method in ("sqpu", "hteqpu"):
        quantize_parameters_(model, "stochastic" if method == "sqpu" else "nearest_even", seed)
    return model


def quantize_parameters_(model: nn.Module, rounding: str = "stochastic", seed: int = 0) -> None:
    """Puts the parameters of every quantized layer of ``model`` on its layer's
    parameter grid: QPU's initialization. Tensor ``k`` (in parameter order over
    the whole model) rounds with its own Philox offset ``k`` (key ``seed +
    fxp.optim.INIT_KEY_DELTA``), as ``fxp::nn::PaperCNN::quantize_parameters_``
    does in C++. Done per layer, offsets would repeat and layers would share draws."""
    from .optim import init_key

    key = init_key(seed)
    k = 0
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, (QLinear, QConv2d)):
                fmt = layer.param_format
                for p in layer.parameters(recurse=False):
                    torch.ops.fxp.quantize_seeded_(p, fmt.total_bits, fmt.frac_bits, rounding, key, k)
                    k += 1
