"""fxp.nn layers, the paper's network, and short behavioural training runs."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import fxp
from environment import FASHION
from fxp.nn import PaperCNN, QConv2d, QLinear, quantize_model

F16_10, F16_8, F8_5, F8_3 = fxp.FxpFormat(16, 10), fxp.FxpFormat(16, 8), fxp.FxpFormat(8, 5), fxp.FxpFormat(8, 3)


def on_grid(t, fmt):
    c = t.detach().double() * 2.0**fmt.frac_bits
    return bool(torch.all(c == torch.round(c)))


@pytest.mark.parametrize("method", fxp.nn.METHODS)
def test_paper_cnn_matches_table_1(method):
    model = PaperCNN(method, F16_10, F16_8)
    assert sum(p.numel() for p in model.parameters()) == 184_490
    assert model.conv1.bias is None and model.conv2.bias is None and model.fc1.bias is not None
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


def test_ste_layer_quantizes_weights_on_read_and_outputs():
    torch.manual_seed(0)
    layer = QLinear(6, 4, weight_mode="ste", param_format=F8_5, act_format=F8_3, act_rounding="hte")
    x = torch.randn(5, 6)
    y = layer(x)
    assert on_grid(y, F8_3) and not on_grid(layer.weight, F8_5)  # the master copy stays float
    expect = fxp.quantize(torch.nn.functional.linear(x, fxp.quantize(layer.weight, F8_5), fxp.quantize(layer.bias, F8_5)), F8_3)
    assert torch.equal(y, expect)
    y.sum().backward()
    assert layer.weight.grad is not None and torch.count_nonzero(layer.weight.grad) > 0


def test_formats_are_runtime_state():
    layer = QConv2d(1, 2, 3, weight_mode="ste", param_format=F16_10, act_format=F16_8)
    x = torch.randn(1, 1, 5, 5)
    layer.act_format = F8_3  # AdaPT-style change between steps, no rebuild
    assert on_grid(layer(x), F8_3)


def test_runtime_state_is_checked_when_set():
    """The attributes a caller may change between steps: a bad value is refused where it is set, and the
    layer keeps its old one (a wrong weight_mode once read the weights unquantized, silently)."""
    layer = QConv2d(1, 2, 3, weight_mode="ste", param_format=F16_10, act_format=F16_8)
    cases = [("act_rounding", "nearest_even", ValueError, "act_rounding must be 'hte' or 'sr', but got 'nearest_even'"),
             ("weight_mode", "bogus", ValueError, "weight_mode must be fp32, ste or qpu, but got 'bogus'"),
             ("param_format", (8, 4), TypeError, "param_format must be an FxpFormat, but got (8, 4)"),
             ("act_format", "8.3", TypeError, "act_format must be an FxpFormat, but got '8.3'")]
    for name, value, error, message in cases:
        before = getattr(layer, name)
        with pytest.raises(error) as e:
            setattr(layer, name, value)
        assert str(e.value) == f"QConv2d: {message}"
        assert getattr(layer, name) == before
    layer.act_format = None  # may be set on the way to another mode; the forward needs it
    with pytest.raises(ValueError) as e:
        layer(torch.randn(1, 1, 5, 5))
    assert str(e.value) == "QConv2d: weight_mode 'ste' needs param_format and act_format, but act_format is None"
    layer.weight_mode = "fp32"
    assert layer(torch.randn(1, 1, 5, 5)).shape == (1, 2, 3, 3)  # fp32 needs no formats
    packed = QLinear(3, 4, weight_mode="qpu", param_format=F16_10, act_format=F16_8)
    fxp.nn.quantize_layer_parameters_(packed)
    packed.pack_weights_()
    with pytest.raises(ValueError, match=r"^QLinear: the weights are packed, so weight_mode stays 'qpu' \(got 'ste'\)$"):
        packed.weight_mode = "ste"


def test_model_functions_name_an_argument_that_is_no_module():
    for call, op in [(lambda: quantize_model([QLinear(2, 2)], "sqpu"), "quantize_model"),
                     (lambda: fxp.nn.quantize_layer_parameters_([1]), "quantize_layer_parameters_"),
                     (lambda: fxp.nn.pack_model_(None), "pack_model_"),
                     (lambda: fxp.nn.packed_storage("model"), "packed_storage"),
                     (lambda: fxp.nn.recalibrate_batch_norm(None, []), "recalibrate_batch_norm")]:
        with pytest.raises(TypeError, match=rf"^{op}: model must be a torch\.nn\.Module, but got \w+$"):
            call()
    with pytest.raises(TypeError, match=r"^recalibrate_batch_norm: batches must be an iterable of inputs .* NoneType$"):
        fxp.nn.recalibrate_batch_norm(torch.nn.BatchNorm1d(3), None)
    # A rounding is checked with no quantized layer to round, too.
    with pytest.raises(RuntimeError, match=r"^fxp::quantize_parameters_: unknown rounding 'bogus'"):
        fxp.nn.quantize_layer_parameters_(torch.nn.Sequential(torch.nn.ReLU()), "bogus")


def test_quantize_model_replaces_layers_and_puts_qpu_weights_on_grid():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Sequential(torch.nn.Linear(4 * 26 * 26, 10)))
    w_before = model[3][0].weight.detach().clone()
    quantize_model(model, "sqpu", F8_5, F8_3)
    assert isinstance(model[0], QConv2d) and isinstance(model[3][0], QLinear)
    assert all(on_grid(p, F8_5) for p in model.parameters())
    assert (model[3][0].weight - w_before).abs().max() <= F8_5.resolution
    with pytest.raises(ValueError, match="method must be one of"):
        quantize_model(model, "int8", F8_5, F8_3)


def test_quantize_model_keeps_the_layers_parameters_sharing_and_mode():
    """The twins hold the layers' own parameter objects: frozen stays frozen,
    a layer used twice stays one layer, tied weights stay tied, a channels_last
    weight keeps its layout and an optimizer built before still holds them."""
    torch.manual_seed(0)
    conv, shared = torch.nn.Conv2d(2, 4, 3), torch.nn.Linear(4, 4)
    tied = torch.nn.Linear(4, 4, bias=False)
    tied.weight = shared.weight
    model = torch.nn.Sequential(conv, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), shared, shared, tied)
    model.to(memory_format=torch.channels_last)
    conv.bias.requires_grad_(False)
    model.eval()
    before = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    quantize_model(model, "ste", F8_5, F8_3)
    assert isinstance(model[0], QConv2d) and isinstance(model[3], QLinear) and model[3] is model[4]
    assert model[5].weight is model[3].weight
    assert all(a is b for a, b in zip(model.parameters(), before)) and len(list(model.parameters())) == 4
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert not model[0].weight.is_contiguous() and not model[0].training and not model[3].training
    model(torch.randn(2, 2, 5, 5)).sum().backward()
    optimizer.step()  # still the model's parameters
    assert model[0].bias.grad is None and model[0].weight.grad is not None


def test_quantize_model_refuses_what_its_twins_would_change():
    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Scaled(3, 3))
    with pytest.raises(TypeError, match=r"quantize_model: 1 is a Scaled, a subclass of nn.Linear with its own forward"):
        quantize_model(model, "ste", F8_5, F8_3)
    assert type(model[0]) is torch.nn.Linear  # nothing replaced before the refusal
    # A subclass that computes as its base is replaced (nn.MultiheadAttention's out_proj is one).
    attention = torch.nn.Sequential(torch.nn.MultiheadAttention(4, 2))
    quantize_model(attention, "ste", F8_5, F8_3)
    assert isinstance(attention[0].out_proj, QLinear)
    tied = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"pack_model_: a \(3, 3\) parameter is shared by two layers"):
        quantize_model(tied, "sqpu", F8_5, F8_3, packed=True)
    assert not any(layer.packed_weights for layer in tied)
    hooked = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    hooked[0][0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match=r"quantize_model: 0.0 has hooks \(_forward_hooks\)"):
        quantize_model(hooked, "ste", F8_5, F8_3)
    with pytest.raises(TypeError, match="the model is itself a Linear, which cannot be replaced in place"):
        quantize_model(torch.nn.Linear(3, 3), "ste", F8_5, F8_3)
    layer = QLinear(3, 3)
    assert quantize_model(layer, "ste", F8_5, F8_3) is layer and layer.weight_mode == "ste"
    # Packed storage is QPU's: for another method it would pack nothing, silently.
    plain = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"^quantize_model: packed storage is for the QPU methods \(sqpu, hteqpu\), "
                                         r"but method is 'ste' \(STE keeps a float master copy\)$"):
        quantize_model(plain, "ste", F8_5, F8_3, packed=True)
    assert type(plain[0]) is torch.nn.Linear
    with pytest.raises(ValueError, match=r"^make_optimizer: packed storage is for the QPU methods"):
        fxp.optim.make_optimizer(plain.parameters(), "fp32", 0.1, packed=[1, 2, 3])


def test_layers_take_formats_as_fxp_formats():
    with pytest.raises(TypeError, match=r"QLinear: param_format must be an FxpFormat, but got \(8, 4\)"):
        QLinear(3, 4, weight_mode="ste", param_format=(8, 4), act_format=F8_3)


def test_layers_repr_shows_their_quantization():
    layer = QConv2d(1, 2, 3, weight_mode="qpu", param_format=F16_10, act_format=F16_8)
    assert repr(layer).endswith("stride=(1, 1), weight_mode=qpu, param_format=FxP(16,10), act_format=FxP(16,8), "
                                "act_rounding=sr)")
    assert repr(QLinear(3, 4)) == "QLinear(in_features=3, out_features=4, bias=True, weight_mode=fp32)"
    fxp.nn.quantize_layer_parameters_(layer)
    layer.pack_weights_()
    assert repr(layer).endswith("act_rounding=sr, packed)")


def test_qpu_initialization_leaves_fp32_layers_alone():
    """A layer in fp32 mode keeps its values, with a format or without one, and the quantized layer's stream
    is offset 0, as if the fp32 layers were not there."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(QLinear(4, 3, bias=False), QLinear(3, 3, bias=False, param_format=F8_5,
                                                                   act_format=F8_3),
                                QLinear(3, 2, bias=False, weight_mode="qpu", param_format=F8_5, act_format=F8_3))
    float_weights = [p.detach().clone() for p in model.parameters()]
    fxp.nn.quantize_layer_parameters_(model, seed=7)
    assert torch.equal(model[0].weight, float_weights[0]) and torch.equal(model[1].weight, float_weights[1])
    # The initialization's key (docs/design.md), given as the uint64 it is (Note [64-bit Philox keys in Python]).
    key = (7 + 0x9E3779B97F4A7C15) % 2**64
    expected = fxp.ops.quantize_seeded(float_weights[2], F8_5, rounding="stochastic", seed=key, offset=0)
    assert torch.equal(model[2].weight, expected) and not torch.equal(expected, float_weights[2])


def test_qpu_initialization_gives_every_tensor_its_own_stream():
    """Layers with identical float weights must not round identically: the
    model-level init gives tensor k offset k, like fxp.optim.quantize_parameters_."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(model[0].weight)
    float_weights = [p.detach().clone() for p in model.parameters()]
    quantize_model(model, "sqpu", F8_5, F8_3, seed=4)
    assert not torch.equal(model[0].weight, model[1].weight)
    expected = [w.clone() for w in float_weights]
    fxp.optim.quantize_parameters_(expected, F8_5, "stochastic", seed=4)
    assert all(torch.equal(p, e) for p, e in zip(model.parameters(), expected))


def _fashion_slice(n):
    """The first n training images of Fashion-MNIST, or None if the dataset is absent."""
    images, labels = FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        return None
    with gzip.open(images) as fh:
        x = np.frombuffer(fh.read(), dtype=np.uint8, offset=16)[: n * 784].reshape(n, 1, 28, 28)
    with gzip.open(labels) as fh:
        y = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)[:n]
    x = (torch.from_numpy(x.astype(np.float32)) / 255.0 - 0.1307) / 0.3081
    return x, torch.from_numpy(y.astype(np.int64))


def _synthetic(n):
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + 0.8 * torch.randn(n, 1, 28, 28, generator=g), y


@pytest.fixture(scope="module")
def data():
    return _fashion_slice(2000) or _synthetic(2000)


def _train(data, method, pfmt, afmt, epochs=2, lr=0.01):
    x, y = data
    torch.manual_seed(0)  # the same initialisation for every method
    model = PaperCNN(method, pfmt, afmt, act_rounding="sr")
    if method in ("sqpu", "hteqpu"):
        model.quantize_parameters_("stochastic" if method == "sqpu" else "nearest_even")
    opt = fxp.optim.make_optimizer(model.parameters(), method, lr=lr, momentum=0.9, format=pfmt)
    loss_fn = torch.nn.CrossEntropyLoss()

    def eval_loss():
        with torch.no_grad():
            return loss_fn(model(x[:500]), y[:500]).item()

    before = eval_loss()
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(64):
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
    return before, eval_loss()


@pytest.mark.parametrize("method", ["fp32", "ste", "sqpu"])
def test_loss_falls_at_16_bits(data, method):
    before, after = _train(data, method, F16_10, F16_8)
    assert after < 0.6 * before, (before, after)


def test_hteqpu_stalls_at_8_bits_where_sqpu_learns(data):
    hte_before, hte_after = _train(data, "hteqpu", F8_5, F8_3)
    sr_before, sr_after = _train(data, "sqpu", F8_5, F8_3)
    assert abs(hte_after - hte_before) < 0.1 * hte_before, (hte_before, hte_after)
    assert sr_after < 0.8 * sr_before, (sr_before, sr_after)
