"""Integer-exact BatchNorm + requantization: clip((A x + B) >> T, 0, L) == clip(floor(a x + b), 0, L).

spec/denoise_bn.md part B (Lin et al., arXiv 2008.13128). x is the integer accumulator of one channel,
L = 2^k - 1, a = gamma s_in / (sigma s_out), b = (beta - gamma mu / sigma) / s_out (+ 1/2 for nearest,
i.e. round half up). All arithmetic is exact (fractions.Fraction of the float parameters, Python ints);
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
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import torch

Range = tuple[int, int]
_HALF = Fraction(1, 2)
MAX_LEVELS = 1023  # the exact search is O(L^2) in pairs of thresholds: at most 10 output bits


def _round_half_up(v: Fraction) -> int:
    return math.floor(v + _HALF)


def _clip(v: int, L: int) -> int:
    return min(max(v, 0), L)


def _check_L(L: int) -> None:
    if not (isinstance(L, int) and 1 <= L <= MAX_LEVELS):
        raise ValueError(f"L={L!r} must be an int in 1..{MAX_LEVELS} (L = 2^k - 1 for k = 1..10 output bits)")


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


def bn_affine(gamma, beta, mean, var, eps, s_in, s_out, nearest: bool = True,
              zero_out: int = 0) -> tuple[list[Fraction], list[Fraction]]:
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
        b_list.append((bc - gc * mc / sigma) / so + (_HALF if nearest else 0) + int(zero_out))
    return a_list, b_list


def thresholds(a: Fraction, b: Fraction, L: int) -> list[int]:
    """t_j = ceil((j - b) / a), j = 1..L, for a > 0: y(x) >= j iff x >= t_j."""
    if a <= 0:
        raise ValueError(f"a={a} must be > 0 here; mirror x -> -x for a < 0")
    a, b = Fraction(a), Fraction(b)
    # (j - b) / a = (j bd - bn) ad / (bd an) with integers: ceil by integer division (Fractions are slow)
    num0, step, den = -b.numerator * a.denominator, b.denominator * a.denominator, b.denominator * a.numerator
    return [-((-(num0 + j * step)) // den) for j in range(1, L + 1)]


def float_reference(x_int: torch.Tensor, a: Fraction, b: Fraction, L: int) -> torch.Tensor:
    """Exact y = clip(floor(a x + b), 0, L) for an int64 tensor of accumulators (any shape)."""
    x = torch.as_tensor(x_int)
    if x.dtype != torch.int64:
        raise ValueError(f"x_int must be an int64 tensor, got {x.dtype}")
    if a == 0:
        return torch.full_like(x, _clip(math.floor(b), L))
    if a < 0:
        return float_reference(-x, -a, b, L)
    t = thresholds(a, b, L)
    i64 = torch.iinfo(torch.int64)
    always = sum(tj <= i64.min for tj in t)  # reached by every int64 x
    inside = torch.tensor([tj for tj in t if i64.min < tj <= i64.max], dtype=torch.int64)
    return always + torch.searchsorted(inside, x, right=True)  # y = #{j : t_j <= x}


def _pair_arrays(lower: list[tuple[int, int]], upper: list[tuple[int, int]]):
    """(u - v, j - k) over all (lower, upper) pairs, int64 where it cannot overflow."""
    big = max([abs(p[0]) for p in lower + upper] + [0])
    dtype = np.int64 if big < 2**61 else object
    u = np.array([p[0] for p in lower], dtype=dtype)
    j = np.array([p[1] for p in lower], dtype=np.int64)
    v = np.array([p[0] for p in upper], dtype=dtype)
    k = np.array([p[1] for p in upper], dtype=np.int64)
    return (u[:, None] - v[None, :]).ravel(), (j[:, None] - k[None, :]).ravel()


def optimal_fixed_point(
    a: Fraction, b: Fraction, L: int, max_shift: int = 40, x_range: Range | None = None
) -> tuple[int, int, int]:
    """(A, B, T) with the smallest shift T exact for every integer x (or every x in x_range).

    Within the feasible intervals at that T, A and B are the integers nearest a 2^T and b 2^T.
    """
    _check_L(L)
    a, b = Fraction(a), Fraction(b)
    if a == 0:
        return 0, _clip(math.floor(b), L), 0
    if a < 0:
        mirrored = None if x_range is None else (-_check_range(x_range)[1], -_check_range(x_range)[0])
        A, B, T = optimal_fixed_point(-a, b, L, max_shift, mirrored)
        return -A, B, T
    lo, hi = (None, None) if x_range is None else _check_range(x_range)
    t = thresholds(a, b, L)
    if x_range is not None:
        t = [min(max(tj, lo), hi + 1) for tj in t]
    lower = [(tj, j) for j, tj in enumerate(t, 1) if hi is None or tj <= hi]  # A t_j + B >= j 2^T
    upper = [(tj - 1, j) for j, tj in enumerate(t, 1) if lo is None or tj - 1 >= lo]  # A(t_j-1)+B <= j2^T-1
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


def naive_fixed_point(
    a: Fraction, b: Fraction, L: int, x_range: Range, max_shift: int = 62, min_shift: int = 0
) -> tuple[int, int, int]:
    """Baseline A = round(a 2^T), B = round(b 2^T) with the smallest T exact over x_range (T searched upward).

    min_shift: start of the search; the optimal shift over the same range is a valid start (nothing is
    exact below it), which convert_bn_requant uses.
    """
    _check_L(L)
    for T in range(min_shift, max_shift + 1):
        A, B = _round_half_up(Fraction(a) * (1 << T)), _round_half_up(Fraction(b) * (1 << T))
        if verify(A, B, T, a, b, L, x_range):
            return A, B, T
    raise ValueError(f"naive rounding is not exact for any shift <= max_shift={max_shift}")


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


class IntegerBNRequant(torch.nn.Module):
    """clip((A x + B) >> T, 0, L) per channel on int64 accumulators of shape (N, C, ...)."""

    def __init__(self, A: Sequence[int], B: Sequence[int], T: Sequence[int], L: int):
        super().__init__()
        self.register_buffer("A", torch.as_tensor(A, dtype=torch.int64).reshape(-1))
        self.register_buffer("B", torch.as_tensor(B, dtype=torch.int64).reshape(-1))
        self.register_buffer("T", torch.as_tensor(T, dtype=torch.int64).reshape(-1))
        if not (self.A.numel() == self.B.numel() == self.T.numel()) or (self.T < 0).any():
            raise ValueError("A, B, T must have one entry per channel and T >= 0")
        self.L = int(L)

    def extra_repr(self) -> str:
        return f"channels={self.A.numel()}, L={self.L}, max_shift={int(self.T.max()) if self.T.numel() else 0}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.A.numel()
        if x.dtype != torch.int64 or x.dim() < 2 or x.shape[1] != C:
            raise ValueError(f"expected an int64 accumulator of shape (N, {C}, ...), got {x.dtype} {tuple(x.shape)}")
        bound = int(x.abs().max()) if x.numel() else 0
        if int(self.A.abs().max()) * bound + int(self.B.abs().max()) >= 2**63:
            raise ValueError(f"A x + B overflows int64 for |x| up to {bound}; lower max_shift or the accumulator range")
        shape = (1, C) + (1,) * (x.dim() - 2)
        y = (self.A.view(shape) * x + self.B.view(shape)) >> self.T.view(shape)
        return y.clamp_(0, self.L)


class ExactBNRequant(torch.nn.Module):
    """The float reference clip(floor(a x + b), 0, L) per channel, exact: y = #{j : t_j <= x} (thresholds).

    Vectorised over (N, C, ...) int64 accumulators with one row of L thresholds per channel; a < 0 counts
    thresholds of the mirrored channel at -x, a == 0 is the constant clip(floor(b), 0, L).
    """

    def __init__(self, a_list: Sequence[Fraction], b_list: Sequence[Fraction], L: int):
        super().__init__()
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
        self.register_buffer("t", torch.tensor(rows, dtype=torch.int64).reshape(len(rows), L))
        self.register_buffer("sign", torch.tensor(signs, dtype=torch.int64))
        self.L = int(L)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        C = self.t.shape[0]
        if x.dtype != torch.int64 or x.dim() < 2 or x.shape[1] != C:
            raise ValueError(f"expected an int64 accumulator of shape (N, {C}, ...), got {x.dtype} {tuple(x.shape)}")
        shape = (1, C) + (1,) * (x.dim() - 2)
        xc = (x * self.sign.view(shape)).movedim(1, 0).reshape(C, -1)  # (C, M)
        y = torch.searchsorted(self.t, xc, right=True)  # per channel: thresholds <= x
        return y.reshape(x.movedim(1, 0).shape).movedim(0, 1)


def convert_bn_requant(
    gamma, beta, mean, var, eps, s_in, s_out, bits: int,
    nearest: bool = True, acc_bits: int = 32, max_shift: int = 40, shared_shift: bool = False, zero_out: int = 0,
    x_range: Range | None = None,
) -> tuple[IntegerBNRequant, dict]:
    """Integer BN + requantization to `bits` output bits, exact over the acc_bits accumulator range.

    x_range=(lo, hi) narrows that to the accumulators a layer can reach (smaller shifts); it must lie
    inside the acc_bits range. zero_out: integer zero point of the output grid (see bn_affine).

    shared_shift=True gives every channel the layer's largest shift (A, B scaled by 2^(T_max - T), still
    exact). Returns the module and a report: per-channel optimal shift, shift_naive (None where naive
    rounding is never exact by shift 62), the module's A, B, T, the rational a, b as floats, and summaries.
    """
    if not (isinstance(bits, int) and 1 <= bits <= 10):
        raise ValueError(f"bits={bits!r} must be an int in 1..10 (output levels L = 2^bits - 1)")
    if not (isinstance(acc_bits, int) and 2 <= acc_bits <= 48):
        raise ValueError(f"acc_bits={acc_bits!r} must be an int in 2..48 (signed accumulator width)")
    L = (1 << bits) - 1
    full = (-(1 << (acc_bits - 1)), (1 << (acc_bits - 1)) - 1)
    x_range = full if x_range is None else _check_range(x_range)
    if x_range[0] < full[0] or x_range[1] > full[1]:
        raise ValueError(f"x_range={x_range} does not fit a signed {acc_bits}-bit accumulator: raise acc_bits")
    a_list, b_list = bn_affine(gamma, beta, mean, var, eps, s_in, s_out, nearest, zero_out)
    params = [optimal_fixed_point(a, b, L, max_shift, x_range) for a, b in zip(a_list, b_list)]
    naive = []
    for a, b, (_, _, t_opt) in zip(a_list, b_list, params):
        try:
            naive.append(naive_fixed_point(a, b, L, x_range, min_shift=t_opt)[2])
        except ValueError:
            naive.append(None)
    A, B, T = (list(col) for col in zip(*params))
    shift = list(T)
    if shared_shift:
        top = max(T)
        A, B, T = [v << (top - t) for v, t in zip(A, T)], [v << (top - t) for v, t in zip(B, T)], [top] * len(T)
    report = {
        "bits": bits, "acc_bits": acc_bits, "x_range": list(x_range), "A": A, "B": B, "T": T, "shift": shift, "shift_naive": naive,
        "a": [float(a) for a in a_list], "b": [float(b) for b in b_list],
        "mean_shift": sum(shift) / len(shift), "max_shift": max(shift),
        "mean_shift_naive": None if None in naive else sum(naive) / len(naive),
        "max_shift_naive": None if None in naive else max(naive),
    }
    return IntegerBNRequant(A, B, T, L), report
