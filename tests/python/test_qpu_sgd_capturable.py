"""The capturable QPU step (torch.ops.fxp.qpu_sgd_step_.capturable, Note [Capturable QPU step]):
the plain step's bits from device scalars, NaNs counted instead of raised, and CUDA-graph replay."""

from __future__ import annotations

import copy

import pytest
import torch

import fxp
from fxp.optim import QPUSGD
from test_qpu_sgd import _codes_and_grads, same_bits

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
plain_op = torch.ops.fxp.qpu_sgd_step_.default
capturable_op = torch.ops.fxp.qpu_sgd_step_.capturable


def scalars(lr: float, step: int, device="cpu", lr_dtype=torch.float64):
    return (torch.tensor(lr, dtype=lr_dtype, device=device), torch.tensor(step, dtype=torch.long, device=device),
            torch.zeros((), dtype=torch.long, device=device))


def problem(fmt, mfmt, storage, gen, n=20_001):
    """Two tensors of parameters and momentum (float32 values or integer codes) and float32 grads."""
    w, v, g = [], [], []
    for _ in range(2):
        wc, gk = _codes_and_grads(fmt, n, torch.float32, 0.25, True, gen)
        vc, _ = _codes_and_grads(mfmt, n, torch.float32, 0.25, True, gen)
        if storage == "float32":
            w.append((wc.double() * 2.0**-fmt.frac_bits).float())
            v.append((vc.double() * 2.0**-mfmt.frac_bits).float())
        else:
            w.append(wc.to(fmt.storage_dtype))
            v.append(vc.to(mfmt.storage_dtype))
        g.append(gk)
    return w, g, v


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("form,momentum,nesterov", [("standard", 0.9, True), ("standard", 0.0, False),
                                                    ("paper_eq6", 0.9, False)])
@pytest.mark.parametrize("storage", ["codes", "float32"])
@pytest.mark.parametrize("total_bits", [8, 16, 24])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_capturable_steps_equal_plain_steps_bit_for_bit(rounding, form, momentum, nesterov, storage, total_bits,
                                                        device):
    """On the CPU the op reads lr and step on the host; on CUDA the kernel reads them on the device."""
    gen = torch.Generator().manual_seed(total_bits)
    fmt, mfmt = fxp.FxpFormat(total_bits, total_bits // 2), fxp.FxpFormat(total_bits, total_bits - 2)
    w, g, v = problem(fmt, mfmt, storage, gen)
    w, g, v = [t.to(device) for t in w], [t.to(device) for t in g], [t.to(device) for t in v]
    if momentum == 0.0:
        v = []
    w2, v2 = [t.clone() for t in w], [t.clone() for t in v]
    hyper = (momentum, 1e-2, nesterov, fmt.total_bits, fmt.frac_bits, mfmt.total_bits, mfmt.frac_bits, rounding, 5)
    lr_t, step_t, nan_t = scalars(0.25, 3, device=device)
    for step, lr in ((3, 0.25), (4, 0.125), (5, 0.25)):
        lr_t.fill_(lr)
        counts = plain_op(w, g, v, lr, *hyper, step, form)
        counts2 = capturable_op(w2, g, v2, lr_t, step_t, nan_t, *hyper, form)
        assert torch.equal(counts, counts2)
        assert all(same_bits(a, b) for a, b in zip(w + v, w2 + v2)), (step, lr)
    assert int(step_t) == 6  # advanced once per call
    assert int(nan_t) == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_float32_lr_rounds_lr_first(device):
    """An lr tensor of float32 equals the plain step with lr rounded to float32 (the same for float32 grads)."""
    gen = torch.Generator().manual_seed(1)
    fmt = fxp.FxpFormat(16, 10)
    w, g, v = problem(fmt, fmt, "float32", gen)
    w64, g64, v64 = [t.double().to(device) for t in w], [t.double().to(device) for t in g], \
        [t.double().to(device) for t in v]
    lr = 0.1  # not a float32
    hyper = (0.9, 0.0, False, 16, 10, 16, 10, "stochastic", 2)
    plain_w, plain_v = [t.clone() for t in w64], [t.clone() for t in v64]
    plain_op(plain_w, g64, plain_v, float(torch.tensor(lr, dtype=torch.float32)), *hyper, 0)
    lr_t, step_t, nan_t = scalars(lr, 0, device=device, lr_dtype=torch.float32)
    capturable_op(w64, g64, v64, lr_t, step_t, nan_t, *hyper)
    assert all(same_bits(a, b) for a, b in zip(plain_w + plain_v, w64 + v64))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=requires_cuda)])
def test_packed_nan_is_counted_not_raised(device):
    fmt = fxp.FxpFormat(8, 4)
    w = [torch.tensor([16, 32, -8], dtype=torch.int8, device=device),
         torch.tensor([1, 2], dtype=torch.int8, device=device)]
    g = [torch.tensor([1.0, float("nan"), 2.0], device=device), torch.tensor([float("nan"), 0.5], device=device)]
    v = [torch.zeros(3, dtype=torch.int8, device=device), torch.zeros(2, dtype=torch.int8, device=device)]
    hyper = (0.9, 0.0, False, 8, 4, 8, 4, "nearest_even", 0)
    w_plain, v_plain = copy.deepcopy(w), copy.deepcopy(v)
    with pytest.raises(ValueError, match="4 updated values are NaN"):  # two params, two momenta
        plain_op(w_plain, g, v_plain, 0.5, *hyper, 0)
    lr_t, step_t, nan_t = scalars(0.5, 0, device=device)
    nan_t.fill_(10)  # a running count: the step adds to it
    capturable_op(w, g, v, lr_t, step_t, nan_t, *hyper)
    assert int(nan_t) == 14 and int(step_t) == 1
    assert all(torch.equal(a, b) for a, b in zip(w + v, w_plain + v_plain))  # NaN elements kept their codes


def test_float_storage_counts_no_nan():
    w, g = [torch.zeros(4)], [torch.full((4,), float("nan"))]
    lr_t, step_t, nan_t = scalars(0.1, 0)
    capturable_op(w, g, [], lr_t, step_t, nan_t, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0)
    assert int(nan_t) == 0 and torch.isnan(w[0]).all()


def test_empty_lists_still_advance_the_step():
    lr_t, step_t, nan_t = scalars(0.1, 7)
    counts = capturable_op([], [], [], lr_t, step_t, nan_t, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0)
    assert counts.shape == (0, 2) and int(step_t) == 8


def test_errors():
    w, g = [torch.zeros(3)], [torch.ones(3)]
    hyper = (0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0)
    lr_t, step_t, nan_t = scalars(0.1, 0)
    cases = [
        ((torch.tensor(1), step_t, nan_t), "expected lr to be float32 or float64, but got Long"),
        ((torch.tensor([0.1]), step_t, nan_t), r"expected lr to be a 0-dim tensor, but got shape \[1\]"),
        ((lr_t, torch.tensor(0.0), nan_t), "expected step to be int64, but got Float"),
        ((lr_t, step_t, torch.zeros(2, dtype=torch.long)), r"expected nan_count to be a 0-dim tensor"),
        ((lr_t.to("meta"), step_t, nan_t), "expected lr on cpu, the parameters' device, but got meta"),
        ((lr_t, step_t, step_t), "nan_count.* and step|step.* and nan_count"),
        ((torch.tensor(-0.1, dtype=torch.float64), step_t, nan_t), "lr must be a non-negative finite number"),
        ((lr_t, torch.tensor(-1), nan_t), r"step must be in \[0, 2\^32\)"),
    ]
    for (lr, step, nan), message in cases:
        with pytest.raises(RuntimeError, match=message):
            capturable_op(w, g, [], lr, step, nan, *hyper)
    assert int(step_t) == 0 and torch.equal(w[0], torch.zeros(3))  # nothing ran


def test_opcheck():
    torch.manual_seed(4)
    w = [torch.randn(5), torch.randn(3, 2)]
    lr_t, step_t, nan_t = scalars(0.1, 2)
    args = (w, [torch.randn_like(t) for t in w], [torch.zeros_like(t) for t in w], lr_t, step_t, nan_t, 0.9, 1e-3,
            False, 8, 4, 8, 5, "stochastic", 1, "standard")
    torch.library.opcheck(capturable_op, args)


def _problem(seed: int, fmt: fxp.FxpFormat, packed: bool):
    """A maker of fresh parameters (with packed storage: stand-ins and their codes) and four steps' grads."""
    gen = torch.Generator().manual_seed(seed)
    values = [fxp.quantize(torch.randn(s, generator=gen), fmt) for s in [(5, 6), (5,), (3, 5)]]
    grads = [[torch.randn(v.shape, generator=gen) for v in values] for _ in range(4)]

    def make():
        params = [torch.nn.Parameter(v.clone()) for v in values]
        storage = [fxp.nn.PackedStorage(p, fxp.pack(v, fmt), fmt) for p, v in zip(params, values)] if packed else []
        return params, storage

    return make, grads


def _train(opt, params, grads, lr_changes=None):
    for i, gs in enumerate(grads):
        if lr_changes and i in lr_changes:
            lr_changes[i](opt)
        for p, gk in zip(params, gs):
            p.grad = gk.clone()
        opt.step()


@pytest.mark.parametrize("packed", [False, True])
def test_optimizer_capturable_equals_plain(packed):
    fmt = fxp.FxpFormat(16, 10)
    make, grads = _problem(3, fmt, packed)
    (params, storage), (params2, storage2) = make(), make()
    kw = dict(lr=0.05, momentum=0.9, format=fmt, seed=11)
    plain = QPUSGD(params, **kw, packed=storage)
    capt = QPUSGD(params2, **kw, packed=storage2, capturable=True)

    def lower_lr(opt):  # a scheduler's change between steps
        opt.param_groups[0]["lr"] = 0.0125

    _train(plain, params, grads, {2: lower_lr})
    _train(capt, params2, grads, {2: lower_lr})
    for a, b in zip(plain.last_counts, capt.last_counts):
        assert torch.equal(a, b)
    first = [s.codes for s in storage] if packed else params
    second = [s.codes for s in storage2] if packed else params2
    assert all(same_bits(a.detach(), b.detach()) for a, b in zip(first, second))
    assert all(same_bits(plain.state[p]["momentum_buffer"], capt.state[q]["momentum_buffer"])
               for p, q in zip(params, params2))
    assert isinstance(capt.param_groups[0]["step"], torch.Tensor) and int(capt.param_groups[0]["step"]) == 4
    assert plain.param_groups[0]["step"] == 4
    capt.check_nan()  # no NaN: no error


def test_optimizer_check_nan_raises_once_and_resets():
    fmt = fxp.FxpFormat(8, 4)
    params = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2))]
    storage = [fxp.nn.PackedStorage(p, fxp.pack(p.detach(), fmt), fmt) for p in params]
    opt = QPUSGD(params, lr=0.1, format=fmt, packed=storage, capturable=True)
    for p in params:
        p.grad = torch.full_like(p, float("nan"))
    opt.step()  # no error here: the count stays on the device
    with pytest.raises(ValueError, match="QPUSGD: 8 updated values were NaN"):
        opt.check_nan()
    opt.check_nan()  # the count was reset
    assert all(torch.equal(s.codes, torch.zeros_like(s.codes)) for s in storage)  # NaN elements kept their codes


def test_optimizer_takes_an_lr_tensor():
    fmt = fxp.FxpFormat(16, 10)
    make, grads = _problem(5, fmt, False)
    (params, _), (params2, _) = make(), make()
    lr = torch.tensor(0.05, dtype=torch.float64)
    plain = QPUSGD(params, lr=0.05, format=fmt)
    capt = QPUSGD(params2, lr=lr, format=fmt, capturable=True)

    def halve_plain(opt):
        opt.param_groups[0]["lr"] = 0.025

    def halve_tensor(opt):
        lr.fill_(0.025)  # written in place, as between graph replays

    _train(plain, params, grads, {1: halve_plain})
    _train(capt, params2, grads, {1: halve_tensor})
    assert all(same_bits(a.detach(), b.detach()) for a, b in zip(params, params2))


@requires_cuda
@pytest.mark.parametrize("storage", ["float32", "codes", "bit streams"])
def test_cuda_graph_replays_equal_eager_steps(storage):
    """A captured capturable step, replayed with fresh grads and a changed lr, equals the plain eager steps
    bit for bit: each replay draws from the advanced step and reads the current lr. Bit streams (12 bits)
    are re-encoded without a range check, so they are captured too."""
    fmt = fxp.FxpFormat(12, 7) if storage == "bit streams" else fxp.FxpFormat(16, 10)
    gen = torch.Generator().manual_seed(2)
    w, g, v = problem(fmt, fmt, "float32" if storage == "float32" else "codes", gen, n=300_007)
    if storage == "bit streams":
        w, v = [fxp.store_codes(t, fmt.total_bits) for t in w], [fxp.store_codes(t, fmt.total_bits) for t in v]
    grads = [[torch.randn(t.shape, generator=gen) * 0.01 for t in g] for _ in range(4)]
    hyper = (0.9, 1e-4, False, fmt.total_bits, fmt.frac_bits, fmt.total_bits, fmt.frac_bits, "stochastic", 8)
    eager_w, eager_v = [t.cuda() for t in w], [t.cuda() for t in v]
    for step, gs in enumerate(grads):
        plain_op(eager_w, [t.cuda() for t in gs], eager_v, 0.5 if step < 2 else 0.25, *hyper, step)

    graph_w, graph_v = [t.cuda() for t in w], [t.cuda() for t in v]
    static_g = [torch.zeros_like(t).cuda() for t in g]
    lr_t, step_t, nan_t = scalars(0.5, 0, device="cuda")
    # Warm up on a side stream, as torch's capture recipe does, then rewind the state.
    saved = [t.clone() for t in graph_w + graph_v]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        capturable_op(graph_w, static_g, graph_v, lr_t, step_t, nan_t, *hyper)
    torch.cuda.current_stream().wait_stream(side)
    for t, s in zip(graph_w + graph_v, saved):
        t.copy_(s)
    step_t.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capturable_op(graph_w, static_g, graph_v, lr_t, step_t, nan_t, *hyper)
    for t, s in zip(graph_w + graph_v, saved):  # capture does not run the step: rewind anyway
        t.copy_(s)
    step_t.zero_()
    for step, gs in enumerate(grads):
        for dst, src in zip(static_g, gs):
            dst.copy_(src)
        lr_t.fill_(0.5 if step < 2 else 0.25)
        graph.replay()
    torch.cuda.synchronize()
    assert int(step_t) == len(grads) and int(nan_t) == 0
    assert all(same_bits(a.cpu(), b.cpu()) for a, b in zip(eager_w + eager_v, graph_w + graph_v))


def test_optimizer_rejects_a_bad_lr_tensor():
    with pytest.raises(TypeError, match="a tensor lr must be a 0-dim float32 or float64 tensor"):
        QPUSGD([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor([0.1]), capturable=True)
    with pytest.raises(TypeError, match=r"lr must be a number \(or, capturable, a tensor\)"):
        QPUSGD([torch.nn.Parameter(torch.zeros(2))], lr=torch.tensor(0.1))


@requires_cuda
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_cuda_large_tensors_equal_cpu(rounding):
    """Tensors large enough that several blocks share each chunk (Note [QPU chunk size on CUDA]:
    blocks_per_chunk reaches 8 from about 35M elements on an H200), plain and capturable."""
    fmt = fxp.FxpFormat(16, 10)
    gen = torch.Generator().manual_seed(12)
    shapes = [(3_000_001,), (40_000_003,), (1000,)]
    w = [fxp.quantize(torch.randn(s, generator=gen), fmt) for s in shapes]
    g = [torch.randn(s, generator=gen) * 0.01 for s in shapes]
    v = [torch.zeros(s) for s in shapes]
    hyper = (0.9, 1e-4, False, 16, 10, 16, 10, rounding, 3)
    wc, vc, gc = [t.cuda() for t in w], [t.cuda() for t in v], [t.cuda() for t in g]
    w2, v2 = [t.clone() for t in wc], [t.clone() for t in vc]
    for step in range(2):
        counts = plain_op(w, g, v, 0.5, *hyper, step)
        counts_c = plain_op(wc, gc, vc, 0.5, *hyper, step)
        assert torch.equal(counts, counts_c.cpu())
    lr_t, step_t, nan_t = scalars(0.5, 0, device="cuda")
    for _ in range(2):
        capturable_op(w2, gc, v2, lr_t, step_t, nan_t, *hyper)
    assert all(same_bits(a, b.cpu()) for a, b in zip(w + v, wc + vc))
    assert all(same_bits(a, b.cpu()) for a, b in zip(w + v, w2 + v2))


@requires_cuda
def test_cuda_graph_captures_an_optimizer_with_a_frozen_parameter():
    """QPUSGD(capturable=True) captured after warm-up steps, with a parameter that has no gradient:
    replays equal eager plain steps, and the frozen parameter's row of the counts stays zero."""
    fmt = fxp.FxpFormat(12, 8)
    make, grads = _problem(7, fmt, False)
    (params, _), (params2, _) = make(), make()
    params, params2 = [p.cuda() for p in params], [p.cuda() for p in params2]
    params = [torch.nn.Parameter(p.detach()) for p in params]
    params2 = [torch.nn.Parameter(p.detach()) for p in params2]
    plain = QPUSGD(params, lr=0.05, momentum=0.9, format=fmt)
    capt = QPUSGD(params2, lr=0.05, momentum=0.9, format=fmt, capturable=True)
    for p, q, gk in zip(params[:2], params2[:2], grads[0]):  # the last parameter stays frozen
        p.grad, q.grad = gk.cuda(), gk.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        capt.step()  # warm-up: device scalars, buffers, row index
    torch.cuda.current_stream().wait_stream(side)
    plain.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        capt.step()
    static_counts = capt.last_counts[0]
    for gs in grads[1:]:
        for p, q, gk in zip(params[:2], params2[:2], gs):
            p.grad.copy_(gk.cuda())
            q.grad.copy_(gk.cuda())
        plain.step()
        graph.replay()
        assert torch.equal(plain.last_counts[0], static_counts)
    torch.cuda.synchronize()
    assert all(same_bits(a.detach().cpu(), b.detach().cpu()) for a, b in zip(params, params2))
    assert int(static_counts[2].abs().sum()) == 0


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_cuda_plain_step_is_refused_under_capture(dtype):
    """The plain step takes lr and step by value (and on packed storage reads its NaN count back): a CUDA
    graph would replay one step's random numbers, so under a capture it raises, naming the way out, as
    torch's optimizers do without capturable=True. So do AdaPT's fused form and the per-member step,
    which have no capturable form."""
    w = [torch.zeros(5, dtype=dtype, device="cuda")]
    g = [torch.ones(5, device="cuda")]
    hyper = (0.0, 0.0, False, 8, 4, 8, 4, "stochastic", 0)
    plain_op(w, g, [], 0.5, *hyper, 0)  # eagerly, it runs
    with pytest.raises(RuntimeError, match="capture the capturable form instead"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            plain_op(w, g, [], 0.5, *hyper, 0)
    if dtype == torch.float32:
        acc, norms = [torch.zeros(5, device="cuda")], torch.ones(1, dtype=torch.float64, device="cuda")
        torch.ops.fxp.qpu_sgd_step_.adapt(w, g, [], acc, norms, [0], 0.0, 0.5, *hyper, 0)
        with pytest.raises(RuntimeError, match="it has no capturable form"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                torch.ops.fxp.qpu_sgd_step_.adapt(w, g, [], acc, norms, [0], 0.0, 0.5, *hyper, 0)
    stacked, stacked_grads = [w[0].unsqueeze(0).clone()], [g[0].unsqueeze(0)]
    members = ([0.5], [0.0], [0.0], False, [8], [4], [8], [4], ["stochastic"], [0], [0], [True])
    torch.ops.fxp.qpu_sgd_members_step_(stacked, stacked_grads, [], *members)
    with pytest.raises(RuntimeError, match="it has no capturable form yet"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            torch.ops.fxp.qpu_sgd_members_step_(stacked, stacked_grads, [], *members)


@requires_cuda
def test_cuda_optimizers_refuse_to_make_their_state_under_capture():
    """Note [State made under capture]: a capturable QPUSGD's first step makes its momentum and device
    scalars; captured, every replay would reset them. Refused; after one eager step the capture works."""
    p = torch.nn.Parameter(fxp.quantize(torch.randn(64, device="cuda"), 12, 8))
    opt = QPUSGD([p], lr=0.05, momentum=0.9, format=fxp.FxpFormat(12, 8), capturable=True)
    p.grad = torch.randn(64, device="cuda")
    with pytest.raises(RuntimeError, match="a momentum buffer is made on the first step that needs it"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            opt.step()
    assert not opt.state[p] and int(opt.param_groups[0]["step"]) == 0  # the refused step made and counted nothing
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    before = p.detach().clone()
    graph.replay()
    torch.cuda.synchronize()
    assert not torch.equal(before, p.detach())


@requires_cuda
def test_cuda_counts_of_a_group_without_gradients_are_on_the_device():
    a, b = (torch.nn.Parameter(torch.zeros(4, device="cuda")) for _ in range(2))
    opt = QPUSGD([{"params": [a]}, {"params": [b]}], lr=0.1, format=fxp.FxpFormat(8, 4))
    a.grad = torch.ones(4, device="cuda")
    opt.step()
    assert [c.device.type for c in opt.last_counts] == ["cuda", "cuda"]
    assert torch.cat(opt.last_counts).shape == (2, 2) and int(opt.last_counts[1].abs().sum()) == 0
