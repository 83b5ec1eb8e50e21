"""Paired comparisons of two sources over the seeds they share, and what they say.

Two runs on the same seed share their initialisation and batches, so the per-seed difference a − b
removes most of the seed-to-seed spread. Over the n shared seeds: the mean difference, its 95%
confidence interval (Student t with n − 1 degrees of freedom: mean ± t_{0.975,n−1} · sd / sqrt(n)),
how many seeds agree in sign with the mean, and a verdict for a metric whose better direction is
known: better, worse, or not resolved (the interval contains 0), with about how many seeds would
resolve the observed difference if it held. A claim's expectation (better, worse, no worse than
within a margin) is then supported, contradicted or not resolved by the interval (see `assess`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from scipy.stats import t as student_t

from fqtrun.errors import ConfigError

LEVEL = 0.95  # the confidence level of every interval
SEEDS_CAP = 100  # seeds_needed looks no further ("more than 100 seeds")
HIGHER, LOWER = "higher", "lower"
BETTER, WORSE, UNRESOLVED = "better", "worse", "not resolved"
SUPPORTED, CONTRADICTED = "supported", "contradicted"
EXPECTATIONS = ("better", "worse", "no_worse")
# which way of a metric is better, by a word of its key (final_test_acc, accuracy.dense, gbitops, ...)
KNOWN = {"acc": HIGHER, "accuracy": HIGHER, "loss": LOWER, "bpc": LOWER, "ppl": LOWER, "gbitops": LOWER,
         "variance": LOWER, "time": LOWER}


def direction(key: str, better: Optional[str] = None) -> str:
    """HIGHER or LOWER: `better` when given, else read from a word of `key` (acc: higher; loss, variance,
    gbitops, time: lower); a one-line ConfigError when neither says."""
    if better is not None:
        if better not in (HIGHER, LOWER):
            raise ConfigError(f"better={better} for {key}: use better=higher or better=lower")
        return better
    found = {KNOWN[w] for w in re.split(r"[._]", key) if w in KNOWN}
    if len(found) != 1:
        raise ConfigError(f"which way of {key} is better is not known from its name: set better=higher or "
                          "better=lower beside it")
    return found.pop()


def t_critical(n: int, level: float = LEVEL) -> float:
    """The two-sided Student t quantile for a mean of n paired differences (n − 1 degrees of freedom)."""
    return float(student_t.ppf(0.5 + level / 2, n - 1))


def seeds_needed(gap: float, sd: float, level: float = LEVEL, cap: int = SEEDS_CAP) -> Optional[int]:
    """The smallest n (2..cap) with t_{n−1} · sd / sqrt(n) < |gap|: how many paired seeds would resolve
    a mean difference of `gap` from 0 if the spread stayed `sd`; None when none up to `cap` does (gap 0)."""
    if not math.isfinite(gap) or not math.isfinite(sd) or gap == 0:
        return None
    return next((n for n in range(2, cap + 1) if t_critical(n, level) * sd / math.sqrt(n) < abs(gap)), None)


@dataclass(frozen=True)
class Comparison:
    """a − b over the seeds both have, in the metric's own units; `better` says which way is better."""

    a: str
    b: str
    seeds: tuple  # the shared seeds, sorted
    diffs: tuple[float, ...]  # a − b on each shared seed
    better: str  # HIGHER or LOWER
    level: float = LEVEL

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.diffs)

    @property
    def sd(self) -> float:
        """Sample standard deviation of the differences (n − 1)."""
        mean = self.mean
        return math.sqrt(sum((d - mean) ** 2 for d in self.diffs) / (self.n - 1))

    @property
    def half_width(self) -> float:
        return t_critical(self.n, self.level) * self.sd / math.sqrt(self.n)

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    @property
    def finite(self) -> bool:
        return all(math.isfinite(d) for d in self.diffs)

    @property
    def agree(self) -> int:
        """How many seeds' differences have the mean's sign (0 counts as its own sign)."""
        sign = _sign(self.mean)
        return sum(_sign(d) == sign for d in self.diffs)

    def oriented(self) -> tuple[float, float, float]:
        """(mean, low, high) turned so that positive means a is better than b."""
        if self.better == HIGHER:
            return self.mean, self.low, self.high
        return -self.mean, -self.high, -self.low

    @property
    def verdict(self) -> str:
        """BETTER or WORSE for a when the interval excludes 0 (its better side or not), else UNRESOLVED."""
        _, low, high = self.oriented()
        if not self.finite or low <= 0 <= high:
            return UNRESOLVED
        return BETTER if low > 0 else WORSE

    def to_resolve(self, threshold: float = 0.0) -> str:
        """About how many seeds would resolve the mean from `threshold` (in oriented units) if it held."""
        if not self.finite:
            return "non-finite values"
        gap = self.oriented()[0] - threshold
        if gap == 0:
            if threshold != 0:
                return "the mean is at the margin"
            return "identical on every seed" if self.sd == 0 else "no direction (mean 0)"
        n = seeds_needed(gap, self.sd, self.level)
        return f"more than {SEEDS_CAP} seeds" if n is None else f"~{n} seeds"

    def interval(self, scale: float = 1.0, digits: int = 2) -> str:
        """'+2.41 [+0.90, +3.92]': the mean difference and its interval, times `scale`."""
        d = digits
        return f"{scale * self.mean:+.{d}f} [{scale * self.low:+.{d}f}, {scale * self.high:+.{d}f}]"

    def verdict_text(self) -> str:
        """The verdict; a not-resolved one adds '(~n seeds)'."""
        return self.verdict + (f" ({self.to_resolve()})" if self.verdict == UNRESOLVED else "")

    def text(self, scale: float = 1.0, digits: int = 2) -> str:
        """'+2.41 [+0.90, +3.92] 3/3 better' (times `scale`); a not-resolved one adds '(~n seeds)'."""
        return f"{self.interval(scale, digits)} {self.agree}/{self.n} {self.verdict_text()}"


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def lookup(values: Mapping[str, Any], name: str, what: str = "source"):
    """values[name], or a one-line ConfigError naming the known names."""
    if name not in values:
        raise ConfigError(f"unknown {what} {name!r}: use one of {', '.join(map(str, values))}")
    return values[name]


def compare(a: str, a_values: Mapping[Any, float], b: str, b_values: Mapping[Any, float], better: str,
            level: float = LEVEL) -> Comparison:
    """a − b paired by seed ({seed: value} each); a one-line ConfigError when they share no seed or
    fewer than 2 (an interval needs 2)."""
    shared = sorted(set(a_values) & set(b_values), key=str)
    if not shared:
        raise ConfigError(f"{a} vs {b}: no shared seed ({a}: {_seeds(a_values)}; {b}: {_seeds(b_values)}): a "
                          "paired comparison needs runs of both on the same seeds")
    if len(shared) < 2:
        raise ConfigError(f"{a} vs {b}: only seed {shared[0]} is shared, and a 95% interval needs 2 or more: "
                          "add seeds that both run")
    if better not in (HIGHER, LOWER):
        raise ConfigError(f"{a} vs {b}: better={better}: use better=higher or better=lower")
    diffs = tuple(float(a_values[s]) - float(b_values[s]) for s in shared)
    return Comparison(a, b, tuple(shared), diffs, better, level)


def _seeds(values: Mapping) -> str:
    return ", ".join(map(str, sorted(values, key=str))) or "none"


def assess(c: Comparison, expect: str, margin: float = 0.0) -> tuple[str, str]:
    """(SUPPORTED, CONTRADICTED or UNRESOLVED, and for an unresolved one about how many seeds would
    resolve it) for the claim that a is `expect` than b. In oriented units (positive: a better), with the
    95% interval [low, high]:
      better:   supported when low > 0, contradicted when high < 0 (the verdict, read for the claim);
      worse:    supported when high < 0, contradicted when low > 0;
      no_worse: a is at most `margin` worse (margin >= 0, the metric's units): supported when
                low > −margin (every value in the interval is within the margin), contradicted when
                high < −margin (a is resolved worse by more than the margin)."""
    if expect not in EXPECTATIONS:
        raise ConfigError(f"expect={expect}: use one of {', '.join(EXPECTATIONS)}")
    if margin < 0:
        raise ConfigError(f"margin={margin} for {c.a} vs {c.b}: a margin is 0 or more")
    _, low, high = c.oriented()
    sign = {"better": 1, "worse": -1, "no_worse": 1}[expect]
    threshold = -margin if expect == "no_worse" else 0.0
    lo, hi = (low - threshold, high - threshold) if sign > 0 else (threshold - high, threshold - low)
    if c.finite and lo > 0:
        return SUPPORTED, ""
    if c.finite and hi < 0:
        return CONTRADICTED, ""
    return UNRESOLVED, c.to_resolve(threshold)
