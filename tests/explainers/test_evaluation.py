"""evaluate(): the same numbers as the metric functions called directly, the registry, the
refusals and the progress reports."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from torch import nn

from xai_serve import InvalidInput, NotFound
from xai_serve.explainers import metrics as m
from xai_serve.explainers.base import explain
from xai_serve.explainers.evaluation import (
    DEFAULT_METRICS,
    Evaluation,
    evaluate,
    metric_info,
    metric_names,
)


def small_cnn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 6),
    ).eval()


@pytest.fixture(scope="module")
def case():
    images = torch.rand(3, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    return small_cnn(), images


SMALL = {
    "deletion": {"steps": 5},
    "insertion": {"steps": 5},
    "road": {"fractions": (0.2, 0.5)},
    "road_lerf": {"fractions": (0.2, 0.5)},
    "infidelity": {"samples": 4},
    "max_sensitivity": {"samples": 3},
    "randomisation": {"layers": 2},
}


@pytest.mark.parametrize("method", ["saliency", "smoothgrad"])
def test_values_equal_the_direct_metric_calls(case, method):
    model, images = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    options = {"samples": 4} if method == "smoothgrad" else {}
    out = evaluate(
        model,
        images,
        method,
        metrics=list(SMALL),
        seed=3,
        options=options,
        metric_options=SMALL,
    )
    assert isinstance(out, Evaluation) and list(out.metrics) == list(SMALL)

    exp = explain(model, images, method, seed=3, **options)
    maps, targets = exp.maps, exp.targets
    seeds = exp.seeds if exp.seeds is not None else torch.full((3,), 3)
    torch.testing.assert_close(out.maps, maps)
    assert torch.equal(out.targets, targets)

    def again(x, t, rows):
        return explain(model, x, method, target=t, seed=seeds[rows], **options).maps

    def again_model(mod, x, t):
        return explain(mod, x, method, target=t, seed=seeds, **options).maps

    direct = {
        "deletion": m.deletion_auc(model, images, maps, targets, steps=5),
        "insertion": m.insertion_auc(model, images, maps, targets, steps=5),
        "road": m.road(model, images, maps, targets, fractions=(0.2, 0.5), seed=3).scores,
        "road_lerf": m.road(
            model, images, maps, targets, fractions=(0.2, 0.5), order="lerf", seed=3
        ).scores,
        "infidelity": m.infidelity(model, images, maps, targets, samples=4, normalize=True, seed=3),
        "max_sensitivity": m.max_sensitivity(again, images, targets, samples=3, seed=3),
        "randomisation": m.randomisation(
            model, images, targets, again_model, layers=2, seed=3
        ).scores,
    }
    for name, value in direct.items():
        assert out.metrics[name].shape == (3,)
        torch.testing.assert_close(out.metrics[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert out.details["road"]["curve"].shape == (3, 2)
    assert out.details["randomisation"]["layers"] == ["6", "2"]
    assert out.details["deletion"]["higher_is_better"] is False
    for k, v in model.state_dict().items():  # the caller's model is never changed
        assert torch.equal(v, before[k])


def test_reruns_use_the_same_seeds_so_a_randomised_method_compares_like_with_like(case):
    """SmoothGrad at a vanishing radius: with the first run's seeds the re-run draws the same
    noise and the map barely moves; with other seeds it would move by the sampling error."""
    model, images = case
    out = evaluate(
        model,
        images,
        "smoothgrad",
        ["max_sensitivity"],
        seed=7,
        options={"samples": 4},
        metric_options={"max_sensitivity": {"radius": 1e-6, "samples": 2}},
    )
    assert out.metrics["max_sensitivity"].max() < 1e-3
    other = explain(model, images, "smoothgrad", seed=8, samples=4).maps
    moved = (other - out.maps).flatten(1).norm(dim=1) / out.maps.flatten(1).norm(dim=1)
    assert moved.min() > 100 * out.metrics["max_sensitivity"].max()


def test_progress_rises_to_one(case):
    model, images = case
    calls: list[tuple[float, str]] = []
    evaluate(
        model,
        images,
        "saliency",
        ["deletion", "road", "randomisation"],
        batch_size=4,
        metric_options={"deletion": {"steps": 2}, "road": {"fractions": (0.5,)}},
        progress=lambda f, stage: calls.append((f, stage)),
    )
    fractions = [f for f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(a <= b for a, b in itertools.pairwise(fractions))
    stages = [s for s, _ in itertools.groupby(s for _, s in calls)]
    assert stages == ["explain", "deletion", "road", "randomisation", "done"]
    # one call as each metric starts, then one per chunk of its work: deletion's 3 images x 3
    # points in forwards of 4 (3 chunks), road's 3 x 1 (1), randomisation's 1 cascade step
    counts = {k: len(list(g)) for k, g in itertools.groupby(s for _, s in calls)}
    assert counts == {"explain": 1, "deletion": 4, "road": 2, "randomisation": 2, "done": 1}


def test_registry():
    names = metric_names()
    assert names == sorted(names)
    assert set(DEFAULT_METRICS) <= set(names) and "road_lerf" in names
    info = metric_info()
    assert list(info) == names
    better = {n: i.higher_is_better for n, i in info.items()}
    assert better == {
        "deletion": False,
        "infidelity": False,
        "insertion": True,
        "max_sensitivity": False,
        "randomisation": False,
        "road": False,
        "road_lerf": True,
    }
    functions = {
        "deletion": m.deletion_auc,
        "insertion": m.insertion_auc,
        "road": m.road,
        "road_lerf": m.road,
        "infidelity": m.infidelity,
        "max_sensitivity": m.max_sensitivity,
        "randomisation": m.randomisation,
    }
    for name, fn in functions.items():
        params = inspect.signature(fn).parameters
        assert set(info[name].settings) <= set(params), name
        assert info[name].description and info[name].description.endswith(".")
    with pytest.raises(InvalidInput, match="known metrics: deletion, infidelity"):
        metric_info("aopc")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metrics": ["deletion", "aopc"]}, r"unknown metric 'aopc'; known metrics: deletion"),
        ({"metrics": []}, "known metrics"),
        (
            {"method": "lime", "metrics": ["max_sensitivity"], "options": {"budget_ms": 50}},
            r"metric 'max_sensitivity' cannot score method 'lime': `budget_ms`",
        ),
        (
            {"method": "gradcam", "metric_options": {"infidelity": {"normalize": False}}},
            r"metric 'infidelity' cannot score method 'gradcam': its maps are not per-pixel",
        ),
        (
            {"method": "eigencam", "metrics": ["randomisation"]},
            r"metric 'randomisation' cannot score method 'eigencam': its map does not depend",
        ),
        ({"target": torch.tensor([[0, 1]] * 3)}, r"cannot score method 'saliency' with several"),
        (
            {"metrics": ["road"], "metric_options": {"road": {"steps": 3}}},
            r"metric 'road' has no setting\(s\) steps; its settings: fractions",
        ),
        ({"metric_options": {"road_lerf": {}}}, "not evaluated: road_lerf"),
        ({"images": torch.ones(3, 3, 10, 10, dtype=torch.int64)}, "`images`"),
        ({"images": torch.rand(3, 10, 10)}, "`images`"),
        ({"seed": None}, "`seed`"),
        ({"metrics": ["road"], "metric_options": {"road": {"fractions": (1.5,)}}}, "fractions"),
    ],
)
def test_refusals_are_invalid_input(case, kwargs, match):
    model, images = case
    args = {"images": images, "method": "saliency", "metrics": ["deletion", "infidelity"]}
    args.update(kwargs)
    with pytest.raises(InvalidInput, match=match):
        evaluate(model, args.pop("images"), args.pop("method"), args.pop("metrics"), **args)


def test_class_agnostic_method_with_deeper_randomisation(case):
    """EigenCAM reads the last conv layer: with the top layer only it is refused (above); with
    the layers down to that conv re-initialised its map changes."""
    model, images = case
    out = evaluate(
        model,
        images,
        "eigencam",
        ["randomisation"],
        metric_options={"randomisation": {"layers": 2}},
    )
    corr = out.details["randomisation"]["correlations"]
    assert out.details["randomisation"]["layers"] == ["6", "2"]
    assert torch.equal(corr[:, 0], torch.ones(3))  # the head alone: unchanged
    assert corr[:, 1].max() < 0.99


def test_unknown_method_is_not_found(case):
    model, images = case
    with pytest.raises(NotFound, match="unknown explanation method"):
        evaluate(model, images, "magic", ["deletion"])


@pytest.mark.parametrize("method", ["saliency", "smoothgrad"])
def test_given_maps_score_as_the_method_own(case, method):
    """Maps made earlier (a server's answer, with its seed) score exactly as evaluate()'s own
    run would: the re-running metrics reproduce them with the same seed."""
    model, images = case
    options = {"samples": 4} if method == "smoothgrad" else {}
    names = ["deletion", "road", "max_sensitivity", "randomisation"]
    kw = {"metric_options": {k: SMALL[k] for k in names}, "options": options, "seed": 7}
    own = evaluate(model, images, method, names, target=2, **kw)
    given = evaluate(model, images, method, names, target=2, maps=own.maps.clone(), **kw)
    assert given.explanation is None
    assert given.targets.tolist() == [2, 2, 2]
    for name in names:
        torch.testing.assert_close(given.metrics[name], own.metrics[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target": None}, "give the `target`"),
        ({"maps": torch.zeros(2, 10, 10)}, r"Tensor\[3, H, W\]"),
        ({"maps": torch.zeros(3, 10, 10, dtype=torch.int64)}, "float Tensor"),
        ({"target": torch.tensor([1, 2])}, r"Tensor\[3\]"),
    ],
)
def test_bad_given_maps(case, kwargs, match):
    model, images = case
    args = {"maps": torch.rand(3, 10, 10), "target": 1} | kwargs
    with pytest.raises(InvalidInput, match=match):
        evaluate(model, images, "saliency", ["deletion"], **args)
