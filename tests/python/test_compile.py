"""torch.compile (inductor) over fxp's ops and layers: the compiled graph gives
the eager values and gradients bit for bit. fxp::linear and fxp::conv2d take
pack_counts in their .counted overloads, because inductor (torch 2.11) fails on
a mutable optional tensor argument given as None."""

from __future__ import annotations

import pytest
import torch

import fxp
from fxp import FxpFormat

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # inductor's note that CUDA is absent

FMT = FxpFormat(8, 4)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _grads(fn, leaves):
    for leaf in leaves:
        leaf.grad = None
    out = fn()
    out.sum().backward()
    return out.detach(), [leaf.grad.clone() for leaf in leaves]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("counted", [False, True])
def test_compiled_layer_ops_equal_eager(counted, device, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)  # both runs' convolution backward alike
    torch.manual_seed(0)
    x = fxp.quantize(torch.randn(3, 2, 6, 6, device=device), FMT)  # on the grid, as input_format promises
    w = torch.randn(4, 2, 3, 3, device=device, requires_grad=True)
    fc = torch.randn(5, 4 * 4 * 4, device=device, requires_grad=True)
    counts = torch.zeros(2, dtype=torch.long, device=device) if counted else None

    def layers(x, w, fc, counts):
        h = fxp.ops.conv2d(x, w, input_format=FMT, output_format=FMT, pack_counts=counts)
        return fxp.ops.linear(h.flatten(1), fc, input_format=FMT, pack_counts=counts)

    compiled = torch.compile(layers, fullgraph=True)
    eager = _grads(lambda: layers(x, w, fc, counts), [w, fc])
    got = _grads(lambda: compiled(x, w, fc, counts), [w, fc])
    assert torch.equal(got[0], eager[0]) and all(torch.equal(a, b) for a, b in zip(got[1], eager[1]))
    if counted:
        # Off its grid, x is counted, not refused: the compiled graph writes the counts as eager does.
        off = x + 2.0**-6
        counts.zero_()
        layers(off, w, fc, counts)
        expected = counts.tolist()
        counts.zero_()
        compiled(off, w, fc, counts)
        assert counts.tolist() == expected and expected[1] == off.numel()


def test_compiled_packed_qpu_model_steps_as_eager():
    """A packed QPU network (its layers call the layer ops with codes and saved
    input formats) compiles, and training steps through it equal eager ones."""
    models = []
    for _ in range(2):
        torch.manual_seed(1)
        m = fxp.nn.PaperCNN("sqpu", FxpFormat(16, 10), FxpFormat(16, 8))
        m.quantize_parameters_()
        m.pack_()
        models.append(m)
    eager, compiled = models
    forward = torch.compile(compiled)
    opts = [fxp.optim.QPUSGD(m.parameters(), lr=0.05, momentum=0.9, format=FxpFormat(16, 10),
                             packed=fxp.nn.packed_storage(m)) for m in models]
    for step in range(2):
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
        for run, (model, opt) in zip((eager, forward), zip(models, opts)):
            opt.zero_grad()
            torch.manual_seed(100 + step)  # the outputs' stochastic rounding
            torch.nn.functional.cross_entropy(run(x), y).backward()
            opt.step()
        assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), compiled.state_dict().values()))
