"""Tests of xai_serve.viz: colour maps and heatmap overlays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xai_serve.errors import InvalidInput
from xai_serve.viz import colormap, overlay, overlay_png


def _lightness(rgb_u8: torch.Tensor) -> torch.Tensor:
    """CIE L* of sRGB ``uint8 [..., 3]`` colours."""
    c = rgb_u8.double() / 255.0
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    y = linear @ torch.tensor([0.2126, 0.7152, 0.0722], dtype=torch.float64)
    return torch.where(y > (6 / 29) ** 3, 116 * y ** (1 / 3) - 16, y * (29 / 3) ** 3)


def _image(h: int = 12, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def _expected_blend(rgb: torch.Tensor, colour: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(1 - w) * rgb + w * colour`` in float64, for ``colour`` ``[3]`` or ``[3, H, W]``."""
    c = colour.double().reshape(3, *([1] * (rgb.dim() - 1))) if colour.dim() == 1 else colour
    return (1 - weight) * rgb.double() + weight * c.double()


# ---------------------------------------------------------------------------------- colormap


def test_colormap_endpoints_and_shape() -> None:
    ends = colormap(torch.tensor([0.0, 1.0]))
    assert ends.dtype == torch.uint8 and ends.shape == (2, 3)
    assert ends.tolist() == [[0, 0, 4], [252, 255, 164]]
    div = colormap(torch.tensor([0.0, 0.5, 1.0]), "diverging")
    assert div.tolist() == [[59, 76, 192], [221, 221, 221], [180, 4, 38]]
    assert torch.equal(
        colormap(torch.tensor([0.3]), "coolwarm"), colormap(torch.tensor([0.3]), "diverging")
    )
    assert colormap(torch.rand(4, 5, 6)).shape == (4, 5, 6, 3)
    # Out of range clamps to the ends.
    assert torch.equal(colormap(torch.tensor([-3.0, 7.0])), ends)


def test_colormap_interpolates_linearly_between_anchors() -> None:
    # Anchors sit at k/8; halfway between the first two is their mean.
    mid = colormap(torch.tensor([1 / 16]))
    assert mid.tolist() == [[16, 6, 38]]  # round((0,0,4) + (31,12,72)) / 2)


def test_inferno_lightness_monotonic() -> None:
    light = _lightness(colormap(torch.linspace(0, 1, 256)))
    assert torch.all(light[1:] - light[:-1] >= -0.5)
    assert light[-1] - light[0] > 90


def test_diverging_symmetric_and_neutral_at_centre() -> None:
    x = torch.linspace(0, 1, 257)
    colours = colormap(x, "diverging")
    centre = colours[128]
    assert centre[0] == centre[1] == centre[2]  # grey: no hue at 0
    light = _lightness(colours)
    assert torch.allclose(light, light.flip(0), atol=6.0)  # same lightness at +v and -v
    assert int(light.argmax()) in range(120, 137)
    # Blue below the centre, red above.
    assert colours[:100, 2].double().mean() > colours[:100, 0].double().mean()
    assert colours[157:, 0].double().mean() > colours[157:, 2].double().mean()


def test_colormap_refuses_bad_input() -> None:
    with pytest.raises(InvalidInput, match="name"):
        colormap(torch.zeros(2), "jet")
    with pytest.raises(InvalidInput, match="NaN"):
        colormap(torch.tensor([0.1, float("nan")]))
    with pytest.raises(InvalidInput, match="floating"):
        colormap(torch.zeros(2, dtype=torch.int64))


# ---------------------------------------------------------------------------------- overlay


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_constant_heat_blends_colormap_zero(alpha: float) -> None:
    rgb = _image()
    out = overlay(rgb, torch.full((12, 16), 3.7), alpha=alpha)
    assert out.dtype == torch.uint8 and out.shape == rgb.shape
    expected = _expected_blend(rgb, colormap(torch.tensor(0.0)), torch.tensor(alpha))
    assert (out.double() - expected).abs().max() <= 1.0
    if alpha == 0.0:
        assert torch.equal(out, rgb)


def test_unsigned_min_max_and_inferno() -> None:
    rgb = _image(4, 5)
    heat = torch.linspace(2.0, 10.0, 20).reshape(4, 5)
    out = overlay(rgb, heat, alpha=0.5)
    v = (heat - 2.0) / 8.0
    expected = _expected_blend(rgb, colormap(v).permute(2, 0, 1), torch.tensor(0.5))
    assert (out.double() - expected).abs().max() <= 1.0
    # The hottest pixel carries the top colour.
    top = _expected_blend(rgb[:, 3, 4], colormap(torch.tensor(1.0)), torch.tensor(0.5))
    assert (out[:, 3, 4].double() - top).abs().max() <= 1.0


def test_signed_detected_and_neutral_keeps_photo() -> None:
    rgb = _image(3, 3)
    heat = torch.tensor([[-2.0, -1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 4.0]])
    out = overlay(rgb, heat, alpha=0.6)
    zero = heat == 0
    assert torch.equal(out[:, zero], rgb[:, zero])  # w = |v| = 0: the photo shows through
    v = heat / 4.0
    colours = colormap((v + 1) / 2, "diverging").permute(2, 0, 1)
    expected = _expected_blend(rgb, colours, 0.6 * v.abs())
    assert (out.double() - expected).abs().max() <= 1.0
    # Full positive weight: the red end of the map.
    full = _expected_blend(
        rgb[:, 2, 2], colormap(torch.tensor(1.0), "diverging"), torch.tensor(0.6)
    )
    assert (out[:, 2, 2].double() - full).abs().max() <= 1.0


def test_sign_detection_threshold_and_override() -> None:
    rgb = _image(2, 2)
    noisy = torch.tensor([[1.0, 0.5], [0.2, -1e-4]])  # negligible negative: unsigned
    assert torch.equal(overlay(rgb, noisy), overlay(rgb, noisy, signed=False))
    assert not torch.equal(overlay(rgb, noisy), overlay(rgb, noisy, signed=True))
    signed = torch.tensor([[1.0, 0.5], [0.2, -0.5]])
    assert torch.equal(overlay(rgb, signed), overlay(rgb, signed, signed=True))
    negative = -torch.rand(2, 2) - 0.1  # all negative: signed (blue)
    assert torch.equal(overlay(rgb, negative), overlay(rgb, negative, signed=True))


def test_all_zero_heat_signed_is_photo_no_nan() -> None:
    rgb = _image()
    assert torch.equal(overlay(rgb, torch.zeros(12, 16), signed=True), rgb)


def test_heat_resized_bilinearly() -> None:
    rgb = _image(16, 24)
    heat = torch.rand(4, 6, generator=torch.Generator().manual_seed(1))
    out = overlay(rgb, heat, alpha=0.7)
    assert out.shape == (3, 16, 24) and out.dtype == torch.uint8
    big = F.interpolate(heat[None, None].double(), size=(16, 24), mode="bilinear")[0, 0]
    assert torch.equal(out, overlay(rgb, big, alpha=0.7))
    # [1, h, w] is accepted too; a larger map is shrunk.
    assert torch.equal(overlay(rgb, heat[None], alpha=0.7), out)
    assert overlay(rgb, torch.rand(64, 64)).shape == (3, 16, 24)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_heat_refused(bad: float) -> None:
    heat = torch.zeros(12, 16)
    heat[3, 4] = bad
    with pytest.raises(InvalidInput, match="heat contains NaN or Inf"):
        overlay(_image(), heat)


def test_overlay_refuses_bad_arguments() -> None:
    with pytest.raises(InvalidInput, match="alpha"):
        overlay(_image(), torch.zeros(12, 16), alpha=1.5)
    with pytest.raises(InvalidInput, match="rgb"):
        overlay(_image().float(), torch.zeros(12, 16))
    with pytest.raises(InvalidInput, match="rgb"):
        overlay(_image()[:2], torch.zeros(12, 16))
    with pytest.raises(InvalidInput, match="heat"):
        overlay(_image(), torch.zeros(2, 12, 16))
    with pytest.raises(InvalidInput, match="heat"):
        overlay(_image(), torch.zeros(12, 16, dtype=torch.complex64))


def test_overlay_png_decodes_to_overlay() -> None:
    from xai_serve.serving.codec import decode_image

    rgb = _image(20, 30)
    heat = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    data = overlay_png(rgb, heat, alpha=0.4)
    assert data.startswith(b"\x89PNG")
    assert torch.equal(decode_image(data, max_pixels=10_000), overlay(rgb, heat, alpha=0.4))
