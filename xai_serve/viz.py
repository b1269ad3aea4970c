"""Heatmap overlays: colour an attribution map and blend it over the photo it explains.

All work is done with torch on the tensors' own device, without per-pixel Python loops and
without matplotlib. The colour maps are piecewise-linear interpolations between a few
hand-picked sRGB anchors that approximate two perceptual maps:

* ``"inferno"``: sequential, black -> purple -> orange -> pale yellow, monotonic in lightness;
  for unsigned maps (Grad-CAM, occlusion, saliency magnitudes).
* ``"diverging"`` (alias ``"coolwarm"``): blue -> light grey -> red, symmetric in lightness
  around its neutral centre at 0.5; for signed maps (integrated gradients, SHAP values).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from xai_serve.errors import InvalidInput

__all__ = ["COLORMAPS", "SIGN_EPS", "colormap", "overlay", "overlay_png"]

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


def _check_rgb(rgb: torch.Tensor) -> None:
    if not isinstance(rgb, torch.Tensor):
        raise InvalidInput(f"rgb must be a torch.Tensor, got {type(rgb).__name__}")
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[0] != 3 or rgb.numel() == 0:
        raise InvalidInput(
            f"rgb must be uint8 [3, H, W] with H, W >= 1, got {rgb.dtype} {list(rgb.shape)}"
        )


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


def overlay(
    rgb: torch.Tensor, heat: torch.Tensor, *, alpha: float = 0.5, signed: bool | None = None
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

    Returns:
        ``uint8 Tensor[3, H, W]`` on ``rgb``'s device.

    Raises:
        InvalidInput: bad shapes or dtypes, ``alpha`` outside ``[0, 1]``, NaN / Inf in ``heat``.
    """
    _check_rgb(rgb)
    if not 0.0 <= float(alpha) <= 1.0:
        raise InvalidInput(f"alpha must be in [0, 1], got {alpha}")
    height, width = int(rgb.shape[1]), int(rgb.shape[2])
    h = _prepare_heat(heat, (height, width), rgb.device)

    peak = h.abs().amax()
    if signed is None:
        signed = bool(h.amin() < -SIGN_EPS * peak)
    if signed:
        v = h / peak.clamp_min(torch.finfo(torch.float64).tiny)
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
    rgb: torch.Tensor, heat: torch.Tensor, *, alpha: float = 0.5, signed: bool | None = None
) -> bytes:
    """:func:`overlay`, encoded as PNG bytes (see :func:`xai_serve.serving.codec.encode_png`)."""
    from xai_serve.serving.codec import encode_png  # PIL only when a PNG is asked for

    return encode_png(overlay(rgb, heat, alpha=alpha, signed=signed))
