"""The picture of a sweep: latency percentiles (p50, p90, p99) and throughput against the
setting (concurrency or rate), two charts side by side on a fixed-size canvas, drawn with PIL
(no plotting library). The settings sit at even steps along the x axis in increasing order,
so a geometric sweep (1, 4, 16, 64) reads as a log scale. Settings where no request succeeded
have no latency point."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from xai_serve.bench.report import BenchReport, Row
from xai_serve.errors import InvalidInput
from xai_serve.viz import default_font

__all__ = ["PLOT_SIZE", "plot_png"]

#: ``(width, height)`` of the picture in pixels.
PLOT_SIZE = (1000, 440)

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_GRID = (225, 225, 225)
_SERIES = {
    "p50": (31, 119, 180),
    "p90": (255, 127, 14),
    "p99": (214, 39, 40),
    "req/s": (44, 160, 44),
}
_TOP, _BOTTOM, _LEFT, _RIGHT = 64, 56, 70, 24


def _nice_top(value: float) -> float:
    """The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 times a power of ten) that is
    >= ``value`` (1 for nothing)."""
    if not value > 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if step * power >= value:
            return step * power
    return 10 * power


def _label(value: float) -> str:
    return f"{value:g}" if value < 1e5 else f"{value:.0e}"


def _chart(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    xs: list[str],
    series: dict[str, list[float | None]],
    title: str,
    x_title: str,
    font: Any,
) -> None:
    left, top, right, bottom = box
    values = [v for vs in series.values() for v in vs if v is not None]
    y_top = _nice_top(max(values, default=0.0) * 1.05)
    draw.text((left, top - 22), title, fill=_INK, font=font)
    for i in range(6):  # y grid and ticks
        y = bottom - (bottom - top) * i / 5
        draw.line((left, y, right, y), fill=_GRID)
        text = _label(y_top * i / 5)
        width = draw.textlength(text, font=font)
        draw.text((left - 6 - width, y - 7), text, fill=_INK, font=font)
    draw.rectangle((left, top, right, bottom), outline=_INK)
    step = (right - left) / max(1, len(xs))
    positions = [left + step * (i + 0.5) for i in range(len(xs))]
    for x, text in zip(positions, xs, strict=True):
        draw.line((x, bottom, x, bottom + 4), fill=_INK)
        draw.text((x - draw.textlength(text, font=font) / 2, bottom + 6), text, fill=_INK,
                  font=font)  # fmt: skip
    draw.text(((left + right) / 2 - draw.textlength(x_title, font=font) / 2, bottom + 24),
              x_title, fill=_INK, font=font)  # fmt: skip
    legend_x = left + 8
    for name, vs in series.items():
        colour = _SERIES[name]
        points = [
            (x, bottom - (bottom - top) * v / y_top)
            for x, v in zip(positions, vs, strict=True)
            if v is not None
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        if len(series) > 1:
            draw.line((legend_x, top + 12, legend_x + 16, top + 12), fill=colour, width=2)
            draw.text((legend_x + 20, top + 5), name, fill=_INK, font=font)
            legend_x += 28 + int(draw.textlength(name, font=font))


def plot_png(report: BenchReport, path: str | Path | None = None) -> bytes:
    """A PNG (:data:`PLOT_SIZE`) of ``report``'s latency percentiles and throughput against
    its settings; written to ``path`` too, when given.

    Raises:
        InvalidInput: the report has no rows, or mixes concurrency and rate settings.
    """
    rows: list[Row] = sorted(report.rows, key=lambda r: r.setting.value)
    if not rows:
        raise InvalidInput("nothing to plot: the report has no rows")
    modes = {r.setting.mode for r in rows}
    if len(modes) != 1:
        raise InvalidInput("cannot plot concurrency and rate settings on one axis")
    mode = modes.pop()
    x_title = (
        "concurrency (requests in flight)" if mode == "concurrency" else "offered rate (req/s)"
    )
    xs = [_label(float(r.setting.value)) for r in rows]
    image = Image.new("RGB", PLOT_SIZE, _BACKGROUND)
    draw = ImageDraw.Draw(image)
    font = default_font(13)
    info = report.info
    heading = " ".join(
        str(part)
        for part in (info.get("model"), info.get("method"), f"via {info.get('protocol')}",
                     f"at {info.get('server')}")
        if part is not None and "None" not in str(part)
    )  # fmt: skip
    draw.text((_LEFT, 10), heading or "xai-serve bench", fill=_INK, font=default_font(15))
    width, height = PLOT_SIZE
    middle = width // 2
    latency = {
        "p50": [r.p50_ms for r in rows],
        "p90": [r.p90_ms for r in rows],
        "p99": [r.p99_ms for r in rows],
    }
    _chart(draw, (_LEFT, _TOP, middle - _RIGHT, height - _BOTTOM), xs, latency,
           "latency (ms)", x_title, font)  # fmt: skip
    _chart(draw, (middle + _LEFT, _TOP, width - _RIGHT, height - _BOTTOM), xs,
           {"req/s": [r.throughput for r in rows]}, "throughput (successful answers/s)",
           x_title, font)  # fmt: skip
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    data = buf.getvalue()
    if path is not None:
        out = Path(path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        except OSError as exc:
            raise InvalidInput(f"cannot write {out}: {exc.strerror or exc}") from None
    return data
