"""Autograd around fxp's ops without a gradient, and argument types (issue 11):
in-place ops bump the version counter as torch's do, leaves that require grad
are refused, the non-differentiable ops say so at backward and point to
quantize_ste, and wrong argument types are clear TypeErrors."""

from __future__ import annotations

import pytest
import torch

import fxp
from fxp import FxpFormat
from fxp.optim import QPUSGD


def test_in_place_quantize_bumps_the_version_so_a_stale_backward_raises():
    a = torch.randn(5, requires_grad=True)
    b = a * 3
    c = (b * b).sum()  # saves b
    fxp.quantize_(b, 4, 0)
    assert b._version == 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        c.backward()
    d = a * 2
    e = (d * d).sum()
    fxp.quantize_seeded_(d, 8, 4, "stochastic", seed=1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        e.backward()


def test_versions_move_without_autograd_too():
    x = torch.randn(4)
    fxp.quantize_(x, 8, 4)
    fxp.quantize(torch.randn(4), 8, 4, out=x)
    with torch.no_grad():
        fxp.quantize_seeded_(x, 8, 4, seed=0)
    assert x._version == 3


def test_in_place_on_a_leaf_that_requires_grad_is_refused():
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
        fxp.quantize_(w, 8, 4)
    with pytest.raises(RuntimeError, match="don't support automatic differentiation"):
        fxp.quantize(w, 8, 4, out=torch.empty(3))
    with torch.no_grad():  # as torch's in-place ops: allowed without grad mode (QPU's initialization)
        fxp.quantize_(w, 8, 4)
    assert torch.equal(w.detach(), fxp.quantize(w.detach(), 8, 4))


@pytest.mark.parametrize("call", [
    lambda w: fxp.quantize(w, 8, 4),
    lambda w: fxp.quantize(w, 8, 4, "stochastic", generator=torch.Generator().manual_seed(0)),
    lambda w: fxp.quantize_stats(w, 8, 4)[0],
    lambda w: fxp.quantize_mask(w, 8, 4)[0],
    lambda w: fxp.quantize_seeded(w, 8, 4, seed=3),
    lambda w: fxp.quantize_seeded_stats(w, 8, 4, seed=3)[0],
])
def test_quantize_is_not_differentiable_and_points_to_quantize_ste(call):
    w = torch.randn(6, requires_grad=True)
    y = call(w)
    assert y.requires_grad and torch.equal(y.detach(), call(w.detach()))  # the forward works
    with pytest.raises(RuntimeError, match="is not differentiable. For a straight-through gradient use "
                                           "fxp::quantize_ste"):
        y.sum().backward()
    assert w.grad is None
    with torch.no_grad():
        assert not call(w).requires_grad


def test_in_place_quantize_of_a_non_leaf_makes_its_gradient_an_error():
    a = torch.randn(5, requires_grad=True)
    b = a * 1.0
    fxp.quantize_(b, 8, 4)
    with pytest.raises(RuntimeError, match="fxp::quantize_ is not differentiable"):
        b.sum().backward()


def _two_layer_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize("optimizer", ["torch SGD", "QPUSGD"])
def test_a_step_between_two_backward_passes_of_one_graph_raises(optimizer):
    model = _two_layer_model()
    if optimizer == "QPUSGD":
        fxp.optim.quantize_parameters_(model.parameters(), FxpFormat(16, 10))
        opt = QPUSGD(model.parameters(), lr=0.1, format=FxpFormat(16, 10))
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(3, 4)).sum()
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_the_raw_qpu_step_refuses_leaves_in_grad_mode():
    w = torch.zeros(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        torch.ops.fxp.qpu_sgd_step_([w], [torch.ones(4)], [], 0.1, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic",
                                    0, 0)


# --- argument types --------------------------------------------------------------
x4 = torch.randn(4)


@pytest.mark.parametrize("call, message", [
    (lambda: fxp.quantize(x4, 8.7, 4.9), "fxp.quantize: total_bits must be an int, but got 8.7"),
    (lambda: fxp.quantize(x4, "8", 4), "fxp.quantize: total_bits must be an int, but got '8'"),
    (lambda: fxp.quantize(x4, 8, True), "fxp.quantize: frac_bits must be an int, but got True"),
    (lambda: fxp.quantize([1.0, 2.0], 8, 4), "fxp.quantize: x must be a torch.Tensor, but got list"),
    (lambda: fxp.quantize(x4, 8, 4, rounding=1), "fxp.quantize: rounding must be a str"),
    (lambda: fxp.quantize(x4, 8, 4, generator=0), "fxp.quantize: generator must be a torch.Generator or None"),
    (lambda: fxp.quantize(x4, 8, 4, out=[0.0]), "fxp.quantize: out must be a torch.Tensor"),
    (lambda: fxp.quantize_(x4.clone(), 8.0, 4), "fxp.quantize_: total_bits must be an int"),
    (lambda: fxp.quantize_seeded(x4, 8, 4, seed=1.5), "fxp.quantize_seeded: seed must be an int, but got 1.5"),
    (lambda: fxp.quantize_seeded(x4, 8, 4, seed=1, offset="0"), "fxp.quantize_seeded: offset must be an int"),
    (lambda: fxp.quantize_stats(x4, 8, 4.0), "fxp.quantize_stats: frac_bits must be an int"),
    (lambda: fxp.quantize_ste(x4, 8, 4, zero_grad_saturated=1), "zero_grad_saturated must be a bool"),
    (lambda: fxp.pack(x4, 8.0, 4), "fxp.pack: total_bits must be an int"),
    (lambda: fxp.pack_seeded(x4, 8, 4, seed=None), "fxp.pack_seeded: seed must be an int"),
    (lambda: fxp.unpack(torch.zeros(2, dtype=torch.int8), 8, 4, dtype="float32"), "dtype must be a torch.dtype"),
    (lambda: fxp.unpack("codes", 8, 4), "fxp.unpack: codes must be a torch.Tensor"),
    (lambda: fxp.ops.linear(x4, torch.randn(2, 4), input_format=(8, 4)), "input_format must be an FxpFormat"),
    (lambda: fxp.ops.conv2d(torch.randn(1, 1, 4, 4), torch.randn(1, 1, 3, 3), stride=1.5),
     "fxp.conv2d: stride must be an int"),
    (lambda: fxp.ops.relu_max_pool2d(torch.randn(1, 1, 4, 4), 2.0), "kernel_size must be an int"),
    (lambda: QPUSGD([torch.zeros(2, requires_grad=True)], lr=0.1, seed=1.5), "QPUSGD: seed must be an int"),
    (lambda: QPUSGD([torch.zeros(2, requires_grad=True)], lr="0.1"), "QPUSGD: lr must be a number"),
])
def test_wrong_argument_types_are_clear_type_errors(call, message):
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        call()


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=float("inf")), "lr must be a non-negative finite number, but got inf"),
    (dict(lr=float("nan")), "lr must be a non-negative finite number, but got nan"),
    (dict(lr=0.1, momentum=float("inf")), "momentum must be a non-negative finite number"),
    (dict(lr=0.1, weight_decay=-1.0), "weight_decay must be a non-negative finite number"),
])
def test_qpusgd_refuses_values_that_would_saturate_every_weight(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QPUSGD([torch.zeros(2, requires_grad=True)], **kwargs)
