"""The fused QPU SGD step (torch.ops.fxp.qpu_sgd_step_) and fxp.optim.QPUSGD."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import fxp
from fxp.optim import QPUSGD
from reference import philox_words, qpu_reference_element_step

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
SIGMAS = 6.0
step_op = torch.ops.fxp.qpu_sgd_step_


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: torch.equal would take -0.0 for +0.0."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        view = torch.int64 if a.element_size() == 8 else torch.int32
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def on_grid(t: torch.Tensor, fmt: fxp.FxpFormat) -> bool:
    codes = t.double() * 2.0**fmt.frac_bits
    return bool(torch.all(codes == torch.round(codes)) and torch.all(codes <= fmt.code_max) and torch.all(codes >= fmt.code_min))


def reference_step(w, g, v, *, lr, momentum, wd, nesterov, fmt, mfmt, rounding, seed, step, form="standard"):
    """The contract (Note [QPU update on codes]) from reference.py's numpy and
    integer arithmetic, with the draws of Note [QPU random streams]."""
    out_w, out_v = [], []
    for k, (wk, gk) in enumerate(zip(w, g)):
        n = wk.numel()
        woff, voff = (step << 32) + 2 * k, (step << 32) + 2 * k + 1
        new_w, new_v = qpu_reference_element_step(
            wk.reshape(-1).numpy(), gk.reshape(-1).numpy(), v[k].reshape(-1).numpy() if v else None,
            lr=lr, momentum=momentum, wd=wd, nesterov=nesterov, fmt=fmt, mfmt=mfmt, rounding=rounding,
            param_bits=philox_words(seed, woff, n), momentum_bits=philox_words(seed, voff, n), form=form,
            param_codes=not wk.is_floating_point(), momentum_codes=bool(v) and not v[k].is_floating_point())
        out_w.append(torch.from_numpy(new_w).reshape(wk.shape))
        out_v.append(None if new_v is None else torch.from_numpy(new_v).reshape(wk.shape))
    return out_w, out_v


def run_op(w, g, v, *, lr, momentum, wd, nesterov, fmt, mfmt, rounding, seed, step, form="standard"):
    return step_op(w, g, v, lr, momentum, wd, nesterov, fmt.total_bits, fmt.frac_bits, mfmt.total_bits,
                   mfmt.frac_bits, rounding, seed, step, form)


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("form,momentum,nesterov", [("standard", 0.9, False), ("standard", 0.9, True),
                                                    ("standard", 0.0, False), ("paper_eq6", 0.9, False),
                                                    ("paper_eq6", 0.0, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_equals_the_contract_bit_for_bit(rounding, form, momentum, nesterov, dtype):
    torch.manual_seed(0)
    fmt, mfmt = fxp.FxpFormat(12, 8), fxp.FxpFormat(10, 9)
    shapes = [(37,), (5, 7), (1,), (4099,)]
    w = [fxp.quantize(torch.randn(s, dtype=dtype), fmt) for s in shapes]
    g = [torch.randn(s, dtype=dtype) * 0.3 for s in shapes]
    v = [fxp.quantize(torch.randn(s, dtype=dtype) * 0.2, mfmt) for s in shapes] if momentum else []
    kw = dict(lr=0.05, momentum=momentum, wd=1e-2, nesterov=nesterov, fmt=fmt, mfmt=mfmt, rounding=rounding,
              seed=-77, step=3, form=form)
    exp_w, exp_v = reference_step(w, g, v, **kw)
    run_op(w, g, v, **kw)
    for k in range(len(shapes)):
        assert same_bits(w[k], exp_w[k]), k
        if momentum:
            assert same_bits(v[k], exp_v[k]), k


def _codes_and_grads(fmt: fxp.FxpFormat, n: int, dtype, lr: float, float_safe: bool, gen: torch.Generator):
    """Random codes over the whole range of fmt, and grads whose updates span 1e-3 to 1e3 LSBs, with exact
    HTE ties (lr is a power of two), zeros, and updates far beyond the range (saturation)."""
    hi = fmt.code_max
    if float_safe and fmt.total_bits > 25:
        hi -= (1 << (fmt.total_bits - 25)) - 1  # Note [Saturation bound in float32]
    codes = torch.randint(fmt.code_min, hi + 1, (n,), generator=gen, dtype=torch.int64)
    lsb = 2.0**-fmt.frac_bits
    magnitude = 10.0 ** (torch.rand(n, generator=gen, dtype=torch.float64) * 6 - 3)
    g = torch.randn(n, generator=gen, dtype=torch.float64) * magnitude * lsb / lr
    g[::7] = (torch.randint(-40, 40, (len(g[::7]),), generator=gen).double() + 0.5) * lsb / lr  # ties
    g[1::11] = 0.0
    g[2::13] = torch.sign(torch.randn(len(g[2::13]), generator=gen, dtype=torch.float64)) * 2.0**40 * lsb
    return codes, g.to(dtype)


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("form,momentum,nesterov", [("standard", 0.9, False), ("standard", 0.9, True),
                                                    ("standard", 0.0, False), ("paper_eq6", 0.9, False),
                                                    ("paper_eq6", 0.0, False)])
@pytest.mark.parametrize("total_bits", [2, 3, 7, 8, 9, 12, 16, 17, 24, 25, 26, 31, 32])
@pytest.mark.parametrize("storage", ["codes", "float32"])
def test_step_at_every_width_equals_the_contract_bit_for_bit(rounding, form, momentum, nesterov, total_bits, storage):
    """Packed codes (int8/int16/int32, float32 grads) and float32 storage, against reference.py's
    numpy/integer definition: momentum formats finer and coarser than the parameter's, saturation and ties."""
    gen = torch.Generator().manual_seed(total_bits)
    frac = total_bits // 2
    fmt, mfmt = fxp.FxpFormat(total_bits, frac), fxp.FxpFormat(total_bits, (frac + 3) % total_bits)
    lr, n = 0.25, 1001
    float_storage = storage == "float32"
    wc, g = _codes_and_grads(fmt, n, torch.float32, lr, float_storage, gen)
    vc, _ = _codes_and_grads(mfmt, n, torch.float32, lr, float_storage, gen)

    def stored(codes, f):
        if float_storage:
            return (codes.double() * 2.0**-f.frac_bits).float()
        return codes.to(f.storage_dtype)

    w, v = [stored(wc, fmt)], [stored(vc, mfmt)] if momentum else []
    kw = dict(lr=lr, momentum=momentum, wd=1e-2, nesterov=nesterov, fmt=fmt, mfmt=mfmt, rounding=rounding,
              seed=5, step=11, form=form)
    exp_w, exp_v = reference_step(w, [g], v, **kw)
    run_op(w, [g], v, **kw)
    assert same_bits(w[0], exp_w[0])
    if momentum:
        assert same_bits(v[0], exp_v[0])


def test_stochastic_update_moves_down_with_probability_frac():
    """Note [QPU rounding on codes]: code(w) - trunc(t) - [u < part] for t > 0, checked against the draws."""
    fmt, n, seed, step = fxp.FxpFormat(8, 4), 4096, 3, 2
    w = [torch.zeros(n)]
    g = [torch.full((n,), 0.3 / 16 / 0.5)]  # lr g = 0.3 LSB: t = 0.3 in float32
    run_op(w, g, [], lr=0.5, momentum=0.0, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt, rounding="stochastic",
           seed=seed, step=step)
    t = torch.tensor(0.5, dtype=torch.float32) * g[0][0] * 16  # float32, as the kernel
    bits = philox_words(seed, step << 32, n)
    expect = -torch.from_numpy((bits.astype("float64") < float(t) * 2.0**32).astype("float32")) / 16
    assert torch.equal(w[0], expect)
    assert abs((w[0] != 0).double().mean().item() - 0.3) < SIGMAS * math.sqrt(0.3 * 0.7 / n)


def test_stochastic_update_moves_up_with_probability_part():
    """A negative update (the parameter grows): code(w) - trunc(t) + [u < |part|], exactly, with t = -0.3."""
    fmt, n, seed, step = fxp.FxpFormat(8, 4), 4096, 3, 2
    w = [torch.zeros(n)]
    g = [torch.full((n,), -0.3 / 16 / 0.5)]
    run_op(w, g, [], lr=0.5, momentum=0.0, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt, rounding="stochastic",
           seed=seed, step=step)
    t = torch.tensor(0.5, dtype=torch.float32) * g[0][0] * 16
    bits = philox_words(seed, step << 32, n)
    expect = torch.from_numpy((bits.astype("float64") < -float(t) * 2.0**32).astype("float32")) / 16
    assert same_bits(w[0], expect)  # +0.0 where it stays, never -0.0


def test_a_small_negative_update_keeps_its_low_bits():
    """t = -(1/2 - 2^-25) (24 significant bits): 1 + t would round to a tie in float32, so a split with
    floor would send every odd code up by one under HTE. The nearest code is the old one."""
    fmt = fxp.FxpFormat(8, 4)
    codes = torch.arange(-5, 6, dtype=torch.float32)
    w = [codes / 16]
    g = [torch.full_like(codes, -(0.5 - 2.0**-25) / 16)]  # lr 1: t = lr g 2^4 exactly
    counts = run_op(w, g, [], lr=1.0, momentum=0.0, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt,
                    rounding="nearest_even", seed=0, step=0)
    assert same_bits(w[0], codes / 16)
    assert counts.tolist() == [[0, len(codes)]]


def test_hteqpu_by_hand():
    fmt = fxp.FxpFormat(8, 4)  # LSB 1/16
    w = [torch.tensor([0.5, 0.25, 0.0, 7.875])]
    g = [torch.tensor([0.1, -0.3, 0.0625, -1.0])]
    v = [torch.zeros(4)]
    counts = run_op(w, g, v, lr=0.5, momentum=0.5, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt,
                    rounding="nearest_even", seed=0, step=0)
    # v = g; w - 0.5 v = [0.45, 0.4, -0.03125, 8.375] -> codes [7.2, 6.4, -0.5 (tie), 134] -> [7, 6, 0, 127]
    assert w[0].tolist() == [7 / 16, 6 / 16, 0.0, 127 / 16]
    # v stored on the grid: [0.1 -> 1.6 -> 2/16, -0.3 -> -4.8 -> -5/16, 0.0625, -1.0]
    assert v[0].tolist() == [2 / 16, -5 / 16, 1 / 16, -1.0]
    assert counts.tolist() == [[1, 1]]  # 7.875 + 0.5 saturated; the 0.0 tie vanished
    # second step, by hand: v = 0.5 v + g
    g = [torch.tensor([0.0, 0.0, 0.0, 0.0])]
    run_op(w, g, v, lr=0.5, momentum=0.5, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt,
           rounding="nearest_even", seed=0, step=1)
    # v = [1/16, -2.5/16, 0.5/16, -0.5]; w - 0.5 v = [6.5, 7.25, -0.25, 131]/16 -> [6, 7, 0, 127]/16
    assert w[0].tolist() == [6 / 16, 7 / 16, 0.0, 127 / 16]
    assert v[0].tolist() == [1 / 16, -2 / 16, 0.0, -0.5]  # -2.5 -> -2 (even), 0.5 -> 0 (even)


@pytest.mark.parametrize("storage", ["float32", "codes"])
def test_hte_ties_round_to_even_in_the_vector_loop(storage):
    """64 elements (whole vectors on every CPU build), every one a tie for both the momentum (x 2^Fm = k + 1/2)
    and the parameter (code(w) - t with t = k + 1/2): each result is the even neighbour
    (Note [Nearest-even QPU rounding on float codes])."""
    fmt = fxp.FxpFormat(12, 4)
    k = torch.arange(-32, 32, dtype=torch.float64)
    codes = torch.randint(-100, 101, (64,), generator=torch.Generator().manual_seed(3), dtype=torch.int64)
    g = [((k + 0.5) / 16).float()]  # v = 0, momentum 0.5: v' = g, x = v' 2^4 = k + 1/2; lr 1: t = k + 1/2
    if storage == "float32":
        w, v = [(codes.double() / 16).float()], [torch.zeros(64)]
    else:
        w, v = [codes.to(fmt.storage_dtype)], [torch.zeros(64, dtype=fmt.storage_dtype)]
    run_op(w, g, v, lr=1.0, momentum=0.5, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt, rounding="nearest_even",
           seed=0, step=0)
    expected_v = torch.tensor([round(x + 0.5) for x in k.tolist()])  # Python's round: ties to even
    expected_w = torch.tensor([round(c - x - 0.5) for c, x in zip(codes.tolist(), k.tolist())])
    assert torch.all(expected_v % 2 == 0) and torch.all(expected_w % 2 == 0)
    got_w = w[0].double() * 16 if storage == "float32" else w[0].long()
    got_v = v[0].double() * 16 if storage == "float32" else v[0].long()
    assert torch.equal(got_v.long(), expected_v) and torch.equal(got_w.long(), expected_w)


def test_fine_format_matches_torch_sgd():
    torch.manual_seed(1)
    target = torch.randn(64, dtype=torch.float64)
    fmt = fxp.FxpFormat(32, 26)  # LSB 1.5e-8; |w| < 32
    w_ref = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    w_qpu = torch.zeros(64, dtype=torch.float64, requires_grad=True)
    ref = torch.optim.SGD([w_ref], lr=0.05, momentum=0.9, weight_decay=1e-3)
    qpu = QPUSGD([w_qpu], lr=0.05, momentum=0.9, weight_decay=1e-3, format=fmt, rounding="nearest_even")
    for _ in range(200):
        for w, opt in ((w_ref, ref), (w_qpu, qpu)):
            opt.zero_grad()
            ((w - target) ** 2).sum().backward()
            opt.step()
    assert (w_ref - w_qpu).abs().max().item() < 1e-6
    assert (w_ref - target).abs().max().item() < 1e-2  # it did converge


def test_sqpu_update_is_unbiased_over_many_seeds():
    """An update of 0.33 LSB, 2048 seeds x 512 elements: the mean new value is w - lr g."""
    seeds, n, fmt = 2048, 512, fxp.FxpFormat(8, 6)
    g = [torch.full((n,), 0.33 / 64 / 0.1, dtype=torch.float64)]
    moved = []
    for seed in range(seeds):
        w = [torch.full((n,), 0.5, dtype=torch.float64)]
        run_op(w, g, [], lr=0.1, momentum=0.0, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt, rounding="stochastic",
               seed=seed, step=0)
        moved.append((0.5 - w[0]) * 64)  # in LSBs: 0 or 1
    moved = torch.cat(moved)
    assert set(moved.unique().tolist()) <= {0.0, 1.0}
    assert abs(moved.mean().item() - 0.33) <= SIGMAS * math.sqrt(0.33 * 0.67 / moved.numel())
    # HTE loses the whole update: every element vanishes
    w2 = [torch.full((n,), 0.5, dtype=torch.float64)]
    counts = run_op(w2, g, [], lr=0.1, momentum=0.0, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt,
                    rounding="nearest_even", seed=5, step=0)
    assert torch.all(w2[0] == 0.5) and counts.tolist() == [[0, n]]


@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
def test_parameters_and_momentum_stay_on_grid_and_saturate(rounding):
    torch.manual_seed(2)
    fmt, mfmt = fxp.FxpFormat(8, 5), fxp.FxpFormat(8, 6)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    fxp.optim.quantize_parameters_(model.parameters(), fmt, rounding)
    opt = QPUSGD(model.parameters(), lr=0.5, momentum=0.9, format=fmt, momentum_format=mfmt, rounding=rounding)
    x, y = torch.randn(64, 8), torch.randn(64, 1) * 10
    saturated = 0
    for _ in range(20):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        saturated += int(opt.last_counts[0][:, 0].sum())
        for p in model.parameters():
            assert on_grid(p, fmt)
            assert on_grid(opt.state[p]["momentum_buffer"], mfmt)
    assert saturated > 0  # lr 0.5 on targets of size 10 drives weights into the bounds
    assert any(torch.any(p.abs() == fmt.max_value) or torch.any(p == fmt.min_value) for p in model.parameters())


def test_state_dict_round_trip_is_bit_identical():
    torch.manual_seed(3)

    def make():
        m = torch.nn.Linear(10, 4)
        fxp.optim.quantize_parameters_(m.parameters(), fxp.FxpFormat(12, 8))
        return m

    def train(model, opt, steps, x):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    x = torch.randn(32, 10)
    a = make()
    opt_a = QPUSGD(a.parameters(), lr=0.1, momentum=0.9, format=fxp.FxpFormat(12, 8), seed=11)
    train(a, opt_a, 3, x)
    b = copy.deepcopy(a)
    opt_b = QPUSGD(b.parameters(), lr=0.7, momentum=0.1, format=fxp.FxpFormat(12, 8), seed=99)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    train(a, opt_a, 5, x)
    train(b, opt_b, 5, x)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_works_with_lr_scheduler():
    w = torch.nn.Parameter(torch.zeros(4))
    opt = QPUSGD([w], lr=1.0, format=fxp.FxpFormat(16, 10), rounding="nearest_even")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for expected_step in (1.0, 0.5, 0.25):
        before = w.detach().clone()
        w.grad = torch.ones(4)
        opt.step()
        sched.step()
        assert torch.allclose(before - w.detach(), torch.full((4,), expected_step))


def test_errors():
    w, g = [torch.zeros(3)], [torch.zeros(3)]
    base = dict(lr=0.1, momentum=0.0, wd=0.0, nesterov=False, fmt=fxp.FxpFormat(8, 4), mfmt=fxp.FxpFormat(8, 4),
                rounding="stochastic", seed=0, step=0)
    with pytest.raises(RuntimeError, match="expected as many grads as params"):
        run_op(w, [], [], **base)
    with pytest.raises(RuntimeError, match="momentum > 0 needs one momentum buffer per param"):
        run_op(w, g, [], **{**base, "momentum": 0.9})
    with pytest.raises(RuntimeError, match="rounding must be nearest_even .* or stochastic"):
        run_op(w, g, [], **{**base, "rounding": "floor"})
    with pytest.raises(RuntimeError, match="nesterov needs momentum > 0"):
        run_op(w, g, [], **{**base, "nesterov": True})
    with pytest.raises(RuntimeError, match=r"params must be Double like the grads, or .* codes .* but got Float"):
        run_op(w, [torch.zeros(3, dtype=torch.float64)], [], **base)
    with pytest.raises(RuntimeError, match=r"grads must be float32 or float64, but got Half"):
        run_op([torch.zeros(3, dtype=torch.half)], [torch.zeros(3, dtype=torch.half)], [], **base)
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[4\] but params\[0\] has \[3\]"):
        run_op(w, [torch.zeros(4)], [], **base)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be contiguous"):
        run_op([torch.zeros(3, 2).t()], [torch.zeros(3, 2).t().contiguous()], [], **base)
    with pytest.raises(RuntimeError, match="unknown momentum_form 'eq7'"):
        run_op(w, g, [], **{**base, "form": "eq7"})
    with pytest.raises(ValueError, match="nesterov needs momentum > 0"):
        QPUSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, nesterov=True)
    opt = QPUSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"frac_bits must be in \[0, total_bits - 1\] = \[0, 7\], but got 9"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "total_bits": 8, "frac_bits": 9})
    assert len(opt.param_groups) == 1  # a rejected group is not added


def test_opcheck():
    torch.manual_seed(4)
    w = [torch.randn(5), torch.randn(3, 2)]
    args = (w, [torch.randn_like(t) for t in w], [torch.zeros_like(t) for t in w], 0.1, 0.9, 1e-3, False,
            8, 4, 8, 5, "stochastic", 1, 2, "standard")
    torch.library.opcheck(step_op.default, args)


@requires_cuda
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_bit_identical_to_cpu(rounding, dtype):
    torch.manual_seed(5)
    fmt = fxp.FxpFormat(16, 10)
    shapes = [(100_003,), (7, 9)] + [(1000,)] * 50 + [(200_000,)]  # several launches, chunk edges
    w = [fxp.quantize(torch.randn(s, dtype=dtype), fmt) for s in shapes]
    g = [torch.randn(s, dtype=dtype) for s in shapes]
    v = [torch.zeros(s, dtype=dtype) for s in shapes]
    wc, gc, vc = [t.cuda() for t in w], [t.cuda() for t in g], [t.cuda() for t in v]
    kw = dict(lr=0.01, momentum=0.9, wd=1e-4, nesterov=False, fmt=fmt, mfmt=fmt, rounding=rounding, seed=3, step=7)
    counts = run_op(w, g, v, **kw)
    counts_c = run_op(wc, gc, vc, **kw)
    for a, b in zip(w + v, wc + vc):
        assert torch.equal(a, b.cpu())
    assert torch.equal(counts, counts_c.cpu())


@requires_cuda
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("form,momentum,nesterov", [("standard", 0.9, True), ("paper_eq6", 0.9, False)])
@pytest.mark.parametrize("total_bits", [4, 8, 12, 16, 22, 26, 32])
@pytest.mark.parametrize("storage", ["codes", "float32"])
def test_cuda_equals_cpu_at_every_width(rounding, form, momentum, nesterov, total_bits, storage):
    """Both code types (float32 codes up to 21 bits, int64 above: Note [QPU code arithmetic]) and both
    storages, with ties and saturation: the CUDA step equals the CPU step bit for bit."""
    gen = torch.Generator().manual_seed(total_bits)
    fmt, mfmt = fxp.FxpFormat(total_bits, total_bits // 2), fxp.FxpFormat(total_bits, total_bits - 1)
    wc, g = _codes_and_grads(fmt, 70_001, torch.float32, 0.25, storage == "float32", gen)
    vc, _ = _codes_and_grads(mfmt, 70_001, torch.float32, 0.25, storage == "float32", gen)
    if storage == "float32":
        w, v = [(wc.double() * 2.0**-fmt.frac_bits).float()], [(vc.double() * 2.0**-mfmt.frac_bits).float()]
    else:
        w, v = [wc.to(fmt.storage_dtype)], [vc.to(mfmt.storage_dtype)]
    wd, vd, gd = [w[0].cuda()], [v[0].cuda()], [g.cuda()]
    kw = dict(lr=0.25, momentum=momentum, wd=1e-2, nesterov=nesterov, fmt=fmt, mfmt=mfmt, rounding=rounding,
              seed=9, step=3, form=form)
    counts = run_op(w, [g], v, **kw)
    counts_d = run_op(wd, gd, vd, **kw)
    assert same_bits(w[0], wd[0].cpu()) and same_bits(v[0], vd[0].cpu())
    assert torch.equal(counts, counts_d.cpu())


@requires_cuda
@pytest.mark.parametrize("rounding", ["nearest_even", "stochastic"])
@pytest.mark.parametrize("form", ["standard", "paper_eq6"])
@pytest.mark.parametrize("total_bits", [8, 16, 32])
@pytest.mark.parametrize("storage", ["codes", "float32"])
def test_cuda_equals_cpu_without_momentum(rounding, form, total_bits, storage):
    """The kernels without a momentum buffer (paper_eq6 still draws its delta's bits): CUDA == CPU."""
    gen = torch.Generator().manual_seed(100 + total_bits)
    fmt = fxp.FxpFormat(total_bits, total_bits // 2)
    wc, g = _codes_and_grads(fmt, 70_001, torch.float32, 0.25, storage == "float32", gen)
    w = [(wc.double() * 2.0**-fmt.frac_bits).float()] if storage == "float32" else [wc.to(fmt.storage_dtype)]
    wd, gd = [w[0].cuda()], [g.cuda()]
    kw = dict(lr=0.25, momentum=0.0, wd=1e-2, nesterov=False, fmt=fmt, mfmt=fmt, rounding=rounding, seed=9,
              step=3, form=form)
    counts = run_op(w, [g], [], **kw)
    counts_d = run_op(wd, gd, [], **kw)
    assert same_bits(w[0], wd[0].cpu())
    assert torch.equal(counts, counts_d.cpu()) and counts.sum() > 0


def test_result_independent_of_thread_count():
    torch.manual_seed(6)
    fmt = fxp.FxpFormat(16, 10)
    w0 = [fxp.quantize(torch.randn(300_001), fmt), fxp.quantize(torch.randn(50), fmt)]
    g = [torch.randn_like(t) for t in w0]
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            w, v = [x.clone() for x in w0], [torch.zeros_like(x) for x in w0]
            c = run_op(w, g, v, lr=0.01, momentum=0.9, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt,
                       rounding="stochastic", seed=1, step=0)
            results.append((w, v, c))
    finally:
        torch.set_num_threads(threads)
    (w1, v1, c1), (w3, v3, c3) = results
    assert all(torch.equal(a, b) for a, b in zip(w1 + v1, w3 + v3)) and torch.equal(c1, c3)


def test_optimizer_equals_the_fused_op_with_group_seeds():
    """QPUSGD group i uses key seed + i and its own step count, like fxp::optim::QpuSgd in C++."""
    torch.manual_seed(7)
    fmt = fxp.FxpFormat(12, 8)
    groups = [[torch.nn.Parameter(fxp.quantize(torch.randn(n), fmt)) for n in (37, 1000)] for _ in range(2)]
    direct = [[p.detach().clone() for p in g] for g in groups]
    buffers = [[torch.zeros_like(p) for p in g] for g in groups]
    opt = QPUSGD([{"params": g} for g in groups], lr=0.05, momentum=0.9, weight_decay=1e-3, format=fmt, seed=21)
    for step in range(3):
        for gi, g in enumerate(groups):
            for p in g:
                p.grad = torch.randn_like(p) * 0.5
            run_op(direct[gi], [p.grad for p in g], buffers[gi], lr=0.05, momentum=0.9, wd=1e-3, nesterov=False,
                   fmt=fmt, mfmt=fmt, rounding="stochastic", seed=21 + gi, step=step)
        opt.step()
    for g, d in zip(groups, direct):
        assert all(torch.equal(p.detach(), q) for p, q in zip(g, d))


# --- issue 11 ----------------------------------------------------------------------
def _group(seed: int, fmt=fxp.FxpFormat(12, 8)):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(fxp.quantize(torch.randn(n), fmt)) for n in (37, 1000, 5)]


def _grads(params, seed: int):
    torch.manual_seed(seed)
    for p in params:
        p.grad = torch.randn_like(p) * 0.5


def test_a_parameter_without_gradient_shifts_no_other_stream():
    """Note [QPU random streams]: parameter k of a group draws from stream k."""
    fmt = fxp.FxpFormat(12, 8)
    every, some = _group(1), _group(1)
    opts = [QPUSGD(ps, lr=0.05, momentum=0.9, format=fmt, seed=4) for ps in (every, some)]
    for step in range(2):
        _grads(every, step)
        _grads(some, step)
        some[0].grad = None  # frozen, or unused by this batch
        for opt in opts:
            opt.step()
    assert torch.equal(every[1], some[1]) and torch.equal(every[2], some[2])
    counts = opts[1].last_counts[0]
    assert counts.shape == (3, 2) and counts[0].tolist() == [0, 0]
    assert torch.equal(counts[1:], opts[0].last_counts[0][1:])


def test_stream_indices_of_the_op():
    fmt = fxp.FxpFormat(12, 8)
    w, g = _group(2), None
    _grads(w, 9)
    g = [p.grad for p in w]
    both = [p.detach().clone() for p in w]
    run_op(both, g, [], lr=0.05, momentum=0.0, wd=0.0, nesterov=False, fmt=fmt, mfmt=fmt, rounding="stochastic",
           seed=3, step=5)
    only_last = [w[2].detach().clone()]
    step_op(only_last, [g[2]], [], 0.05, 0.0, 0.0, False, 12, 8, 12, 8, "stochastic", 3, 5, "standard", [2])
    assert torch.equal(only_last[0], both[2])
    args = ([w[0].detach().clone(), w[1].detach().clone()], g[:2], [], 0.05, 0.0, 0.0, False, 12, 8, 12, 8,
            "stochastic", 3, 5, "standard")
    with pytest.raises(RuntimeError, match="stream index 4 is given twice"):
        step_op(*args, [4, 4])
    with pytest.raises(RuntimeError, match=r"stream_indices\[1\] must be in \[0, 2\^31\), but got -1"):
        step_op(*args, [0, -1])
    with pytest.raises(RuntimeError, match=r"expected one stream index per param \(2\), but got 1"):
        step_op(*args, [0])


def test_a_strided_parameter_steps_like_its_contiguous_copy():
    fmt = fxp.FxpFormat(12, 8)
    values = fxp.quantize(torch.randn(7, 5), fmt)
    strided = torch.nn.Parameter(values.t().contiguous().t())  # column-major, as a transposed weight
    plain = torch.nn.Parameter(values.clone())
    assert not strided.is_contiguous()
    opts = [QPUSGD([p], lr=0.05, momentum=0.9, format=fmt, seed=1) for p in (strided, plain)]
    for step in range(3):
        g = torch.randn(7, 5)
        strided.grad, plain.grad = g.clone(), g.clone()
        for opt in opts:
            opt.step()
    assert torch.equal(strided, plain) and not strided.is_contiguous()
    torch.optim.SGD([strided], lr=0.1)  # which torch accepts too


def test_empty_lists_are_a_no_op():
    counts = step_op([], [], [], 0.1, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0, 0)
    assert counts.shape == (0, 2) and counts.dtype == torch.int64
    with pytest.raises(RuntimeError, match="lr must be a non-negative finite number, but got inf"):
        step_op([], [], [], float("inf"), 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0, 0)


def test_tensors_that_share_memory_are_refused():
    args = (0.1, 0.9, 0.0, False, 16, 10, 16, 10, "stochastic", 0, 0)
    w, g, v = torch.zeros(8), torch.zeros(8), torch.zeros(8)
    other = torch.zeros(8)
    with pytest.raises(RuntimeError, match=r"params\[1\] and params\[0\] share memory"):
        step_op([w, w], [g, torch.zeros(8)], [v, torch.zeros(8)], *args)
    base = torch.zeros(12)
    with pytest.raises(RuntimeError, match="share memory"):  # overlapping views
        step_op([base[:8], base[4:]], [g, torch.zeros(8)], [v, torch.zeros(8)], *args)
    with pytest.raises(RuntimeError, match=r"momentum_buffers\[0\] and params\[1\] share memory"):
        step_op([w, other], [g, torch.zeros(8)], [other, torch.zeros(8)], *args)
    with pytest.raises(RuntimeError, match=r"grads\[0\] and params\[0\] share memory"):
        step_op([w], [w], [v], *args)
    # Gradients are only read: they may share memory with each other.
    step_op([w, other], [g, g], [v, torch.zeros(8)], *args)


def test_a_nan_result_on_float_storage_is_the_default_quiet_nan():
    """Note [NaN keeps its bits]: a computed NaN is stored as 0x7FC00000 on
    every backend, not with whatever payload the arithmetic gave it."""
    for dtype, bits in ((torch.float32, 0x7FC00000), (torch.float64, 0x7FF8000000000000)):
        w = torch.zeros(4, dtype=dtype)
        g = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype)
        payload = torch.tensor([0x7FC00123 if dtype == torch.float32 else 0x7FF8000000000ABC],
                               dtype=torch.int32 if dtype == torch.float32 else torch.int64)
        g[1:2] = payload.view(dtype)  # a NaN gradient with a payload of its own
        step_op([w], [g], [], 0.1, 0.0, 0.0, False, 16, 10, 16, 10, "stochastic", 0, 0)
        raw = w.view(torch.int32 if dtype == torch.float32 else torch.int64)
        assert int(raw[1]) == bits and not torch.isnan(w[0])
