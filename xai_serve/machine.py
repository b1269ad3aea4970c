"""What machine this is: the CPU's model name and instruction-set flags (``/proc/cpuinfo`` on
Linux; the platform's own names elsewhere), for the forward-path cache keys, the benchmarks'
and the demo's results files."""

from __future__ import annotations

import functools
import platform

__all__ = ["cpu_flags", "cpu_model"]


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``/proc/cpuinfo`` (empty elsewhere)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            for line in f:
                if not line.strip():
                    break  # the end of the first processor's block
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The CPU's model name (``AMD EPYC ...``), or the platform's processor name."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (``avx2``, ``avx512_bf16``, ``amx_tile``, ...); empty
    where the platform does not list them."""
    return frozenset(_cpuinfo().get("flags", "").split())
