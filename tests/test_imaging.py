"""Tests of xai_serve.imaging beyond decoding (which tests/serving/test_codec.py covers through
the server's codec, which re-exports it)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from xai_serve import imaging
from xai_serve.errors import InvalidInput
from xai_serve.serving import codec


def test_codec_re_exports_the_imaging_functions() -> None:
    assert codec.decode_image is imaging.decode_image
    assert codec.encode_png is imaging.encode_png
    assert codec.IMAGE_FORMATS == imaging.IMAGE_FORMATS


def test_pil_round_trip_keeps_every_pixel() -> None:
    gen = torch.Generator().manual_seed(0)
    rgb = torch.randint(0, 256, (3, 7, 11), dtype=torch.uint8, generator=gen)
    view = rgb.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # same pixels, HWC in memory
    assert not view.is_contiguous()
    pil = imaging.to_pil(view)
    assert pil.size == (11, 7) and pil.mode == "RGB"
    assert np.array_equal(np.asarray(pil), rgb.permute(1, 2, 0).numpy())
    back = imaging.from_pil(pil)
    assert back.dtype == torch.uint8 and back.is_contiguous()
    assert torch.equal(back, rgb)
    assert torch.equal(imaging.decode_image(imaging.encode_png(view), max_pixels=77), rgb)


def test_from_pil_turns_grey_and_alpha_into_rgb() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    out = imaging.from_pil(Image.fromarray(grey))
    assert out.shape == (3, 3, 4)
    assert all(torch.equal(out[c], torch.from_numpy(grey)) for c in range(3))
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0  # fully transparent red: alpha is dropped
    assert torch.equal(
        imaging.from_pil(Image.fromarray(rgba))[0], torch.full((2, 2), 200, dtype=torch.uint8)
    )


@pytest.mark.parametrize(
    "bad",
    [
        torch.zeros(3, 4, 4),  # float
        torch.zeros(4, 4, 4, dtype=torch.uint8),  # four channels
        torch.zeros(3, 0, 4, dtype=torch.uint8),  # empty
        torch.zeros(4, 4, dtype=torch.uint8),  # no channel axis
    ],
)
def test_bad_pictures_are_refused_with_the_argument_named(bad: torch.Tensor) -> None:
    with pytest.raises(InvalidInput, match=r"^cell must be uint8 \[3, H, W\]"):
        imaging.check_rgb(bad, "cell")
    with pytest.raises(InvalidInput, match=r"^rgb must be uint8"):
        imaging.to_pil(bad)
    with pytest.raises(InvalidInput, match=r"^rgb must be uint8"):
        imaging.encode_png(bad)


def test_non_images_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"must be a torch\.Tensor"):
        imaging.check_rgb(np.zeros((3, 2, 2), dtype=np.uint8))
    with pytest.raises(InvalidInput, match=r"must be a PIL\.Image\.Image"):
        imaging.from_pil(np.zeros((2, 2, 3), dtype=np.uint8))
