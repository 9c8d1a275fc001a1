"""Bad input to the Python API (Note [Argument checks in Python]): 64-bit Philox
keys given as uint64 (Note [64-bit Philox keys in Python]), numpy scalars where
numbers go, bool options that must be bools, and packed storage for an
optimizer that holds only some of a model's parameters."""

from __future__ import annotations

import copy
import io
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxp
from fxp import FxpFormat
from fxp.msq import MsqController
from fxp.optim import QPUSGD

x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
SEED_RANGE = re.escape("must be in [-2**63, 2**64) (a 64-bit Philox key")
OFFSET_RANGE = re.escape("offset must be in [0, 2**63) (the Philox counter is a non-negative int64), but got ")


# --- seeds and offsets: the full uint64 range -----------------------------------------------------------
def _seeded_calls(seed, offset=0):
    """Every fxp.ops entry point that takes a seed: their results with ``seed``."""
    m = x.view(2, 500)
    return [
        fxp.quantize_seeded(x, 8, 4, seed=seed, offset=offset),
        fxp.quantize_seeded_(x.clone(), 8, 4, seed=seed, offset=offset),
        fxp.quantize_seeded(x, 8, 4, seed=seed, offset=offset, out=torch.empty_like(x)),
        *fxp.quantize_seeded_stats(x, 8, 4, seed=seed, offset=offset),
        fxp.pack_seeded(x, 8, 4, seed=seed, offset=offset),
        fxp.ops.quantize_members(m, 0, [FxpFormat(8, 4)] * 2, "stochastic", seeds=[seed, seed], offsets=offset),
    ]


@pytest.mark.parametrize("unsigned, signed", [(2**64 - 1, -1), (2**63, -2**63), (2**63 + 12345, -2**63 + 12345)])
def test_seeds_of_2_to_the_63_and_above_are_their_twos_complement(unsigned, signed):
    got, want = _seeded_calls(unsigned, offset=3), _seeded_calls(signed, offset=3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert not torch.equal(got[0], fxp.quantize_seeded(x, 8, 4, seed=0, offset=3))  # the seed matters
    # A numpy uint64 is the same key.
    assert torch.equal(fxp.quantize_seeded(x, 8, 4, seed=np.uint64(unsigned), offset=3), want[0])


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 2**70])
def test_seeds_outside_the_64_bit_range_are_value_errors(seed):
    for call in (lambda: fxp.quantize_seeded(x, 8, 4, seed=seed), lambda: fxp.quantize_seeded_(x.clone(), 8, 4, seed=seed),
                 lambda: fxp.quantize_seeded_stats(x, 8, 4, seed=seed), lambda: fxp.pack_seeded(x, 8, 4, seed=seed)):
        with pytest.raises(ValueError, match=r"fxp\.\w+: seed " + SEED_RANGE + f".*but got {seed}$"):
            call()
    with pytest.raises(ValueError, match=r"fxp\.quantize_members: seeds\[1\] " + SEED_RANGE):
        fxp.ops.quantize_members(x.view(2, 500), 0, [FxpFormat(8, 4)] * 2, "stochastic", seeds=[0, seed])
    with pytest.raises(TypeError, match=r"fxp\.quantize_seeded: seed must be an int, but got True"):
        fxp.quantize_seeded(x, 8, 4, seed=True)


def test_offsets_have_no_int64_past_2_to_the_63():
    """C++ takes the counter as a non-negative int64: Python refuses what has none, 2**63 and above and negatives."""
    with pytest.raises(ValueError, match=r"fxp\.quantize_seeded: " + OFFSET_RANGE + "9223372036854775808"):
        fxp.quantize_seeded(x, 8, 4, seed=0, offset=2**63)
    with pytest.raises(ValueError, match=r"fxp\.pack_seeded: " + OFFSET_RANGE):
        fxp.pack_seeded(x, 8, 4, seed=0, offset=2**64 - 1)
    with pytest.raises(ValueError, match=r"fxp\.quantize_members: offsets\[1\] must be in \[0, 2\*\*63\)"):
        fxp.ops.quantize_members(x.view(2, 500), 0, [FxpFormat(8, 4)] * 2, "stochastic", seeds=[0, 0],
                                 offsets=[0, 2**63])
    with pytest.raises(ValueError, match=r"fxp\.quantize_seeded: " + OFFSET_RANGE + "-1$"):
        fxp.quantize_seeded(x, 8, 4, seed=0, offset=-1)
    assert torch.equal(fxp.quantize_seeded(x, 8, 4, seed=5, offset=2**63 - 1),
                       fxp.quantize_seeded(x, 8, 4, seed=5, offset=np.int64(2**63 - 1)))


@pytest.mark.parametrize("arguments, message", [
    ({"formats": FxpFormat(8, 4)}, "formats must be a list of FxpFormat, one per member, but got FxpFormat(total_bits=8, frac_bits=4)"),
    ({"seeds": 1}, "seeds must be a list of int, one per member, but got 1"),
    ({"offsets": 1.0}, "offsets must be a list of int, one per member, or one int, but got 1.0"),
    ({"offsets": True}, "offsets must be a list of int, one per member, or one int, but got True"),
    ({"rounding": None}, "rounding must be a list of str, one per member, or one str, but got None"),
    ({"rounding": ["stochastic", 3]}, "rounding[1] must be a str, but got 3"),
], ids=["formats", "seeds", "offsets", "offsets bool", "rounding", "rounding item"])
def test_quantize_members_names_a_list_argument_that_is_not_one(arguments, message):
    call = {"formats": [FxpFormat(8, 4)] * 2, "rounding": "stochastic", "seeds": [0, 1], **arguments}
    with pytest.raises(TypeError) as e:
        fxp.ops.quantize_members(x.view(2, 500), 0, call.pop("formats"), call.pop("rounding"), **call)
    assert str(e.value) == "fxp.quantize_members: " + message
    # Any iterable of values is a list: a range of seeds, a tuple of roundings.
    assert torch.equal(fxp.ops.quantize_members(x.view(2, 500), 0, (FxpFormat(8, 4),) * 2, ("stochastic",) * 2,
                                                seeds=range(2)),
                       fxp.ops.quantize_members(x.view(2, 500), 0, [FxpFormat(8, 4)] * 2, "stochastic", seeds=[0, 1]))


def test_quantize_parameters_takes_an_iterable_of_tensors_and_a_format():
    """A bare tensor once quantized row by row, each row a tensor with its own Philox stream."""
    p = torch.randn(100, 10)
    before = p.clone()
    with pytest.raises(TypeError) as e:
        fxp.optim.quantize_parameters_(p, FxpFormat(8, 4), seed=1)
    assert str(e.value) == ("fxp.optim.quantize_parameters_: params must be an iterable of tensors "
                            "(model.parameters(), [p]), but got a Tensor")
    with pytest.raises(TypeError, match=r"^fxp\.optim\.quantize_parameters_: format must be an FxpFormat, "
                                        r"but got \(8, 4\)$"):
        fxp.optim.quantize_parameters_([p], (8, 4))
    assert torch.equal(p, before)  # nothing was rounded
    q = p.clone()
    fxp.optim.quantize_parameters_([q], FxpFormat(8, 4), seed=1)
    assert not torch.equal(q, p) and torch.equal(q, fxp.quantize(q, FxpFormat(8, 4)))


@pytest.mark.parametrize("key, value, message", [
    ("total_bits", 8.0, "a param group's total_bits must be an int, but got 8.0"),
    ("rounding", None, "a param group's rounding must be a str, but got None"),
    ("momentum_form", None, "a param group's momentum_form must be a str, but got None"),
    ("lr", None, "a param group's lr must be a number, but got None"),
    ("lr", "0.1", "a param group's lr must be a number, but got '0.1'"),
    ("weight_decay", "0", "a param group's weight_decay must be a number, but got '0'"),
    ("step", 1.5, "a param group's step must be an int, but got 1.5"),
], ids=["total_bits", "rounding", "momentum_form", "lr None", "lr str", "weight_decay str", "step float"])
def test_qpu_sgd_names_a_group_value_of_the_wrong_type(key, value, message):
    """Values set in a group by hand: each refused by name, where the dispatcher said "failed to match any
    schema" or float() spoke, or the value was silently converted; nothing steps."""
    p = fxp.quantize(torch.randn(10), 8, 4).requires_grad_()
    opt = QPUSGD([p], lr=0.1, momentum=0.9, format=FxpFormat(8, 4))
    p.grad = torch.randn(10)
    before = p.detach().clone()
    opt.param_groups[0][key] = value
    with pytest.raises(TypeError) as e:
        opt.step()
    assert str(e.value) == "QPUSGD: " + message
    assert torch.equal(p.detach(), before)
    with pytest.raises(TypeError, match=r"^QPUSGD: rounding must be a str, but got None$"):
        QPUSGD([p], lr=0.1, rounding=None)
    with pytest.raises(TypeError, match=r"^QPUSGD: a param group's lr must be a number, but got 'x'$"):
        QPUSGD([{"params": [p], "lr": "x"}], lr=0.1)


def test_qpu_sgd_takes_a_0_dim_tensor_momentum_as_a_number():
    p = fxp.quantize(torch.randn(10), 8, 4).requires_grad_()
    opt = QPUSGD([p], lr=0.1, momentum=0.9, format=FxpFormat(8, 4))
    opt.param_groups[0]["momentum"] = torch.tensor(0.5)  # as float() took it before the type checks
    opt.param_groups[0]["weight_decay"] = torch.tensor(0.0, dtype=torch.float64)
    p.grad = torch.randn(10)
    opt.step()
    assert opt.param_groups[0]["momentum"] == 0.5 and type(opt.param_groups[0]["momentum"]) is float
    # make_optimizer's packed: a list for every method (None is named, for fp32 as for sqpu).
    with pytest.raises(TypeError, match=r"^make_optimizer: packed must be a list of packed storage"):
        fxp.optim.make_optimizer([p], "fp32", 0.1, packed=None)


def _qpu_run(seed, steps=3, **kwargs):
    torch.manual_seed(0)
    a, b = torch.randn(40), torch.randn(7)
    params = [fxp.quantize(t, 16, 10).requires_grad_() for t in (a, b)]
    opt = QPUSGD([{"params": [params[0]]}, {"params": [params[1]]}], lr=0.1, momentum=0.9, seed=seed, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape) / 7
        opt.step()
    return [p.detach() for p in params], opt


def test_qpu_sgd_takes_uint64_seeds_and_keeps_the_int64_round_trip():
    want, signed = _qpu_run(-1)
    got, unsigned = _qpu_run(2**64 - 1)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Group i's key is seed + i modulo 2**64 (as C++'s QpuSgd): stored as the int64 the op takes.
    assert [g["seed"] for g in unsigned.param_groups] == [g["seed"] for g in signed.param_groups] == [-1, 0]
    _, top = _qpu_run(2**63 - 1, steps=0)
    assert [g["seed"] for g in top.param_groups] == [2**63 - 1, -2**63]
    assert _qpu_run(np.uint64(2**64 - 1), steps=0)[1].param_groups[0]["seed"] == -1
    # The state dict round-trips, through torch.save too, and the loaded optimizer draws the same.
    buffer = io.BytesIO()
    torch.save(unsigned.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert [g["seed"] for g in saved["param_groups"]] == [-1, 0]
    params, fresh = _qpu_run(7, steps=0)
    fresh.load_state_dict(saved)
    assert [g["seed"] for g in fresh.param_groups] == [-1, 0]
    twin = copy.deepcopy(fresh)
    assert [g["seed"] for g in twin.param_groups] == [-1, 0]
    # A group's own seed is taken in the same range.
    p = torch.zeros(3, requires_grad=True)
    assert QPUSGD([{"params": [p], "seed": 2**63}], lr=0.1).param_groups[0]["seed"] == -2**63
    with pytest.raises(ValueError, match=r"^QPUSGD: seed " + SEED_RANGE + ".*but got 18446744073709551616$"):
        QPUSGD([p], lr=0.1, seed=2**64)
    with pytest.raises(ValueError, match=r"^QPUSGD: a param group's seed " + SEED_RANGE):
        QPUSGD([{"params": [p], "seed": -2**63 - 1}], lr=0.1)
    with pytest.raises(TypeError, match=r"^QPUSGD: a param group's seed must be an int, but got '1'"):
        QPUSGD([{"params": [p], "seed": "1"}], lr=0.1)


def test_qpu_sgd_refuses_a_seed_set_by_hand_out_of_range_before_any_step():
    (w, _), opt = _qpu_run(0, steps=1)
    w = w.clone()
    opt.param_groups[1]["seed"] = 2**64
    with pytest.raises(ValueError, match=r"QPUSGD: a param group's seed " + SEED_RANGE):
        opt.step()
    assert opt.param_groups[0]["step"] == 1 and torch.equal(opt.param_groups[0]["params"][0].detach(), w)
    opt.param_groups[1]["seed"] = 2**64 - 1  # by hand, the uint64 spelling works too
    opt.step()


def test_quantize_parameters_and_quantize_model_take_uint64_seeds():
    def initialized(seed, fn):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        fn(model, seed)
        return [p.detach().clone() for p in model.parameters()]

    fmt = FxpFormat(8, 4)
    for fn in (lambda m, s: fxp.optim.quantize_parameters_(m.parameters(), fmt, seed=s),
               lambda m, s: fxp.nn.quantize_model(m, "sqpu", fmt, fmt, seed=s),
               lambda m, s: fxp.nn.quantize_layer_parameters_(fxp.nn.quantize_model(m, "ste", fmt, fmt), seed=s)):
        got, want = initialized(2**64 - 2, fn), initialized(-2, fn)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert not all(torch.equal(a, b) for a, b in zip(got, initialized(0, fn)))  # the seed is not ignored
    with pytest.raises(ValueError, match=r"fxp\.optim\.quantize_parameters_: seed " + SEED_RANGE):
        fxp.optim.quantize_parameters_([torch.zeros(3)], fmt, seed=2**64)
    with pytest.raises(ValueError, match=r"^quantize_layer_parameters_: seed " + SEED_RANGE):
        fxp.nn.quantize_layer_parameters_(nn.Sequential(), seed=-2**64)
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"^quantize_model: seed " + SEED_RANGE):
        fxp.nn.quantize_model(model, "sqpu", fmt, fmt, seed=2**64)
    assert type(model[0]) is nn.Linear  # refused before anything changed


def _msq_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def test_msq_check_takes_uint64_seeds():
    g = torch.Generator().manual_seed(1)
    x0, y0 = torch.randn(6, 4, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    traces = []
    for seed in (-1, 2**64 - 1, 0):
        model = _msq_model()
        controller = MsqController(model, start_bits=4, hessian_samples=2)
        controller.check(lambda: F.cross_entropy(model(x0), y0), seed=seed)
        traces.append([layer["hessian_trace"] for layer in controller.record()["layers"]])
    assert traces[0] == traces[1] and traces[0] != traces[2]
    with pytest.raises(ValueError, match=r"fxp\.msq: seed " + SEED_RANGE):
        controller.check(lambda: F.cross_entropy(model(x0), y0), seed=2**64)


# --- numpy scalars are numbers ----------------------------------------------------------------------------
def test_numpy_scalars_are_numbers_and_bools_and_strings_are_not():
    w = torch.randn(30)
    want = fxp.msq.round_clamp(w, 0.5, 4)
    for scale in (np.float32(0.5), np.float64(0.5), np.float16(0.5)):
        for a, b in zip(fxp.msq.round_clamp(w, scale, np.int64(4)), want):
            assert torch.equal(a, b)
    assert torch.equal(fxp.msq.round_clamp_lsb(w, np.float32(0.5), 4), fxp.msq.round_clamp_lsb(w, 0.5, 4))
    assert torch.equal(fxp.msq.round_clamp_codes(w, np.int32(1), 4), fxp.msq.round_clamp_codes(w, 1, 4))
    for bad in (True, np.bool_(True), "0.5"):
        with pytest.raises(TypeError, match=r"^fxp\.msq\.round_clamp: scale must be a number, but got "):
            fxp.msq.round_clamp(w, bad, 4)
    MsqController(_msq_model(), lam=np.float32(1e-3), alpha=np.float64(0.9), start_bits=np.int64(6))
    with pytest.raises(TypeError, match=r"^fxp\.msq: lam must be a number, but got '1e-3'"):
        MsqController(_msq_model(), lam="1e-3")
    # FxpFormat keeps plain ints, so that equal formats print and compare alike.
    fmt = FxpFormat(np.int64(8), np.int32(4))
    assert fmt == FxpFormat(8, 4) and type(fmt.total_bits) is int and str(fmt) == "FxP(8,4)"
    with pytest.raises(TypeError, match=r"FxpFormat: total_bits must be an int, but got 8\.0"):
        FxpFormat(8.0, 4)
    with pytest.raises(TypeError, match=r"FxpFormat: frac_bits must be an int, but got True"):
        FxpFormat(8, True)
    p = torch.zeros(3, requires_grad=True)
    opt = QPUSGD([p], lr=np.float32(0.25), momentum=np.float64(0.5), weight_decay=np.int64(0))
    p.grad = torch.ones(3)
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), -0.25))


def test_adapt_options_are_numbers_of_their_kind():
    def layers():
        q = dict(weight_mode="ste", param_format=FxpFormat(8, 4), act_format=FxpFormat(8, 4))
        return nn.Sequential(fxp.nn.QLinear(4, 3, **q))

    fxp.adapt.AdaptController(layers(), lookback_momentum=np.float32(0.33), buffer_bits=np.int64(4),
                              l1=np.float64(1e-4), resolution=(np.int64(50), 150))
    for kwargs, message in [(dict(lookback_momentum="0.33"), "lookback_momentum must be a number, but got '0.33'"),
                            (dict(l1=True), "l1 must be a number, but got True"),
                            (dict(buffer_bits=4.5), "buffer_bits must be an int, but got 4.5"),
                            (dict(strategy=None), "strategy must be a str, but got None")]:
        with pytest.raises(TypeError, match="^fxp\\.adapt: " + re.escape(message)):
            fxp.adapt.AdaptController(layers(), **kwargs)


# --- bool options are bools ---------------------------------------------------------------------------------
@pytest.mark.parametrize("call, message", [
    (lambda p: QPUSGD([p], lr=0.1, momentum=0.9, nesterov="yes"), "QPUSGD: nesterov must be a bool, but got 'yes'"),
    (lambda p: QPUSGD([p], lr=0.1, momentum=0.9, nesterov=1), "QPUSGD: nesterov must be a bool, but got 1"),
    (lambda p: QPUSGD([p], lr=0.1, capturable="no"), "QPUSGD: capturable must be a bool, but got 'no'"),
    (lambda p: QPUSGD([{"params": [p], "nesterov": "yes"}], lr=0.1, momentum=0.9),
     "QPUSGD: a param group's nesterov must be a bool, but got 'yes'"),
    (lambda p: MsqController(_msq_model(), hessian="no"), "fxp.msq: hessian must be a bool, but got 'no'"),
    (lambda p: fxp.nn.QLinear(3, 2, bias="no"), "QLinear: bias must be a bool, but got 'no'"),
    (lambda p: fxp.nn.QConv2d(1, 2, 3, bias=0), "QConv2d: bias must be a bool, but got 0"),
    (lambda p: fxp.nn.quantize_model(nn.Sequential(nn.Linear(2, 2)), "fp32", packed="no"),
     "quantize_model: packed must be a bool, but got 'no'"),
    (lambda p: fxp.ops.quantize_members(x.view(2, 500), 0, [FxpFormat(8, 4)] * 2, "stochastic", seeds=[0, 0],
                                        straight_through="yes"),
     "fxp.quantize_members: straight_through must be a bool, but got 'yes'"),
    (lambda p: fxp.quantize_ste(x, 8, 4, zero_grad_saturated="yes"),
     "fxp.quantize_ste: zero_grad_saturated must be a bool, but got 'yes'"),
])
def test_bool_options_must_be_bools(call, message):
    with pytest.raises(TypeError, match="^" + re.escape(message)):
        call(torch.zeros(3, requires_grad=True))


def test_numpy_bools_are_bools():
    p = torch.zeros(3, requires_grad=True)
    opt = QPUSGD([p], lr=0.1, momentum=0.9, nesterov=np.bool_(True), capturable=np.bool_(False))
    assert opt.param_groups[0]["nesterov"] is True and opt.capturable is False
    p.grad = torch.ones(3)
    opt.step()
    opt.param_groups[0]["nesterov"] = np.bool_(False)  # set by hand between steps
    opt.step()
    opt.param_groups[0]["nesterov"] = "no"
    with pytest.raises(TypeError, match=r"^QPUSGD: a param group's nesterov must be a bool, but got 'no'"):
        opt.step()
    assert fxp.nn.QLinear(3, 2, bias=np.bool_(False)).bias is None
    model = _msq_model()
    controller = MsqController(model, hessian=np.bool_(False))
    with pytest.raises(TypeError, match=r"^fxp\.msq: leave_quantized must be a bool, but got 'no'"):
        controller.remove(leave_quantized="no")
    controller.remove(leave_quantized=np.bool_(False))
    assert torch.equal(fxp.quantize_ste(x, 8, 4, zero_grad_saturated=np.bool_(True)), fxp.quantize(x, 8, 4))


# --- packed storage for an optimizer over some of the parameters ----------------------------------------
def _packed_cnn():
    torch.manual_seed(0)
    model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    model.quantize_parameters_()
    return model.pack_()


def _train_step(model, opt):
    g = torch.Generator().manual_seed(3)
    opt.zero_grad()
    F.cross_entropy(model(torch.randn(4, 1, 28, 28, generator=g)), torch.tensor([1, 2, 3, 4])).backward()
    opt.step()


@pytest.mark.parametrize("how", ["packed=", "set_packed_storage(list)"])
def test_an_optimizer_over_the_trainable_parameters_takes_the_models_packed_storage(how):
    model = _packed_cnn()
    model.conv1.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    storage = fxp.nn.packed_storage(model)
    if how == "packed=":
        opt = QPUSGD(trainable, lr=0.1, momentum=0.9, format=FxpFormat(16, 10), packed=storage)
    else:
        opt = QPUSGD(trainable, lr=0.1, momentum=0.9, format=FxpFormat(16, 10))
        opt.set_packed_storage(storage)
    assert set(map(id, opt._codes)) == set(map(id, trainable))  # the frozen layer's entry is skipped
    before = {name: getattr(layer, "weight_codes").clone() for name, layer in model.named_children()}
    for _ in range(2):
        _train_step(model, opt)
    assert torch.equal(model.conv1.weight_codes, before["conv1"])  # frozen: untouched
    for name in ("conv2", "fc1", "fc2"):
        assert not torch.equal(getattr(model, name).weight_codes, before[name]), name
    assert model.conv1.weight not in opt.state and all("momentum_buffer" in opt.state[p] for p in trainable)


def test_a_held_packed_parameter_missing_from_the_list_still_refuses_to_step():
    model = _packed_cnn()
    model.conv1.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    storage = [s for s in fxp.nn.packed_storage(model) if s.parameter is not model.fc1.weight]
    opt = QPUSGD(trainable, lr=0.1, momentum=0.9, format=FxpFormat(16, 10), packed=storage)
    codes = model.fc2.weight_codes.clone()
    with pytest.raises(ValueError, match=r"parameter 1 of group 0 is expanded .*packed=fxp\.nn\.packed_storage"):
        _train_step(model, opt)
    assert torch.equal(model.fc2.weight_codes, codes)
    # One parameter named alone is still checked as before: one the optimizer does not hold is refused.
    with pytest.raises(ValueError, match="QPUSGD.set_packed_storage: got a parameter this optimizer does not hold"):
        opt.set_packed_storage(model.conv1.weight, model.conv1.weight_codes, FxpFormat(16, 10))
    with pytest.raises(TypeError, match=r"^QPUSGD\.set_packed_storage: takes a parameter, its codes and their "
                                        r"format, or a list of them"):
        fxp.optim.make_optimizer(trainable, "sqpu", 0.1, format=FxpFormat(16, 10), packed=None)
    with pytest.raises(TypeError, match=r"entry 0 of the packed storage is not \(parameter, codes, format\)"):
        opt.set_packed_storage([(model.fc1.weight, model.fc1.weight_codes)])
    # The list is checked whole before any entry is set: a bad one sets none.
    bad = [fxp.nn.packed_storage(model)[2], (model.fc2.weight, model.fc2.weight_codes, FxpFormat(8, 4))]
    with pytest.raises(ValueError, match=r"the codes are of FxP\(8,4\)"):
        opt.set_packed_storage(bad)
    assert model.fc1.weight not in opt._codes
    opt.set_packed_storage(fxp.nn.packed_storage(model))
    _train_step(model, opt)
    assert not torch.equal(model.fc2.weight_codes, codes)
