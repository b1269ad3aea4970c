"""Per-image seeding of the randomised methods (LIME, KernelSHAP, SmoothGrad): an image's
explanation must not depend on the other images of its batch, so that a server may merge
requests into one ``explain`` call and still give each seeded request a reproducible answer:
``explain(images, seed=[s0, s1, ...])[i] == explain(images[i:i+1], seed=s_i)``."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import Tensor, nn

import xai_serve
from xai_serve import InvalidInput
from xai_serve.explainers.base import Explanation, resolve_seeds

SIZE = 16
RTOL = 1e-5  # relative to the largest value: the float rounding of batched forwards


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()


def images(b: int = 3, size: int = SIZE, seed: int = 1) -> Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blocks(rows: int, cols: int, ids: list[int] | None = None) -> Tensor:
    """``[SIZE, SIZE]`` ids of a rows x cols grid of blocks, row-major, optionally renamed."""
    y = torch.arange(SIZE)[:, None] * rows // SIZE
    x = torch.arange(SIZE)[None, :] * cols // SIZE
    grid = (y * cols + x).expand(SIZE, SIZE)
    return (grid if ids is None else torch.tensor(ids)[grid]).contiguous()


def mixed_segments() -> Tensor:
    """Three images using 8, 4 and 6 superpixel ids (S = 8; image 1 uses ids 1, 3, 4, 6 and
    image 2 ids 0..5), so with ``samples=100`` KernelSHAP samples image 0 (2^8 > 100) and
    enumerates images 1 (2^4 rows) and 2 (2^6 rows)."""
    return torch.stack([blocks(2, 4), blocks(2, 2, [1, 3, 4, 6]), blocks(2, 3)])


def assert_close(a: Tensor, b: Tensor, what: str) -> None:
    assert a.shape == b.shape, (what, a.shape, b.shape)
    scale = float(b.abs().max()) if b.numel() else 0.0
    err = float((a.double() - b.double()).abs().max()) if b.numel() else 0.0
    assert err <= RTOL * max(scale, 1e-6), (what, err, scale)


def assert_image_matches(batched: Explanation, i: int, single: Explanation) -> None:
    """Image ``i`` of a batched explanation equals the explanation of that image alone."""
    assert torch.equal(batched.targets[i : i + 1], single.targets)
    assert_close(batched.maps[i : i + 1], single.maps, "maps")
    assert_close(batched.logits[i : i + 1], single.logits, "logits")
    if single.weights is not None:
        s = single.weights.shape[1]  # the batch's S may be larger: its extra ids are unused
        assert_close(batched.weights[i : i + 1, :s], single.weights, "weights")
        se_b, se_1 = batched.stderr[i : i + 1, :s], single.stderr
        assert torch.equal(torch.isinf(se_b), torch.isinf(se_1))  # inf: not yet estimable
        assert_close(se_b.nan_to_num(posinf=0.0), se_1.nan_to_num(posinf=0.0), "stderr")
        assert torch.equal(batched.sample_counts[i : i + 1], single.sample_counts)
        assert bool((batched.weights[i, s:] == 0).all())
        assert_close(batched.intercept[i : i + 1], single.intercept, "intercept")
        assert_close(batched.score[i : i + 1], single.score, "score")
        assert torch.equal(batched.segments[i : i + 1], single.segments)
    assert torch.equal(batched.seeds[i : i + 1], single.seeds)


def check_batch_invariance(model, x, method, seeds, segments=None, **options) -> Explanation:
    """Explains the batch with per-image ``seeds`` and every image alone with its seed (and a
    different ``batch_size``, so the chunking differs too); returns the batched explanation."""
    seg = {} if segments is None else {"segments": segments}
    out = xai_serve.explain(model, x, method, seed=seeds, batch_size=7, **seg, **options)
    assert out.seeds.dtype == torch.int64 and out.seeds.tolist() == list(seeds)
    for i, s in enumerate(seeds):
        seg_i = {} if segments is None else {"segments": segments[i : i + 1]}
        single = xai_serve.explain(model, x[i : i + 1], method, seed=s, **seg_i, **options)
        assert_image_matches(out, i, single)
    return out


# --------------------------------------------------------------------------- LIME


def test_lime_per_image_seeds():
    out = check_batch_invariance(
        tiny_cnn(), images(), "lime", [5, 17, 5], segments=mixed_segments(), samples=40
    )
    assert out.samples == 40


def test_lime_with_computed_grid_segments():
    check_batch_invariance(
        tiny_cnn(), images(), "lime", [3, 4, 5], samples=24, segmenter="grid", n_segments=6
    )


# --------------------------------------------------------------------------- KernelSHAP


def test_kernelshap_exact_batch():
    # images 1 and 2 alone: 2^4 and 2^6 rows; batched: 64 rows each, image 1 padded
    seg = mixed_segments()[1:]
    out = check_batch_invariance(
        tiny_cnn(), images()[1:], "kernelshap", [1, 2], segments=seg, samples=64
    )
    assert out.samples == 64


def test_kernelshap_sampled_batch():
    out = check_batch_invariance(
        tiny_cnn(),
        images(),
        "kernelshap",
        [7, 8, 9],
        segments=mixed_segments(),
        samples=12,  # below 2^4: every image sampled
        output="logit",
    )
    assert out.samples == 12


@pytest.mark.parametrize("paired", [True, False])
def test_kernelshap_mixed_exact_and_sampled_batch(paired):
    model, x, seg = tiny_cnn(), images(), mixed_segments()
    out = check_batch_invariance(
        model, x, "kernelshap", [11, 12, 13], segments=seg, samples=100, paired=paired
    )
    assert out.samples == 100  # the sampled image's rows; the enumerated ones are padded
    alone = xai_serve.explain(model, x[1:2], "kernelshap", segments=seg[1:2], samples=100, seed=0)
    assert alone.samples == 16  # one image, nothing to pad
    # efficiency holds for every image: sum(phi) = v(1) - v(0)
    with torch.no_grad():
        full = model(x).softmax(1).gather(1, out.targets[:, None])[:, 0]
    sums = out.weights.double().sum(1)
    torch.testing.assert_close(sums, (full - out.intercept).double(), atol=1e-6, rtol=0)


def test_kernelshap_weight_zero_padding_leaves_the_exact_solution_unchanged():
    """An enumerated image beside a sampled one: its Shapley values do not depend on the seed
    (nothing of it is random) nor on the padding."""
    model, x, seg = tiny_cnn(), images(), mixed_segments()
    a = xai_serve.explain(model, x, "kernelshap", segments=seg, samples=100, seed=[1, 2, 3])
    b = xai_serve.explain(model, x, "kernelshap", segments=seg, samples=100, seed=[4, 5, 6])
    assert not torch.equal(a.weights[0], b.weights[0])  # sampled
    for i in (1, 2):  # enumerated
        assert_close(a.weights[i], b.weights[i], "weights")
        assert_close(a.score[i], b.score[i], "score")


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_tolerance_stops_each_image_on_its_own(method):
    """With a tolerance, every image stops after its own round: the batch's images stop at
    different counts and each equals its explanation alone (samples, weights, SEs)."""
    model, x, seg = tiny_cnn(), images(), mixed_segments()
    n = 400 if method == "lime" else 200  # kernelshap: image 0 (2^8 > 200) is sampled
    probe = xai_serve.explain(model, x, method, segments=seg, samples=n, seed=[7, 8, 9])
    tol = float(probe.stderr[probe.stderr > 0].median())
    out = check_batch_invariance(
        model, x, method, [7, 8, 9], segments=seg, samples=n, tolerance=tol
    )
    assert bool((out.sample_counts <= n).all())
    if method == "lime":
        assert len(set(out.sample_counts.tolist())) > 1, out.sample_counts
    assert out.samples == int(out.sample_counts.max())


def test_progress_does_not_change_the_result():
    model, x, seg = tiny_cnn(), images(), mixed_segments()
    seen = []
    a = xai_serve.explain(
        model, x, "kernelshap", segments=seg, samples=300, seed=1, progress=seen.append
    )
    b = xai_serve.explain(model, x, "kernelshap", segments=seg, samples=300, seed=1)
    assert len(seen) >= 2 and torch.equal(a.weights, b.weights)
    assert torch.equal(a.stderr, b.stderr)


# --------------------------------------------------------------------------- SmoothGrad


@pytest.mark.parametrize("base", ["saliency", "input_x_gradient"])
def test_smoothgrad_per_image_seeds(base):
    out = check_batch_invariance(
        tiny_cnn(), images(), "smoothgrad", [21, 22, 21], samples=5, base=base
    )
    # images 0 and 2 share a seed but not their pixels: their noise is the same draw, scaled
    # by each image's range; different images still get different maps
    assert not torch.equal(out.maps[0], out.maps[2])


def test_smoothgrad_noise_does_not_depend_on_batch_size():
    model, x = tiny_cnn(), images()
    ref = xai_serve.explain(model, x, "smoothgrad", samples=6, seed=[1, 2, 3], batch_size=18)
    for batch_size in (1, 4, 7):
        out = xai_serve.explain(
            model, x, "smoothgrad", samples=6, seed=[1, 2, 3], batch_size=batch_size
        )
        assert_close(out.maps, ref.maps, f"maps, batch_size={batch_size}")


# --------------------------------------------------------------------------- a real model


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("smoothgrad", {"samples": 3}),
        ("lime", {"samples": 16, "segmenter": "grid", "n_segments": 4}),
        ("kernelshap", {"samples": 16, "segmenter": "grid", "n_segments": 4}),
    ],
)
def test_resnet18(method, options):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = images(b=2, size=32, seed=2)
    check_batch_invariance(model, x, method, [31, 32], **options)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lime", {"samples": 40, "segments": mixed_segments()}),
        ("kernelshap", {"samples": 100, "segments": mixed_segments()}),
        ("smoothgrad", {"samples": 5}),
    ],
)
def test_on_cuda(method, options):
    """The per-image generators live on the images' device (CUDA Philox streams)."""
    out = check_batch_invariance(tiny_cnn().cuda(), images().cuda(), method, [1, 2, 3], **options)
    assert out.maps.is_cuda and out.seeds.is_cuda


# --------------------------------------------------------------------------- the seed argument


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("lime", {"samples": 20}),
        ("kernelshap", {"samples": 100}),
        ("smoothgrad", {"samples": 3}),
    ],
)
def test_an_int_seed_is_every_images_seed(method, options):
    model, x = tiny_cnn(), images()
    seg = {} if method == "smoothgrad" else {"segments": mixed_segments()}
    a = xai_serve.explain(model, x, method, seed=9, **seg, **options)
    b = xai_serve.explain(model, x, method, seed=9, **seg, **options)
    c = xai_serve.explain(model, x, method, seed=10, **seg, **options)
    assert a.seeds.tolist() == [9, 9, 9]
    assert torch.equal(a.maps, b.maps)  # the same seed: the same result, bitwise
    assert not torch.equal(a.maps[0], c.maps[0])  # another seed: another draw
    listed = xai_serve.explain(model, x, method, seed=[9, 9, 9], **seg, **options)
    assert torch.equal(a.maps, listed.maps)
    for i in range(3):
        seg_i = {k: v[i : i + 1] for k, v in seg.items()}
        single = xai_serve.explain(model, x[i : i + 1], method, seed=9, **seg_i, **options)
        assert_image_matches(a, i, single)


@pytest.mark.parametrize("method", ["lime", "kernelshap", "smoothgrad"])
def test_no_seed_draws_fresh_seeds_that_are_reported(method):
    model, x = tiny_cnn(), images(b=2)
    kw = {"samples": 20} if method == "smoothgrad" else {"samples": 20, "segments": blocks(2, 4)}
    if "segments" in kw:
        kw["segments"] = kw["segments"].expand(2, SIZE, SIZE)
    a = xai_serve.explain(model, x, method, **kw)
    b = xai_serve.explain(model, x, method, **kw)
    assert a.seeds.shape == (2,) and a.seeds.dtype == torch.int64
    assert a.seeds[0] != a.seeds[1] and not torch.equal(a.seeds, b.seeds)
    again = xai_serve.explain(model, x, method, seed=a.seeds, **kw)  # a Tensor[B] of seeds
    assert torch.equal(again.maps, a.maps) and torch.equal(again.seeds, a.seeds)
    again = xai_serve.explain(model, x, method, seed=tuple(a.seeds.tolist()), **kw)
    assert torch.equal(again.maps, a.maps)


def test_deterministic_methods_report_no_seeds():
    model, x = tiny_cnn(), images(b=2)
    for method in ("saliency", "integrated_gradients", "occlusion", "gradcam"):
        assert xai_serve.explain(model, x, method, seed=[1, 2]).seeds is None


@pytest.mark.parametrize(
    ("seed", "match"),
    [
        ([1, 2], "one seed per image: 3 image\\(s\\), got 2"),
        ([1, 2, 3, 4], "one seed per image"),
        (torch.tensor([1, 2]), "one seed per image"),
        ([], "one seed per image"),
        (True, "`seed` must be"),
        ([1, True, 3], "integers"),
        ([1, 2.0, 3], "integers"),
        (1.5, "`seed` must be"),
        ("7", "`seed` must be"),
        (torch.tensor([1.0, 2.0, 3.0]), "Tensor\\[B\\] of integers"),
        (torch.tensor([[1, 2, 3]]), "Tensor\\[B\\] of integers"),
        ([0, 2**63, 1], "64-bit"),
        (-(2**63) - 1, "64-bit"),
    ],
)
def test_bad_seeds_are_refused(seed, match):
    with pytest.raises(InvalidInput, match=match):
        xai_serve.explain(tiny_cnn(), images(), "smoothgrad", seed=seed, samples=1)


def test_resolve_seeds():
    assert resolve_seeds(5, 3) == [5, 5, 5]
    assert resolve_seeds([1, -2, 2**63 - 1], 3) == [1, -2, 2**63 - 1]
    assert resolve_seeds(torch.tensor([4, 5], dtype=torch.int32), 2) == [4, 5]
    fresh = resolve_seeds(None, 4)
    assert len(set(fresh)) == 4 and all(0 <= s < 2**63 for s in fresh)
