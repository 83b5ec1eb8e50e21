"""Numerics health of one quantized tensor (fqtrun/quant/health.py) against hand-computed values.

Oracles: small tensors whose saturated and flushed elements and squared errors are counted by hand; the
closed-form SQNR of round-to-nearest on uniform data (signal 1/3, noise step^2 / 12) with a Monte Carlo
tolerance; the min-max grid's one clipping case worked out by hand. The outlier measures (crest = max/RMS,
Pearson kurtosis, mean block crest): closed forms (+-1 entries, one spike among zeros, Gaussian samples)
and a slow loop over the format's blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from fqtrun.quant.formats import FORMATS
from fqtrun.quant.formats.quantizer import FormatQuantizer
from fqtrun.quant.health import OUTLIERS, STATS, describe, measure, severity, stats
from fqtrun.quant.quantizers import MinMaxQuantizer


class Clip:
    """A format with a largest code: steps of 0.25, clipped to [-1, 1]."""

    bits = 4

    def __call__(self, x):
        return torch.round(x.clamp(-1, 1) / 0.25) * 0.25

    def saturated(self, x):
        return x.abs() > 1


def test_known_saturation_flush_and_sqnr():
    x = torch.tensor([[0.1, -0.05, 2.0, -3.0], [0.5, 0.0, 0.3, -0.2]])
    q = Clip()
    x_hat = q(x)  # 0, 0, 1, -1 / 0.5, 0, 0.25, -0.25
    s = stats(measure(x, x_hat, q), q.bits)
    assert set(s) == {*STATS, "crest", "kurtosis"}  # no scale blocks: no crest_block
    assert s["sat"] == 2 / 8  # 2.0 and -3.0
    assert s["flush"] == 2 / 7  # 0.1 and -0.05 of the 7 nonzero inputs become 0
    signal = 0.01 + 0.0025 + 4 + 9 + 0.25 + 0.09 + 0.04
    noise = 0.01 + 0.0025 + 1 + 4 + 0 + 0.0025 + 0.0025
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)  # float32 inputs
    assert s["nonfinite"] == 0 and s["bits"] == 4
    assert s["crest"] == pytest.approx(3 / math.sqrt(signal / 8), rel=1e-6)


def test_min_max_grid_by_hand():
    """2 bits on [-1, 2]: scale 1, zero 1; 0.2 -> 0 (flushed), 0.9 -> 1; nothing clipped."""
    x = torch.tensor([-1.0, 0.0, 0.2, 0.9, 2.0])
    q = MinMaxQuantizer(2)
    s = stats(measure(x, q(x), q), 2)
    assert (s["sat"], s["flush"]) == (0.0, 1 / 4)
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(5.85 / 0.05), rel=1e-6)


def test_min_max_grid_clips_when_the_zero_point_rounds_up():
    """2 bits on [-1.5, 1.5]: scale 1, zero round(1.5) = 2; 1.5 -> code round(1.5) + 2 = 4 > 3: clipped"""
    x = torch.tensor([-1.5, 0.0, 1.5])
    q = MinMaxQuantizer(2)
    assert q.saturated(x).tolist() == [False, False, True]
    assert q(x)[2] == 1.0
    assert stats(measure(x, q(x), q), 2)["sat"] == 1 / 3


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_saturated_equals_the_elementwise_clamp_check(granularity, bits):
    """Slow obvious reference: the unclamped code of every element on the quantizer's own grid. Half-integer
    data makes rounding ties, where the zero point's rounding clips."""
    gen = torch.Generator().manual_seed(bits)
    q = MinMaxQuantizer(bits, granularity)
    clipped = 0
    for _ in range(200):
        x = torch.randint(-6, 7, (4, 5), generator=gen).float() / 2
        scale, zero = q.grid_of(x)
        u = torch.round(x / scale) + zero
        want = (u < 0) | (u > (1 << bits) - 1)
        assert torch.equal(q.saturated(x), want)
        clipped += int(want.any())
    assert clipped > 0  # the cases that clip were met


@pytest.mark.parametrize("bits", [4, 8])
def test_sqnr_of_round_to_nearest_on_uniform_data(bits):
    """x ~ U[-1, 1] (ends included, so the min-max grid spans exactly [-1, 1] with step 2 / B and
    zero on the grid's middle), nearest rounding: SQNR = 10 log10((1/3) / (step^2 / 12)) within 0.05 dB."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(200_000, generator=gen, dtype=torch.float64).float() * 2 - 1
    x[0], x[1] = -1.0, 1.0
    q = MinMaxQuantizer(bits)
    step = 2 / ((1 << bits) - 1)
    closed = 10 * math.log10((1 / 3) / (step**2 / 12))
    assert stats(measure(x, q(x), q), bits)["sqnr_db"] == pytest.approx(closed, abs=0.05)


def test_non_finite_input_is_counted_and_the_rest_is_nan():
    x = torch.tensor([1.0, float("nan"), float("inf"), 0.0])
    s = stats(measure(x, None), 8)
    assert s["nonfinite"] == 2
    assert math.isnan(s["sqnr_db"]) and math.isnan(s["flush"]) and math.isnan(s["sat"])


def test_exact_and_all_zero_tensors():
    x = torch.tensor([0.0, 1.0, -2.0])
    assert stats(measure(x, x.clone()), 8)["sqnr_db"] == math.inf  # no quantizer: nothing saturated
    zero = stats(measure(torch.zeros(3), torch.zeros(3)), 8)
    assert math.isnan(zero["sqnr_db"]) and zero["flush"] == 0.0 and zero["sat"] == 0.0


def test_worst_first():
    nan = math.nan
    rows = [{"layer": "a", "slot": "w", "bits": 8, "sat": 0.0, "flush": 0.1, "sqnr_db": 40.0, "nonfinite": 0},
            {"layer": "b", "slot": "dx", "bits": 4, "sat": 0.0, "flush": 0.5, "sqnr_db": 12.0,
             "nonfinite": 0},
            {"layer": "c", "slot": "a", "bits": 8, "sat": nan, "flush": nan, "sqnr_db": nan, "nonfinite": 3},
            {"layer": "d", "slot": "dw", "bits": 4, "sat": 0.0, "flush": 0.0, "sqnr_db": nan, "nonfinite": 0}]
    assert [r["layer"] for r in sorted(rows, key=severity)] == ["c", "b", "a", "d"]
    assert describe(rows[1]) == "b/dx at 4 bits: SQNR 12.0 dB, 50.0% flushed, 0.0% saturated"


# ----- outlier measures ---------------------------------------------------------------------------
def outliers_of(x, q=None, source=None) -> dict:
    """The OUTLIERS figures the health stats of x hold (quantized by q when given, else exactly)."""
    x_hat = x.clone() if q is None else q(x)
    return {k: v for k, v in stats(measure(x, x_hat, q, source), 4).items() if k in OUTLIERS}


def test_plus_minus_one_entries_have_crest_one_and_kurtosis_one():
    """Every |x| = 1 and mean 0: max/RMS = 1, E[x^4] / E[x^2]^2 = 1 (excess -2)."""
    x = torch.tensor([1.0, -1.0] * 32).reshape(8, 8)
    assert outliers_of(x) == pytest.approx({"crest": 1.0, "kurtosis": 1.0})


@pytest.mark.parametrize("n", [2, 16, 1000])
def test_one_spike_among_zeros(n):
    """a at one of n places: RMS = a / sqrt(n), so crest sqrt(n); a Bernoulli(1/n) scaled, whose kurtosis
    is (1 - 3p + 3p^2) / (p (1 - p)) = (n^2 - 3n + 3) / (n - 1)."""
    x = torch.zeros(n)
    x[n // 3] = -7.5
    want = {"crest": math.sqrt(n), "kurtosis": (n * n - 3 * n + 3) / (n - 1)}
    assert outliers_of(x) == pytest.approx(want, rel=1e-6)  # float32 passes (eps 6e-8), float64 sums


def test_gaussian_samples_have_kurtosis_three():
    """n = 10^6 standard normal samples: the sample kurtosis has standard deviation sqrt(24 / n) = 0.005,
    so 3 within 0.03 (6 standard deviations); seeded, so the test is deterministic."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 1000, generator=gen) * 0.01 + 3.0  # the mean and the scale drop out
    assert outliers_of(x)["kurtosis"] == pytest.approx(3.0, abs=0.03)


def slow_block_crest(x: torch.Tensor, blocks) -> float:
    """The mean over the index sets in `blocks` (lists of (i, j)) of max|x| / RMS, all-zero sets left out."""
    crests = []
    for block in blocks:
        v = [float(x[i, j]) for i, j in block]
        ms = sum(t * t for t in v) / len(v)
        if ms > 0:
            crests.append(max(abs(t) for t in v) / math.sqrt(ms))
    return sum(crests) / len(crests)


def blocks_along(rows: int, cols: int, dim: int, k: int) -> list:
    """Index sets of k consecutive elements along dim (the last one shorter), for every line across it."""
    length, lines = (rows, cols) if dim == 0 else (cols, rows)
    out = []
    for line in range(lines):
        for start in range(0, length, k):
            idx = range(start, min(start + k, length))
            out.append([(i, line) if dim == 0 else (line, i) for i in idx])
    return out


@pytest.mark.parametrize("name,dim,opts", [("nvfp4", 1, {}), ("nvfp4", 0, {}), ("mxfp4", 1, {}),
                                           ("fp8_e4m3_row", 1, {}), ("nvfp4", 1, {"block_2d": True})])
def test_block_crest_against_a_loop_over_the_blocks(name, dim, opts):
    """Shape (37, 45): a partial last block along either dim (its RMS over its own elements), and an
    all-zero block, which is left out."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(37, 45, generator=gen) * torch.rand(37, 1, generator=gen) ** 4
    x[:16, :16] = 0  # a zero block (tile) in every layout
    q = FormatQuantizer(FORMATS[name].with_options(**opts), dim=dim)
    fmt = q.format
    if fmt.two_d:
        blocks = [[(i, j) for i in range(r, min(r + 16, 37)) for j in range(c, min(c + 16, 45))]
                  for r in range(0, 37, 16) for c in range(0, 45, 16)]
    else:
        blocks = blocks_along(37, 45, dim, fmt.block if fmt.scaling == "block" else max(37, 45))
    got = outliers_of(x, q)
    assert got["crest_block"] == pytest.approx(slow_block_crest(x, blocks), rel=1e-6)  # float32 passes
    assert set(got) == {"crest", "kurtosis", "crest_block"}  # no transform: nothing after one


def test_no_block_figure_for_a_tensor_scale_or_an_integer_grid():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    assert set(outliers_of(x, FormatQuantizer(FORMATS["fp8_e4m3"]))) == {"crest", "kurtosis"}
    assert set(outliers_of(x, MinMaxQuantizer(4))) == {"crest", "kurtosis"}


def test_after_the_transform_figures_come_from_the_quantizers_input():
    """source: the operand before the transform; x = what the quantizer met. The plain figures are the
    source's, the _rht ones x's; sat, flush and SQNR are of x."""
    gen = torch.Generator().manual_seed(2)
    source = torch.randn(32, 16, generator=gen)
    source[5, 3] = 40.0
    x = torch.randn(32, 16, generator=gen)
    q = FormatQuantizer(FORMATS["nvfp4"], dim=0)
    got = stats(measure(x, q(x), q, source), 4)
    alone, before = outliers_of(x, q), outliers_of(source, q)
    assert {k: got[k] for k in ("crest", "kurtosis", "crest_block")} == before
    assert {k: got[f"{k}_rht"] for k in alone} == alone
    plain = stats(measure(x, q(x), q), 4)
    assert {k: got[k] for k in STATS} == {k: plain[k] for k in STATS}


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_figures_do_not_depend_on_the_scale(scale):
    """Gradients can be tiny: x^4 of 1e-30 underflows float32 (and of 1e30 overflows it); the figures are
    taken on x / max|x|, so x * scale has x's figures (to float rounding)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(48, 32, generator=gen) ** 3
    q = FormatQuantizer(FORMATS["nvfp4"])
    assert outliers_of(x * scale, q) == pytest.approx(outliers_of(x, q), rel=1e-5)


def test_outliers_left_out_where_undefined_or_refused():
    assert outliers_of(torch.zeros(4, 16), FormatQuantizer(FORMATS["nvfp4"])) == {}  # 0 / 0 everywhere
    constant = outliers_of(torch.full((4, 16), 2.0))
    assert constant == {"crest": 1.0}  # a constant has no spread: no kurtosis
    refused = stats(measure(torch.tensor([1.0, float("nan")]), None), 8)
    assert not set(refused) & set(OUTLIERS)
