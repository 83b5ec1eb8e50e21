"""Bench settings: quick mode's sizes, and the refusal of a setting quick mode would silently replace."""

from __future__ import annotations

import pytest

from fqtrun.bench.settings import QUICK, BenchSettings, resolve_settings
from fqtrun.errors import ConfigError


def test_quick_mode_uses_its_own_sizes():
    s = resolve_settings(BenchSettings(quick=True, grad="householder", bits=4, classes=3), batch_size=8)
    assert {k: getattr(s, k) for k in QUICK} == QUICK
    assert (s.grad, s.bits, s.classes) == ("householder", 4, 3)  # quick mode leaves these to the user


def test_full_mode_keeps_the_settings():
    asked = BenchSettings(reps=3, threads=[4])
    assert resolve_settings(asked, batch_size=8) == asked


@pytest.mark.parametrize("key,value,shown", [
    ("reps", 5, "5"), ("threads", [4], "[4]"), ("threads", [2, 4], "[2,4]"), ("hidden", 256, "256"),
    ("cnn_length", 64, "64"),
])
def test_quick_mode_refuses_a_setting_it_would_ignore(key, value, shown):
    expected = (f"bench.{key}={shown} is ignored with bench.quick=true (quick mode uses its own tiny sizes): "
                f"drop bench.{key} or bench.quick")
    with pytest.raises(ConfigError) as err:
        resolve_settings(BenchSettings(quick=True, **{key: value}), batch_size=8)
    assert str(err.value) == expected


def test_every_quick_size_is_refused_when_set_but_not_at_the_default_or_quick_value():
    for key, quick in QUICK.items():
        default = getattr(BenchSettings(), key)
        if not isinstance(default, bool):  # compile: its only other value is quick mode's own (false)
            other = [3] if isinstance(default, list) else default + 1
            with pytest.raises(ConfigError, match=f"bench.{key}="):
                resolve_settings(BenchSettings(quick=True, **{key: other}), batch_size=8)
        for passes in (default, quick):
            resolve_settings(BenchSettings(quick=True, **{key: passes}), batch_size=8)


@pytest.mark.parametrize("changes,batch_size,needle", [
    ({"reps": 0}, 8, "bench.reps=0 must be >= 1"),
    ({"threads": []}, 8, "bench.threads=[] must list thread counts >= 1"),
    ({"threads": [0]}, 8, "bench.threads=[0] must list"),
    ({}, 0, "batch_size=0 must be >= 1"),
    ({"quant_elements": 8, "quant_rows": 16}, 8, "bench.quant_elements must be >= bench.quant_rows"),
])
def test_out_of_range_settings_raise(changes, batch_size, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        resolve_settings(BenchSettings(**changes), batch_size=batch_size)
