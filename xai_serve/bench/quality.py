"""``xai-serve bench --quality``: speed and faithfulness of several methods side by side.

For each method, one load setting (:func:`~xai_serve.bench.load.run_bench`: throughput and
latency, as the plain bench measures them) and one ``Evaluate`` call over the same images
(:meth:`~xai_serve.client.Client.evaluate`: the quality metrics the server computes with
:mod:`xai_serve.explainers.evaluation`). A method that fails (e.g. a metric it cannot support)
gets its error in its row; the others go on.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xai_serve.bench.load import Endpoint, Plan, Workload, run_bench, workload_payloads
from xai_serve.bench.report import Row, Setting
from xai_serve.client import Client, MetricSummary, RemoteError
from xai_serve.errors import InvalidInput, Unavailable

__all__ = ["QualityReport", "QualityRow", "quality_cells", "run_quality"]

QualityProgress = Callable[[str, str, float], None]
"""``progress(method, stage, fraction of that method's evaluation done)``."""


@dataclass(frozen=True)
class QualityRow:
    """One method: its speed at the setting (``speed``; None when it failed) and its quality
    figures by metric (``metrics``), or the ``error`` that stopped it."""

    method: str
    speed: Row | None
    metrics: Mapping[str, MetricSummary]
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "speed": self.speed.record() if self.speed is not None else None,
            "metrics": {
                name: {
                    "mean": m.mean,
                    "stderr": m.stderr,
                    "higher_is_better": m.higher_is_better,
                    "values": list(m.values),
                }
                for name, m in self.metrics.items()
            },
            "error": self.error,
        }


@dataclass(frozen=True)
class QualityReport:
    """The rows, the metrics asked for (in column order) and what was measured."""

    rows: tuple[QualityRow, ...]
    metrics: tuple[str, ...]
    info: Mapping[str, Any]

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(
            {"info": dict(self.info), "rows": [r.record() for r in self.rows]}, indent=2
        )
        if path is not None:
            try:
                Path(path).write_text(text + "\n")
            except OSError as exc:
                raise InvalidInput(f"cannot write {path}: {exc.strerror or exc}") from None
        return text


def run_quality(
    endpoint: Endpoint,
    workload: Workload,
    methods: Sequence[str],
    metrics: Sequence[str] | None,
    setting: Setting,
    plan: Plan,
    *,
    progress: QualityProgress | None = None,
) -> QualityReport:
    """Measure each of ``methods`` on ``endpoint``: the load ``setting`` for its speed, then
    ``metrics`` (None: every metric the method supports) over the workload's images.

    Raises:
        Unavailable: the server cannot be reached.
        InvalidInput: no methods, or a method named twice.
    """
    if not methods:
        raise InvalidInput("name at least one method")
    if len(set(methods)) != len(methods):
        raise InvalidInput(f"a method is named twice: {', '.join(methods)}")
    client = Client(endpoint.address, tls=endpoint.tls, root_certificates=endpoint.ca,
                    token=endpoint.token, timeout=None)  # fmt: skip
    rows = []
    try:
        try:
            listed = {m.name: m for m in client.list_models(timeout=15.0)}
            known = {m.name: m for m in client.list_metrics(timeout=15.0)}
        except RemoteError as exc:
            raise Unavailable(f"cannot use the server at {endpoint.address}: {exc}") from None
        if not listed:
            raise Unavailable(f"the server at {endpoint.address} has no models")
        model = workload.model or next(iter(listed))
        if model not in listed:
            raise InvalidInput(f"the server has no model {model!r}; it has: {', '.join(listed)}")
        asked = tuple(metrics) if metrics else None
        for name in asked or ():
            if name not in known:
                raise InvalidInput(f"unknown metric {name!r}; the server has: {', '.join(known)}")
        payloads, note = workload_payloads(
            dataclasses.replace(workload, protocol="explain"), model, listed[model].input_shape
        )
        for method in methods:
            row = _one(
                client, endpoint, workload, model, method, asked, payloads, setting, plan,
                progress,
            )  # fmt: skip
            rows.append(row)
    finally:
        client.close()
    columns: list[str] = list(asked or ())
    for row in rows:
        columns += [m for m in row.metrics if m not in columns]
    info = {
        "server": endpoint.address,
        "model": model,
        "methods": list(methods),
        "options": dict(workload.options),
        "inputs": note,
        "setting": setting.label,
        "higher_is_better": {m: known[m].higher_is_better for m in columns},
    }
    return QualityReport(tuple(rows), tuple(columns), info)


def _one(
    client: Client,
    endpoint: Endpoint,
    workload: Workload,
    model: str,
    method: str,
    metrics: tuple[str, ...] | None,
    payloads: Sequence[Any],
    setting: Setting,
    plan: Plan,
    progress: QualityProgress | None,
) -> QualityRow:
    work = dataclasses.replace(workload, model=model, method=method)
    if progress is not None:
        progress(method, "speed", 0.0)
    speed = run_bench(endpoint, work, [setting], plan).rows[0]

    def report(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(method, stage, fraction)

    try:
        result = client.evaluate(
            payloads, model=model, method=method, metrics=metrics, layer=workload.layer,
            progress=report, **dict(workload.options),
        )  # fmt: skip
    except RemoteError as exc:
        if exc.code.name in ("UNAVAILABLE", "UNAUTHENTICATED"):
            raise Unavailable(f"cannot use the server at {endpoint.address}: {exc}") from None
        return QualityRow(method, speed, {}, f"{exc.code.name}: {exc.details}")
    return QualityRow(method, speed, dict(result.metrics))


def _figure(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.3e}"


def quality_cells(report: QualityReport) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The table: method, req/s and p50 at the setting, then each metric's mean ± its
    standard error, headed with ↑ (higher is better) or ↓."""
    arrows = report.info["higher_is_better"]
    header = (
        "method", "req/s", "p50 ms",
        *(f"{m} {'↑' if arrows[m] else '↓'}" for m in report.metrics),
    )  # fmt: skip
    rows = []
    for row in report.rows:
        speed = row.speed
        cells = [
            row.method,
            f"{speed.throughput:.2f}" if speed is not None and speed.ok else "-",
            f"{speed.p50_ms:.0f}" if speed is not None and speed.p50_ms is not None else "-",
        ]
        for name in report.metrics:
            m = row.metrics.get(name)
            cells.append("-" if m is None else f"{_figure(m.mean)} ± {_figure(m.stderr)}")
        rows.append(tuple(cells))
    return header, rows
