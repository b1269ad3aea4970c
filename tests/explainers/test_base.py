"""The explain() front door: validation, targets, layers, options, the method registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import xai_serve
from xai_serve import InvalidInput, NotFound
from xai_serve.explainers.base import resolve_layer, resolve_targets


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    ).eval()


def test_public_api_lists_the_methods():
    methods = xai_serve.list_methods()
    for name in (
        "gradcam",
        "gradcam++",
        "xgradcam",
        "hirescam",
        "layercam",
        "eigencam",
        "scorecam",
        "saliency",
        "input_x_gradient",
        "integrated_gradients",
        "smoothgrad",
    ):
        assert name in methods
    assert methods == sorted(methods)


def test_unknown_method_is_not_found_and_names_the_choices():
    with pytest.raises(NotFound, match=r"unknown explanation method 'gradcamm'.*gradcam"):
        xai_serve.explain(_net(), torch.rand(1, 3, 8, 8), "gradcamm")


def test_unknown_option_is_rejected_not_ignored():
    with pytest.raises(InvalidInput, match=r"no option.*stepz"):
        xai_serve.explain(_net(), torch.rand(1, 3, 8, 8), "integrated_gradients", stepz=4)


def _one_bad_pixel(value: float) -> torch.Tensor:
    """Two finite images, one pixel of the second set to ``value``."""
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    images[1, 2, 5, 3] = value
    return images


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(3, 8, 8), "Tensor\\[B, C, H, W\\]"),
        (torch.randint(0, 255, (1, 3, 8, 8)), "float tensor"),
        (torch.rand(0, 3, 8, 8), "empty"),
        ("cat.png", "torch.Tensor"),
        (torch.full((1, 3, 8, 8), float("nan")), "NaN or infinite"),
        (torch.tensor([1.0, float("inf")]).repeat(96).view(1, 3, 8, 8), "NaN or infinite"),
        (_one_bad_pixel(float("nan")), "NaN or infinite"),
        (_one_bad_pixel(-float("inf")), "NaN or infinite"),
        (_one_bad_pixel(float("inf")).bfloat16(), "NaN or infinite"),
        (_one_bad_pixel(float("nan")).half(), "NaN or infinite"),
    ],
)
def test_bad_images_are_invalid(images, message):
    with pytest.raises(InvalidInput, match=message):
        xai_serve.explain(_net(), images, "saliency")


def test_targets_are_resolved_and_checked():
    dev = torch.device("cpu")
    assert resolve_targets(None, 2, 5, dev) is None
    assert torch.equal(resolve_targets(3, 2, 5, dev), torch.tensor([3, 3]))
    assert torch.equal(
        resolve_targets(torch.tensor([1, 4], dtype=torch.int32), 2, 5, dev), torch.tensor([1, 4])
    )
    with pytest.raises(InvalidInput, match=r"\[0, 5\)"):
        resolve_targets(torch.tensor([1, 5]), 2, 5, dev)
    with pytest.raises(InvalidInput, match="Tensor\\[B\\]"):
        resolve_targets(torch.tensor([1]), 2, 5, dev)
    with pytest.raises(InvalidInput, match="integer class indices"):
        resolve_targets(torch.tensor([1.0, 2.0]), 2, 5, dev)
    with pytest.raises(InvalidInput, match=">= 0"):
        resolve_targets(-1, 2, None, dev)
    # a target beyond the model's classes is only known after the forward
    with pytest.raises(InvalidInput, match=r"\[0, 5\)"):
        xai_serve.explain(_net(), torch.rand(2, 3, 8, 8), "saliency", target=7)


def test_layers_resolve_by_name_or_module():
    net = _net()
    module, name = resolve_layer(net, "0")
    assert module is net[0] and name == "0"
    assert resolve_layer(net, net[1]) == (net[1], "1")
    with pytest.raises(NotFound, match="no layer 'layer9'"):
        resolve_layer(net, "layer9")
    with pytest.raises(NotFound, match="not part of the model"):
        resolve_layer(net, nn.ReLU())
    with pytest.raises(InvalidInput, match="does not take a `layer`"):
        xai_serve.explain(net, torch.rand(1, 3, 8, 8), "saliency", layer="0")


@pytest.mark.parametrize(
    ("kw", "message"), [({"batch_size": 0}, "batch_size"), ({"seed": 1.5}, "seed")]
)
def test_common_arguments_are_checked(kw, message):
    with pytest.raises(InvalidInput, match=message):
        xai_serve.explain(_net(), torch.rand(1, 3, 8, 8), "saliency", **kw)


def test_a_layer_without_spatial_output_is_invalid_for_cam():
    net = _net()
    with pytest.raises(InvalidInput, match="layer '4' outputs shape"):
        xai_serve.explain(net, torch.rand(1, 3, 8, 8), "gradcam", layer="4")


def test_sample_counts_below_one_are_invalid():
    for method, option in (
        ("lime", "samples"),
        ("kernelshap", "samples"),
        ("smoothgrad", "samples"),
        ("integrated_gradients", "steps"),
    ):
        with pytest.raises(InvalidInput, match=option):
            xai_serve.explain(_net(), torch.rand(1, 3, 8, 8), method, **{option: 0})


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated_gradients"])
def test_inputs_made_under_inference_mode_are_accepted(method):
    # Pipelines often compute images and predictions under torch.inference_mode().
    net = _net()
    with torch.inference_mode():
        images = torch.rand(2, 3, 8, 8)
        target = net(images).argmax(1)
    exp = xai_serve.explain(net, images, method, target=target)
    ref = xai_serve.explain(net, images.clone(), method, target=target.clone())
    assert torch.equal(exp.targets, target.clone())
    torch.testing.assert_close(exp.maps, ref.maps)
