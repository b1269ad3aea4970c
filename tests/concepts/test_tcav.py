"""TCAV against closed forms and peers: a model whose target logit depends on red minus green
only (red is significant, textures are not), the directional derivatives of that model in
closed form, captum's TCAV scores given the same CAVs, the CAV classifier against
scikit-learn's logistic regression, the t-test against scipy, CAV files, and the errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests._peers import require
from xai_serve.concepts.library import ConceptSet, procedural, random_set
from xai_serve.concepts.tcav import (
    CAV,
    TCAVResult,
    _pair_seed,
    _test_count,
    fit_cavs,
    layer_activations,
    tcav,
    ttest_ind,
)
from xai_serve.errors import InvalidInput, NotFound

SIZE = 32


class RedGreen(nn.Module):
    """``logit_0 = mean(d * |d|)`` with ``d = a_red - a_green``, where ``a`` (the layer
    ``features``: an identity 1x1 convolution) is the 4x4-average-pooled image; ``logit_1`` is
    the mean of the blue channel, ``logit_2 = -logit_0``. So ``d logit_0 / d a`` is, at every
    position, ``2 |d| / (h w)`` for red, minus that for green, 0 for blue: in closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(4)
        self.features = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.features.weight.copy_(torch.eye(3)[:, :, None, None])
            self.features.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        a = self.features(self.pool(x))
        d = a[:, 0] - a[:, 1]
        z = (d * d.abs()).mean((1, 2))
        return torch.stack([z, a[:, 2].mean((1, 2)), -z], 1)


def closed_form_gradient(x: Tensor) -> Tensor:
    """``d logit_0 / d features`` of :class:`RedGreen`, flattened ``[B, 3 * h * w]``."""
    a = nn.functional.avg_pool2d(x, 4)
    d = a[:, 0] - a[:, 1]
    g = 2 * d.abs() / d[0].numel()
    return torch.stack([g, -g, torch.zeros_like(g)], 1).flatten(1)


@pytest.fixture(scope="module")
def model() -> RedGreen:
    return RedGreen().eval()


@pytest.fixture(scope="module")
def inputs() -> Tensor:
    return random_set(24, size=SIZE, seed=1000).images


@pytest.fixture(scope="module")
def result(model: RedGreen, inputs: Tensor) -> TCAVResult:
    concepts = ["red", "green", "stripes_0_narrow", "checkerboard", "circle"]
    return tcav(model, inputs, concepts, 0, "features", runs=10, seed=0)


# ------------------------------------------------------------------ (a) the constructed model


def test_red_is_significant_textures_are_not(result: TCAVResult) -> None:
    red, green = result["red"], result["green"]
    # every red CAV points up the red-minus-green axis: all inputs' derivatives are positive
    assert torch.equal(red.scores, torch.ones(10))
    assert red.mean == 1.0 and red.std == 0.0
    assert red.significant and red.p_value < 0.01
    assert float(red.accuracies.mean()) > 0.8 and float(red.accuracies.min()) > 0.7
    # green lowers the logit: TCAV 0, and that is significant too (two-sided test)
    assert torch.equal(green.scores, torch.zeros(10))
    assert green.significant
    # textures and shapes have nothing to do with red minus green
    for name in ("stripes_0_narrow", "checkerboard", "circle"):
        c = result[name]
        assert not c.significant and c.p_value > 0.05, (name, c.p_value)
    # the null: random-vs-random CAVs, near-chance held-out accuracy
    assert result.random_scores.shape == (10,)
    assert float(result.random_accuracies.mean()) < 0.7
    assert result.alpha == 0.05 and result.layer == "features"
    assert len(result.cavs) == 5 * 10 + 10
    with pytest.raises(NotFound):
        result["plaid"]


def test_scores_from_closed_form_gradient(result: TCAVResult, inputs: Tensor) -> None:
    """The scores are the fractions of positive ``g . v`` with ``g`` in closed form."""
    g = closed_form_gradient(inputs)
    for c in result.concepts:
        v = torch.stack([cav.direction for cav in c.cavs])  # [R, F]
        dd = g @ v.T  # [B, R]
        assert float(dd.abs().min()) > 1e-7  # no sign is decided by rounding
        assert torch.equal(c.scores, (dd > 0).float().mean(0))
        magnitude = dd.clamp_min(0).sum(0) / dd.abs().sum(0)
        assert torch.allclose(c.magnitudes, magnitude, rtol=1e-5, atol=1e-7)
    # the CAVs are unit vectors; the red CAV's red minus green part is positive at every place
    red = torch.stack([cav.direction for cav in result["red"].cavs]).view(10, 3, -1)
    assert torch.allclose(red.flatten(1).norm(dim=1), torch.ones(10), atol=1e-5)
    assert bool(((red[:, 0] - red[:, 1]).sum(1) > 0).all())


def test_no_parameter_gradients_and_batching(model: RedGreen, inputs: Tensor) -> None:
    res_small = tcav(model, inputs, ["red", "dots"], 0, "features", runs=3, batch_size=5)
    res_big = tcav(model, inputs, ["red", "dots"], 0, model.features, runs=3, batch_size=64)
    assert all(p.grad is None for p in model.parameters())
    for a, b in zip(res_small.concepts, res_big.concepts, strict=True):
        assert torch.equal(a.scores, b.scores)
        for ca, cb in zip(a.cavs, b.cavs, strict=True):
            assert torch.allclose(ca.direction, cb.direction, atol=1e-5)
    # deterministic with a seed, different with another
    again = tcav(model, inputs, ["red", "dots"], 0, "features", runs=3, batch_size=5)
    assert torch.equal(again["dots"].cavs[0].direction, res_small["dots"].cavs[0].direction)
    other = tcav(model, inputs, ["red", "dots"], 0, "features", runs=3, seed=1)
    assert not torch.equal(other["dots"].cavs[0].direction, res_small["dots"].cavs[0].direction)


def test_layer_activations_and_transform(model: RedGreen, inputs: Tensor) -> None:
    acts = layer_activations(model, inputs, "features", batch_size=7)
    assert torch.allclose(acts, nn.functional.avg_pool2d(inputs, 4).flatten(1), atol=1e-6)
    flipped = layer_activations(model, inputs, "features", transform=lambda x: 1 - x)
    assert torch.allclose(flipped, nn.functional.avg_pool2d(1 - inputs, 4).flatten(1), atol=1e-6)
    # the transform reaches the gradient pass too: 1 - x swaps the sign of red minus green for
    # red images... and for the inputs, whose logit now grows with green minus red
    res = tcav(model, inputs, ["red"], 0, "features", runs=2, transform=lambda x: 1 - x)
    assert torch.equal(res["red"].scores, torch.zeros(2))


def test_progress_and_given_random_sets(model: RedGreen, inputs: Tensor) -> None:
    calls: list[tuple[float, str]] = []
    randoms = [random_set(12, size=SIZE, seed=50 + i) for i in range(3)]
    res = tcav(
        model,
        inputs,
        [procedural("red", 12, size=SIZE)],
        torch.zeros(inputs.shape[0], dtype=torch.int64),
        "features",
        random_sets=randoms,
        runs=3,
        progress=lambda f, s: calls.append((f, s)),
    )
    fractions = [f for f, _ in calls]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    stages = [s for _, s in calls]
    assert stages.index("cavs") < stages.index("gradients") < stages.index("statistics")
    assert [c.random_set for c in res["red"].cavs] == ["random_50", "random_51", "random_52"]
    assert [(c.concept, c.random_set) for c in res.random_cavs] == [
        ("random_50", "random_51"),
        ("random_51", "random_52"),
        ("random_52", "random_50"),
    ]


# ------------------------------------------------------------------ the CAV classifier


def test_fit_cavs_is_logistic_regression() -> None:
    """The CAV is sklearn's L2 logistic regression on the same training rows (features scaled
    by the pair's mean squared norm, C = 1 / (regularization * n_train)), normalised."""
    sklearn_lm = require("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(20, 50, generator=gen) + 0.3
    neg = torch.randn(24, 50, generator=gen)
    (cav,) = fit_cavs([pos], [neg], concepts=["c"], random_sets=["r"], layer="l")
    split = torch.Generator().manual_seed(_pair_seed(0, "c", "r"))
    train, test = [], []
    for x in (pos, neg):
        perm = torch.randperm(x.shape[0], generator=split)
        k = _test_count(x.shape[0], 0.33)
        test.append(x[perm[:k]])
        train.append(x[perm[k:]])
    x_train = torch.cat(train).double()
    y = [1] * len(train[0]) + [0] * len(train[1])
    scale = (x_train * x_train).sum(1).mean()
    lr = sklearn_lm.LogisticRegression(C=1 / (0.01 * len(y)), tol=1e-12, max_iter=10_000)
    lr.fit((x_train / scale.sqrt()).numpy(), y)
    w = torch.tensor(lr.coef_[0]) / scale.sqrt()
    assert torch.allclose(cav.direction.double(), w / w.norm(), atol=1e-5)
    assert abs(float(cav.bias) - lr.intercept_[0] / float(w.norm())) < 1e-4
    x_test = torch.cat(test).double()
    y_test = torch.tensor([1] * len(test[0]) + [0] * len(test[1]))
    expected = float(((x_test @ w + lr.intercept_[0] > 0).long() == y_test).float().mean())
    assert abs(float(cav.accuracy) - expected) < 1e-6


def test_fit_cavs_separable_and_errors() -> None:
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(16, 40, generator=gen)
    shift = torch.zeros(40)
    shift[3] = 10.0
    (cav,) = fit_cavs([base + shift], [base], concepts=["c"], random_sets=["r"], layer="l")
    assert float(cav.accuracy) == 1.0
    assert int(cav.direction.abs().argmax()) == 3 and float(cav.direction[3]) > 0.9
    with pytest.raises(InvalidInput, match=r"n >= 2"):
        fit_cavs([base[:1]], [base], concepts=["c"], random_sets=["r"], layer="l")
    with pytest.raises(InvalidInput, match="same width"):
        fit_cavs([base], [base[:, :5]], concepts=["c"], random_sets=["r"], layer="l")
    with pytest.raises(InvalidInput, match="as many"):
        fit_cavs([base], [], concepts=["c"], random_sets=["r"], layer="l")


# ------------------------------------------------------------------ (b) captum


def test_sign_count_equals_captum_with_the_same_cavs(
    model: RedGreen, inputs: Tensor, result: TCAVResult, tmp_path: Path
) -> None:
    """captum.concept.TCAV, given our CAVs, counts the same fractions.

    captum trains its CAVs with a ``Classifier`` and reads them back from
    ``classifier.weights()`` (one row per class, ordered as ``classifier.classes()``). The
    classifier below trains nothing: it recognises the experimental set from the labels that
    captum's data loader yields (the two concepts' ids) and returns our CAV ``v`` as the row of
    the concept and ``-v`` as the random set's. captum's ``sign_count`` for the concept is then
    ``mean(grad . v > 0)`` with grad from its own ``LayerGradientXActivation``
    (``multiply_by_inputs=False``, i.e. the layer gradient).
    """
    captum_concept = require("captum.concept")
    from captum.concept._utils.classifier import Classifier

    # a subset keeps captum's per-experiment disk round trips short: scores of 1, 0 and between
    compared = [result[n] for n in ("red", "green", "stripes_0_narrow", "circle")]
    names = [c.concept for c in compared]
    random_names = [cav.random_set for cav in compared[0].cavs][:5]
    ids = {n: i for i, n in enumerate(names + random_names)}
    table = {
        (ids[cav.concept], ids[cav.random_set]): cav.direction
        for c in compared
        for cav in c.cavs[:5]
    }

    class Injected(Classifier):
        def __init__(self) -> None:
            self.pair: tuple[int, int] = (-1, -1)

        def train_and_eval(self, dataloader: Any, **kwargs: Any) -> dict[str, Tensor]:
            labels = torch.cat([y for _, y in dataloader])
            present = set(labels.tolist())
            self.pair = next(p for p in table if set(p) == present)
            return {"accs": torch.tensor(1.0)}

        def weights(self) -> Tensor:
            v = table[self.pair]
            return torch.stack([v, -v])

        def classes(self) -> list[int]:
            return list(self.pair)

    def concept(name: str, images: Tensor) -> Any:
        loader = torch.utils.data.DataLoader(images, batch_size=16)
        return captum_concept.Concept(ids[name], name, loader)

    objects = {n: concept(n, procedural(n, 32, size=SIZE).images) for n in names}
    for r in random_names:
        objects[r] = concept(r, random_set(32, size=SIZE, seed=int(r.split("_")[1])).images)
    experiments = [[objects[c], objects[r]] for c in names for r in random_names]
    peer = captum_concept.TCAV(
        model, ["features"], classifier=Injected(), save_path=str(tmp_path) + "/"
    )
    scores = peer.interpret(inputs, experiments, target=0)
    for c in compared:
        keys = [f"{ids[c.concept]}-{ids[r]}" for r in random_names]
        theirs = torch.stack([scores[k]["features"]["sign_count"][0] for k in keys])
        assert torch.equal(c.scores[:5], theirs.float()), c.concept
    # not only all-or-nothing scores: some fractions lie strictly between 0 and 1
    assert any(0.0 < v < 1.0 for c in compared for v in c.scores[:5].tolist())


# ------------------------------------------------------------------ (c) the t-test


@pytest.mark.parametrize("equal_var", [True, False])
@pytest.mark.parametrize("sizes", [(2, 2), (5, 9), (10, 10), (30, 7)])
def test_ttest_matches_scipy(equal_var: bool, sizes: tuple[int, int]) -> None:
    stats = require("scipy.stats")
    gen = torch.Generator().manual_seed(sizes[0] * 100 + sizes[1])
    for shift in (0.0, 0.3, 2.0):
        a = torch.rand(sizes[0], generator=gen, dtype=torch.float64) + shift
        b = torch.rand(sizes[1], generator=gen, dtype=torch.float64) * 1.5
        t, p = ttest_ind(a, b, equal_var=equal_var)
        ref = stats.ttest_ind(a.numpy(), b.numpy(), equal_var=equal_var)
        assert t == pytest.approx(float(ref.statistic), rel=1e-10, abs=1e-12)
        assert p == pytest.approx(float(ref.pvalue), rel=1e-8, abs=1e-14)


def test_ttest_degenerate_and_errors() -> None:
    ones, halves = torch.ones(5), torch.full((4,), 0.5)
    assert ttest_ind(ones, halves) == (float("inf"), 0.0)
    assert ttest_ind(halves, ones) == (float("-inf"), 0.0)
    assert ttest_ind(ones, torch.ones(3)) == (0.0, 1.0)
    with pytest.raises(InvalidInput, match=">= 2"):
        ttest_ind(torch.ones(1), ones)


# ------------------------------------------------------------------ (d) CAV files


def test_cav_save_load_and_reuse(
    model: RedGreen, inputs: Tensor, result: TCAVResult, tmp_path: Path
) -> None:
    paths = []
    for i, cav in enumerate(result.cavs):
        paths.append(tmp_path / f"cav{i}.pt")
        cav.save(paths[-1])
    loaded = [CAV.load(p) for p in paths]
    for a, b in zip(result.cavs, loaded, strict=True):
        assert torch.equal(a.direction, b.direction) and torch.equal(a.bias, b.bias)
        assert torch.equal(a.accuracy, b.accuracy) and a.key == b.key
    # given every CAV, only the inputs go through the model
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, args: forwards.append(args[0].shape[0]))
    try:
        names = [c.concept for c in result.concepts]
        again = tcav(model, inputs, names, 0, "features", runs=10, cavs=loaded, batch_size=64)
    finally:
        handle.remove()
    assert forwards == [inputs.shape[0]]
    for a, b in zip(result.concepts, again.concepts, strict=True):
        assert torch.equal(a.scores, b.scores) and a.p_value == b.p_value
    # with some CAVs given, the others are fitted as before
    partial = tcav(model, inputs, ["red", "green"], 0, "features", runs=10, cavs=loaded[:5])
    assert torch.equal(partial["green"].scores, result["green"].scores)
    assert torch.allclose(
        partial["red"].cavs[7].direction, result["red"].cavs[7].direction, atol=1e-6
    )


def test_cav_load_errors(tmp_path: Path, result: TCAVResult) -> None:
    with pytest.raises(NotFound, match="no CAV file"):
        CAV.load(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(InvalidInput, match="not a CAV file"):
        CAV.load(tmp_path / "garbage.pt")
    torch.save({"direction": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(InvalidInput, match="not a CAV file"):
        CAV.load(tmp_path / "other.pt")
    cav = result.cavs[0]
    cav.save(tmp_path / "ok.pt")
    good = torch.load(tmp_path / "ok.pt", weights_only=True)
    for key, value, message in [
        ("direction", torch.ones(2, 3), "direction"),
        ("direction", torch.tensor([1.0, float("nan")]), "direction"),
        ("bias", torch.ones(2), "bias"),
        ("layer", 3, "layer"),
        ("version", 99, "version"),
    ]:
        torch.save({**good, key: value}, tmp_path / "bad.pt")
        with pytest.raises(InvalidInput, match=message):
            CAV.load(tmp_path / "bad.pt")


# ------------------------------------------------------------------ (e) errors


class TupleLayer(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, x


class WithTuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pair = TupleLayer()
        self.unused = nn.Conv2d(3, 3, 1)
        self.head = RedGreen()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pair(x)[0])


def test_errors(model: RedGreen, inputs: Tensor) -> None:
    red = procedural("red", 8, size=SIZE)
    with pytest.raises(NotFound, match="no layer 'layer9'"):
        tcav(model, inputs, [red], 0, "layer9", runs=2)
    with pytest.raises(InvalidInput, match=r"lie in \[0, 3\)"):
        tcav(model, inputs, [red], 3, "features", runs=2)
    with pytest.raises(InvalidInput, match="lie in"):
        tcav(model, inputs, [red], -1, "features", runs=2)
    with pytest.raises(InvalidInput, match="required"):
        tcav(model, inputs, [red], None, "features", runs=2)  # type: ignore[arg-type]
    empty = ConceptSet("nothing", "custom", torch.zeros(0, 3, SIZE, SIZE))
    with pytest.raises(InvalidInput, match="'nothing' has 0 images"):
        tcav(model, inputs, [empty], 0, "features", runs=2)
    with pytest.raises(InvalidInput, match="non-empty"):
        tcav(model, inputs, [], 0, "features", runs=2)
    with pytest.raises(NotFound, match="plaid"):
        tcav(model, inputs, ["plaid"], 0, "features", runs=2)
    with pytest.raises(InvalidInput, match="at least 2"):
        tcav(model, inputs, [red], 0, "features", runs=1)
    with pytest.raises(InvalidInput, match="repeats"):
        tcav(model, inputs, [red, red], 0, "features", runs=2)
    with pytest.raises(InvalidInput, match="alpha"):
        tcav(model, inputs, [red], 0, "features", runs=2, alpha=1.5)
    with pytest.raises(InvalidInput, match="inputs"):
        tcav(model, inputs[0], [red], 0, "features", runs=2)
    with pytest.raises(InvalidInput, match="random_sets"):
        tcav(model, inputs, [red], 0, "features", runs=3, random_sets=[random_set(4)])
    wrong = CAV(torch.ones(5), torch.tensor(0.0), torch.tensor(1.0), "red", "random_0", "features")
    with pytest.raises(InvalidInput, match="5 features"):
        tcav(model, inputs, [red], 0, "features", runs=2, cavs=[wrong])
    other = WithTuple().eval()
    with pytest.raises(InvalidInput, match="not a float tensor"):
        tcav(other, inputs, [red], 0, "pair", runs=2)
    with pytest.raises(InvalidInput, match="did not run"):
        tcav(other, inputs, [red], 0, "unused", runs=2)
