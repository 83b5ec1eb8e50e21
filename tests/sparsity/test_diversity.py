"""Mask diversity and transposable block counts (spec sparsity.md, "Mask diversity")."""

import itertools
import math

import numpy as np
import pytest

from fqtrun.sparsity.diversity import count_transposable_blocks, diversity_table, log10, mask_diversity


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


def test_spec_table_t64():
    want = {
        "unstructured": 1.83e18,
        "1:2": 4.29e9,
        "2:4": 2.82e12,
        "4:8": 5.76e14,
        "1:2-T": 6.55e4,
        "2:4-T": 6.56e7,
        "4:8-T": 1.17e11,
    }
    rows = {r["name"]: r for r in diversity_table(64)}
    assert set(rows) == set(want)
    for name, value in want.items():
        assert isinstance(rows[name]["value"], int)
        assert float(f"{rows[name]['value']:.2e}") == value, name
        assert rows[name]["log10"] == pytest.approx(math.log10(value), abs=0.003)


def test_exact_integers_and_large_log10():
    assert mask_diversity("nm", 64, 2, 4) == 6**16
    assert mask_diversity("unstructured", 64, 2, 4) == math.comb(64, 32)
    big = mask_diversity("transposable", 64 * 4096, 4, 8)
    assert log10(big) == pytest.approx(4096 * math.log10(116_963_796_250), rel=1e-12)


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
        mask_diversity(*args)
