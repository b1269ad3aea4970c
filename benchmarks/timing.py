"""What every benchmark here shares: interleaved timing and the results files.

Interleaved rounds (A, B, C, C, B, A, ...) because this shared machine's speed drifts: each
implementation is timed in every round, after one warm-up call each, and the medians are
compared, so a ratio is made of times from the same stretch of time.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["interleaved_medians", "sync", "write_results"]


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the device's queued work (CUDA; nothing on a CPU)."""
    if device is None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    elif torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    impls: dict[str, Callable[[], Any]],
    rounds: int,
    device: torch.device | str | None = None,
    times: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median seconds of each implementation over ``rounds`` interleaved rounds, after one
    warm-up call each; the device is synchronised around every timed call. ``times``, if
    given, receives every timed call's seconds per implementation.

    Rounds alternate direction (A B C, then C B A, ...), so that a drift within a round, or a
    cost one call leaves to the next (a cold cache, memory to give back), does not always fall
    on the same implementation."""
    for fn in impls.values():
        fn()
    if times is None:
        times = {}
    times.update({name: [] for name in impls})
    names = list(impls)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            fn = impls[name]
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_results(stem: Path, data: dict[str, Any], markdown: str) -> None:
    """``<stem>.json`` (``data``) and ``<stem>.md`` (``markdown``), the folder made."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown)
