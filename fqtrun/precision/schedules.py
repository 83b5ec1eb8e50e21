"""Precision schedules: a pure map from the training step to a bit-width (spec/cpt.md).

Every schedule is a frozen dataclass built from keyword arguments, so Hydra builds it with
`instantiate(cfg.schedule)(total_steps=N)` (conf/schedule/*.yaml are partial), and exposes
    bits_at(step) -> int     the precision of the forward slots (w, a) at that step (pure),
    min_bits, max_bits       the range it moves in,
    eval_bits                the precision to evaluate at (max_bits unless set),
    grad_min_bits/max_bits   the gradient slots' range (None: they keep their quant bits);
                             precision/plan.py turns these into the run's PrecisionPlan.
Rounding is half-to-even on the exact value: where the cosine is rational (u a multiple of
1/3 or 1/2) the value is computed with Fractions, so ties such as 4.5 -> 4 never depend on
float error; elsewhere the value is irrational and cannot be a tie.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from fractions import Fraction

from fqtrun.quant.bits import check_bits

# cos(pi * k / 6) for the k where it is rational (Niven): the only places a tie can occur.
_RATIONAL_COS = {0: Fraction(1), 2: Fraction(1, 2), 3: Fraction(0), 4: Fraction(-1, 2), 6: Fraction(-1)}


def _check_range(min_bits: int, max_bits: int) -> None:
    check_bits(min_bits, "schedule.min_bits")
    check_bits(max_bits, "schedule.max_bits")
    if min_bits > max_bits:
        raise ValueError(f"schedule.min_bits={min_bits} must be <= schedule.max_bits={max_bits}")


def _check_total(total_steps: object, at_least: int = 1, why: str = "") -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < at_least:
        raise ValueError(f"schedule.total_steps={total_steps!r} must be an integer >= {at_least}{why}")


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")


def _resolve_eval(obj: object, eval_bits: int | None, default: int | None) -> None:
    """Fill eval_bits (a frozen field) with the default and validate it."""
    if eval_bits is None:
        object.__setattr__(obj, "eval_bits", default)
    else:
        check_bits(eval_bits, "schedule.eval_bits")


@dataclass(frozen=True)
class _Shared:
    """Settings every schedule takes beside its shape: evaluation and gradient bits, the run length."""

    _: KW_ONLY
    total_steps: int | None = None
    eval_bits: int | None = None  # forward bits at evaluation; None = max_bits
    grad_min_bits: int | None = None  # None: dx/dw keep quant.bits_dx/bits_dw (CPT keeps them fixed)
    grad_max_bits: int | None = None  # one of the two set (or both equal): static gradient bits

    def _check_grad(self) -> None:
        for name in ("grad_min_bits", "grad_max_bits"):
            if (value := getattr(self, name)) is not None:
                check_bits(value, f"schedule.{name}", "gradient")


def cosine_rise(min_bits: int, max_bits: int, num: int, den: int) -> int:
    """round_half_even(q_min + 0.5 (q_max - q_min)(1 - cos(pi u))) with u = num/den in [0, 1]."""
    span = max_bits - min_bits
    k, rem = divmod(6 * num, den)
    if rem == 0 and k in _RATIONAL_COS:  # exact: the only points where a .5 tie is possible
        return round(min_bits + Fraction(span, 2) * (1 - _RATIONAL_COS[k]))
    return round(min_bits + 0.5 * span * (1.0 - math.cos(math.pi * num / den)))


@dataclass(frozen=True)
class Static(_Shared):
    """The same precision at every step (the baseline CPT is compared with).

    bits=None leaves the forward slots at their quant settings (the default schedule).
    """

    bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits is not None:
            check_bits(self.bits, "schedule.bits")
        if self.total_steps is not None:
            _check_total(self.total_steps)
        self._check_grad()
        _resolve_eval(self, self.eval_bits, self.bits)

    @property
    def min_bits(self) -> int:
        return self.bits

    @property
    def max_bits(self) -> int:
        return self.bits

    def bits_at(self, step: int) -> int:
        _check_step(step)
        return self.bits


@dataclass(frozen=True)
class _Periodic(_Shared):
    """Settings, checks and period T = total_steps // cycles shared by Cyclic and Triangular."""

    min_bits: int = 3
    max_bits: int = 8
    cycles: int = 32  # the reference's value for every run

    def __post_init__(self) -> None:
        _check_range(self.min_bits, self.max_bits)
        self._check_grad()
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise ValueError(f"schedule.cycles={self.cycles!r} must be an integer >= 1")
        _check_total(
            self.total_steps, self.cycles, f" (schedule.cycles={self.cycles}: each cycle needs a step)"
        )
        _resolve_eval(self, self.eval_bits, self.max_bits)

    @property
    def period(self) -> int:
        return self.total_steps // self.cycles


@dataclass(frozen=True)
class Cyclic(_Periodic):
    """CPT's repeated cosine rise q_min -> q_max, then a drop back: a sawtooth (spec/cpt.md).

    T = total_steps // cycles; u = (t mod T) / T. Steps past cycles * T start a further,
    partial cycle, as in the reference.
    """

    def bits_at(self, step: int) -> int:
        _check_step(step)
        return cosine_rise(self.min_bits, self.max_bits, step % self.period, self.period)


@dataclass(frozen=True)
class _Ramp(_Shared):
    """Settings and checks shared by the schedules that rise once over the run (CosineGrowth, Linear)."""

    min_bits: int = 3
    max_bits: int = 8

    def __post_init__(self) -> None:
        _check_range(self.min_bits, self.max_bits)
        self._check_grad()
        _check_total(self.total_steps)
        _resolve_eval(self, self.eval_bits, self.max_bits)


@dataclass(frozen=True)
class CosineGrowth(_Ramp):
    """One cosine rise q_min -> q_max over the whole run (a single CPT cycle); q_max after it."""

    def bits_at(self, step: int) -> int:
        _check_step(step)
        return cosine_rise(self.min_bits, self.max_bits, min(step, self.total_steps), self.total_steps)


@dataclass(frozen=True)
class Triangular(_Periodic):
    """Linear up q_min -> q_max over half a cycle, then linear down; T = total_steps // cycles."""

    def bits_at(self, step: int) -> int:
        _check_step(step)
        period = self.period
        r = step % period
        height = Fraction(period - abs(2 * r - period), period)  # 0 at r=0, 1 at r=T/2
        return round(self.min_bits + (self.max_bits - self.min_bits) * height)


@dataclass(frozen=True)
class Linear(_Ramp):
    """A straight rise q_min -> q_max over the run (rounded half-even); q_max after it."""

    def bits_at(self, step: int) -> int:
        _check_step(step)
        done = Fraction(min(step, self.total_steps), self.total_steps)
        return round(self.min_bits + (self.max_bits - self.min_bits) * done)


@dataclass(frozen=True)
class Staged(_Shared):
    """Progressive stages (FracTrain): stages = [[fraction_of_training, bits], ...] in order.

    Each fraction is the share of the run that stage lasts; the shares must sum to 1.
    Stage i ends at step round(cumulative share * total_steps); the last stage runs on.
    """

    stages: Sequence[Sequence[float | int]] = ((0.5, 4), (0.3, 6), (0.2, 8))
    _ends: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_total(self.total_steps)
        self._check_grad()
        try:
            stages = tuple((float(frac), bits) for frac, bits in self.stages)
        except (TypeError, ValueError):
            raise ValueError(
                f"schedule.stages={self.stages!r} must be a list of [fraction, bits] pairs"
            ) from None
        if not stages:
            raise ValueError("schedule.stages is empty: give at least one [fraction, bits] pair")
        for i, (frac, bits) in enumerate(stages):
            check_bits(bits, f"schedule.stages[{i}].bits")
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"schedule.stages[{i}] fraction={frac} must be in (0, 1]")
        total = math.fsum(frac for frac, _ in stages)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(
                f"schedule.stages fractions sum to {total:g}: they must sum to 1 (shares of the run)"
            )
        cumulative = [math.fsum(frac for frac, _ in stages[: i + 1]) for i in range(len(stages))]
        ends = [round(c * self.total_steps) for c in cumulative[:-1]] + [self.total_steps]
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "_ends", tuple(ends))
        _resolve_eval(self, self.eval_bits, self.max_bits)

    @property
    def min_bits(self) -> int:
        return min(bits for _, bits in self.stages)

    @property
    def max_bits(self) -> int:
        return max(bits for _, bits in self.stages)

    def bits_at(self, step: int) -> int:
        _check_step(step)
        index = min(bisect.bisect_right(self._ends, step), len(self.stages) - 1)
        return int(self.stages[index][1])


# Registry: config group option name -> class (conf/schedule/<name>.yaml targets these).
SCHEDULES = {
    "static": Static,
    "cyclic": Cyclic,
    "cosine": CosineGrowth,
    "triangular": Triangular,
    "linear": Linear,
    "staged": Staged,
}
