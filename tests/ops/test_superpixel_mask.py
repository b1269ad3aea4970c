"""superpixel_mask: every kernel backend equals the reference; the reference equals a loop.

Every test that writes an output runs both output layouts: NCHW-contiguous and, with
``channels_last=True``, ``torch.channels_last`` (same values, strides checked).
"""

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

# (B, C, H, W, N, S)
FULL = [
    (2, 3, 7, 9, 5, 7),
    (1, 3, 224, 224, 256, 100),
    (2, 1, 13, 17, 4, 1),
    (1, 3, 32, 32, 8, 1000),
    (3, 2, 1, 1, 3, 1),
    (1, 3, 227, 227, 16, 50),
    (2, 4, 40, 40, 20, 30),
    (1, 5, 19, 23, 37, 9),
]
# The last one runs several programs of each Triton kernel: 2 pixel blocks (NCHW) or 4 value
# blocks (channels_last) x 2 coalition chunks x 2 images.
SMALL = [
    (2, 3, 7, 9, 5, 7),
    (2, 1, 13, 17, 4, 1),
    (3, 2, 1, 1, 3, 1),
    (1, 3, 16, 16, 3, 40),
    (2, 4, 40, 40, 20, 30),
]
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])


def _assert_layout(out: torch.Tensor, channels_last: bool) -> None:
    """Contiguous, or channels_last with exactly the strides of a fresh channels_last tensor."""
    if channels_last:
        fresh = torch.empty(out.shape, device="meta", memory_format=torch.channels_last)
        assert out.is_contiguous(memory_format=torch.channels_last)
        assert out.stride() == fresh.stride(), (out.stride(), fresh.stride())
    else:
        assert out.is_contiguous()


def _inputs(
    b, c, h, w, n, s, dtype, device, seed=0, index_dtype=torch.int64, keep_dtype=torch.bool
):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(b, c, h, w, generator=g).to(device=device, dtype=dtype)
    segments = torch.randint(0, s, (b, h, w), generator=g).to(device=device, dtype=index_dtype)
    keep = (torch.rand(b, n, s, generator=g) > 0.5).to(device=device, dtype=keep_dtype)
    return images, segments, keep


def _baselines(b, c, h, w, s, dtype, device):
    return {
        "constant": 0.25,
        "segment": torch.rand(b, c, s).to(device=device, dtype=dtype),
        "image": torch.rand(b, c, h, w).to(device=device, dtype=dtype),
    }


def _norm(c, device):
    if c == 3:
        return torch.tensor(IMAGENET_MEAN, device=device), torch.tensor(IMAGENET_STD, device=device)
    return torch.linspace(0.1, 0.5, c, device=device), torch.linspace(0.5, 1.5, c, device=device)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", ["constant", "segment", "image"])
@pytest.mark.parametrize("normalize", [False, True], ids=["raw", "normalized"])
@LAYOUTS
def test_matches_reference(backend, device, dtype, mode, normalize, channels_last):
    cases = SMALL if slow_backend(backend) else FULL
    for i, (b, c, h, w, n, s) in enumerate(cases):
        images, segments, keep = _inputs(
            b,
            c,
            h,
            w,
            n,
            s,
            dtype,
            device,
            seed=i,
            index_dtype=(torch.int32, torch.int64)[i % 2],
            keep_dtype=(torch.bool, torch.uint8)[i % 2],
        )
        if channels_last and i % 2:  # channels_last output from channels_last inputs, too
            images = images.contiguous(memory_format=torch.channels_last)
        baseline = _baselines(b, c, h, w, s, dtype, device)[mode]
        mean, std = _norm(c, device) if normalize else (None, None)
        out = ops.superpixel_mask(
            images,
            segments,
            keep,
            baseline,
            mean,
            std,
            channels_last=channels_last,
            backend=backend,
        )
        base_t = None if mode == "constant" else baseline
        fill = baseline if mode == "constant" else 0.0
        ref = ops.superpixel_mask_reference(images, segments, keep, base_t, fill, mean, std)
        _assert_layout(out, channels_last)
        if normalize:
            assert_matches(out, ref)
        else:  # a pure selection: every backend must be exact
            assert out.dtype == ref.dtype and torch.equal(out, ref), (b, c, h, w, n, s)
        assert ops.backend_info()["last_used"]["superpixel_mask"] == backend


def test_reference_channels_last_is_a_layout_only():
    images, segments, keep = _inputs(2, 3, 5, 6, 4, 6, torch.float32, "cpu", seed=3)
    mean, std = _norm(3, "cpu")
    for c_images in (images, images[:, :1]):
        nchw = ops.superpixel_mask_reference(c_images, segments, keep, None, 0.5, None, None)
        nhwc = ops.superpixel_mask_reference(
            c_images, segments, keep, None, 0.5, None, None, channels_last=True
        )
        _assert_layout(nchw, False)
        _assert_layout(nhwc, True)  # C = 1 too: the canonical channels_last strides
        assert torch.equal(nchw, nhwc)
    normed = ops.superpixel_mask_reference(images, segments, keep, None, 0.5, mean, std, True)
    torch.testing.assert_close(
        normed, ops.superpixel_mask_reference(images, segments, keep, None, 0.5, mean, std)
    )


def test_reference_equals_a_plain_loop():
    images, segments, keep = _inputs(2, 3, 5, 6, 4, 6, torch.float32, "cpu", seed=7)
    per_segment = torch.rand(2, 3, 6)
    mean, std = _norm(3, "cpu")
    out = ops.superpixel_mask_reference(images, segments, keep, per_segment, 0.0, mean, std)
    for b in range(2):
        for n in range(4):
            for y in range(5):
                for x in range(6):
                    s = int(segments[b, y, x])
                    src = images[b, :, y, x] if keep[b, n, s] else per_segment[b, :, s]
                    torch.testing.assert_close(out[b * 4 + n, :, y, x], (src - mean) / std)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@LAYOUTS
def test_uint8_keep_any_nonzero_keeps(backend, device, channels_last):
    images, segments, keep = _inputs(1, 3, 8, 8, 4, 5, torch.float32, device)
    keep_u8 = keep.to(torch.uint8) * torch.randint(1, 255, keep.shape, dtype=torch.uint8).to(device)
    out = ops.superpixel_mask(
        images, segments, keep_u8, 0.0, channels_last=channels_last, backend=backend
    )
    _assert_layout(out, channels_last)
    assert torch.equal(out, ops.superpixel_mask_reference(images, segments, keep, None, 0.0))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@LAYOUTS
def test_all_kept_and_none_kept(backend, device, channels_last):
    images, segments, _ = _inputs(2, 3, 9, 7, 1, 4, torch.float32, device)
    mean, std = _norm(3, device)
    keep = torch.tensor([True, False], device=device).view(1, 2, 1).expand(2, 2, 4).contiguous()
    out = ops.superpixel_mask(
        images, segments, keep, 0.5, mean, std, channels_last=channels_last, backend=backend
    )
    _assert_layout(out, channels_last)
    out = out.reshape(2, 2, 3, 9, 7)
    torch.testing.assert_close(out[:, 0], (images - mean.view(3, 1, 1)) / std.view(3, 1, 1))
    torch.testing.assert_close(out[:, 1], ((0.5 - mean) / std).view(1, 3, 1, 1).expand(2, 3, 9, 7))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@LAYOUTS
def test_non_contiguous_inputs_and_broadcast_baseline(backend, device, channels_last):
    b, c, h, w, n, s = 2, 3, 10, 12, 5, 9
    images, _, _ = _inputs(b, c, h, w, n, s, torch.float32, device, seed=4)
    segments_t = torch.randint(0, s, (b, w, h)).to(device).transpose(1, 2)  # a transposed view
    keep_strided = (torch.rand(b, n, 2 * s) > 0.5).to(device)[..., ::2]
    baseline_one = torch.rand(1, c, h, w, device=device)  # batch 1 broadcasts
    assert not (segments_t.is_contiguous() or keep_strided.is_contiguous())
    ref = ops.superpixel_mask_reference(
        images,
        segments_t.contiguous(),
        keep_strided.contiguous(),
        baseline_one.expand(b, c, h, w),
        0.0,
    )
    odd_images = {
        "channels_last": images.to(memory_format=torch.channels_last),
        "sliced": torch.rand(b, c, h, 2 * w, device=device)[..., ::2].copy_(images),
        "permuted": images.permute(0, 1, 3, 2).contiguous().transpose(2, 3),
    }
    odd_baselines = {
        "broadcast": baseline_one,
        "channels_last": baseline_one.expand(b, c, h, w).contiguous(
            memory_format=torch.channels_last
        ),
    }
    for name, imgs in odd_images.items():
        assert not imgs.is_contiguous(), name
        for base_name, base in odd_baselines.items():
            out = ops.superpixel_mask(
                imgs, segments_t, keep_strided, base, channels_last=channels_last, backend=backend
            )
            assert torch.equal(out, ref), (name, base_name)
            _assert_layout(out, channels_last)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize(("b", "n"), [(0, 4), (2, 0), (0, 0)])
@LAYOUTS
def test_empty_batches(backend, device, b, n, channels_last):
    images, segments, keep = _inputs(b, 3, 8, 8, n, 5, torch.float32, device)
    out = ops.superpixel_mask(
        images,
        segments,
        keep,
        torch.rand(b, 3, 5, device=device),
        channels_last=channels_last,
        backend=backend,
    )
    assert out.shape == (b * n, 3, 8, 8)
    _assert_layout(out, channels_last)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@LAYOUTS
def test_unvalidated_bad_ids_are_memory_safe(backend, device, channels_last):
    images, segments, keep = _inputs(1, 3, 8, 8, 3, 5, torch.float32, device)
    bad = segments.clone()
    bad[0, 0, :4] = torch.tensor([-1, 5, 1 << 20, -(1 << 20)])
    out = ops.superpixel_mask(
        images,
        bad,
        keep,
        torch.rand(1, 3, 5, device=device),
        validate=False,
        channels_last=channels_last,
        backend=backend,
    )
    ref = ops.superpixel_mask_reference(images, segments, keep, None, 0.0)
    # pixels with valid ids are still exact; the others are unspecified but no fault occurred
    valid = (bad >= 0) & (bad < 5)
    keep_px = torch.gather(keep, 2, segments.view(1, 1, 64).expand(1, 3, 64)).view(3, 1, 8, 8)
    sel = valid.view(1, 1, 8, 8) & keep_px
    assert torch.equal(out[sel.expand(3, 3, 8, 8)], ref[sel.expand(3, 3, 8, 8)])


def _args(device="cpu"):
    images, segments, keep = _inputs(2, 3, 6, 6, 4, 5, torch.float32, device)
    return {
        "images": images,
        "segments": segments,
        "keep": keep,
        "baseline": 0.0,
        "mean": None,
        "std": None,
    }


BAD = [
    ({"images": torch.rand(3, 6, 6)}, "images"),
    ({"images": torch.rand(2, 3, 6, 6, dtype=torch.float64)}, "float32, float16 or bfloat16"),
    ({"segments": torch.zeros(2, 6, 6)}, "int32 or int64"),
    ({"segments": torch.zeros(2, 6, 5, dtype=torch.long)}, "does not match"),
    ({"segments": torch.zeros(6, 6, dtype=torch.long)}, "segments"),
    ({"segments": torch.full((2, 6, 6), 5)}, r"segment ids must lie in \[0, 5\)"),
    ({"segments": torch.full((2, 6, 6), -1)}, r"segment ids must lie in \[0, 5\)"),
    ({"keep": torch.ones(2, 4, 5)}, "bool or uint8"),
    ({"keep": torch.ones(3, 4, 5, dtype=torch.bool)}, "batch"),
    ({"keep": torch.ones(2, 4, 0, dtype=torch.bool)}, "at least one segment"),
    ({"baseline": torch.rand(2, 3, 4)}, "baseline"),
    ({"baseline": torch.rand(2, 3, 6, 7)}, "baseline"),
    ({"baseline": "black"}, "baseline"),
    ({"mean": [0.5, 0.5, 0.5]}, "both `mean` and `std`"),
    ({"mean": [0.5, 0.5], "std": [1.0, 1.0]}, "C = 3"),
    ({"mean": [0.5] * 3, "std": [1.0, 0.0, 1.0]}, "zeros"),
    ({"keep": torch.ones(2, 4, 5, dtype=torch.bool, device="meta")}, "same device"),
    ({"channels_last": 1}, "channels_last"),
]


@pytest.mark.parametrize(("backend", "device"), every_backend_params())
@pytest.mark.parametrize(("change", "message"), BAD)
def test_bad_input_is_a_clear_error_in_every_backend(backend, device, change, message):
    args = _args(device) | {k: on_device(v, device) for k, v in change.items()}
    assert args["images"].device.type == device
    with pytest.raises(InvalidInput, match=message):
        ops.superpixel_mask(**args, backend=backend)


@pytest.mark.skipif(not ops.backend_info()["available"]["cpu"], reason="extension not built")
@pytest.mark.parametrize(
    ("change", "message"),
    [b for b in BAD if b[1] not in ("same device", "zeros", "baseline", "channels_last")],
)
def test_compiled_op_checks_its_arguments(change, message):
    a = _args() | change
    mean = torch.tensor(a["mean"]) if a["mean"] is not None else None
    std = torch.tensor(a["std"]) if a["std"] is not None else None
    with pytest.raises(RuntimeError, match="xai_serve::superpixel_mask"):
        torch.ops.xai_serve.superpixel_mask(
            a["images"], a["segments"], a["keep"], None, 0.0, mean, std, True
        )


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["segment", "image"])
def test_triton_multi_program_launch_matches_reference(monkeypatch, channels_last, mode):
    # Lowered block sizes, so a small input runs the whole grid: NCHW 120 pixels in blocks of
    # 32 (4 blocks, the last partial), channels_last 360 values in blocks of 64 (6 blocks,
    # boundaries inside a pixel's channels), and N = 7 coalitions in chunks of at most 3 (3
    # chunks, the last partial), for 2 images.
    mod = triton_module("superpixel_mask")
    kernel = "_superpixel_mask_nhwc_kernel" if channels_last else "_superpixel_mask_kernel"
    launches = record_launches(monkeypatch, mod, kernel)
    b, c, h, w, n, s = 2, 3, 10, 12, 7, 9
    images, segments, keep = _inputs(b, c, h, w, n, s, torch.float32, TRITON_DEVICE, seed=5)
    baseline = _baselines(b, c, h, w, s, torch.float32, TRITON_DEVICE)[mode]
    for mean, std in [(None, None), _norm(c, TRITON_DEVICE)]:
        launches[kernel].clear()
        out = mod._launch_superpixel_mask(
            images,
            segments,
            keep,
            baseline,
            0.0,
            mean,
            std,
            channels_last,
            block_p=32,
            block_e=64,
            max_n_chunk=3,
        )
        ref = ops.superpixel_mask_reference(images, segments, keep, baseline, 0.0, mean, std)
        _assert_layout(out, channels_last)
        if mean is None:
            assert torch.equal(out, ref)
        else:
            assert_matches(out, ref)

        (launch,) = launches[kernel]
        blocks = launch.args["n_eblocks" if channels_last else "n_pblocks"]
        assert blocks == (6 if channels_last else 4)
        assert launch.args["BLOCK_E" if channels_last else "BLOCK_P"] == (
            64 if channels_last else 32
        )
        n_chunks, n_chunk = launch.args["n_chunks"], launch.args["n_chunk"]
        assert n_chunks > 1 and n_chunks * n_chunk >= n > (n_chunks - 1) * n_chunk
        if TRITON_DEVICE == "cpu":  # on a GPU small grids get smaller chunks to fill the SMs
            assert (n_chunks, n_chunk) == (3, 3)
        assert launch.grid == (blocks * n_chunks * b,)


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@LAYOUTS
def test_gpu_coalitions_beyond_the_grid_y_limit(backend, channels_last):
    # The CUDA kernel puts coalition chunks (at most 32 coalitions each) on grid y, capped at
    # 65535: more than 65535 * 32 coalitions make every block loop over several chunks.
    if not ops.backend_info()["available"][backend]:
        pytest.skip(f"{backend} backend not available")
    n = 65535 * 32 + 1000
    images, segments, keep = _inputs(1, 2, 2, 3, n, 4, torch.float32, "cuda", seed=9)
    baseline = torch.rand(1, 2, 4, device="cuda")
    out = ops.superpixel_mask(
        images, segments, keep, baseline, channels_last=channels_last, backend=backend
    )
    ref = ops.superpixel_mask_reference(images, segments, keep, baseline, 0.0)
    _assert_layout(out, channels_last)
    assert torch.equal(out, ref)
