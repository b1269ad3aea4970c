"""The oneDNN twin (xai_serve.explainers.onednn): the model's exact maths on packed linear
layers, never the model changed, never stale weights, and the places that run it (no-grad
forwards of a path, the attention methods, tune and the config).

Equality is to float rounding: the packed kernels sum in another order than ATen's BLAS."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import xai_serve
from tests.explainers.test_attention import images, timm_deit_distilled, timm_vit, tv_vit
from xai_serve import InvalidInput
from xai_serve.explainers import onednn
from xai_serve.explainers.forward import ForwardPath, forward_logits
from xai_serve.explainers.onednn import PackedLinear, onednn_twin
from xai_serve.models import TransformConfig, load_model, tuning
from xai_serve.models.config import ModelConfig, model_config_from_dict
from xai_serve.models.tuning import TuneSettings, tune

pytestmark = pytest.mark.skipif(
    not onednn.onednn_available(), reason="this PyTorch has no oneDNN packed linear"
)

VITS = {"torchvision": tv_vit, "timm": timm_vit, "deit_distilled": timm_deit_distilled}
TOL = dict(rtol=1e-5, atol=1e-5)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc1 = nn.Linear(4 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(self.conv(x).flatten(1))))


class Doubling(nn.Linear):
    """A Linear subclass whose forward is not a plain linear layer's: never packed."""

    def forward(self, x: Tensor) -> Tensor:
        return 2 * super().forward(x)


class CountPacked:
    """Counts the packed products (monkeypatched over onednn._packed_product)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = onednn._packed_product

        def counted(*args: Any) -> Tensor:
            self.calls += 1
            return real(*args)

        monkeypatch.setattr(onednn, "_packed_product", counted)


@pytest.mark.parametrize("kind", sorted(VITS))
def test_twin_computes_the_models_logits_and_leaves_it_unchanged(kind: str) -> None:
    model = VITS[kind]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    twin = onednn_twin(model)
    assert twin is not None
    assert any(isinstance(m, PackedLinear) for m in twin.modules())
    assert [type(m) for m in model.modules()] == types  # the model's modules untouched
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
    # the same Parameter objects: no weights copied
    assert all(a is b for a, b in zip(model.parameters(), twin.parameters(), strict=True))
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), **TOL)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_input_gradients_through_the_twin_equal_the_models(kind: str) -> None:
    model = VITS[kind]()
    for p in model.parameters():
        p.requires_grad_(True)  # as most users' models are: still no weight gradients
    twin = onednn_twin(model)
    assert twin is not None
    x1 = images(2).requires_grad_(True)
    x2 = x1.detach().clone().requires_grad_(True)
    (g_model,) = torch.autograd.grad(model(x1)[:, 3].sum(), x1)
    out = twin(x2)
    assert out.requires_grad
    (g_twin,) = torch.autograd.grad(out[:, 3].sum(), x2)
    torch.testing.assert_close(g_twin, g_model, **TOL)


def test_the_twin_follows_weights_changed_after_it_was_built() -> None:
    model = MLP().eval()
    twin = onednn_twin(model)
    assert twin is not None
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        twin(x)  # packs
        model.fc1.weight.mul_(-2.0)  # in place: a new version
        torch.testing.assert_close(twin(x), model(x), **TOL)
        model.fc2.weight.data = torch.randn_like(model.fc2.weight)  # new storage
        torch.testing.assert_close(twin(x), model(x), **TOL)


def test_no_packing_under_autocast_or_for_other_dtypes(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MLP().eval()
    twin = onednn_twin(model)
    assert twin is not None
    count = CountPacked(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = twin(x), model(x)
    assert count.calls == 0
    assert torch.equal(got, want)  # autocast's own computation, the model's
    with torch.no_grad():
        twin(x)
    assert count.calls == 2  # fc1 and fc2 packed in fp32


def test_no_twin_where_there_is_nothing_to_pack(monkeypatch: pytest.MonkeyPatch) -> None:
    conv_only = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert onednn_twin(conv_only) is None
    assert onednn_twin(torch.jit.script(MLP().eval())) is None
    sub = nn.Sequential(nn.Flatten(), Doubling(3 * 4 * 4, 5))
    assert onednn_twin(sub) is None  # a subclass with its own forward is not a Linear
    monkeypatch.setattr(onednn, "onednn_available", lambda: False)
    assert onednn_twin(MLP()) is None


def test_linear_subclasses_keep_their_own_forward() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), Doubling(8, 4)).eval()
    twin = onednn_twin(model)
    assert twin is not None
    assert isinstance(twin[1], PackedLinear) and type(twin[2]) is Doubling
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), **TOL)


def test_forward_logits_runs_the_twin_for_no_grad_forwards_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = MLP().eval()
    path = ForwardPath(linear="onednn", runner=onednn_twin(model))
    seen: list[str] = []
    model.fc2.register_forward_hook(lambda *_: seen.append("model"))
    count = CountPacked(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fast = forward_logits(model, x, None, "test", path)
    assert count.calls == 2 and seen == []
    with torch.enable_grad():
        slow = forward_logits(model, x, None, "test", path)  # gradients: the model's modules
    assert seen == ["model"] and count.calls == 2
    torch.testing.assert_close(fast, slow.detach(), **TOL)
    with torch.enable_grad():  # a caller without hooks on the model asks for the twin
        twin = forward_logits(model, x, None, "test", path, grad_on_runner=True)
    assert seen == ["model"] and count.calls == 4
    torch.testing.assert_close(twin.detach(), fast, **TOL)


def _model_and_twin(
    model: nn.Module, x: Tensor, method: str, options: dict[str, Any], mp: pytest.MonkeyPatch
) -> tuple[Any, Any, CountPacked]:
    """The explanation on the model's own path, then on a path with its twin (packed products
    counted), checked equal to float rounding: ``(model's, twin's, count)``. A forward of the
    model's own ``heads`` module during the second raises."""
    want = xai_serve.explain(model, x, method, **options)
    path = ForwardPath(linear="onednn", runner=onednn_twin(model))

    def not_the_model(*_: Any) -> None:
        raise AssertionError("the model's own module ran, not the twin's")

    last = list(model.children())[-1]
    mp.setattr(last, "forward", not_the_model)
    count = CountPacked(mp)
    got = xai_serve.explain(model, x, method, path=path, **options)
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-5)
    assert torch.equal(got.targets, want.targets)
    return want, got, count


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("saliency", {}),
        ("integrated_gradients", {"steps": 4}),
        ("smoothgrad", {"samples": 3, "seed": 5}),
        ("saliency", {"target": 2, "foil": 4}),
    ],
)
def test_gradient_methods_differentiate_through_the_twin(
    method: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, count = _model_and_twin(tv_vit(), images(2), method, options, monkeypatch)
    assert count.calls > 0  # the twin ran forward and backward


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("attention_rollout", {"discard_ratio": 0.5}),
        ("attention_rollout", {"head_fusion": "max"}),
        ("attention_gradcam", {}),
        ("attention_flow", {}),
    ],
)
@pytest.mark.parametrize("kind", ["torchvision", "timm"])
def test_attention_methods_on_the_twin_equal_the_model(
    kind: str, method: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    want, got, count = _model_and_twin(VITS[kind](), images(3), method, options, monkeypatch)
    assert count.calls > 0  # the twin ran
    torch.testing.assert_close(got.logits, want.logits, **TOL)


@pytest.mark.parametrize(
    ("method", "options"),
    [("gradcam", {}), ("gradcam++", {}), ("hirescam", {"target": 3}), ("gradcam", {"foil": 2})],
)
def test_cams_on_the_twin_equal_the_model(
    method: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default ViT layer (in the last block), its forward and the tail's backward on the
    # twin: packed products forward and backward.
    want, got, count = _model_and_twin(tv_vit(), images(3), method, options, monkeypatch)
    assert count.calls > 0
    assert got.layer == want.layer == "encoder.layers.encoder_layer_1.ln_1"


def test_a_layer_given_as_a_module_of_the_model_runs_in_the_twin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = MLP().eval()
    x = torch.randn(2, 3, 32, 32)
    path = ForwardPath(linear="onednn", runner=onednn_twin(model))
    want = xai_serve.explain(model, x, "gradcam", layer=model.conv)
    count = CountPacked(monkeypatch)
    got = xai_serve.explain(model, x, "gradcam", layer=model.conv, path=path)
    assert count.calls == 2 + 1  # the twin's two layers forward, the head's input gradient
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-5)


def test_a_foil_on_a_path_with_a_twin_explains_the_contrast() -> None:
    model = MLP().eval()
    x = torch.randn(2, 3, 32, 32)
    path = ForwardPath(linear="onednn", runner=onednn_twin(model))
    # Score-CAM takes one target at a time, on a model whose logits are contrasted with the
    # foil; its masked forwards are no-grad forwards of the path (the twin, contrasted too)
    opts = dict(target=1, foil=4, layer="conv")
    want = xai_serve.explain(model, x, "scorecam", **opts)
    got = xai_serve.explain(model, x, "scorecam", path=path, **opts)
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-5)
    plain = xai_serve.explain(model, x, "scorecam", path=path, target=1, layer="conv")
    assert not torch.allclose(plain.maps, got.maps)  # the foil changed the answer


def test_tune_forced_onednn_and_aten() -> None:
    model = MLP().eval()
    settings = dict(compile="off", max_batch=8, precision="fp32")
    path = tune(model, (3, 32, 32), TuneSettings(linear="onednn", **settings), min_time=0.01)
    assert path.linear == "onednn" and path.runner is not None
    assert "onednn-linear" in path.describe()
    assert "onednn-linear" in path.report.chosen.describe()
    x = torch.randn(3, 3, 32, 32)
    opts = dict(seed=0, samples=32, segmenter="grid", n_segments=4, target=2)
    want = xai_serve.explain(model, x, "lime", path=ForwardPath(), **opts)
    got = xai_serve.explain(model, x, "lime", **opts)  # the remembered, tuned path
    torch.testing.assert_close(got.maps, want.maps, rtol=1e-4, atol=1e-5)
    path = tune(model, (3, 32, 32), TuneSettings(linear="aten", **settings), min_time=0.01)
    assert path.linear == "aten" and path.runner is None


def test_tune_rejects_a_twin_whose_logits_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    model = MLP().eval()

    def wrong_twin(m: nn.Module) -> nn.Module:
        twin = onednn_twin(m)
        assert twin is not None
        twin.fc2 = nn.Linear(32, 10)  # other weights: not the model's maths
        return twin

    monkeypatch.setattr(tuning, "onednn_twin", wrong_twin)
    settings = TuneSettings(linear="onednn", compile="off", max_batch=8, precision="fp32")
    path = tune(model, (3, 32, 32), settings, min_time=0.01)
    assert path.linear == "aten" and path.runner is None
    assert any("onednn-linear rejected" in n for n in path.report.notes)


def test_config_key_linear(tmp_path: Any) -> None:
    with pytest.raises(InvalidInput, match="linear must be one of"):
        ModelConfig(name="m", source="torchvision", arch="resnet18", linear="mkl")
    with pytest.raises(InvalidInput, match="linear = 'onednn'"):
        model_config_from_dict(
            {
                "name": "r",
                "source": "oip",
                "linear": "onednn",
                "transform": {"resize": False, "crop": [32, 32]},
                "remote": {"url": "h:8001"},
            },
            base_dir=tmp_path,
        )
    with pytest.raises(InvalidInput, match="linear must be one of"):
        TuneSettings(linear="blas")
    small = TransformConfig(resize=None, crop=(32, 32))
    cfg = ModelConfig(
        name="v",
        source="torchvision",
        arch="resnet18",
        num_classes=3,
        transform=small,
        tune=False,
        linear="onednn",
    )
    forced = load_model(cfg)  # not tuned: the configured path, with its twin
    assert forced.path.linear == "onednn" and forced.path.runner is not None
    plain = load_model(ModelConfig(**{**cfg.__dict__, "linear": "auto"}))
    assert plain.path.linear == "aten" and plain.path.runner is None


def test_the_wire_reports_the_linear_kernels() -> None:
    from xai_serve.client import parse_forward_path
    from xai_serve.proto import explainer_pb2 as pb
    from xai_serve.serving.servicer import path_to_proto

    model = MLP().eval()
    message = pb.ForwardPath()
    path_to_proto(ForwardPath(linear="onednn", runner=onednn_twin(model)), message)
    info = parse_forward_path(message)
    assert info.linear == "onednn"
    assert "onednn-linear" in info.summary
