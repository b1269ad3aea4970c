"""Pictures of explanations: heatmap overlays, superpixel drawings, labelled panels with colour
bars, and contact sheets.

:func:`overlay` colours a map and blends it over the photo; :func:`segment_overlay` draws a
LIME / KernelSHAP answer as segment boundaries with the top positive and negative segments
tinted; :func:`method_panel` / :func:`explanation_panel` pick the drawing that suits a method
and add a title, text lines and a colour bar; :func:`contact_sheet` lays panels out in a grid.
Pixel work is done with torch on the tensors' own device, without per-pixel Python loops and
without matplotlib (PIL draws the text). The colour maps are piecewise-linear interpolations
between a few hand-picked sRGB anchors that approximate two perceptual maps:

* ``"inferno"``: sequential, black -> purple -> orange -> pale yellow, monotonic in lightness;
  for unsigned maps (Grad-CAM, occlusion, saliency magnitudes).
* ``"diverging"`` (alias ``"coolwarm"``): blue -> light grey -> red, symmetric in lightness
  around its neutral centre at 0.5; for signed maps (integrated gradients, SHAP values).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from xai_serve.errors import InvalidInput
from xai_serve.explainers.base import get_method, list_methods
from xai_serve.imaging import check_rgb, encode_png, from_pil, to_pil

__all__ = [
    "COLORMAPS",
    "PIXEL_METHODS",
    "PIXEL_SMOOTHING",
    "SIGN_EPS",
    "TINT_FLOOR",
    "ColorBar",
    "colorbar",
    "colormap",
    "contact_sheet",
    "contrast",
    "default_font",
    "explanation_panel",
    "is_pixel_method",
    "is_signed",
    "method_panel",
    "overlay",
    "overlay_png",
    "panel",
    "panel_grid",
    "save_png",
    "segment_boundaries",
    "segment_overlay",
    "signed_scale",
    "top_segments",
]

# Anchors at evenly spaced positions in [0, 1], as sRGB 0..255 triples.
_INFERNO = (
    (0, 0, 4),
    (31, 12, 72),
    (85, 15, 109),
    (136, 34, 106),
    (186, 54, 85),
    (227, 89, 50),
    (249, 140, 10),
    (249, 201, 50),
    (252, 255, 164),
)
_DIVERGING = (
    (59, 76, 192),
    (98, 130, 234),
    (141, 176, 254),
    (184, 208, 249),
    (221, 221, 221),
    (245, 196, 173),
    (244, 154, 123),
    (222, 96, 77),
    (180, 4, 38),
)

#: Colour map name -> its anchors (evenly spaced over [0, 1]).
COLORMAPS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "inferno": _INFERNO,
    "diverging": _DIVERGING,
    "coolwarm": _DIVERGING,
}

#: A heatmap counts as signed when its minimum is below ``-SIGN_EPS * max|heat|``.
SIGN_EPS = 1e-2

_QUANTILE_MAX = 1 << 24


def colormap(values: torch.Tensor, name: str = "inferno") -> torch.Tensor:
    """Map values in ``[0, 1]`` to colours.

    Args:
        values: ``float Tensor[...]``; values outside ``[0, 1]`` are clamped.
        name: ``"inferno"`` (sequential) or ``"diverging"`` / ``"coolwarm"`` (0.5 is neutral).

    Returns:
        ``uint8 Tensor[..., 3]`` sRGB, on ``values``' device.

    Raises:
        InvalidInput: unknown ``name``, non-floating ``values``, or NaN / Inf in ``values``.
    """
    anchors = COLORMAPS.get(name)
    if anchors is None:
        raise InvalidInput(f"name: unknown colour map {name!r}; use one of {sorted(COLORMAPS)}")
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        raise InvalidInput("values must be a floating-point tensor")
    if not bool(torch.isfinite(values).all()):
        raise InvalidInput("values contains NaN or Inf")
    table = torch.tensor(anchors, dtype=torch.float32, device=values.device)
    segments = table.shape[0] - 1
    x = values.float().clamp(0.0, 1.0) * segments
    lower = x.floor().long().clamp(max=segments - 1)
    frac = (x - lower).unsqueeze(-1)
    colour = table[lower] * (1.0 - frac) + table[lower + 1] * frac
    return colour.round_().clamp_(0, 255).to(torch.uint8)


def _prepare_heat(heat: torch.Tensor, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """``heat`` as finite float64 ``[H, W]`` on ``device``, resized bilinearly if needed."""
    if not isinstance(heat, torch.Tensor):
        raise InvalidInput(f"heat must be a torch.Tensor, got {type(heat).__name__}")
    if heat.dim() == 3 and heat.shape[0] == 1:
        heat = heat[0]
    if heat.dim() != 2 or heat.numel() == 0:
        raise InvalidInput(f"heat must be [h, w] with h, w >= 1, got {list(heat.shape)}")
    if heat.dtype == torch.bool or heat.is_complex():
        raise InvalidInput(f"heat must be a real-valued tensor, got {heat.dtype}")
    heat = heat.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(heat).all()):
        raise InvalidInput("heat contains NaN or Inf")
    if tuple(heat.shape) != size:
        shrinking = heat.shape[0] > size[0] or heat.shape[1] > size[1]
        heat = F.interpolate(
            heat[None, None], size=size, mode="bilinear", align_corners=False, antialias=shrinking
        )[0, 0]
    return heat


def is_signed(heat: torch.Tensor) -> bool:
    """Whether a map is signed: ``min(heat) < -SIGN_EPS * max|heat|``."""
    return bool(heat.amin() < -SIGN_EPS * heat.abs().amax())


def signed_scale(heat: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """The full-scale value of a signed map: ``max|heat|``, or the ``clip`` quantile of
    ``|heat|`` (never 0: a zero map gets the smallest positive float)."""
    mag = heat.abs().double()
    if clip is None:
        scale = mag.amax()
    else:
        if not 0.0 < float(clip) <= 1.0:
            raise InvalidInput(f"clip must be in (0, 1], got {clip}")
        flat = mag.flatten()
        if flat.numel() > _QUANTILE_MAX:  # torch.quantile's input limit: subsample evenly
            flat = flat[:: -(-flat.numel() // _QUANTILE_MAX)]
        scale = torch.quantile(flat, float(clip))
        if not scale > 0:  # mostly zeros: fall back to the maximum
            scale = mag.amax()
    return scale.clamp_min(torch.finfo(torch.float64).tiny)


def overlay(
    rgb: torch.Tensor,
    heat: torch.Tensor,
    *,
    alpha: float = 0.5,
    signed: bool | None = None,
    clip: float | None = None,
) -> torch.Tensor:
    """Blend a coloured heatmap over an image.

    Unsigned maps are normalised min-max to ``[0, 1]`` (a constant map becomes all zeros) and
    coloured with ``"inferno"`` at full weight: ``out = (1 - alpha) * rgb + alpha * colour``.
    Signed maps are scaled by ``max|heat|`` to ``[-1, 1]`` and coloured with ``"diverging"``
    centred on 0, with a per-pixel weight ``w = |v|``: ``out = (1 - alpha * w) * rgb +
    alpha * w * colour``, so areas with no attribution keep the photo.

    Args:
        rgb: ``uint8 Tensor[3, H, W]``.
        heat: ``float Tensor[h, w]`` (or ``[1, h, w]``); resized bilinearly to ``H, W`` when
            its size differs (antialiased when shrinking).
        alpha: the heatmap's opacity, in ``[0, 1]``.
        signed: ``None`` detects it: signed when ``min(heat) < -SIGN_EPS * max|heat|``.
        clip: signed maps only: full scale is this quantile of ``|heat|`` instead of its
            maximum (e.g. ``0.99``), so that a few extreme pixels (typical of per-pixel
            gradient attributions) do not wash out the rest; larger values saturate.

    Returns:
        ``uint8 Tensor[3, H, W]`` on ``rgb``'s device.

    Raises:
        InvalidInput: bad shapes or dtypes, ``alpha`` outside ``[0, 1]``, ``clip`` outside
            ``(0, 1]``, NaN / Inf in ``heat``.
    """
    check_rgb(rgb)
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidInput(f"alpha must be in [0, 1], got {alpha}")
    height, width = int(rgb.shape[1]), int(rgb.shape[2])
    h = _prepare_heat(heat, (height, width), rgb.device)

    if signed is None:
        signed = is_signed(h)
    if signed:
        v = (h / signed_scale(h, clip)).clamp_(-1.0, 1.0)
        colour = colormap((v + 1.0) * 0.5, "diverging")
        weight = alpha * v.abs().float()
    else:
        low = h.amin()
        span = h.amax() - low
        v = (h - low) / span.clamp_min(torch.finfo(torch.float64).tiny)
        colour = colormap(v, "inferno")
        weight = torch.full_like(v, alpha, dtype=torch.float32)
    colour_chw = colour.permute(2, 0, 1).float()
    base = rgb.float()
    out = base + weight * (colour_chw - base)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def overlay_png(
    rgb: torch.Tensor,
    heat: torch.Tensor,
    *,
    alpha: float = 0.5,
    signed: bool | None = None,
    clip: float | None = None,
) -> bytes:
    """:func:`overlay`, encoded as PNG bytes (see :func:`xai_serve.imaging.encode_png`)."""
    return encode_png(overlay(rgb, heat, alpha=alpha, signed=signed, clip=clip))


# --------------------------------------------------------------------------------------------
# Superpixel explanations (LIME, KernelSHAP)
# --------------------------------------------------------------------------------------------


def segment_boundaries(segments: torch.Tensor) -> torch.Tensor:
    """``bool Tensor[H, W]``: True on pixels whose left or upper neighbour lies in another
    segment (one-pixel lines between segments)."""
    if not isinstance(segments, torch.Tensor) or segments.dim() != 2:
        raise InvalidInput("segments must be an integer Tensor[H, W]")
    edge = torch.zeros(segments.shape, dtype=torch.bool, device=segments.device)
    edge[:, 1:] |= segments[:, 1:] != segments[:, :-1]
    edge[1:, :] |= segments[1:, :] != segments[:-1, :]
    return edge


def top_segments(weights: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)``: the ids of the ``k`` largest positive and the ``k`` most
    negative weights, strongest first (fewer when fewer have that sign)."""
    w = weights.detach().double().flatten()
    k = max(0, min(int(k), w.numel()))
    pos_v, pos_i = w.topk(k)
    neg_v, neg_i = (-w).topk(k)
    return pos_i[pos_v > 0], neg_i[neg_v > 0]


def segment_overlay(
    rgb: torch.Tensor,
    segments: torch.Tensor,
    weights: torch.Tensor,
    *,
    top: int = 3,
    negative: bool = True,
    alpha: float = 0.6,
) -> torch.Tensor:
    """Draw a superpixel explanation: every segment's boundary, the ``top`` most positive
    segments (and, with ``negative``, the ``top`` most negative ones) tinted with the
    ``"diverging"`` colour of their weight scaled by ``max|weights|`` (at least
    :data:`TINT_FLOOR` of full scale, so that a weak top segment still shows), the rest of the
    photo dimmed and desaturated so that the tinted segments stand out.

    Args:
        rgb: ``uint8 Tensor[3, H, W]``.
        segments: integer ``Tensor[H, W]`` of segment ids in ``[0, S)``.
        weights: ``float Tensor[S]``, one weight per segment id.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    check_rgb(rgb)
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidInput(f"alpha must be in [0, 1], got {alpha}")
    if not isinstance(segments, torch.Tensor) or tuple(segments.shape) != tuple(rgb.shape[1:]):
        raise InvalidInput(
            f"segments must be [H, W] = {list(rgb.shape[1:])}, got "
            f"{list(segments.shape) if isinstance(segments, torch.Tensor) else segments!r}"
        )
    if segments.dtype.is_floating_point or segments.dtype == torch.bool:
        raise InvalidInput(f"segments must be an integer tensor, got {segments.dtype}")
    if not isinstance(weights, torch.Tensor) or weights.dim() != 1 or weights.numel() == 0:
        raise InvalidInput("weights must be a float Tensor[S] with S >= 1")
    w = weights.detach().to(rgb.device, torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise InvalidInput("weights contains NaN or Inf")
    seg = segments.to(rgb.device, torch.int64)
    if int(seg.min()) < 0 or int(seg.max()) >= w.numel():
        raise InvalidInput(f"segment ids must lie in [0, {w.numel()}) for {w.numel()} weights")

    pos, neg = top_segments(w, top)
    chosen = torch.zeros(w.numel(), dtype=torch.bool, device=rgb.device)
    chosen[pos] = True
    if negative:
        chosen[neg] = True
    scale = w.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
    # Tinted segments are at least half-saturated, so a weak top segment is still visible.
    v = torch.sign(w) * (w.abs() / scale).clamp_min(TINT_FLOOR)
    colours = colormap(((v + 1.0) * 0.5).float(), "diverging").float()  # [S, 3]

    base = rgb.float()
    luma = (base * torch.tensor(_LUMA_WEIGHTS, device=rgb.device).view(3, 1, 1)).sum(0)
    dimmed = 0.8 * (0.4 * base + 0.6 * luma)
    pixel_chosen = chosen[seg]
    tint = colours[seg].permute(2, 0, 1)
    out = torch.where(pixel_chosen, base + alpha * (tint - base), dimmed)
    edge = segment_boundaries(seg)
    white = torch.full_like(out, 255.0)
    out = torch.where(edge & pixel_chosen, white, out)
    out = torch.where(edge & ~pixel_chosen, 0.5 * out + 0.5 * white, out)
    return out.round_().clamp_(0, 255).to(torch.uint8)


_LUMA_WEIGHTS = (0.299, 0.587, 0.114)

#: The weakest tint of a tinted segment, as a share of the full-scale colour.
TINT_FLOOR = 0.5


# --------------------------------------------------------------------------------------------
# Labelled panels, colour bars and contact sheets (PIL draws the text)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorBar:
    """A vertical colour bar beside a panel: ``cmap`` from top (1) to bottom (0), with
    ``labels`` spread evenly from top to bottom."""

    cmap: str
    labels: tuple[str, ...]


_FONT_SIZE = 13
_PAD = 6
_BAR_WIDTH = 12
_BACKGROUND = (255, 255, 255)
_TEXT = (20, 20, 20)


def default_font(size: int = _FONT_SIZE) -> Any:
    """PIL's default font at ``size`` (the fixed bitmap font where Pillow lacks FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_size(draw: Any, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def colorbar(height: int, cmap: str = "inferno", width: int = _BAR_WIDTH) -> torch.Tensor:
    """``uint8 Tensor[3, height, width]``: ``cmap`` from 1 at the top to 0 at the bottom."""
    if height < 1 or width < 1:
        raise InvalidInput(f"colour bar size must be positive, got {height}x{width}")
    ramp = torch.linspace(1.0, 0.0, height).unsqueeze(1).expand(height, width)
    return colormap(ramp, cmap).permute(2, 0, 1).contiguous()


def panel(
    image: torch.Tensor,
    *,
    title: str = "",
    lines: tuple[str, ...] | list[str] = (),
    bar: ColorBar | None = None,
) -> torch.Tensor:
    """``image`` with a title above it, text lines below it and an optional colour bar with
    tick labels on its right, on a white background.

    Returns:
        ``uint8 Tensor[3, H', W']``.
    """
    body = to_pil(image)
    font, bold = default_font(), default_font(_FONT_SIZE + 1)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 4
    title_h = (_text_size(probe, "Ag", bold)[1] + 6) if title else 0
    bar_w = 0
    if bar is not None:
        label_w = max((_text_size(probe, t, font)[0] for t in bar.labels), default=0)
        bar_w = _PAD + _BAR_WIDTH + 4 + label_w
    text_w = max((_text_size(probe, t, font)[0] for t in lines), default=0)
    title_w = _text_size(probe, title, bold)[0] if title else 0
    width = max(body.width + bar_w, text_w, title_w) + 2 * _PAD
    height = _PAD + title_h + body.height + len(lines) * line_h + _PAD + (4 if lines else 0)
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD), title, fill=_TEXT, font=bold)
    top = _PAD + title_h
    canvas.paste(body, (_PAD, top))
    if bar is not None:
        x = _PAD + body.width + _PAD
        canvas.paste(to_pil(colorbar(body.height, bar.cmap)), (x, top))
        draw.rectangle((x, top, x + _BAR_WIDTH - 1, top + body.height - 1), outline=(90, 90, 90))
        n = len(bar.labels)
        for i, text in enumerate(bar.labels):
            frac = i / (n - 1) if n > 1 else 0.5
            y = top + round(frac * (body.height - 1))
            th = _text_size(draw, text, font)[1]
            ty = min(max(top, y - th // 2 - 2), top + body.height - th - 3)
            draw.line((x + _BAR_WIDTH, y, x + _BAR_WIDTH + 2, y), fill=_TEXT)
            draw.text((x + _BAR_WIDTH + 4, ty), text, fill=_TEXT, font=font)
    y = top + body.height + 4
    for text in lines:
        draw.text((_PAD, y), text, fill=_TEXT, font=font)
        y += line_h
    return from_pil(canvas)


def _format_value(v: float) -> str:
    return f"{v:.2g}" if v != 0 else "0"


def explanation_panel(
    rgb: torch.Tensor,
    heat: torch.Tensor,
    *,
    title: str = "",
    lines: tuple[str, ...] | list[str] = (),
    segments: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    top: int = 3,
    alpha: float = 0.5,
    clip: float | None = 0.99,
    smooth: float | None = None,
) -> torch.Tensor:
    """One explanation drawn to be read at a glance, labelled, with its colour bar.

    With ``segments`` and ``weights`` (LIME, KernelSHAP): :func:`segment_overlay` with the
    ``top`` positive and negative segments tinted, and a diverging bar from ``-max|w|`` to
    ``+max|w|``. Otherwise a signed map (see :func:`is_signed`; integrated gradients, SHAP
    values) gets the diverging map centred on 0, full scale at the ``clip`` quantile of
    ``|heat|``; an unsigned map (Grad-CAM family, saliency, occlusion) the sequential
    ``"inferno"`` map from its minimum to its maximum. ``smooth`` (pixels) blurs the map with
    a Gaussian of that standard deviation before drawing: per-pixel attributions (integrated
    gradients, saliency) read better as regions; the panel then says so.

    Returns:
        ``uint8 Tensor[3, H', W']`` (see :func:`panel`).
    """
    lines = list(lines)
    if segments is not None and weights is not None:
        body = segment_overlay(rgb, segments, weights, top=top, alpha=max(alpha, 0.6))
        peak = float(weights.detach().double().abs().max()) if weights.numel() else 0.0
        bar = ColorBar("diverging", (f"+{_format_value(peak)}", "0", f"-{_format_value(peak)}"))
        pos, neg = top_segments(weights, top)
        lines.append(f"red: top {len(pos)} +, blue: top {len(neg)} - segments")
        return panel(body, title=title, lines=lines, bar=bar)
    h = _prepare_heat(heat, (int(rgb.shape[1]), int(rgb.shape[2])), rgb.device)
    if smooth is not None and smooth > 0:
        from xai_serve.explainers.perturbation import gaussian_blur

        h = gaussian_blur(h[None, None], float(smooth))[0, 0]
        lines.append(f"smoothed (sigma {smooth:g} px) for display")
    if is_signed(h):
        body = overlay(rgb, h, alpha=max(alpha, 0.7), signed=True, clip=clip)
        scale = _format_value(float(signed_scale(h, clip)))
        bar = ColorBar("diverging", (f"+{scale}", "0", f"-{scale}"))
    else:
        body = overlay(rgb, h, alpha=alpha, signed=False)
        low, high = float(h.amin()), float(h.amax())
        bar = ColorBar(
            "inferno",
            (_format_value(high), _format_value((low + high) / 2), _format_value(low)),
        )
    return panel(body, title=title, lines=lines, bar=bar)


def contact_sheet(
    cells: list[list[torch.Tensor | None]],
    *,
    column_titles: list[str] | None = None,
    title: str = "",
) -> torch.Tensor:
    """Lay panels out in a grid (rows of ``cells``; ``None`` leaves a cell empty), each column
    as wide as its widest panel, with optional column titles and a title above all.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    if not cells or not any(cells):
        raise InvalidInput("contact_sheet needs at least one row of panels")
    columns = max(len(row) for row in cells)
    if column_titles is not None and len(column_titles) != columns:
        raise InvalidInput(f"{len(column_titles)} column titles for {columns} columns")
    widths = [0] * columns
    heights = [0] * len(cells)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is not None:
                check_rgb(cell)
                widths[c] = max(widths[c], int(cell.shape[2]))
                heights[r] = max(heights[r], int(cell.shape[1]))
    font, big = default_font(_FONT_SIZE + 2), default_font(_FONT_SIZE + 5)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    head_h = _text_size(probe, "Ag", font)[1] + 2 * _PAD if column_titles else 0
    title_h = _text_size(probe, "Ag", big)[1] + 2 * _PAD if title else 0
    width = sum(widths) + _PAD * (columns + 1)
    height = title_h + head_h + sum(heights) + _PAD * (len(cells) + 1)
    canvas = Image.new("RGB", (max(width, 1), max(height, 1)), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD), title, fill=_TEXT, font=big)
    xs = [_PAD + sum(widths[:c]) + _PAD * c for c in range(columns)]
    if column_titles:
        for c, text in enumerate(column_titles):
            draw.text((xs[c] + _PAD, title_h + _PAD), text, fill=_TEXT, font=font)
    y = title_h + head_h + _PAD
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            if cell is not None:
                canvas.paste(to_pil(cell), (xs[c], y))
        y += heights[r] + _PAD
    return from_pil(canvas)


def panel_grid(panels: list[torch.Tensor], *, columns: int = 4, title: str = "") -> torch.Tensor:
    """Panels (e.g. one per explained class) in rows of at most ``columns``, in order, under
    ``title``: :func:`contact_sheet` of those rows. One panel and no title is that panel.

    Returns:
        ``uint8 Tensor[3, H, W]``.
    """
    if not panels:
        raise InvalidInput("panel_grid needs at least one panel")
    if int(columns) < 1:
        raise InvalidInput(f"columns must be >= 1, got {columns}")
    if len(panels) == 1 and not title:
        return panels[0]
    columns = min(int(columns), len(panels))
    rows: list[list[torch.Tensor | None]] = [
        list(panels[i : i + columns]) for i in range(0, len(panels), columns)
    ]
    return contact_sheet(rows, title=title)


def save_png(image: torch.Tensor, path: str | os.PathLike[str]) -> Path:
    """Write ``uint8 Tensor[3, H, W]`` to ``path`` as PNG (parent folders are created)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_png(image))
    return out


PIXEL_SMOOTHING = 2.0


def contrast(target: str, foil: str = "") -> str:
    """How a panel names the class it explains: ``"282 tiger cat"``, or with a foil
    ``"282 tiger cat vs 281 tabby"`` (the map explains the target's score minus the foil's)."""
    return f"{target} vs {foil}" if foil else target


def is_pixel_method(method: str) -> bool:
    """Whether ``method``'s maps are per-pixel attributions (its explainer's ``pixel_level``
    trait; a user-registered method counts too), drawn smoothed by ``PIXEL_SMOOTHING`` px."""
    return method in list_methods() and bool(get_method(method).pixel_level)


#: The methods registered at import whose maps are per-pixel attributions.
PIXEL_METHODS = frozenset(m for m in list_methods() if is_pixel_method(m))


def method_panel(
    rgb: torch.Tensor,
    method: str,
    heat: torch.Tensor,
    *,
    target: str = "",
    foil: str = "",
    title: str | None = None,
    segments: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    lines: tuple[str, ...] | list[str] = (),
) -> torch.Tensor:
    """:func:`explanation_panel` with the drawing suited to ``method``: titled with the method
    (or ``title``), a ``target`` line (e.g. ``"282 tiger cat"``; ``"282 tiger cat vs 281
    tabby"`` with a ``foil``) first, segments tinted when given, per-pixel methods
    (:func:`is_pixel_method`) smoothed for display."""
    text = [f"target {contrast(target, foil)}"] if target else []
    return explanation_panel(
        rgb,
        heat,
        title=method if title is None else title,
        lines=[*text, *lines],
        segments=segments,
        weights=weights,
        smooth=PIXEL_SMOOTHING if is_pixel_method(method) else None,
    )
