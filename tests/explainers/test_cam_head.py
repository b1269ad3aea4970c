"""The gradient CAMs' head shortcut: a target logit's gradient at the input of the model's
final nn.Linear is that layer's weight row (no backward through the layer), taken only when
the logits are that layer's untouched output; and the tail after a channels-last layer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from xai_serve.explainers import cam
from xai_serve.explainers.base import explain


class Net(nn.Module):
    """conv -> relu -> conv (the layer) -> bn -> relu -> pool -> linear, and what comes after
    the linear layer chosen by ``after``."""

    def __init__(self, after: str = "nothing") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 24, 3, padding=1)
        self.bn = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)
        self.after = after
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        z = torch.relu(self.bn(self.conv2(torch.relu(self.conv1(x)))))
        y = self.fc(z.mean((2, 3)))
        if self.after == "in place":
            y.mul_(2.0)  # the layer's output object, changed: its weight row is not the gradient
        elif self.after == "scaled":
            y = y * 2.0
        return y


def _images() -> Tensor:
    return torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(1))


def _maps(
    model: nn.Module, images: Tensor, method: str, shortcut: bool, mp: pytest.MonkeyPatch
) -> tuple[Tensor, list[bool]]:
    """The maps, with the shortcut allowed or not, and whether each call took it."""
    taken: list[bool] = []
    original: Callable = cam._HeadTap.input_and_weight

    def spy(self: cam._HeadTap, out: object) -> object:
        found = original(self, out)
        taken.append(found is not None and shortcut)
        return found if shortcut else None

    with mp.context() as m:
        m.setattr(cam._HeadTap, "input_and_weight", spy)
        maps = explain(model, images, method, layer="conv2").maps
    return maps, taken


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "gradcam++"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_shortcut_gives_the_backward_s_gradients_bit_for_bit(
    method: str, channels_last: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = Net(), _images()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    ours, taken = _maps(model, images, method, True, monkeypatch)
    full, not_taken = _maps(model, images, method, False, monkeypatch)
    assert taken == [True] and not_taken == [False]
    assert torch.equal(ours, full)


def test_channels_last_model_gives_the_nchw_model_s_maps(monkeypatch: pytest.MonkeyPatch) -> None:
    model, images = Net(), _images()
    nchw = explain(model, images, "hirescam", layer="conv2").maps
    model_cl = Net().to(memory_format=torch.channels_last)
    cl = explain(
        model_cl, images.contiguous(memory_format=torch.channels_last), "hirescam", layer="conv2"
    ).maps
    torch.testing.assert_close(cl, nchw, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("after", ["in place", "scaled"])
def test_logits_changed_after_the_linear_layer_take_the_full_backward(
    after: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, images = Net(after), _images()
    ours, taken = _maps(model, images, "hirescam", True, monkeypatch)
    full, _ = _maps(model, images, "hirescam", False, monkeypatch)
    assert taken == [False]
    assert torch.equal(ours, full)
    # The maps are those of the gradient the model defines (twice the plain model's).
    plain = explain(Net(), images, "hirescam", layer="conv2").maps
    torch.testing.assert_close(ours, plain)  # normalised maps: a factor of 2 cancels
    g_model = _layer_gradient(model, images)
    g_plain = _layer_gradient(Net(), images)
    torch.testing.assert_close(g_model, 2 * g_plain)


def _layer_gradient(model: nn.Module, images: Tensor) -> Tensor:
    """d logit[i, top1_i] / d conv2 output, by a full autograd forward."""
    saved: dict[str, Tensor] = {}
    handle = model.conv2.register_forward_hook(lambda m, a, o: saved.setdefault("a", o))
    try:
        out = model(images)
    finally:
        handle.remove()
    top = out.detach().argmax(1)
    (g,) = torch.autograd.grad(out.gather(1, top[:, None]).sum(), saved["a"])
    return g


def test_autocast_declines_the_shortcut(monkeypatch: pytest.MonkeyPatch) -> None:
    # Under autocast the layer computes in bfloat16: its fp32 weight row is not the gradient.
    model, images = Net(), _images()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, taken = _maps(model, images, "gradcam", True, monkeypatch)
    assert taken == [False]


def test_several_targets_and_foils_take_the_full_backward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, images = Net(), _images()
    calls: list[object] = []
    original = cam._HeadTap.input_and_weight
    monkeypatch.setattr(
        cam._HeadTap, "input_and_weight", lambda s, o: calls.append(o) or original(s, o)
    )
    explain(model, images, "gradcam", layer="conv2", top_labels=2)
    explain(model, images, "gradcam", layer="conv2", target=1, foil=2)
    assert calls == []


def test_the_head_is_found_once_and_a_model_without_one_is_remembered() -> None:
    model, images = Net(), _images()
    explain(model, images, "gradcam", layer="conv2")
    assert cam._HEADS[model] == "fc"
    assert list(cam._HeadTap(model).candidates()) == ["fc"]
    scaled = Net("scaled")
    explain(scaled, images, "gradcam", layer="conv2")
    assert cam._HEADS[scaled] is None
    assert cam._HeadTap(scaled).candidates() == {}
    # A remembered head replaced by another module: searched again, found again.
    model.fc = nn.Linear(24, 10)
    explain(model, images, "gradcam", layer="conv2")
    assert cam._HEADS[model] == "fc"
    model.fc = nn.Sequential(nn.Linear(24, 10))  # no longer a linear layer under that name
    explain(model, images, "gradcam", layer="conv2")
    assert cam._HEADS[model] == "fc.0"


# --------------------------------------------------------------------------------------------
# A torchvision ViT's last block: the class token's path only
# --------------------------------------------------------------------------------------------


def _vit_maps(
    model: nn.Module,
    images: Tensor,
    method: str,
    options: dict,
    mp: pytest.MonkeyPatch,
    tail: bool,
    path: object = None,
) -> tuple[Tensor, list[bool]]:
    """The maps with the class-token tail allowed or not, and whether each call used it."""
    used: list[bool] = []
    original = cam._class_token_graph

    def spy(*args: object) -> object:
        graph = original(*args) if tail else None  # type: ignore[arg-type]
        used.append(graph is not None)
        return graph

    with mp.context() as m:
        m.setattr(cam, "_class_token_graph", spy)
        extra = {} if path is None else {"path": path}
        maps = explain(model, images, method, **options, **extra).maps
    return maps, used


VIT_CASES = [
    ("hirescam", {}),
    ("gradcam", {"target": 3}),
    ("gradcam++", {"foil": 2}),
    ("hirescam", {"top_labels": 2}),
]


@pytest.mark.parametrize(("method", "options"), VIT_CASES)
@pytest.mark.parametrize("on_twin", [False, True], ids=["model", "onednn_twin"])
def test_vit_class_token_tail_gives_the_model_tail_s_gradients(
    method: str, options: dict, on_twin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.explainers.test_attention import images, tv_vit
    from xai_serve.explainers import onednn
    from xai_serve.explainers.forward import ForwardPath

    model, x = tv_vit(), images(3)
    path = None
    if on_twin:
        if not onednn.onednn_available():
            pytest.skip("this PyTorch has no oneDNN packed linear")
        path = ForwardPath(linear="onednn", runner=onednn.onednn_twin(model))
    reused: list[int] = []
    if on_twin:  # the keys and values the twin's forward projected are reused
        real = onednn._Projected.apply
        monkeypatch.setattr(onednn._Projected, "apply", lambda *a: reused.append(1) or real(*a))
    fast, used = _vit_maps(model, x, method, options, monkeypatch, True, path)
    full, unused = _vit_maps(model, x, method, options, monkeypatch, False, path)
    assert used == [True] and unused == [False]
    assert reused == ([1] if on_twin else [])
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5)


def test_vit_tail_declines_hooked_modules_and_a_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.explainers.test_attention import images, tv_vit

    model, x = tv_vit(), images(3)
    layer = model.encoder.layers[-1].ln_1
    assert cam._ClassTokenTail.find(model, layer) is not None
    assert cam._ClassTokenTail.find(model, model.encoder.layers[0].ln_1) is None  # not last
    # A hook on a module the tail would re-run: the model's own tail (the hook included).
    handle = model.encoder.layers[-1].mlp.register_forward_hook(lambda m, a, o: 2 * o)
    try:
        assert cam._ClassTokenTail.find(model, layer) is None
        hooked = explain(model, x, "hirescam").maps
    finally:
        handle.remove()
    assert not torch.allclose(hooked, explain(model, x, "hirescam").maps)
    # Logits that do not match the forward's: the model's own tail, the same maps.
    want = explain(model, x, "hirescam").maps
    real = cam._ClassTokenTail.logits
    monkeypatch.setattr(
        cam._ClassTokenTail, "logits", lambda s, i, a, k=None: real(s, i, a, k) + 1.0
    )
    used: list[object] = []
    graph = cam._class_token_graph
    monkeypatch.setattr(cam, "_class_token_graph", lambda *a: used.append(graph(*a)) or used[-1])
    got = explain(model, x, "hirescam").maps
    assert used == [None]
    torch.testing.assert_close(got, want)
