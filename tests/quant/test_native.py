"""quant/native: every C kernel against the torch form it replaces (the slow reference path).

Oracle: the same quantizer, transform or operand with the kernels forced off (fixture torch_forms).
On CPUs with FMA the kernels make the same roundings, so values and codes must be equal bit for
bit; elsewhere to one grid step in rare elements. Sums of codes are checked against torch sums.
Plus: two threads give what one gives, tensors the kernels do not take fall back, the build is
cached, and a missing compiler falls back with a warning.
"""

from __future__ import annotations

import pytest
import torch

from fqtrun.quant import fused
from fqtrun.quant.gradient import BlockHouseholder, PerColumn, PerSample, PerTensor, quantize_pair
from fqtrun.quant.grid import minmax_grid
from fqtrun.quant.householder import block_householder_transform, householder_transform_torch
from fqtrun.quant.native import bhq as native_bhq
from fqtrun.quant.native import int8 as native_int8
from fqtrun.quant.native import library
from fqtrun.quant.native import sr as native_sr

pytestmark = pytest.mark.skipif(library.load() is None, reason="no C compiler here: the torch forms are what runs")


def gradient(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=g) * torch.exp(2 * torch.randn(n, 1, generator=g))
    x[: max(1, n // 8)] *= 1000  # a few dominant rows: BHQ groups of several sizes
    x[n // 2] = 0.0  # an all-zero row
    return x


def same(a: torch.Tensor, b: torch.Tensor, step: float) -> bool:
    if library.has_fma():
        return torch.equal(a, b)
    return torch.allclose(a.double(), b.double(), rtol=0, atol=step * 1.01)


def torch_form(monkeypatch, fn):
    """fn() with the kernels off."""
    with monkeypatch.context() as m:
        m.setattr(library, "load", lambda: None)
        return fn()


def sums_hold(gc) -> bool:
    q = gc.codes.int() - 128
    return torch.equal(gc.rowsum, q.sum(1, keepdim=True)) and torch.equal(gc.colsum, q.sum(0, keepdim=True))


QUANTIZERS = {"ptq": PerTensor, "psq": PerSample, "psq_zero_aligned": lambda b: PerSample(b, grid="zero_aligned"),
              "per_column": PerColumn, "bhq": BlockHouseholder}
SHAPES = [(1, 5), (2, 7), (37, 300), (64, 2100), (256, 129)]


@pytest.mark.parametrize("name", list(QUANTIZERS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizers_equal_their_torch_form(name, shape, bits, monkeypatch):
    x = gradient(*shape, seed=sum(shape) + bits)
    q = QUANTIZERS[name](bits)
    fast_values, fast = q(x, 9), q.quantize(x, 9)
    slow_values, slow = torch_form(monkeypatch, lambda: (q(x, 9), q.quantize(x, 9)))
    step = float(slow.scale.max())
    assert same(fast.codes.float(), slow.codes.float(), 1.0) and same(fast_values, slow_values, step)
    assert torch.equal(fast.scale, slow.scale) and torch.equal(fast.zero, slow.zero)
    assert (fast.lo is None) == (slow.lo is None) and (fast.lo is None or torch.equal(fast.lo, slow.lo))
    assert sums_hold(fast) and slow.rowsum is None  # only the kernels make the sums
    assert same(fast.dequantize(), fast_values, step)  # quantize and __call__ agree


@pytest.mark.parametrize("pair", [("psq", "per_column"), ("ptq", "per_column"), ("psq_zero_aligned", "ptq"),
                                  ("bhq", "per_column")])
@pytest.mark.parametrize("bits", [(4, 8), (8, 8), (2, 5)])
def test_pair_in_one_pass_equals_two_quantizers(pair, bits, monkeypatch):
    x = gradient(48, 333, seed=bits[0])
    qa, qb = QUANTIZERS[pair[0]](bits[0]), QUANTIZERS[pair[1]](bits[1])
    a, b = quantize_pair(qa, qb, x, 5, 6)
    ra, rb = torch_form(monkeypatch, lambda: (qa.quantize(x, 5), qb.quantize(x, 6)))
    for fast, slow in ((a, ra), (b, rb)):
        assert same(fast.codes.float(), slow.codes.float(), 1.0) and torch.equal(fast.scale, slow.scale)
        assert sums_hold(fast)
    assert not torch.equal(a.codes, b.codes)  # each its own grid and noise


def test_two_threads_give_what_one_gives():
    # the kernels' per-thread partial sums, column ranges and BHQ tasks merged (the suite runs one thread)
    x = gradient(130, 1100, seed=3)
    before = torch.get_num_threads()
    out = {}
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            pair = quantize_pair(PerSample(8), PerColumn(8), x, 1, 2)
            bhq = BlockHouseholder(8)
            out[t] = [*(c.codes for c in pair), *(c.colsum for c in pair), bhq(x, 3), bhq.quantize(x, 3).colsum,
                      *native_sr.ranges(x, rows=True, cols=True)[1]]
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(out[1], out[2]))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_bhq_with_a_dominant_group_equals_its_torch_form(threads, monkeypatch):
    # two dominant rows lead groups of about 150 and 50 of the 200 rows: with several threads bhq_sr splits them
    # by column blocks (sums and ranges first, then SR and T^-1), which must not change a value
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2500, generator=g)
    x[7] *= 1000.0
    x[100] *= 333.0
    q = BlockHouseholder(4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        fast_values, fast = q(x, 4), q.quantize(x, 4)
    finally:
        torch.set_num_threads(before)
    assert q.info()["max_group_size"] > 200 // 4  # split at 2 and 3 threads
    slow_values, slow = torch_form(monkeypatch, lambda: (q(x, 4), q.quantize(x, 4)))
    assert same(fast.codes.float(), slow.codes.float(), 1.0) and same(fast_values, slow_values, float(slow.scale.max()))
    assert torch.equal(fast.scale, slow.scale) and torch.equal(fast.lo, slow.lo) and sums_hold(fast)


def random_ranges(g: torch.Generator, n: int) -> torch.Tensor:
    kind = int(torch.randint(4, (1,), generator=g))
    if kind == 0:
        return torch.rand(n, generator=g) * 3
    if kind == 1:
        return torch.exp(3 * torch.randn(n, generator=g))
    if kind == 2:
        return torch.randint(0, 3, (n,), generator=g).float()  # ties and zeros
    lam = torch.ones(n)
    lam[: int(torch.randint(1, n + 1, (1,), generator=g))] *= 1000
    return lam


def test_bhq_setup_equals_the_torch_form():
    # the same double formulas; pow is libm's in C and torch's own vector pow, which may differ in the last
    # double bit, and the float32 results would then differ with probability about 2^-29 per row: none here
    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        n = int(torch.randint(1, 600, (1,), generator=g))
        ranges = random_ranges(g, n)
        fast, slow = block_householder_transform(ranges), householder_transform_torch(ranges)
        for field in ("group", "is_leader", "leader", "sizes", "num_groups", "row_scale", "coef", "weight"):
            assert torch.equal(getattr(fast, field), getattr(slow, field)), (trial, field)


@pytest.mark.parametrize("n,k", [(1, 5), (2, 7), (37, 300), (256, 1500)])
def test_reflections_equal_the_torch_form(n, k, monkeypatch):
    x = gradient(n, k, seed=n + k)
    t = block_householder_transform(x.amax(1) - x.amin(1))
    run = lambda: [t.apply(x), t.householder(x), t.inverse(x), t.inverse_(x.clone())]  # noqa: E731
    fast = run()
    monkeypatch.setattr(native_bhq, "reflect", lambda *args, **kwargs: None)
    for a, b in zip(fast, run()):
        assert same(a, b, 1e-6 * float(b.abs().max()))
    y, ylo, yhi = native_bhq.transformed(x, t)
    assert same(y, fast[0], 0.0)
    assert torch.equal(ylo, y.amin(1, keepdim=True)) and torch.equal(yhi, y.amax(1, keepdim=True))


def test_range_pass_equals_torch_and_keeps_nan():
    x = gradient(70, 333, seed=1)
    x[3, 5], x[9, 332] = float("nan"), float("inf")
    (rlo, rhi), (clo, chi) = native_sr.ranges(x, rows=True, cols=True)
    for got, ref in ((rlo, x.amin(1, keepdim=True)), (rhi, x.amax(1, keepdim=True)), (clo, x.amin(0, keepdim=True)),
                     (chi, x.amax(0, keepdim=True))):
        assert torch.allclose(got, ref, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(rlo[3]) and torch.isnan(chi[0, 5]) and rhi[9] == float("inf")


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("bits", [8, 3])
def test_forward_codes_equal_the_torch_form(per_row, bits, monkeypatch):
    x = gradient(61, 517, seed=bits)
    scale, zero = minmax_grid(x, bits, keep_dim=0 if per_row else None)
    fast = fused.nearest_int8(x, scale, zero, bits)
    slow = torch_form(monkeypatch, lambda: fused.nearest_int8(x, scale, zero, bits))
    assert torch.equal(fast.q, slow.q) and slow.rowsum is None
    assert torch.equal(fast.rowsum, fast.q.int().sum(1, keepdim=True))
    assert torch.equal(fast.colsum, fast.q.int().sum(0, keepdim=True))


@pytest.mark.parametrize("rows,cols", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("extras", [(False, False), (True, False), (False, True), (True, True)])
def test_epilogue_equals_the_torch_form(rows, cols, extras, monkeypatch):
    g = torch.Generator().manual_seed(rows * 2 + cols)
    m, n = 33, 20
    acc = torch.randint(-2**20, 2**20, (m, n), generator=g, dtype=torch.int32)
    rs, cs = (m, 1) if rows else (1, 1), (1, n) if cols else (1, 1)
    alpha_a, row_a = (torch.randint(-127, 128, rs, generator=g, dtype=torch.int32) for _ in range(2))
    col_term, alpha_b = (torch.randint(-2**16, 2**16, cs, generator=g, dtype=torch.int32) for _ in range(2))
    scale_a, scale_b = torch.rand(rs, generator=g) + 0.01, torch.rand(cs, generator=g) + 0.01
    offset = torch.randn(rs, generator=g) if extras[0] else None
    bias = torch.randn(n, generator=g) if extras[1] else None
    args = (alpha_a, col_term, row_a, alpha_b, scale_a, scale_b, offset, bias)
    fast = native_int8.epilogue(acc.clone(), *args)
    slow = torch_form(monkeypatch, lambda: fused.int_gemm_epilogue(acc.clone(), *args))
    assert fast is not None and torch.equal(fast, slow)


def test_kernels_decline_what_they_cannot_take():
    x = gradient(8, 16, seed=1)
    t = block_householder_transform(x.amax(1) - x.amin(1))
    out = torch.empty_like(x)
    assert native_bhq.reflect(out, x.double(), t, t.weight) is None  # float64
    assert native_bhq.reflect(out, x.t(), t, t.weight) is None  # not contiguous
    assert native_bhq.reflect(out, x.clone().requires_grad_(), t, t.weight) is None  # autograd cannot see it
    assert native_bhq.reflect(out, x.to("meta"), t, t.weight) is None  # no data
    assert native_sr.ranges(x.t(), rows=True, cols=False) is None
    assert native_sr.sr_pass(x, [native_sr.SRJob("row_span", 12, 0, codes=True)]) is None  # > 8 bits: no uint8
    assert native_int8.nearest(x.double(), torch.ones(1, 1), torch.zeros(1, 1), 255.0) is None


def test_build_is_cached_and_a_missing_compiler_falls_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FQTRUN_NATIVE_CACHE", str(tmp_path / "cache"))
    library.load.cache_clear()
    try:
        assert library.load() is not None  # a compiler is here (the module skips otherwise)
        assert len(list((tmp_path / "cache").glob("kernels-*.so"))) == 1
        library.load.cache_clear()
        monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
        monkeypatch.setenv("FQTRUN_NATIVE_CACHE", str(tmp_path / "other"))
        with pytest.warns(UserWarning, match="native kernels unavailable"):
            assert library.load() is None
        x = gradient(16, 40, seed=2)
        q = BlockHouseholder(4)
        assert q.quantize(x, 1).rowsum is None  # the torch form ran
        t = block_householder_transform(x.amax(1) - x.amin(1))
        torch.testing.assert_close(t.inverse(t.apply(x)), x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))
    finally:
        library.load.cache_clear()


def test_fake_pair_equals_the_two_quantizers():
    """gradient.fake_pair (the simulate backend's dX and dW operands from one range and one SR pass) gives
    each quantizer's own values bit for bit."""
    from fqtrun.quant.gradient import fake_pair, make_gradient_quantizer

    g = torch.Generator().manual_seed(3)
    for rows, cols in [(2048, 64), (33, 7), (1, 300), (256, 256)]:
        x = torch.randn(rows, cols, generator=g) * torch.exp(3 * torch.randn(rows, 1, generator=g))
        for dx_name, grid, dw_name, bits in [("per_sample", None, "per_column", 8), ("per_tensor", None, "per_column", 4),
                                             ("per_sample", "zero_aligned", "per_tensor", 5),
                                             ("per_sample", None, "per_column", 12)]:
            dx_q = make_gradient_quantizer(dx_name, bits, grid=grid)
            dw_q = make_gradient_quantizer(dw_name, bits)
            pair = fake_pair(dx_q, dw_q, x, 11, 12)
            assert pair is not None
            assert torch.equal(pair[0], dx_q(x, 11)) and torch.equal(pair[1], dw_q(x, 12))
    bhq = make_gradient_quantizer("householder", 8)
    assert fake_pair(bhq, make_gradient_quantizer("per_column", 8), x, 1, 2) is None  # BHQ transforms x


def test_minmax_kernel_equals_the_torch_form():
    """native/minmax.py (MinMaxQuantizer's fake and straight-through values in one C call) against the torch
    form codes(x).dequantize() and x + (x_hat - x): bit for bit on random, one-sided, constant, zero,
    subnormal and near-limit tensors, per tensor and per channel; NaN and inf refused in one line."""
    from fqtrun.quant.numerics import NonFiniteError
    from fqtrun.quant.quantizers import MinMaxQuantizer

    g = torch.Generator().manual_seed(5)
    cases = 0
    for shape in [(64, 64), (2048, 64), (7, 3, 5), (33,), (300, 257)]:
        base = torch.randn(*shape, generator=g)
        for x in [base * 1e3, base.abs(), -base.abs(), torch.full(shape, 2.5), torch.zeros(shape), base * 1e-40,
                  base * 1e-44, base * 4e37, base * torch.exp(4 * torch.randn(shape[0], *[1] * (len(shape) - 1),
                                                                             generator=g))]:
            for gran in ("tensor", "channel"):
                for bits in (2, 4, 8, 12):
                    q = MinMaxQuantizer(bits, gran)
                    ref = q.codes(x).dequantize()
                    xr = x.clone().requires_grad_()
                    y = q(xr)
                    y.sum().backward()
                    same = (q.fake(x) == ref) | (q.fake(x).isnan() & ref.isnan())
                    ste = x + (ref - x)
                    assert bool(same.all()) and bool(((y.detach() == ste) | (ste.isnan() & y.isnan())).all())
                    assert torch.equal(xr.grad, torch.ones_like(x))
                    cases += 1
    assert cases == 5 * 9 * 2 * 4
    bad = torch.randn(10, 10)
    bad[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match="in the input of a quantizer"):
        MinMaxQuantizer(4)(bad)
