"""Integer-exact BN + requantization (spec/denoise_bn.md part B): the derivation (fqtrun.intbn.derive) and
the two ops (fqtrun.intbn.requant) against exact-rational references and brute-force enumeration."""

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from fqtrun.intbn.derive import (
    LayerFixedPoint,
    bn_affine,
    derive_layer,
    naive_fixed_point,
    optimal_fixed_point,
    verify,
)
from fqtrun.intbn.requant import ExactBNRequant, IntegerBNRequant

INT32 = (-(2**31), 2**31 - 1)


def direct(x: int, a: Fraction, b: Fraction, L: int) -> int:
    """The obvious exact reference: clip(floor(a x + b), 0, L) in rationals."""
    return min(max(math.floor(a * x + b), 0), L)


def random_layer(rng: random.Random, C: int, k: int, neg_frac: float = 0.2) -> dict:
    """BN parameters in float32 for an int accumulator whose pre-BN std is 2^6..2^14 units.

    s_in = 2^U(-14, -8); gamma = U(0.3, 2), negative with prob neg_frac; beta ~ N(0, 1);
    running mean ~ N(0, 1) pre-BN stds; output step s_out = U(3, 8) / L (output range 3..8 BN units).
    """
    s_in = 2.0 ** rng.uniform(-14, -8)
    sig = [2.0 ** rng.uniform(6, 14) * s_in for _ in range(C)]
    def f32(v):
        return torch.tensor(v, dtype=torch.float32)

    return {
        "gamma": f32([rng.uniform(0.3, 2) * (-1 if rng.random() < neg_frac else 1) for _ in range(C)]),
        "beta": f32([rng.gauss(0, 1) for _ in range(C)]),
        "mean": f32([rng.gauss(0, 1) * s for s in sig]),
        "var": f32([s * s for s in sig]),
        "eps": 1e-5 * s_in**2,
        "s_in": s_in,
        "s_out": rng.uniform(3, 8) / (2**k - 1),
    }


def convert(p: dict, k: int) -> tuple[IntegerBNRequant, LayerFixedPoint, list, list]:
    """The integer op of a layer's BN parameters at k output bits, exact over int32; (op, (A, B, T), a, b)."""
    a_list, b_list = bn_affine(**p)
    fp = derive_layer(a_list, b_list, k, INT32)
    return IntegerBNRequant(fp.A, fp.B, fp.T, 2**k - 1), fp, a_list, b_list


def probe_points(a: Fraction, b: Fraction, L: int, margin: int = 3) -> list[int]:
    """Every threshold +- margin, both saturated tails of int32, and 0."""
    pts = set(range(INT32[0], INT32[0] + margin)) | set(range(INT32[1] - margin, INT32[1] + 1)) | {0}
    if a != 0:
        for j in range(1, L + 1):
            c = math.floor((j - b) / a)
            pts.update(range(c - margin, c + margin + 1))
    return sorted(p for p in pts if INT32[0] <= p <= INT32[1])


def check_module_exact(module: IntegerBNRequant, a_list, b_list, L: int) -> int:
    """Module output == direct reference at every probe point of every channel; returns points checked."""
    n = 0
    for c, (a, b) in enumerate(zip(a_list, b_list)):
        pts = probe_points(a, b, L)
        x = torch.zeros(len(pts), len(a_list), dtype=torch.int64)
        x[:, c] = torch.tensor(pts)
        got = module(x)[:, c].tolist()
        want = [direct(p, a, b, L) for p in pts]
        assert got == want, f"channel {c}: first mismatch at x={pts[[g != w for g, w in zip(got, want)].index(True)]}"
        assert ExactBNRequant([a], [b], L)(torch.tensor(pts)[:, None])[:, 0].tolist() == want
        n += len(pts)
    return n


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_random_layers_bit_exact(k):
    rng = random.Random(100 + k)
    L = 2**k - 1
    signs = set()
    for _ in range(6):
        module, fp, a_list, b_list = convert(random_layer(rng, C=4, k=k, neg_frac=0.5), k)  # exact over int32
        assert check_module_exact(module, a_list, b_list, L) > 0
        for c, (a, b) in enumerate(zip(a_list, b_list)):
            assert verify(fp.A[c], fp.B[c], fp.T[c], a, b, L, INT32)
            A, B, T = optimal_fixed_point(a, b, L, INT32)  # one channel alone: the same (A, B, T)
            assert (A, B, T) == (fp.A[c], fp.B[c], fp.T[c])
            assert check_module_exact(IntegerBNRequant([A], [B], [T], L), [a], [b], L) > 0
            assert (A < 0) == (a < 0)
            signs.add(a > 0)
    assert signs == {True, False}  # gamma < 0 (a < 0) is exercised


@pytest.mark.parametrize("k", [1, 4])
def test_ties_at_one_half(k):
    """Dyadic parameters put a x + b0 exactly on .5 for many x; nearest rounds those up."""
    L = 2**k - 1
    p = {"gamma": [0.5, -0.75, 1.5], "beta": [0.0, 0.25, -1.0], "mean": [0.0, 0.5, 2.0],
         "var": [0.75, 0.75, 3.75], "eps": 0.25, "s_in": 2.0**-4, "s_out": 2.0**-3}  # sigma = 1, 1, 2 exactly
    a_list, b_list = bn_affine(**p)
    ties = 0
    for a, b in zip(a_list, b_list):
        for x in range(-200, 201):
            v = a * x + b - Fraction(1, 2)
            ties += v.denominator == 2 and 0 < v < L
    assert ties >= L  # channel 0 alone (a = 1/4, b0 = 0) ties once per level at x = 4m + 2
    module, _, _, _ = convert(p, k)
    check_module_exact(module, a_list, b_list, L)
    xs = torch.arange(-200, 201).repeat(3, 1).T.contiguous()
    want = torch.tensor([[direct(int(x), a, b, L) for a, b in zip(a_list, b_list)] for x in xs[:, 0]])
    assert torch.equal(module(xs), want)


def test_zero_gamma_is_constant():
    p = {"gamma": [0.0, 0.0, 0.0], "beta": [0.3, -2.0, 100.0], "mean": [1.0, 1.0, 1.0],
         "var": [1.0, 1.0, 1.0], "eps": 1e-5, "s_in": 1e-3, "s_out": 0.1}
    a_list, b_list = bn_affine(**p)
    assert all(a == 0 for a in a_list)
    module, fp, _, _ = convert(p, 4)
    assert fp.T == [0, 0, 0]
    check_module_exact(module, a_list, b_list, 15)
    out = module(torch.tensor([[INT32[0]] * 3, [0] * 3, [INT32[1]] * 3]))
    assert out.tolist() == [[3, 0, 15]] * 3  # floor(0.3 / 0.1 + .5) = 3 (0.3/0.1 < 3 in floats), clipped, clipped
    for a, b in zip(a_list, b_list):
        A, B, T = naive_fixed_point(a, b, 15, INT32)
        assert verify(A, B, T, a, b, 15, INT32)


def test_verify_agrees_with_enumeration():
    rng = random.Random(7)
    lo, hi = -300, 300
    xs = range(lo, hi + 1)
    outcomes = set()
    for _ in range(60):
        L = rng.choice([1, 3, 15])
        a = Fraction(rng.uniform(-0.5, 0.5)).limit_denominator(10**6)
        b = Fraction(rng.uniform(-10, 20)).limit_denominator(10**6)
        A, B, T = optimal_fixed_point(a, b, L, (lo, hi))
        for dA, dB in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (0, 1 << max(T - 2, 0))]:
            cand = (A + dA, B + dB, T)
            enum = all(min(max((cand[0] * x + cand[1]) >> T, 0), L) == direct(x, a, b, L) for x in xs)
            assert verify(*cand, a, b, L, (lo, hi)) == enum
            outcomes.add(enum)
    assert outcomes == {True, False}


def test_shift_is_minimal_by_brute_force():
    """At T - 1 no (A, B) is exact: brute force over every A, B that could be (bounds in the comments)."""
    rng = random.Random(11)
    lo, hi, L = -40, 40, 3
    xs = np.arange(lo, hi + 1)
    checked = 0
    while checked < 12:
        a = Fraction(rng.uniform(0.04, 0.3)).limit_denominator(10**5)
        b = Fraction(rng.uniform(-1, 4)).limit_denominator(10**5)
        t = [math.ceil((j - b) / a) for j in range(1, L + 1)]
        if not (lo < t[0] and t[-1] <= hi and t[1] - t[0] >= 2):
            continue  # need every threshold inside and a flat unclipped step at level 1
        A, B, T = optimal_fixed_point(a, b, L, (lo, hi))
        assert optimal_fixed_point(a, b, L, INT32)[2] == T  # all thresholds inside: the same problem as int32
        want = np.array([direct(int(x), a, b, L) for x in xs])
        assert np.array_equal(np.clip((A * xs + B) >> T, 0, L), want)
        if T == 0:
            continue
        Tm = T - 1
        x1 = t[0]  # y(x1) = y(x1 + 1) = 1 unclipped: 2^Tm <= A x + B < 2^(Tm+1) at both, so 1 <= A < 2^Tm
        As = np.arange(1, 1 << Tm)[:, None, None]
        offs = np.arange(1 << Tm)[None, :, None]  # B = 2^Tm - A x1 + off, off < 2^Tm
        Bs = (1 << Tm) - As * x1 + offs
        ys = np.clip((As * xs[None, None, :] + Bs) >> Tm, 0, L)
        assert not (ys == want).all(-1).any(), f"shift {Tm} works for a={a}, b={b}"
        checked += 1


def test_ours_never_worse_than_naive_over_90_layers():
    rng = random.Random(2024)
    per_layer, per_channel = [], []
    for i in range(90):
        k = (2, 4, 8)[i % 3]
        _, fp, _, _ = convert(random_layer(rng, C=4, k=k), k)
        assert None not in fp.T_naive
        assert all(o <= n for o, n in zip(fp.T, fp.T_naive))
        per_layer.append((max(fp.T), max(fp.T_naive)))
        per_channel += list(zip(fp.T, fp.T_naive))
    ours, naive = zip(*per_layer)
    co, cn = zip(*per_channel)
    print(f"\n90 layers (k=2,4,8; int32 accumulator), layer shift = max over 4 channels: "
          f"ours {sum(ours) / 90:.1f} (max {max(ours)}) vs naive {sum(naive) / 90:.1f} (max {max(naive)}); "
          f"per channel: ours {sum(co) / len(co):.1f} vs naive {sum(cn) / len(cn):.1f}")
    assert sum(ours) < sum(naive)


def test_exact_reference_matches_direct():
    """ExactBNRequant (thresholds counted, mirrored for a < 0, constant for a == 0) is floor(a x + b) clipped."""
    rng = random.Random(3)
    xs = list(range(-60, 61))
    a_list = [Fraction(rng.uniform(-2, 2)).limit_denominator(1000) * rng.choice([1, 0]) for _ in range(20)]
    b_list = [Fraction(rng.uniform(-5, 20)) for _ in range(20)]
    assert {a > 0 for a in a_list} | {a < 0 for a in a_list} == {True, False} and 0 in a_list
    y = ExactBNRequant(a_list, b_list, 15)(torch.tensor(xs)[:, None].repeat(1, 20))
    assert y.tolist() == [[direct(x, a, b, 15) for a, b in zip(a_list, b_list)] for x in xs]


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="eps"):
        bn_affine([1.0], [0.0], [0.0], [0.0], 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="s_out"):
        bn_affine([1.0], [0.0], [0.0], [1.0], 1e-5, 1.0, 0.0)
    with pytest.raises(ValueError, match="per channel"):
        bn_affine([1.0, 2.0], [0.0, 0.0, 0.0], [0.0], [1.0], 1e-5, 1.0, 1.0)
    a_list, b_list = bn_affine([1.0], [0.0], [0.0], [1.0], 1e-5, 1.0, 1.0)
    with pytest.raises(ValueError, match="bits=0 is out of range"):
        derive_layer(a_list, b_list, 0, INT32)
    with pytest.raises(ValueError, match="bits=11 is too wide for integer BN"):
        derive_layer(a_list, b_list, 11, INT32)
    with pytest.raises(ValueError, match="does not fit a signed 32-bit accumulator"):
        derive_layer(a_list, b_list, 4, (0, 2**31))
    with pytest.raises(ValueError, match="max_shift"):
        optimal_fixed_point(Fraction(1, 3), Fraction(0), 255, INT32, max_shift=2)
    module = IntegerBNRequant([1, 2], [0, 0], [0, 0], 3)
    with pytest.raises(ValueError, match="int64"):
        module(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="overflows"):
        IntegerBNRequant([2**40], [0], [0], 3)(torch.tensor([[2**30]]))
