"""Integer-exact BatchNorm + requantization: clip((A x + B) >> T, 0, L) == clip(floor(a x + b), 0, L).

spec/denoise_bn.md part B (Lin et al., arXiv 2008.13128). x is the integer accumulator of one channel,
L = 2^k - 1, a = gamma s_in / (sigma s_out), b = (beta - gamma mu / sigma) / s_out + 1/2 (round to
nearest, half up). All arithmetic is exact (fractions.Fraction of the float parameters, Python ints);
the one inexact step is sigma = sqrt(var + eps), taken as the float64 square root.

Exactness conditions (a > 0): y >= j iff x >= t_j = ceil((j - b) / a). With A >= 0 the integer form
matches iff A t_j + B >= j 2^T and A (t_j - 1) + B <= j 2^T - 1 for every j. Over an accumulator range
[lo, hi] a threshold outside the range keeps only its in-range side (t_j <= lo: the first; t_j > hi: the
second, at x = hi). Eliminating B pairs a lower constraint (u, j) with an upper one (v, k):
A (u - v) >= (j - k) 2^T + 1, an integer interval for A. A solution at T gives (2A, 2B) at T + 1, so
feasibility is monotone in T and the smallest T is found by bisection.
a < 0 is solved mirrored (x -> -x) and returned with A < 0: the same op clip((A x + B) >> T, 0, L)
applies to the unnegated accumulator (>> is an arithmetic, flooring shift). a == 0: A = 0, T = 0,
B = the constant output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from fqtrun.quant.bits import check_bits

Range = tuple[int, int]
_HALF = Fraction(1, 2)
MAX_BITS = 10  # the exact search is O(L^2) in pairs of the L = 2^bits - 1 thresholds: at most 10 output bits
MAX_LEVELS = (1 << MAX_BITS) - 1
NAIVE_MAX_SHIFT = 62  # last shift the naive baseline tries: round(a 2^T) still fits int64 for |a| < 2


def check_output_bits(bits: object, setting: str) -> int:
    """`bits` as a forward bit-width (fqtrun.quant.bits) that integer BN can also convert (<= MAX_BITS)."""
    check_bits(bits, setting, "forward")
    if bits > MAX_BITS:
        raise ValueError(f"{setting}={bits} is too wide for integer BN: use 1..{MAX_BITS} output bits (the exact "
                         f"(A, B, T) search pairs all 2^bits - 1 thresholds)")
    return bits


def _round_half_up(v: Fraction) -> int:
    return math.floor(v + _HALF)


def _clip(v: int, L: int) -> int:
    return min(max(v, 0), L)


def _check_L(L: int) -> None:
    if not (isinstance(L, int) and 1 <= L <= MAX_LEVELS):
        raise ValueError(f"L={L!r} must be an int in 1..{MAX_LEVELS} (L = 2^k - 1 for k = 1..{MAX_BITS} output bits)")


def _check_range(x_range: Range) -> Range:
    lo, hi = (int(v) for v in x_range)
    if lo > hi:
        raise ValueError(f"x_range={x_range} must be (lo, hi) with lo <= hi (inclusive accumulator range)")
    return lo, hi


def _channels(v, C: int, name: str) -> list[Fraction]:
    """Exact per-channel values of a scalar or a length-C sequence/tensor of floats."""
    flat = torch.as_tensor(v, dtype=torch.float64).reshape(-1).tolist()  # float32 -> float64 is exact
    if len(flat) == 1:
        flat = flat * C
    if len(flat) != C:
        raise ValueError(f"{name} has {len(flat)} values; give one per channel ({C}) or a scalar")
    return [Fraction(f) for f in flat]


def bn_affine(gamma, beta, mean, var, eps, s_in, s_out, zero_out: int = 0) -> tuple[list[Fraction], list[Fraction]]:
    """Per-channel exact (a, b) of BN followed by requantization to step s_out (spec B).

    zero_out: the integer zero point of the output grid (code = round(y / s_out) + zero_out), added to b.
    """
    g = torch.as_tensor(gamma).reshape(-1)
    C = g.numel()
    named = {"gamma": gamma, "beta": beta, "mean": mean, "var": var, "eps": eps, "s_in": s_in, "s_out": s_out}
    cols = {n: _channels(v, C, n) for n, v in named.items()}
    a_list, b_list = [], []
    for c in range(C):
        gc, bc, mc, vc, ec, si, so = (cols[n][c] for n in cols)
        if si <= 0 or so <= 0:
            raise ValueError(f"s_in={float(si)} and s_out={float(so)} must be > 0 (quantization steps)")
        if vc + ec <= 0:
            raise ValueError(f"var + eps = {float(vc + ec)} at channel {c} must be > 0; raise eps")
        sigma = Fraction(math.sqrt(float(vc + ec)))
        a_list.append(gc * si / (sigma * so))
        b_list.append((bc - gc * mc / sigma) / so + _HALF + int(zero_out))
    return a_list, b_list


def thresholds(a: Fraction, b: Fraction, L: int) -> list[int]:
    """t_j = ceil((j - b) / a), j = 1..L, for a > 0: y(x) >= j iff x >= t_j."""
    if a <= 0:
        raise ValueError(f"a={a} must be > 0 here; mirror x -> -x for a < 0")
    a, b = Fraction(a), Fraction(b)
    # (j - b) / a = (j bd - bn) ad / (bd an) with integers: ceil by integer division (Fractions are slow)
    num0, step, den = -b.numerator * a.denominator, b.denominator * a.denominator, b.denominator * a.numerator
    return [-((-(num0 + j * step)) // den) for j in range(1, L + 1)]


def threshold_rows(a_list: list[Fraction], b_list: list[Fraction], L: int) -> tuple[list[list[int]], list[int]]:
    """Per channel the L thresholds of y = #{j : t_j <= sign x} and the sign (-1 for a < 0: mirrored).

    a == 0 gives the constant clip(floor(b), 0, L): thresholds far below (always counted) or far above.
    """
    _check_L(L)
    far = 1 << 62  # beyond any accumulator: thresholds below always count, above never
    rows, signs = [], []
    for a, b in zip(a_list, b_list):
        a, b = Fraction(a), Fraction(b)
        if a == 0:
            k = _clip(math.floor(b), L)
            t = [-far] * k + [far] * (L - k)
        else:
            t = [min(max(tj, -far), far) for tj in thresholds(abs(a), b, L)]
        rows.append(t)
        signs.append(-1 if a < 0 else 1)
    return rows, signs


def _pair_arrays(lower: list[tuple[int, int]], upper: list[tuple[int, int]]):
    """(u - v, j - k) over all (lower, upper) pairs, int64 where it cannot overflow."""
    big = max([abs(p[0]) for p in lower + upper] + [0])
    dtype = np.int64 if big < 2**61 else object
    u = np.array([p[0] for p in lower], dtype=dtype)
    j = np.array([p[1] for p in lower], dtype=np.int64)
    v = np.array([p[0] for p in upper], dtype=dtype)
    k = np.array([p[1] for p in upper], dtype=np.int64)
    return (u[:, None] - v[None, :]).ravel(), (j[:, None] - k[None, :]).ravel()


def optimal_fixed_point(a: Fraction, b: Fraction, L: int, x_range: Range, max_shift: int = 40) -> tuple[int, int, int]:
    """(A, B, T) with the smallest shift T <= max_shift exact for every integer x in x_range.

    Within the feasible intervals at that T, A and B are the integers nearest a 2^T and b 2^T.
    """
    _check_L(L)
    a, b = Fraction(a), Fraction(b)
    lo, hi = _check_range(x_range)
    if a == 0:
        return 0, _clip(math.floor(b), L), 0
    if a < 0:
        A, B, T = optimal_fixed_point(-a, b, L, (-hi, -lo), max_shift)
        return -A, B, T
    t = [min(max(tj, lo), hi + 1) for tj in thresholds(a, b, L)]
    lower = [(tj, j) for j, tj in enumerate(t, 1) if tj <= hi]  # A t_j + B >= j 2^T
    upper = [(tj - 1, j) for j, tj in enumerate(t, 1) if tj - 1 >= lo]  # A (t_j - 1) + B <= j 2^T - 1
    D, dj = _pair_arrays(lower, upper)
    if (L << max_shift) >= 2**62:  # (j - k) 2^T + 1 would overflow int64
        D, dj = D.astype(object), dj.astype(object)
    if ((D == 0) & (dj >= 0)).any():
        raise ValueError(f"no exact fixed point exists for a={a}, b={b}")  # impossible for monotone t
    pos, neg = (D > 0) & (dj >= 0), D < 0  # D > 0 with j < k only gives A >= (negative)
    Dp, djp, Dn, djn = D[pos], dj[pos], D[neg], dj[neg]

    def a_interval(T: int) -> tuple[int, int | None]:
        p = 1 << T
        a_lo = max(0, int((-(-(djp * p + 1) // Dp)).max())) if Dp.size else 0  # ceil(N / D)
        a_hi = int(((djn * p + 1) // Dn).min()) if Dn.size else None  # floor(N / D), D < 0
        return a_lo, a_hi

    def feasible(T: int) -> bool:
        a_lo, a_hi = a_interval(T)
        return a_hi is None or a_lo <= a_hi

    if not feasible(max_shift):
        raise ValueError(f"no exact fixed point with shift <= max_shift={max_shift}; raise max_shift")
    lo_T, hi_T = -1, max_shift  # infeasible at lo_T (or below 0), feasible at hi_T
    while hi_T - lo_T > 1:
        mid = (lo_T + hi_T) // 2
        lo_T, hi_T = (lo_T, mid) if feasible(mid) else (mid, hi_T)
    T = hi_T
    p = 1 << T
    a_lo, a_hi = a_interval(T)
    A = max(a_lo, _round_half_up(a * p))
    A = A if a_hi is None else min(A, a_hi)
    b_lo = max((j * p - A * u for u, j in lower), default=None)
    b_hi = min((k * p - 1 - A * v for v, k in upper), default=None)
    assert b_lo is None or b_hi is None or b_lo <= b_hi, "A-interval elimination is inconsistent"
    B = _round_half_up(b * p)
    B = B if b_lo is None else max(B, b_lo)
    B = B if b_hi is None else min(B, b_hi)
    return A, B, T


def naive_fixed_point(a: Fraction, b: Fraction, L: int, x_range: Range, min_shift: int = 0) -> tuple[int, int, int]:
    """Baseline A = round(a 2^T), B = round(b 2^T) with the smallest T <= NAIVE_MAX_SHIFT exact over x_range
    (T searched upward).

    min_shift: start of the search; the optimal shift over the same range is a valid start (nothing is
    exact below it), which derive_layer uses.
    """
    _check_L(L)
    for T in range(min_shift, NAIVE_MAX_SHIFT + 1):
        A, B = _round_half_up(Fraction(a) * (1 << T)), _round_half_up(Fraction(b) * (1 << T))
        if verify(A, B, T, a, b, L, x_range):
            return A, B, T
    raise ValueError(f"naive rounding is not exact for any shift <= {NAIVE_MAX_SHIFT}")


def verify(A: int, B: int, T: int, a: Fraction, b: Fraction, L: int, x_range: Range) -> bool:
    """Bit-exactness of clip((A x + B) >> T) against clip(floor(a x + b)) for EVERY integer x in x_range.

    Both sides are step functions of x that change only where floor crosses a level j in 1..L; checking
    lo and both integers around every crossing of either side covers each constant piece of the range.
    """
    lo, hi = _check_range(x_range)
    a, b = Fraction(a), Fraction(b)
    den = a.denominator * b.denominator  # a x + b = (an x + bn) / den with integers
    an, bn = a.numerator * b.denominator, b.numerator * a.denominator
    points = {lo, hi}
    for j in range(1, L + 1):
        if an:
            c = (j * den - bn) // an
            points.update((c, c + 1))
        if A:
            c = ((j << T) - B) // A
            points.update((c, c + 1))
    return all(
        _clip((an * x + bn) // den, L) == _clip((A * x + B) >> T, L) for x in points if lo <= x <= hi
    )


@dataclass
class LayerFixedPoint:
    """(A, B, T) per channel of one layer and the shift naive rounding needs (None: never exact)."""

    A: list[int]
    B: list[int]
    T: list[int]
    T_naive: list[int | None]


def derive_layer(a_list: list[Fraction], b_list: list[Fraction], bits: int, x_range: Range, acc_bits: int = 32,
                 max_shift: int = 40) -> LayerFixedPoint:
    """Optimal (A, B, T) per channel for `bits` output bits, exact over x_range (inside the acc_bits range).

    The naive shift of each channel is searched from its optimal one (nothing is exact below it).
    """
    check_output_bits(bits, "bits")
    if not (isinstance(acc_bits, int) and 2 <= acc_bits <= 48):
        raise ValueError(f"acc_bits={acc_bits!r} must be an int in 2..48 (signed accumulator width)")
    L = (1 << bits) - 1
    x_range = _check_range(x_range)
    if x_range[0] < -(1 << (acc_bits - 1)) or x_range[1] >= 1 << (acc_bits - 1):
        raise ValueError(f"x_range={x_range} does not fit a signed {acc_bits}-bit accumulator: raise acc_bits")
    params = [optimal_fixed_point(a, b, L, x_range, max_shift) for a, b in zip(a_list, b_list)]
    naive = []
    for a, b, (_, _, t_opt) in zip(a_list, b_list, params):
        try:
            naive.append(naive_fixed_point(a, b, L, x_range, min_shift=t_opt)[2])
        except ValueError:
            naive.append(None)
    A, B, T = (list(col) for col in zip(*params))
    return LayerFixedPoint(A, B, T, naive)
