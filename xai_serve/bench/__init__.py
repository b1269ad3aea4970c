"""``xai-serve bench``: a load generator for any xai_serve or Open Inference Protocol endpoint.

Typical use::

    from xai_serve.bench import Endpoint, Plan, Setting, Workload, run_bench

    report = run_bench(
        Endpoint("localhost:50051"),
        Workload(model="efficientnet_lite0", method="gradcam", protocol="explain"),
        [Setting("concurrency", c) for c in (1, 4, 16)],
        Plan(duration_s=10, warmup_s=2),
    )
    for row in report.rows:
        row.setting.label, row.throughput, row.p50_ms, row.queue_ms, row.batch_size
    report.to_json("bench.json"); report.to_csv("bench.csv"); plot_png(report, "bench.png")

:mod:`xai_serve.bench.load` drives the requests (closed loop at a concurrency, open loop at a
rate), :mod:`xai_serve.bench.report` defines every figure of a :class:`Row`,
:mod:`xai_serve.bench.plot` draws the picture, :mod:`xai_serve.bench.quality` puts methods'
speed and quality metrics side by side (``--quality``) and :mod:`xai_serve.bench.local` runs a
server in this process for a quick measurement.
"""

from xai_serve.bench.load import (
    PROTOCOLS,
    BenchProgress,
    Endpoint,
    Inputs,
    Plan,
    Workload,
    arrival_offsets,
    arun_bench,
    run_bench,
)
from xai_serve.bench.local import LocalServer
from xai_serve.bench.plot import PLOT_SIZE, plot_png
from xai_serve.bench.quality import QualityReport, QualityRow, quality_cells, run_quality
from xai_serve.bench.report import (
    PERCENTILES,
    BenchReport,
    Row,
    Sample,
    Setting,
    percentile,
    summarise,
    table_cells,
)

__all__ = [
    "PERCENTILES",
    "PLOT_SIZE",
    "PROTOCOLS",
    "BenchProgress",
    "BenchReport",
    "Endpoint",
    "Inputs",
    "LocalServer",
    "Plan",
    "QualityReport",
    "QualityRow",
    "Row",
    "Sample",
    "Setting",
    "Workload",
    "arrival_offsets",
    "arun_bench",
    "percentile",
    "plot_png",
    "quality_cells",
    "run_bench",
    "run_quality",
    "summarise",
    "table_cells",
]
