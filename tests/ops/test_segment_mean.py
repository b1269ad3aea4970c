"""segment_mean: every kernel backend equals the reference; the reference equals a loop."""

from __future__ import annotations

import pytest
import torch

from tests.ops.conftest import DTYPES, assert_matches, backend_params, slow_backend
from xai_serve import InvalidInput, ops

# (B, C, H, W, S, layout): "grid" = coherent blocks like real superpixels, "random" = any id
FULL = [
    (2, 3, 7, 9, 7, "random"),
    (2, 3, 224, 224, 100, "grid"),
    (1, 3, 224, 224, 1000, "random"),
    (3, 1, 1, 1, 1, "grid"),
    (1, 2, 16, 16, 300, "random"),  # more segments than most images cover: empty ones
    (2, 3, 227, 227, 49, "grid"),
]
SMALL = [
    (2, 3, 7, 9, 7, "random"),
    (3, 1, 1, 1, 1, "grid"),
    (1, 2, 16, 16, 300, "random"),
    (1, 3, 20, 20, 16, "grid"),
]


def grid_segments(b: int, h: int, w: int, s: int) -> torch.Tensor:
    side = max(1, round(s**0.5))
    ys = torch.arange(h) * side // h
    xs = torch.arange(w) * side // w
    return (ys[:, None] * side + xs[None, :]).clamp_max(s - 1).expand(b, h, w).contiguous()


def _inputs(b, c, h, w, s, layout, dtype, device, seed=0, index_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, c, h, w, generator=g).to(device=device, dtype=dtype)
    if layout == "grid":
        segments = grid_segments(b, h, w, s)
    else:
        segments = torch.randint(0, s, (b, h, w), generator=g)
    return images, segments.to(device=device, dtype=index_dtype)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(backend, device, dtype):
    cases = SMALL if slow_backend(backend) else FULL
    for i, (b, c, h, w, s, layout) in enumerate(cases):
        index_dtype = (torch.int32, torch.int64)[i % 2]
        images, segments = _inputs(
            b, c, h, w, s, layout, dtype, device, seed=i, index_dtype=index_dtype
        )
        out = ops.segment_mean(images, segments, s, backend=backend)
        assert_matches(out, ops.segment_mean_reference(images, segments, s))
        assert ops.backend_info()["last_used"]["segment_mean"] == backend


def test_reference_equals_a_plain_loop():
    images, segments = _inputs(2, 3, 5, 6, 9, "random", torch.float32, "cpu", seed=3)
    out = ops.segment_mean_reference(images, segments, 9)
    for b in range(2):
        for s in range(9):
            sel = segments[b] == s
            want = images[b][:, sel].mean(1) if bool(sel.any()) else torch.zeros(3)
            torch.testing.assert_close(out[b, :, s], want)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_segments_are_zero_and_non_contiguous_inputs(backend, device):
    images, _ = _inputs(2, 3, 8, 10, 4, "grid", torch.float32, device)
    images_cl = images.to(memory_format=torch.channels_last)
    segments = torch.randint(0, 3, (2, 10, 8)).to(device).transpose(1, 2)  # ids 0..2 of S = 6
    out = ops.segment_mean(images_cl, segments, 6, backend=backend)
    assert torch.equal(out[:, :, 3:], torch.zeros(2, 3, 3, device=device))
    assert_matches(out, ops.segment_mean_reference(images, segments.contiguous(), 6))


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_batch(backend, device):
    images, segments = _inputs(0, 3, 8, 8, 5, "grid", torch.float32, device)
    out = ops.segment_mean(images, segments, 5, backend=backend)
    assert out.shape == (0, 3, 5)


BAD = [
    ({"images": torch.rand(3, 6, 6)}, "images"),
    ({"images": torch.rand(2, 3, 6, 6).int()}, "float32, float16 or bfloat16"),
    ({"segments": torch.zeros(2, 6, 6)}, "int32 or int64"),
    ({"segments": torch.zeros(1, 6, 6, dtype=torch.long)}, "does not match"),
    ({"segments": torch.full((2, 6, 6), 4)}, r"segment ids must lie in \[0, 4\)"),
    ({"num_segments": 0}, "num_segments"),
    ({"num_segments": 2.5}, "num_segments"),
    ({"segments": torch.zeros(2, 6, 6, dtype=torch.long, device="meta")}, "same device"),
]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton", "cuda"])
@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_input_is_a_clear_error_in_every_backend(backend, change, message):
    args = {
        "images": torch.rand(2, 3, 6, 6),
        "segments": torch.zeros(2, 6, 6, dtype=torch.long),
        "num_segments": 4,
    }
    with pytest.raises(InvalidInput, match=message):
        ops.segment_mean(**(args | change), backend=backend)


@pytest.mark.skipif(not ops.backend_info()["available"]["cpu"], reason="extension not built")
def test_compiled_op_checks_ids():
    with pytest.raises(
        RuntimeError, match=r"xai_serve::segment_mean: segment ids must lie in \[0, 4\)"
    ):
        torch.ops.xai_serve.segment_mean(torch.rand(1, 3, 4, 4), torch.full((1, 4, 4), 7), 4, True)
