"""What a benchmark measured: one :class:`Row` per setting, made from the :class:`Sample` of
every measured request, and the files and the table that show them.

Definitions (every figure of a row is computed here, from its samples, and nowhere else):

- A sample's latency runs from the moment its request was sent (closed loop) or was due to be
  sent (open loop: the schedule's time, so that a client that falls behind counts its delay)
  to the moment its answer arrived.
- ``duration_s``: from the first measured request's start to the last measured answer.
- ``throughput``: successful answers per second of ``duration_s``.
- Latency percentiles are over the successful answers, by :func:`percentile` (linear
  interpolation between the closest ranks, numpy's default).
- ``queue_ms``, ``compute_ms``, ``batch_size``: the means of what the server reported in its
  answers (``xai_serve.v1.Timing``); None when the answers carry no timing (Open Inference
  Protocol). ``overhead_ms`` = mean latency - mean queue - mean compute: the time spent
  neither waiting in the server's queue nor computing (network, (de)serialisation, the
  server's decoding and preprocessing, the client's own loop).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xai_serve.errors import InvalidInput

__all__ = [
    "PERCENTILES",
    "BenchReport",
    "Row",
    "Sample",
    "Setting",
    "percentile",
    "summarise",
    "table_cells",
]

#: The latency percentiles every row reports.
PERCENTILES = (50.0, 90.0, 99.0)

OK = "OK"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``0 <= q <= 100``) of ``values`` by linear interpolation
    between the closest ranks: with the values sorted as ``v[0] <= ... <= v[n-1]`` and
    ``h = (n - 1) * q / 100``, it is ``v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] -
    v[floor(h)])`` (numpy's default method). ``q = 0`` is the minimum, ``q = 100`` the maximum.

    Raises:
        InvalidInput: no values, or ``q`` outside ``[0, 100]``.
    """
    if not values:
        raise InvalidInput("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise InvalidInput(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    h = (len(ordered) - 1) * q / 100.0
    lo = math.floor(h)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: ``mode`` ``"concurrency"`` (closed loop: ``value`` workers, each
    sending its next request when its answer arrives) or ``"rate"`` (open loop: ``value``
    requests per second sent on schedule whatever the answers)."""

    mode: str
    value: float

    def __post_init__(self) -> None:
        if self.mode not in ("concurrency", "rate"):
            raise InvalidInput(f"a setting's mode is 'concurrency' or 'rate', got {self.mode!r}")
        if self.mode == "concurrency":
            if isinstance(self.value, bool) or self.value != int(self.value) or self.value < 1:
                raise InvalidInput(f"concurrency must be an integer >= 1, got {self.value!r}")
            object.__setattr__(self, "value", int(self.value))
        elif not 0 < self.value < math.inf:
            raise InvalidInput(f"rate must be a finite number > 0 per second, got {self.value!r}")

    @property
    def label(self) -> str:
        """``c=16`` or ``r=50/s``."""
        if self.mode == "concurrency":
            return f"c={int(self.value)}"
        return f"r={self.value:g}/s"


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured request: when it started and ended (seconds on the benchmark's monotonic
    clock), its status code name (``"OK"``, ``"NOT_FOUND"``, ...) and, for successful
    answers that carry it, the server's timing."""

    start: float
    end: float
    code: str
    queue_ms: float | None = None
    compute_ms: float | None = None
    batch_size: int | None = None
    cache_hit: bool = False

    @property
    def latency_ms(self) -> float:
        return (self.end - self.start) * 1e3


@dataclass(frozen=True)
class Row:
    """The figures of one setting (see the module doc for each definition). A quality column
    (e.g. a faithfulness score of the answers) can join as a further field."""

    setting: Setting
    requests: int
    ok: int
    errors: dict[str, int]
    duration_s: float
    throughput: float
    latency_mean_ms: float | None
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    queue_ms: float | None
    compute_ms: float | None
    batch_size: float | None
    overhead_ms: float | None
    cache_hits: int = 0

    @property
    def concurrency(self) -> int | None:
        return int(self.setting.value) if self.setting.mode == "concurrency" else None

    @property
    def rate(self) -> float | None:
        return float(self.setting.value) if self.setting.mode == "rate" else None

    def record(self) -> dict[str, Any]:
        """The row as a flat dict (the JSON and CSV fields, in order)."""
        out: dict[str, Any] = {"mode": self.setting.mode, "concurrency": self.concurrency,
                               "rate": self.rate}  # fmt: skip
        for key, value in asdict(self).items():
            if key != "setting":
                out[key] = value
        return out


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarise(setting: Setting, samples: Sequence[Sample]) -> Row:
    """The :class:`Row` of ``setting`` from its measured ``samples``."""
    ok = [s for s in samples if s.code == OK]
    errors = dict(sorted(Counter(s.code for s in samples if s.code != OK).items()))
    duration = (max(s.end for s in samples) - min(s.start for s in samples)) if samples else 0.0
    latencies = [s.latency_ms for s in ok]
    p50, p90, p99 = (percentile(latencies, q) if latencies else None for q in PERCENTILES)
    timed = [s for s in ok if s.compute_ms is not None]
    queue = _mean([s.queue_ms for s in timed if s.queue_ms is not None])
    compute = _mean([s.compute_ms for s in timed if s.compute_ms is not None])
    batch = _mean([float(s.batch_size) for s in timed if s.batch_size is not None])
    mean_latency = _mean(latencies)
    overhead = None
    if timed and queue is not None and compute is not None:
        overhead = statistics.fmean(s.latency_ms for s in timed) - queue - compute
    return Row(
        setting=setting,
        requests=len(samples),
        ok=len(ok),
        errors=errors,
        duration_s=duration,
        throughput=len(ok) / duration if duration > 0 else 0.0,
        latency_mean_ms=mean_latency,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        max_ms=max(latencies) if latencies else None,
        queue_ms=queue,
        compute_ms=compute,
        batch_size=batch,
        overhead_ms=overhead,
        cache_hits=sum(1 for s in ok if s.cache_hit),
    )


@dataclass(frozen=True)
class BenchReport:
    """A benchmark's rows, in sweep order, and what was measured (``info``: endpoint,
    protocol, model, method, options, inputs, warm-up and length of each setting)."""

    rows: tuple[Row, ...]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"info": self.info, "rows": [r.record() for r in self.rows]}

    def to_json(self, path: str | Path | None = None) -> str:
        """The report as JSON text (written to ``path`` too, when given)."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        if path is not None:
            _write(path, text)
        return text

    def to_csv(self, path: str | Path | None = None) -> str:
        """One CSV line per row (errors as ``CODE:count`` joined by ``;``), with a header;
        written to ``path`` too, when given."""
        buf = io.StringIO()
        records = [r.record() for r in self.rows]
        names = list(records[0]) if records else list(Row.__dataclass_fields__)
        writer = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for rec in records:
            rec = dict(rec)
            rec["errors"] = ";".join(f"{k}:{v}" for k, v in rec["errors"].items())
            writer.writerow({k: "" if v is None else v for k, v in rec.items()})
        if path is not None:
            _write(path, buf.getvalue())
        return buf.getvalue()


def _write(path: str | Path, text: str) -> None:
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"cannot write {out}: {exc.strerror or exc}") from None


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_cells(report: BenchReport) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The terminal table of ``report``: a header and one line of cells per row."""
    hits = any(r.cache_hits for r in report.rows)
    header = ("setting", "requests", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
              "queue ms", "compute ms", "batch", "overhead ms")  # fmt: skip
    if hits:
        header = (*header, "cached")
    rows = []
    for r in report.rows:
        errors = ", ".join(f"{code} {n}" for code, n in r.errors.items()) or "0"
        cells = (
            r.setting.label, str(r.requests), errors, f"{r.throughput:.1f}", _ms(r.p50_ms),
            _ms(r.p90_ms), _ms(r.p99_ms), _ms(r.max_ms), _ms(r.queue_ms), _ms(r.compute_ms),
            "-" if r.batch_size is None else f"{r.batch_size:.2f}", _ms(r.overhead_ms),
        )  # fmt: skip
        if hits:
            cells = (*cells, str(r.cache_hits))
        rows.append(cells)
    return header, rows
