"""Tests of xai_serve.viz: colour maps, overlays, superpixel drawings, panels, sheets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xai_serve import viz
from xai_serve.errors import InvalidInput
from xai_serve.viz import (
    TINT_FLOOR,
    ColorBar,
    colorbar,
    colormap,
    contact_sheet,
    explanation_panel,
    method_panel,
    overlay,
    overlay_png,
    panel,
    save_png,
    segment_boundaries,
    segment_overlay,
    signed_scale,
    top_segments,
)


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


def test_clip_sets_full_scale_at_the_quantile() -> None:
    rgb = _image(10, 10)
    heat = torch.linspace(-1.0, 1.0, 100).reshape(10, 10)
    heat[0, 0] = -50.0  # one outlier
    scale = torch.quantile(heat.abs().double().flatten(), 0.9)
    expected = overlay(rgb, (heat.double() / scale).clamp(-1, 1), alpha=0.6, signed=True)
    assert torch.equal(overlay(rgb, heat, alpha=0.6, signed=True, clip=0.9), expected)
    assert float(signed_scale(heat, 0.9)) == pytest.approx(float(scale))
    assert float(signed_scale(heat)) == 50.0
    with pytest.raises(InvalidInput, match="clip"):
        overlay(rgb, heat, clip=1.5)


# ----------------------------------------------------------------------- superpixel drawings


def test_segment_boundaries_mark_left_and_upper_changes() -> None:
    seg = torch.tensor([[0, 0, 1], [0, 0, 1], [2, 2, 2]])
    expected = torch.tensor([[False, False, True], [False, False, True], [True, True, True]])
    assert torch.equal(segment_boundaries(seg), expected)
    assert not segment_boundaries(torch.zeros(4, 5, dtype=torch.int64)).any()


def test_top_segments_by_sign() -> None:
    w = torch.tensor([0.5, -2.0, 3.0, 0.0, -0.1, 1.0])
    pos, neg = top_segments(w, 2)
    assert pos.tolist() == [2, 5] and neg.tolist() == [1, 4]
    pos, neg = top_segments(torch.tensor([1.0, 2.0]), 3)  # no negative weight at all
    assert pos.tolist() == [1, 0] and neg.tolist() == []


def test_segment_overlay_tints_the_top_segments_only() -> None:
    rgb = _image(4, 6, seed=3)
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2 + [[2, 2, 2, 3, 3, 3]] * 2)
    w = torch.tensor([1.0, -0.8, 0.1, -0.05])
    out = segment_overlay(rgb, seg, w, top=1, alpha=0.6)
    edge = segment_boundaries(seg)
    base = rgb.double()
    # Segment 0 (top positive): blended with the red end; segment 1 (top negative): with the
    # blue colour of -0.8 (above the tint floor); 2 and 3: dimmed grey.
    for sid, value in ((0, 1.0), (1, -0.8)):
        colour = colormap(torch.tensor((value + 1) / 2), "diverging").double()
        inside = (seg == sid) & ~edge
        expected = base[:, inside] + 0.6 * (colour[:, None] - base[:, inside])
        assert (out[:, inside].double() - expected).abs().max() <= 1.0
    luma = (base * torch.tensor([0.299, 0.587, 0.114]).double().view(3, 1, 1)).sum(0)
    dim = 0.8 * (0.4 * base + 0.6 * luma)
    rest = ((seg == 2) | (seg == 3)) & ~edge
    assert (out[:, rest].double() - dim[:, rest]).abs().max() <= 1.0
    # Boundaries of tinted segments are white.
    assert (out[:, edge & (seg <= 1)] == 255).all()


def test_segment_overlay_weak_top_segment_still_shows() -> None:
    rgb = torch.full((3, 1, 4), 100, dtype=torch.uint8)
    seg = torch.tensor([[0, 0, 1, 1]])
    out = segment_overlay(rgb, seg, torch.tensor([1.0, 0.01]), top=2, negative=False)
    floor = colormap(torch.tensor((TINT_FLOOR + 1) / 2), "diverging").double()
    expected = 100 + 0.6 * (floor - 100)
    assert (out[:, 0, 3].double() - expected).abs().max() <= 1.0  # not the neutral grey


def test_segment_overlay_refuses_bad_input() -> None:
    rgb = _image(4, 4)
    seg = torch.zeros(4, 4, dtype=torch.int64)
    with pytest.raises(InvalidInput, match="segments must be"):
        segment_overlay(rgb, seg[:3], torch.ones(1))
    with pytest.raises(InvalidInput, match="integer"):
        segment_overlay(rgb, seg.float(), torch.ones(1))
    with pytest.raises(InvalidInput, match=r"\[0, 1\)"):
        segment_overlay(rgb, seg + 1, torch.ones(1))
    with pytest.raises(InvalidInput, match="NaN"):
        segment_overlay(rgb, seg, torch.tensor([float("nan")]))


# ---------------------------------------------------------------- panels and contact sheets


def test_colorbar_runs_from_one_at_the_top_to_zero() -> None:
    bar = colorbar(50, "inferno", width=7)
    assert bar.shape == (3, 50, 7) and bar.dtype == torch.uint8
    assert bar[:, 0, 0].tolist() == colormap(torch.tensor(1.0)).tolist()
    assert bar[:, -1, 3].tolist() == colormap(torch.tensor(0.0)).tolist()
    assert torch.equal(bar[:, :, 0], bar[:, :, 6])


def _find(haystack: torch.Tensor, needle: torch.Tensor) -> tuple[int, int] | None:
    """Top-left corner of ``needle`` inside ``haystack`` (both [3, H, W]), if it is there."""
    _, h, w = needle.shape
    first = needle[:, 0, 0]
    ys, xs = torch.nonzero((haystack == first[:, None, None]).all(0), as_tuple=True)
    for y, x in zip(ys.tolist(), xs.tolist(), strict=True):
        window = haystack[:, y : y + h, x : x + w]
        if window.shape == needle.shape and torch.equal(window, needle):
            return y, x
    return None


def test_panel_holds_the_image_title_lines_and_bar() -> None:
    image = _image(40, 50, seed=5)
    plain = panel(image)
    assert _find(plain, image) is not None
    full = panel(
        image, title="gradcam", lines=["target 1 cat"], bar=ColorBar("inferno", ("1", "0"))
    )
    y, x = _find(full, image) or (-1, -1)
    assert y > 0 and x >= 0
    assert full.shape[1] > plain.shape[1] and full.shape[2] > plain.shape[2]
    # Text is drawn: dark pixels above (title) and below (lines) the image.
    assert (full[:, :y].double().mean(0) < 100).sum() > 20
    assert (full[:, y + 40 :].double().mean(0) < 100).sum() > 20
    # The colour bar sits to the right of the image, top colour first.
    right = full[:, y + 1, x + 50 :]  # below the bar's outline
    assert (right == colorbar(40)[:, 1, :1]).all(0).any()


def test_explanation_panel_chooses_the_drawing() -> None:
    rgb = _image(30, 30, seed=6)
    heat = torch.rand(30, 30, generator=torch.Generator().manual_seed(7))
    unsigned = explanation_panel(rgb, heat, alpha=0.5)
    assert _find(unsigned, overlay(rgb, heat, alpha=0.5, signed=False)) is not None
    signed = heat - 0.5
    drawn = explanation_panel(rgb, signed, alpha=0.5, clip=0.99)
    assert _find(drawn, overlay(rgb, signed, alpha=0.7, signed=True, clip=0.99)) is not None
    seg = (torch.arange(30)[:, None] // 10 * 3 + torch.arange(30)[None, :] // 10).long()
    weights = torch.linspace(-1, 1, 9)
    sp = explanation_panel(rgb, heat, segments=seg, weights=weights, top=2)
    assert _find(sp, segment_overlay(rgb, seg, weights, top=2, alpha=0.6)) is not None
    smoothed = method_panel(rgb, "integrated_gradients", signed)
    assert _find(smoothed, overlay(rgb, signed, alpha=0.7, signed=True, clip=0.99)) is None


def test_contact_sheet_places_every_cell() -> None:
    a, b, c = _image(20, 30, seed=1), _image(25, 10, seed=2), _image(5, 5, seed=3)
    sheet = contact_sheet([[a, b], [c, None]], column_titles=["x", "y"], title="sheet")
    ya, xa = _find(sheet, a) or (-1, -1)
    yb, xb = _find(sheet, b) or (-1, -1)
    yc, xc = _find(sheet, c) or (-1, -1)
    assert ya == yb and xb > xa + 30 - 1  # same row, b to the right of a
    assert yc >= ya + 25 and xc == xa  # next row starts below the tallest cell, same column
    with pytest.raises(InvalidInput, match="column titles"):
        contact_sheet([[a, b]], column_titles=["x"])
    with pytest.raises(InvalidInput, match="at least one row"):
        contact_sheet([])


def test_save_png_round_trips(tmp_path: Path) -> None:
    from xai_serve.serving.codec import decode_image

    image = _image(9, 11)
    path = save_png(image, tmp_path / "deep" / "x.png")
    assert torch.equal(decode_image(path.read_bytes(), max_pixels=1000), image)


def test_pixel_methods_come_from_the_explainers_traits() -> None:
    """Smoothing for display follows each explainer's ``pixel_level`` trait, so a method a user
    registers is drawn like the built-in ones of its kind."""
    from xai_serve.explainers import base

    # the per-pixel attributions among the built-in methods (more register the trait too:
    # guided backprop, DeepLIFT, ...), never a CAM or superpixel method
    assert {"saliency", "input_x_gradient", "integrated_gradients", "smoothgrad"} <= (
        viz.PIXEL_METHODS
    )
    assert {m for m in base.list_methods() if base.get_method(m).pixel_level} == viz.PIXEL_METHODS
    assert not {"gradcam", "gradcam++", "lime", "kernelshap"} & viz.PIXEL_METHODS
    assert not viz.is_pixel_method("gradcam") and not viz.is_pixel_method("lime")
    assert not viz.is_pixel_method("no-such-method")

    class ToyPixel(base.Explainer):
        pixel_level = True

    base.register("toy-pixel-viz")(ToyPixel)
    try:
        assert viz.is_pixel_method("toy-pixel-viz")
        rgb = torch.zeros(3, 16, 16, dtype=torch.uint8)
        heat = torch.zeros(16, 16)
        heat[8, 8] = 1.0
        sharp = viz.method_panel(rgb, "gradcam", heat)
        smoothed = viz.method_panel(rgb, "toy-pixel-viz", heat)
        assert not torch.equal(sharp, smoothed)  # drawn smoothed, as a pixel method
    finally:
        base._REGISTRY.pop("toy-pixel-viz", None)


def test_panel_grid_lays_panels_in_rows_of_columns() -> None:
    panels = [_image(20 + i, 30, seed=10 + i) for i in range(5)]
    grid = viz.panel_grid(panels, columns=2, title="gradcam")
    spots = [_find(grid, p) for p in panels]
    assert all(s is not None for s in spots)
    (y0, x0), (y1, x1), (y2, x2), (y3, x3), (y4, x4) = spots  # type: ignore[misc]
    assert y0 == y1 and x1 >= x0 + 30  # a row of two, in order
    assert y2 >= y0 + 21 and (x2, x3) == (x0, x1) and y3 == y2  # the next row below it
    assert y4 >= y2 + 23 and x4 == x0
    untitled = viz.panel_grid(panels, columns=2)
    assert grid.shape[1] > untitled.shape[1] and _find(untitled, panels[0])[0] < y0  # type: ignore[index]
    # as contact_sheet lays the same rows out
    same = contact_sheet([panels[0:2], panels[2:4], [panels[4]]], title="gradcam")
    assert torch.equal(grid, same)
    assert torch.equal(viz.panel_grid(panels[:1]), panels[0])  # one panel, no title: itself
    wide = viz.panel_grid(panels)  # 4 columns by default
    assert _find(wide, panels[3])[0] == _find(wide, panels[0])[0]  # type: ignore[index]
    assert _find(wide, panels[4])[0] > _find(wide, panels[0])[0]  # type: ignore[index]
    with pytest.raises(InvalidInput, match="at least one panel"):
        viz.panel_grid([])
    with pytest.raises(InvalidInput, match="columns must be >= 1"):
        viz.panel_grid(panels, columns=0)


def test_method_panel_names_the_class_and_its_foil() -> None:
    rgb = _image(24, 24, seed=8)
    heat = torch.rand(24, 24, generator=torch.Generator().manual_seed(9))
    assert viz.contrast("3 cat") == "3 cat" and viz.contrast("3 cat", "5 dog") == "3 cat vs 5 dog"
    plain = method_panel(rgb, "gradcam", heat, target="3 cat")
    assert torch.equal(plain, explanation_panel(rgb, heat, title="gradcam", lines=["target 3 cat"]))
    contrasted = method_panel(rgb, "gradcam", heat, target="3 cat", foil="5 dog")
    expected = explanation_panel(rgb, heat, title="gradcam", lines=["target 3 cat vs 5 dog"])
    assert torch.equal(contrasted, expected) and not torch.equal(contrasted, plain)
    # a panel of a sheet with several classes: the class (and its foil) is its title
    titled = method_panel(rgb, "gradcam", heat, title="3 cat vs 5 dog")
    assert torch.equal(titled, explanation_panel(rgb, heat, title="3 cat vs 5 dog"))


# --------------------------------------------------------------------------------------------
# Concept pictures (xai_serve.viz_concepts)
# --------------------------------------------------------------------------------------------


def tcav_bars(image: torch.Tensor) -> list[tuple[tuple[int, int, int], int, int, int, bool]]:
    """The bars of a :func:`~xai_serve.viz_concepts.tcav_chart` read back from its pixels,
    left to right: ``(colour, height in pixels, first column, last column, star above)``.

    Bars are the runs of bar-coloured pixels (across an error bar's one-pixel line) in the row
    above the axis; a bar's height is the
    most pixels of its colour in one of its columns (the dashed
    random line and the error bar's caps cover a few of them in some columns); its star is
    any pixel of :data:`MARK_COLOR` over its columns."""
    from xai_serve.viz_concepts import BAR_COLOR, MARK_COLOR, RANDOM_COLOR, UNSURE_COLOR

    hwc = image.permute(1, 2, 0)
    colours = [BAR_COLOR, UNSURE_COLOR, RANDOM_COLOR]
    is_colour = [(hwc == torch.tensor(c, dtype=torch.uint8)).all(-1) for c in colours]
    # the row above the axis: the lowest with the most concept-bar pixels (not the random
    # colour, a grey that anti-aliased text has too)
    counts = (is_colour[0] | is_colour[1]).sum(1)
    bottom = int((counts == counts.max()).nonzero().max())
    mark = (hwc == torch.tensor(MARK_COLOR, dtype=torch.uint8)).all(-1)
    bars = []
    x = 0
    width = hwc.shape[1]
    while x < width:
        hit = [k for k, m in enumerate(is_colour) if bool(m[bottom, x])]
        if not hit:
            x += 1
            continue
        k = hit[0]
        start = x
        row = is_colour[k][bottom]
        # a bar's run goes on across the one-pixel error bar drawn over it
        while x < width and (bool(row[x]) or (x + 1 < width and bool(row[x + 1]))):
            x += 1
        if x - start < 8:  # a dash of the random line, not a bar
            continue
        height = int(is_colour[k][: bottom + 1, start:x].sum(0).max())
        star = bool(mark[:, start:x].any())
        bars.append((colours[k], height, start, x - 1, star))
    return bars


def test_tcav_chart_bar_heights_are_the_scores_and_stars_mark_significance() -> None:
    from xai_serve.viz_concepts import (
        BAR_COLOR,
        MARK_COLOR,
        PLOT_HEIGHT,
        RANDOM_COLOR,
        UNSURE_COLOR,
        tcav_chart,
    )

    means = [0.8, 0.45, 0.2, 1.3]  # the last is clamped to 1
    stds = [0.1, 0.05, 0.15, 0.0]
    significant = [True, False, True, False]
    image = tcav_chart(["red", "stripes_0_wide", "circle", "mine"], means, stds, significant,
                       random_mean=0.5, random_std=0.12, title="TCAV")  # fmt: skip
    bars = tcav_bars(image)
    assert [b[0] for b in bars] == [BAR_COLOR, UNSURE_COLOR, BAR_COLOR, UNSURE_COLOR,
                                    RANDOM_COLOR]  # fmt: skip
    assert [b[1] for b in bars] == [160, 90, 40, PLOT_HEIGHT, 100]  # round(score * 200)
    assert [b[4] for b in bars] == [True, False, True, False, False]
    # every bar is as wide, and their bottoms are one row: heights are comparable
    assert len({b[3] - b[2] for b in bars}) == 1
    # stars are red polygons above their bars, nowhere else
    hwc = image.permute(1, 2, 0)
    mark = (hwc == torch.tensor(MARK_COLOR, dtype=torch.uint8)).all(-1)
    columns = mark.any(0).nonzero().flatten().tolist()
    spans = [(b[2], b[3]) for b in bars if b[4]]
    assert columns and all(any(lo <= c <= hi for lo, hi in spans) for c in columns)
    # the random line: dashes of RANDOM_COLOR at the random mean's height across the plot
    grey = (hwc == torch.tensor(RANDOM_COLOR, dtype=torch.uint8)).all(-1)
    random_bar = bars[-1]
    column = grey[:, random_bar[2]].nonzero().flatten()
    line_row = int(column.min())  # the random bar's top row, where the dashed line runs
    dashes = int(grey[line_row, : random_bar[2]].sum())  # left of the random bar
    assert dashes > 4 * 10  # dashes of 4 pixels across the plot
    assert int(grey[line_row - 1, : random_bar[2]].sum()) < dashes  # one pixel high


def test_tcav_chart_refuses_bad_input() -> None:
    from xai_serve.viz_concepts import tcav_chart

    with pytest.raises(InvalidInput, match="at least one concept"):
        tcav_chart([], [], [], [])
    with pytest.raises(InvalidInput, match="means: 1 values for 2 concepts"):
        tcav_chart(["a", "b"], [0.5], [0.1, 0.1], [True, False])
    with pytest.raises(InvalidInput, match="has NaN"):
        tcav_chart(["a"], [float("nan")], [0.1], [True])


def test_mask_overlay_keeps_inside_dims_outside_and_outlines_the_edge() -> None:
    from xai_serve.viz_concepts import OUTLINE_COLOR, mask_overlay

    rgb = _image(10, 12, seed=3)
    mask = torch.zeros(10, 12, dtype=torch.bool)
    mask[2:7, 3:9] = True
    out = mask_overlay(rgb, mask, dim=0.5)
    edge = mask.clone()
    edge[3:6, 4:8] = False  # the ring of the 5 x 6 block
    outline = torch.tensor(OUTLINE_COLOR, dtype=torch.uint8)[:, None]
    assert torch.equal(out[:, edge], outline.expand(3, int(edge.sum())))
    inner = mask & ~edge
    assert torch.equal(out[:, inner], rgb[:, inner])
    outside = ~mask
    assert torch.equal(out[:, outside], (rgb[:, outside].float() * 0.5).round().to(torch.uint8))
    # a mask on the image border is outlined there; a mask of another size is resized
    full = mask_overlay(rgb, torch.ones(5, 6, dtype=torch.bool), outline=False)
    assert torch.equal(full, rgb)
    border = mask_overlay(rgb, torch.ones(10, 12, dtype=torch.bool))
    assert torch.equal(border[:, 0, 0], outline[:, 0])
    assert torch.equal(border[:, 5, 6], rgb[:, 5, 6])


def _find_all(canvas: torch.Tensor, image: torch.Tensor) -> list[tuple[int, int]]:
    """Every position ``(row, column)`` where ``image`` appears in ``canvas`` pixel for pixel
    (candidates narrowed on a grid of the image's pixels, then compared whole)."""
    h, w = image.shape[1:]
    rows, cols = canvas.shape[1] - h + 1, canvas.shape[2] - w + 1
    if rows < 1 or cols < 1:
        return []
    candidates = torch.ones(rows, cols, dtype=torch.bool)
    for dy in range(0, h, max(1, h // 6)):
        for dx in range(0, w, max(1, w // 6)):
            window = canvas[:, dy : dy + rows, dx : dx + cols]
            candidates &= (window == image[:, dy, dx, None, None]).all(0)
    return [(y, x) for y, x in candidates.nonzero().tolist()
            if torch.equal(canvas[:, y : y + h, x : x + w], image)]  # fmt: skip


def test_objective_grid_holds_each_image_pixel_for_pixel() -> None:
    from xai_serve.viz_concepts import objective_grid

    images = [_image(20, 20, seed=s) for s in range(5)]
    grid = objective_grid(images, [[f"logit:{i}", f"value {i}"] for i in range(5)], columns=3,
                          title="grid")  # fmt: skip
    places = [_find_all(grid, image) for image in images]
    assert all(len(p) == 1 for p in places)
    (a,), (b,), (c,), (d,), (e,) = places
    assert a[0] == b[0] == c[0] < d[0] == e[0]  # rows of three, in order
    assert a[1] < b[1] < c[1] and d[1] == a[1] and e[1] == b[1]
    with pytest.raises(InvalidInput, match="2 labels for 1 images"):
        objective_grid(images[:1], [["a"], ["b"]])


def test_detector_chart_bars_are_proportional_to_detectors() -> None:
    from xai_serve.viz_concepts import DETECTOR_COLOR, CategoryCount, detector_chart

    categories = [
        CategoryCount("color", 16, {"red": 10, "blue": 6}),
        CategoryCount("texture", 4, {"dots": 4}),
        CategoryCount("shape", 0, {}),
    ]
    chart = detector_chart(categories, total_units=64, min_iou=0.04, bar_width=200,
                           lines=["unit 3: red"])  # fmt: skip
    green = (chart.permute(1, 2, 0) == torch.tensor(DETECTOR_COLOR, dtype=torch.uint8)).all(-1)
    lengths = [int(row.sum()) for row in green if row.any()]
    # one run per pixel row of each bar: 16/64 and 4/64 of 200 pixels; none for shape
    assert sorted(set(lengths), reverse=True) == [50, 12]


def test_dissection_figure_draws_each_unit_with_its_masks() -> None:
    from xai_serve.viz_concepts import CategoryCount, UnitExamples, dissection_figure, mask_overlay

    images = torch.stack([_image(16, 16, seed=s) for s in range(3)])
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 4:12, 2:10] = True
    unit = UnitExamples(7, "red", "color", 0.25, images, masks)
    figure = dissection_figure([unit], [CategoryCount("color", 1, {"red": 1})], total_units=8,
                               min_iou=0.04, scale=2)  # fmt: skip
    for e in range(3):  # each example, overlaid and doubled (nearest), is in the figure
        drawn = mask_overlay(images[e], masks[e])
        big = drawn.repeat_interleave(2, 1).repeat_interleave(2, 2)
        assert len(_find_all(figure, big)) == 1
