"""The benchmarks' shared timing helper: interleaving order and what it reports."""

from __future__ import annotations

from benchmarks.timing import interleaved_medians


def test_rounds_alternate_direction_after_one_warm_up_each() -> None:
    calls: list[str] = []
    impls = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    times: dict[str, list[float]] = {}
    med = interleaved_medians(impls, 4, times=times)
    assert "".join(calls) == "ABC" + "ABC" + "CBA" + "ABC" + "CBA"
    assert sorted(med) == ["A", "B", "C"]
    assert all(len(ts) == 4 for ts in times.values())
    for k, ts in times.items():  # the median of the timed calls, warm-ups left out
        mid = sorted(ts)[1:3]
        assert med[k] == (mid[0] + mid[1]) / 2
