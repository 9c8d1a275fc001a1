"""fxp.adapt's fused steps in a PyTorch training loop (docs/adapt.md, "In
Python"): AdaptController.step with torch.optim.SGD equals after_backward
then SGD's step, bit for bit; with fxp.optim.QPUSGD (no master copy) it equals
the ops it is made of, moves each layer's group to its new format at a switch,
and resumes bit for bit; fxp.optim.QPUSGD.change_format and
fxp.qpu_change_format_; fxp.nn.recalibrate_batch_norm."""

from __future__ import annotations

import copy

import pytest
import torch

import fxp
from environment import bits as _bits
from fxp import FxpFormat

FMT = FxpFormat(16, 8)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _model(weight_mode="ste", batch_norm=False, device="cpu"):
    layers = [fxp.nn.QConv2d(1, 4, 3, weight_mode=weight_mode, param_format=FMT, act_format=FMT)]
    if batch_norm:
        layers.append(torch.nn.BatchNorm2d(4))
    layers += [torch.nn.ReLU(), torch.nn.Flatten(),
               fxp.nn.QLinear(4 * 6 * 6, 10, weight_mode=weight_mode, param_format=FMT, act_format=FMT)]
    return torch.nn.Sequential(*layers).to(device)


def _batch(seed, batch=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 1, 8, 8, generator=gen), torch.randint(0, 10, (batch,), generator=gen)


def _backward(model, optimizer, seed):
    device = next(model.parameters()).device
    x, y = (t.to(device) for t in _batch(seed))
    optimizer.zero_grad()
    torch.manual_seed(1000 + seed)  # the layers' stochastic rounding of activations
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b))


OPTIONS = dict(lookback=(2, 4), resolution=(20, 30), buffer_bits=3, l1=1e-4)


# --- torch.optim.SGD: one pass -----------------------------------------------------
def _sgd_formula(params, buffers, lr, momentum, weight_decay, nesterov):
    """torch.optim.SGD's update (dampening 0) in separate float32 operations,
    as the fused step computes it (adapt_step_math.h); torch's own kernels may
    contract a multiply-add into an FMA."""
    with torch.no_grad():
        for k, w in enumerate(params):
            d = w.grad + weight_decay * w
            if momentum:
                buffers[k] = momentum * buffers.get(k, torch.zeros_like(w)) + d
                d = d + momentum * buffers[k] if nesterov else buffers[k]
            w.copy_(w - lr * d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum, nesterov, weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4), (0.9, True, 0.0)])
def test_step_with_sgd_equals_after_backward_then_sgd(momentum, nesterov, weight_decay, device, monkeypatch):
    """Note [AdaPT's fused step]: the same arithmetic, so the same parameters,
    momentum and accumulators, bit for bit, up to the first switch (the fused
    step switches after the update, so its PD reads the updated parameters)."""
    # The two models' raw gradients must agree: cuDNN's backward picks deterministic algorithms only when asked.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    fused, plain = _model(device=device), _model(device=device)
    plain.load_state_dict(fused.state_dict())
    options = {**OPTIONS, "lookback": (6, 8)}
    cf, cp = fxp.adapt.AdaptController(fused, **options), fxp.adapt.AdaptController(plain, **options)
    settings = dict(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    of, op = torch.optim.SGD(fused.parameters(), **settings), torch.optim.SGD(plain.parameters(), **settings)
    buffers = {}
    for s in range(6):
        lf = _backward(fused, of, s)
        raw = [p.grad.clone() for p in fused.parameters()]
        switched = cf.step(of, lf, 8)
        lp = _backward(plain, op, s)
        assert cp.after_backward(lp, 8) == switched == (s == 5)
        _sgd_formula(list(plain.parameters()), buffers, **settings)
        assert _same(fused.parameters(), plain.parameters()), f"step {s}"
        assert _same(raw, [p.grad for p in fused.parameters()])  # .grad keeps the raw gradient
        if not switched:
            assert cf.record() == cp.record()
            assert _same(cf.state_dict().values(), cp.state_dict().values())
    if momentum:  # in the optimizer's state, as torch.optim.SGD keeps them
        assert _same([of.state[p]["momentum_buffer"] for p in fused.parameters()], buffers.values())
    else:
        assert all(of.state[p].get("momentum_buffer") is None for p in fused.parameters())


def test_step_with_another_optimizer_is_after_backward_then_its_step():
    torch.manual_seed(0)
    a, b = _model(), _model()
    b.load_state_dict(a.state_dict())
    ca, cb = fxp.adapt.AdaptController(a, **OPTIONS), fxp.adapt.AdaptController(b, **OPTIONS)
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, dampening=0.1)  # dampening: not fusable
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, dampening=0.1)
    for s in range(5):
        ca.step(oa, _backward(a, oa, s), 8)
        cb.after_backward(_backward(b, ob, s), 8)
        ob.step()
    assert _same(a.parameters(), b.parameters()) and ca.record() == cb.record()


def test_fused_step_works_with_lr_schedulers_and_leaves_hooked_sgd_to_its_step():
    import warnings
    model = _model()
    controller = fxp.adapt.AdaptController(model, **OPTIONS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Detected call of lr_scheduler.step() before optimizer.step()"
        controller.step(optimizer, _backward(model, optimizer, 0), 8)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == 0.025
    calls = []
    optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append(1))
    before = [p.clone() for p in model.parameters()]
    controller.step(optimizer, _backward(model, optimizer, 1), 8)  # the two passes, then SGD's own step
    assert calls == [1] and not _same(before, model.parameters())


# --- fxp.optim.QPUSGD: no master copy ----------------------------------------------
def _qpu(seed=0, scale=1.0, device="cpu", **options):
    torch.manual_seed(seed)
    model = _model("qpu", device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    controller = fxp.adapt.AdaptController(model, **{**OPTIONS, **options})
    fxp.nn.quantize_layer_parameters_(model, seed=5)
    optimizer = fxp.optim.QPUSGD(controller.parameter_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4, seed=7)
    return model, controller, optimizer


@pytest.mark.parametrize("device", DEVICES)
def test_qpu_step_equals_normalize_accumulate_then_the_qpu_step(device, monkeypatch):
    """Before the first switch: the fused QPU step (Note [AdaPT's fused QPU
    step]) equals the layer norms, normalize_accumulate_ and QPUSGD's own step
    over the same groups, seeds and steps, bit for bit."""
    # The two models' raw gradients must agree: cuDNN's backward picks deterministic algorithms only when asked.
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    model, controller, optimizer = _qpu(lookback=(4, 8), device=device)
    reference = copy.deepcopy(model)
    ref_optimizer = fxp.optim.QPUSGD(
        [{"params": list(layer.parameters()), "total_bits": 8, "frac_bits": 4, "momentum_total_bits": 8,
          "momentum_frac_bits": 4} for layer in (reference[0], reference[3])],
        lr=0.05, momentum=0.9, weight_decay=5e-4, seed=7)
    accumulated = [torch.zeros_like(p) for p in reference.parameters()]
    layers = [0, 0, 1, 1]
    for s in range(3):
        assert not controller.step(optimizer, _backward(model, optimizer, s), 8)
        _backward(reference, ref_optimizer, s)
        params = list(reference.parameters())
        grads = [p.grad for p in params]
        norms = torch.ops.fxp.layer_gradient_norms(params, grads, layers, 2, 1e-4)
        torch.ops.fxp.normalize_accumulate_(grads, accumulated, params, norms, layers, 1e-4)
        ref_optimizer.step()
        assert _same(model.parameters(), reference.parameters()), f"step {s}"
        assert _same([optimizer.state[p]["momentum_buffer"] for p in model.parameters()],
                     [ref_optimizer.state[p]["momentum_buffer"] for p in reference.parameters()])
        saved = controller.state_dict()
        assert _same([saved[f"accumulated.{i}.{k}"] for i in (0, 1) for k in (0, 1)], accumulated)


def _on_grid(x, fmt):
    return torch.equal(torch.ops.fxp.quantize(x, fmt.total_bits, fmt.frac_bits, "nearest_even"), x)


@pytest.mark.parametrize("device", DEVICES)
def test_qpu_switch_moves_each_group_to_its_layers_new_format(device):
    """Small weights (x0.1) from a fine start format, so that PD lowers the
    fractional bits and the rounding onto the coarser grid changes the count
    of zeros: the density must be measured after the group moved there."""
    model, controller, optimizer = _qpu(scale=0.1, start=FxpFormat(20, 16), device=device)
    changes = 0
    switches = [0, 0]
    moved = {}  # layer -> its parameters just before the group moved to the new grid
    change_format = optimizer.change_format

    def spy(index, fmt):
        moved[index] = [p.detach().clone() for p in optimizer.param_groups[index]["params"]]
        change_format(index, fmt)

    optimizer.change_format = spy
    order_mattered = False
    for s in range(12):
        before = controller.formats()
        moved.clear()
        controller.step(optimizer, _backward(model, optimizer, s), 8)
        after = controller.formats()
        changes += sum(before[k] != after[k] for k in after)
        record = controller.record()
        for i, (name, fmt) in enumerate(after.items()):
            layer, group = model[int(name)], optimizer.param_groups[i]
            assert layer.param_format == layer.act_format == fmt
            assert (group["total_bits"], group["frac_bits"]) == (fmt.total_bits, fmt.frac_bits)
            assert (group["momentum_total_bits"], group["momentum_frac_bits"]) == (fmt.total_bits, fmt.frac_bits)
            params = list(layer.parameters())
            for p in params:  # on the layer's grid, and so is the momentum (it follows the format)
                assert _on_grid(p, fmt) and _on_grid(optimizer.state[p]["momentum_buffer"], fmt)
            if record["layers"][i]["switches"] > switches[i]:
                # The density is measured on the new grid, after the parameters moved there (as fxp-train).
                switches[i] = record["layers"][i]["switches"]
                zeros = sum(int((p == 0).sum()) for p in params) / sum(p.numel() for p in params)
                assert record["layers"][i]["sparsity"] == pytest.approx(zeros, abs=1e-12)
                if i in moved:  # measured before the move (on the old values, rounded half to even) would differ
                    old = [torch.ops.fxp.quantize(p, fmt.total_bits, fmt.frac_bits, "nearest_even") for p in moved[i]]
                    order_mattered |= sum(int((q == 0).sum()) for q in old) != sum(int((p == 0).sum()) for p in params)
    assert changes >= 3 and min(switches) >= 3
    assert order_mattered or device == "cuda"  # the CPU run's formats are known to lower FL (CUDA's sums differ)


def test_qpu_step_resumes_bit_for_bit():
    a, ca, oa = _qpu()
    for s in range(5):
        ca.step(oa, _backward(a, oa, s), 8)
    b, cb, _ = _qpu(seed=1)
    b.load_state_dict(a.state_dict())
    cb.load_state_dict(ca.state_dict())
    # The optimizer from the restored controller's groups (at the saved formats), then its saved state.
    ob = fxp.optim.QPUSGD(cb.parameter_groups(), lr=0.05, momentum=0.9, weight_decay=5e-4, seed=7)
    ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as from a file: no shared buffers
    for s in range(5, 12):
        ca.step(oa, _backward(a, oa, s), 8)
        cb.step(ob, _backward(b, ob, s), 8)
    assert _same(a.parameters(), b.parameters()) and ca.record() == cb.record()
    assert max(layer["switches"] for layer in ca.record()["layers"]) >= 4


def test_first_qpu_step_measures_the_density_on_the_grid():
    """QPU's parameters go onto their grids after the controller is built (it
    gives the layers their start formats): the first step measures again, so
    the performance model starts from the density fxp-train measures."""
    model, controller, optimizer = _qpu(scale=0.1, lookback=(8, 8))
    zeros = [sum(int((p == 0).sum()) for p in layer.parameters()) / sum(p.numel() for p in layer.parameters())
             for layer in (model[0], model[3])]
    assert controller.record()["layers"][1]["sparsity"] != pytest.approx(zeros[1])  # measured before the rounding
    controller.step(optimizer, _backward(model, optimizer, 0), 8)
    assert [layer["sparsity"] for layer in controller.record()["layers"]] == pytest.approx(zeros, abs=1e-12)


@pytest.mark.parametrize("kind", ["sgd", "two_pass", "qpu"])
def test_channels_last_parameters_step_as_contiguous_ones(kind):
    """A channels_last model (strided conv weights and gradients) adapts and
    steps exactly as the same parameters stored contiguously: the ops read a
    strided parameter in a contiguous copy, and an update writes it back.
    One backward feeds both (the other model's forward only counts its
    multiply-adds), so only the controller and the optimizer are compared."""
    mode = "qpu" if kind == "qpu" else "ste"
    torch.manual_seed(0)
    strided = torch.nn.Sequential(
        fxp.nn.QConv2d(2, 4, 3, weight_mode=mode, param_format=FMT, act_format=FMT), torch.nn.ReLU(),
        torch.nn.Flatten(), fxp.nn.QLinear(4 * 6 * 6, 10, weight_mode=mode, param_format=FMT, act_format=FMT))
    contiguous = copy.deepcopy(strided)
    strided.to(memory_format=torch.channels_last)
    assert not strided[0].weight.is_contiguous()
    controllers = [fxp.adapt.AdaptController(m, **OPTIONS) for m in (strided, contiguous)]
    settings = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, dampening=0.1 if kind == "two_pass" else 0.0)
    if kind == "qpu":
        for m in (strided, contiguous):
            fxp.nn.quantize_layer_parameters_(m, seed=5)
        settings.pop("dampening")
        optimizers = [fxp.optim.QPUSGD(c.parameter_groups(), seed=7, **settings) for c in controllers]
    else:
        optimizers = [torch.optim.SGD(m.parameters(), **settings) for m in (strided, contiguous)]
    for s in range(12):
        x, y = _batch(s)
        x = torch.cat([x, -x], dim=1).contiguous(memory_format=torch.channels_last)
        for o in optimizers:
            o.zero_grad()
        torch.manual_seed(1000 + s)
        loss = torch.nn.functional.cross_entropy(strided(x), y)
        loss.backward()
        assert not strided[0].weight.grad.is_contiguous()
        with torch.no_grad():
            contiguous(x)  # the performance model's multiply-adds come from a forward pass
        for p, q in zip(strided.parameters(), contiguous.parameters()):
            q.grad = p.grad.clone(memory_format=torch.contiguous_format)  # its own: a pass normalizes .grad
        for c, o in zip(controllers, optimizers):
            c.step(o, loss, 8)
        assert not strided[0].weight.is_contiguous()  # updated in place, not replaced
        assert _same(strided.parameters(), contiguous.parameters()), f"step {s}"
    records = [c.record() for c in controllers]
    assert records[0] == records[1] and max(layer["switches"] for layer in records[0]["layers"]) >= 3
    assert _same(controllers[0].state_dict().values(), controllers[1].state_dict().values())


@pytest.mark.parametrize("kind", ["qpu", "sgd", "adam"])
def test_non_finite_loss_changes_nothing(kind):
    if kind == "qpu":
        model, controller, optimizer = _qpu()
    else:
        model = _model()
        controller = fxp.adapt.AdaptController(model, **OPTIONS)
        optimizer = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if kind == "sgd"
                     else torch.optim.Adam(model.parameters(), lr=0.1))
    before = [p.clone() for p in model.parameters()]
    _backward(model, optimizer, 0)
    grads = [p.grad.clone() for p in model.parameters()]
    assert not controller.step(optimizer, float("nan"), 8)
    assert not controller.step(optimizer, torch.tensor(float("inf")), 8)
    assert _same(before, model.parameters()) and _same(grads, [p.grad for p in model.parameters()])
    assert controller.record()["layers"][0]["samples"] == 0 and not optimizer.state
    if kind == "qpu":
        assert optimizer.param_groups[0]["step"] == 0


def test_bad_step_arguments_are_refused_before_anything_changes():
    model, controller, optimizer = _qpu()
    before = [p.clone() for p in model.parameters()]
    _backward(model, optimizer, 0)
    with pytest.raises(ValueError, match="the batch size must be positive, but got 0"):
        controller.step(optimizer, 1.0, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        controller.step(optimizer, 1.0, 8.0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, but got NoneType"):
        controller.step(None, 1.0, 8)
    assert _same(before, model.parameters()) and optimizer.param_groups[0]["step"] == 0
    assert controller.record()["layers"][0]["samples"] == 0


def test_steps_reject_mismatched_optimizers():
    model, controller, optimizer = _qpu()
    _backward(model, optimizer, 0)
    with pytest.raises(ValueError, match="QPU layers change format with their optimizer's groups"):
        controller.after_backward(1.0, 8)
    with pytest.raises(ValueError, match="QPU layers need a fxp.optim.QPUSGD"):
        controller.step(torch.optim.SGD(model.parameters(), lr=0.1), 1.0, 8)
    with pytest.raises(ValueError, match="has 1 parameter groups, but quantized updates need one per adapted layer"):
        controller.step(fxp.optim.QPUSGD(model.parameters(), lr=0.1, format=FxpFormat(8, 4)), 1.0, 8)
    swapped = controller.parameter_groups()[::-1]
    with pytest.raises(ValueError, match="parameter group 0 of the optimizer is not layer 0's parameters"):
        controller.step(fxp.optim.QPUSGD(swapped, lr=0.1), 1.0, 8)
    wrong = controller.parameter_groups()
    wrong[1].update(total_bits=12, frac_bits=6, momentum_total_bits=12, momentum_frac_bits=6)
    with pytest.raises(ValueError, match=r"group 1 updates FxP\(12,6\).*layer 3 is at FxP\(8,4\)"):
        controller.step(fxp.optim.QPUSGD(wrong, lr=0.1), 1.0, 8)
    ste = _model("ste")
    with pytest.raises(ValueError, match="a fxp.optim.QPUSGD updates QPU layers"):
        fxp.adapt.AdaptController(ste).step(fxp.optim.QPUSGD(ste.parameters(), lr=0.1), 1.0, 8)
    mixed = _model("ste")
    mixed[3] = fxp.nn.QLinear(4 * 6 * 6, 10, weight_mode="qpu", param_format=FMT, act_format=FMT)
    with pytest.raises(ValueError, match="layer 3 has weight_mode 'qpu', but the layers before it 'ste'"):
        fxp.adapt.AdaptController(mixed)
    with pytest.raises(ValueError, match="layers need weight_mode='ste'.*or 'qpu'"):
        fxp.adapt.AdaptController(_model("fp32"))


# --- QPUSGD.change_format and its op ------------------------------------------------
def test_change_format_rounds_parameters_and_following_momentum_with_their_own_streams():
    """Note [QPU format change]: parameter k of n with key seed + the format
    change's delta at offset 2 (step n + k), its momentum at that + 1."""
    torch.manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(40) / 4) for _ in range(3)]
    optimizer = fxp.optim.QPUSGD([{"params": params[:2]}, {"params": params[2:], "momentum_total_bits": 12,
                                                           "momentum_frac_bits": 6}],
                                 lr=0.1, momentum=0.9, format=FxpFormat(16, 10))
    for p in params:
        p.grad = torch.randn(40)
    optimizer.step()
    optimizer.step()
    values = [p.detach().clone() for p in params]
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in params]
    optimizer.change_format(0, FxpFormat(8, 3))
    optimizer.change_format(1, FxpFormat(10, 4))
    key = 0 + 0x6A09E667F3BCC908  # seed 0 (group 0) plus the format change's delta
    for k in range(2):  # group 0, n = 2, step 2
        assert torch.equal(params[k].detach(), torch.ops.fxp.quantize_seeded(values[k], 8, 3, "stochastic", key,
                                                                            2 * (2 * 2 + k)))
        assert torch.equal(optimizer.state[params[k]]["momentum_buffer"],
                           torch.ops.fxp.quantize_seeded(buffers[k], 8, 3, "stochastic", key, 2 * (2 * 2 + k) + 1))
    assert torch.equal(params[2].detach(), torch.ops.fxp.quantize_seeded(values[2], 10, 4, "stochastic", key + 1,
                                                                        2 * 2))
    assert torch.equal(optimizer.state[params[2]]["momentum_buffer"], buffers[2])  # its own format: unchanged
    group0, group1 = optimizer.param_groups
    assert (group0["total_bits"], group0["frac_bits"], group0["momentum_total_bits"]) == (8, 3, 8)
    assert (group1["total_bits"], group1["frac_bits"], group1["momentum_total_bits"]) == (10, 4, 12)
    with pytest.raises(ValueError, match="group 2 of 2"):
        optimizer.change_format(2, FxpFormat(8, 4))
    with pytest.raises(ValueError, match="frac_bits"):
        optimizer.change_format(0, FxpFormat(4, 4))


def test_qpu_change_format_op_checks_its_arguments_and_passes_opcheck():
    op = torch.ops.fxp.qpu_change_format_
    p, m = [torch.randn(10), torch.randn(3, 4)], [torch.randn(3, 4)]
    with pytest.raises(RuntimeError, match="qpu_change_format_: expected a position per momentum buffer"):
        op(p, m, [], 8, 4, "stochastic", 0, 0)
    with pytest.raises(RuntimeError, match=r"momentum_positions\[0\] is 2, but there are 2 parameters"):
        op(p, m, [2], 8, 4, "stochastic", 0, 0)
    with pytest.raises(RuntimeError, match=r"momentum buffer 0 has shape \[3, 4\], but parameter 0 has shape \[10\]"):
        op(p, m, [0], 8, 4, "stochastic", 0, 0)
    with pytest.raises(RuntimeError, match="qpu_change_format_: step must be non-negative"):
        op(p, m, [1], 8, 4, "stochastic", 0, -1)
    with pytest.raises(RuntimeError, match="qpu_change_format_.*rounding"):
        op(p, m, [1], 8, 4, "up", 0, 0)
    with pytest.raises(RuntimeError, match="qpu_change_format_"):
        op(p, m, [1], 40, 4, "stochastic", 0, 0)
    # Checked before anything is rounded: a bad last tensor leaves the first ones as they were.
    with pytest.raises(RuntimeError, match=r"momentum_positions\[0\] is 0, but there are 0 parameters"):
        op([], m, [0], 8, 4, "stochastic", 0, 0)
    before = [t.clone() for t in p + m]
    with pytest.raises(RuntimeError, match=r"share memory"):
        op(p, [p[1]], [1], 8, 4, "stochastic", 0, 0)  # a buffer that is its parameter
    with pytest.raises(RuntimeError, match=r"params\[2\] has elements that share memory"):
        op(p + [torch.randn(1).expand(4)], m, [1], 8, 4, "stochastic", 0, 0)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] must be a floating-point tensor, but got Int"):
        op(p, [torch.zeros(3, 4, dtype=torch.int32)], [1], 8, 4, "stochastic", 0, 0)
    with pytest.raises(RuntimeError, match="momentum buffer 0 is Double, but parameter 1 is Float"):
        op(p, [torch.zeros(3, 4, dtype=torch.float64)], [1], 8, 4, "stochastic", 0, 0)
    with pytest.raises(RuntimeError, match="parameter 1 has two momentum buffers"):
        op(p, m + m, [1, 1], 8, 4, "stochastic", 0, 0)
    assert _same(before, p + m)
    torch.library.opcheck(op.default, ([t.clone() for t in p], [m[0].clone()], [1], 8, 4, "stochastic", 3, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_change_format_equals_cpu(dtype):
    """Note [QPU initialization] and Note [QPU format change]: quantize_parameters_
    and qpu_change_format_ draw from (key, offset) streams of their own, so the
    same tensors round to the same bits on CUDA as on the CPU, stochastic
    rounding, saturation, NaN and infinities included; momentum buffers too."""
    gen = torch.Generator().manual_seed(21)
    shapes = [(1_000_003,), (7, 9), (3, 4, 5, 6), (1,), (0, 4)]
    params = [(torch.randn(s, generator=gen, dtype=torch.float64) * 12).to(dtype) for s in shapes]
    params[0][::1001], params[0][1::1001], params[0][2::1001] = float("nan"), float("inf"), -float("inf")
    params[0][3::1001] = -0.0
    positions = [0, 2, 3, 4]  # parameter 1 has no momentum buffer
    buffers = [(torch.randn(shapes[k], generator=gen, dtype=torch.float64) * 12).to(dtype) for k in positions]
    buffers[0][5::1001] = float("nan")
    total_bits, frac_bits = [8, 16, 12, 8, 10], [3, 10, 6, 2, 4]

    cpu_params, cuda_params = [t.clone() for t in params], [t.cuda() for t in params]
    torch.ops.fxp.quantize_parameters_(cpu_params, total_bits, frac_bits, "stochastic", 5)
    torch.ops.fxp.quantize_parameters_(cuda_params, total_bits, frac_bits, "stochastic", 5)
    for k, (got, want) in enumerate(zip(cuda_params, cpu_params)):
        assert got.device == cuda_params[0].device and got.dtype == dtype
        assert torch.equal(_bits(got.cpu()), _bits(want)), f"quantize_parameters_: parameter {k}"
    # The cases are there: values moved onto the grid, stochastically (not as half to even would put
    # them), saturated at FxP(8, 3)'s ends, and NaN kept.
    nearest = [t.clone() for t in params]
    torch.ops.fxp.quantize_parameters_(nearest, total_bits, frac_bits, "nearest_even", 5)
    first = cpu_params[0]
    assert not torch.equal(_bits(first), _bits(params[0])) and not torch.equal(_bits(first), _bits(nearest[0]))
    assert (first == 15.875).sum() > 1 and (first == -16).sum() > 1 and torch.isnan(first).sum() > 1
    assert not torch.equal(_bits(cpu_params[2]), _bits(nearest[2]))

    # A format change of the whole group, its momentum buffers after it, at step 4.
    cpu_buffers, cuda_buffers = [t.clone() for t in buffers], [t.cuda() for t in buffers]
    before = [t.clone() for t in cpu_params + cpu_buffers]
    torch.ops.fxp.qpu_change_format_(cpu_params, cpu_buffers, positions, 6, 2, "stochastic", 9, 4)
    torch.ops.fxp.qpu_change_format_(cuda_params, cuda_buffers, positions, 6, 2, "stochastic", 9, 4)
    for k, (got, want) in enumerate(zip(cuda_params + cuda_buffers, cpu_params + cpu_buffers)):
        assert torch.equal(_bits(got.cpu()), _bits(want)), f"qpu_change_format_: tensor {k}"
    changed = [not torch.equal(_bits(a), _bits(b)) for a, b in zip(cpu_params + cpu_buffers, before)]
    assert changed == [True, True, True, True, False, True, True, True, False]  # the empty ones stay empty
    # Stochastic, and saturated at FxP(6, 2)'s ends [-8, 7.75]: the buffers as the parameters.
    nearest = [t.clone() for t in before]
    torch.ops.fxp.qpu_change_format_(nearest[:5], nearest[5:], positions, 6, 2, "nearest_even", 9, 4)
    assert not torch.equal(_bits(cpu_buffers[0]), _bits(nearest[5]))
    assert (cpu_buffers[0] == 7.75).sum() > 1 and (cpu_buffers[0] == -8).sum() > 1
    assert torch.isnan(cpu_buffers[0]).sum() > 1


# --- fxp.nn.recalibrate_batch_norm ---------------------------------------------------
def test_recalibrate_batch_norm_averages_the_batches_and_restores_the_rest():
    torch.manual_seed(0)
    model = _model("ste", batch_norm=True)
    conv, bn = model[0], model[1]
    batches = [_batch(s)[0] for s in range(3)]
    momentum = bn.momentum
    # The expected statistics: each batch's conv output in the same forwards from the same generator state.
    state, outputs = torch.get_rng_state(), []
    hook = conv.register_forward_hook(lambda module, inputs, output: outputs.append(output))
    with torch.no_grad():
        for x in batches:
            model(x)
    hook.remove()
    torch.set_rng_state(state)
    model.eval()
    assert fxp.nn.recalibrate_batch_norm(model, ((x, None) for x in batches + batches), num_batches=3) == 3
    means = torch.stack([o.mean((0, 2, 3)) for o in outputs])
    variances = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outputs])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-6, atol=1e-7)
    assert bn.momentum == momentum and not model.training and not bn.training
    assert torch.equal(torch.get_rng_state(), state)  # the training that follows draws as without it
    saved = [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()]
    with pytest.raises(ValueError, match="got no batches"):
        fxp.nn.recalibrate_batch_norm(model, [])
    with pytest.raises(RuntimeError):
        fxp.nn.recalibrate_batch_norm(model, [torch.randn(2, 3, 8, 8)])  # a bad input: the old statistics stay
    assert _same(saved, [bn.running_mean, bn.running_var, bn.num_batches_tracked])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        fxp.nn.recalibrate_batch_norm(model, batches, num_batches=0)
    assert fxp.nn.recalibrate_batch_norm(_model(), batches) == 0  # no batch norm: nothing to do
