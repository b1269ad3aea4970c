"""Several targets per image (``target`` ``Tensor[B, T]``, ``top_labels``) and contrast with a
foil, for every method: equal to T single-target calls with the same seeds, the work shared
(one set of forwards for the perturbation methods, one forward for the CAM and gradient
families), and the bad requests refused with errors that name them."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torchvision
from torch import nn

import xai_serve
from xai_serve.errors import InvalidInput
from xai_serve.explainers.base import get_method, list_methods

B, T = 3, 2
TARGETS = torch.tensor([[1, 2], [3, 4], [5, 6]])
SEEDS = [11, 12, 13]
SEGMENTS = dict(n_segments=9, segmenter="grid")

# small settings per method (the defaults otherwise)
OPTIONS: dict[str, dict[str, Any]] = {
    "integrated_gradients": {"steps": 4},
    "smoothgrad": {"samples": 3, "seed": SEEDS},
    "lime": {"samples": 48, "seed": SEEDS, **SEGMENTS},
    "kernelshap": {"samples": 48, "seed": SEEDS, **SEGMENTS},
    "occlusion": {"window": 16, "stride": 16},
    "scorecam": {"top_channels": 8},
    "deepshap": {"baselines": 2, "seed": SEEDS},
    "gradientshap": {"baselines": 2, "samples": 3, "seed": SEEDS},
}
VIT_ONLY = {"attention_gradcam"}


def _methods() -> list[str]:
    return [m for m in list_methods() if get_method(m).uses_target and m not in VIT_ONLY]


@pytest.fixture(scope="module")
def cnn() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=10,
    )  # fmt: skip
    return model.eval()


def _images(size: int = 64) -> torch.Tensor:
    return torch.randn(B, 3, size, size, generator=torch.Generator().manual_seed(5))


class _Counting(nn.Module):
    """The model, counting its forwards and the inputs they took."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.inputs = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.inputs += x.shape[0]
        return self.model(x)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)


@pytest.mark.parametrize("method", _methods())
def test_several_targets_equal_single_calls(cnn: nn.Module, method: str) -> None:
    x, opts = _images(), OPTIONS.get(method, {})
    many = xai_serve.explain(cnn, x, method, target=TARGETS, **opts)
    assert many.maps.shape == (B, T, 64, 64)
    assert torch.equal(many.targets, TARGETS)
    assert many.logits is not None and many.logits.shape == (B, 10)
    for t in range(T):
        one = xai_serve.explain(cnn, x, method, target=TARGETS[:, t], **opts)
        _close(many.maps[:, t], one.maps)
        for name in ("weights", "stderr", "intercept", "score"):
            part = getattr(many, name)
            if getattr(one, name) is not None:
                assert part is not None and part.shape[:2] == (B, T), name
                _close(part[:, t], getattr(one, name))


def test_attention_gradcam_several_targets(vit: nn.Module) -> None:
    x = _images(32)
    many = xai_serve.explain(vit, x, "attention_gradcam", target=TARGETS)
    for t in range(T):
        one = xai_serve.explain(vit, x, "attention_gradcam", target=TARGETS[:, t])
        _close(many.maps[:, t], one.maps)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "lime", "occlusion"])
def test_top_labels_are_the_top_k_classes(cnn: nn.Module, method: str) -> None:
    x, opts = _images(), OPTIONS.get(method, {})
    top = xai_serve.explain(cnn, x, method, top_labels=3, **opts)
    with torch.no_grad():
        want = cnn(x).topk(3, dim=1).indices
    assert torch.equal(top.targets, want)
    same = xai_serve.explain(cnn, x, method, target=want, **opts)
    _close(top.maps, same.maps)
    assert top.maps.shape == (B, 3, 64, 64)


class _LessFoil(nn.Module):
    """Logits less the logit of one class: what a contrast with that foil explains."""

    def __init__(self, model: nn.Module, foil: int) -> None:
        super().__init__()
        self.inner, self.foil = model, foil

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.inner(x)
        return z - z[:, self.foil : self.foil + 1]


LOGIT_METHODS = [
    m for m in _methods() if m not in {"lime", "kernelshap", "occlusion", "cam"}
]  # they explain a logit (CAM's weights are the linear layer's, not a contrast of scores)


@pytest.mark.parametrize("method", LOGIT_METHODS)
def test_foil_explains_the_logit_difference(cnn: nn.Module, method: str) -> None:
    """For methods that explain a logit, ``foil=f`` explains ``logit(t) - logit(f)``: the same
    map as the method on a model whose outputs are the logits less logit ``f``."""
    x, opts = _images(), OPTIONS.get(method, {})
    target = TARGETS[:, 0]
    got = xai_serve.explain(cnn, x, method, target=target, foil=9, **opts)
    kw = {"layer": "inner.layer4"} if get_method(method).uses_layer else {}
    want = xai_serve.explain(_LessFoil(cnn, 9), x, method, target=target, **opts, **kw)
    assert got.maps.shape == (B, 64, 64) and torch.equal(got.foils, torch.full((B,), 9))
    _close(got.maps, want.maps)
    # and the logits reported are the model's own, not the contrast
    with torch.no_grad():
        torch.testing.assert_close(got.logits, cnn(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("method", "output"),
    [("lime", "probability"), ("lime", "logit"), ("occlusion", "probability"),
     ("kernelshap", "logit")],
)  # fmt: skip
def test_foil_of_a_linear_surrogate_is_the_difference(
    cnn: nn.Module, method: str, output: str
) -> None:
    """LIME's ridge fit, KernelSHAP's regression and occlusion's score drops are linear in the
    scores, so the contrast's map is the target's map less the foil's (same draws)."""
    x, opts = _images(), {**OPTIONS[method], "output": output}
    contrast = xai_serve.explain(cnn, x, method, target=TARGETS[:, 0], foil=9, **opts)
    target = xai_serve.explain(cnn, x, method, target=TARGETS[:, 0], **opts)
    foil = xai_serve.explain(cnn, x, method, target=9, **opts)
    _close(contrast.maps, target.maps - foil.maps)


def test_a_foil_with_several_targets(cnn: nn.Module) -> None:
    x = _images()
    foils = torch.tensor([0, 7, 9])
    both = xai_serve.explain(cnn, x, "gradcam", target=TARGETS, foil=foils)
    assert both.maps.shape == (B, T, 64, 64) and torch.equal(both.foils, foils)
    for t in range(T):
        one = xai_serve.explain(cnn, x, "gradcam", target=TARGETS[:, t], foil=foils)
        _close(both.maps[:, t], one.maps)


@pytest.mark.parametrize("method", ["lime", "kernelshap", "occlusion"])
def test_perturbation_targets_share_the_forwards(cnn: nn.Module, method: str) -> None:
    x, opts = _images(), OPTIONS[method]
    counts = []
    for target in (TARGETS[:, 0], TARGETS, torch.tensor([[1, 2, 3, 4, 5]] * B)):
        model = _Counting(cnn)
        xai_serve.explain(model, x, method, target=target, **opts)
        counts.append((model.calls, model.inputs))
    assert counts[0] == counts[1] == counts[2]


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated_gradients"])
def test_cam_and_gradient_targets_share_one_forward(cnn: nn.Module, method: str) -> None:
    x, opts = _images(), OPTIONS.get(method, {})
    counts = []
    for target in (TARGETS[:, 0], torch.tensor([[1, 2, 3, 4, 5]] * B)):
        model = _Counting(cnn)
        kw = {"layer": "model.layer4"} if get_method(method).uses_layer else {}
        xai_serve.explain(model, x, method, target=target, **opts, **kw)
        counts.append((model.calls, model.inputs))
    assert counts[0] == counts[1]


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"target": torch.empty(B, 0, dtype=torch.int64)}, "T >= 1"),
        ({"target": torch.tensor([[1, 1], [2, 3], [4, 5]])}, "twice"),
        ({"target": TARGETS, "top_labels": 2}, "not both"),
        ({"top_labels": 0}, "top_labels"),
        ({"top_labels": 11}, "exceeds"),
        ({"target": TARGETS, "foil": 2}, "foil"),
        ({"target": 3, "foil": torch.tensor([1, 3, 2])}, "foil"),
        ({"foil": -1}, "foil"),
        ({"foil": 10}, "foil"),
        ({"foil": 1.5}, "foil"),
        ({"target": TARGETS[:2]}, "B = 3"),
        ({"target": 10}, "[0, 10)"),
    ],
)
@pytest.mark.parametrize("method", ["gradcam", "saliency", "lime", "deeplift"])
def test_bad_requests_name_what_is_wrong(
    cnn: nn.Module, method: str, kwargs: dict[str, Any], words: str
) -> None:
    opts = OPTIONS.get(method, {})
    with pytest.raises(InvalidInput, match=None) as info:
        xai_serve.explain(cnn, _images(), method, **kwargs, **opts)
    assert words in str(info.value)


def test_top_one_foil_equal_to_the_prediction_is_refused(cnn: nn.Module) -> None:
    x = _images()
    with torch.no_grad():
        top = cnn(x).argmax(1)
    with pytest.raises(InvalidInput, match="foil"):
        xai_serve.explain(cnn, x, "gradcam", foil=top)


@pytest.mark.parametrize("method", ["eigencam", "attention_rollout"])
@pytest.mark.parametrize("kwargs", [{"top_labels": 2}, {"target": TARGETS}, {"foil": 1}])
def test_class_agnostic_methods_refuse_targets(
    cnn: nn.Module, vit: nn.Module, method: str, kwargs: dict[str, Any]
) -> None:
    model, x = (vit, _images(32)) if method.startswith("attention") else (cnn, _images())
    with pytest.raises(InvalidInput, match="does not depend on the class"):
        xai_serve.explain(model, x, method, **kwargs)


def test_the_model_is_unchanged_after_a_contrast(cnn: nn.Module) -> None:
    """The one-at-a-time path (a method that does not share the work) wraps the model for a
    foil; nothing of the wrapper stays on it, and the layer is reported by its own name."""
    x = _images()
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    got = xai_serve.explain(cnn, x, "guided_gradcam", target=TARGETS[:, 0], foil=9)
    assert got.layer == "layer4"
    assert not cnn._forward_hooks and not cnn._forward_pre_hooks
    for k, v in cnn.state_dict().items():
        assert torch.equal(v, before[k]), k
