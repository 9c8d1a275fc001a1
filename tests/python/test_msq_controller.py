"""fxp.msq.MsqController (issue 14): MSQ in a plain PyTorch training loop,
on the C++ controller that fxp-train runs. The layers read RoundClamp's
values, the penalty is λ·Σ|LSB| with its straight-through gradient, the
Hessian traces are exact where Hutchinson's estimator is, a check drops
bits by the paper's rule, and the state round-trips."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxp
from fxp.msq import MsqController


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                         nn.ReLU(), nn.Linear(5, 3))


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])


def test_layers_read_round_clamp_and_the_penalty_is_lambda_times_the_lsb_l1():
    model = small_cnn()
    plain = [m.weight.detach().clone() for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    controller = MsqController(model, start_bits=4, lam=0.25, hessian=False)
    assert controller.bits() == {"0": 4, "4": 4, "6": 4}
    layers = [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]
    want_l1 = 0.0
    for layer, w in zip(layers, plain):
        scale = w.abs().max().item()
        q, l1, _ = fxp.msq.round_clamp(w, scale, 4)
        assert torch.equal(layer.weight, q)
        want_l1 += l1.item()
    x, y = batch()
    loss = F.cross_entropy(model(x), y)
    penalty = controller.penalty()
    assert penalty.item() == pytest.approx(0.25 * want_l1, rel=1e-6)
    # Straight through: the master copy's gradient is the task gradient plus λ·sign(LSB).
    originals = [layer.parametrizations.weight.original for layer in layers]
    task = torch.autograd.grad(loss, originals, retain_graph=True)
    total = torch.autograd.grad(loss + penalty, originals)
    for w, scale, g_task, g_total in zip(originals, controller._core.scales(), task, total):
        sign = torch.sign(fxp.msq.round_clamp_lsb(w.detach(), scale, 4))
        torch.testing.assert_close(g_total, g_task + 0.25 * sign, rtol=0, atol=1e-6)


class TwoSeparateLayers(nn.Module):
    """loss = Σ a(x)² + Σ b(x)² with one input feature: each layer's Hessian is
    diagonal, 2·Σx² per weight, and there are no cross terms between the two,
    so Hutchinson's estimate is exact after one sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(1, 3, bias=False)
        self.b = nn.Linear(1, 5, bias=False)

    def loss(self, x):
        return self.a(x).pow(2).sum() + self.b(x).pow(2).sum()


def test_the_hessian_traces_are_exact_where_hutchinson_is_and_k_follows_sensitivity():
    model = TwoSeparateLayers()
    x = torch.tensor([[0.5], [-1.0], [2.0]])
    controller = MsqController(model, start_bits=6, alpha=0.0, hessian=True, hessian_samples=1)
    scales = controller._core.scales()
    dropped = controller.check(lambda: model.loss(x), seed=7)
    per_weight = 2 * x.pow(2).sum().item()  # the Hessian's diagonal entry, the same in both layers
    record = controller.record()
    for layer, weights in zip(record["layers"], (3, 5)):
        assert layer["hessian_trace"] == pytest.approx(per_weight * weights, rel=1e-6)
        assert layer["weights"] == weights
    # Equal sensitivities: neither is below the mean, so both drop k = 1 (α = 0 passes every layer).
    assert dropped == {"a": 1, "b": 1}
    assert controller.bits() == {"a": 5, "b": 5}
    assert model.a.parametrizations.weight[0].bits == 5
    assert controller._core.scales() == scales, "the scales stay, so the lower grid nests in the upper"
    # A steeper loss on b: a is below the mean sensitivity and drops 2.
    controller.check(lambda: model.a(x).pow(2).sum() + 10 * model.b(x).pow(2).sum(), seed=8)
    assert controller.bits() == {"a": 3, "b": 4}


def test_training_with_the_penalty_zeroes_the_lsbs_and_a_check_prunes_them():
    torch.manual_seed(0)
    model = nn.Linear(16, 4)
    # lr x λ well below the 5-bit step (scale / 32, about 0.008): the penalty walks each odd
    # code to its even neighbour without jumping past it, faster than the task gradient moves it.
    controller = MsqController(model, start_bits=5, min_bits=2, lam=1.0, alpha=0.9, hessian=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    assert controller.sparsities()[""] < 0.7
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(60):
        optimizer.zero_grad()
        (F.cross_entropy(model(x), y) + controller.penalty()).backward()
        optimizer.step()
    sparsity = controller.sparsities()[""]
    assert sparsity >= 0.9
    before = model.weight.detach().clone()
    assert controller.check() == {"": 1}
    assert controller.bits() == {"": 4}
    assert controller.compression_rate == 8.0
    # A zero LSB is pruned without changing its weight: the 4-bit grid nests in the 5-bit one.
    changed = (model.weight.detach() != before).float().mean().item()
    assert changed == pytest.approx(1 - sparsity)
    controller.freeze()
    assert controller.penalty().item() == 0.0
    with pytest.raises(RuntimeError, match="frozen"):
        controller.check()


def test_state_round_trips_into_a_controller_over_another_model():
    model = small_cnn()
    controller = MsqController(model, start_bits=6, alpha=0.0, hessian=False)
    controller.check()
    controller.check()
    controller.freeze()
    other_model = small_cnn(seed=1)  # other weights, so other scales until the state loads
    other = MsqController(other_model, start_bits=6, hessian=False)
    assert other._core.scales() != controller._core.scales()
    other.load_state_dict(controller.state_dict())
    assert other.bits() == controller.bits() == {"0": 4, "4": 4, "6": 4}
    assert other._core.scales() == controller._core.scales()
    assert other.frozen
    layer = other_model[0].parametrizations.weight[0]
    assert (layer.bits, layer.scale) == (4, controller._core.scales()[0])
    other_model[0].load_state_dict(model[0].state_dict())
    x, _ = batch()
    assert torch.equal(other_model[0](x), model[0](x))
    with pytest.raises(RuntimeError, match="the state is for 3 layers, but there are 1"):
        MsqController(nn.Linear(2, 2), hessian=False).load_state_dict(controller.state_dict())
    wider = nn.Sequential(nn.Conv2d(1, 5, 3), nn.Linear(3, 5), nn.Linear(5, 3))
    with pytest.raises(RuntimeError, match="the state's layer 0 has 36 weights, but 0 has 45"):
        MsqController(wider, hessian=False).load_state_dict(controller.state_dict())


def test_an_optimizer_built_before_the_controller_updates_the_master_copy():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = MsqController(model, start_bits=4, lam=0.0, hessian=False)
    master = model.parametrizations.weight.original
    before = master.detach().clone()
    F.mse_loss(model(torch.ones(3, 4)), torch.zeros(3, 2)).backward()
    optimizer.step()
    assert not torch.equal(master.detach(), before)
    assert torch.equal(model.weight, fxp.msq.round_clamp(master.detach(), controller._core.scales()[0], 4)[0])


def test_remove_leaves_the_quantized_weights_and_a_plain_model():
    model = small_cnn()
    controller = MsqController(model, start_bits=3, hessian=False)
    x, _ = batch()
    model.eval()
    quantized_output = model(x)
    copied = copy.deepcopy(model)  # a parametrized model deep-copies (the L1 norm is left out)
    assert torch.equal(copied(x), quantized_output)
    controller.remove()
    assert not torch.nn.utils.parametrize.is_parametrized(model[0])
    assert torch.equal(model(x), quantized_output)
    assert set(model.state_dict()) == set(small_cnn().state_dict())
    state = controller.state_dict()
    for call, what in [(controller.penalty, "penalty()"), (controller.check, "check()"),
                       (controller.freeze, "freeze()"), (lambda: controller.load_state_dict(state),
                                                           "load_state_dict()")]:
        with pytest.raises(RuntimeError) as e:
            call()
        assert str(e.value) == (f"fxp.msq: {what} after remove(): the layers no longer read through this "
                                "controller")
    assert not controller.frozen  # nothing changed widths no layer reads


def test_the_controller_refuses_what_would_fail_far_from_its_cause():
    model = small_cnn()
    controller = MsqController(model, start_bits=3)
    x, y = batch()
    with pytest.raises(ValueError, match=r"^fxp\.msq: float_path_loss returned a loss without a graph"):
        controller.check(lambda: F.cross_entropy(model(x), y).detach())
    with pytest.raises(TypeError, match=r"^fxp\.msq: load_state_dict takes the dict state_dict\(\) returns, "
                                        r"but got NoneType$"):
        controller.load_state_dict(None)
    with pytest.raises(TypeError, match=r"^fxp\.msq: an MsqController cannot be deep-copied"):
        copy.deepcopy(controller)


def test_bad_input_is_named():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        MsqController("model")
    with pytest.raises(ValueError, match="no nn.Conv2d or nn.Linear"):
        MsqController(nn.Sequential(nn.ReLU()))
    with pytest.raises(RuntimeError, match="start_bits <= 15"):
        MsqController(nn.Linear(2, 2), start_bits=16)
    with pytest.raises(RuntimeError, match="alpha must be in"):
        MsqController(nn.Linear(2, 2), alpha=1.5)
    with pytest.raises(RuntimeError, match="lambda must be a non-negative"):
        MsqController(nn.Linear(2, 2), lam=-1.0)
    with pytest.raises(TypeError, match="start_bits must be an int"):
        MsqController(nn.Linear(2, 2), start_bits=4.0)
    with pytest.raises(TypeError, match="hessian must be a bool"):
        MsqController(nn.Linear(2, 2), hessian=1)
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="not finite"):
        MsqController(layer)
    ste = fxp.nn.QLinear(2, 2, weight_mode="ste", param_format=fxp.FxpFormat(8, 4), act_format=fxp.FxpFormat(8, 4))
    with pytest.raises(ValueError, match="weight_mode 'ste'"):
        MsqController(ste)
    model = nn.Linear(2, 2)
    controller = MsqController(model)
    with pytest.raises(ValueError, match="parametrized already"):
        MsqController(model)
    with pytest.raises(TypeError, match="needs float_path_loss"):
        controller.check()
    with pytest.raises(TypeError, match="0-dim tensor"):
        controller.check(lambda: model(torch.ones(3, 2)))

    def failing_loss():
        assert model.parametrizations.weight[0].float_path
        raise KeyError("the loss failed")

    with pytest.raises(KeyError, match="the loss failed"):
        controller.check(failing_loss)
    assert not model.parametrizations.weight[0].float_path, "the float path is switched off after a failed check"
    frozen = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    frozen[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="the weight of layer 0 does not require grad"):
        MsqController(frozen)
    unused = nn.ModuleDict({"used": nn.Linear(2, 2), "spare": nn.Linear(2, 2)})
    spare = MsqController(unused, hessian_samples=1)
    with pytest.raises(RuntimeError, match="the loss does not depend on layer spare"):
        spare.check(lambda: unused["used"](torch.ones(1, 2)).sum())
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        MsqController(nn.Linear(2, 2).half())
