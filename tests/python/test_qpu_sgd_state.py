"""fxp.optim.QPUSGD's own state: copies and pickles, per-group formats, state dicts of
other optimizers or storages, and a step refused before it changes anything."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fxp
from fxp import FxpFormat
from fxp.optim import QPUSGD
from test_qpu_sgd import on_grid, same_bits

ACT = FxpFormat(16, 8)


def _model(fmt: FxpFormat, packed: bool, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    return fxp.nn.quantize_model(model, "sqpu", fmt, ACT, act_rounding="hte", packed=packed)  # HTE: no draws


def _train(model, opt, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()


def _same_training_state(model_a, opt_a, model_b, opt_b) -> bool:
    """The models' values (a packed layer's state dict holds its codes) and every momentum buffer, bit for bit."""
    sa, sb = model_a.state_dict(), model_b.state_dict()
    if sa.keys() != sb.keys() or not all(same_bits(sa[k], sb[k]) for k in sa):
        return False
    buffers = [[o.state[p]["momentum_buffer"] for p in m.parameters()] for m, o in ((model_a, opt_a), (model_b, opt_b))]
    return all(same_bits(a, b) for a, b in zip(*buffers)) and [g["step"] for g in opt_a.param_groups] == [
        g["step"] for g in opt_b.param_groups]


def _optimizer(model, fmt, packed):
    return QPUSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, format=fmt, seed=7,
                  packed=fxp.nn.packed_storage(model) if packed else ())


# --- 1: copy.deepcopy and pickling ---------------------------------------------------------
@pytest.mark.parametrize("fmt", [FxpFormat(16, 10), FxpFormat(12, 6)])  # 12 bits: packed as bit streams
@pytest.mark.parametrize("packed", [False, True])
def test_a_deep_copy_steps_bit_for_bit_like_the_original(packed, fmt):
    model = _model(fmt, packed)
    opt = _optimizer(model, fmt, packed)
    _train(model, opt, 2)
    twin, twin_opt = copy.deepcopy((model, opt))
    if packed:  # the copy updates the copied model's codes, not the original's
        codes = {s.parameter: s.codes for s in fxp.nn.packed_storage(twin)}
        assert twin_opt._codes.keys() == codes.keys() and all(twin_opt._codes[p] is c for p, c in codes.items())
        assert all(c is not model[0].weight_codes for c in codes.values())
    _train(model, opt, 3, seed=2)
    _train(twin, twin_opt, 3, seed=2)
    assert _same_training_state(model, opt, twin, twin_opt)
    assert opt.param_groups[0]["step"] == 5
    # A group added later draws from the same key in both.
    for o in (opt, twin_opt):
        o.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert opt.param_groups[1]["seed"] == twin_opt.param_groups[1]["seed"] == 8


@pytest.mark.parametrize("packed", [False, True])
def test_a_pickled_optimizer_trains_on_bit_for_bit(packed):
    fmt = FxpFormat(12, 6)
    model = _model(fmt, packed)
    opt = _optimizer(model, fmt, packed)
    _train(model, opt, 2)
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    twin, twin_opt = torch.load(buffer, weights_only=False)
    twin_opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    assert twin_opt.param_groups[1]["seed"] == 8
    del twin_opt.param_groups[1]
    _train(model, opt, 3, seed=2)
    _train(twin, twin_opt, 3, seed=2)
    assert _same_training_state(model, opt, twin, twin_opt)


# --- 2: per-group formats --------------------------------------------------------------------
def _steps(params, opt, steps=3):
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _param(fmt=FxpFormat(8, 4)):
    return torch.nn.Parameter(fxp.quantize(torch.randn(50, generator=torch.Generator().manual_seed(0)), fmt))


def test_a_group_format_is_the_group_s_grid():
    p, q = _param(), _param()
    opt = QPUSGD([{"params": [p], "format": FxpFormat(8, 4)}], lr=0.05, momentum=0.9, format=FxpFormat(12, 8))
    reference = QPUSGD([q], lr=0.05, momentum=0.9, format=FxpFormat(8, 4))
    group = opt.param_groups[0]
    assert "format" not in group and (group["total_bits"], group["frac_bits"]) == (8, 4)
    # momentum_format defaults to the group's format, not the optimizer's.
    assert (group["momentum_total_bits"], group["momentum_frac_bits"]) == (8, 4)
    _steps([p], opt)
    _steps([q], reference)
    assert same_bits(p.detach(), q.detach()) and on_grid(p.detach(), FxpFormat(8, 4))
    assert same_bits(opt.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])


def test_a_group_momentum_format_and_the_defaults_of_the_others():
    fmt, mfmt = FxpFormat(12, 8), FxpFormat(12, 10)
    opt = QPUSGD([{"params": [_param()]},  # nothing of its own: the constructor's formats
                  {"params": [_param()], "total_bits": 8, "frac_bits": 4},  # its format: momentum in it too
                  {"params": [_param()], "format": FxpFormat(8, 4), "momentum_format": FxpFormat(10, 8)},
                  {"params": [_param()], "momentum_format": FxpFormat(10, 8)}],
                 lr=0.05, momentum=0.9, format=fmt)
    formats = [(g["total_bits"], g["frac_bits"], g["momentum_total_bits"], g["momentum_frac_bits"])
               for g in opt.param_groups]
    assert formats == [(12, 8, 12, 8), (8, 4, 8, 4), (8, 4, 10, 8), (12, 8, 10, 8)]
    # A momentum format the constructor was given (other than its format) is every group's that gives none.
    explicit = QPUSGD([{"params": [_param()]}, {"params": [_param()], "format": FxpFormat(8, 4)}], lr=0.05,
                      momentum=0.9, format=fmt, momentum_format=mfmt)
    assert [(g["momentum_total_bits"], g["momentum_frac_bits"]) for g in explicit.param_groups] == [(12, 10)] * 2
    opt.add_param_group({"params": [_param()], "format": FxpFormat(10, 4)})
    assert (opt.param_groups[-1]["momentum_total_bits"], opt.param_groups[-1]["momentum_frac_bits"]) == (10, 4)


def test_a_group_format_is_checked():
    opt = QPUSGD([_param()], lr=0.05, format=FxpFormat(12, 8))
    with pytest.raises(TypeError, match=r"QPUSGD: a param group's format must be an FxpFormat, but got \(8, 4\)"):
        opt.add_param_group({"params": [_param()], "format": (8, 4)})
    with pytest.raises(ValueError, match=r"QPUSGD: a param group sets format FxP\(8,4\) and also total_bits 10"):
        opt.add_param_group({"params": [_param()], "format": FxpFormat(8, 4), "total_bits": 10})
    with pytest.raises(ValueError, match=r"sets momentum_format FxP\(10,8\) and also momentum_frac_bits 6"):
        opt.add_param_group({"params": [_param()], "momentum_format": FxpFormat(10, 8), "momentum_frac_bits": 6})
    opt.add_param_group({"params": [_param()], "format": FxpFormat(8, 4), "total_bits": 8})  # the same: fine
    assert opt.param_groups[1]["frac_bits"] == 4
    del opt.param_groups[1]
    assert len(opt.param_groups) == 1


# --- 3: state dicts without QPUSGD's group keys ------------------------------------------------
def test_a_state_dict_of_another_optimizer_is_refused():
    p = _param()
    sgd = torch.optim.SGD([torch.nn.Parameter(p.detach().clone())], lr=0.1, momentum=0.9)
    opt = QPUSGD([p], lr=0.05, momentum=0.9, format=FxpFormat(8, 4))
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(ValueError, match=r"QPUSGD.load_state_dict: group 0 of the state dict lacks total_bits, "
                                         r"frac_bits, momentum_total_bits, momentum_frac_bits, rounding, "
                                         r"momentum_form, seed, step"):
        opt.load_state_dict(sgd.state_dict())
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    _steps([p], opt, 1)  # and it still steps


def test_a_state_dict_without_step_or_seed_is_refused():
    p = _param()
    opt = QPUSGD([p], lr=0.05, momentum=0.9, format=FxpFormat(8, 4))
    _steps([p], opt, 2)
    state = opt.state_dict()
    for key in ("step", "seed"):
        old = copy.deepcopy(state)
        del old["param_groups"][0][key]
        with pytest.raises(ValueError, match=rf"group 0 of the state dict lacks {key}\b"):
            QPUSGD([_param()], lr=0.05, momentum=0.9, format=FxpFormat(8, 4)).load_state_dict(old)


# --- 4: momentum codes into float storage, and float momentum into codes ------------------------
def _linear(fmt: FxpFormat, packed: bool) -> fxp.nn.QLinear:
    torch.manual_seed(3)
    layer = fxp.nn.QLinear(4, 3, weight_mode="qpu", param_format=fmt, act_format=ACT)
    fxp.nn.quantize_layer_parameters_(layer)
    if packed:
        layer.pack_weights_()
    return layer


def _grad_steps(layer, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in layer.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


def _layer_values(layer, fmt):
    return [fxp.unpack(c, fmt) for c in (layer.state_dict()["weight_codes"], layer.state_dict()["bias_codes"])] \
        if layer.packed_weights else [layer.weight.detach(), layer.bias.detach()]


@pytest.mark.parametrize("fmt", [FxpFormat(16, 10), FxpFormat(12, 6)])
@pytest.mark.parametrize("saved_packed", [True, False])
def test_momentum_loads_into_the_other_storage(saved_packed, fmt):
    """Packed and float storage step to the same values (Note [Packed QPU step]): a state saved by one
    loads into the other, as values into float storage and as codes (bit streams at 12 bits) into packed."""
    def optimizer(layer):
        return QPUSGD(layer.parameters(), lr=0.05, momentum=0.9, format=fmt, seed=3,
                      packed=fxp.nn.packed_storage(layer))

    saved = _linear(fmt, saved_packed)
    saved_opt = optimizer(saved)
    _grad_steps(saved, saved_opt, 2, seed=0)
    other = _linear(fmt, not saved_packed)
    other.load_state_dict(saved.state_dict())
    other_opt = optimizer(other)
    other_opt.load_state_dict(saved_opt.state_dict())
    for p in other.parameters():
        buffer = other_opt.state[p]["momentum_buffer"]
        if saved_packed:  # values of the parameter's dtype
            assert buffer.dtype == p.dtype and buffer.shape == p.shape and on_grid(buffer, fmt)
        else:
            assert buffer.dtype == fxp.ops.stored_dtype(fmt)
    _grad_steps(saved, saved_opt, 3, seed=1)
    _grad_steps(other, other_opt, 3, seed=1)
    assert all(same_bits(a, b) for a, b in zip(_layer_values(saved, fmt), _layer_values(other, fmt)))
    if saved_packed:
        other_opt.change_format(0, FxpFormat(12, 4))  # failed on Byte/Short momentum buffers
        assert all(on_grid(other_opt.state[p]["momentum_buffer"], FxpFormat(12, 4)) for p in other.parameters())


def test_float_momentum_off_the_grid_is_refused_by_packed_storage():
    fmt = FxpFormat(16, 10)
    plain = _linear(fmt, False)
    opt = QPUSGD(plain.parameters(), lr=0.05, momentum=0.9, format=fmt)
    _grad_steps(plain, opt, 1, seed=0)
    state = opt.state_dict()
    state["state"][0]["momentum_buffer"] = state["state"][0]["momentum_buffer"] + 2.0**-12
    packed = _linear(fmt, True)
    packed_opt = QPUSGD(packed.parameters(), lr=0.05, momentum=0.9, format=fmt, packed=fxp.nn.packed_storage(packed))
    with pytest.raises(ValueError, match=r"rounding='exact' x must lie on the grid of FxP\(16,10\)"):
        packed_opt.load_state_dict(state)
    assert not packed_opt.state and packed_opt.param_groups[0]["step"] == 0  # nothing loaded


@pytest.mark.parametrize("fmt", [FxpFormat(6, 2), FxpFormat(8, 4)], ids=["bit stream", "int8 codes"])
@pytest.mark.parametrize("saved_packed", [False, True])
def test_momentum_of_another_shape_is_refused_at_load(fmt, saved_packed):
    """A buffer with the parameter's element count but another shape ([4, 3] for a [3, 4] weight) once loaded
    into 6-bit packed storage (a bit stream, which has no shape) and was stepped on scrambled."""
    source = _linear(fmt, saved_packed)
    source_opt = QPUSGD(source.parameters(), lr=0.05, momentum=0.9, format=fmt,
                        packed=fxp.nn.packed_storage(source))
    _grad_steps(source, source_opt, 1, seed=0)
    state = source_opt.state_dict()
    buffer = state["state"][0]["momentum_buffer"]
    codes = fxp.ops.load_codes(buffer, fmt, source.weight.shape) if buffer.dtype == torch.uint8 else buffer
    state["state"][0]["momentum_buffer"] = codes.t().contiguous()  # the transposed shape, as many elements
    target = _linear(fmt, True)
    target_opt = QPUSGD(target.parameters(), lr=0.05, momentum=0.9, format=fmt, packed=fxp.nn.packed_storage(target))
    shape = tuple(source.weight.shape)
    with pytest.raises(ValueError) as e:
        target_opt.load_state_dict(state)
    assert str(e.value) == (f"QPUSGD.load_state_dict: the momentum buffer of parameter 0 has shape {shape[::-1]}, "
                            f"but the parameter has {shape}")
    assert not target_opt.state  # nothing loaded


# --- 5: a bad hyperparameter in a later group --------------------------------------------------
def test_a_bad_group_refuses_the_whole_step():
    fmt = FxpFormat(12, 8)
    first, second = [_param(fmt), _param(fmt)], [_param(fmt), _param(fmt)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in first + second]
    opt = QPUSGD([{"params": first}, {"params": second}], lr=0.05, momentum=0.9, format=fmt, seed=2)
    reference = QPUSGD([{"params": copies[:2]}, {"params": copies[2:]}], lr=0.05, momentum=0.9, format=fmt, seed=2)
    _steps(first + second, opt, 1)
    _steps(copies, reference, 1)
    with pytest.raises(ValueError) as constructor:
        QPUSGD([_param()], lr=-1)
    values = [p.detach().clone() for p in first + second]
    buffers = [opt.state[p]["momentum_buffer"].clone() for p in first + second]
    opt.param_groups[1]["lr"] = -1
    with pytest.raises(ValueError) as step:
        _steps(first + second, opt, 1)
    assert str(step.value) == str(constructor.value)
    assert "lr must be a non-negative finite number, but got -1" in str(step.value)
    assert all(same_bits(p.detach(), v) for p, v in zip(first + second, values))
    assert all(same_bits(opt.state[p]["momentum_buffer"], b) for p, b in zip(first + second, buffers))
    assert [g["step"] for g in opt.param_groups] == [1, 1]
    # Put right, it steps as if the refused step had never been tried.
    opt.param_groups[1]["lr"] = 0.05
    _steps(first + second, opt, 2)
    _steps(copies, reference, 2)
    assert all(same_bits(p.detach(), q.detach()) for p, q in zip(first + second, copies))


@pytest.mark.parametrize("capturable", [False, True])
def test_a_sparse_gradient_is_named(capturable):
    """nn.Embedding(sparse=True) gives sparse gradients, which the step does not take: the optimizer says so
    before any group steps (torch's .contiguous() of one used to fail with "unsupported memory format", and
    the capturable op has no sparse kernel), and so does the op for its own callers."""
    dense = torch.nn.Linear(3, 2)
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    params = [*dense.parameters(), *embedding.parameters()]
    fxp.optim.quantize_parameters_(params, FxpFormat(16, 10))
    before = [p.detach().clone() for p in params]
    opt = QPUSGD([{"params": list(dense.parameters())}, {"params": list(embedding.parameters())}], lr=0.1,
                 momentum=0.9, capturable=capturable)
    (dense(torch.ones(3)).sum() + embedding(torch.tensor([1, 2])).sum()).backward()
    with pytest.raises(RuntimeError, match=r"^QPUSGD: parameter 0 of group 1 has a torch.sparse_coo gradient; the QPU "
                                           r"step takes dense ones .*\.to_dense\(\)"):
        opt.step()
    assert all(same_bits(p.detach(), b) for p, b in zip(params, before))  # group 0 did not step either
    with pytest.raises(RuntimeError, match=r"fxp::qpu_sgd_step_: grads\[0\] is a Sparse tensor; the QPU step takes "
                                           r"dense ones"):
        torch.ops.fxp.qpu_sgd_step_([embedding.weight.detach()], [embedding.weight.grad], [], 0.1, 0.0, 0.0, False,
                                    16, 10, 16, 10, "stochastic", 0, 0)


@pytest.mark.parametrize("packed", [False, True])
def test_momentum_codes_of_another_dtype_are_refused_naming_the_entry(packed):
    """An int64 momentum buffer reached load_codes, whose "fxp::load_codes: stored must be Short codes of 16
    bits" named neither the state entry nor what it may hold."""
    fmt = FxpFormat(16, 10)
    source = _linear(fmt, False)
    source_opt = QPUSGD(source.parameters(), lr=0.05, momentum=0.9, format=fmt)
    _grad_steps(source, source_opt, 1, seed=0)
    state = source_opt.state_dict()
    buffer = state["state"][0]["momentum_buffer"]
    state["state"][0]["momentum_buffer"] = fxp.pack(buffer, fmt, rounding="exact").to(torch.int64)
    target = _linear(fmt, packed)
    target_opt = QPUSGD(target.parameters(), lr=0.05, momentum=0.9, format=fmt,
                        packed=fxp.nn.packed_storage(target))
    with pytest.raises(ValueError) as e:
        target_opt.load_state_dict(state)
    assert str(e.value) == ("QPUSGD.load_state_dict: the momentum buffer of parameter 0 is torch.int64, but the "
                            "momentum of FxP(16,10) loads from float values on its grid or from its codes "
                            "(torch.int16 or torch.uint8)")  # uint8: a bit stream, which load_codes checks
    assert not target_opt.state  # nothing loaded
