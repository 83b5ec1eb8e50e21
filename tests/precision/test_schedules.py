"""Precision schedules (spec/cpt.md): CPT's published time shares, period, half-even ties, ranges."""

import dataclasses
import itertools
import math
from collections import Counter

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fqtrun.precision.schedules import SCHEDULES, CosineGrowth, Cyclic, Linear, Staged, Static, Triangular

# spec/cpt.md: time spent per bit in one 3..8 cycle (percent).
PUBLISHED_SHARES = {3: 20.5, 4: 16.45, 5: 13.05, 6: 13.1, 7: 16.45, 8: 20.45}


def test_cyclic_shares_match_spec_for_2000_step_cycles():
    # The reference CIFAR run: 64000 iterations in 32 cycles -> T = 2000. These are exact
    # counts (410, 329, 261, 262, 329, 409 of 2000), not just agreement after rounding.
    sched = Cyclic(3, 8, cycles=32, total_steps=64000)
    assert sched.period == 2000
    counts = Counter(sched.bits_at(t) for t in range(sched.period))
    assert {b: 100 * n / sched.period for b, n in counts.items()} == PUBLISHED_SHARES


def _arccos_counts(lo, hi, period):
    """Independent count per bit: invert the cosine instead of evaluating it.

    q(t) >= k  <=>  u >= u_k = arccos(1 - 2 (k - 0.5 - lo) / (hi - lo)) / pi (away from ties),
    so #{t : q(t) >= k} = period - ceil(period * u_k).
    """
    at_least = {}
    for k in range(lo, hi + 2):
        level = k - 0.5
        if level <= lo:
            at_least[k] = period
        elif level > hi:
            at_least[k] = 0
        else:
            u_k = math.acos(1 - 2 * (level - lo) / (hi - lo)) / math.pi
            at_least[k] = period - math.ceil(period * u_k)
    return {k: at_least[k] - at_least[k + 1] for k in range(lo, hi + 1)}


@pytest.mark.parametrize("lo, hi, period", [(3, 8, 997), (2, 8, 1234), (4, 8, 501), (5, 6, 100)])
def test_cyclic_counts_match_inverse_cosine(lo, hi, period):
    # periods chosen without a tie point (no multiple of period/2 or period/3 lands on .5)
    sched = Cyclic(lo, hi, cycles=1, total_steps=period)
    counts = Counter(sched.bits_at(t) for t in range(period))
    assert {k: counts.get(k, 0) for k in range(lo, hi + 1)} == _arccos_counts(lo, hi, period)


def test_cyclic_is_a_sawtooth_with_period_total_over_cycles():
    sched = Cyclic(3, 8, cycles=4, total_steps=4 * 50 + 3)  # 3 leftover steps start a 5th cycle
    assert sched.period == 50
    trace = [sched.bits_at(t) for t in range(4 * 50 + 3)]
    assert trace[50:] == trace[:-50]
    for start in range(0, 4 * 50, 50):
        cycle = trace[start : start + 50]
        assert cycle[0] == 3 and cycle[-1] == 8  # rises to q_max, then drops at once
        assert all(a <= b for a, b in itertools.pairwise(cycle))  # monotone rise within a cycle


@pytest.mark.parametrize(
    "lo, hi, total, step, expected",
    [
        (3, 6, 2, 1, 4),  # u = 1/2: 4.5 -> 4 (half-even; half-up would give 5)
        (4, 7, 2, 1, 6),  # u = 1/2: 5.5 -> 6
        (3, 8, 2000, 1000, 6),  # u = 1/2: 5.5 -> 6 (the spec's 6 share depends on it)
        (1, 6, 2, 1, 4),  # u = 1/2: 3.5 -> 4; float cos(pi/2) gives 3.4999999999999996
        (1, 4, 6006, 3003, 2),  # u = 1/2: 2.5 -> 2; float gives 2.5000000000000004
        (1, 7, 3, 2, 6),  # u = 2/3: 1 + 3 * 1.5 = 5.5 -> 6; float gives 5.499999999999999
        (4, 6, 3, 1, 4),  # u = 1/3: 4 + 1 * 0.5 = 4.5 -> 4
    ],
)
def test_cyclic_rounds_exact_ties_half_to_even(lo, hi, total, step, expected):
    assert Cyclic(lo, hi, cycles=1, total_steps=total).bits_at(step) == expected


def test_cosine_growth_is_one_cycle_then_holds_max():
    grow = CosineGrowth(3, 8, total_steps=777)
    one_cycle = Cyclic(3, 8, cycles=1, total_steps=777)
    assert [grow.bits_at(t) for t in range(777)] == [one_cycle.bits_at(t) for t in range(777)]
    assert grow.bits_at(777) == grow.bits_at(10_000) == 8


def test_triangular_goes_up_and_down_linearly():
    sched = Triangular(3, 8, cycles=2, total_steps=20)  # T = 10, half-cycle of 5 steps = 1 bit each
    assert [sched.bits_at(t) for t in range(20)] == [3, 4, 5, 6, 7, 8, 7, 6, 5, 4] * 2


def test_linear_matches_rounded_line():
    sched = Linear(2, 8, total_steps=600)
    # 6 bits over 600 steps: exact value 2 + t / 100, never a .5 tie when t % 100 != 50
    for t in range(0, 650, 7):
        if t % 100 != 50:
            assert sched.bits_at(t) == round(2 + min(t, 600) / 100)
    assert sched.bits_at(50) == 2 and sched.bits_at(150) == 4  # 2.5 -> 2, 3.5 -> 4


def test_staged_switches_at_fraction_boundaries():
    sched = Staged([[0.25, 4], [0.25, 6], [0.5, 8]], total_steps=100)
    trace = [sched.bits_at(t) for t in range(120)]
    assert trace == [4] * 25 + [6] * 25 + [8] * 70
    assert (sched.min_bits, sched.max_bits, sched.eval_bits) == (4, 8, 8)


CASES = {
    "static": {"bits": 6},
    "cyclic": {"min_bits": 3, "max_bits": 8, "cycles": 7},
    "cosine": {"min_bits": 2, "max_bits": 6},
    "triangular": {"min_bits": 4, "max_bits": 8, "cycles": 3},
    "linear": {"min_bits": 3, "max_bits": 5},
    "staged": {"stages": [[0.3, 3], [0.3, 8], [0.4, 5]]},
}


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("total", [7, 100, 1001])
def test_every_schedule_stays_within_its_range_and_reaches_both_ends(name, total):
    sched = SCHEDULES[name](**CASES[name], total_steps=total)
    seen = {sched.bits_at(t) for t in range(total + 5)}
    assert sched.min_bits <= min(seen) and max(seen) <= sched.max_bits
    if total >= 100:  # with 1-step cycles (total 7, 7 cycles) a cycle cannot reach q_max
        assert min(seen) == sched.min_bits and max(seen) == sched.max_bits
    assert sched.eval_bits == sched.max_bits


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_every_schedule_builds_through_hydra_with_total_steps(name):
    cls = SCHEDULES[name]
    cfg = OmegaConf.create({"_target_": f"{cls.__module__}.{cls.__name__}", **CASES[name], "eval_bits": 5})
    sched = instantiate(cfg, total_steps=500)
    assert isinstance(sched, cls) and sched.eval_bits == 5
    assert sched.bits_at(0) == cls(**CASES[name], total_steps=500).bits_at(0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.eval_bits = 3


@pytest.mark.parametrize(
    "build, setting",
    [
        (lambda: Static(0), "schedule.bits"),
        (lambda: Static(33), "schedule.bits"),
        (lambda: Cyclic(9, 8, total_steps=64), "schedule.min_bits=9"),
        (lambda: Cyclic(3, 8.0, total_steps=64), "schedule.max_bits"),
        (lambda: Cyclic(3, 8, cycles=0, total_steps=64), "schedule.cycles"),
        (lambda: Cyclic(3, 8, cycles=32, total_steps=31), "schedule.total_steps=31"),
        (lambda: Triangular(3, 8, cycles=5, total_steps=4), "schedule.total_steps=4"),
        (lambda: Linear(3, 8, total_steps=0), "schedule.total_steps"),
        (lambda: CosineGrowth(3, 8, total_steps=10, eval_bits=0), "schedule.eval_bits"),
        (lambda: Staged([[0.5, 4], [0.4, 8]], total_steps=10), "schedule.stages"),
        (lambda: Staged([[0.5, 4], [0.5, 40]], total_steps=10), "schedule.stages[1].bits"),
        (lambda: Staged([], total_steps=10), "schedule.stages"),
        (lambda: Staged([[1.0, 8]], total_steps=10).bits_at(-1), "step=-1"),
    ],
)
def test_bad_settings_raise_one_line_naming_the_setting(build, setting):
    with pytest.raises(ValueError) as err:
        build()
    assert setting in str(err.value) and "\n" not in str(err.value)
