"""Mask diversity and transposable block counts (spec sparsity.md, "Mask diversity")."""

import itertools
import math

import numpy as np
import pytest

from fqtrun.sparsity.diversity import count_transposable_blocks, log10_mask_diversity


def _brute_count(n, m):
    cells = np.array(list(itertools.product([0, 1], repeat=m * m)), dtype=np.int8).reshape(-1, m, m)
    return int(((cells.sum(1) == n).all(1) & (cells.sum(2) == n).all(1)).sum())


def test_published_block_counts():
    assert count_transposable_blocks(1, 2) == 2
    assert count_transposable_blocks(2, 4) == 90
    assert count_transposable_blocks(4, 8) == 116_963_796_250


@pytest.mark.parametrize("n,m", [(1, 3), (2, 3), (1, 4), (2, 4), (3, 4)])
def test_block_count_equals_brute_force(n, m):
    assert count_transposable_blocks(n, m) == _brute_count(n, m)


@pytest.mark.parametrize("m", [2, 3, 5, 7, 9])
def test_one_per_row_and_column_is_permutations(m):
    assert count_transposable_blocks(1, m) == math.factorial(m)
    assert count_transposable_blocks(m - 1, m) == math.factorial(m)  # complements


def test_overcounting_formula_is_not_used():
    # spec: (M!(M-1)!...(M-N+1)!) gives 144 for 4x4 with 2 kept; the true count is 90
    assert math.factorial(4) * math.factorial(3) == 144 != count_transposable_blocks(2, 4)


SPEC_T64 = {  # spec sparsity.md, "Mask diversity": exact values for T = 64 at 50%
    ("unstructured", 1, 2): 1.83e18,
    ("nm", 1, 2): 4.29e9,
    ("nm", 2, 4): 2.82e12,
    ("nm", 4, 8): 5.76e14,
    ("transposable", 1, 2): 6.55e4,
    ("transposable", 2, 4): 6.56e7,
    ("transposable", 4, 8): 1.17e11,
}


@pytest.mark.parametrize("kind,n,m", list(SPEC_T64))
def test_spec_table_t64(kind, n, m):
    assert float(f"{10 ** log10_mask_diversity(kind, 64, n, m):.2e}") == SPEC_T64[kind, n, m]


@pytest.mark.parametrize("kind,t,n,m,count", [
    ("unstructured", 64, 2, 4, math.comb(64, 32)),
    ("unstructured", 160, 1, 4, math.comb(160, 40)),
    ("unstructured", 10, 1, 4, math.comb(10, 2)),  # round(10 / 4) = 2 kept: layers that do not tile exactly
    ("nm", 64, 2, 4, 6**16),
    ("nm", 96, 3, 8, math.comb(8, 3) ** 12),
    ("transposable", 64, 2, 4, 90**4),
    ("transposable", 128, 4, 8, 116_963_796_250**2),
])
def test_log10_against_exact_integer_counts(kind, t, n, m, count):
    assert log10_mask_diversity(kind, t, n, m) == pytest.approx(math.log10(count), rel=1e-12)


def test_large_layers_stay_finite():
    t = 64 * 4096  # 2^18 weights: the count itself has about 10^5 digits
    assert log10_mask_diversity("transposable", t, 4, 8) == pytest.approx(4096 * math.log10(116_963_796_250), rel=1e-12)
    # log10 C(t, t/2) = t log10(2) - 1/2 log10(pi t / 2) + O(1/t) (Stirling)
    stirling = t * math.log10(2) - 0.5 * math.log10(math.pi * t / 2)
    assert log10_mask_diversity("unstructured", t, 1, 2) == pytest.approx(stirling, abs=1e-6)


@pytest.mark.parametrize(
    "args,match",
    [
        (("nm", 66, 2, 4), "multiple of sparsity.m"),
        (("transposable", 40, 2, 4), "sparsity.m\\^2"),
        (("bogus", 64, 2, 4), "kind"),
        (("nm", 64, 4, 4), "sparsity.n"),
        (("unstructured", 0, 2, 4), "t="),
    ],
)
def test_bad_arguments_raise(args, match):
    with pytest.raises(ValueError, match=match):
        log10_mask_diversity(*args)
