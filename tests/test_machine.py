"""The one reader of the CPU's name and flags (tuning keys, benchmark and demo results)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from xai_serve import machine


def _first(key: str) -> str | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.split(":", 1)[0].strip() == key:
            return line.split(":", 1)[1].strip()
    return None


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="needs Linux /proc/cpuinfo")
def test_reads_the_first_processor() -> None:
    assert machine.cpu_model() == (_first("model name") or platform.processor())
    flags = _first("flags")
    assert machine.cpu_flags() == frozenset((flags or "").split())


def test_without_cpuinfo_the_platform_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    machine._cpuinfo.cache_clear()
    monkeypatch.setattr("builtins.open", _refuse)
    try:
        assert machine.cpu_model() == (platform.processor() or platform.machine())
        assert machine.cpu_flags() == frozenset()
    finally:
        monkeypatch.undo()
        machine._cpuinfo.cache_clear()


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("no /proc here")
