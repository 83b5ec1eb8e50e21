"""Paired comparisons (fqtrun.report.paired) against intervals worked out by hand, sign counting, the
direction of a metric, claims' readings, and the one-line errors for what cannot be compared."""

from __future__ import annotations

import math

import pytest

from fqtrun.errors import ConfigError
from fqtrun.report import paired
from fqtrun.report.paired import HIGHER, LOWER, UNRESOLVED, assess, compare


def diffs(values, better=HIGHER):
    """a − b = values on seeds 0, 1, ... (b all zero)."""
    return compare("a", dict(enumerate(values)), "b", dict.fromkeys(range(len(values)), 0.0), better)


def test_t_quantiles_are_the_textbook_ones():
    # two-sided 95% Student t: df 1 12.706, df 2 4.303, df 3 3.182, df 4 2.776, df 29 2.045
    for n, t in ((2, 12.706), (3, 4.303), (4, 3.182), (5, 2.776), (30, 2.045)):
        assert paired.t_critical(n) == pytest.approx(t, abs=5e-4)


def test_hand_example_not_resolved_with_its_seeds_needed():
    """Differences 1, 2, 3: mean 2, sd sqrt((1 + 0 + 1) / 2) = 1, t_{0.975,2} = 4.3027, half-width
    4.3027 * 1 / sqrt(3) = 2.4841: CI [-0.484, +4.484] holds 0 -> not resolved. Seeds that would resolve a
    mean of 2 with sd 1: n = 3 gives 2.484 (not < 2), n = 4 gives t_{0.975,3} / 2 = 3.1824 / 2 = 1.591 < 2."""
    c = diffs([1.0, 2.0, 3.0])
    assert (c.n, c.mean, c.sd) == (3, 2.0, 1.0)
    assert c.half_width == pytest.approx(2.4841, abs=1e-4)
    assert (c.low, c.high) == (pytest.approx(-0.4841, abs=1e-4), pytest.approx(4.4841, abs=1e-4))
    assert c.agree == 3 and c.verdict == UNRESOLVED
    assert paired.seeds_needed(2.0, 1.0) == 4 and c.to_resolve() == "~4 seeds"
    assert c.text() == "+2.00 [-0.48, +4.48] 3/3 not resolved (~4 seeds)"


def test_resolved_example_and_the_direction():
    """Accuracies a 0.92, 0.95, 0.93 vs b 0.90, 0.92, 0.91: differences 0.02, 0.03, 0.02, mean 0.02333,
    sd 0.01 / sqrt(3) = 0.005774, half-width 4.3027 * 0.005774 / sqrt(3) = 0.014342: CI [+0.00899, +0.03768],
    above 0 -> a is better when higher is better, worse when lower is (a loss)."""
    a, b = {0: 0.92, 1: 0.95, 2: 0.93}, {0: 0.90, 1: 0.92, 2: 0.91}
    up = compare("a", a, "b", b, HIGHER)
    assert up.mean == pytest.approx(0.023333, abs=1e-6) and up.half_width == pytest.approx(0.014342, abs=1e-6)
    assert up.verdict == paired.BETTER and up.text(scale=100) == "+2.33 [+0.90, +3.77] 3/3 better"
    down = compare("a", a, "b", b, LOWER)
    assert down.verdict == paired.WORSE and down.text(scale=100) == "+2.33 [+0.90, +3.77] 3/3 worse"
    assert compare("b", b, "a", a, LOWER).verdict == paired.BETTER


def test_only_the_shared_seeds_are_paired():
    c = compare("a", {0: 1.0, 1: 2.0, 2: 3.0, 5: 9.0}, "b", {0: 0.0, 1: 0.0, 2: 0.0, 7: 1.0}, HIGHER)
    assert c.seeds == (0, 1, 2) and c.diffs == (1.0, 2.0, 3.0)


def test_seeds_agreeing_in_sign():
    assert diffs([3.0, -1.0, 2.0, 0.0]).agree == 2  # mean +1: the two positive seeds
    assert diffs([-0.5, -1.0, 0.25]).agree == 2  # mean -0.4167: the two negative seeds
    even = diffs([1.0, -1.0])  # mean 0: no seed has its sign (no zero difference)
    assert even.agree == 0 and even.verdict == UNRESOLVED and even.to_resolve() == "no direction (mean 0)"


def test_zero_spread():
    """sd 0: the interval has width 0, so any non-zero mean is resolved; all-zero differences never resolve."""
    same = diffs([0.5, 0.5, 0.5], LOWER)
    assert (same.low, same.high, same.verdict) == (0.5, 0.5, paired.WORSE)
    zero = diffs([0.0, 0.0, 0.0])
    assert zero.verdict == UNRESOLVED and zero.agree == 3 and zero.to_resolve() == "identical on every seed"
    assert zero.text() == "+0.00 [+0.00, +0.00] 3/3 not resolved (identical on every seed)"


def test_seeds_needed_brute_force_and_cap():
    """Against the obvious loop over n with t from the textbook table; past 100 seeds: 'more than 100'."""
    table = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 7: 2.447, 8: 2.365}
    for gap, sd in ((2.0, 1.0), (0.5, 0.4), (1.0, 0.9), (0.3, 0.35)):
        expected = next(n for n, t in table.items() if t * sd / math.sqrt(n) < gap)
        assert paired.seeds_needed(gap, sd) == expected
    small = diffs([1.0, -0.9, 0.05])  # mean 0.05, sd 0.95: about 1,400 seeds
    assert paired.seeds_needed(small.mean, small.sd) is None and small.to_resolve() == "more than 100 seeds"
    assert paired.seeds_needed(0.0, 1.0) is None


def test_non_finite_values_are_not_resolved():
    c = diffs([1.0, float("nan"), 2.0])
    assert c.verdict == UNRESOLVED and c.to_resolve() == "non-finite values"


@pytest.mark.parametrize("values, better, expect, margin, reading", [
    # differences 1, 2, 3 (higher better): CI [-0.484, +4.484]
    ([1.0, 2.0, 3.0], HIGHER, "better", 0.0, (UNRESOLVED, "~4 seeds")),
    ([1.0, 2.0, 3.0], HIGHER, "no_worse", 1.0, (paired.SUPPORTED, "")),  # worse end -0.484 within 1
    ([1.0, 2.0, 3.0], HIGHER, "no_worse", 0.4, (UNRESOLVED, "~4 seeds")),  # -0.484 past 0.4; mean 2.4 from it
    ([1.0, 2.0, 3.0], LOWER, "worse", 0.0, (UNRESOLVED, "~4 seeds")),
    # differences -5, -4, -3 (higher better): mean -4, CI [-6.484, -1.516]
    ([-5.0, -4.0, -3.0], HIGHER, "better", 0.0, (paired.CONTRADICTED, "")),
    ([-5.0, -4.0, -3.0], HIGHER, "worse", 0.0, (paired.SUPPORTED, "")),
    ([-5.0, -4.0, -3.0], HIGHER, "no_worse", 1.0, (paired.CONTRADICTED, "")),  # best end -1.516 worse than -1
    ([-5.0, -4.0, -3.0], HIGHER, "no_worse", 2.0, (UNRESOLVED, "~4 seeds")),  # -2 inside the CI
    ([-5.0, -4.0, -3.0], LOWER, "better", 0.0, (paired.SUPPORTED, "")),  # a lower loss
    ([-5.0, -4.0, -3.0], LOWER, "no_worse", 0.0, (paired.SUPPORTED, "")),
])
def test_claims_read_from_the_interval(values, better, expect, margin, reading):
    assert assess(diffs(values, better), expect, margin) == reading


def test_direction_from_the_key_or_given():
    assert paired.direction("final_test_acc") == paired.direction("accuracy.reconstructed") == HIGHER
    assert {paired.direction(k) for k in ("final_test_loss", "final_test_bpc", "gbitops", "wall_time_s")} == {LOWER}
    assert paired.direction("final_test_acc", "lower") == LOWER
    with pytest.raises(ConfigError, match=r"which way of steps is better is not known from its name: set "
                                          r"better=higher or better=lower"):
        paired.direction("steps")
    with pytest.raises(ConfigError, match="better=up for final_test_acc: use better=higher or better=lower"):
        paired.direction("final_test_acc", "up")


def test_what_cannot_be_compared_is_one_line():
    with pytest.raises(ConfigError, match=r"^ptq4 vs bhq4: no shared seed \(ptq4: 0, 1; bhq4: 3, 4\): a paired "
                                          r"comparison needs runs of both on the same seeds$"):
        compare("ptq4", {0: 1.0, 1: 2.0}, "bhq4", {3: 1.0, 4: 2.0}, HIGHER)
    with pytest.raises(ConfigError, match=r"^ptq4 vs bhq4: only seed 1 is shared, and a 95% interval needs 2 or "
                                          r"more: add seeds that both run$"):
        compare("ptq4", {0: 1.0, 1: 2.0}, "bhq4", {1: 1.0, 4: 2.0}, HIGHER)
    with pytest.raises(ConfigError, match=r"^unknown source 'ptq5': use one of ptq4, bhq4$"):
        paired.lookup({"ptq4": {}, "bhq4": {}}, "ptq5")
    with pytest.raises(ConfigError, match="a vs b: better=None"):
        compare("a", {0: 1.0, 1: 2.0}, "b", {0: 1.0, 1: 2.0}, None)
    with pytest.raises(ConfigError, match="expect=equal: use one of better, worse, no_worse"):
        assess(diffs([1.0, 2.0]), "equal")
    with pytest.raises(ConfigError, match="margin=-1.0 for a vs b: a margin is 0 or more"):
        assess(diffs([1.0, 2.0]), "no_worse", -1.0)
