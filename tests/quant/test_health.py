"""Numerics health of one quantized tensor (fqtrun/quant/health.py) against hand-computed values.

Oracles: small tensors whose saturated and flushed elements and squared errors are counted by hand; the
closed-form SQNR of round-to-nearest on uniform data (signal 1/3, noise step^2 / 12) with a Monte Carlo
tolerance; the min-max grid's one clipping case worked out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch

from fqtrun.quant.health import STATS, describe, measure, severity, stats
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
    assert set(s) == set(STATS)
    assert s["sat"] == 2 / 8  # 2.0 and -3.0
    assert s["flush"] == 2 / 7  # 0.1 and -0.05 of the 7 nonzero inputs become 0
    signal = 0.01 + 0.0025 + 4 + 9 + 0.25 + 0.09 + 0.04
    noise = 0.01 + 0.0025 + 1 + 4 + 0 + 0.0025 + 0.0025
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)  # float32 inputs
    assert s["nonfinite"] == 0 and s["bits"] == 4


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
