"""Integer grids, counter-based noise and stochastic rounding (spec/fqt.md, SR), each against
an independent reference: pure-Python hash, closed-form moments, scipy KS, brute force."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from fqtrun.quant import grid
from fqtrun.quant.grid import (
    covering_grid,
    covering_grid_from_range,
    dequantize,
    levels,
    minmax_grid,
    mix_seed,
    quantize_nearest,
    span_grid,
    span_grid_from_range,
    sr_quantize,
    stochastic_round,
    uniform_noise,
)
from fqtrun.quant.numerics import NonFiniteError

M32 = 0xFFFFFFFF


def _py_noise(seed: int, index: int) -> float:
    """Pure-Python (arbitrary precision) reference of the element hash, written from the
    published constants: SplitMix64 keys, lowbias32 on (index ^ k1), output ^ k2, top 24 bits."""
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    k1, k2 = z & M32, z >> 32
    h = index ^ k1
    h ^= h >> 16
    h = (h * 0x7FEB352D) & M32
    h ^= h >> 15
    h = (h * 0x846CA68B) & M32
    h ^= h >> 16
    h ^= k2
    return (h >> 8) / 2**24


def test_noise_matches_pure_python_hash():
    # exact: also checks that wrapping int64 products keep the low 32 bits right
    seed = mix_seed(3, 17, 2)
    noise = uniform_noise((40, 50), seed).flatten()
    for i in [0, 1, 2, 77, 1234, 1999]:
        assert noise[i].item() == _py_noise(seed, i)


def test_noise_is_uniform():
    n = 1 << 20
    u = uniform_noise(n, 12345).double().numpy()
    assert u.min() >= 0.0 and u.max() < 1.0
    # mean and variance of U[0,1): 1/2 and 1/12, within 5 standard errors
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)  # Var((U - 1/2)^2) = 1/180
    # Kolmogorov-Smirnov against U[0,1) and a 64-bin chi-square
    assert scipy.stats.kstest(u, "uniform").pvalue > 1e-4
    counts = np.bincount((u * 64).astype(int), minlength=64)
    assert scipy.stats.chisquare(counts).pvalue > 1e-4
    # neighbours (lag 1) and rows of a 512-wide matrix (lag 512) uncorrelated
    for lag in (1, 512):
        r = np.corrcoef(u[:-lag], u[lag:])[0, 1]
        assert abs(r) < 5 / math.sqrt(n)


def test_noise_reproducible_and_seed_sensitive():
    a = uniform_noise((64, 64), 7)
    assert torch.equal(a, uniform_noise((64, 64), 7))
    # same flat layout: a prefix of a longer draw is the same noise
    assert torch.equal(a.flatten()[:100], uniform_noise(100, 7))
    for other in (8, mix_seed(7), 7 + 2**40):
        b = uniform_noise((64, 64), other)
        assert (a == b).float().mean() < 0.01
        r = np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1]
        assert abs(r) < 5 / 64


def test_mix_seed():
    s = mix_seed(1, 2, 3)
    assert s == mix_seed(1, 2, 3) and 0 <= s < 2**63
    seen = {
        mix_seed(run, step, layer, slot)
        for run in range(3)
        for step in range(20)
        for layer in range(8)
        for slot in range(4)
    }
    assert len(seen) == 3 * 20 * 8 * 4
    assert mix_seed(1, 2) != mix_seed(2, 1)
    assert mix_seed(1) != mix_seed(1, 0)
    assert mix_seed(-1) == mix_seed(-1)
    with pytest.raises(ValueError, match="mix_seed takes ints"):
        mix_seed(1.5)


def test_stochastic_round_unbiased_with_bernoulli_variance():
    # Monte Carlo over K seeds: mean -> u, variance -> p(1-p), tolerance 5 standard errors
    u = torch.tensor([0.0, 0.1, 0.5, 0.73, 2.999, 7.25, 14.0, 3.5, -1.6])
    p = (u - torch.floor(u)).double()
    k = 4000
    noise = uniform_noise((k, u.numel()), 99)
    draws = stochastic_round(u.expand(k, -1), noise).double()
    assert torch.all((draws == torch.floor(u)) | (draws == torch.floor(u) + 1))
    mean, var = draws.mean(0), draws.var(0)
    se = torch.sqrt(p * (1 - p) / k).clamp(min=1e-9)
    assert torch.all((mean - u.double()).abs() <= 5 * se)
    # variance of a Bernoulli sample variance ~ p(1-p)(1-2p)^2 / k + small
    assert torch.all((var - p * (1 - p)).abs() <= 5 * torch.sqrt(p * (1 - p) / k) + 1e-9)


def _brute_force_step(lo: float, hi: float, big: int) -> float:
    """Smallest step over every integer zero z in 0..B whose grid holds [min(lo,0), max(hi,0)]."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    best = math.inf
    for z in range(big + 1):
        if (lo < 0 and z == 0) or (hi > 0 and z == big):
            continue
        step = max(-lo / z if z else 0.0, hi / (big - z) if z < big else 0.0)
        best = min(best, step)
    return best


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_covering_grid_covers_and_is_finest(bits):
    big = levels(bits)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(50, 33, generator=g) * torch.exp(torch.randn(50, 1, generator=g)) + 0.3 * torch.randn(
        50, 1, generator=g
    )
    x[3] = x[3].abs()  # a non-negative row
    x[4] = -x[4].abs()  # a non-positive row
    x[5] = 0.0
    scale, zero = covering_grid(x, bits, keep_dim=0)
    assert scale.shape == (50, 1) and zero.shape == (50, 1)
    assert torch.all(zero == torch.round(zero)) and torch.all((zero >= 0) & (zero <= big))
    u = x.double() / scale.double() + zero.double()
    assert u.min() >= -1e-5 and u.max() <= big + 1e-5  # the whole range is on the grid
    for i in range(50):
        ref = _brute_force_step(x[i].min().item(), x[i].max().item(), big)
        expect = 1.0 if ref == 0 else ref
        assert scale[i].item() == pytest.approx(expect, rel=1e-5)
    # a row never gets a coarser grid than the whole tensor (the all-zero row keeps scale 1)
    s_all, _ = covering_grid(x, bits)
    nonzero = x.abs().amax(1) > 0
    assert torch.all(scale[nonzero] <= s_all * (1 + 1e-6))


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(4, 5),
        torch.full((4, 5), 3.0),
        torch.full((4, 5), -2.0),
        torch.rand(4, 5) + 1.0,
        torch.randn(4, 5) * 1e-30,
        torch.tensor([[3e38, -3e38, 1.0]]),
        torch.tensor([[1e-41, -1e-41]]),
    ],
)
def test_covering_grid_edge_inputs_finite_and_zero_exact(x):
    for keep in (None, 0, 1):
        scale, zero = covering_grid(x, 4, keep_dim=keep)
        assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
        assert torch.all(torch.isfinite(torch.reciprocal(scale)))
        y = sr_quantize(x, scale, zero, 4, seed=5, dequant=True)
        assert torch.all(torch.isfinite(y))
        assert torch.all(y[x == 0] == 0)


def test_covering_grid_from_range_one_sided():
    scale, zero = covering_grid_from_range(torch.tensor([0.0, -3.0, -1.0]), torch.tensor([6.0, 0.0, 0.0]), 2)
    assert zero.tolist() == [0.0, 3.0, 3.0]
    assert scale.tolist() == pytest.approx([2.0, 1.0, 1 / 3])
    with pytest.raises(ValueError, match="bits=1"):
        covering_grid(torch.ones(2, 2), 1)


def test_sr_quantize_codes_match_fused_dequant_and_reference():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 40, generator=g)
    scale, zero = covering_grid(x, 3, keep_dim=0)
    codes = sr_quantize(x, scale, zero, 3, seed=11)
    assert torch.all(codes == torch.round(codes)) and codes.min() >= 0 and codes.max() <= 7
    assert torch.equal(dequantize(codes, scale, zero), sr_quantize(x, scale, zero, 3, seed=11, dequant=True))
    # reference: the spec's SR formula with the same noise
    u = x / scale + zero
    ref = stochastic_round(u, uniform_noise(x.shape, 11))
    assert (codes != ref).float().mean() < 1e-3  # only float rounding of u may differ
    assert (codes - ref).abs().max() <= 1


@pytest.mark.parametrize("keep", [None, 0, 1])
def test_sr_quantize_blocks_agree_with_whole_tensor_reference(keep):
    # 300 x 257 spans several CPU blocks; reference: the spec formula on the whole tensor
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 257, generator=g) * torch.exp(torch.randn(300, 1, generator=g))
    scale, zero = covering_grid(x, 4, keep_dim=keep)
    codes = sr_quantize(x, scale, zero, 4, seed=3)
    ref = stochastic_round((x * torch.reciprocal(scale) + zero).clamp(0, 15), uniform_noise(x.shape, 3))
    assert torch.equal(codes, ref)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_span_grid_is_the_rows_min_max(bits):
    # reference: the spec's per-row grid step (max - min) / B, code 0 at min, in float64
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(40, 33, generator=g) * torch.exp(torch.randn(40, 1, generator=g)) + 3 * torch.randn(40, 1)
    scale, zero, lo = span_grid(x, bits, keep_dim=0)
    xd = x.double()
    step = (xd.amax(1, keepdim=True) - xd.amin(1, keepdim=True)) / levels(bits)
    assert torch.allclose(scale.double(), step, rtol=1e-6) and torch.equal(lo, x.amin(1, keepdim=True))
    assert torch.all(zero == 0)
    codes = sr_quantize(x, scale, zero, bits, seed=2, lo=lo)
    assert codes.min() >= 0 and codes.max() <= levels(bits)
    assert torch.all(codes.amin(1) == 0)  # each row's min sits on code 0 exactly
    values = sr_quantize(x, scale, zero, bits, seed=2, dequant=True, lo=lo)
    assert torch.equal(values, codes * scale + lo)  # the fused dequantization: value = code * scale + lo
    assert torch.all((values - x).abs() <= scale * (1 + 1e-5))  # SR moves a value less than one step


def test_span_grid_edge_rows():
    # the span of a row must fit float32 (a row holding +-3e38 would overflow value = code * scale + lo)
    x = torch.tensor([[0.0, 0.0], [2.5, 2.5], [-7.0, -7.0], [1.5e38, -1.5e38], [1e30, 1e30], [1e-41, -1e-41]])
    scale, zero, lo = span_grid_from_range(x.amin(1, keepdim=True), x.amax(1, keepdim=True), 4)
    assert torch.all(torch.isfinite(scale)) and torch.all(scale > 0)
    assert torch.all(torch.isfinite(torch.reciprocal(scale)))
    assert scale[:3].flatten().tolist() == [1.0, 1.0, 1.0]  # constant rows: scale 1, codes 0, value lo
    y = sr_quantize(x, scale, zero, 4, seed=5, dequant=True, lo=lo)
    assert torch.all(torch.isfinite(y)) and torch.equal(y[:3], x[:3]) and torch.equal(y[4], x[4])


def test_minmax_grid_nearest_round_trip():
    # the lead's existing nearest-rounding grid: error <= step / 2 inside the range
    x = torch.linspace(-1.3, 2.1, 101).view(1, -1)
    scale, zero = minmax_grid(x, 8)
    q = dequantize(quantize_nearest(x, scale, zero, 8), scale, zero)
    assert torch.all((q - x).abs() <= scale / 2 + 1e-6)
    assert dequantize(quantize_nearest(torch.zeros(1, 1), scale, zero, 8), scale, zero).item() == 0.0


def _edge_ranges(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(lo, hi) pairs of shape (rows, 1) and (1, cols): random scales, zeros, one-sided, constant, tiny,
    subnormal and near-limit ranges."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(1, 1), (64, 1), (1, 300), (7, 1)]:
        a = torch.randn(shape, generator=g) * torch.exp(8 * torch.randn(shape, generator=g))
        b = torch.randn(shape, generator=g) * torch.exp(8 * torch.randn(shape, generator=g))
        lo, hi = torch.minimum(a, b), torch.maximum(a, b)
        out += [(lo, hi), (lo.abs(), hi.abs() + lo.abs()), (-hi.abs() - lo.abs(), -lo.abs()), (lo, lo),
                (torch.zeros(shape), torch.zeros(shape)), (lo * 1e-38, hi * 1e-38), (lo * 1e-44, hi * 1e-44),
                (torch.full(shape, -3.0e38), torch.full(shape, 3.0e38)), (lo.clamp(-1.7e38, 0) * 1e30, hi * 1e30)]
    return out


@pytest.mark.parametrize("kind", ["minmax", "covering", "span"])
def test_fast_range_grids_equal_the_torch_form(kind, monkeypatch):
    """The fast forms of the grids from ranges (grid_small's numpy form for minmax and span, kernels.c's
    covering_grid) vs grid.py's torch form (forced: no size fits grid_small, no C library): the same scales,
    zero points and offsets, and the same error where one raises."""
    from fqtrun.quant import grid_small
    from fqtrun.quant.native import library

    fn = {"minmax": grid.minmax_grid_from_range, "covering": grid.covering_grid_from_range,
          "span": grid.span_grid_from_range}[kind]

    def run(lo, hi, bits):
        try:
            return [t.clone() for t in fn(lo, hi, bits)]
        except NonFiniteError as err:
            return str(err)

    if kind == "covering" and library.load() is None:
        pytest.skip("no C compiler: the torch form is the only form")
    cases = 0
    for seed in range(3):
        for lo, hi in _edge_ranges(seed):
            for bits in (2, 4, 8, 16):
                fast = run(lo, hi, bits)
                with monkeypatch.context() as m:
                    m.setattr(grid_small, "MAX_ELEMENTS", -1)
                    m.setattr(library, "load", lambda: None)
                    slow = run(lo, hi, bits)
                if isinstance(slow, str):
                    assert fast == slow
                else:
                    # equal values (NaN where the torch form gives NaN: a subnormal span's zero point); a zero
                    # point of 0 may carry either sign (torch's own paths differ in it)
                    assert all(a.dtype == b.dtype and a.shape == b.shape
                               and bool(((a == b) | (a.isnan() & b.isnan())).all())
                               for a, b in zip(fast, slow)), (kind, bits, lo.flatten()[:3], hi.flatten()[:3])
                cases += 1
    assert cases == 3 * 36 * 4
