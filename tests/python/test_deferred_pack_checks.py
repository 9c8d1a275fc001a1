"""Note [Deferred pack checks]: pack.counted and the layer ops' pack_counts count what packed storage
cannot hold (NaN, and with rounding "exact" values off the grid) into a device tensor instead of raising,
so a training step reads nothing back; pack_bits(check_range=False) encodes codes known to be in range
without its check. The codes are always those of the checking forms."""

from __future__ import annotations

import pytest
import torch

import fxp
from fxp import FxpFormat

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
ops = torch.ops.fxp
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
NAN = float("nan")


def zero_counts(device="cpu"):
    return torch.zeros(2, dtype=torch.long, device=device)


# --- pack.counted -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic", "exact"])
def test_counted_pack_gives_pack_codes_and_adds_its_counts(device, rounding):
    x = fxp.quantize(torch.randn(1000, generator=torch.Generator().manual_seed(3)) * 4, 12, 6).to(device)
    if rounding != "exact":
        x = x + 1 / 256  # off the grid: rounded, and not counted (only "exact" promises the grid)
    gen = lambda: torch.Generator(device=device).manual_seed(5)  # noqa: E731
    counts = zero_counts(device)
    codes = fxp.pack(x, 12, 6, rounding, generator=gen(), counts=counts)
    assert torch.equal(codes, fxp.pack(x, 12, 6, rounding, generator=gen()))
    assert counts.tolist() == [0, 0]
    bad = x.clone()
    bad[[1, 5]] = NAN
    bad[7] = 1e6  # saturates: off the grid for "exact"
    fxp.pack(bad, 12, 6, rounding, generator=gen(), counts=counts)
    fxp.pack(bad[:6], 12, 6, rounding, generator=gen(), counts=counts)  # adds, never resets
    assert counts.tolist() == [4, 1 if rounding == "exact" else 0]


def test_counted_pack_writes_code_zero_for_nan():
    codes = fxp.pack(torch.tensor([1.0, NAN, -2.5]), 8, 2, counts=zero_counts())
    assert codes.tolist() == [4, 0, -10]


@pytest.mark.parametrize("counts, message", [
    (torch.zeros(2, dtype=torch.int32), r"fxp::pack.counted: counts must be a contiguous int64 tensor of shape \[2\]"),
    (torch.zeros(3, dtype=torch.long), r"of shape \[3\]"),
    (torch.zeros(2, 1, dtype=torch.long), r"of shape \[2, 1\]"),
    (torch.zeros(4, dtype=torch.long)[::2], "not contiguous"),
])
def test_counted_pack_refuses_bad_counts(counts, message):
    with pytest.raises(RuntimeError, match=message):
        fxp.pack(torch.ones(3), 8, 4, counts=counts)
    with pytest.raises(TypeError, match="fxp.pack: counts must be a torch.Tensor"):
        fxp.pack(torch.ones(3), 8, 4, counts=[0, 0])


@requires_cuda
def test_cuda_counted_pack_refuses_counts_on_another_device():
    with pytest.raises(RuntimeError, match=r"counts must be on x's device \(cuda:0\), but it is on cpu"):
        fxp.pack(torch.ones(3, device="cuda"), 8, 4, counts=zero_counts())


def test_counted_pack_bumps_the_version_of_counts():
    counts = zero_counts()
    before = counts._version
    fxp.pack(torch.ones(3), 8, 4, counts=counts)
    assert counts._version > before


# --- pack_bits(check_range=False) -------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_unchecked_pack_bits_equals_checked_for_codes_in_range(device):
    codes = torch.randint(-2048, 2048, (1001,), generator=torch.Generator().manual_seed(1)).to(device)
    assert torch.equal(fxp.pack_bits(codes, 12, check_range=False), fxp.pack_bits(codes, 12))


def test_unchecked_pack_bits_stores_the_low_bits_of_a_code_outside():
    with pytest.raises(RuntimeError, match="1 code lies outside"):
        fxp.pack_bits(torch.tensor([9, 1]), 3)
    # 9 = 0b1001: its low 3 bits are 0b001, so it is stored as 1.
    assert fxp.pack_bits(torch.tensor([9, 1]), 3, check_range=False).tolist() == \
        fxp.pack_bits(torch.tensor([1, 1]), 3).tolist()
    with pytest.raises(TypeError, match="check_range must be a bool"):
        fxp.pack_bits(torch.tensor([1]), 3, check_range=1)


# --- the layer ops' pack_counts ---------------------------------------------------------------------------
def _linear(x, w, counts, **kw):
    return fxp.ops.linear(x, w, input_format=FxpFormat(8, 4), pack_counts=counts, **kw)


def _conv(x, w, counts, **kw):
    return fxp.ops.conv2d(x, w, padding=(1, 1), input_format=FxpFormat(8, 4), pack_counts=counts, **kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_layer_counts_instead_of_raising_and_its_gradients_stay(device, layer):
    gen = torch.Generator().manual_seed(7)
    shape, wshape, call = ((4, 6), (3, 6), _linear) if layer == "linear" else ((2, 2, 5, 5), (3, 2, 3, 3), _conv)
    x = fxp.quantize(torch.randn(shape, generator=gen), 8, 4).to(device)
    w = torch.randn(wshape, generator=gen).to(device).requires_grad_()
    counts = zero_counts(device)
    call(x, w, counts).sum().backward()
    reference = w.grad.clone()
    w.grad = None
    checked = (fxp.ops.linear(x, w, input_format=FxpFormat(8, 4)) if layer == "linear"
               else fxp.ops.conv2d(x, w, padding=(1, 1), input_format=FxpFormat(8, 4)))
    checked.sum().backward()
    assert torch.equal(w.grad, reference) and counts.tolist() == [0, 0]

    bad = x.clone().flatten()
    bad[0] = NAN
    bad[1] += 1 / 64  # off the FxP(8, 4) grid
    bad[2] = 100.0    # beyond its range
    bad = bad.view(shape)
    with pytest.raises(ValueError, match="input_format promises"):
        call(bad, w, None)
    call(bad, w, counts).sum().backward()  # no error: counted
    assert counts.tolist() == [1, 2]
    with torch.no_grad():  # nothing is saved, so nothing is packed or counted
        call(bad, w, counts)
    assert counts.tolist() == [1, 2]


def test_layer_refuses_bad_pack_counts():
    x, w = torch.zeros(2, 3), torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"fxp::linear: counts must be a contiguous int64 tensor of shape \[2\]"):
        _linear(x, w, torch.zeros(2))
    with pytest.raises(TypeError, match="fxp.conv2d: pack_counts must be a torch.Tensor"):
        _conv(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), 0)


def test_packed_model_counts_into_its_layers_tensor():
    """fxp.nn layers pass their pack_counts to the layer op; a NaN image reaches conv2's saved input."""
    torch.manual_seed(0)
    model = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
    model.quantize_parameters_()
    model.pack_()
    counts = zero_counts()
    for layer in (model.conv2, model.fc1, model.fc2):
        layer.pack_counts = counts
    x = torch.randn(2, 1, 28, 28)
    model(x).sum().backward()
    assert counts.tolist() == [0, 0]
    x[0, 0, 10:14, 10:14] = NAN
    model(x).sum().backward()
    assert counts[0] > 0 and counts[1] == 0
    model.conv2.pack_counts = None
    with pytest.raises(ValueError, match="fxp::conv2d: input_format promises"):
        model(x)


@requires_cuda
@pytest.mark.parametrize("fmt", [FxpFormat(8, 4), FxpFormat(12, 6)])  # int8 codes; a 12-bit stream
def test_cuda_a_counted_layer_step_is_captured_and_counts_on_replay(fmt):
    """Nothing in a counted layer's forward and backward reads back, so a CUDA graph captures it, and each
    replay adds what it found to the counts."""
    torch.manual_seed(0)
    w = torch.randn(3, 6, device="cuda", requires_grad=True)
    static_x = fxp.quantize(torch.randn(4, 6, device="cuda"), fmt)
    counts = zero_counts("cuda")

    def step():
        fxp.ops.linear(static_x, w, input_format=fmt, pack_counts=counts).sum().backward()

    side = torch.cuda.Stream()  # warm up on a side stream, as torch's capture recipe does
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    counts.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert counts.tolist() == [0, 0]
    static_x[0, 0] = NAN
    static_x[1, 1] += 2.0 ** -(fmt.frac_bits + 2)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    assert counts.tolist() == [2, 2]
    static_x[0, 0], static_x[1, 1] = 0.0, 0.0
    graph.replay()
    torch.cuda.synchronize()
    assert counts.tolist() == [2, 2]  # on the grid again: nothing more


@requires_cuda
def test_cuda_an_eager_packed_training_step_does_not_synchronize():
    """A packed PaperCNN with counting layers and QPUSGD(capturable=True): forward, backward and step
    raise under torch.cuda.set_sync_debug_mode("error") if anything reads back."""
    torch.manual_seed(0)
    fmt = FxpFormat(12, 8)  # weights, momentum and saved inputs as bit streams
    model = fxp.nn.PaperCNN("sqpu", fmt, FxpFormat(12, 6)).cuda()
    model.quantize_parameters_()
    model.pack_()
    counts = zero_counts("cuda")
    for layer in (model.conv2, model.fc1, model.fc2):
        layer.pack_counts = counts
    opt = fxp.optim.QPUSGD(model.parameters(), lr=0.05, momentum=0.9, format=fmt, capturable=True)
    for storage in fxp.nn.packed_storage(model):
        opt.set_packed_storage(*storage)
    x, y = torch.randn(4, 1, 28, 28, device="cuda"), torch.randint(0, 10, (4,), device="cuda")

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step()  # the first step makes the optimizer's device scalars (a host-to-device copy)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert counts.tolist() == [0, 0]
    opt.check_nan()


# --- opcheck ----------------------------------------------------------------------------------------------
def _opcheck_cases(device):
    x = fxp.quantize(torch.randn(5, 7, device=device, dtype=torch.float64), 8, 4)
    w = torch.randn(3, 7, device=device, dtype=torch.float64, requires_grad=True)
    xc = fxp.quantize(torch.randn(2, 3, 6, 6, device=device, dtype=torch.float64), 8, 4).requires_grad_()
    wconv = torch.randn(4, 3, 3, 3, device=device, dtype=torch.float64, requires_grad=True)
    counts = zero_counts(device)
    return [
        (ops.pack.counted, (x, 8, 4), {"counts": counts}),
        (ops.pack.counted, (x, 8, 4, "exact"), {"counts": counts}),
        (ops.pack_bits.default, (fxp.pack(x, 12, 4), 12, True, False), {}),
        (ops.linear.counted, (x.clone().requires_grad_(), w, None, [8, 4], None, None, None, None, "nearest_even",
                              None), {"pack_counts": counts}),
        (ops.conv2d.counted, (xc, wconv, None, [1, 1], [1, 1], [1, 1], 1, [8, 4], None, None, None, None,
                              "nearest_even", None), {"pack_counts": counts}),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args, kwargs in _opcheck_cases(device):
        torch.library.opcheck(op, args, kwargs)
