"""Perturbation methods (LIME, KernelSHAP, occlusion) against exact Shapley values, sklearn,
captum and their own contracts (batching, seeding, validation)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor, nn

import xai_serve
from tests._peers import require
from xai_serve import InvalidInput
from xai_serve.explainers import perturbation as pt
from xai_serve.explainers import segmentation, shapley
from xai_serve.explainers.base import get_method

from . import test_perturbation_rounds as rounds

SIZE = 16


def tiny_cnn(seed: int = 0, classes: int = 5) -> nn.Module:
    """A small CNN with enough non-linearity that its superpixel game has interactions."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32, classes),
    ).eval()


def images(b: int = 2, size: int = SIZE, seed: int = 1) -> Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def block_segments(rows: int, cols: int, size: int = SIZE) -> Tensor:
    """``[size, size]`` ids of a rows x cols grid of equal blocks, row-major."""
    y = torch.arange(size)[:, None] * rows // size
    x = torch.arange(size)[None, :] * cols // size
    return (y * cols + x).expand(size, size).contiguous()


def two_segmentations() -> Tensor:
    """Image 0: 8 blocks (ids 0..7). Image 1: 6 blocks carrying ids {0, 1, 2, 4, 5, 7}, so
    S = 8 and ids 3 and 6 are unused there."""
    second = torch.tensor([0, 1, 2, 4, 5, 7])[block_segments(2, 3)]
    return torch.stack([block_segments(2, 4), second])


def count_forwards(model: nn.Module) -> list[int]:
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def segment_mean_fill(x: Tensor, seg: Tensor) -> Tensor:
    """``[C, H, W]``: every pixel replaced by its segment's mean colour (explicit loop)."""
    out = torch.empty_like(x)
    for i in seg.unique().tolist():
        where = seg == i
        out[:, where] = x[:, where].mean(1, keepdim=True)
    return out


def game(model: nn.Module, x: Tensor, seg: Tensor, fill: Tensor, target: int, output: str):
    """``v(T)`` for every subset T of the ids image ``x`` uses, by explicit masking."""
    ids = seg.unique().tolist()
    subsets = [frozenset(c) for r in range(len(ids) + 1) for c in itertools.combinations(ids, r)]
    batch = torch.stack(
        [
            torch.where(torch.isin(seg, torch.tensor(sorted(t), dtype=seg.dtype)), x, fill)
            for t in subsets
        ]
    )
    with torch.no_grad():
        logits = model(batch).double()
    scores = logits.softmax(1) if output == "probability" else logits
    return ids, dict(zip(subsets, scores[:, target].tolist(), strict=True))


def brute_force_shapley(ids: list[int], v: dict) -> dict[int, float]:
    """``phi_i = sum_{T not containing i} |T|! (M - |T| - 1)! / M! (v(T + i) - v(T))``."""
    m = len(ids)
    phi = {}
    for i in ids:
        others = [j for j in ids if j != i]
        total = 0.0
        for r in range(m):
            coeff = math.factorial(r) * math.factorial(m - r - 1) / math.factorial(m)
            for c in itertools.combinations(others, r):
                t = frozenset(c)
                total += coeff * (v[t | {i}] - v[t])
        phi[i] = total
    return phi


def exact_shapley(model, x, seg, targets, s, output, baseline=None) -> Tensor:
    """``[B, S]`` Shapley values by the explicit formula (0 for unused ids)."""
    out = torch.zeros(x.shape[0], s, dtype=torch.float64)
    for b in range(x.shape[0]):
        fill = segment_mean_fill(x[b], seg[b]) if baseline is None else baseline[b]
        ids, v = game(model, x[b], seg[b], fill, int(targets[b]), output)
        for i, value in brute_force_shapley(ids, v).items():
            out[b, i] = value
    return out


# --------------------------------------------------------------------------- KernelSHAP


@pytest.mark.parametrize("output", ["logit", "probability"])
def test_kernelshap_enumeration_is_the_exact_shapley_value(output):
    model, x, seg = tiny_cnn(), images(), two_segmentations()
    out = xai_serve.explain(
        model, x, "kernelshap", segments=seg, samples=256, seed=0, output=output
    )
    assert out.samples == 256 and out.weights.shape == (2, 8)
    ref = exact_shapley(model, x, seg, out.targets, 8, output)
    err = float((out.weights.double() - ref).abs().max())
    # measured 1.1e-8 (logit), 8.8e-9 (probability; phi ~ 1e-2): the reference's float32
    # forwards run in other batches than the explainer's and round differently
    assert err < 1e-7, err
    assert out.weights[1, 3] == 0 and out.weights[1, 6] == 0  # unused ids of image 1
    # efficiency: sum(phi) = f(x) - f(baseline), intercept = f(baseline) (explicit masks)
    for b in range(2):
        fill = segment_mean_fill(x[b], seg[b])
        with torch.no_grad():
            f = model(torch.stack([x[b], fill])).double()
        f = f.softmax(1) if output == "probability" else f
        f1, f0 = f[:, int(out.targets[b])].tolist()
        assert abs(float(out.weights[b].double().sum()) - (f1 - f0)) < 1e-7  # measured 1.1e-8
        assert abs(float(out.intercept[b]) - f0) < 1e-7  # measured 4.7e-9
    # score: the weighted R^2 of f0 + z . phi over the proper coalitions, Shapley-kernel weights
    _ids, v = game(
        model, x[0], seg[0], segment_mean_fill(x[0], seg[0]), int(out.targets[0]), output
    )
    rows = [t for t in v if 0 < len(t) < 8]
    w = torch.tensor([1.0 / (math.comb(8, len(t)) * len(t) * (8 - len(t))) for t in rows])
    y = torch.tensor([v[t] for t in rows], dtype=torch.float64)
    pred = torch.tensor([v[frozenset()] + sum(float(out.weights[0, i]) for i in t) for t in rows])
    ybar = (w * y).sum() / w.sum()
    r2 = 1 - (w * (y - pred) ** 2).sum() / (w * (y - ybar) ** 2).sum()
    assert abs(float(out.score[0]) - float(r2)) < 1e-6  # measured 1.8e-8, 1.1e-7


def test_kernelshap_sampling_error_shrinks_with_samples():
    model, x = tiny_cnn(seed=2), images(seed=3)
    seg = block_segments(3, 4).expand(2, SIZE, SIZE).clone()  # S = 12
    seg[1] = seg[1].flip(1)
    exact = xai_serve.explain(
        model, x, "kernelshap", segments=seg, samples=4096, seed=0, output="logit", batch_size=1024
    )
    assert exact.samples == 4096  # 2^12 coalitions: enumeration
    errors = []
    for samples in (64, 256, 1024):
        err = 0.0
        for seed in range(3):
            est = xai_serve.explain(
                model,
                x,
                "kernelshap",
                segments=seg,
                samples=samples,
                seed=seed,
                output="logit",
                batch_size=1024,
            )
            assert est.samples == samples
            sums = est.weights.double().sum(1)
            # efficiency: float32 weights summing to the same total (measured <= 8e-9)
            torch.testing.assert_close(sums, exact.weights.double().sum(1), atol=1e-7, rtol=0)
            err += float((est.weights - exact.weights).abs().mean()) / 3
        errors.append(err)
    # measured mean |error| 4.0e-3, 1.6e-3, 7.5e-4 (mean |phi| 2.5e-2)
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.5 * errors[0], errors


def test_kernelshap_pairing_and_efficiency_when_sampling():
    model, x, seg = tiny_cnn(), images(), two_segmentations()
    exact = exact_shapley(model, x, seg, torch.tensor([0, 0]), 8, "logit")
    error = {}
    for paired, samples in itertools.product((False, True), (32, 254)):  # 2^8 > 254: sampled
        error[paired, samples] = 0.0
        for seed in range(4):
            a = xai_serve.explain(
                model,
                x,
                "kernelshap",
                segments=seg,
                samples=samples,
                paired=paired,
                seed=seed,
                output="logit",
                target=0,
            )
            assert a.samples == samples
            # image 1 uses 6 ids: its 2^6 coalitions are enumerated, exactly
            assert a.sample_counts.tolist() == [samples, min(samples, 64)]
            sums = a.weights.double().sum(1)
            torch.testing.assert_close(sums, exact.sum(1), atol=1e-7, rtol=0)  # measured 8e-9
            error[paired, samples] += float((a.weights.double() - exact).abs().mean()) / 4
    # measured mean |error| (mean |phi| = 0.04): unpaired 1.6e-2 -> 5e-3, paired 6e-3 -> 1.6e-3
    assert error[False, 32] > error[False, 254] and error[True, 32] > error[True, 254], error
    assert error[True, 254] < error[False, 254], error


@pytest.mark.parametrize(("method", "options"), [("kernelshap", {}), ("lime", {"alpha": 0.0})])
def test_image_with_a_single_superpixel(method, options):
    """Image 1 is one superpixel, so its game is f(0) + z (f(x) - f(0)) exactly: KernelSHAP
    (its coalitions are all empty or full) and unregularised LIME both give that superpixel
    f(x) - f(baseline), with a perfect fit."""
    model, x = tiny_cnn(), images()
    seg = torch.stack([block_segments(2, 4), torch.zeros(SIZE, SIZE, dtype=torch.int64)])
    out = xai_serve.explain(
        model, x, method, segments=seg, samples=50, seed=0, baseline=0.0, output="logit", **options
    )
    assert bool(torch.isfinite(out.weights).all() & torch.isfinite(out.score).all())
    assert bool((out.weights[1, 1:] == 0).all())
    with torch.no_grad():
        f = model(torch.stack([x[1], torch.zeros_like(x[1])]))[:, int(out.targets[1])]
    assert abs(float(out.weights[1, 0]) - float(f[0] - f[1])) < 1e-5
    assert abs(float(out.intercept[1]) - float(f[1])) < 1e-5
    assert abs(float(out.score[1]) - 1.0) < 1e-6


@pytest.mark.parametrize("kind", ["number", "tensor", "blur"])
def test_kernelshap_baselines(kind):
    model, x, seg = tiny_cnn(), images(), two_segmentations()
    if kind == "number":
        baseline, fill = 0.5, torch.full_like(x, 0.5)
    elif kind == "tensor":
        baseline = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
        fill = baseline.expand_as(x)
    else:
        baseline, fill = "blur", pt.gaussian_blur(x, 2.0)
    out = xai_serve.explain(
        model,
        x,
        "kernelshap",
        segments=seg,
        samples=256,
        seed=0,
        baseline=baseline,
        blur_sigma=2.0,
        output="logit",
    )
    ref = exact_shapley(model, x, seg, out.targets, 8, "logit", baseline=fill)
    assert float((out.weights.double() - ref).abs().max()) < 1e-4
    with torch.no_grad():
        f0 = model(fill).gather(1, out.targets[:, None])[:, 0]
    torch.testing.assert_close(out.intercept, f0, atol=1e-5, rtol=0)


def test_gaussian_blur_matches_scipy():
    ndimage = require("scipy.ndimage")
    x = images(b=1, size=20)
    for sigma in (1.5, 2.2, 5.0):  # radius ceil(3 sigma) = scipy's int(3 sigma + 0.5) here
        ours = pt.gaussian_blur(x, sigma)
        ref = ndimage.gaussian_filter(
            x.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=3.0
        )
        assert float((ours.double() - torch.from_numpy(ref)).abs().max()) < 1e-5


# --------------------------------------------------------------------------- LIME


def test_lime_surrogate_matches_sklearn_ridge():
    np = require("numpy")
    linear_model = require("sklearn.linear_model")
    metrics = require("sklearn.metrics")
    model, x, seg = tiny_cnn(), images(), two_segmentations()
    seed, samples, alpha, width = 7, 200, 0.7, 0.3
    out = xai_serve.explain(
        model,
        x,
        "lime",
        segments=seg,
        samples=samples,
        seed=seed,
        alpha=alpha,
        kernel_width=width,
        batch_size=48,
    )
    assert out.samples == samples
    # the same coalitions, drawn as the explainer draws them: in rounds, from each image's own
    # generator, over its used ids (ascending), row 0 keeping them all
    present = torch.stack([torch.isin(torch.arange(8), s.unique()) for s in seg])
    step = pt.round_samples(samples)
    keep = torch.zeros(2, samples, 8, dtype=torch.bool)
    for b in range(2):
        g = torch.Generator().manual_seed(seed)
        ids = present[b].nonzero().squeeze(1)
        draws = torch.cat(
            [
                torch.rand(min(step, samples - r), len(ids), generator=g) < 0.5
                for r in range(0, samples, step)
            ]
        )
        draws[0] = True
        keep[b][:, ids] = draws
    for b in range(2):
        z = keep[b].double().numpy()
        # scores by explicit masking with the segment-mean fill
        fill = segment_mean_fill(x[b], seg[b])
        kept = keep[b][:, seg[b]]  # [N, H, W]
        with torch.no_grad():
            p = model(torch.where(kept[:, None], x[b], fill)).softmax(1)
        y = p[:, int(out.targets[b])].double().numpy()
        # lime's kernel on sklearn's cosine distance to the first (all-kept) row
        d = metrics.pairwise_distances(
            z[:, present[b].numpy()], z[:1, present[b].numpy()], metric="cosine"
        ).ravel()
        w = np.sqrt(np.exp(-(d**2) / width**2))
        ridge = linear_model.Ridge(alpha=alpha).fit(z, y, sample_weight=w)
        coef = torch.from_numpy(ridge.coef_)
        scale = float(coef.abs().max())
        # The labels here come from float32 forwards in other batches than the explainer's,
        # so they differ from its own in the last float32 bits; measured: coefficients
        # 4.9e-8 and 2.8e-7 of the largest, intercepts 6e-9, scores 9e-8. (On identical
        # labels the fit equals lime's to float32 rounding: the LimeBase test below.)
        assert float((out.weights[b].double() - coef).abs().max()) < 1e-6 * scale
        assert abs(float(out.intercept[b]) - ridge.intercept_) < 5e-8
        assert abs(float(out.score[b]) - ridge.score(z, y, sample_weight=w)) < 5e-7
    assert out.weights[1, 3] == 0 and out.weights[1, 6] == 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 3.0])
def test_weighted_ridge_matches_sklearn(alpha):
    linear_model = require("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(3, 60, 9, generator=g) < 0.5).double()
    y = torch.randn(3, 60, generator=g, dtype=torch.float64)
    w = torch.rand(3, 60, generator=g, dtype=torch.float64)
    present = torch.ones(3, 9, dtype=torch.bool)
    coef, intercept, r2 = shapley.weighted_ridge(z, y, w, alpha, present)
    for b in range(3):
        ref = linear_model.Ridge(alpha=alpha).fit(
            z[b].numpy(), y[b].numpy(), sample_weight=w[b].numpy()
        )
        assert float((coef[b] - torch.from_numpy(ref.coef_)).abs().max()) < 1e-8
        assert abs(float(intercept[b]) - ref.intercept_) < 1e-8
        assert abs(float(r2[b]) - ref.score(z[b].numpy(), y[b].numpy(), w[b].numpy())) < 1e-8


def test_lime_recovers_an_additive_model():
    """A model whose logit is linear in the segment indicators: with alpha -> 0, LIME's
    coefficients are the per-segment effects exactly."""
    seg = two_segmentations()
    gain = torch.tensor([[1.0, -2.0, 0.5, 3.0, 0.0, -1.0, 2.0, 0.25]])

    class Additive(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            # x: original pixels are 1, baseline pixels 0; logit 0 = sum of kept segment gains
            b = x.shape[0]
            s0 = seg[0].flatten()
            kept = x[:, 0].flatten(1)  # [b, H*W]
            frac = torch.zeros(b, 8).scatter_add_(1, s0.expand(b, -1), kept)
            frac = frac / torch.bincount(s0, minlength=8).clamp_min(1)
            return torch.stack([(frac * gain).sum(1), torch.zeros(b)], 1)

    x = torch.ones(1, 3, SIZE, SIZE)
    out = xai_serve.explain(
        Additive(),
        x,
        "lime",
        segments=seg[:1],
        samples=64,
        seed=0,
        alpha=0.0,
        baseline=0.0,
        output="logit",
        target=0,
    )
    torch.testing.assert_close(out.weights, gain, atol=1e-6, rtol=0)
    assert abs(float(out.intercept[0])) < 1e-6 and abs(float(out.score[0]) - 1.0) < 1e-9
    shap = xai_serve.explain(
        Additive(),
        x,
        "kernelshap",
        segments=seg[:1],
        samples=40,
        seed=0,
        baseline=0.0,
        output="logit",
        target=0,
    )
    torch.testing.assert_close(shap.weights, gain, atol=1e-6, rtol=0)


class RecordingGame(rounds.Game):
    """The superpixel game of test_perturbation_rounds, keeping every coalition it scored."""

    def __init__(self, seg: Tensor, fn) -> None:
        super().__init__(seg, fn)
        self.rows: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        sums = torch.zeros(n, self.m, dtype=torch.float64)
        sums.scatter_add_(1, self.seg.expand(n, -1), x[:, 0].flatten(1).double())
        self.rows.append(sums / torch.bincount(self.seg, minlength=self.m) > 0.5)
        return super().forward(x)


def lime_on_game(fn, seeds: int, **options) -> tuple[RecordingGame, xai_serve.Explanation]:
    """LIME of ``seeds`` copies of the all-ones image (copy i seeded i) on a 2 x 5 grid of
    superpixels, baseline 0, class 0 of the game's logits ``[f(z), 0]``."""
    seg = rounds.grid(2, 5)
    model = RecordingGame(seg, fn)
    out = rounds.many_seeds(model, seg, "lime", seeds, output="logit", **options)
    return model, out


@pytest.mark.parametrize("keep_prob", [0.2, 0.5])
def test_lime_keeps_each_superpixel_with_keep_prob(keep_prob):
    """4 images x 1000 coalitions of 10 superpixels: past each image's all-kept first row,
    the fraction of kept superpixels is ``keep_prob`` within 0.01 overall (5 standard
    deviations of 39,960 draws) and within 0.03 per superpixel (4.7 SD)."""
    seeds, samples, m = 4, 1000, 10
    model, out = lime_on_game(rounds.cubic(m), seeds, samples=samples, keep_prob=keep_prob)
    assert out.sample_counts.tolist() == [samples] * seeds
    rows = torch.cat(model.rows[1:]).double()  # [0]: the plain forward of the images
    assert rows.shape == (seeds * samples, m)
    full = rows.sum(1) == m
    assert int(full.sum()) >= seeds  # the first row of every image keeps everything
    # each image's first row is all-kept; remove exactly one such row per image
    kept = rows.sum(0) - seeds  # per superpixel, over the seeds * (samples - 1) random rows
    draws = seeds * (samples - 1)
    assert abs(float(kept.sum()) / (draws * m) - keep_prob) < 0.01, float(kept.sum()) / (draws * m)
    assert float((kept / draws - keep_prob).abs().max()) < 0.03, kept / draws


@pytest.mark.parametrize("keep_prob", [0.2, 0.5])
def test_lime_fit_matches_the_lime_package_on_the_same_neighbourhood(keep_prob):
    """The whole fit against ``lime.lime_base.LimeBase`` (lime 0.2.0.1): on the coalitions the
    model actually scored (recorded by the model), their labels, ``lime_image``'s cosine
    distances to the first row and its kernel ``sqrt(exp(-d^2 / width^2))``, all features
    (``feature_selection="none"``) and ``Ridge(alpha)``: coefficients, intercept and score
    equal up to the rounding of the explanation's float32 (relative 2^-24 = 6e-8)."""
    np = require("numpy")
    lime_base = require("lime.lime_base")
    linear_model = require("sklearn.linear_model")
    metrics = require("sklearn.metrics")
    m, samples, alpha, width = 10, 300, 0.7, 0.5
    fn = rounds.cubic(m, seed=7, scale=0.5)
    model, out = lime_on_game(
        fn, 1, samples=samples, keep_prob=keep_prob, alpha=alpha, kernel_width=width
    )
    z = torch.cat(model.rows[1:]).double()
    assert z.shape == (samples, m) and bool(z[0].all())  # row 0: the original image
    data = z.numpy()
    labels = np.stack([fn(z).float().double().numpy(), np.zeros(samples)], 1)  # the logits
    distances = metrics.pairwise_distances(data, data[:1], metric="cosine").ravel()
    base = lime_base.LimeBase(lambda d: np.sqrt(np.exp(-(d**2) / width**2)), random_state=0)
    intercept, exp, score, _ = base.explain_instance_with_data(
        data, labels, distances, 0, m, feature_selection="none",
        model_regressor=linear_model.Ridge(alpha=alpha),
    )  # fmt: skip
    coef = torch.zeros(m, dtype=torch.float64)
    for feature, weight in exp:
        coef[feature] = weight
    assert float(coef.abs().max()) > 0.1  # not a vacuous comparison
    # The explanation holds float32: equal to lime's float64 numbers rounded to float32, i.e.
    # within half a float32 ulp (2^-24 relative), plus 1e-12 for the float64 arithmetic.
    ours = torch.cat([out.weights[0], out.intercept[:1], out.score[:1]]).double()
    ref = torch.cat([coef, torch.tensor([intercept, score], dtype=torch.float64)])
    assert out.weights.dtype == out.intercept.dtype == out.score.dtype == torch.float32
    bound = ref.abs() * 2.0**-24 + 1e-12
    assert bool(((ours - ref).abs() <= bound).all()), ((ours - ref).abs() / ref.abs()).max()


# --------------------------------------------------------------------------- occlusion


@pytest.mark.parametrize(
    ("window", "stride", "baseline", "output"),
    [(16, 8, None, "probability"), (8, 5, 0.3, "logit"), (7, 3, "blur", "probability")],
)
def test_occlusion_matches_captum(window, stride, baseline, output):
    captum = require("captum.attr")
    model, x = tiny_cnn(), images(b=2, size=32, seed=4)
    targets = torch.tensor([1, 3])
    out = xai_serve.explain(
        model,
        x,
        "occlusion",
        target=targets,
        window=window,
        stride=stride,
        baseline=baseline,
        output=output,
        batch_size=10,
    )
    f = model if output == "logit" else nn.Sequential(model, nn.Softmax(1))
    if baseline is None:
        base = 0.0
    elif baseline == "blur":
        base = pt.gaussian_blur(x, 5.0)
    else:
        base = baseline
    ref = (
        captum.Occlusion(f)
        .attribute(
            x,
            sliding_window_shapes=(3, window, window),
            strides=(3, stride, stride),
            baselines=base,
            target=targets,
        )
        .sum(1)
    )
    n = math.ceil((32 - window) / stride) + 1
    assert out.samples == n * n
    err = float((out.maps - ref).abs().max() / ref.abs().max())
    assert err < 1e-5, err  # measured 0, 0 and 4.6e-8


# --------------------------------------------------------------------------- batching, seeds


@pytest.mark.parametrize(
    ("method", "options", "counts"),
    [
        ("lime", {"samples": 50}, [50, 50, 50]),  # one round
        ("lime", {"samples": 150}, [150, 150, 150]),  # rounds of 64, 64, 22
        ("kernelshap", {"samples": 256}, [256, 64, 256]),  # S = 8 and 6: enumerations
        ("kernelshap", {"samples": 90}, [90, 64, 90]),  # image 1 enumerated, 0 and 2 sampled
        ("occlusion", {"window": 6, "stride": 4}, [16, 16, 16]),
    ],
)
@pytest.mark.parametrize("batch_size", [7, 64])
def test_forward_count_and_chunking(method, options, counts, batch_size):
    """Every round's inputs of all images share forwards of ``batch_size``; an image that is
    done (enumerated, or at its ``samples``) takes no more; chunking does not change results."""
    model, x = tiny_cnn(), images(b=3)
    seg = torch.cat([two_segmentations(), two_segmentations()[:1]])
    extra = {} if method == "occlusion" else {"segments": seg}
    rounds: list[list[int]] = []
    if method != "occlusion":
        extra["progress"] = lambda e: rounds.append(e.sample_counts.tolist())
    calls = count_forwards(model)
    out = xai_serve.explain(model, x, method, seed=3, batch_size=batch_size, **extra, **options)
    assert out.samples == max(counts)
    if method == "occlusion":
        assert len(calls) == math.ceil(3 * counts[0] / batch_size) + 1
    else:
        assert out.sample_counts.tolist() == counts
        assert rounds[-1] == counts
        per_round = [
            sum(now) - sum(before)
            for before, now in zip([[0, 0, 0], *rounds], rounds, strict=False)
        ]
        assert len(calls) == 1 + sum(math.ceil(n / batch_size) for n in per_round)
    assert max(calls) <= batch_size and sum(calls) == sum(counts) + 3
    extra.pop("progress", None)
    ref = xai_serve.explain(tiny_cnn(), x, method, seed=3, batch_size=200, **extra, **options)
    torch.testing.assert_close(out.maps, ref.maps, atol=1e-6, rtol=1e-5)
    if method != "occlusion":
        torch.testing.assert_close(out.weights, ref.weights, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(out.intercept, ref.intercept, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_seeding_and_maps_follow_segments(method):
    model, x, seg = tiny_cnn(), images(), two_segmentations()
    kw = {"segments": seg, "samples": 64}
    a = xai_serve.explain(model, x, method, seed=11, **kw)
    b = xai_serve.explain(model, x, method, seed=11, **kw)
    c = xai_serve.explain(model, x, method, seed=12, **kw)
    assert torch.equal(a.maps, b.maps) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    assert a.maps.dtype == torch.float32 and a.maps.shape == (2, SIZE, SIZE)
    assert torch.equal(a.segments, seg)
    for i in range(2):
        assert torch.equal(a.maps[i], a.weights[i][seg[i]])
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(a.logits, logits)
    assert torch.equal(a.targets, logits.argmax(1))


def test_computed_segments():
    model, x = tiny_cnn(), images(b=2, size=24)
    out = xai_serve.explain(
        model, x, "kernelshap", segmenter="grid", n_segments=6, samples=64, seed=0
    )
    assert torch.equal(out.segments, segmentation.grid(x, 6))
    assert out.samples == 64 and out.weights.shape == (2, 6)  # 2^6 = 64: enumeration
    out = xai_serve.explain(model, x, "lime", n_segments=10, samples=32, seed=0)  # slic
    ref = segmentation.slic(x, n_segments=10)
    assert torch.equal(out.segments, ref)
    assert out.weights.shape == (2, segmentation.num_segments(ref))


def test_amp_bf16_close_to_fp32():
    model, x, seg = tiny_cnn(), images(), two_segmentations()
    kw = {"segments": seg, "samples": 256, "seed": 0, "output": "logit"}
    fp32 = xai_serve.explain(model, x, "kernelshap", **kw)
    bf16 = xai_serve.explain(model, x, "kernelshap", amp="bf16", **kw)
    rel = float((bf16.maps - fp32.maps).abs().max() / fp32.maps.abs().max())
    # bf16 keeps 8 significant bits: logits move by ~4e-3 relative, and Shapley values (sums
    # of differences of logits) by about as much of the largest one: measured 5.7e-3.
    assert 0 < rel < 0.03, rel
    occ32 = xai_serve.explain(model, x, "occlusion", window=6, stride=4, output="logit")
    occ16 = xai_serve.explain(model, x, "occlusion", window=6, stride=4, output="logit", amp="bf16")
    rel = float((occ16.maps - occ32.maps).abs().max() / occ32.maps.abs().max())
    assert 0 < rel < 0.08, rel  # measured 1.9e-2: score drops of one window are small


# --------------------------------------------------------------------------- validation


def test_registered_without_layer():
    for name in ("lime", "kernelshap", "occlusion"):
        assert name in xai_serve.list_methods()
        assert get_method(name).uses_layer is False
    with pytest.raises(InvalidInput, match="layer"):
        xai_serve.explain(tiny_cnn(), images(), "lime", layer="0")


@pytest.mark.parametrize(
    ("segments", "match"),
    [
        (lambda s: s - 1, "ids must lie"),  # a negative id
        (lambda s: s + SIZE * SIZE, "ids must lie"),  # >= H * W
        (lambda s: s[0], "Tensor\\[B, H, W\\]"),
        (lambda s: s[:, :8], "Tensor\\[B, H, W\\]"),
        (lambda s: s.float(), "integer"),
        (lambda s: s.tolist(), "Tensor"),
    ],
)
def test_bad_segments(segments, match):
    seg = segments(two_segmentations())
    for method in ("lime", "kernelshap"):
        with pytest.raises(InvalidInput, match=match):
            xai_serve.explain(tiny_cnn(), images(), method, segments=seg, samples=8)


@pytest.mark.parametrize(
    ("method", "option", "value"),
    [
        ("lime", "samples", 1),
        ("lime", "samples", 2.5),
        ("lime", "kernel_width", 0.0),
        ("lime", "alpha", -1.0),
        ("lime", "keep_prob", 1.0),
        ("lime", "keep_prob", "half"),
        ("lime", "segmenter", "quickshift"),
        ("lime", "n_segments", 0),
        ("lime", "output", "prob"),
        ("lime", "amp", "fp8"),
        ("lime", "blur_sigma", float("nan")),
        ("kernelshap", "samples", True),
        ("kernelshap", "paired", "yes"),
        ("kernelshap", "blur_sigma", 0),
        ("occlusion", "window", 0),
        ("occlusion", "stride", 1.5),
        ("occlusion", "output", None),
    ],
)
def test_bad_options(method, option, value):
    seg = None if method == "occlusion" else two_segmentations()
    with pytest.raises(InvalidInput, match=f"`{option}`"):
        xai_serve.explain(tiny_cnn(), images(), method, segments=seg, **{option: value})


def test_unknown_option_and_misplaced_arguments():
    with pytest.raises(InvalidInput, match="kernel_width"):
        xai_serve.explain(tiny_cnn(), images(), "kernelshap", kernel_width=0.2)
    with pytest.raises(InvalidInput, match="segments"):
        xai_serve.explain(tiny_cnn(), images(), "occlusion", segments=two_segmentations())
    with pytest.raises(InvalidInput, match="target"):
        xai_serve.explain(
            tiny_cnn(), images(), "kernelshap", segments=two_segmentations(), samples=8, target=5
        )


@pytest.mark.parametrize(
    "baseline",
    [
        "grey",
        True,
        float("inf"),
        [0.0, 0.0, 0.0],
        torch.zeros(2, 3, 8, 8),
        torch.zeros(3, SIZE, SIZE),
        torch.zeros(2, 3, SIZE, SIZE, dtype=torch.int64),
    ],
)
@pytest.mark.parametrize("method", ["lime", "kernelshap", "occlusion"])
def test_bad_baseline(method, baseline):
    seg = None if method == "occlusion" else two_segmentations()
    with pytest.raises(InvalidInput, match="baseline"):
        xai_serve.explain(tiny_cnn(), images(), method, segments=seg, baseline=baseline)


def test_bad_model_output():
    class Spatial(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(InvalidInput, match="logits"):
        xai_serve.explain(Spatial(), images(), "occlusion")
