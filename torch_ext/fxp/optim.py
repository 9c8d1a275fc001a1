"""Optimizers that keep parameters on a fixed-point grid (QPU, Buron et al. 2025)."""

from __future__ import annotations

import numbers
from typing import Any, Iterable, Literal, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .format import FxpFormat
from .ops import _bool, _int, _number, _seed, _str, load_codes, pack, store_codes, stored_dtype, unpack

__all__ = ["QPUSGD", "quantize_parameters_", "make_optimizer"]

# What to do about a sparse gradient (the op and QpuSgd say the same).
_DENSE_HINT = "a sparse gradient, as from nn.Embedding(sparse=True), can be made dense with .to_dense()"


def _refuse_state_under_capture(device: torch.device, what: str) -> None:
    """Note [State made under capture] (csrc/optim/qpu_sgd.cpp): state made during a CUDA-graph capture
    would be made again, reset, at every replay; the first step that makes it must be eager."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"QPUSGD: {what} is made on the first step that needs it, and a CUDA graph "
                                   "would make it again at every replay; take that step before capturing "
                                   "(warm up on a side stream)")

Rounding = Literal["nearest_even", "stochastic"]
MomentumForm = Literal["standard", "paper_eq6"]


class QPUSGD(Optimizer):
    """SGD with quantized parameter updates: SQPU (``rounding="stochastic"``) or
    HTEQPU (``rounding="nearest_even"``). No float master copy is kept.

    Per parameter ``w`` with gradient ``g`` and momentum buffer ``v`` (exact
    arithmetic on the codes in the gradients' dtype, docs/design.md)::

        v = momentum * v + (g + weight_decay * w)
        w = Q(w - lr * v)              # nesterov: Q(w - lr * (g' + momentum * v))
        v is stored as Q(v)            # in momentum_format (default: format)

    ``momentum_form="paper_eq6"`` takes the paper's equation 6 literally
    (``delta = Q((momentum * delta + g') * lr); w = Q(w - delta)``). Every write
    saturates to the format's range. The whole group is one fused
    ``torch.ops.fxp.qpu_sgd_step_`` call. Rounding draws come from
    ``(seed + group index, step)`` (see docs/design.md), so a run is reproducible
    and CPU and CUDA agree bit for bit. Parameters should start on the grid:
    see :func:`quantize_parameters_`. On a GPU, keep ``torch.manual_seed``'s
    seed out of ``[seed, seed + number of groups)``: a CUDA generator seeded
    ``s`` draws with key ``s`` from counter 0, as step 0 of a group keyed ``s``
    does, so the first update would round on the words of the first
    stochastic roundings (docs/design.md, "A generator's key and an explicit
    key").

    A param group may set any argument for itself, ``format`` and
    ``momentum_format`` too (kept as its ``total_bits``/``frac_bits`` and
    ``momentum_total_bits``/``momentum_frac_bits``). A group that sets its
    format but no momentum format keeps its momentum in its own format, unless
    the optimizer's ``momentum_format`` differs from its ``format``: then that
    momentum format is every group's that sets none. The optimizer copies
    (``copy.deepcopy``) and pickles (``torch.save``) with its packed storage:
    copy or save it together with its model, ``copy.deepcopy((model, opt))``.

    Packed parameters (:func:`fxp.nn.pack_model_`) are updated in their
    integer codes, and their momentum buffers are codes of ``momentum_format``:
    no float copy is kept, and the values equal those of float storage. The
    optimizer learns where the codes are from ``packed`` (or
    :meth:`set_packed_storage`), as ``fxp::optim::QpuSgd`` does in C++:
    ``QPUSGD(model.parameters(), ..., packed=fxp.nn.packed_storage(model))``;
    entries of parameters it does not hold (frozen layers left out) are skipped.
    Move the model to its device first (its codes are new tensors after ``.to()``).

    Parameter ``k`` of a group draws its rounding from stream ``k``, whether or
    not the other parameters have gradients, so a frozen or unused parameter
    never changes the others' draws. A step that raises (a NaN that packed
    storage cannot hold) has still happened: every other element is updated,
    and ``step`` has advanced. Strided (e.g. transposed) parameters work, as in
    ``torch.optim.SGD``. The step bumps the parameters' autograd versions, so a
    backward through a graph that saved them before the step raises, as with
    ``torch.optim.SGD``.

    After each step, ``last_counts[i]`` is the int64 tensor ``[n, 2]`` of
    (saturated, vanished) elements, one row per parameter of group ``i`` in
    order (zeros for those without a gradient): vanished updates were nonzero
    but left ``w`` unchanged.

    ``capturable=True`` steps with ``torch.ops.fxp.qpu_sgd_step_.capturable``
    (Note [Capturable QPU step]), so a step reads nothing back to the host and
    a CUDA graph can capture it: each group's ``step`` becomes an int64 tensor
    on the parameters' device that the step advances there, and ``lr`` is read
    from a tensor: the group's own, if ``group["lr"]`` is a tensor (it must be
    0-dim, float32 or float64, on that device; write it between replays to
    schedule lr), else one the optimizer fills when the number changes. A NaN that packed storage
    cannot hold is counted on the device instead of raising: call
    :meth:`check_nan` where you synchronize anyway, such as when logging.
    Every step draws exactly what the plain step draws. For capture, take a
    step or two before capturing (as torch's recipe does, on a side stream):
    the first step makes the device tensors. A graph keeps the tensors it
    captured: change lr through a tensor lr (a float changed after capture is
    not seen by replays), and load a state dict before capturing, not after.
    On CUDA the step tensor's value is not checked; past 2^32 steps the random
    streams would repeat.
    """

    # What a group holds beside its params (the constructor's defaults, seed and step).
    _GROUP_KEYS = ("lr", "momentum", "weight_decay", "nesterov", "total_bits", "frac_bits", "momentum_total_bits",
                   "momentum_frac_bits", "rounding", "momentum_form", "seed", "step")

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        format: FxpFormat = FxpFormat(16, 10),
        momentum_format: Optional[FxpFormat] = None,
        rounding: Rounding = "stochastic",
        momentum_form: MomentumForm = "standard",
        seed: int = 0,
        packed: Iterable[Any] = (),
        capturable: bool = False,
    ) -> None:
        # Types here; values are checked by the op itself (_check_group).
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if name == "lr" and capturable and isinstance(value, Tensor):
                if value.dim() != 0 or value.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"QPUSGD: a tensor lr must be a 0-dim float32 or float64 tensor, but got "
                                    f"{value.dtype} of shape {tuple(value.shape)}")
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"QPUSGD: {name} must be a number{' (or, capturable, a tensor)' if name == 'lr' else ''}, "
                                f"but got {value!r}")
        _str("QPUSGD", "rounding", rounding, prefix="")
        _str("QPUSGD", "momentum_form", momentum_form, prefix="")
        seed = _seed("QPUSGD", "seed", seed, prefix="")  # Note [64-bit Philox keys in Python]
        nesterov = _bool("QPUSGD", "nesterov", nesterov, prefix="")
        capturable = _bool("QPUSGD", "capturable", capturable, prefix="")
        for name, value in (("format", format), ("momentum_format", momentum_format or format)):
            if not isinstance(value, FxpFormat):
                raise TypeError(f"QPUSGD: {name} must be an FxpFormat, but got {value!r}")
        mfmt = momentum_format or format
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            total_bits=format.total_bits,
            frac_bits=format.frac_bits,
            momentum_total_bits=mfmt.total_bits,
            momentum_frac_bits=mfmt.frac_bits,
            rounding=rounding,
            momentum_form=momentum_form,
        )
        self._base_seed = seed
        self.capturable = capturable
        self._codes: dict[Tensor, Tensor] = {}  # packed parameter -> its codes
        self._lr_tensors: dict[int, tuple[float, Tensor]] = {}  # capturable: group index -> (lr, its tensor)
        self._nan_counts: dict[torch.device, Tensor] = {}  # capturable: NaN results per device
        self._row_indices: dict[tuple, Tensor] = {}  # (device, streams) -> rows of last_counts
        self._checked: dict[int, tuple] = {}  # group index -> the arguments the op last accepted
        super().__init__(params, defaults)
        self.last_counts: list[Tensor] = []
        self.set_packed_storage(packed)

    # Note: torch's Optimizer pickles (and deep-copies) only defaults, state and param_groups.
    def __getstate__(self) -> dict[str, Any]:
        # The packed storage (a copy made with its model maps it to the copy's codes), the seed of
        # later groups and the NaN count not yet checked; the caches are made again.
        return {**super().__getstate__(), "_base_seed": self._base_seed, "capturable": self.capturable,
                "_codes": self._codes, "_nan_counts": self._nan_counts, "last_counts": self.last_counts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for cache in ("_lr_tensors", "_row_indices", "_checked"):  # load_state_dict comes here too: keep them
            self.__dict__.setdefault(cache, {})

    @staticmethod
    def _hyperparameters(group: dict[str, Any], step: int) -> tuple:
        """The group's arguments of ``torch.ops.fxp.qpu_sgd_step_``, after the tensors."""
        return (float(group["lr"]), *QPUSGD._shared_arguments(group), step, group["momentum_form"])

    @staticmethod
    def _shared_arguments(group: dict[str, Any]) -> tuple:
        """The arguments both forms of the op take alike, momentum to seed (of a group _normalize_group has seen)."""
        return (float(group["momentum"]), float(group["weight_decay"]), group["nesterov"], group["total_bits"],
                group["frac_bits"], group["momentum_total_bits"], group["momentum_frac_bits"], group["rounding"],
                group["seed"])

    _NUMBER_KEYS = ("momentum", "weight_decay")
    _INT_KEYS = ("total_bits", "frac_bits", "momentum_total_bits", "momentum_frac_bits")
    _STR_KEYS = ("rounding", "momentum_form")

    @classmethod
    def _normalize_group(cls, group: dict[str, Any]) -> None:
        """What a caller may set in a group, as the op takes it, each of the wrong type refused by name
        (Note [Argument checks in Python]): numbers as floats, widths as ints, nesterov a bool, the seed
        the int64 with its key's bits (Note [64-bit Philox keys in Python]). A tensor lr (capturable) is
        the op's to check. Run when a group is added or its arguments change (_check_groups), not every step."""
        def name(key: str) -> str:
            return f"a param group's {key}"

        if not isinstance(group["lr"], Tensor):
            group["lr"] = _number("QPUSGD", name("lr"), group["lr"], prefix="")
        for key in cls._NUMBER_KEYS:
            value = group[key]
            if isinstance(value, Tensor) and value.dim() == 0:  # float() took one before these checks
                value = value.item()
            group[key] = _number("QPUSGD", name(key), value, prefix="")
        for key in cls._INT_KEYS:
            group[key] = _int("QPUSGD", name(key), group[key], prefix="")
        for key in cls._STR_KEYS:
            _str("QPUSGD", name(key), group[key], prefix="")
        group["nesterov"] = _bool("QPUSGD", name("nesterov"), group["nesterov"], prefix="")
        group["seed"] = _seed("QPUSGD", name("seed"), group["seed"], prefix="")

    @classmethod
    def _check_group(cls, group: dict[str, Any]) -> None:
        """The op's own checks, on a call without tensors (which does nothing else)."""
        cls._check_arguments(cls._hyperparameters(group, 0))

    @staticmethod
    def _check_arguments(arguments: tuple) -> None:
        try:
            torch.ops.fxp.qpu_sgd_step_([], [], [], *arguments)
        except RuntimeError as e:  # the options are the optimizer's: not named as the op's
            raise ValueError(f"QPUSGD: {str(e).splitlines()[0].removeprefix('fxp::qpu_sgd_step_: ')}") from None

    def _check_groups(self) -> None:
        """Before any group steps: every group passes :meth:`_check_group` (a value
        set by hand after construction may not), so a bad one changes nothing. The
        op checks a group again only when its arguments changed: this runs every step.
        A tensor lr (capturable) is the op's to check: reading it would synchronize."""
        checked = self._checked
        for index, group in enumerate(self.param_groups):
            arguments = self._checked_arguments(group)
            if checked.get(index) != arguments:
                self._normalize_group(group)
                arguments = self._checked_arguments(group)
                self._check_arguments(arguments)
                checked[index] = arguments

    @staticmethod
    def _host_step(group: dict[str, Any]) -> int:
        """The group's step count as an int: a capturable optimizer's (a device tensor, in its state dict
        too) read, any other value checked (a float step would be truncated)."""
        step = group["step"]
        return int(step) if isinstance(step, Tensor) else _int("QPUSGD", "a param group's step", step, prefix="")

    @staticmethod
    def _checked_arguments(group: dict[str, Any]) -> tuple:
        """What _check_groups checks of a group: its op arguments as set (converted by _normalize_group
        once they change, which names a value of the wrong type), a tensor lr (capturable) as 0."""
        lr = group["lr"]
        return (0.0 if isinstance(lr, Tensor) else lr, group["momentum"], group["weight_decay"], group["nesterov"],
                group["total_bits"], group["frac_bits"], group["momentum_total_bits"], group["momentum_frac_bits"],
                group["rounding"], group["seed"], 0, group["momentum_form"])

    def _check_writable(self) -> None:
        """Before any group steps: every gradient is dense, and every parameter to update can be written in
        place, or has codes. An expanded parameter (a zero stride) cannot; the
        usual one is a packed layer's stand-in whose codes nobody passed."""
        packed = self._codes
        for g, group in enumerate(self.param_groups):
            for k, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise RuntimeError(f"QPUSGD: parameter {k} of group {g} has a {p.grad.layout} gradient; the QPU "
                                       f"step takes dense ones ({_DENSE_HINT})")
                # A contiguous tensor of several elements has no zero stride: the cheap test first
                # (this runs every step); a one-element stand-in is contiguous whatever its stride.
                if p.grad is None or (p.numel() > 1 and p.is_contiguous()) or p.dim() == 0 or (packed and p in packed):
                    continue
                strides = p.stride()
                if all(s == 0 for s in strides) or any(s == 0 and n > 1 for s, n in zip(strides, p.shape)):
                    raise ValueError(
                        f"QPUSGD.step: parameter {k} of group {g} is expanded (a stride is 0), so it cannot be "
                        "updated in place; a packed layer's stand-in needs its codes: "
                        "QPUSGD(..., packed=fxp.nn.packed_storage(model))")

    def _gather(self, group: dict[str, Any]) -> Optional[tuple]:
        """The group's op arguments: (streams, params, grads, storage, buffers), or
        None when no parameter has a gradient. One pass: this runs every step, and
        on a GPU its host time is the step's time for models of many small tensors."""
        packed, state = self._codes, self.state
        momentum = group["momentum"] != 0
        mfmt = FxpFormat(group["momentum_total_bits"], group["momentum_frac_bits"]) if momentum and packed else None
        streams, params, grads, storage, buffers = [], [], [], [], []
        for k, p in enumerate(group["params"]):
            grad = p.grad
            if grad is None:
                continue
            # Note [QPU random streams]: parameter k of the group draws from
            # stream k, whether or not the others have gradients.
            streams.append(k)
            params.append(p)
            grads.append(grad if grad.is_contiguous() else grad.contiguous())
            # Packed parameters: the step updates their codes. A strided parameter is
            # updated in a contiguous copy (its logical order) and copied back.
            codes = packed.get(p) if packed else None
            storage.append(codes if codes is not None else p if p.is_contiguous() else p.contiguous())
            if momentum:
                buffer = state[p].get("momentum_buffer")
                if buffer is None:
                    _refuse_state_under_capture(p.device, "a momentum buffer")
                    buffer = (torch.zeros_like(p, memory_format=torch.contiguous_format) if codes is None
                              else store_codes(torch.zeros(p.shape, dtype=mfmt.storage_dtype, device=p.device), mfmt))
                    state[p]["momentum_buffer"] = buffer
                buffers.append(buffer)
        return (streams, params, grads, storage, buffers) if streams else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        index = len(self.param_groups)
        own_format = self._group_formats(param_group)
        defaults = self.defaults
        if own_format and (defaults["momentum_total_bits"], defaults["momentum_frac_bits"]) == (
                defaults["total_bits"], defaults["frac_bits"]):  # momentum_format defaults to the group's format
            if "momentum_total_bits" not in param_group and "momentum_frac_bits" not in param_group:
                param_group["momentum_total_bits"] = param_group.get("total_bits", defaults["total_bits"])
                param_group["momentum_frac_bits"] = param_group.get("frac_bits", defaults["frac_bits"])
        param_group.setdefault("seed", (self._base_seed + index) % (1 << 64))  # key seed + i, as C++'s QpuSgd
        param_group.setdefault("step", 0)
        for key, value in self.defaults.items():  # as torch does, so the group can be checked first
            param_group.setdefault(key, value)
        self._normalize_group(param_group)
        self._check_group(param_group)
        super().add_param_group(param_group)

    @staticmethod
    def _group_formats(param_group: dict[str, Any]) -> bool:
        """Translates a group's ``format`` and ``momentum_format`` into the keys the
        step reads; whether the group sets its own format."""
        for name, keys in (("format", ("total_bits", "frac_bits")),
                           ("momentum_format", ("momentum_total_bits", "momentum_frac_bits"))):
            if name not in param_group:
                continue
            fmt = param_group[name]
            if not isinstance(fmt, FxpFormat):
                raise TypeError(f"QPUSGD: a param group's {name} must be an FxpFormat, but got {fmt!r}")
            values = dict(zip(keys, (fmt.total_bits, fmt.frac_bits)))
            for key, value in values.items():
                if key in param_group and param_group[key] != value:
                    raise ValueError(f"QPUSGD: a param group sets {name} {fmt} and also {key} {param_group[key]}; "
                                     f"give one of them")
            del param_group[name]
            param_group.update(values)
        return "total_bits" in param_group or "frac_bits" in param_group

    def set_packed_storage(self, parameter: Any, codes: Optional[Tensor] = None,
                           format: Optional[FxpFormat] = None) -> None:
        """Packed storage (Note [Packed QPU step]): ``parameter`` (a stand-in that
        receives the gradient) holds its value in ``codes``, integer codes of
        ``format`` (or a bit stream of them, :func:`fxp.ops.store_codes`), which
        must be its group's format. The step then updates the codes and keeps
        the momentum as codes, stored the same way (``fxp.nn.packed_storage``
        lists a model's). A parameter this optimizer does not hold is refused.

        ``set_packed_storage(storage)`` takes a list of ``(parameter, codes,
        format)``, such as ``fxp.nn.packed_storage(model)`` (as ``packed=``
        does): the entries of the parameters this optimizer holds, all checked
        before any is set; those of parameters it does not hold (layers frozen
        and left out of it, another optimizer's) are skipped. A packed parameter
        it holds but was not given still makes the step raise."""
        if codes is None and format is None and not isinstance(parameter, Tensor):
            held = {id(p) for group in self.param_groups for p in group["params"]}
            try:
                entries = list(parameter)
            except TypeError:
                raise TypeError(f"QPUSGD.set_packed_storage: takes a parameter, its codes and their format, or a "
                                f"list of them (fxp.nn.packed_storage(model)), but got {parameter!r}") from None
            checked = []
            for i, entry in enumerate(entries):
                if not isinstance(entry, (tuple, list)) or len(entry) != 3 or not isinstance(entry[0], Tensor):
                    raise TypeError(f"QPUSGD.set_packed_storage: entry {i} of the packed storage is not "
                                    f"(parameter, codes, format), as fxp.nn.packed_storage lists them: {entry!r}")
                if id(entry[0]) in held:
                    checked.append((entry[0], self._checked_storage(*entry)))
            self._codes.update(checked)
            return
        if codes is None or format is None:
            raise TypeError("QPUSGD.set_packed_storage: takes a parameter, its codes and their format, or a list "
                            "of them (fxp.nn.packed_storage(model))")
        self._codes[parameter] = self._checked_storage(parameter, codes, format)

    def _checked_storage(self, parameter: Tensor, codes: Tensor, format: FxpFormat) -> Tensor:
        """The codes :meth:`set_packed_storage` keeps for ``parameter``, once checked."""
        group = next((g for g in self.param_groups if any(p is parameter for p in g["params"])), None)
        if group is None:
            raise ValueError("QPUSGD.set_packed_storage: got a parameter this optimizer does not hold")
        group_format = FxpFormat(group["total_bits"], group["frac_bits"])
        if format != group_format:
            raise ValueError(f"QPUSGD: the codes are of {format}, but the parameter's group updates {group_format}")
        # Note [Bit-stream storage]: the form packed layers store codes of this format in.
        expected = stored_dtype(format)
        if codes.dtype != expected:
            raise ValueError(f"QPUSGD.set_packed_storage: codes of {format} are stored as {expected}, but got "
                             f"{codes.dtype}")
        if not codes.is_contiguous():  # the step takes contiguous codes: refused here, not at the first step
            raise ValueError("QPUSGD.set_packed_storage: the codes must be contiguous (the step updates them in "
                             "place, in row-major order)")
        if expected == torch.uint8:
            try:
                load_codes(codes, format, parameter.shape)
            except RuntimeError as e:
                raise ValueError(f"QPUSGD.set_packed_storage: {e}") from None
        elif codes.shape != parameter.shape:
            raise ValueError(f"QPUSGD.set_packed_storage: codes of {format} must have the parameter's shape "
                             f"{tuple(parameter.shape)}, but got {tuple(codes.shape)}")
        return codes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.load_state_dict``, with QPUSGD's checks: a
        saved group must have every key of a QPUSGD group, ``step`` and ``seed``
        too (a state dict of another optimizer is refused, not completed: a format
        taken from this optimizer would reinterpret the momentum, and a step or seed
        would repeat or change the rounding draws), and the formats of this
        optimizer's group. Momentum codes of packed storage load into float storage
        as values, and float momentum into packed storage as codes (it must be on
        the momentum format's grid)."""
        for i, saved in enumerate(state_dict["param_groups"]):
            missing = [key for key in self._GROUP_KEYS if key not in saved]
            if missing:
                raise ValueError(f"QPUSGD.load_state_dict: group {i} of the state dict lacks {', '.join(missing)}; "
                                 "a QPUSGD group has them all (is it another optimizer's state dict?)")
        # The formats of the saved state are the formats its momentum codes (and
        # the model's parameters) are in: a group may not load another format.
        for i, (mine, saved) in enumerate(zip(self.param_groups, state_dict["param_groups"])):
            for key in ("total_bits", "frac_bits", "momentum_total_bits", "momentum_frac_bits"):
                if saved[key] != mine[key]:
                    raise ValueError(
                        f"QPUSGD.load_state_dict: group {i} was saved with format "
                        f"{FxpFormat(saved['total_bits'], saved['frac_bits'])} and momentum format "
                        f"{FxpFormat(saved['momentum_total_bits'], saved['momentum_frac_bits'])}, but this optimizer "
                        f"has {FxpFormat(mine['total_bits'], mine['frac_bits'])} and "
                        f"{FxpFormat(mine['momentum_total_bits'], mine['momentum_frac_bits'])}")
        # torch casts loaded state to each parameter's dtype: right for float storage's buffers
        # (values), not for packed storage's (codes) nor for one loaded into the other. Converted
        # first, so that a buffer that cannot be converted leaves this optimizer as it was.
        saved_ids = (pid for group in state_dict["param_groups"] for pid in group["params"])
        targets = dict(zip(saved_ids, ((p, group) for group in self.param_groups for p in group["params"])))
        converted = {}
        for pid, saved in state_dict["state"].items():
            buffer = saved.get("momentum_buffer")
            if pid not in targets or not isinstance(buffer, Tensor):
                continue
            p, group = targets[pid]
            # A bit stream (uint8) has no shape; load_codes checks its length. Others keep the parameter's
            # shape: a buffer of another shape with as many elements would load scrambled into codes.
            if buffer.dtype != torch.uint8 and buffer.shape != p.shape:
                raise ValueError(f"QPUSGD.load_state_dict: the momentum buffer of parameter {pid} has shape "
                                 f"{tuple(buffer.shape)}, but the parameter has {tuple(p.shape)}")
            packed = p in self._codes
            if buffer.is_floating_point() and not packed:
                continue
            mfmt = FxpFormat(group["momentum_total_bits"], group["momentum_frac_bits"])
            # Codes in another dtype (an int64 tensor) reached load_codes, whose message named neither the
            # state entry nor what it may hold. (A uint8 bit stream load_codes checks itself.)
            codes = (mfmt.storage_dtype, torch.uint8)
            if not buffer.is_floating_point() and buffer.dtype not in codes:
                raise ValueError(f"QPUSGD.load_state_dict: the momentum buffer of parameter {pid} is {buffer.dtype}, "
                                 f"but the momentum of {mfmt} loads from float values on its grid or from its codes "
                                 f"({' or '.join(str(d) for d in codes)})")
            buffer = buffer.to(device=p.device)
            if buffer.is_floating_point():  # values of float storage: their codes (exactly; they are on the grid)
                buffer = store_codes(pack(buffer, mfmt, rounding="exact"), mfmt)
            elif packed:  # in the form this version stores the momentum format in (Note [Bit-stream storage])
                buffer = store_codes(load_codes(buffer, mfmt, p.shape), mfmt)
            else:  # codes into float storage: their values
                buffer = unpack(load_codes(buffer, mfmt, p.shape), mfmt, dtype=p.dtype)
            converted[p] = buffer
        super().load_state_dict(state_dict)
        for p, buffer in converted.items():
            self.state[p]["momentum_buffer"] = buffer

    def _device_scalars(self, index: int, group: dict[str, Any], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """The capturable step's lr, step and NaN-count tensors on ``device``."""
        if not isinstance(group["step"], Tensor) or group["step"].device != device:
            _refuse_state_under_capture(device, "the capturable step's step count")
            group["step"] = torch.as_tensor(int(group["step"]), dtype=torch.long, device=device)
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            value, tensor = self._lr_tensors.get(index, (None, None))
            if tensor is None or tensor.device != device:
                _refuse_state_under_capture(device, "the capturable step's lr")
                tensor = torch.empty((), dtype=torch.float64, device=device)
                value = None
            if value != float(lr):
                tensor.fill_(float(lr))
            self._lr_tensors[index] = (float(lr), tensor)
            lr = tensor
        if device not in self._nan_counts:
            _refuse_state_under_capture(device, "the capturable step's NaN count")
            self._nan_counts[device] = torch.zeros((), dtype=torch.long, device=device)
        return lr, group["step"], self._nan_counts[device]

    def _row_index(self, streams: list[int], device: torch.device) -> Tensor:
        """The rows of ``streams`` as an index tensor on ``device``, made once: a host-to-device
        copy cannot happen during CUDA-graph capture, so warm-up steps make it first."""
        key = (device, tuple(streams))
        if key not in self._row_indices:
            _refuse_state_under_capture(device, "the index of the parameters with gradients")
            self._row_indices[key] = torch.tensor(streams, device=device)
        return self._row_indices[key]

    def check_nan(self) -> None:
        """With ``capturable=True``: raises ``ValueError`` if a step since the last
        check had NaN results that packed storage could not hold (those elements
        kept their codes), and resets the count. Reads the count back from the
        device: call it where you synchronize anyway."""
        total = sum(int(count.item()) for count in self._nan_counts.values())
        for count in self._nan_counts.values():
            count.zero_()
        if total:
            raise ValueError(f"QPUSGD: {total} updated values were NaN (from a NaN or infinite gradient?); packed "
                             "storage cannot hold NaN, so those elements kept their previous codes")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._step_groups(None)
        return loss

    @torch.no_grad()
    def step_normalized(self, accumulated: list, norms: Tensor, l1: float) -> None:
        """AdaPT's step without a master copy (Note [AdaPT's fused QPU step]),
        as ``fxp::optim::QpuSgd::step_normalized``: group ``g`` is layer ``g``;
        each gradient is normalized by ``norms[g]`` (with L1's term ``l1``) and
        added to ``accumulated[g][k]`` (the accumulator of the group's parameter
        ``k``) inside the step, and ``.grad`` is left as it is.
        :meth:`fxp.adapt.AdaptController.step` calls it; float storage only."""
        if self.capturable:
            raise ValueError("QPUSGD.step_normalized: the normalized step (AdaPT's) has no capturable form")
        if self._codes:
            raise ValueError("QPUSGD.step_normalized: the normalized step (AdaPT's) takes float storage, not packed codes")
        if len(accumulated) != len(self.param_groups):
            raise ValueError(f"QPUSGD.step_normalized: needs the accumulators of every group ({len(self.param_groups)}), "
                             f"but got {len(accumulated)}")
        for g, (group, acc) in enumerate(zip(self.param_groups, accumulated)):
            if len(acc) != len(group["params"]):
                raise ValueError(f"QPUSGD.step_normalized: group {g} has {len(group['params'])} parameters, but "
                                 f"{len(acc)} accumulators")
        self._step_groups((accumulated, norms, float(l1)))

    def _step_groups(self, normalization: Optional[tuple]) -> None:
        """Every group's step; with ``normalization`` (accumulated, norms, l1), AdaPT's."""
        self._check_writable()
        self._check_groups()
        self.last_counts = []
        for index, group in enumerate(self.param_groups):
            everyone = group["params"]
            arguments = self._gather(group)
            if arguments is None:  # on the parameters' device, as the op's counts are
                device = everyone[0].device if everyone else None
                self.last_counts.append(torch.zeros(len(everyone), 2, dtype=torch.long, device=device))
                continue
            streams, params, grads, storage, buffers = arguments
            if normalization is not None:
                accumulated, norms, l1 = normalization
                step = self._host_step(group)
                group["step"] = step + 1
                counts = torch.ops.fxp.qpu_sgd_step_.adapt(
                    storage, grads, buffers, [accumulated[index][k] for k in streams], norms,
                    [index] * len(streams), l1, *self._hyperparameters(group, step), streams)
            elif self.capturable:
                lr, step, nan_count = self._device_scalars(index, group, params[0].device)
                counts = torch.ops.fxp.qpu_sgd_step_.capturable(
                    storage, grads, buffers, lr, step, nan_count, *self._shared_arguments(group),
                    group["momentum_form"], streams)
            else:
                # The step counts even if the op raises (a NaN that packed storage cannot
                # hold): the update has happened, and the next step draws fresh numbers.
                step = self._host_step(group)
                group["step"] = step + 1
                counts = torch.ops.fxp.qpu_sgd_step_(storage, grads, buffers, *self._hyperparameters(group, step),
                                                     streams)
            for p, stored in zip(params, storage):
                if stored is not p and p not in self._codes:
                    p.copy_(stored)
            if len(streams) < len(everyone):  # a row per parameter; those without a gradient stay zero
                counts = torch.zeros(len(everyone), 2, dtype=torch.long, device=counts.device).index_copy_(
                    0, self._row_index(streams, counts.device), counts)
            self.last_counts.append(counts)

    @torch.no_grad()
    def change_format(self, group_index: int, format: FxpFormat) -> None:
        """Moves group ``group_index`` to ``format`` (AdaPT's precision switch,
        Note [QPU format change]), as ``fxp::optim::QpuSgd::change_format``:
        its parameters are rounded onto the new grid with the group's rounding,
        and so are its momentum buffers when the group's momentum format is
        its format (the momentum follows it; another momentum format stays).
        Not for packed storage."""
        if isinstance(group_index, bool) or not isinstance(group_index, numbers.Integral) or not (
                0 <= group_index < len(self.param_groups)):
            raise ValueError(f"QPUSGD.change_format: group {group_index!r} of {len(self.param_groups)}")
        if not isinstance(format, FxpFormat):
            raise TypeError(f"QPUSGD.change_format: format must be an FxpFormat, but got {format!r}")
        group = self.param_groups[group_index]
        params = group["params"]
        if any(p in self._codes for p in params):
            raise ValueError("QPUSGD.change_format: cannot change the format of packed storage")
        if isinstance(group["step"], Tensor):
            raise ValueError("QPUSGD.change_format: a capturable group's step lives on its device; AdaPT's format "
                             "changes take the plain step")
        self._normalize_group(group)
        follows = (group["momentum_total_bits"], group["momentum_frac_bits"]) == (group["total_bits"], group["frac_bits"])
        changed = {"total_bits": format.total_bits, "frac_bits": format.frac_bits}
        if follows:
            changed.update(momentum_total_bits=format.total_bits, momentum_frac_bits=format.frac_bits)
        self._check_group({**group, **changed})
        found = ((k, self.state.get(p, {}).get("momentum_buffer")) for k, p in enumerate(params)) if follows else ()
        buffers = [(k, b) for k, b in found if b is not None]
        torch.ops.fxp.qpu_change_format_(params, [b for _, b in buffers], [k for k, _ in buffers], format.total_bits,
                                         format.frac_bits, group["rounding"], group["seed"], int(group["step"]))
        group.update(changed)


@torch.no_grad()
def quantize_parameters_(
    params: Iterable[Tensor], format: FxpFormat, rounding: Rounding = "stochastic", seed: int = 0
) -> None:
    """Puts parameters on the grid of ``format`` in place (QPU's initialization):
    ``torch.ops.fxp.quantize_parameters_``, tensor ``k`` with its own Philox
    offset ``k`` under a key of its own, so these draws are independent of the
    optimizer's. :func:`fxp.nn.quantize_layer_parameters_` does it for a model whose
    layers have formats of their own."""
    op = "optim.quantize_parameters_"
    if isinstance(params, Tensor):  # iterating would take its rows for tensors, as torch's optimizers refuse it
        raise TypeError(f"fxp.{op}: params must be an iterable of tensors (model.parameters(), [p]), but got a "
                        "Tensor")
    if not isinstance(format, FxpFormat):
        raise TypeError(f"fxp.{op}: format must be an FxpFormat, but got {format!r}")
    params = list(params)
    torch.ops.fxp.quantize_parameters_(params, [format.total_bits] * len(params), [format.frac_bits] * len(params),
                                       rounding, _seed("optim.quantize_parameters_", "seed", seed))


def make_optimizer(
    params: Iterable[Any],
    method: str,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    format: Optional[FxpFormat] = None,
    momentum_format: Optional[FxpFormat] = None,
    seed: int = 0,
    packed: Iterable[Any] = (),
) -> Optimizer:
    """The optimizer each of the paper's methods trains with: ``torch.optim.SGD``
    on the float weights for ``fp32`` and ``ste`` (STE's master copy), and
    :class:`QPUSGD` with stochastic (``sqpu``) or half-to-even (``hteqpu``)
    rounding in ``format`` (and the packed storage ``packed``, which only the
    QPU methods take)."""
    if method in ("fp32", "ste"):
        try:
            given = list(packed)
        except TypeError:
            raise TypeError(f"make_optimizer: packed must be a list of packed storage (fxp.nn.packed_storage(model)), "
                            f"but got {packed!r}") from None
        if given:  # torch's SGD would ignore it
            raise ValueError(f"make_optimizer: packed storage is for the QPU methods (sqpu, hteqpu), but method is "
                             f"{method!r}")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if method not in ("sqpu", "hteqpu"):
        raise ValueError(f"make_optimizer: method must be fp32, ste, sqpu or hteqpu, but got {method!r}")
    if format is None:
        raise ValueError(f"make_optimizer: method {method!r} needs a format")
    return QPUSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, format=format,
                  momentum_format=momentum_format, rounding="stochastic" if method == "sqpu" else "nearest_even",
                  seed=seed, packed=packed)
