"""Quantized layers for the paper's methods: fp32, STE, SQPU and HTEQPU.

Every layer keeps its formats and roundings as plain attributes, so they can be
changed between steps (AdaPT, MSQ) without rebuilding the model or optimizer; a bad
value is refused where it is set.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Iterable, Literal, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .format import FxpFormat
from . import ops as fxp_ops
from .ops import _bool, _module, _seed, pack, quantize_ste

__all__ = ["QLinear", "QConv2d", "PaperCNN", "PackedParameter", "PackedStorage", "quantize_model",
           "quantize_layer_parameters_", "pack_model_", "packed_storage", "recalibrate_batch_norm", "METHODS",
           "WEIGHT_MODES"]

Method = Literal["fp32", "ste", "sqpu", "hteqpu"]
WeightMode = Literal["fp32", "ste", "qpu"]
InferenceRounding = Literal["hte", "sr"]
METHODS = ("fp32", "ste", "sqpu", "hteqpu")
WEIGHT_MODES = {"fp32": "fp32", "ste": "ste", "sqpu": "qpu", "hteqpu": "qpu"}
_OP_ROUNDING = {"hte": "nearest_even", "sr": "stochastic"}


class PackedParameter(nn.Parameter):
    """A packed layer's weight or bias: the shape and dtype of the value, a
    one-element stand-in storage (4 bytes), and the gradient; the value lives
    in the layer's integer codes (``weight_codes``/``bias_codes``), which
    :class:`fxp.optim.QPUSGD` updates (:func:`packed_storage`)."""

    def __reduce_ex__(self, protocol):
        # nn.Parameter pickles as a plain Parameter: keep the type.
        return _rebuild_packed_parameter, (self.data, self.requires_grad)


def _rebuild_packed_parameter(data: Tensor, requires_grad: bool) -> PackedParameter:
    return PackedParameter(data, requires_grad=requires_grad)


class _QuantizedLayer(nn.Module):
    """Shared state: the weight mode, the formats and the roundings. They are
    plain attributes a caller may change between steps, checked when set (a bad
    value would otherwise fail, or be read wrongly, only at the next forward)."""

    _CHECKED_ATTRIBUTES = ("weight_mode", "param_format", "act_format", "act_rounding")

    def _check_attribute(self, name: str, value) -> None:
        layer = type(self).__name__
        if name == "weight_mode":
            if value not in ("fp32", "ste", "qpu"):
                raise ValueError(f"{layer}: weight_mode must be fp32, ste or qpu, but got {value!r}")
            if value != "qpu" and self.__dict__.get("packed_weights"):
                raise ValueError(f"{layer}: the weights are packed, so weight_mode stays 'qpu' (got {value!r})")
        elif name == "act_rounding":
            if value not in _OP_ROUNDING:
                raise ValueError(f"{layer}: act_rounding must be 'hte' or 'sr', but got {value!r}")
        elif value is not None and not isinstance(value, FxpFormat):  # param_format, act_format
            raise TypeError(f"{layer}: {name} must be an FxpFormat, but got {value!r}")
        elif name == "param_format" and self.__dict__.get("packed_weights") and value != self.packed_format:
            raise ValueError(f"{layer}: param_format cannot become {value}: the packed weights are codes of "
                             f"{self.packed_format}, and a packed layer's format is fixed")

    def __setattr__(self, name: str, value) -> None:
        if name in _QuantizedLayer._CHECKED_ATTRIBUTES:
            self._check_attribute(name, value)
        super().__setattr__(name, value)

    def _check_formats(self, weight_mode: str, param_format: Optional[FxpFormat],
                       act_format: Optional[FxpFormat]) -> None:
        """The attributes together: quantized weight modes need both formats."""
        if weight_mode != "fp32":
            missing = [name for name, fmt in (("param_format", param_format), ("act_format", act_format))
                       if fmt is None]
            if missing:
                raise ValueError(f"{type(self).__name__}: weight_mode {weight_mode!r} needs param_format and "
                                 f"act_format, but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                 "None")

    def _check_layer(self) -> None:
        """Before a forward: the attributes as they are now set."""
        self._check_formats(self.weight_mode, self.param_format, self.act_format)

    def _setup(self, weight_mode: WeightMode, param_format: Optional[FxpFormat], act_format: Optional[FxpFormat],
               act_rounding: InferenceRounding) -> None:
        values = dict(weight_mode=weight_mode, param_format=param_format, act_format=act_format,
                      act_rounding=act_rounding)
        for name, value in values.items():  # all checked before any is set
            self._check_attribute(name, value)
        self._check_formats(weight_mode, param_format, act_format)
        for name, value in values.items():
            super().__setattr__(name, value)
        if not hasattr(self, "saved_input_format"):
            # Note [Packed layers] (csrc/nn/modules.h): the format the layer's input lies on, if
            # the autograd should save it as codes of that format. With pack_counts (int64 [2] on
            # the layer's device), an input off that grid, or NaN, is counted there instead of
            # raising, and the step reads nothing back (Note [Deferred pack checks]).
            self.saved_input_format: Optional[FxpFormat] = None
            self.pack_counts: Optional[Tensor] = None
            self.packed_weights = False

    def pack_weights_(self) -> None:
        """Moves the weight and bias into integer codes of ``param_format``
        (buffers ``weight_codes``/``bias_codes``: a bit stream of B-bit codes
        where B is not 8, 16 or more, :func:`fxp.ops.store_codes`); ``weight`` and ``bias``
        become :class:`PackedParameter` stand-ins of the same shape, which
        receive the gradients. :class:`fxp.optim.QPUSGD` updates the codes
        once it is told where they are (:func:`packed_storage`). Only for
        ``weight_mode="qpu"``, whose weights are on the grid. Pack before
        creating the optimizer: the parameters are new objects."""
        if self.weight_mode != "qpu":
            raise ValueError(f"{type(self).__name__}: only QPU layers can pack their weights (STE keeps a float "
                             f"master copy), but weight_mode is {self.weight_mode!r}")
        if self.packed_weights:
            return
        self._check_packed_padding()  # refused here, as in C++, not at every forward after
        codes = {}
        for name in ("weight", "bias"):  # all packed before any is replaced: a refusal changes nothing
            param = getattr(self, name)
            if param is None:
                continue
            try:
                codes[name] = pack(param.detach(), self.param_format, rounding="exact")
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}.pack_weights_: the {name} is not on the grid of "
                                 f"{self.param_format} ({e}); put it there first "
                                 "(fxp.nn.quantize_layer_parameters_)") from None
        for name, layer_codes in codes.items():
            param = getattr(self, name)
            # Note [Bit-stream storage]: a bit stream for widths other than 8, 16 and > 16.
            self.register_buffer(f"{name}_codes", fxp_ops.store_codes(layer_codes, self.param_format))
            setattr(self, name, PackedParameter(param.detach(), requires_grad=param.requires_grad))
        self._set_codes_format(self.param_format)
        self.packed_weights = True
        self._make_stand_ins()

    def _check_packed_padding(self) -> None:
        """The layer op of packed storage takes numeric zero padding only (Note [Convolution padding])."""
        if isinstance(self, nn.Conv2d) and (self.padding_mode != "zeros" or isinstance(self.padding, str)):
            raise ValueError("QConv2d: packed storage supports numeric zero padding only")

    def _set_codes_format(self, fmt: FxpFormat) -> None:
        # The codes' format travels with them in state_dict (buffer codes_format, [B, F]);
        # the attribute is its host copy, read on every forward without a device sync.
        self.packed_format: FxpFormat = fmt
        self.register_buffer("codes_format", torch.tensor([fmt.total_bits, fmt.frac_bits], device=self.weight.device))

    def _make_stand_ins(self) -> None:
        for name in ("weight", "bias"):
            param = getattr(self, name)
            if param is not None:
                param.data = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)

    def _apply(self, fn, recurse=True):
        names = ("weight_codes", "bias_codes")
        before = {name: getattr(self, name, None) for name in names} if self.packed_weights else {}
        module = super()._apply(fn, recurse)
        if self.packed_weights:  # .to() materializes expanded tensors; shrink them again
            self._make_stand_ins()
            for name in names:  # the step takes contiguous codes (not channels_last)
                codes, old = getattr(self, name, None), before.get(name)
                if codes is None or codes is old:
                    continue
                if old is not None and (codes.device, codes.dtype, codes.shape) == (old.device, old.dtype, old.shape):
                    # A layout change alone (to(memory_format=torch.channels_last)): the codes stay the
                    # tensor an optimizer updates (set_packed_storage), not a copy it would never see.
                    setattr(self, name, old.copy_(codes))
                elif not codes.is_contiguous():
                    setattr(self, name, codes.contiguous())
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.packed_weights:  # the stand-ins carry no values: the codes and their format do
            for name in ("weight", "bias"):
                param = destination.pop(prefix + name, None)
                codes_key = f"{prefix}{name}_codes"
                if param is not None and destination[codes_key].dtype == torch.uint8:
                    # Note [Packed state dicts]: integer codes of the value's shape, whatever the storage,
                    # so loading checks the shape (a bit stream has none).
                    destination[codes_key] = fxp_ops.load_codes(destination[codes_key], self.packed_format,
                                                                param.shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Note [Packed state dicts]: codes load only into a layer of their format
        # (codes_format); a packed layer packs float weights (which must be on its grid),
        # and an unpacked layer unpacks codes, so either kind of state dict loads into
        # either kind of layer, and nothing is loaded in the wrong format.
        state_dict = dict(state_dict)
        names = [name for name in ("weight", "bias") if getattr(self, name) is not None]
        saved_format = self._saved_codes_format(state_dict, prefix, error_msgs)
        reported: set = set()  # codes keys whose error is in error_msgs already
        if self.packed_weights:
            for name in names:
                key, codes_key = prefix + name, f"{prefix}{name}_codes"
                if codes_key not in state_dict and key in state_dict:  # float weights of an unpacked model
                    try:
                        state_dict[codes_key] = pack(state_dict[key].detach().to(self.weight.device),
                                                     self.packed_format, rounding="exact")
                    except ValueError as e:
                        error_msgs.append(f"cannot pack {key} into the codes of {self.packed_format}: {e}")
                        continue
                    saved_format = self.packed_format
                    state_dict[prefix + "codes_format"] = self.codes_format.clone()
                if codes_key in state_dict:
                    codes = self._checked_codes(codes_key, state_dict[codes_key], saved_format, self.packed_format,
                                                getattr(self, name).shape, error_msgs)
                    if codes is not None:  # in this layer's stored form, whichever form was saved
                        state_dict[codes_key] = fxp_ops.store_codes(codes, self.packed_format)
                    else:  # reported: the base class would report it again, against a stream's byte count
                        state_dict.pop(codes_key)
                        reported.add(codes_key)
                stand_in = state_dict.pop(key, None)  # the values are in the codes; check the shape only
                if stand_in is not None and stand_in.shape != getattr(self, name).shape:
                    error_msgs.append(f"size mismatch for {key}: {tuple(stand_in.shape)} in the checkpoint, "
                                      f"{tuple(getattr(self, name).shape)} in the model")
        elif saved_format is not None:  # codes of a packed model into an unpacked layer: unpack them
            for name in names:
                codes_key = f"{prefix}{name}_codes"
                if codes_key not in state_dict:
                    continue
                codes = state_dict.pop(codes_key)
                target = self.param_format if self.weight_mode == "qpu" else saved_format
                codes = self._checked_codes(codes_key, codes, saved_format, target, getattr(self, name).shape,
                                            error_msgs)
                if codes is not None:
                    state_dict[prefix + name] = fxp_ops.unpack(codes, saved_format, dtype=getattr(self, name).dtype)
            state_dict.pop(prefix + "codes_format", None)
        before = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.packed_weights:  # a packed layer has no float weights to load
            skip = {prefix + n for n in names} | reported
            missing_keys[before:] = [k for k in missing_keys[before:] if k not in skip]

    @staticmethod
    def _saved_codes_format(state_dict, prefix, error_msgs) -> Optional[FxpFormat]:
        fmt = state_dict.get(prefix + "codes_format")
        has_codes = any(f"{prefix}{n}_codes" in state_dict for n in ("weight", "bias"))
        if fmt is None:
            if has_codes:
                error_msgs.append(f"{prefix}weight_codes comes without {prefix}codes_format, so its format is "
                                  f"unknown (a state dict of an older fxp?)")
            return None
        try:
            values = fmt.tolist() if isinstance(fmt, Tensor) else fmt
            if not isinstance(values, list) or any(isinstance(v, float) and not v.is_integer() for v in values):
                raise ValueError(f"expected [total_bits, frac_bits] as whole numbers, but got {values}")
            return FxpFormat(*(int(v) for v in values))
        except (TypeError, ValueError) as e:
            error_msgs.append(f"{prefix}codes_format is not a valid format: {e}")
            return None

    @staticmethod
    def _checked_codes(key: str, codes: Tensor, saved: Optional[FxpFormat], expected: FxpFormat, shape,
                       error_msgs: list) -> Optional[Tensor]:
        """The integer codes (of ``shape``) that ``codes``, stored codes of format ``saved``
        (integer codes or a bit stream), hold, if they may load where ``expected`` codes
        go; else None and an error message."""
        if saved is None:
            return None
        if saved != expected:
            error_msgs.append(f"{key} holds codes of {saved}, but the layer's format is {expected}")
            return None
        if codes.dtype == torch.uint8:  # Note [Bit-stream storage]: a stream has no shape to check, only a length
            try:
                codes = fxp_ops.load_codes(codes, saved, shape)
            except RuntimeError as e:
                error_msgs.append(f"{key} is not a bit stream of {saved} codes for shape {tuple(shape)}: {e}")
                return None
        if codes.dtype != saved.storage_dtype:
            error_msgs.append(f"{key} has dtype {codes.dtype}, but codes of {saved} are {saved.storage_dtype} "
                              f"(or a uint8 bit stream)")
        elif codes.shape != shape:
            error_msgs.append(f"size mismatch for {key}: {tuple(codes.shape)} in the checkpoint, {tuple(shape)} "
                              f"in the model")
        elif codes.numel() and not (saved.code_min <= int(codes.min()) and int(codes.max()) <= saved.code_max):
            error_msgs.append(f"{key} holds codes outside the range [{saved.code_min}, {saved.code_max}] of {saved}")
        else:
            return codes
        return None

    def _layer_output(self, x: Tensor, op, **conv_args) -> Tensor:
        """The quantized conv/linear output through fxp's layer op (packed storage): the op
        quantizes its own output in place, with the draws quantize_ste would take."""
        fmt, counts = self.saved_input_format, getattr(self, "pack_counts", None)  # absent in older pickles
        out = dict(output_format=self.act_format, output_rounding=_OP_ROUNDING[self.act_rounding])
        if self.packed_weights:
            if self.param_format != self.packed_format:
                raise ValueError(f"{type(self).__name__}: param_format is {self.param_format}, but the packed "
                                 f"weights are codes of {self.packed_format}; a packed layer's format is fixed")
            if any(p.numel() > 1 and any(st != 0 for st in p.stride()) for p in self.parameters(recurse=False)):
                self._make_stand_ins()  # a deep copy materializes the stand-ins at full size
            return op(x, self.weight, self.bias, **conv_args, input_format=fmt, weight_codes=self.weight_codes,
                      bias_codes=getattr(self, "bias_codes", None), param_format=self.param_format,
                      pack_counts=counts, **out)
        bias = None if self.bias is None else self._weight(self.bias)
        return op(x, self._weight(self.weight), bias, **conv_args, input_format=fmt, pack_counts=counts,
                  **out)

    def _weight(self, w: Tensor) -> Tensor:
        if self.weight_mode == "ste":  # quantize on read; the fp32 master copy gets the gradient
            return quantize_ste(w, self.param_format, rounding=_OP_ROUNDING[self.act_rounding])
        return w  # fp32, or qpu: already on the grid

    def _output(self, y: Tensor) -> Tensor:
        if self.weight_mode == "fp32":
            return y
        return quantize_ste(y, self.act_format, rounding=_OP_ROUNDING[self.act_rounding])

    def _quantization_repr(self) -> str:
        # The layer classes' extra_repr appends this to nn.Linear's or nn.Conv2d's, which come first in their MRO.
        text = f"weight_mode={self.weight_mode}"
        if self.weight_mode != "fp32":
            text += f", param_format={self.param_format}, act_format={self.act_format}, act_rounding={self.act_rounding}"
        return text + (", packed" if self.packed_weights else "")


class QLinear(nn.Linear, _QuantizedLayer):
    """``nn.Linear`` whose weights follow ``weight_mode`` and whose output is
    quantized to ``act_format`` with a straight-through gradient."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, weight_mode: WeightMode = "fp32",
                 param_format: Optional[FxpFormat] = None, act_format: Optional[FxpFormat] = None,
                 act_rounding: InferenceRounding = "sr", **kwargs) -> None:
        super().__init__(in_features, out_features, _bool("QLinear", "bias", bias, prefix=""), **kwargs)
        self._setup(weight_mode, param_format, act_format, act_rounding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quantization_repr()}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_layer()
        if self.packed_weights or self.saved_input_format is not None:
            return self._layer_output(x, fxp_ops.linear)
        bias = None if self.bias is None else self._weight(self.bias)
        return self._output(F.linear(x, self._weight(self.weight), bias))


class QConv2d(nn.Conv2d, _QuantizedLayer):
    """``nn.Conv2d`` with the weight modes and output quantization of :class:`QLinear`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, weight_mode: WeightMode = "fp32",
                 param_format: Optional[FxpFormat] = None, act_format: Optional[FxpFormat] = None,
                 act_rounding: InferenceRounding = "sr", **kwargs) -> None:
        if "bias" in kwargs:  # nn.Conv2d would take any value for its truth
            kwargs["bias"] = _bool("QConv2d", "bias", kwargs["bias"], prefix="")
        super().__init__(in_channels, out_channels, kernel_size, **kwargs)
        self._setup(weight_mode, param_format, act_format, act_rounding)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._quantization_repr()}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_layer()
        if self.packed_weights or self.saved_input_format is not None:
            self._check_packed_padding()
            unbatched = x.dim() == 3  # (C, H, W), as nn.Conv2d takes it; fxp::conv2d takes 4-D
            y = self._layer_output(x.unsqueeze(0) if unbatched else x, fxp_ops.conv2d, stride=self.stride,
                                   padding=self.padding, dilation=self.dilation, groups=self.groups)
            return y.squeeze(0) if unbatched else y
        bias = None if self.bias is None else self._weight(self.bias)
        return self._output(self._conv_forward(x, self._weight(self.weight), bias))


class PaperCNN(nn.Module):
    """The network of the paper's Table 1 (Gupta et al. 2015): 184,490 parameters.

    conv 5x5 1->32, max-pool 2; conv 5x5 32->64, max-pool 2; linear 1024->128;
    linear 128->10. No conv bias, linear bias; ReLU after every layer but the last.
    Every conv and linear output is quantized (unless the method is fp32).
    Each ReLU + max-pool is :func:`fxp.ops.relu_max_pool2d`, as in fxp-train
    (torch's values and gradients; its C++ autograd function leaves the
    model, even in fp32, outside ``torch.func`` transforms).
    """

    def __init__(self, method: Method = "fp32", param_format: Optional[FxpFormat] = None,
                 act_format: Optional[FxpFormat] = None, act_rounding: InferenceRounding = "sr") -> None:
        # Packed storage: pack_(), after quantize_parameters_() (see pack_model_).
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
        """QPU's initialization: every parameter onto the grid (see :func:`quantize_layer_parameters_`)."""
        quantize_layer_parameters_(self, rounding, seed)

    def pack_(self) -> "PaperCNN":
        """Packed storage for the network (like ``fxp-train --packed``): QPU
        weights as codes, and the saved inputs of conv2, fc1 and fc2 (layer
        outputs on the act grid) as codes. Call after :meth:`quantize_parameters_`.
        (Each ReLU + max-pool is :func:`fxp.ops.relu_max_pool2d` either way.)"""
        if self.method == "fp32":
            raise ValueError("PaperCNN.pack_: fp32 has no grid to pack onto")
        if self.method in ("sqpu", "hteqpu"):
            for layer in (self.conv1, self.conv2, self.fc1, self.fc2):
                layer.pack_weights_()
        for prev, layer in ((self.conv1, self.conv2), (self.conv2, self.fc1), (self.fc1, self.fc2)):
            layer.saved_input_format = prev.act_format
        return self

    def forward(self, x: Tensor) -> Tensor:
        x = fxp_ops.relu_max_pool2d(self.conv1(x), 2)
        x = fxp_ops.relu_max_pool2d(self.conv2(x), 2)
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)  # logits; the softmax lives in the loss


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _check_replaceable(path: str, child: nn.Module) -> None:
    """Refuses a layer whose twin would compute otherwise or lose something."""
    base = nn.Linear if isinstance(child, nn.Linear) else nn.Conv2d
    # A subclass that computes as its base (nn.MultiheadAttention's out_proj) has a twin; one with its own
    # forward, or a parametrization (weight_norm, ...), has none.
    own_forward = any(getattr(type(child), f) is not getattr(base, f)
                      for f in ("forward", "_conv_forward") if hasattr(base, f))
    if own_forward or parametrize.is_parametrized(child):
        raise TypeError(f"quantize_model: {path} is a {type(child).__name__}, a subclass of nn.{base.__name__} with "
                        f"{'its own forward' if own_forward else 'parametrizations'}, which its quantized twin "
                        "would lose; replace it by hand or leave it out of the model")
    hooked = [h for h in _HOOKS if getattr(child, h, None)]
    if hooked:
        raise ValueError(f"quantize_model: {path} has hooks ({', '.join(hooked)}), which would stay on the layer "
                         "it replaces; quantize the model before registering hooks")


def _quantized_twin(child: nn.Module, layer_kwargs: dict) -> nn.Module:
    """The quantized layer that takes ``child``'s place, holding ``child``'s own
    parameter objects: their ``requires_grad``, memory format, ties to other
    modules and any optimizer already built over them carry over."""
    if isinstance(child, nn.Linear):
        new = QLinear(child.in_features, child.out_features, child.bias is not None, **layer_kwargs, device="meta")
    else:
        new = QConv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                      padding=child.padding, dilation=child.dilation, groups=child.groups,
                      bias=child.bias is not None, padding_mode=child.padding_mode, **layer_kwargs, device="meta")
    new.weight = child.weight
    new.bias = child.bias
    new.train(child.training)
    return new


def _layer_slots(model: nn.Module, path: str = ""):
    """(parent, name, path, layer) for every slot that holds a layer, a repeated module in each of its slots."""
    for name, child in list(model._modules.items()):  # every slot: named_children skips a repeated module
        if child is None:
            continue
        child_path = f"{path}.{name}" if path else name
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            yield model, name, child_path, child
        else:
            yield from _layer_slots(child, child_path)


def _replace_layers(model: nn.Module, layer_kwargs: dict) -> None:
    slots = list(_layer_slots(model))
    for _, _, path, layer in slots:  # every refusal before anything changes
        if not isinstance(layer, (QLinear, QConv2d)):
            _check_replaceable(path, layer)
    twins: dict = {}  # a layer used in several places (or twice in one) gets one twin, so it stays shared
    for parent, name, _, layer in slots:
        if isinstance(layer, (QLinear, QConv2d)):
            layer._setup(**layer_kwargs)
            continue
        if id(layer) not in twins:
            twins[id(layer)] = _quantized_twin(layer, layer_kwargs)
        setattr(parent, name, twins[id(layer)])


def quantize_model(model: nn.Module, method: Method, param_format: Optional[FxpFormat] = None,
                   act_format: Optional[FxpFormat] = None, act_rounding: InferenceRounding = "sr",
                   seed: int = 0, packed: bool = False) -> nn.Module:
    """Replaces every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` (in place) by
    its quantized twin, which holds the layer's own parameter objects (so their
    ``requires_grad``, memory format and ties, and an optimizer built over
    them, carry over) and its train/eval mode; a layer used in several places
    gets one twin. For ``sqpu``/``hteqpu`` the weights are then put on the grid
    with the update rounding (SR/HTE). With ``packed``, they are then stored as
    integer codes (:func:`pack_model_`; new parameter objects). Returns ``model``.

    Refused, before anything changes: ``model`` itself a layer (it cannot be
    replaced in place: wrap it in ``nn.Sequential``), subclasses of the two
    layers with their own forward or parametrizations (which the twin would
    lose; one that computes as its base, as ``nn.MultiheadAttention``'s
    ``out_proj``, is replaced) and layers with hooks. With ``packed``, a
    method other than sqpu or hteqpu, and a parameter shared by two layers
    (each layer keeps its own codes), are refused too."""
    _module("quantize_model", model, prefix="")
    if method not in METHODS:
        raise ValueError(f"quantize_model: method must be one of {', '.join(METHODS)}, but got {method!r}")
    seed = _seed("quantize_model", "seed", seed, prefix="")
    packed = _bool("quantize_model", "packed", packed, prefix="")
    if packed and WEIGHT_MODES[method] != "qpu":  # would pack nothing, silently
        raise ValueError(f"quantize_model: packed storage is for the QPU methods (sqpu, hteqpu), but method is "
                         f"{method!r}" + (" (STE keeps a float master copy)" if method == "ste" else ""))
    layer_kwargs = dict(weight_mode=WEIGHT_MODES[method], param_format=param_format, act_format=act_format,
                        act_rounding=act_rounding)
    if isinstance(model, (nn.Linear, nn.Conv2d)) and not isinstance(model, (QLinear, QConv2d)):
        raise TypeError(f"quantize_model: the model is itself a {type(model).__name__}, which cannot be replaced in "
                        "place; pass nn.Sequential(layer), or build a fxp.nn.QLinear/QConv2d directly")
    if isinstance(model, (QLinear, QConv2d)):
        model._setup(**layer_kwargs)
    _replace_layers(model, layer_kwargs)
    if method in ("sqpu", "hteqpu"):
        quantize_layer_parameters_(model, "stochastic" if method == "sqpu" else "nearest_even", seed)
    if packed:
        pack_model_(model)
    return model


def pack_model_(model: nn.Module) -> nn.Module:
    """Stores the weights of every QPU layer of ``model`` as integer codes
    (:meth:`QLinear.pack_weights_`); :class:`fxp.optim.QPUSGD` then updates the
    codes and keeps its momentum as codes. Saved inputs are packed per layer,
    by setting ``layer.saved_input_format`` to the format its input lies on
    (only the model knows what feeds a layer; :meth:`PaperCNN.pack_` does it).
    Call after the model is on its device. Returns ``model``. A parameter
    shared by two layers is refused before anything is packed: each layer
    would keep codes of its own, and the tie would be lost."""
    _module("pack_model_", model, prefix="")
    layers = [m for m in model.modules() if isinstance(m, (QLinear, QConv2d)) and m.weight_mode == "qpu"]
    owner: dict = {}
    for layer in layers:
        for p in layer.parameters(recurse=False):
            if owner.setdefault(id(p), layer) is not layer:
                raise ValueError(f"pack_model_: a {tuple(p.shape)} parameter is shared by two layers "
                                 f"({owner[id(p)]!r} and {layer!r}); packed storage keeps codes per layer")
    for layer in layers:
        layer._check_packed_padding()  # before any layer is packed
    for layer in layers:
        layer.pack_weights_()
    return model


class PackedStorage(NamedTuple):
    """Where a packed parameter's value lives: the stand-in that receives the
    gradient, its integer codes, and their format. The optimizers take these
    (:meth:`fxp.optim.QPUSGD.set_packed_storage`; in C++, ``fxp::nn::PackedStorage``
    holds the same, with the format as total_bits and frac_bits)."""
    parameter: Tensor
    codes: Tensor
    format: FxpFormat


def packed_storage(model: nn.Module) -> list[PackedStorage]:
    """The packed storage of every packed layer of ``model``, in parameter order."""
    _module("packed_storage", model, prefix="")
    out = []
    for layer in model.modules():
        if isinstance(layer, (QLinear, QConv2d)) and layer.packed_weights:
            for name in ("weight", "bias"):
                if getattr(layer, name) is not None:
                    out.append(PackedStorage(getattr(layer, name), getattr(layer, f"{name}_codes"), layer.packed_format))
    return out


def quantize_layer_parameters_(model: nn.Module, rounding: str = "stochastic", seed: int = 0) -> None:
    """Puts the parameters of every quantized layer of ``model`` on its layer's
    parameter grid: QPU's initialization, one ``torch.ops.fxp.quantize_parameters_``
    call for the whole model (Note [QPU initialization]): tensor ``k``, in
    parameter order over the model's quantized layers, rounds with its own
    Philox offset ``k``, as ``fxp::nn::PaperCNN::quantize_parameters_`` does in C++.
    Layers in fp32 mode are left as they are (and not counted in ``k``)."""
    _module("quantize_layer_parameters_", model, prefix="")
    seed = _seed("quantize_layer_parameters_", "seed", seed, prefix="")  # Note [64-bit Philox keys in Python]
    params, total_bits, frac_bits = [], [], []
    for layer in model.modules():
        # A layer in fp32 mode keeps its float values, whatever format it was given (as in C++).
        if isinstance(layer, (QLinear, QConv2d)) and layer.weight_mode != "fp32":
            if layer.packed_weights:
                raise ValueError("quantize_layer_parameters_: the weights are packed (codes are on the grid already)")
            for p in layer.parameters(recurse=False):
                params.append(p)
                total_bits.append(layer.param_format.total_bits)
                frac_bits.append(layer.param_format.frac_bits)
    with torch.no_grad():
        torch.ops.fxp.quantize_parameters_(params, total_bits, frac_bits, rounding, seed)


def recalibrate_batch_norm(model: nn.Module, batches: Iterable, num_batches: Optional[int] = None) -> int:
    """Recomputes the running statistics of every batch norm layer of ``model``
    at its current parameters ("precise BN", Note [Batch norm recalibration];
    ``fxp-train --bn-recalibration-batches`` in C++): each layer's running mean
    and variance become the plain average over the batches, in training-mode
    forwards under ``torch.no_grad()``. ``batches`` yields inputs, or tuples
    (such as a DataLoader's ``(x, y)``) whose first element is the input; at most
    ``num_batches`` are taken. Returns how many were.

    The random number generators (CPU, and the CUDA devices of the model's
    tensors) are restored afterwards, so the forwards' stochastic rounding does
    not change the training that follows; so are each module's training flag
    and each batch norm's momentum. If a forward raises, the old statistics stay.
    """
    _module("recalibrate_batch_norm", model, prefix="")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"recalibrate_batch_norm: batches must be an iterable of inputs (a DataLoader, a list of "
                        f"tensors), but got {type(batches).__name__}")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, numbers.Integral)
                                    or num_batches < 1):
        raise ValueError(f"recalibrate_batch_norm: num_batches must be a positive int, but got {num_batches!r}")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m.momentum, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
             for m in norms]
    training = [(m, m.training) for m in model.modules()]
    devices = sorted({t.device.index or 0 for t in itertools.chain(model.parameters(), model.buffers())
                      if t.device.type == "cuda"})
    count, done = 0, False
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # the cumulative average: every batch weighs alike
            model.train()
            for batch in (batches if num_batches is None else itertools.islice(batches, num_batches)):
                model(batch[0] if isinstance(batch, (tuple, list)) else batch)
                count += 1
        if count == 0:
            raise ValueError("recalibrate_batch_norm: got no batches")
        done = True
    finally:
        for m, flag in training:
            m.training = flag
        with torch.no_grad():
            for m, (momentum, mean, var, tracked) in zip(norms, saved):
                m.momentum = momentum
                if not done:
                    m.running_mean.copy_(mean)
                    m.running_var.copy_(var)
                    m.num_batches_tracked.copy_(tracked)
    return count
