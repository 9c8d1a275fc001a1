"""AdaPT in any PyTorch training loop (docs/adapt.md).

:class:`AdaptController` drives the per-layer formats of a model's
:class:`fxp.nn.QLinear` and :class:`fxp.nn.QConv2d` layers. The controller
itself is fxp's C++ one (``torch.classes.fxp.AdaptController``, the same code
``fxp-train --method adapt`` runs); this module only hands it the layers'
parameters and gives the layers the formats it chooses.

With a float32 master copy (the paper's AdaPT; layers with ``weight_mode="ste"``)::

    controller = fxp.adapt.AdaptController(model, l1=1e-4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        controller.step(optimizer, loss, x.shape[0])  # normalizes, accumulates and updates in one pass

Without one (``fxp-train --update qpu``; layers with ``weight_mode="qpu"``)::

    controller = fxp.adapt.AdaptController(model)
    fxp.nn.quantize_layer_parameters_(model, seed=seed)  # onto each layer's start grid
    optimizer = fxp.optim.QPUSGD(controller.parameter_groups(), lr=0.01, momentum=0.9, seed=seed)
    # a group per layer, keyed seed + i: on a GPU keep torch.manual_seed's seed out of that range (QPUSGD)
    ...  # the same loop; each layer's group follows its layer's format
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Dict, Sequence, Tuple

import torch
from torch import Tensor, nn

from .format import FxpFormat
from .nn import QConv2d, QLinear
from .ops import _int, _module, _number, _str
from .optim import QPUSGD

__all__ = ["AdaptController"]


def _pair(name: str, value) -> list:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in value)):
        raise TypeError(f"fxp.adapt: {name} must be two ints (lower, upper), but got {value!r}")
    return [int(v) for v in value]


# Each adapted layer's controller, while it is on (not removed, not collected): a
# second controller over a layer would count its multiply-adds twice and set its
# formats against the first. Keyed by the module itself, so that a copy of the
# model (deepcopy, pickle), whose hooks come along, may have a controller of its own.
_controller_of: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class _MaddsCounter:
    """A forward hook that keeps its layer's last input rank and output shape,
    from which the controller counts the layer's multiply-adds per sample
    (Note [Multiply-adds per sample], in C++). A module, not a closure, so
    that the model still pickles."""

    def __init__(self) -> None:
        self.input_dim = -1  # not run yet
        self.output_shape: list = []

    def __call__(self, module: nn.Module, args, *kwargs_and_output) -> None:
        # Registered with_kwargs, so that layer(x=...) counts too: (kwargs, output); a hook pickled
        # before then is called without them: (output,).
        kwargs, output = kwargs_and_output if len(kwargs_and_output) == 2 else ({}, kwargs_and_output[0])
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, Tensor) and isinstance(output, Tensor):
            self.input_dim, self.output_shape = x.dim(), list(output.shape)


class AdaptController:
    """AdaPT's controller over ``model``'s quantized layers (module order).

    Every :class:`~fxp.nn.QLinear` and :class:`~fxp.nn.QConv2d` of ``model``
    is adapted; its weight and bias share its format, and its activations take
    the same format. The layers are all STE layers (``weight_mode="ste"``: a
    float32 master copy, read quantized) or all QPU layers (``"qpu"``: no
    master copy; train them with :meth:`step` and a :class:`fxp.optim.QPUSGD`
    over :meth:`parameter_groups`, Note [AdaPT with QPU]). Options are the paper's defaults (docs/adapt.md): ``start``
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
        _module("adapt", model)
        if not isinstance(start, FxpFormat):
            raise TypeError(f"fxp.adapt: start must be an FxpFormat, but got {start!r}")
        self._names, self._layers = [], []
        self._weight_mode = None
        for name, module in model.named_modules():
            if isinstance(module, (QLinear, QConv2d)):
                label = name or type(module).__name__
                if module.weight_mode not in ("ste", "qpu"):
                    raise ValueError(f"fxp.adapt: layer {label} has weight_mode {module.weight_mode!r}; AdaPT's "
                                     f"layers need weight_mode='ste' (a float32 master copy read quantized) or "
                                     f"'qpu' (parameters on their format's grid)")
                if self._weight_mode not in (None, module.weight_mode):
                    raise ValueError(f"fxp.adapt: layer {label} has weight_mode {module.weight_mode!r}, but the "
                                     f"layers before it {self._weight_mode!r}; AdaPT's layers all keep a master "
                                     f"copy (ste) or none (qpu)")
                self._weight_mode = module.weight_mode
                if module.packed_weights or module.saved_input_format is not None:
                    raise ValueError(f"fxp.adapt: layer {label} saves its inputs or weights as codes of a fixed "
                                     f"format (pack_), but AdaPT changes the formats; adapt a model that is not packed")
                owner = _controller_of.get(module)
                if owner is not None and owner() is not None:
                    raise ValueError(f"fxp.adapt: layer {label} is adapted by another AdaptController already; "
                                     f"remove() that first")
                self._names.append(name)
                self._layers.append(module)
        if not self._layers:
            raise ValueError("fxp.adapt: the model has no fxp.nn.QLinear or QConv2d layers to adapt")
        parameters = [list(layer.parameters(recurse=False)) for layer in self._layers]
        self._core = torch.classes.fxp.AdaptController(
            self._names, [p for ps in parameters for p in ps], [len(ps) for ps in parameters],
            [start.total_bits, start.frac_bits], _pair("resolution", resolution), _pair("lookback", lookback),
            _number("adapt", "lookback_momentum", lookback_momentum), _int("adapt", "buffer_bits", buffer_bits),
            _str("adapt", "strategy", strategy), _str("adapt", "log_form", log_form), _number("adapt", "l1", l1))
        self._l1 = float(l1)
        # Each layer's forward multiply-adds per sample, from its last output (the performance model).
        self._counters = [_MaddsCounter() for _ in self._layers]
        self._hooks = [layer.register_forward_hook(c, with_kwargs=True)
                       for layer, c in zip(self._layers, self._counters)]
        self._removed = False
        self._apply_formats()
        for layer in self._layers:  # last: a controller whose construction failed claims no layer
            _controller_of[layer] = weakref.ref(self)

    def _check_attached(self, what: str) -> None:
        if self._removed:
            raise RuntimeError(f"fxp.adapt: {what} after remove(): the controller no longer counts its layers' "
                               f"multiply-adds nor sets their formats")

    def _set_forward_shapes(self) -> None:
        self._core.set_forward_shapes([c.input_dim for c in self._counters],
                                      [c.output_shape for c in self._counters])

    def _apply_formats(self) -> None:
        flat = self._core.formats()
        for i, layer in enumerate(self._layers):
            layer.param_format = layer.act_format = FxpFormat(flat[2 * i], flat[2 * i + 1])

    @staticmethod
    def _step_arguments(loss, batch_size) -> Tuple[float, int]:
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"fxp.adapt: loss must be a number or a one-element tensor, but got a tensor of "
                                 f"shape {tuple(loss.shape)}")
            loss = loss.detach().item()
        if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
            raise TypeError(f"fxp.adapt: batch_size must be an int, but got {batch_size!r}")
        if batch_size < 1:
            raise ValueError(f"fxp.adapt: the batch size must be positive, but got {batch_size}")
        return _number("adapt", "loss", loss), int(batch_size)

    def after_backward(self, loss, batch_size: int) -> bool:
        """Between ``loss.backward()`` and ``optimizer.step()``: adds L1's
        gradient, normalizes each layer's gradient (Eq. 3.4), accumulates it,
        adapts the strategy from ``loss`` (a number or a 0-dim tensor), and
        switches the layers whose lookback is due. Returns whether a layer's
        format changed (the layers have their new formats already). For STE
        layers; :meth:`step` does the same and the update in one pass."""
        self._check_attached("after_backward()")
        if self._weight_mode == "qpu":
            raise ValueError("fxp.adapt: QPU layers change format with their optimizer's groups; call "
                             "controller.step(optimizer, loss, batch_size) with a fxp.optim.QPUSGD over "
                             "controller.parameter_groups() in place of after_backward and optimizer.step()")
        loss, batch_size = self._step_arguments(loss, batch_size)
        self._set_forward_shapes()
        switched = self._core.after_backward(loss, batch_size)
        if switched:
            self._apply_formats()
        return switched

    def step(self, optimizer: torch.optim.Optimizer, loss, batch_size: int) -> bool:
        """After ``loss.backward()``, in place of :meth:`after_backward` and
        ``optimizer.step()``: AdaPT's gradient work fused into the update, as
        ``fxp-train`` runs it (Note [AdaPT's fused step]). Returns whether a
        layer's format changed; layers switch after the update, and ``.grad``
        keeps the raw gradients (in the two fused forms). A non-finite
        ``loss`` changes nothing, with any optimizer: no update either.

        - A :class:`fxp.optim.QPUSGD` over :meth:`parameter_groups` (QPU layers):
          the QPU step normalizes and accumulates as it applies (Note [AdaPT's
          fused QPU step]); at a switch the layer's group moves to the new
          format (:meth:`fxp.optim.QPUSGD.change_format`). The optimizer's step
          hooks do not run.
        - A ``torch.optim.SGD`` over exactly the adapted layers' parameters, in
          one group, without dampening, ``maximize``, strided momentum buffers or
          step hooks (STE layers; strided parameters step in a contiguous copy): one pass,
          ``fxp.adapt_sgd_step_``, with torch's formula; its momentum buffers
          stay in the optimizer's state.
        - Any other optimizer (STE layers): :meth:`after_backward` (which
          writes the normalized gradients into ``.grad``), then its ``step()``.
        """
        self._check_attached("step()")
        loss, batch_size = self._step_arguments(loss, batch_size)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"fxp.adapt: optimizer must be a torch.optim.Optimizer, but got "
                            f"{type(optimizer).__name__}")
        if isinstance(optimizer, QPUSGD):
            self._check_quantized_updates(optimizer)
        elif self._weight_mode == "qpu":
            raise ValueError(f"fxp.adapt: QPU layers need a fxp.optim.QPUSGD over controller.parameter_groups(), "
                             f"but got {type(optimizer).__name__}")
        if not math.isfinite(loss):  # a diverged step changes nothing, in any form (as fxp-train)
            return False
        if not isinstance(optimizer, QPUSGD) and not self._fusable_sgd(optimizer):
            switched = self.after_backward(loss, batch_size)
            optimizer.step()
            return switched
        self._set_forward_shapes()
        if isinstance(optimizer, QPUSGD):
            switched = self._quantized_step(optimizer, loss, batch_size)
        else:
            switched = self._sgd_step(optimizer, loss, batch_size)
        # As a torch optimizer's step() marks it, so that an LR scheduler does not warn that no step was taken.
        optimizer._opt_called = True
        if switched:
            self._apply_formats()
        return switched

    def _sgd_step(self, optimizer: torch.optim.SGD, loss: float, batch_size: int) -> bool:
        """The fused SGD step; the momentum buffers those torch.optim.SGD would keep."""
        group = optimizer.param_groups[0]
        buffers = []
        if group["momentum"] != 0:
            for p in self._parameters():
                if p.grad is not None:
                    state = optimizer.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    buffers.append(state["momentum_buffer"])
        return self._core.sgd_step(loss, batch_size, float(group["lr"]), float(group["momentum"]),
                                   float(group["weight_decay"]), bool(group["nesterov"]), buffers)

    def _quantized_step(self, optimizer: QPUSGD, loss: float, batch_size: int) -> bool:
        """The fused QPU step, then each switched layer's group moved to its new format."""
        before = self._core.formats()
        norms, stepped = self._core.step_gradients()
        optimizer.step_normalized(self._core.accumulated(), norms, self._l1)
        switched = self._core.finish_step(loss, batch_size, stepped)
        after = self._core.formats() if switched else before
        for i in range(len(self._layers)):
            if after[2 * i:2 * i + 2] != before[2 * i:2 * i + 2]:
                # Note [AdaPT with QPU]: the group moves to the new grid before its density is measured there.
                optimizer.change_format(i, FxpFormat(after[2 * i], after[2 * i + 1]))
                self._core.measure_density(i)
        return switched

    def _parameters(self):
        return [p for layer in self._layers for p in layer.parameters(recurse=False)]

    def _fusable_sgd(self, optimizer) -> bool:
        """Whether ``optimizer`` is a torch.optim.SGD that the fused step can take."""
        if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
            return False
        from torch.optim import optimizer as torch_optimizer
        if (optimizer._optimizer_step_pre_hooks or optimizer._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks):
            return False  # its step() runs hooks that the fused step would skip
        group = optimizer.param_groups[0]
        if group.get("dampening", 0) != 0 or group.get("maximize", False) or group.get("differentiable", False):
            return False
        held, adapted = group["params"], self._parameters()
        if len(held) != len(adapted) or {id(p) for p in held} != {id(p) for p in adapted}:
            return False
        # The fused op takes contiguous momentum buffers (torch's SGD may have made one with a gradient's
        # strides); a strided parameter is updated in a contiguous copy by the controller.
        buffers = (optimizer.state[p].get("momentum_buffer") for p in adapted if p in optimizer.state)
        return all(b is None or b.is_contiguous() for b in buffers)

    def _check_quantized_updates(self, optimizer: QPUSGD) -> None:
        if self._weight_mode != "qpu":
            raise ValueError("fxp.adapt: a fxp.optim.QPUSGD updates QPU layers (weight_mode='qpu'), but these "
                             "layers keep a float32 master copy (weight_mode='ste')")
        groups = optimizer.param_groups
        if len(groups) != len(self._layers):
            raise ValueError(f"fxp.adapt: the optimizer has {len(groups)} parameter groups, but quantized updates "
                             f"need one per adapted layer ({len(self._layers)}): "
                             f"QPUSGD(controller.parameter_groups(), ...)")
        formats = self._core.formats()
        for i, (group, layer) in enumerate(zip(groups, self._layers)):
            params = list(layer.parameters(recurse=False))
            if len(group["params"]) != len(params) or any(p is not q for p, q in zip(group["params"], params)):
                raise ValueError(f"fxp.adapt: parameter group {i} of the optimizer is not layer "
                                 f"{self._names[i] or i}'s parameters")
            fmt = FxpFormat(formats[2 * i], formats[2 * i + 1])
            if (group["total_bits"], group["frac_bits"]) != (fmt.total_bits, fmt.frac_bits):
                raise ValueError(f"fxp.adapt: parameter group {i} updates "
                                 f"{FxpFormat(group['total_bits'], group['frac_bits'])}, but layer "
                                 f"{self._names[i] or i} is at {fmt}")

    def parameter_groups(self) -> list:
        """Parameter groups for a :class:`fxp.optim.QPUSGD` that :meth:`step`
        takes: one per adapted layer, in order, at the layer's format, its
        momentum at the same format (it follows the layer's). Parameters
        outside the adapted layers (batch norm's) need an optimizer of their
        own, stepped beside it."""
        groups = []
        for layer, fmt in zip(self._layers, self.formats().values()):
            groups.append({"params": list(layer.parameters(recurse=False)), "total_bits": fmt.total_bits,
                           "frac_bits": fmt.frac_bits, "momentum_total_bits": fmt.total_bits,
                           "momentum_frac_bits": fmt.frac_bits})
        return groups

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
        self._check_attached("load_state_dict()")
        if not isinstance(state, dict):
            raise TypeError(f"fxp.adapt: load_state_dict takes the dict state_dict() returns, but got "
                            f"{type(state).__name__}")
        self._core.load_state_dict(state)
        self._apply_formats()

    def remove(self) -> None:
        """Removes the forward hooks that count the layers' multiply-adds and
        ends the controller: the layers keep their formats, another controller
        may adapt them, and :meth:`after_backward`, :meth:`step` and
        :meth:`load_state_dict` raise (as :class:`fxp.msq.MsqController`'s do)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._removed = True
        for layer in self._layers:
            owner = _controller_of.get(layer)
            if owner is not None and owner() is self:
                del _controller_of[layer]

    def __deepcopy__(self, memo):
        raise TypeError("fxp.adapt: an AdaptController cannot be deep-copied: it is bound to its model's layers. "
                        "Copy the model, build a controller over the copy, and load_state_dict() this one's state")

    def __repr__(self) -> str:
        formats = ", ".join(f"{n}={f.total_bits}.{f.frac_bits}" for n, f in self.formats().items())
        return f"AdaptController(strategy={self.strategy}, {formats})"
