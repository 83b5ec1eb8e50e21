"""The timing harness: every variant timed in interleaved repetitions, figures as median per-repetition ratios.

Interleaving (f1, f2, ..., f1, f2, ...) and pairing each time with its base in the same repetition
cancel most of the drift of a shared machine's load, which a ratio of two separate medians would not.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of every fn, repetitions interleaved (fn1, fn2, ..., fn1, fn2, ...)."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def median_ratios(times: dict[str, list[float]], base: str) -> dict[str, float]:
    """Median over repetitions of time(k) / time(base) in the same repetition."""
    return {k: statistics.median(t / b for t, b in zip(v, times[base])) for k, v in times.items()}


def median_ms(seconds: list[float]) -> float:
    """The median of one variant's times, in milliseconds."""
    return 1e3 * statistics.median(seconds)
