"""Pictures of concept-level explanations: a TCAV bar chart, Network Dissection's units with
their masks and its detectors per category, and a grid of feature visualisations.

* :func:`tcav_chart`: one bar per concept, its height the mean TCAV score (0 at the axis, 1 at
  :data:`PLOT_HEIGHT` pixels above it), an error bar of one standard deviation, a red star
  above each significant concept; the random concepts' scores as a grey bar and a dashed line
  across the plot at their mean.
* :func:`mask_overlay` / :func:`unit_row` / :func:`dissection_figure`: a unit's thresholded
  activation mask over probe images (the image kept inside the mask, dimmed outside, the mask's
  edge outlined), one row per unit, above :func:`detector_chart`.
* :func:`detector_chart`: detectors per concept category as horizontal bars, with the concepts
  they detect; with ``lines`` it is the whole picture of a dissection known only as a table.
* :func:`objective_grid`: visualised images in a grid, each with its objective and value.

Drawing is PIL's (no matplotlib); rectangles and stars are drawn without anti-aliasing, so
their pixels have exactly the colours named here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from xai_serve.errors import InvalidInput
from xai_serve.imaging import check_rgb, from_pil
from xai_serve.viz import contact_sheet, default_font, panel

__all__ = [
    "BAR_COLOR",
    "DETECTOR_COLOR",
    "MARK_COLOR",
    "OUTLINE_COLOR",
    "PLOT_HEIGHT",
    "RANDOM_COLOR",
    "UNSURE_COLOR",
    "CategoryCount",
    "UnitExamples",
    "detector_chart",
    "dissection_figure",
    "mask_overlay",
    "objective_grid",
    "tcav_chart",
    "unit_row",
]

#: Pixels from the TCAV chart's axis (score 0) to score 1.
PLOT_HEIGHT = 200
#: A significant concept's bar.
BAR_COLOR = (49, 104, 176)
#: A concept whose scores do not differ significantly from the random ones.
UNSURE_COLOR = (166, 189, 219)
#: The random concepts' bar and the dashed line at their mean.
RANDOM_COLOR = (150, 150, 150)
#: The star above a significant concept.
MARK_COLOR = (200, 30, 30)
#: The edge of a unit's activation mask.
OUTLINE_COLOR = (255, 214, 0)
#: A category's detector bar.
DETECTOR_COLOR = (72, 140, 96)

_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)
_AXIS = (60, 60, 60)
_ERROR = (30, 30, 30)
_PAD = 8
_BAR = 34
_GAP = 14
_STAR = 7  # outer radius of the significance star, pixels
_DIM = 0.35  # brightness kept outside a unit's mask


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: object) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)  # type: ignore[arg-type]
    return int(right - left), int(bottom - top)


def _probe() -> ImageDraw.ImageDraw:
    return ImageDraw.Draw(Image.new("RGB", (1, 1)))


def _star(draw: ImageDraw.ImageDraw, cx: float, cy: float, r: float, colour: tuple) -> None:
    """A filled five-pointed star centred at ``(cx, cy)`` with outer radius ``r``."""
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else r * 0.45
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
    draw.polygon(points, fill=colour)


def _check_scores(name: str, values: Sequence[float], count: int) -> list[float]:
    out = [float(v) for v in values]
    if len(out) != count:
        raise InvalidInput(f"{name}: {len(out)} values for {count} concepts")
    if any(not (v == v) for v in out):  # NaN
        raise InvalidInput(f"{name} has NaN")
    return out


def tcav_chart(
    concepts: Sequence[str],
    means: Sequence[float],
    stds: Sequence[float],
    significant: Sequence[bool],
    *,
    random_mean: float | None = None,
    random_std: float | None = None,
    title: str = "",
    lines: Sequence[str] = (),
) -> torch.Tensor:
    """A bar chart of TCAV scores.

    Each concept's bar rises ``round(mean * PLOT_HEIGHT)`` pixels above the axis (scores are
    clamped to [0, 1]) in :data:`BAR_COLOR` if ``significant``, else :data:`UNSURE_COLOR`; a
    black error bar spans ``mean - std .. mean + std``; a :data:`MARK_COLOR` star stands above
    each significant concept. With ``random_mean``, a last bar ``"random"`` in
    :data:`RANDOM_COLOR` (and its ``random_std``) and a dashed line across the plot at that
    height show the null. Names go under the bars, ``title`` above, ``lines`` below.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    names = [str(c) for c in concepts]
    if not names:
        raise InvalidInput("tcav_chart needs at least one concept")
    n = len(names)
    mean = _check_scores("means", means, n)
    std = _check_scores("stds", stds, n)
    marks = [bool(s) for s in significant]
    if len(marks) != n:
        raise InvalidInput(f"significant: {len(marks)} values for {n} concepts")
    bars = [(names[i], mean[i], std[i], BAR_COLOR if marks[i] else UNSURE_COLOR, marks[i])
            for i in range(n)]  # fmt: skip
    if random_mean is not None:
        bars.append(("random", float(random_mean), float(random_std or 0.0), RANDOM_COLOR, False))

    font, bold = default_font(), default_font(15)
    probe = _probe()
    label_h = _text_size(probe, "Ag", font)[1]
    slots = [max(_BAR + _GAP, _text_size(probe, b[0], font)[0] + 6) for b in bars]
    axis_w = _text_size(probe, "1.00", font)[0] + 10
    title_h = _text_size(probe, "Ag", bold)[1] + _PAD if title else 0
    top_room = 2 * _STAR + 10  # a star above a full bar
    line_h = label_h + 4
    legend = ["* significant (p < alpha, t-test vs the random CAVs)"]
    if random_mean is not None:
        legend.append("dashed: mean score of the random CAVs")
    text = [*legend, *lines]
    width = max(
        _PAD + axis_w + sum(slots) + _PAD,
        _PAD + max(_text_size(probe, t, font)[0] for t in text) + _PAD,
        _PAD + (_text_size(probe, title, bold)[0] if title else 0) + _PAD,
    )
    y0 = _PAD + title_h + top_room + PLOT_HEIGHT  # the axis row: score 0 sits just above it
    height = y0 + 1 + 4 + label_h + _PAD + len(text) * line_h + _PAD
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD), title, fill=_TEXT, font=bold)
    x_axis = _PAD + axis_w
    plot_right = x_axis + sum(slots)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y0 - round(tick * PLOT_HEIGHT)
        label = f"{tick:.2f}"
        tw, th = _text_size(draw, label, font)
        draw.text((x_axis - 6 - tw, y - th // 2 - 2), label, fill=_TEXT, font=font)
        draw.line((x_axis - 4, y, x_axis - 1, y), fill=_AXIS)
    draw.line((x_axis - 1, y0 - PLOT_HEIGHT, x_axis - 1, y0), fill=_AXIS)
    draw.line((x_axis - 1, y0, plot_right, y0), fill=_AXIS)

    def height_of(score: float) -> int:
        return round(min(1.0, max(0.0, score)) * PLOT_HEIGHT)

    left = x_axis
    for (name, m, s, colour, mark), slot in zip(bars, slots, strict=True):
        bx = left + (slot - _BAR) // 2
        h = height_of(m)
        if h > 0:
            draw.rectangle((bx, y0 - h, bx + _BAR - 1, y0 - 1), fill=colour)
        cx = bx + _BAR // 2
        lo, hi = y0 - height_of(m - s), y0 - height_of(m + s)
        if s > 0 and lo != hi:
            draw.line((cx, hi, cx, lo), fill=_ERROR, width=1)
            draw.line((cx - 5, hi, cx + 5, hi), fill=_ERROR)
            draw.line((cx - 5, lo, cx + 5, lo), fill=_ERROR)
        if mark:
            _star(draw, cx, min(hi, y0 - h) - _STAR - 4, _STAR, MARK_COLOR)
        tw = _text_size(draw, name, font)[0]
        draw.text((left + (slot - tw) // 2, y0 + 4), name, fill=_TEXT, font=font)
        left += slot
    if random_mean is not None:
        y = y0 - height_of(float(random_mean))
        for x in range(x_axis, plot_right, 8):
            draw.line((x, y, min(x + 3, plot_right - 1), y), fill=RANDOM_COLOR)
    y = y0 + 4 + label_h + _PAD
    for t in text:
        draw.text((_PAD, y), t, fill=_TEXT, font=font)
        y += line_h
    return from_pil(canvas)


# --------------------------------------------------------------------------------------------
# Network Dissection
# --------------------------------------------------------------------------------------------


def mask_overlay(
    rgb: torch.Tensor, mask: torch.Tensor, *, dim: float = _DIM, outline: bool = True
) -> torch.Tensor:
    """``rgb`` with a binary ``mask`` shown: pixels inside kept, pixels outside scaled by
    ``dim`` (rounded), and the mask's edge (pixels inside with a 4-neighbour outside, or on
    the image border) in :data:`OUTLINE_COLOR`.

    Args:
        rgb: ``uint8 Tensor[3, H, W]``.
        mask: ``bool Tensor[H, W]`` (another size is resized, nearest).

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    check_rgb(rgb)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise InvalidInput("mask must be a Tensor[H, W]")
    size = (int(rgb.shape[1]), int(rgb.shape[2]))
    m = mask.detach().to(rgb.device).bool()
    if tuple(m.shape) != size:
        m = F.interpolate(m[None, None].float(), size=size, mode="nearest-exact")[0, 0] > 0.5
    dimmed = (rgb.float() * dim).round_().clamp_(0, 255).to(torch.uint8)
    out = torch.where(m[None], rgb, dimmed)
    if outline:
        padded = F.pad(m[None, None].float(), (1, 1, 1, 1), value=0.0)
        cross = (
            padded[..., :-2, 1:-1] * padded[..., 2:, 1:-1]
            * padded[..., 1:-1, :-2] * padded[..., 1:-1, 2:]
        )  # fmt: skip
        edge = m & (cross[0, 0] < 0.5)
        colour = torch.tensor(OUTLINE_COLOR, dtype=torch.uint8, device=rgb.device)
        out = torch.where(edge[None], colour[:, None, None], out)
    return out.contiguous()


@dataclass(frozen=True)
class UnitExamples:
    """One unit to draw: its best ``concept`` (of ``category``) and ``iou``, and example probe
    ``images`` (``uint8 Tensor[E, 3, H, W]``) with the unit's thresholded activation
    ``masks`` on them (``bool Tensor[E, H, W]``)."""

    unit: int
    concept: str
    category: str
    iou: float
    images: torch.Tensor
    masks: torch.Tensor


@dataclass(frozen=True)
class CategoryCount:
    """A category's detectors: ``units`` in all, and per concept (most first)."""

    category: str
    units: int
    concepts: Mapping[str, int]


def _upscale(rgb: torch.Tensor, scale: int) -> torch.Tensor:
    if scale == 1:
        return rgb
    return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)


def unit_row(
    example: UnitExamples, *, scale: int = 2, min_iou: float | None = None
) -> torch.Tensor:
    """One unit as a row: a label (unit, concept, category, IoU) and its example images with
    :func:`mask_overlay`, each image enlarged ``scale`` times (nearest)."""
    images, masks = example.images, example.masks
    if images.dim() != 4 or masks.dim() != 3 or images.shape[0] != masks.shape[0]:
        raise InvalidInput("UnitExamples: images [E, 3, H, W] and masks [E, H, W] must match")
    drawn = [_upscale(mask_overlay(images[e], masks[e]), scale) for e in range(images.shape[0])]
    below = min_iou is not None and example.iou <= min_iou
    lines = [f"{example.concept} ({example.category})",
             f"IoU {example.iou:.3f}{' (below min)' if below else ''}"]  # fmt: skip
    if not drawn:
        blank = torch.full((3, 8, 8), 255, dtype=torch.uint8)
        return panel(blank, title=f"unit {example.unit}", lines=lines)
    gap = torch.full((3, drawn[0].shape[1], _PAD), 255, dtype=torch.uint8)
    strip = torch.cat([t for d in drawn for t in (d, gap)][:-1], dim=2)
    return panel(strip, title=f"unit {example.unit}", lines=lines)


def detector_chart(
    categories: Sequence[CategoryCount],
    *,
    total_units: int,
    min_iou: float,
    title: str = "",
    lines: Sequence[str] = (),
    bar_width: int = 240,
) -> torch.Tensor:
    """Detectors per category as horizontal bars in :data:`DETECTOR_COLOR`, each
    ``round(units / total_units * bar_width)`` pixels long, labelled with the count and the
    concepts detected (``red 3, blue 1``); ``lines`` (e.g. the top units) below.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    if total_units < 1:
        raise InvalidInput(f"total_units must be >= 1, got {total_units}")
    font, bold = default_font(), default_font(15)
    probe = _probe()
    row_h = _text_size(probe, "Ag", font)[1] + 10
    name_w = max((_text_size(probe, c.category, font)[0] for c in categories), default=0) + 10
    detected = sum(c.units for c in categories)
    head = [f"{detected} of {total_units} units detect a concept (IoU > {min_iou:g})"]
    notes = [
        f"{c.units} " + (", ".join(f"{k} {v}" for k, v in c.concepts.items()) or "-")
        for c in categories
    ]
    note_w = max((_text_size(probe, t, font)[0] for t in notes), default=0)
    text_w = max((_text_size(probe, t, font)[0] for t in [*head, *lines]), default=0)
    title_h = _text_size(probe, "Ag", bold)[1] + _PAD if title else 0
    width = max(_PAD + name_w + bar_width + 8 + note_w + _PAD, 2 * _PAD + text_w,
                2 * _PAD + (_text_size(probe, title, bold)[0] if title else 0))  # fmt: skip
    height = (_PAD + title_h + row_h * (len(head) + len(categories) + len(lines)) + _PAD
              + (row_h // 2 if lines else 0))  # fmt: skip
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD), title, fill=_TEXT, font=bold)
    y = _PAD + title_h
    for t in head:
        draw.text((_PAD, y), t, fill=_TEXT, font=font)
        y += row_h
    x0 = _PAD + name_w
    for c, note in zip(categories, notes, strict=True):
        draw.text((_PAD, y + 2), c.category, fill=_TEXT, font=font)
        length = round(c.units / total_units * bar_width)
        if length > 0:
            draw.rectangle((x0, y + 2, x0 + length - 1, y + row_h - 4), fill=DETECTOR_COLOR)
        draw.line((x0 - 1, y, x0 - 1, y + row_h - 2), fill=_AXIS)
        draw.text((x0 + length + 6, y + 2), note, fill=_TEXT, font=font)
        y += row_h
    y += row_h // 2 if lines else 0
    for t in lines:
        draw.text((_PAD, y), t, fill=_TEXT, font=font)
        y += row_h
    return from_pil(canvas)


def dissection_figure(
    units: Sequence[UnitExamples],
    categories: Sequence[CategoryCount],
    *,
    total_units: int,
    min_iou: float,
    title: str = "",
    lines: Sequence[str] = (),
    scale: int = 2,
    columns: int = 1,
) -> torch.Tensor:
    """The units (:func:`unit_row`), ``columns`` to a row, then :func:`detector_chart` (with
    ``lines``), under ``title``.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    chart = detector_chart(categories, total_units=total_units, min_iou=min_iou, lines=lines)
    drawn = [unit_row(u, scale=scale, min_iou=min_iou) for u in units]
    if not drawn:
        return contact_sheet([[chart]], title=title)
    step = max(1, int(columns))
    grid: list[list[torch.Tensor | None]] = [
        list(drawn[i : i + step]) for i in range(0, len(drawn), step)
    ]
    return contact_sheet([[contact_sheet(grid)], [chart]], title=title)


# --------------------------------------------------------------------------------------------
# Feature visualisation
# --------------------------------------------------------------------------------------------


def objective_grid(
    images: Sequence[torch.Tensor],
    labels: Sequence[Sequence[str]],
    *,
    columns: int = 4,
    title: str = "",
) -> torch.Tensor:
    """Images in rows of at most ``columns``, each as it is (pixel for pixel) with its text
    lines (e.g. the objective and its final value) under it, under ``title``.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    if not images:
        raise InvalidInput("objective_grid needs at least one image")
    if len(labels) != len(images):
        raise InvalidInput(f"{len(labels)} labels for {len(images)} images")
    for image in images:
        check_rgb(image)
    panels = [panel(image, lines=list(text)) for image, text in zip(images, labels, strict=True)]
    columns = max(1, min(int(columns), len(panels)))
    rows: list[list[torch.Tensor | None]] = [
        list(panels[i : i + columns]) for i in range(0, len(panels), columns)
    ]
    return contact_sheet(rows, title=title)
