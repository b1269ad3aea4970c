"""Gradient attribution methods against captum, closed forms and their own contracts."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import Tensor, nn

import xai_serve
from tests._peers import require
from xai_serve import InvalidInput
from xai_serve.explainers.base import explain
from xai_serve.explainers.gradients import IG_RULES, quadrature

TARGETS = torch.tensor([3, 7])


def rel_err(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| relative to max |ref|."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def captum():
    """captum.attr, the peer library (the tests that compare against it skip without it)."""
    return require("captum.attr")


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def linear() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)).eval()


@pytest.fixture(scope="module")
def small_images() -> Tensor:
    return torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def smooth_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(3)
    return (
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.Tanh(),
            nn.Conv2d(6, 6, 3, stride=2),
            nn.Softplus(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 4),
        )
        .to(dtype)
        .eval()
    )


def x(images: Tensor) -> Tensor:
    """A copy of the images for captum, which wants inputs that require grad."""
    return images.clone().requires_grad_(True)


def count_forwards(model: nn.Module) -> list[int]:
    """Batch sizes of every forward call of ``model`` from now on."""
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    return calls


def linear_weight_map(model: nn.Module, targets: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``W[target]`` of the linear model, reshaped to ``[B, C, H, W]``."""
    return model[1].weight.detach()[targets].view(-1, *shape[1:])


# --------------------------------------------------------------------------- against captum


def test_saliency_matches_captum(captum, resnet, images):
    ours = explain(resnet, images, "saliency", target=TARGETS, batch_size=1)
    ref = captum.Saliency(resnet).attribute(x(images), target=TARGETS, abs=True).sum(1)
    assert ours.maps.dtype == torch.float32 and ours.maps.shape == (2, 64, 64)
    assert rel_err(ours.maps, ref) < 1e-5  # measured ~6e-7
    assert torch.equal(ours.targets, TARGETS)
    torch.testing.assert_close(ours.logits, resnet(images).detach(), rtol=1e-5, atol=1e-5)
    signed = explain(resnet, images, "saliency", target=TARGETS, abs=False).maps
    ref_signed = captum.Saliency(resnet).attribute(x(images), target=TARGETS, abs=False)
    assert rel_err(signed, ref_signed.sum(1)) < 1e-5


def test_input_x_gradient_matches_captum(captum, resnet, images):
    ours = explain(resnet, images, "input_x_gradient", target=TARGETS)
    ref = captum.InputXGradient(resnet).attribute(x(images), target=TARGETS).sum(1)
    assert rel_err(ours.maps, ref) < 1e-5


@pytest.mark.parametrize("rule", IG_RULES)
def test_integrated_gradients_match_captum(captum, resnet, images, rule):
    steps = 8
    baseline = torch.tensor([0.1, -0.2, 0.3]).view(1, 3, 1, 1)  # broadcast to the images
    # batch_size=5: chunks that straddle the two images' paths
    ours = xai_serve.explain(
        resnet, images, "integrated_gradients", target=TARGETS, baseline=baseline,
        steps=steps, rule=rule, batch_size=5,
    )  # fmt: skip
    ref = captum.IntegratedGradients(resnet).attribute(
        x(images), baseline.expand_as(images), target=TARGETS, n_steps=steps, method=rule
    )
    ref = ref.sum(1)
    if rule == "riemann_trapezoid":
        # captum's trapezoid step is 1/steps (weights sum to (steps-1)/steps); ours 1/(steps-1)
        ref = ref * steps / (steps - 1)
    assert rel_err(ours.maps, ref) < 1e-5  # measured 1.6e-7 .. 2.3e-7
    assert ours.method == "integrated_gradients" and ours.samples == steps
    torch.testing.assert_close(ours.logits, resnet(images).detach(), rtol=1e-5, atol=1e-5)


def test_gauss_legendre_table_matches_numpy():
    np = require("numpy")
    for n in (1, 2, 7, 64):
        alphas, weights = quadrature("gausslegendre", n)
        nodes, w = np.polynomial.legendre.leggauss(n)
        assert np.abs(alphas.numpy() - 0.5 * (nodes + 1)).max() < 1e-13
        assert np.abs(weights.numpy() - 0.5 * w).max() < 1e-13
    for rule in IG_RULES:
        assert math.isclose(float(quadrature(rule, 5)[1].sum()), 1.0, rel_tol=1e-12)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("rule", "steps"), [(r, s) for r in IG_RULES for s in (2, 5)])
def test_integrated_gradients_of_a_linear_model_is_x_times_w(linear, small_images, rule, steps):
    targets = torch.tensor([4, 1])
    out = explain(linear, small_images, "integrated_gradients", target=targets, steps=steps,
                  rule=rule)  # fmt: skip
    w = linear_weight_map(linear, targets, small_images.shape)
    torch.testing.assert_close(out.maps, (small_images * w).sum(1), rtol=1e-6, atol=1e-6)


def test_saliency_of_a_linear_model_is_abs_w(linear, small_images):
    targets = torch.tensor([0, 2])
    w = linear_weight_map(linear, targets, small_images.shape)
    out = explain(linear, small_images, "saliency", target=targets)
    torch.testing.assert_close(out.maps, w.abs().sum(1), rtol=1e-6, atol=1e-7)
    out = explain(linear, small_images, "input_x_gradient", target=targets)
    torch.testing.assert_close(out.maps, (small_images * w).sum(1), rtol=1e-6, atol=1e-7)
    # SmoothGrad over saliency: the gradient of a linear model is the same at every noisy copy
    out = explain(linear, small_images, "smoothgrad", target=targets, noise=0.5, seed=0)
    torch.testing.assert_close(out.maps, w.abs().sum(1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("baseline", [None, 0.25, "tensor"])
def test_integrated_gradients_completeness(baseline):
    model = smooth_cnn(torch.float64)
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    if baseline == "tensor":
        baseline = torch.rand(3, 1, 1, dtype=torch.float64)
    out = explain(model, x, "integrated_gradients", baseline=baseline, steps=64, batch_size=48)
    x0 = torch.zeros(()) if baseline is None else torch.as_tensor(baseline)
    with torch.no_grad():
        f = model(x).gather(1, out.targets[:, None])[:, 0]
        f0 = model(x0.to(x).expand_as(x)).gather(1, out.targets[:, None])[:, 0]
    torch.testing.assert_close(out.maps.double().sum((1, 2)), f - f0, rtol=1e-5, atol=1e-6)


def test_number_baseline_equals_constant_tensor_baseline(resnet, images):
    a = explain(resnet, images, "integrated_gradients", baseline=0.5, steps=4).maps
    b = explain(resnet, images, "integrated_gradients", baseline=torch.full((1,), 0.5),
                steps=4).maps  # fmt: skip
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- SmoothGrad


@pytest.mark.parametrize("base", ["saliency", "input_x_gradient"])
def test_smoothgrad_without_noise_is_its_base_method(resnet, images, base):
    out = explain(resnet, images, "smoothgrad", target=TARGETS, noise=0.0, samples=3,
                  base=base, batch_size=4, seed=0)  # fmt: skip
    ref = explain(resnet, images, base, target=TARGETS)
    assert rel_err(out.maps, ref.maps) < 1e-5
    assert out.samples == 3
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_smoothgrad_is_seeded(resnet, images):
    def run(seed: int) -> Tensor:
        return explain(resnet, images, "smoothgrad", samples=4, batch_size=3, seed=seed).maps

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert rel_err(a, c) > 1e-2


def test_smoothgrad_noise_std_is_a_fraction_of_each_image_range(linear):
    # Two images with ranges 1 and 4: the noise around each must scale with its own range.
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    x[1] *= 4.0
    x[:, :, 0, 0] = torch.tensor([[0.0], [0.0]])
    x[:, :, 0, 1] = torch.tensor([[1.0], [4.0]])
    inputs: list[Tensor] = []
    handle = linear.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    try:
        explain(linear, x, "smoothgrad", samples=16, noise=0.2, seed=0, batch_size=16)
    finally:
        handle.remove()
    noisy = torch.cat(inputs[1:])  # the first forward is the plain one (targets, logits)
    assert noisy.shape == (32, 3, 8, 8)
    for b, span in ((0, 1.0), (1, 4.0)):
        std = float((noisy[16 * b : 16 * (b + 1)] - x[b]).std())  # 3072 draws: ~1.3% error
        assert abs(std / (0.2 * span) - 1) < 0.06, (b, std)


@pytest.mark.parametrize(
    ("base", "peer"), [("saliency", "Saliency"), ("input_x_gradient", "InputXGradient")]
)
def test_smoothgrad_is_the_peer_averaged_over_the_noisy_inputs_it_evaluated(captum, base, peer):
    """On a non-linear model, the map is captum's base attribution averaged over exactly the
    noisy copies the method ran through the model (recorded by a forward hook; image-major,
    ``samples`` per image), channel-summed: the averaging, the noise and the base taken at
    each noisy copy, checked independently of the explainer's own arithmetic."""
    model = smooth_cnn()
    x = torch.rand(2, 3, 12, 12, generator=torch.Generator().manual_seed(6)) * 2 - 1
    targets, samples = torch.tensor([1, 3]), 5
    inputs: list[Tensor] = []
    handle = model.register_forward_hook(lambda m, args, out: inputs.append(args[0].detach()))
    try:
        # batch_size=3: chunks that straddle the two images' samples
        out = explain(model, x, "smoothgrad", target=targets, samples=samples, noise=0.3,
                      base=base, seed=[4, 9], batch_size=3)  # fmt: skip
    finally:
        handle.remove()
    assert [t.shape[0] for t in inputs] == [2, 3, 3, 3, 1]  # the plain forward, then 10 noisy
    noisy = torch.cat(inputs[1:])
    assert not torch.equal(noisy[:samples], x[0].expand(samples, -1, -1, -1))  # noise added
    kw = {"abs": True} if base == "saliency" else {}
    ref = getattr(captum, peer)(model).attribute(
        noisy.clone().requires_grad_(True), target=targets.repeat_interleave(samples), **kw
    )
    ref = ref.view(2, samples, 3, 12, 12).mean(1).sum(1)
    assert rel_err(out.maps, ref) < 1e-6  # measured 1.4e-7 (saliency), 1.0e-7
    # and the average is not that of the clean images' attribution: the noise matters here
    clean = getattr(captum, peer)(model).attribute(
        x.clone().requires_grad_(True), target=targets, **kw
    )
    assert rel_err(out.maps, clean.sum(1)) > 1e-2  # measured 0.12, 0.59


# --------------------------------------------------------------------------- batching


def test_integrated_gradients_run_all_steps_in_chunks(linear, small_images):
    calls = count_forwards(linear)
    explain(linear, small_images, "integrated_gradients", steps=32, batch_size=16)
    # one plain forward for logits/targets, then 2 * 32 path points in 4 chunks of 16
    assert calls == [2, 16, 16, 16, 16]
    calls.clear()
    explain(linear, small_images, "integrated_gradients", steps=5, batch_size=4)
    assert calls == [2, 4, 4, 2]
    calls.clear()
    explain(linear, small_images, "smoothgrad", samples=16, batch_size=8)
    assert calls == [2, 8, 8, 8, 8]
    calls.clear()
    explain(linear, torch.rand(5, 3, 8, 8), "saliency", batch_size=2)
    assert calls == [2, 2, 1]  # saliency takes its logits from its gradient forwards


def test_default_batch_size_is_32(linear, small_images):
    calls = count_forwards(linear)
    explain(linear, small_images, "integrated_gradients", steps=40)
    assert calls == [2, 32, 32, 16]


# --------------------------------------------------------------------------- amp


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("saliency", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"steps": 8}),
        ("smoothgrad", {"samples": 4, "seed": 0}),
    ],
)
def test_bf16_autocast_stays_close_to_fp32(resnet, images, method, opts):
    ref = explain(resnet, images, method, target=TARGETS, **opts).maps
    out = explain(resnet, images, method, target=TARGETS, amp="bf16", **opts)
    assert out.maps.dtype == torch.float32
    # Measured on this randomly initialised resnet18 (4 weight seeds): relative L2 error
    # 0.06-0.21 (input x gradient the largest, SmoothGrad the smallest), cosine similarity
    # 0.978-0.998. bf16 keeps 8 mantissa bits through 18 layers of forward and backward.
    rel_l2 = float((out.maps - ref).norm() / ref.norm())
    cosine = float(torch.nn.functional.cosine_similarity(out.maps.flatten(), ref.flatten(), 0))
    assert rel_l2 < 0.35, rel_l2
    assert cosine > 0.95, cosine


# --------------------------------------------------------------------------- contracts


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("integrated_gradients", {"steps": 0}, "`steps` must be >= 1"),
        ("integrated_gradients", {"steps": 2.5}, "`steps` must be an integer"),
        ("integrated_gradients", {"steps": True}, "`steps` must be an integer"),
        ("integrated_gradients", {"steps": 1, "rule": "riemann_trapezoid"}, "`steps` must be >= 2"),
        ("integrated_gradients", {"rule": "simpson"}, "`rule` must be one of"),
        ("integrated_gradients", {"baseline": torch.zeros(3, 5, 5)}, "`baseline` of shape"),
        ("integrated_gradients", {"baseline": torch.zeros(3, 3, 8, 8)}, "`baseline` of shape"),
        ("integrated_gradients", {"baseline": "black"}, "`baseline` must be"),
        ("integrated_gradients", {"baseline": torch.zeros(3, dtype=torch.long)}, "float"),
        ("integrated_gradients", {"baseline": math.nan}, "`baseline` must be finite"),
        ("integrated_gradients", {"amp": "fp8"}, "`amp` must be"),
        ("smoothgrad", {"samples": 0}, "`samples` must be >= 1"),
        ("smoothgrad", {"noise": -0.1}, "`noise` must be a finite number >= 0"),
        ("smoothgrad", {"noise": "high"}, "`noise` must be a number"),
        ("smoothgrad", {"base": "gradcam"}, "`base` must be one of"),
        ("smoothgrad", {"baseline": 0.0}, "does not take a `baseline`"),
        ("saliency", {"abs": "yes"}, "`abs` must be True or False"),
        ("saliency", {"baseline": 0.0}, "does not take a `baseline`"),
        ("input_x_gradient", {"steps": 4}, "has no option"),
        ("saliency", {"target": 5}, r"must lie in \[0, 5\)"),
        ("integrated_gradients", {"target": torch.tensor([0, 9])}, r"must lie in \[0, 5\)"),
        ("smoothgrad", {"target": 7}, r"must lie in \[0, 5\)"),
    ],
)
def test_bad_options_are_invalid_input(linear, small_images, method, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        explain(linear, small_images, method, **kwargs)


def test_the_integration_rule_option_is_called_rule(linear, small_images):
    # `method` is explain()'s own argument, so IG cannot take captum's `method=` name
    with pytest.raises(TypeError, match="multiple values for argument 'method'"):
        explain(linear, small_images, "integrated_gradients", method="gausslegendre")
    out = explain(linear, small_images, "integrated_gradients", rule="riemann_middle", steps=3)
    assert out.samples == 3


def test_a_model_without_logits_is_invalid_input(small_images):
    with pytest.raises(InvalidInput, match=r"Tensor\[N, classes\]"):
        explain(nn.Conv2d(3, 2, 1), small_images, "saliency")


def test_no_parameter_gradients_and_mode_untouched(resnet, images):
    with torch.no_grad():  # the methods turn gradients on themselves where they need them
        for method, opts in (
            ("saliency", {}),
            ("input_x_gradient", {}),
            ("integrated_gradients", {"steps": 2}),
            ("smoothgrad", {"samples": 2}),
        ):
            out = explain(resnet, images, method, **opts)
            assert not out.maps.requires_grad and not out.logits.requires_grad
    assert all(p.grad is None for p in resnet.parameters())
    assert not resnet.training


def test_top1_targets_by_default(resnet, images):
    top1 = resnet(images).argmax(1)
    for method, opts in (("saliency", {}), ("integrated_gradients", {"steps": 2})):
        out = explain(resnet, images, method, **opts)
        assert torch.equal(out.targets, top1)
        ref = explain(resnet, images, method, target=top1, **opts)
        torch.testing.assert_close(out.maps, ref.maps, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(resnet, images):
    model = torchvision.models.resnet18(weights=None).eval()
    model.load_state_dict(resnet.state_dict())
    model = model.cuda()
    for method, opts in (("saliency", {}), ("integrated_gradients", {"steps": 8})):
        ref = explain(resnet, images, method, target=TARGETS, **opts).maps
        out = explain(model, images, method, target=TARGETS, **opts)
        assert out.maps.device.type == "cuda" and out.targets.device.type == "cuda"
        # TF32 convolutions may be on: compare loosely
        assert rel_err(out.maps.cpu(), ref) < 1e-2
