"""cam_fuse: every kernel backend equals the PyTorch reference, and the reference the spec."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from tests.ops.conftest import (
    DTYPES,
    HAS_CUDA,
    NEEDS_GPU,
    TRITON_DEVICE,
    assert_matches,
    backend_params,
    every_backend_params,
    record_launches,
    slow_backend,
    triton_module,
)
from xai_serve import InvalidInput, ops

FULL = [
    (hw, size, k)
    for hw, size, k in itertools.product(
        [(1, 1), (7, 7), (14, 7)], [(1, 1), (224, 224), (227, 224)], [1, 3, 512, 2048]
    )
]
SMALL = [
    (hw, size, k)
    for hw, size, k in itertools.product([(1, 1), (7, 5)], [(1, 1), (9, 16)], [1, 3, 33])
]


def _inputs(b, k, h, w, dtype, device, elementwise, seed=0):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(b, k, h, w, generator=g).to(device=device, dtype=dtype)
    shape = (b, k, h, w) if elementwise else (b, k)
    weights = torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    return acts, weights


def _check(backend, device, acts, weights, size, relu=True, normalize=True):
    out = ops.cam_fuse(acts, weights, size, relu, normalize, backend=backend)
    ref = ops.cam_fuse_reference(acts, weights, size, relu, normalize)
    scale = 1.0 if normalize else float(ref.abs().max()) if ref.numel() else 1.0
    assert_matches(out, ref, scale)
    assert ops.backend_info()["last_used"]["cam_fuse"] == backend
    return out


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("elementwise", [False, True], ids=["channel", "elementwise"])
def test_shapes_match_reference(backend, device, dtype, elementwise):
    cases = SMALL if slow_backend(backend) else FULL
    for i, ((h, w), size, k) in enumerate(cases):
        acts, weights = _inputs(2, k, h, w, dtype, device, elementwise, seed=i)
        _check(backend, device, acts, weights, size)


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize(("relu", "normalize"), list(itertools.product([True, False], repeat=2)))
def test_relu_and_normalize_switches(backend, device, relu, normalize):
    acts, weights = _inputs(3, 5, 6, 4, torch.float32, device, elementwise=False, seed=1)
    out = _check(backend, device, acts, weights, (11, 13), relu, normalize)
    if normalize:
        flat = out.flatten(1)
        assert torch.allclose(flat.amin(1), torch.zeros(3, device=device))
        assert torch.allclose(flat.amax(1), torch.ones(3, device=device))
    if relu and not normalize:
        assert bool((out >= 0).all())


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_closed_form_upsample(backend, device):
    # A 1x2 map [0, 1] upsampled to 1x4 with align_corners=False is [0, 1/4, 3/4, 1].
    acts = torch.tensor([[[[0.0, 1.0]]]], device=device)
    weights = torch.ones(1, 1, device=device)
    out = ops.cam_fuse(acts, weights, (1, 4), relu=False, normalize=False, backend=backend)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 0.25, 0.75, 1.0]]], device=device))
    # Doubling a 2x2 map equals F.interpolate's documented result.
    acts = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]], device=device)
    out = ops.cam_fuse(acts, weights, (4, 4), relu=False, normalize=False, backend=backend)
    expected = torch.tensor(
        [
            [1.0, 1.25, 1.75, 2.0],
            [1.5, 1.75, 2.25, 2.5],
            [2.5, 2.75, 3.25, 3.5],
            [3.0, 3.25, 3.75, 4.0],
        ],
        device=device,
    )
    torch.testing.assert_close(out[0], expected)


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_constant_and_all_negative_maps_become_zeros(backend, device):
    acts = torch.ones(2, 4, 5, 5, device=device)
    weights = torch.full((2, 4), 0.5, device=device)  # constant positive map
    out = ops.cam_fuse(acts, weights, (8, 8), backend=backend)
    assert torch.equal(out, torch.zeros(2, 8, 8, device=device))
    out = ops.cam_fuse(acts, -weights, (8, 8), backend=backend)  # ReLU zeroes everything
    assert torch.equal(out, torch.zeros(2, 8, 8, device=device))
    assert not bool(out.isnan().any())


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_non_contiguous_and_channels_last(backend, device):
    acts, _ = _inputs(2, 6, 7, 7, torch.float32, device, elementwise=False, seed=3)
    acts_cl = acts.to(memory_format=torch.channels_last)
    weights_t = torch.randn(6, 2, device=device).t()  # a transposed view
    assert not weights_t.is_contiguous() and not acts_cl.is_contiguous()
    _check(backend, device, acts_cl, weights_t, (20, 30))
    big = torch.randn(2, 6, 7, 14, device=device)
    ew = big[..., ::2]  # strided elementwise weights
    _check(backend, device, acts_cl, ew, (9, 9))


@pytest.mark.parametrize(("backend", "device"), backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", [37, 64, 1280])
def test_channels_last_many_channels(backend, device, dtype, k):
    # A channels-last model's layer (the CPU kernel reads it in place, 16 channels at a time
    # plus a remainder), per-channel and channels-last elementwise weights.
    acts, weights = _inputs(2, k, 7, 7, dtype, device, elementwise=False, seed=k)
    acts_cl = acts.to(memory_format=torch.channels_last)
    out = _check(backend, device, acts_cl, weights, (33, 31))
    assert_matches(out, ops.cam_fuse(acts, weights, (33, 31), backend=backend))
    _, ew = _inputs(2, k, 7, 7, dtype, device, elementwise=True, seed=k + 1)
    _check(backend, device, acts_cl, ew.to(memory_format=torch.channels_last), (16, 16))
    _check(backend, device, acts_cl, ew, (16, 16))  # mixed layouts


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_empty_batch(backend, device):
    acts, weights = _inputs(0, 3, 7, 7, torch.float32, device, elementwise=False)
    out = ops.cam_fuse(acts, weights, (224, 224), backend=backend)
    assert out.shape == (0, 224, 224) and out.dtype == torch.float32


@pytest.mark.parametrize(("backend", "device"), backend_params())
def test_mixed_dtypes_are_promoted(backend, device):
    acts, _ = _inputs(2, 4, 5, 5, torch.float16, device, elementwise=False)
    weights = torch.randn(2, 4, device=device)  # float32
    out = ops.cam_fuse(acts, weights, (10, 10), backend=backend)
    assert_matches(out, ops.cam_fuse_reference(acts.float(), weights, (10, 10)))


def test_reference_is_the_documented_composition():
    # The spec in plain torch ops: weighted sum, ReLU, F.interpolate, min-max.
    acts, weights = _inputs(2, 8, 7, 7, torch.float32, "cpu", elementwise=False)
    cam = torch.relu((weights[:, :, None, None] * acts).sum(1, keepdim=True))
    up = F.interpolate(cam, size=(50, 60), mode="bilinear", align_corners=False)[:, 0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    torch.testing.assert_close(
        ops.cam_fuse_reference(acts, weights, (50, 60)), (up - lo) / (hi - lo)
    )


BAD = [
    (lambda a, w: (a[0], w, (8, 8)), "activations"),
    (lambda a, w: (a.int(), w, (8, 8)), "float32, float16 or bfloat16"),
    (lambda a, w: (a, w[:1], (8, 8)), "Tensor[B, K]"),
    (lambda a, w: (a, w[:, :2], (8, 8)), "Tensor[B, K]"),
    (lambda a, w: (a, torch.randn(2, 3, 5, 5, device=a.device), (8, 8)), "Tensor[B, K, h, w]"),
    (lambda a, w: (a, w, (0, 8)), "size"),
    (lambda a, w: (a, w, (8,)), "size"),
    (lambda a, w: (a, w.to("meta"), (8, 8)), "same device"),
    (lambda a, w: (a[:, :0], w[:, :0], (8, 8)), "no channels"),
]


@pytest.mark.parametrize(("backend", "device"), every_backend_params())
@pytest.mark.parametrize(("make", "message"), BAD)
def test_bad_input_is_a_clear_error_in_every_backend(backend, device, make, message):
    acts, weights = _inputs(2, 3, 7, 7, torch.float32, device, elementwise=False)
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        ops.cam_fuse(*make(acts, weights), backend=backend)


@pytest.mark.skipif(not ops.backend_info()["available"]["cpu"], reason="extension not built")
@pytest.mark.parametrize(("make", "message"), [b for b in BAD if b[1] != "same device"])
def test_compiled_op_checks_its_arguments(make, message):
    # Direct torch.ops calls skip the Python checks; the C++ ones give the same advice.
    acts, weights = _inputs(2, 3, 7, 7, torch.float32, "cpu", elementwise=False)
    a, w, size = make(acts, weights)
    with pytest.raises(RuntimeError, match="xai_serve::cam_fuse"):
        torch.ops.xai_serve.cam_fuse(a, w, list(size), True, True)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_full_resolution_intermediate_on_gpu(backend):
    if not ops.backend_info()["available"][backend]:
        pytest.skip(f"{backend} backend not available")
    b, k, h, w, size = 8, 2048, 7, 7, (224, 224)
    acts, weights = _inputs(b, k, h, w, torch.float32, "cuda", elementwise=True)
    ops.cam_fuse(acts, weights, size, backend=backend)  # warm up (autotune, caches)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    ops.cam_fuse(acts, weights, size, backend=backend)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    full = b * k * size[0] * size[1] * 4
    assert extra < full / 100, f"peak extra memory {extra} B is not far below B*K*H*W*4 = {full} B"


def _ramp_inputs(b, k, h, w, device, elementwise, seed=0):
    """Activations whose CAM rises from the top row to the bottom row (plus noise), so that
    every image's minimum and maximum lie in different output tiles."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1)
    acts = (0.1 * torch.randn(b, k, h, w, generator=g) + ramp).to(device)
    shape = (b, k, h, w) if elementwise else (b, k)
    weights = (0.5 + torch.rand(*shape, generator=g)).to(device)  # positive: keeps the ramp
    return acts, weights


@pytest.mark.parametrize("elementwise", [False, True], ids=["channel", "elementwise"])
def test_triton_multi_program_launch_matches_reference(monkeypatch, elementwise):
    # Small enough for the interpreter, yet every loop and cross-program path of the kernels
    # runs: phase 1 over 2 position blocks x 3 K iterations (the last one partial); phases 2/3
    # with 64-pixel tiles and at most 3 programs per image -> 11 tiles as 3 programs x 4 tiles
    # (the last tile partial, the last program's fourth tile empty), so each image's min and
    # max are reduced across programs.
    mod = triton_module("cam_fuse")
    launches = record_launches(
        monkeypatch, mod, "_cam_lowres_kernel", "_cam_upsample_kernel", "_cam_normalize_kernel"
    )
    b, k, h, w, size, block_o = 2, 130, 9, 8, (23, 29), 64
    acts, weights = _ramp_inputs(b, k, h, w, TRITON_DEVICE, elementwise)
    for relu, normalize in [(False, True), (True, True), (True, False)]:
        for runs in launches.values():
            runs.clear()
        out = mod._launch_cam_fuse(
            acts, weights, size, relu, normalize, block_o=block_o, max_partials=3
        )
        ref = ops.cam_fuse_reference(acts, weights, size, relu, normalize)
        assert_matches(out, ref, 1.0 if normalize else float(ref.abs().max()))

        (low,) = launches["_cam_lowres_kernel"]
        assert low.args["n_pblocks"] == 2 and low.grid == (2 * b,)
        assert -(-low.args["K"] // low.args["BLOCK_K"]) == 3  # K iterations
        (up,) = launches["_cam_upsample_kernel"]
        nprog, tiles_per_prog = up.args["nprog"], up.args["tiles_per_prog"]
        assert (nprog, tiles_per_prog, up.args["BLOCK_O"]) == (3, 4, block_o)
        assert up.grid == (nprog * b,)
        assert len(launches["_cam_normalize_kernel"]) == int(normalize)
        if normalize:
            assert launches["_cam_normalize_kernel"][0].grid == up.grid
            # the premise of the cross-program reduction: min and max in different programs
            flat = ref.flatten(1)
            span = block_o * tiles_per_prog
            lo_prog, hi_prog = flat.argmin(1) // span, flat.argmax(1) // span
            assert bool((lo_prog != hi_prog).all()), (lo_prog, hi_prog)


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
def test_gpu_outputs_over_a_million_pixels(backend, normalize):
    # CUDA: more than 1024 blocks x 256 threads x 4 pixels = 1,048,576 pixels per image, so
    # every thread loops over several pixels; Triton: more than 256 tiles of 1024 pixels, so
    # every program covers several tiles.
    if not ops.backend_info()["available"][backend]:
        pytest.skip(f"{backend} backend not available")
    size = (1031, 1030)
    assert size[0] * size[1] > 1024 * 256 * 4
    acts, weights = _ramp_inputs(2, 64, 7, 9, "cuda", elementwise=False)
    out = ops.cam_fuse(acts, weights, size, normalize=normalize, backend=backend)
    ref = ops.cam_fuse_reference(acts, weights, size, normalize=normalize)
    assert_matches(out, ref, 1.0 if normalize else float(ref.abs().max()))


@pytest.mark.cuda
@NEEDS_GPU
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("elementwise", [False, True], ids=["channel", "elementwise"])
def test_gpu_batches_beyond_the_grid_y_limit(backend, elementwise):
    # The CUDA launches put the batch on grid y, capped at 65535: larger batches loop.
    if not ops.backend_info()["available"][backend]:
        pytest.skip(f"{backend} backend not available")
    b = 65535 + 37
    acts, weights = _inputs(b, 3, 2, 3, torch.float32, "cuda", elementwise)
    for normalize in (True, False):
        out = ops.cam_fuse(acts, weights, (5, 4), normalize=normalize, backend=backend)
        ref = ops.cam_fuse_reference(acts, weights, (5, 4), normalize=normalize)
        assert_matches(out, ref, 1.0 if normalize else float(ref.abs().max()))
