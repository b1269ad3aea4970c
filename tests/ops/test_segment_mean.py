"""segment_mean: every kernel backend equals the reference; the reference equals a loop."""

from __future__ import annotations

import pytest
import torch

from tests.ops.conftest import (
    DTYPES,
    NEEDS_GPU,
    TRITON_DEVICE,
    assert_matches,
    backend_params,
    every_backend_params,
    on_device,
    record_launches,
    slow_backend,
    triton_module,
)
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


@pytest.mark.parametrize(("backend", "device"), every_backend_params())
@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_input_is_a_clear_error_in_every_backend(backend, device, change, message):
    args = {
        "images": torch.rand(2, 3, 6, 6),
        "segments": torch.zeros(2, 6, 6, dtype=torch.long),
        "num_segments": 4,
    } | change
    args = {k: on_device(v, device) for k, v in args.items()}
    assert args["images"].device.type == device
    with pytest.raises(InvalidInput, match=message):
        ops.segment_mean(**args, backend=backend)


@pytest.mark.skipif(not ops.backend_info()["available"]["cpu"], reason="extension not built")
def test_compiled_op_checks_ids():
    with pytest.raises(
        RuntimeError, match=r"xai_serve::segment_mean: segment ids must lie in \[0, 4\)"
    ):
        torch.ops.xai_serve.segment_mean(torch.rand(1, 3, 4, 4), torch.full((1, 4, 4), 7), 4, True)


def test_triton_multi_program_launch_matches_reference(monkeypatch):
    # Lowered block sizes, so a small input runs the whole grid: 240 pixels per image in blocks
    # of 32 (8 blocks, the last partial), an id window of 8 so that the coherent first half of
    # each image is reduced in registers and the random second half takes the per-pixel atomics,
    # and 2 * 3 * 40 means divided in blocks of 16 (15 programs). Segments 28 and 29 are empty.
    mod = triton_module("segment_mean")
    launches = record_launches(monkeypatch, mod, "_segment_sum_kernel", "_segment_div_kernel")
    b, c, h, w, s, block_p, block_s = 2, 3, 12, 20, 40, 32, 8
    g = torch.Generator().manual_seed(11)
    flat = torch.arange(h * w).expand(b, h * w)
    coherent = 30 + flat // 16  # ids 30..37 in runs of 16 pixels: windows that start above 0
    scattered = torch.randint(0, 28, (b, h * w), generator=g)
    segments = torch.where(flat < h * w // 2, coherent, scattered).view(b, h, w)
    # The premise: some pixel blocks span fewer than block_s ids (reduced in registers), others
    # more (per-pixel atomics).
    spans = [int(p.max() - p.min()) for img in segments.view(b, h * w) for p in img.split(block_p)]
    assert min(spans) < block_s <= max(spans), spans
    for index_dtype, dtype in [(torch.int64, torch.float32), (torch.int32, torch.bfloat16)]:
        for runs in launches.values():
            runs.clear()
        images = torch.rand(b, c, h, w, generator=g).to(TRITON_DEVICE, dtype)
        seg = segments.to(TRITON_DEVICE, index_dtype)
        out = mod._launch_segment_mean(
            images, seg, s, block_p=block_p, block_s=block_s, block_div=16
        )
        ref = ops.segment_mean_reference(images, seg, s)
        assert_matches(out, ref)
        assert torch.equal(out[:, :, 28:30], torch.zeros(b, c, 2, dtype=dtype, device=out.device))

        (acc,) = launches["_segment_sum_kernel"]
        assert (acc.args["n_pblocks"], acc.args["BLOCK_P"], acc.args["BLOCK_S"]) == (8, 32, 8)
        assert acc.grid == (8 * b,)
        (div,) = launches["_segment_div_kernel"]
        assert div.grid == (15,) and div.args["BLOCK"] == 16


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize(
    ("b", "c", "h", "w", "s"),
    [
        (2, 3, 64, 64, 3072),  # (C + 1) * S floats = 48 KiB: the largest shared-memory table
        (2, 3, 64, 64, 3073),  # one segment more: the CUDA kernel accumulates in global memory
        (2, 1, 96, 96, 6145),  # one channel: 2 * S floats > 48 KiB
        (1, 3, 224, 224, 20000),  # ids mostly unique per pixel block
        (65535 + 21, 3, 4, 4, 5),  # batch beyond the grid-y limit of the CUDA launch
    ],
)
def test_gpu_paths_match_reference(backend, b, c, h, w, s):
    if not ops.backend_info()["available"][backend]:
        pytest.skip(f"{backend} backend not available")
    for i, layout in enumerate(["grid", "random"]):
        images, segments = _inputs(b, c, h, w, s, layout, torch.float32, "cuda", seed=i)
        out = ops.segment_mean(images, segments, s, backend=backend)
        assert_matches(out, ops.segment_mean_reference(images, segments, s))
