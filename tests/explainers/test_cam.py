"""The CAM family against pytorch-grad-cam 1.5.7 (the peer), closed forms, and its contract.

Maps are compared at the activation resolution (``size=(h, w)``, where cam_fuse's upsampling is
the identity) with the peer's per-layer cam before its resize: ``relu(get_cam_image(...))``,
then both sides go through the same min-max normalisation (:func:`_normalize`, the definition
cam_fuse uses: ``(x - min) / (max - min)``, a constant map -> 0). pytorch-grad-cam's own
``scale_cam_image`` divides by ``max - min + 1e-7``, which would add up to ``1e-7 / (max - min)``
of difference on maps with a small range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from tests._peers import require

torchvision = require("torchvision")
pgc = require("pytorch_grad_cam")

from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import (  # noqa: E402
    get_2d_projection,
    get_2d_projection_with_sign_correction,
)

from xai_serve import InvalidInput, NotFound, ops  # noqa: E402
from xai_serve.explainers.base import explain  # noqa: E402

# Measured at most 1.4e-6 over every comparison with the peer in this file (CPU, float32).
TOL = 1e-5
TARGETS = (1, 500)

PEERS = {
    "gradcam": pgc.GradCAM,
    "gradcam++": pgc.GradCAMPlusPlus,
    "xgradcam": pgc.XGradCAM,
    "hirescam": pgc.HiResCAM,
    "layercam": pgc.LayerCAM,
}

# Target layers as in pytorch-grad-cam's README.
LAYERS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "resnet18": lambda m: m.layer4[-1],
    "resnet50": lambda m: m.layer4[-1],
    "vgg11": lambda m: m.features[-1],
    "densenet121": lambda m: m.features[-1],
}


@pytest.fixture(scope="module", autouse=True)
def _flush_denormals() -> Iterator[None]:
    # Randomly initialised deep nets (densenet121) drift into subnormal floats, which are ~50x
    # slower on x86; flushing them changes nothing that is compared here (both sides see it).
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)


def _normalize(cam: Tensor) -> Tensor:
    """ReLU, then per-image min-max to [0, 1] (a constant map -> zeros), as cam_fuse does."""
    cam = torch.as_tensor(cam).float().clamp_min(0)
    lo = cam.amin(dim=(1, 2), keepdim=True)
    hi = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(hi > lo, (cam - lo) / torch.where(hi > lo, hi - lo, 1.0), 0.0)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


def _name(model: nn.Module, layer: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is layer)


@dataclass
class PeerRun:
    model: nn.Module
    images: Tensor
    targets: Tensor
    layer: nn.Module
    layer_name: str
    activations: object  # numpy [B, K, h, w], as the peer captured them
    gradients: object
    reshape: Callable[[Tensor], Tensor] | None = None

    def peer_cam(self, method: str) -> Tensor:
        """The peer's per-layer cam for ``method`` before its resize, normalised."""
        with PEERS[method](self.model, [self.layer], reshape_transform=self.reshape) as cam:
            raw = cam.get_cam_image(
                self.images, self.layer, None, self.activations, self.gradients, False
            )
        return _normalize(raw)

    def ours(self, method: str, **kw: object) -> torch.Tensor:
        h, w = self.activations.shape[2:]  # type: ignore[attr-defined]
        e = explain(
            self.model, self.images, method, target=self.targets, layer=self.layer_name,
            size=(h, w), **kw,
        )  # fmt: skip
        assert e.layer == self.layer_name
        assert torch.equal(e.targets, self.targets)
        return e.maps


def _peer_run(
    model: nn.Module,
    layer: nn.Module,
    images: Tensor,
    targets: Tensor,
    reshape: Callable[[Tensor], Tensor] | None = None,
) -> PeerRun:
    """One forward and backward through pytorch-grad-cam's hooks: its activations and grads."""
    with pgc.GradCAM(model, [layer], reshape_transform=reshape) as cam:
        cam(images, [ClassifierOutputTarget(int(t)) for t in targets])
        acts = cam.activations_and_grads.activations[0].numpy()
        grads = cam.activations_and_grads.gradients[0].numpy()
    model.zero_grad(set_to_none=True)  # the peer calls loss.backward()
    return PeerRun(model, images, targets, layer, _name(model, layer), acts, grads, reshape)


@functools.cache
def _cnn_run(arch: str) -> PeerRun:
    model = _model(arch)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 224, 224)
    layer = LAYERS[arch](model)
    # densenet applies an in-place ReLU right after features.norm5. On the CPU the peer's
    # `.cpu().detach()` aliases the layer output, so it would see relu(norm5) as the
    # activations (on a GPU it copies first and sees norm5). A cloning reshape_transform gives
    # it the layer's true output, as on a GPU; the gradient is unaffected (a clone).
    reshape = (lambda t: t.clone()) if arch == "densenet121" else None
    # Explicit targets: each image's second-ranked class (with an arbitrary class, the whole
    # Grad-CAM of a random network can be negative, and both sides would trivially agree on 0).
    with torch.no_grad():
        targets = model(images).topk(2, dim=1).indices[:, 1]
    return _peer_run(model, layer, images, targets, reshape)


def _assert_close(ours: Tensor, ref: Tensor) -> None:
    assert ours.shape == ref.shape and ours.dtype == torch.float32
    # The comparison must not be vacuous: each reference map spans [0, 1].
    assert torch.all(ref.flatten(1).amax(dim=1) > 1 - 1e-6)
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"max |ours - pytorch-grad-cam| = {diff:.3g}"


# --------------------------------------------------------------------------------------------
# Numbers against pytorch-grad-cam
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(PEERS))
@pytest.mark.parametrize("arch", list(LAYERS))
def test_gradient_cams_match_pytorch_grad_cam(arch: str, method: str) -> None:
    run = _cnn_run(arch)
    _assert_close(run.ours(method), run.peer_cam(method))


def test_full_size_map_is_the_peer_cam_upsampled() -> None:
    # The default size is the input's; the map is the same low-resolution cam, upsampled by
    # cam_fuse (checked against its reference on the peer's cam).
    run = _cnn_run("resnet18")
    e = explain(run.model, run.images, "gradcam", target=run.targets, layer=run.layer_name)
    with pgc.GradCAM(run.model, [run.layer]) as cam:
        raw = torch.as_tensor(
            cam.get_cam_image(run.images, run.layer, None, run.activations, run.gradients, False)
        )
    ref = ops.cam_fuse_reference(raw[:, None], torch.ones(2, 1), (224, 224))
    assert e.maps.shape == (2, 224, 224)
    assert (e.maps - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", list(LAYERS))
def test_eigencam_matches_pytorch_grad_cam(arch: str) -> None:
    run = _cnn_run(arch)
    ours = run.ours("eigencam")
    # Our sign convention is Seg-Eigen-CAM's (largest |value| of the projection positive):
    # pytorch-grad-cam's sign-corrected projection is the closed form, exactly.
    _assert_close(ours, _normalize(get_2d_projection_with_sign_correction(run.activations)))
    # pytorch-grad-cam's EigenCAM keeps LAPACK's arbitrary sign: equal up to that sign.
    with pgc.EigenCAM(run.model, [run.layer], reshape_transform=run.reshape) as cam:
        p = torch.as_tensor(
            cam.get_cam_image(run.images, run.layer, None, run.activations, None, False)
        )
    assert torch.equal(p, torch.as_tensor(get_2d_projection(run.activations)))
    for b in range(p.shape[0]):
        diff = min((ours[b] - _normalize(s * p[b : b + 1])[0]).abs().max().item() for s in (1, -1))
        assert diff <= TOL


@pytest.mark.parametrize(("layer_name", "hw"), [("layer4.1", (2, 2)), ("layer2.1", (8, 8))])
def test_scorecam_matches_pytorch_grad_cam(layer_name: str, hw: tuple[int, int]) -> None:
    # 64 x 64 inputs keep the 2 x K masked forwards cheap: layer4 (K = 512) is then 2 x 2,
    # layer2 (K = 128) 8 x 8, where the upsampled masks vary within the image.
    model = _model("resnet18")
    torch.manual_seed(1)
    images = torch.randn(2, 3, 64, 64)
    targets = torch.tensor(TARGETS)
    layer = model.get_submodule(layer_name)
    with pgc.ScoreCAM(model, [layer]) as cam:
        cam.batch_size = 64
        with torch.no_grad():
            cam.activations_and_grads(images)
        acts = cam.activations_and_grads.activations[0].numpy()
        raw = cam.get_cam_image(
            images, layer, [ClassifierOutputTarget(int(t)) for t in targets], acts, None, False
        )
    assert acts.shape[2:] == hw
    e = explain(
        model, images, "scorecam", target=targets, layer=layer_name, size=acts.shape[2:],
        batch_size=64,
    )  # fmt: skip
    _assert_close(e.maps, _normalize(raw))


def _vit_tokens_to_grid(t: Tensor) -> Tensor:
    return t[:, 1:, :].reshape(t.shape[0], 14, 14, t.shape[2]).permute(0, 3, 1, 2)


def _swin_to_channels_first(t: Tensor) -> Tensor:
    return t.permute(0, 3, 1, 2)


@pytest.mark.parametrize(
    ("arch", "default_layer", "peer_reshape"),
    [
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", _vit_tokens_to_grid),
        ("swin_t", "features.7", _swin_to_channels_first),
    ],
)
def test_transformers_default_layer_and_token_layout(
    arch: str, default_layer: str, peer_reshape: Callable[[Tensor], Tensor]
) -> None:
    model = _model(arch)
    torch.manual_seed(0)
    if arch == "vit_b_16":  # torchvision initialises ViT's head to zeros: no gradient at all
        nn.init.normal_(model.heads.head.weight, std=0.02)
    images = torch.randn(1, 3, 224, 224)
    e = explain(model, images, "gradcam", target=torch.tensor([3]))
    assert e.layer == default_layer
    assert e.maps.shape == (1, 224, 224)
    assert e.maps.min() >= 0 and e.maps.max() <= 1
    # The same layer and the same reshape (applied to activations and gradients) in the peer.
    run = _peer_run(model, model.get_submodule(default_layer), images, e.targets, peer_reshape)
    _assert_close(run.ours("gradcam"), run.peer_cam("gradcam"))


# --------------------------------------------------------------------------------------------
# Layer choice, targets, errors
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    return _model("resnet18")


@pytest.fixture(scope="module")
def images() -> Tensor:
    torch.manual_seed(2)
    return torch.randn(2, 3, 96, 96)


def test_default_layer_is_found_and_remembered(resnet18: nn.Module, images: Tensor) -> None:
    from xai_serve.explainers import cam

    cam._FOUND_LAYERS.pop(resnet18, None)
    first = explain(resnet18, images, "gradcam")  # the search, during its own forward
    assert first.layer == "layer4"
    assert cam._FOUND_LAYERS[resnet18] == {((3, 96, 96), torch.float32): "layer4"}
    again = explain(resnet18, images, "gradcam")  # the remembered layer, hooked alone
    explicit = explain(resnet18, images, "gradcam", layer="layer4")
    assert again.layer == explicit.layer == "layer4"
    assert torch.allclose(first.maps, explicit.maps, atol=1e-6)
    assert torch.allclose(again.maps, explicit.maps, atol=1e-6)
    # And the same for a gradient-free method.
    cam._FOUND_LAYERS.pop(resnet18, None)
    e = explain(resnet18, images, "eigencam")
    assert e.layer == "layer4"
    assert torch.allclose(e.maps, explain(resnet18, images, "eigencam", layer="layer4").maps)


def test_top1_targets_and_logits_from_the_same_forward(resnet18: nn.Module, images: Tensor) -> None:
    with torch.no_grad():
        logits = resnet18(images)
    for method in ("gradcam", "eigencam"):
        e = explain(resnet18, images, method)
        assert torch.equal(e.targets, logits.argmax(dim=1))
        assert e.logits is not None and not e.logits.requires_grad
        assert torch.allclose(e.logits, logits, atol=1e-5)
        assert e.method == method


def test_unknown_layer_is_not_found(resnet18: nn.Module, images: Tensor) -> None:
    with pytest.raises(NotFound, match="layer9"):
        explain(resnet18, images, "gradcam", layer="layer9")


def test_out_of_range_target_is_invalid(resnet18: nn.Module, images: Tensor) -> None:
    with pytest.raises(InvalidInput, match="1000"):
        explain(resnet18, images, "gradcam", target=1000)
    with pytest.raises(InvalidInput):
        explain(resnet18, images, "eigencam", target=torch.tensor([0, 1000]))


@pytest.mark.parametrize(
    ("options", "match"),
    [({"size": (0, 3)}, "size"), ({"reshape": 3}, "reshape"), ({"top": 3}, "top")],
)
def test_bad_options_are_invalid(
    resnet18: nn.Module, images: Tensor, options: dict, match: str
) -> None:
    with pytest.raises(InvalidInput, match=match):
        explain(resnet18, images, "gradcam", **options)


def test_no_graph_for_the_body_and_no_parameter_grads(resnet18: nn.Module, images: Tensor) -> None:
    seen: dict[str, bool] = {}
    hooks = [
        resnet18.layer3.register_forward_hook(
            lambda m, i, o: seen.__setitem__("layer3", o.requires_grad)
        ),
        resnet18.fc.register_forward_hook(lambda m, i, o: seen.__setitem__("fc", o.requires_grad)),
    ]
    try:
        resnet18.zero_grad(set_to_none=True)
        explain(resnet18, images, "gradcam", layer="layer4")
        assert seen == {"layer3": False, "fc": True}  # a graph only from layer4 on
        assert all(p.grad is None for p in resnet18.parameters())
        assert torch.is_grad_enabled()  # the caller's grad mode is back
        with torch.no_grad():
            e = explain(resnet18, images, "gradcam", layer="layer4")
            assert not torch.is_grad_enabled()
        assert e.maps.max() == 1
        explain(resnet18, images, "eigencam", layer="layer4")
        assert seen == {"layer3": False, "fc": False}  # gradient-free: no graph at all
    finally:
        for h in hooks:
            h.remove()


def test_grad_mode_is_restored_on_error(resnet18: nn.Module, images: Tensor) -> None:
    def boom(m: nn.Module, i: object, o: Tensor) -> None:
        raise RuntimeError("boom")

    h = resnet18.fc.register_forward_hook(boom)  # fires after the CAM hook enabled grad
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            explain(resnet18, images, "gradcam", layer="layer4")
        with pytest.raises(RuntimeError, match="boom"):
            explain(resnet18, images, "gradcam", layer="layer4")
        assert torch.is_grad_enabled()
    finally:
        h.remove()
    with torch.no_grad():
        assert not torch.is_grad_enabled()


def test_reshape_option_is_applied_to_activations_and_gradients(
    resnet18: nn.Module, images: Tensor
) -> None:
    # Mirroring the layer's output mirrors activations and gradients, hence the map.
    plain = explain(resnet18, images, "hirescam", layer="layer4")
    mirrored = explain(resnet18, images, "hirescam", layer="layer4", reshape=lambda t: t.flip(-1))
    assert torch.allclose(mirrored.maps, plain.maps.flip(-1), atol=1e-5)
    with pytest.raises(InvalidInput, match="reshape"):
        explain(resnet18, images, "gradcam", layer="layer4", reshape=lambda t: t.flatten(2))


def test_scorecam_top_channels_runs_fewer_forwards(resnet18: nn.Module) -> None:
    torch.manual_seed(3)
    x = torch.randn(1, 3, 64, 64)
    calls = []
    h = resnet18.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        full = explain(resnet18, x, "scorecam", layer="layer4", batch_size=128)
        n_full = len(calls)
        calls.clear()
        top = explain(resnet18, x, "scorecam", layer="layer4", batch_size=128, top_channels=64)
        n_top = len(calls)
        calls.clear()
        same = explain(resnet18, x, "scorecam", layer="layer4", batch_size=128, top_channels=512)
    finally:
        h.remove()
    assert n_full == 1 + math.ceil(512 / 128)  # the explained forward + 512 masked inputs
    assert n_top == 1 + 1  # ... + 64 masked inputs
    assert top.maps.shape == (1, 64, 64)
    assert top.maps.min() >= 0 and top.maps.max() == 1
    assert torch.equal(same.maps, full.maps)  # k >= K keeps every channel


def test_default_layer_search_survives_in_place_ops() -> None:
    # densenet121 ends its features with norm5 and then applies ReLU in place: the search (a
    # leaf at every candidate, the last one kept) must neither fail on the in-place op nor see
    # the ReLU's result. The last 4-D module is `features` (its output is norm5's).
    run = _cnn_run("densenet121")
    from xai_serve.explainers import cam

    cam._FOUND_LAYERS.pop(run.model, None)
    for method in ("gradcam", "eigencam"):
        found = explain(run.model, run.images, method, target=run.targets, size=(7, 7))
        assert found.layer == "features"
        _assert_close(found.maps, run.ours(method))  # == layer "features.norm5"


def test_inference_mode(resnet18: nn.Module, images: Tensor) -> None:
    with torch.inference_mode():
        with pytest.raises(InvalidInput, match="inference_mode"):
            explain(resnet18, images, "gradcam", layer="layer4")
        e = explain(resnet18, images, "eigencam", layer="layer4")  # gradient-free: fine
    assert torch.allclose(e.maps, explain(resnet18, images, "eigencam", layer="layer4").maps)


@pytest.mark.parametrize("top", [0, -1, 2.5, True])
def test_bad_top_channels_is_invalid(resnet18: nn.Module, images: Tensor, top: object) -> None:
    with pytest.raises(InvalidInput, match="top_channels"):
        explain(resnet18, images, "scorecam", top_channels=top)
