"""Mask diversity: how many masks a sparsity constraint allows (spec sparsity.md, "Mask diversity").

For T weights at sparsity s (fraction pruned):
    unstructured      C(T, T s)
    row-wise N:M      C(M, N)^(T/M)
    transposable N:M  (number of valid M x M blocks)^(T/M^2)
given as log10 (the counts overflow floats quickly). Convention: N is the number kept in every
group of M (2:4 keeps 2 of every 4).
"""

from __future__ import annotations

import math
from functools import cache
from numbers import Integral

from fqtrun.errors import ConfigError

KINDS = ("unstructured", "nm", "transposable")


def check_nm(n: int, m: int) -> None:
    """Raise a one-line ConfigError (a ValueError) unless n, m are ints with 1 <= n < m."""
    for name, v in (("sparsity.n", n), ("sparsity.m", m)):
        if isinstance(v, bool) or not isinstance(v, Integral):
            msg = (
                f"{name}={v!r} must be an int: N:M keeps N of every M weights, e.g. sparsity.n=2 sparsity.m=4"
            )
            raise ConfigError(msg)
    if n < 1:
        raise ConfigError(f"sparsity.n={n} must be >= 1: N is the number kept in every group of M")
    if n >= m:
        raise ConfigError(
            f"sparsity.n={n} must be < sparsity.m={m}: N is the number kept in every group of M"
        )


def count_transposable_blocks(n: int, m: int) -> int:
    """Number of m x m 0/1 matrices with exactly n ones in every row and every column.

    DP over rows; the state is the histogram of how many ones each column still needs
    (columns are interchangeable, so only the histogram matters). 8x8 with n=4 takes
    milliseconds instead of enumerating 1.2e11 matrices. 2x2,n=1 -> 2; 4x4,n=2 -> 90;
    8x8,n=4 -> 116,963,796,250.
    """
    check_nm(n, m)
    return _count_from(tuple([0] * n + [m]), m, n)


@cache
def _count_from(hist: tuple[int, ...], rows_left: int, n: int) -> int:
    # hist[k] = number of columns still needing k ones (k = 0..n).
    if rows_left == 0:
        return 1 if all(h == 0 for h in hist[1:]) else 0
    total = 0
    for take, ways in _row_choices(hist, n):
        new = list(hist)
        for k, a in enumerate(take):
            if a:
                new[k] -= a
                new[k - 1] += a
        total += ways * _count_from(tuple(new), rows_left - 1, n)
    return total


def _row_choices(hist: tuple[int, ...], n: int):
    """Ways to put the n ones of one row: take[k] columns from the class needing k (k >= 1)."""

    def rec(k: int, left: int):
        if k == 0:
            if left == 0:
                yield [0] * (n + 1), 1
            return
        for a in range(min(left, hist[k]) + 1):
            for take, ways in rec(k - 1, left - a):
                take = list(take)
                take[k] = a
                yield take, ways * math.comb(hist[k], a)

    yield from rec(n, n)


def log10_mask_diversity(kind: str, t: int, n: int, m: int) -> float:
    """log10 of the number of masks of t weights at density n/m (spec sparsity.md, "Mask diversity").

    unstructured C(t, round(t n/m)) (through lgamma: t may be millions), nm C(m, n)^(t/m) with t a
    multiple of m, transposable (valid m x m blocks)^(t/m^2) with t a multiple of m^2. The counts
    themselves overflow floats from about a thousand weights on, so only their log10 is given.
    """
    check_nm(n, m)
    if isinstance(t, bool) or not isinstance(t, Integral) or t < 1:
        raise ValueError(f"t={t!r} must be a positive int: the number of weights")
    if kind == "unstructured":
        k = round(t * n / m)
        return (math.lgamma(t + 1) - math.lgamma(k + 1) - math.lgamma(t - k + 1)) / math.log(10)
    if kind == "nm":
        if t % m:
            raise ValueError(f"t={t} must be a multiple of sparsity.m={m} for row-wise N:M diversity")
        return t / m * math.log10(math.comb(m, n))
    if kind == "transposable":
        if t % (m * m):
            raise ValueError(f"t={t} must be a multiple of sparsity.m^2={m * m} for transposable N:M diversity")
        return t / (m * m) * math.log10(count_transposable_blocks(n, m))
    raise ValueError(f"kind={kind!r} must be one of {KINDS}")
