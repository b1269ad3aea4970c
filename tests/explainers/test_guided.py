"""Guided backprop, deconvnet and Guided Grad-CAM against captum 0.9 (the peer), closed forms
of the ReLU rules (functional ReLUs and ReLU6 included, which captum does not hook), and their
contract: batched, per-image targets, nothing left on the model, also after errors.

Peer comparisons: captum's per-channel attribution summed over channels, on torchvision models
with random weights (seed 0) and 64 x 64 inputs, to 1e-4 of the largest magnitude of the peer's
map (measured: 0 for guided backprop and deconvnet, the same ops in the same order; <= 6e-7 for
Guided Grad-CAM, whose Grad-CAM factor is summed and upsampled by other code).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests._peers import require

torchvision = require("torchvision")
captum_attr = require("captum.attr")

from xai_serve import InvalidInput  # noqa: E402
from xai_serve.explainers.base import explain, get_method  # noqa: E402
from xai_serve.explainers.guided import RectifierRules  # noqa: E402

REL = 1e-4
METHODS = ("guided_backprop", "deconvnet", "guided_gradcam")


@pytest.fixture(scope="module", autouse=True)
def _quiet_and_flush() -> Iterator[None]:
    # Random deep nets drift into subnormal floats (slow on x86); flushing changes nothing that
    # is compared (both sides see it). Captum warns on every call that it sets ReLU hooks.
    torch.set_flush_denormal(True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
        yield
    torch.set_flush_denormal(False)


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None).eval()


def _inputs(b: int = 3, size: int = 64) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, size, size, generator=g), torch.tensor([1, 500, 999][:b])


def _peer(method: str, model: nn.Module, layer: nn.Module, x: Tensor, t: Tensor) -> Tensor:
    if method == "guided_backprop":
        attr = captum_attr.GuidedBackprop(model).attribute(x.clone(), target=t)
    elif method == "deconvnet":
        attr = captum_attr.Deconvolution(model).attribute(x.clone(), target=t)
    else:
        attr = captum_attr.GuidedGradCam(model, layer).attribute(
            x.clone(), target=t, interpolate_mode="bilinear"
        )
    return attr.sum(1)


def _assert_rel(ours: Tensor, ref: Tensor, rel: float = REL) -> None:
    torch.testing.assert_close(ours, ref, rtol=0, atol=rel * float(ref.abs().max()))


# Guided Grad-CAM's layer: resnets' Grad-CAM layer (found automatically, checked below), and
# vgg11's feature extractor, after which the MLP head's ReLUs force the two-backward path.
LAYERS = {"resnet18": "layer4", "vgg11": "features", "resnet50": "layer4"}


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "resnet50"])
@pytest.mark.parametrize("method", METHODS)
def test_equals_captum(arch: str, method: str) -> None:
    model = _model(arch)
    x, t = _inputs(2 if arch == "resnet50" else 3)
    layer = LAYERS[arch]
    kw = {"layer": layer} if method == "guided_gradcam" else {}
    e = explain(model, x, method, target=t, **kw)
    assert e.maps.shape == (x.shape[0], 64, 64) and e.maps.dtype == torch.float32
    assert torch.equal(e.targets, t)
    assert e.layer == (layer if method == "guided_gradcam" else None)
    _assert_rel(e.maps, _peer(method, model, model.get_submodule(layer), x, t))
    with torch.no_grad():
        torch.testing.assert_close(e.logits, model(x), rtol=1e-5, atol=1e-5)


def test_guided_gradcam_finds_the_gradcam_layer_and_top1() -> None:
    model = _model("resnet18")
    x, _ = _inputs()
    e = explain(model, x, "guided_gradcam")
    assert e.layer == explain(model, x, "gradcam").layer == "layer4"
    top1 = model(x).argmax(1)
    assert torch.equal(e.targets, top1)
    _assert_rel(e.maps, _peer("guided_gradcam", model, model.layer4, x, top1))


def test_the_rules_differ_from_the_plain_gradient() -> None:
    # Not a vacuous comparison: on the same model the three maps and the plain gradient differ.
    model = _model("resnet18")
    x, t = _inputs()
    plain = explain(model, x, "saliency", target=t, abs=False).maps
    maps = {m: explain(model, x, m, target=t).maps for m in METHODS}
    for a in (*METHODS, "plain"):
        for b in (*METHODS, "plain"):
            if a < b:
                ma, mb = maps.get(a, plain), maps.get(b, plain)
                assert (ma - mb).abs().max() > 0.1 * mb.abs().max(), (a, b)


# --------------------------------------------------------------------------- closed forms


class _Head(nn.Module):
    """``logits = W2 act(W1 flatten(x))``, with the rectifier ``act`` called as given."""

    def __init__(self, act: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(2 * 3 * 3, 16)
        self.fc2 = nn.Linear(16, 4)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


RELU6 = nn.ReLU6(inplace=True)
ACTS: dict[str, tuple[Callable[[Tensor], Tensor], float | None]] = {
    "F.relu": (F.relu, None),
    "F.relu inplace": (lambda z: F.relu(z, inplace=True), None),
    "torch.relu": (torch.relu, None),
    "torch.relu_": (torch.relu_, None),
    "Tensor.relu": (lambda z: z.relu(), None),
    "Tensor.relu_": (lambda z: z.relu_(), None),
    "nn.ReLU inplace": (nn.ReLU(inplace=True), None),
    "F.relu6": (F.relu6, 6.0),
    "nn.ReLU6 inplace": (RELU6, 6.0),
    "F.hardtanh(0, 3)": (lambda z: F.hardtanh(z, 0.0, 3.0), 3.0),
}


@pytest.mark.parametrize("rule", ["guided_backprop", "deconvnet"])
@pytest.mark.parametrize("act", list(ACTS))
def test_rule_closed_form(act: str, rule: str) -> None:
    """d logit_c / d x with the rectifier's backward replaced, by hand: at the hidden layer
    the gradient is ``W2[c]``; guided keeps ``relu(W2[c])`` where ``0 < z < cap``, deconvnet
    where ``z < cap`` (no lower gate); then ``W1^T``. The map sums the 2 channels."""
    fn, cap = ACTS[act]
    model = _Head(fn).eval()
    g = torch.Generator().manual_seed(2)
    x = 12 * torch.randn(5, 2, 3, 3, generator=g)  # hidden values on both sides of 0 and cap
    t = torch.tensor([0, 1, 2, 3, 1])
    with torch.no_grad():
        z = model.fc1(x.flatten(1))
    upper = torch.ones_like(z, dtype=torch.bool) if cap is None else z < cap
    assert (z < 0).any() and (z > 0).any() and (cap is None or (z > cap).any())
    assert (model.fc2.weight < 0).any()  # the rules' relu(g) has something to remove
    gate = upper & (z > 0) if rule == "guided_backprop" else upper
    hidden = model.fc2.weight[t].detach().clamp_min(0) * gate  # [B, 16]
    expected = (hidden @ model.fc1.weight.detach()).view(5, 2, 3, 3).sum(1)
    e = explain(model, x, rule, target=t)
    torch.testing.assert_close(e.maps, expected, rtol=1e-5, atol=1e-6)


def test_densenet_functional_relu_is_covered() -> None:
    """DenseNet's last ReLU is ``F.relu(features, inplace=True)``, which captum's module hooks
    do not see: the mode sees one rectifier call more than there are nn.ReLU module calls."""
    model = _model("densenet121")
    calls = []
    handles = [
        m.register_forward_hook(lambda *a: calls.append(1))
        for m in model.modules()
        if isinstance(m, nn.ReLU)
    ]
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    with RectifierRules("guided") as rules:
        model(x)
    for h in handles:
        h.remove()
    assert rules.count == len(calls) + 1


# --------------------------------------------------------------------------- contract


class _Counting(nn.Module):
    """A small ReLU CNN that counts its forwards and may raise in the middle of one."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)
        self.forwards = 0
        self.fail = False

    def forward(self, x: Tensor) -> Tensor:
        self.forwards += 1
        h = self.conv2(self.relu(self.conv(x)))
        if self.fail:
            raise RuntimeError("boom")
        return self.fc(F.relu(h).mean((2, 3)))


def _state(model: nn.Module) -> tuple:
    hooks = [
        (n, len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
        for n, m in model.named_modules()
    ]
    params = [(n, p.requires_grad, p.grad is None) for n, p in model.named_parameters()]
    return hooks, params, [type(m).forward for m in model.modules()], model.training


@pytest.mark.parametrize("method", METHODS)
def test_batched_one_forward_per_chunk_and_per_image_targets(method: str) -> None:
    model = _Counting().eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0, 4, 2, 2])
    kw = {"layer": "conv2"} if method == "guided_gradcam" else {}
    model.forwards = 0
    whole = explain(model, x, method, target=t, **kw)
    assert model.forwards == 1
    singles = torch.cat([explain(model, x[i : i + 1], method, target=t[i : i + 1], **kw).maps
                         for i in range(4)])  # fmt: skip
    torch.testing.assert_close(whole.maps, singles, rtol=1e-5, atol=1e-6)
    model.forwards = 0
    chunked = explain(model, x, method, target=t, batch_size=3, **kw)
    assert model.forwards == 2
    torch.testing.assert_close(chunked.maps, whole.maps, rtol=1e-5, atol=1e-6)
    assert whole.maps.abs().max() > 0


@pytest.mark.parametrize("method", METHODS)
def test_model_left_unchanged_also_after_an_error(method: str) -> None:
    model = _Counting().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = {"layer": "conv2"} if method == "guided_gradcam" else {}
    before = _state(model)
    with torch.no_grad():
        logits = model(x)
    explain(model, x, method, **kw)
    assert _state(model) == before
    model.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        explain(model, x, method, **kw)
    model.fail = False
    assert _state(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), logits)
    # The rules are gone from this thread: a plain gradient is the plain gradient again.
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    torch.testing.assert_close(explain(model, x, "saliency", target=1, abs=False).maps, grad.sum(1))


def test_rules_are_thread_local() -> None:
    """The server explains in worker threads: while one thread is inside the rules, another
    thread's gradient of the same model is the plain one, and its ReLUs are not counted."""
    model = _Counting().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))

    def plain() -> Tensor:
        xg = x.clone().requires_grad_(True)
        return torch.autograd.grad(model(xg)[:, 1].sum(), xg)[0]

    got: list[Tensor] = []
    with RectifierRules("deconvnet") as rules:
        worker = threading.Thread(target=lambda: got.append(plain()))
        worker.start()
        worker.join()
    assert rules.count == 0
    assert torch.equal(got[0], plain())


def test_no_rectifier_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 36, 3))
    for method in ("guided_backprop", "deconvnet"):
        with pytest.raises(InvalidInput, match=r"ran none.*saliency"):
            explain(model, torch.randn(1, 3, 8, 8), method)


def test_bad_requests_are_invalid_input() -> None:
    model = _Counting().eval()
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(InvalidInput, match="does not take a `layer`"):
        explain(model, x, "guided_backprop", layer="conv2")
    with pytest.raises(InvalidInput, match="does not take a `baseline`"):
        explain(model, x, "deconvnet", baseline=0.0)
    with pytest.raises(InvalidInput, match="amp"):
        explain(model, x, "guided_backprop", amp="fp8")
    with pytest.raises(InvalidInput, match=r"target.*\[0, 5\)"):
        explain(model, x, "guided_gradcam", target=7)
    with pytest.raises(InvalidInput, match="inference_mode"), torch.inference_mode():
        explain(model, x, "guided_backprop")
    with pytest.raises(InvalidInput, match="`reshape` must be a callable"):
        explain(model, x, "guided_gradcam", layer="conv2", reshape=3)


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_reaches_every_forward(method: str) -> None:
    """``amp`` reaches every forward, Guided Grad-CAM's first-call layer search included (a
    fresh model, no ``layer``): the first convolution computes in the asked dtype only."""
    model = _Counting().eval()
    seen: list[torch.dtype] = []
    handle = model.conv.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    x = torch.randn(2, 3, 8, 8)
    try:
        bf16 = explain(model, x, method, target=1, amp="bf16").maps
        in_bf16, seen[:] = list(seen), []
        fp32 = explain(model, x, method, target=1).maps
    finally:
        handle.remove()
    assert set(in_bf16) == {torch.bfloat16} and seen == [torch.float32]
    assert len(in_bf16) == (2 if method == "guided_gradcam" else 1)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.1, atol=0.05 * float(fp32.abs().max()))


def test_traits() -> None:
    for name in ("guided_backprop", "deconvnet"):
        cls = get_method(name)
        assert (cls.uses_layer, cls.pixel_level, cls.needs_gradients) == (False, True, True)
        assert cls.options == {"amp": "auto"}
    cls = get_method("guided_gradcam")
    assert (cls.uses_layer, cls.pixel_level, cls.needs_gradients) == (True, True, True)
    assert cls.options == {"amp": "auto", "reshape": None}
