"""The timing harness: interleaved calls, warmup first, ratios paired within a repetition."""

from __future__ import annotations

import statistics

from fqtrun.bench.harness import interleaved, median_ms, median_ratios


def test_median_ratios_pair_each_repetition_with_its_base():
    times = {"base": [1.0, 2.0, 10.0], "x": [2.0, 4.0, 5.0]}
    assert median_ratios(times, "x")["base"] == statistics.median([0.5, 0.5, 2.0])
    assert median_ratios(times, "base") == {"base": 1.0, "x": 2.0}


def test_median_ratios_is_not_a_ratio_of_medians():
    # by hand: per-repetition ratios 3/1, 1/2, 8/4, 4/8 -> sorted 0.5, 0.5, 2, 3 -> median 1.25;
    # the ratio of the medians would be 3.5 / 3 = 1.1666...
    times = {"base": [1.0, 2.0, 4.0, 8.0], "x": [3.0, 1.0, 8.0, 4.0]}
    assert median_ratios(times, "base")["x"] == 1.25


def test_interleaved_warms_up_then_alternates():
    calls: list[str] = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    times = interleaved(fns, reps=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_median_ms():
    assert median_ms([0.003, 0.001, 0.002]) == 2.0
