"""fqtrun.allocator: glibc takes the settings (each mallopt call answers 1), and the opt-out leaves it alone."""

from __future__ import annotations

import platform
import sys

import pytest

from fqtrun.allocator import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_glibc_takes_every_setting(monkeypatch):
    monkeypatch.delenv("FQTRUN_MALLOC", raising=False)
    assert keep_freed_memory() is True


def test_opt_out_changes_nothing(monkeypatch):
    monkeypatch.setenv("FQTRUN_MALLOC", "system")
    assert keep_freed_memory() is False
