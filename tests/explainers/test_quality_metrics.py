"""ROAD, infidelity, max-sensitivity and model-parameter randomisation against a direct sparse
solve, captum's ``captum.metrics``, Quantus 0.6.0, scipy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tests._peers import require
from xai_serve import InvalidInput
from xai_serve.explainers.metrics import (
    infidelity,
    max_sensitivity,
    randomisable_layers,
    randomisation,
    randomised_models,
    road,
    road_impute,
    spearman,
)


def small_cnn(classes: int = 6, channels: int = 3) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    ).eval()


def gradient(model: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    """``d logit_t / d x``: Tensor[N, C, H, W] (works under ``torch.no_grad()`` too)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        out = model(x).gather(1, t.view(-1, 1)).sum()
        return torch.autograd.grad(out, x)[0]


# --------------------------------------------------------------------------- ROAD imputation


def scipy_impute(image: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """The noiseless ROAD imputation of one image ``[C, H, W]`` by a direct sparse solve of
    ``x_i = sum_j w_ij x_j / sum_j w_ij`` (neighbours inside the image, 1/6 direct, 1/12
    diagonal), written out here from the paper's definition."""
    sparse = require("scipy.sparse")
    linalg = require("scipy.sparse.linalg")
    c, h, w = image.shape
    ids = -np.ones((h, w), dtype=int)
    unknown = np.argwhere(removed)
    ids[removed] = np.arange(len(unknown))
    a = sparse.lil_matrix((len(unknown), len(unknown)))
    rhs = np.zeros((len(unknown), c))
    for k, (y, x) in enumerate(unknown):
        total = 0.0
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy, dx) == (0, 0) or not (0 <= yy < h and 0 <= xx < w):
                    continue
                weight = 1 / 12 if dy and dx else 1 / 6
                total += weight
                if removed[yy, xx]:
                    a[k, ids[yy, xx]] -= weight
                else:
                    rhs[k] += weight * image[:, yy, xx]
        a[k, k] += total
    solution = linalg.spsolve(a.tocsc(), rhs)
    out = image.copy()
    out[:, removed] = np.asarray(solution).reshape(len(unknown), c).T
    return out


def test_imputation_matches_a_direct_sparse_solve():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 12, 12, generator=g, dtype=torch.float64)
    removed = torch.rand(2, 12, 12, generator=g) < 0.6
    removed[1, :6] = True  # a large connected hole touching the border
    out = road_impute(images, removed, noise=0.0)
    out32 = road_impute(images.float(), removed, noise=0.0)
    for i in range(2):
        ref = scipy_impute(images[i].numpy(), removed[i].numpy())
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-6, rtol=0)
        np.testing.assert_allclose(out32[i].numpy(), ref, atol=1e-4, rtol=0)
    # the kept pixels are untouched
    keep = ~removed[:, None].expand_as(images)
    assert torch.equal(out[keep], images[keep])


def test_imputation_matches_quantus_noisy_linear_imputation():
    """Quantus' ``noisy_linear_imputation`` (the ROAD authors' solver, scipy ``spsolve``) with
    its noise set to 0: the same linear system."""
    perturb = require("quantus.functions.perturb_func")
    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 10, 14, generator=g, dtype=torch.float64)
    removed = torch.rand(2, 10, 14, generator=g) < 0.5
    out = road_impute(images, removed, noise=0.0)
    for i in range(2):
        idx = np.flatnonzero(removed[i].numpy().reshape(-1))
        ref = perturb.noisy_linear_imputation(images[i].numpy(), idx, noise=0.0)
        np.testing.assert_allclose(out[i].numpy(), ref, atol=1e-6, rtol=0)


def test_imputation_of_a_constant_image_is_the_constant_plus_the_seeded_noise():
    images = torch.full((2, 3, 20, 20), 0.7)
    removed = torch.rand(2, 20, 20, generator=torch.Generator().manual_seed(2)) < 0.9
    removed[:, 0, 0] = False
    torch.testing.assert_close(road_impute(images, removed, noise=0.0), images)
    # the noise: noise * N(0, 1) from image i's own generator, on the removed pixels only
    noisy = road_impute(images, removed, noise=0.01, seed=[3, 4])
    for i, s in enumerate((3, 4)):
        draw = torch.randn((3, 20, 20), generator=torch.Generator().manual_seed(s))
        expected = torch.where(removed[i], 0.7 + 0.01 * draw, torch.tensor(0.7))
        torch.testing.assert_close(noisy[i], expected)


def test_imputation_at_224_pixels_converges():
    """The coarse-to-fine start and CG reach the direct solve at a full-size image with 90%
    of it removed in one blob (the hard case: a large, smooth hole)."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(1, 1, 224, 224, generator=g)
    yy, xx = torch.meshgrid(torch.arange(224), torch.arange(224), indexing="ij")
    removed = ((yy - 100) ** 2 + (xx - 120) ** 2 < 126**2)[None]
    assert removed.float().mean() > 0.8
    out = road_impute(image, removed, noise=0.0)
    ref = scipy_impute(image[0].double().numpy(), removed[0].numpy())
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- ROAD


def road_oracle(model, image, saliency, target, fractions, order):
    """One image, one fraction at a time: the pixel order by a Python sort, the imputation by
    the direct solve, the probability by a single forward."""
    _, h, w = image.shape
    values = saliency.reshape(-1).tolist()
    ranked = sorted(range(h * w), key=lambda p: (-values[p], p))
    out, top1 = [], []
    for f in fractions:
        n = int(np.floor(f * h * w))
        chosen = ranked[:n] if order == "morf" else ranked[h * w - n :]
        removed = np.zeros(h * w, dtype=bool)
        removed[chosen] = True
        x = scipy_impute(image.double().numpy(), removed.reshape(h, w))
        with torch.no_grad():
            logits = model(torch.from_numpy(x).float()[None])[0]
        out.append(float(logits.softmax(dim=0)[target]))
        top1.append(int(logits.argmax()) == target)
    return out, top1


@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_matches_the_per_image_oracle(order):
    model = small_cnn()
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, 8, 8, generator=g)
    maps = torch.randint(0, 5, (3, 8, 8), generator=g).float()  # ties
    target = torch.tensor([1, 4, 0])
    fractions = (0.1, 0.35, 0.5, 0.9)
    res = road(
        model, images, maps, target, fractions=fractions, order=order, noise=0.0, batch_size=5
    )
    oracle = [
        road_oracle(model, images[b], maps[b], int(target[b]), fractions, order) for b in range(3)
    ]
    expected = [probs for probs, _ in oracle]
    assert res.curve.shape == (3, 4) and res.scores.dtype == torch.float32
    np.testing.assert_allclose(res.curve.numpy(), expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(res.scores.numpy(), np.mean(expected, axis=1), atol=1e-5)
    assert res.correct.tolist() == [top1 for _, top1 in oracle]
    assert res.fractions == fractions and res.order == order


def test_road_value_of_an_image_does_not_depend_on_its_batch():
    model = small_cnn()
    g = torch.Generator().manual_seed(5)
    images = torch.rand(3, 3, 8, 8, generator=g)
    maps = torch.rand(3, 8, 8, generator=g)
    all_ = road(model, images, maps, 2, seed=[7, 8, 9], batch_size=4)
    for i, s in enumerate((7, 8, 9)):
        one = road(model, images[i : i + 1], maps[i : i + 1], 2, seed=s, batch_size=64)
        torch.testing.assert_close(one.curve[0], all_.curve[i], rtol=1e-5, atol=1e-6)
    # the noise matters, and the seed reproduces it
    again = road(model, images, maps, 2, seed=[7, 8, 9])
    assert torch.equal(again.curve, all_.curve)
    quiet = road(model, images, maps, 2, noise=0.0)
    assert not torch.equal(quiet.curve, all_.curve)


def test_road_top1_indicator_matches_quantus_road():
    """Quantus' ``ROAD`` reports, per percentage, whether the top-1 class is still the label
    after noisy linear imputation of the top-k pixels (``int(H * W * p / 100)``, by
    ``argsort(-a)``). With its noise at 0, one channel and a map without ties that is our
    ``correct``. (Its score is the mean of that indicator over the batch, not the probability
    curve our ``scores`` average.)"""
    quantus = require("quantus")
    model = small_cnn(classes=3, channels=1)
    g = torch.Generator().manual_seed(6)
    images = torch.rand(6, 1, 10, 10, generator=g)
    maps = torch.rand(6, 10, 10, generator=g)
    labels = model(images).argmax(dim=1)
    percentages = [10, 30, 50, 70, 90]
    metric = quantus.ROAD(
        percentages=percentages,
        noise=0.0,
        display_progressbar=False,
        disable_warnings=True,
        return_aggregate=False,
    )
    scores = metric(
        model=model,
        x_batch=images.numpy(),
        y_batch=labels.numpy(),
        a_batch=maps[:, None].numpy(),
        device="cpu",
        softmax=False,
    )
    ours = road(
        model,
        images,
        maps,
        labels,
        fractions=[p / 100 for p in percentages],
        noise=0.0,
    )
    expected = ours.correct.double().mean(dim=0).tolist()
    got = [scores[p] for p in percentages] if isinstance(scores, dict) else list(scores)
    assert got == pytest.approx(expected, abs=1e-9)


# --------------------------------------------------------------------------- infidelity


def captum_infidelity(model, images, attributions, target, pert, normalize):
    metrics = require("captum.metrics")
    flat = pert.reshape(-1, *pert.shape[2:])

    def perturb(inputs):
        i = flat.expand(-1, *inputs.shape[1:]) if flat.shape[1] == 1 else flat
        return i, inputs - i

    return metrics.infidelity(
        model,
        perturb,
        images,
        attributions,
        target=target,
        n_perturb_samples=pert.shape[1],
        normalize=normalize,
    )


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_equals_captum_on_the_same_perturbations(normalize):
    model = small_cnn().double()
    g = torch.Generator().manual_seed(7)
    images = torch.rand(3, 3, 6, 6, generator=g, dtype=torch.float64)
    attr = torch.randn(3, 3, 6, 6, generator=g, dtype=torch.float64)
    target = torch.tensor([0, 5, 2])
    per_element = 0.1 * torch.randn(3, 5, 3, 6, 6, generator=g, dtype=torch.float64)
    shared = 0.1 * torch.randn(3, 5, 1, 6, 6, generator=g, dtype=torch.float64)

    # per-channel attributions, per-element perturbations
    ref = captum_infidelity(model, images, attr, target, per_element, normalize)
    ours = infidelity(
        model, images, attr, target, perturbations=per_element, normalize=normalize, batch_size=4
    )
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)

    # a map broadcast over the channels: captum given the map in every channel
    maps = attr.sum(dim=1)
    ref = captum_infidelity(
        model, images, maps[:, None].expand_as(attr), target, per_element, normalize
    )
    ours = infidelity(model, images, maps, target, perturbations=per_element, normalize=normalize)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)

    # perturbations shared by a pixel's channels: a map scores as the attributions it sums
    ref = captum_infidelity(model, images, attr, target, shared, normalize)
    ours = infidelity(model, images, maps, target, perturbations=shared, normalize=normalize)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)


def test_infidelity_default_draws_are_per_image_and_seeded():
    model = small_cnn()
    g = torch.Generator().manual_seed(8)
    images = torch.rand(2, 3, 6, 6, generator=g)
    maps = torch.randn(2, 6, 6, generator=g)
    out = infidelity(model, images, maps, 1, samples=4, noise_std=0.2, seed=[11, 12])
    draws = torch.stack(
        [
            0.2 * torch.randn((4, 1, 6, 6), generator=torch.Generator().manual_seed(s))
            for s in (11, 12)
        ]
    )
    ref = infidelity(model, images, maps, 1, perturbations=draws)
    torch.testing.assert_close(out, ref)
    one = infidelity(model, images[1:], maps[1:], 1, samples=4, noise_std=0.2, seed=12)
    torch.testing.assert_close(one[0], out[1], rtol=1e-5, atol=1e-7)
    # probability output: the same definition on the softmax
    prob = infidelity(model, images, maps, 1, perturbations=draws, output="probability")
    with torch.no_grad():
        p0 = model(images).softmax(1)[:, 1]
        p = model((images[:, None] - draws).flatten(0, 1)).softmax(1)[:, 1].view(2, 4)
    dot = (draws[:, :, 0] * maps[:, None]).sum(dim=(2, 3))
    expected = (dot - (p0[:, None] - p)).pow(2).mean(dim=1)
    torch.testing.assert_close(prob, expected, rtol=1e-5, atol=1e-8)


def test_infidelity_is_zero_for_a_linear_model_and_its_exact_attribution():
    """For ``f(x) = sum(w * x)`` the attribution ``w`` is exact: ``I^T w = f(x) - f(x - I)``."""
    w = torch.randn(1, 3, 5, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    class Linear(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            s = (x * w).sum(dim=(1, 2, 3))
            return torch.stack([s, -s], dim=1)

    images = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    out = infidelity(Linear(), images, w.expand(2, -1, -1, -1), 0, samples=8)
    assert out.abs().max() < 1e-10
    # and its scale does not matter once normalised
    out = infidelity(Linear(), images, 3 * w.expand(2, -1, -1, -1), 0, normalize=True)
    assert out.abs().max() < 1e-10


# --------------------------------------------------------------------------- max-sensitivity


@pytest.mark.parametrize("norm", ["fro", "inf"])
def test_max_sensitivity_equals_captum_with_the_same_draws(norm):
    metrics = require("captum.metrics")
    model = small_cnn().double()
    g = torch.Generator().manual_seed(10)
    images = torch.rand(2, 3, 6, 6, generator=g, dtype=torch.float64)
    target = torch.tensor([3, 1])
    noise = (torch.rand(2, 5, 3, 6, 6, generator=g, dtype=torch.float64) * 2 - 1) * 0.05

    def captum_explain(inputs, target):
        if isinstance(inputs, tuple):  # captum passes the originals as a 1-tuple
            return (gradient(model, inputs[0], target),)
        return gradient(model, inputs, target)

    ref = metrics.sensitivity_max(
        captum_explain,
        images,
        perturb_func=lambda inputs: inputs + noise.flatten(0, 1),
        n_perturb_samples=5,
        norm_ord="fro" if norm == "fro" else float("inf"),
        target=target,
    )
    calls = []

    def ours_explain(x, t, rows):
        calls.append(len(x))
        return gradient(model, x, t)

    out = max_sensitivity(ours_explain, images, target, noise=noise, norm=norm)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-7)
    assert calls == [2, 10]  # the originals, then every perturbed image in one call
    calls.clear()
    again = max_sensitivity(ours_explain, images, target, noise=noise, norm=norm, batch_size=4)
    assert calls == [2, 4, 4, 2]
    torch.testing.assert_close(again, out)


def test_max_sensitivity_equals_quantus_with_the_same_draws():
    """Quantus' ``MaxSensitivity``: ``max_s ||a(x) - a(x + d_s)||_fro / ||a(x)||_fro``; with
    ``normalise`` and ``abs`` off and our draws as its perturbation, the same number. (Its
    default draws are uniform in ``[-0.2, 0.2]``, ours and captum's in ``[-0.02, 0.02]``.)"""
    quantus = require("quantus")
    model = small_cnn(classes=3)
    g = torch.Generator().manual_seed(11)
    images = torch.rand(2, 3, 6, 6, generator=g)
    labels = model(images).argmax(dim=1)
    noise = (torch.rand(2, 4, 3, 6, 6, generator=g) * 2 - 1) * 0.05
    step = iter(range(4))

    def perturb(arr, **kwargs):
        return arr + noise[:, next(step)].reshape(2, -1).numpy()

    def explain_np(model, inputs, targets, **kwargs):
        x = torch.as_tensor(inputs, dtype=torch.float32)
        return gradient(model, x, torch.as_tensor(targets)).numpy()

    metric = quantus.MaxSensitivity(
        nr_samples=4,
        perturb_func=perturb,
        normalise=False,
        abs=False,
        disable_warnings=True,
        display_progressbar=False,
    )
    ref = metric(
        model=model,
        x_batch=images.numpy(),
        y_batch=labels.numpy(),
        a_batch=None,
        explain_func=explain_np,
        device="cpu",
        batch_size=2,
    )
    out = max_sensitivity(lambda x, t, rows: gradient(model, x, t), images, labels, noise=noise)
    np.testing.assert_allclose(out.numpy(), np.asarray(ref, dtype=np.float64), rtol=1e-5)


def test_max_sensitivity_seeded_per_image_and_zero_for_a_constant_explanation():
    model = small_cnn()
    images = torch.rand(3, 3, 6, 6, generator=torch.Generator().manual_seed(12))

    def fn(x, t, rows):
        return gradient(model, x, t)

    out = max_sensitivity(fn, images, 0, seed=[1, 2, 3])
    draws = torch.stack(
        [torch.rand((10, 3, 6, 6), generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    )
    ref = max_sensitivity(fn, images, 0, noise=(draws * 2 - 1) * 0.02)
    torch.testing.assert_close(out, ref)
    one = max_sensitivity(fn, images[2:], 0, seed=3)
    torch.testing.assert_close(one[0], out[2])
    # an explanation that ignores the input never moves
    assert torch.equal(
        max_sensitivity(lambda x, t, rows: torch.ones(len(x), 6, 6), images, 0), torch.zeros(3)
    )


# --------------------------------------------------------------------------- randomisation


def test_spearman_equals_scipy_with_ties():
    stats = require("scipy.stats")
    g = torch.Generator().manual_seed(13)
    a = torch.randint(0, 4, (3, 50), generator=g).float()
    b = torch.randn(3, 50, generator=g)
    b[1] = torch.randint(0, 3, (50,), generator=g).float()
    out = spearman(a, b)
    for i in range(3):
        assert float(out[i]) == pytest.approx(stats.spearmanr(a[i], b[i]).statistic, abs=1e-12)
    assert torch.isnan(spearman(torch.ones(1, 5), torch.rand(1, 5)))[0]


def test_cascade_matches_quantus_layer_generator():
    """Quantus' ``PyTorchModel.get_random_layer_generator`` (top-down): the same layers, and
    with its ``seed + 1`` equal to ours the same re-initialised weights at every step."""
    require("quantus")
    from quantus.helpers.model.pytorch_model import PyTorchModel

    model = small_cnn()
    names = randomisable_layers(model)
    assert names == ["0", "4"]
    theirs = list(PyTorchModel(model).get_random_layer_generator(order="top_down", seed=41))
    ours = list(randomised_models(model, names[::-1], seed=42))
    assert [n for n, _ in theirs] == [n for n, _ in ours] == ["4", "0"]
    # both generators yield one model re-initialised in place: compare after the last step
    for (_, a), (_, b) in zip(theirs, ours, strict=True):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert ka == kb and torch.equal(va, vb)


def test_randomisation_against_its_definition_and_the_model_is_untouched():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10), nn.ReLU(), nn.Linear(10, 4))
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(14))
    target = torch.tensor([0, 1, 2])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()

    def saliency(m, x, t):
        return gradient(m, x, t).abs().sum(dim=1)

    res = randomisation(model, images, target, saliency, layers=2, seed=3)
    assert res.layers == ["3", "1"] and res.correlations.shape == (3, 2)
    assert torch.equal(res.scores, res.correlations[:, -1])
    # the definition: reset the top layers of a copy with the seeded generator, re-explain
    stats = require("scipy.stats")
    import copy

    twin = copy.deepcopy(model)
    for k, name in enumerate(["3", "1"]):
        torch.manual_seed(3)
        twin.get_submodule(name).reset_parameters()
        new = saliency(twin, images, target)
        old = saliency(model, images, target)
        for i in range(3):
            rho = stats.spearmanr(old[i].flatten(), new[i].flatten()).statistic
            assert float(res.correlations[i, k]) == pytest.approx(rho, abs=1e-6)
    torch.random.set_rng_state(rng)
    # a saliency that follows the weights decorrelates once the first layer is random
    assert res.scores.abs().max() < 0.3
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_randomisation_leaves_the_model_unchanged_when_the_explanation_fails():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(2, 3, 6, 6)
    calls = []

    def failing(m, x, t):
        calls.append(m is model)
        if m is not model:
            raise RuntimeError("boom")
        return gradient(m, x, t)

    with pytest.raises(RuntimeError, match="boom"):
        randomisation(model, images, 0, failing, layers=["4", "0"])
    assert calls == [True, False]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_a_randomised_map_that_goes_constant_correlates_zero():
    model = small_cnn()
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(17))

    def relu_map(m, x, t):  # constant (all zero) once the model is not the caller's
        return x.sum(dim=1) * (1.0 if m is model else 0.0)

    res = randomisation(model, images, 0, relu_map, layers=2)
    assert torch.equal(res.correlations, torch.zeros(2, 2))
    flat = randomisation(model, images, 0, lambda m, x, t: torch.ones(2, 6, 6))
    assert torch.isnan(flat.scores).all()


def test_class_insensitive_map_keeps_correlation_one():
    """A map that does not depend on the weights (the input's brightness) keeps its ranking."""
    model = small_cnn()
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(15))
    res = randomisation(model, images, 0, lambda m, x, t: x.sum(dim=1), layers=2)
    torch.testing.assert_close(res.correlations, torch.ones(2, 2))


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m, x: road(m, x, torch.rand(2, 6, 6), 0, fractions=(0.5, 1.0)), "fractions"),
        (lambda m, x: road(m, x, torch.rand(2, 6, 6), 0, order="best"), "order"),
        (lambda m, x: road(m, x, torch.rand(2, 6, 5), 0), "maps"),
        (lambda m, x: road(m, x, torch.rand(2, 6, 6), torch.tensor([[0, 1], [1, 2]])), "target"),
        (lambda m, x: infidelity(m, x, torch.rand(2, 2, 6, 6), 0), "attributions"),
        (lambda m, x: infidelity(m, x, torch.rand(2, 6, 6), 0, samples=0), "samples"),
        (lambda m, x: infidelity(m, x, torch.rand(2, 6, 6), 0, output="raw"), "output"),
        (lambda m, x: infidelity(m, x, torch.rand(2, 6, 6), 9), "target"),
        (
            lambda m, x: infidelity(m, x, torch.rand(2, 6, 6), 0, perturbations=torch.rand(2, 3)),
            "perturbations",
        ),
        (lambda m, x: max_sensitivity(lambda *a: a[0], x, 0, norm="l1"), "norm"),
        (lambda m, x: max_sensitivity(lambda *a: a[0], x, 0, radius=-1.0), "radius"),
        (lambda m, x: max_sensitivity(None, x, 0), "explain_fn"),
        (lambda m, x: max_sensitivity(lambda *a: a[0][:1], x, 0), "explain_fn"),
        (lambda m, x: randomisation(m, x, 0, lambda *a: a[1], layers=["nope"]), "layers"),
        (lambda m, x: randomisation(m, x, 0, lambda *a: a[1], layers=0), "layers"),
        (lambda m, x: randomisation(nn.ReLU(), x, 0, lambda *a: a[1]), "re-initialise"),
        (lambda m, x: road_impute(x, torch.ones(2, 6, 6, dtype=torch.bool)), "every pixel"),
        (lambda m, x: road_impute(x, torch.zeros(2, 6, 6, dtype=torch.bool), tol=0), "tol"),
        (lambda m, x: road_impute(x, torch.zeros(2, 6, 6), noise=0.0), "removed"),
        (lambda m, x: road_impute(x, torch.zeros(2, 6, 6, dtype=torch.bool), noise=-1), "noise"),
        (lambda m, x: road(m, x[:, :, :, :, None], torch.rand(2, 6, 6), 0), "images"),
    ],
)
def test_invalid_input(call, name):
    with pytest.raises(InvalidInput, match=name):
        call(small_cnn(), torch.rand(2, 3, 6, 6))


# --------------------------------------------------------------------------- device


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    model = small_cnn()
    g = torch.Generator().manual_seed(16)
    images = torch.rand(3, 3, 24, 24, generator=g)
    maps = torch.rand(3, 24, 24, generator=g)
    pert = 0.1 * torch.randn(3, 4, 1, 24, 24, generator=g)
    removed = torch.rand(3, 24, 24, generator=g) < 0.7
    ref_imputed = road_impute(images, removed, noise=0.0)
    ref_road = road(model, images, maps, 1, noise=0.0).curve
    ref_inf = infidelity(model, images, maps, 1, perturbations=pert, normalize=True)
    ref_rand = randomisation(model, images, 1, lambda m, x, t: gradient(m, x, t), layers=2)
    cuda = small_cnn().cuda()
    imputed = road_impute(images.cuda(), removed.cuda(), noise=0.0)
    torch.testing.assert_close(imputed.cpu(), ref_imputed, rtol=0, atol=1e-5)
    out = road(cuda, images, maps, 1, noise=0.0).curve
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), ref_road, rtol=1e-4, atol=1e-5)
    out = infidelity(cuda, images, maps, 1, perturbations=pert, normalize=True)
    torch.testing.assert_close(out.cpu(), ref_inf, rtol=1e-4, atol=1e-6)
    # the re-initialisation draws from the CUDA generator: a different random layer, so only
    # the structure is compared, and the caller's CUDA generator state is untouched
    state = torch.cuda.get_rng_state()
    out = randomisation(cuda, images, 1, lambda m, x, t: gradient(m, x, t), layers=2)
    assert out.correlations.shape == ref_rand.correlations.shape and out.layers == ["4", "0"]
    assert torch.equal(torch.cuda.get_rng_state(), state)
