"""DeepLIFT, DeepSHAP and GradientSHAP against captum, a layer-by-layer oracle, summation to
delta and their own contracts.

Where captum is the reference. captum 0.9's DeepLIFT hooks go wrong in three situations that
these tests avoid when they compare with it (and check with the oracle and summation to delta
instead):

* a module called twice (torchvision's ResNet ``BasicBlock`` calls ``self.relu`` twice):
  captum raises; the tests hand captum a ResNet-18 whose blocks use two ReLU modules
  (:func:`captum_resnet18`), the same function, and run ours on torchvision's own;
* two rescaled modules back to back (e.g. ``ReLU`` then ``Sigmoid``, or ``MaxPool2d`` then
  ``Sigmoid``): captum's hook on the first module's output reads the gradient before the
  second module's rule has rewritten it, and captum misses summation to delta (its
  convergence delta was 1.4e-3 on a Conv-ReLU-Sigmoid-Linear net, measured);
* ``MaxPool2d`` where input and reference are equal: captum's fallback takes
  ``grad_input[0]``, the plain gradient of the batch's *first row*, for every row.

On ResNet-18 with the zero baseline captum's result sums to delta (to ~1e-7) and is ours; with
a non-zero baseline its convergence delta was 2e-3 and 1e-2 for score differences of ~0.3 (the
stem's ReLU and max pool are back to back), while ours sums to delta. So captum is compared
on :func:`separated_net` (ReLU, MaxPool2d and Sigmoid separated by convolutions) with any
baseline and on ResNet-18 with the zero baseline; the oracle (:func:`deeplift_oracle`, an
explicit multiplier chain over an ``nn.Sequential``) covers the back-to-back modules;
summation to delta covers ResNet-18 with any reference.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from tests._peers import require
from xai_serve import InvalidInput
from xai_serve.explainers.base import explain, get_method
from xai_serve.explainers.deeplift import RESCALED_MODULES, reference_draws, rescale_rule
from xai_serve.explainers.perturbation import gaussian_blur

TARGETS = torch.tensor([3, 1])
RESNET_TARGETS = torch.tensor([3, 7])


def rel_err(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| relative to max |ref|."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out, ref = out.detach(), ref.detach()
    return float((out - ref).abs().max() / ref.abs().max())


@pytest.fixture(scope="module")
def captum():
    return require("captum.attr")


def separated_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 6, 1),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(6 * 7 * 7, 5),
    ).eval()


def adjacent_net(act: type[nn.Module] = nn.Sigmoid) -> nn.Sequential:
    """Rescaled modules back to back, an overlapping max pool (shared argmaxes), in-place."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        act(),
        nn.Conv2d(4, 6, 3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6 * 6 * 6, 5),
    ).eval()


@pytest.fixture(scope="module")
def images() -> Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture(scope="module")
def resnet_images() -> Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _block_forward(self: BasicBlock, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += identity
    return self.relu2(out)


def captum_resnet18(resnet: nn.Module) -> nn.Module:
    """The same function as ``resnet``, each block's second ReLU a module of its own."""
    model = torchvision.models.resnet18(weights=None).eval()
    model.load_state_dict(resnet.state_dict())
    for block in model.modules():
        if isinstance(block, BasicBlock):
            block.relu2 = nn.ReLU(inplace=True)
            block.forward = _block_forward.__get__(block)  # type: ignore[method-assign]
    return model


def leaf(x: Tensor) -> Tensor:
    return x.clone().requires_grad_(True)


def scores(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x).gather(1, targets[:, None]).squeeze(1)


def deeplift_oracle(model: nn.Sequential, x: Tensor, r: Tensor, targets: Tensor) -> Tensor:
    """DeepLIFT by an explicit chain of multipliers, layer by layer (per-channel attr)."""
    xs, rs = [x], [r]
    with torch.no_grad():
        for layer in model:
            xs.append(layer(xs[-1].clone()))
            rs.append(layer(rs[-1].clone()))
    g = torch.zeros_like(xs[-1]).scatter_(1, targets[:, None], 1.0)

    def vjp(fn: Callable[[Tensor], Tensor], at: Tensor, v: Tensor) -> Tensor:
        return torch.autograd.functional.vjp(fn, at.clone(), v)[1]

    for i in reversed(range(len(model))):
        layer, a, ar, o, orf = model[i], xs[i], rs[i], xs[i + 1], rs[i + 1]
        d = a - ar
        small = d.abs() < 1e-10
        safe = torch.where(small, torch.ones_like(d), d)
        if isinstance(layer, nn.MaxPool2d):
            # the window's change o - o_ref: (max(o, o_ref) - o_ref) at the input's argmax,
            # (o - max(o, o_ref)) at the reference's
            top = torch.maximum(o, orf)
            credit = vjp(layer, a, g * (top - orf)) + vjp(layer, ar, g * (o - top))
            g = torch.where(small, vjp(layer, a, g), credit / safe)
        elif type(layer) in RESCALED_MODULES:
            own = vjp(lambda t, f=layer: f(t.clone()), a, g)
            g = torch.where(small, own, g * (o - orf) / safe)
        else:  # affine: its vjp is the linear part's
            g = vjp(layer, a, g)
    return (x - r) * g


# --------------------------------------------------------------------------- against captum


@pytest.mark.parametrize(
    "baseline", [None, 0.25, torch.tensor([0.1, -0.2, 0.3]).view(3, 1, 1)], ids=str
)
def test_deeplift_matches_captum(captum, images, baseline):
    model = separated_net()
    ours = explain(model, images, "deeplift", target=TARGETS, baseline=baseline)
    ref_base = 0.0 if baseline is None else baseline
    if isinstance(ref_base, Tensor):
        ref_base = ref_base.expand(1, *images.shape[1:]).contiguous()
    ref = captum.DeepLift(model).attribute(leaf(images), ref_base, target=TARGETS)
    assert ours.maps.shape == (2, 16, 16) and ours.maps.dtype == torch.float32
    assert rel_err(ours.maps, ref.sum(1)) < 1e-5  # measured ~2e-7
    assert torch.equal(ours.targets, TARGETS)
    torch.testing.assert_close(ours.logits, model(images).detach(), rtol=1e-5, atol=1e-6)


def test_deeplift_matches_captum_on_resnet18(captum, resnet, resnet_images):
    # ours on torchvision's own ResNet-18 (a ReLU module called twice per block, in place)
    ours = explain(resnet, resnet_images, "deeplift", target=RESNET_TARGETS)
    peer = captum_resnet18(resnet)
    ref = captum.DeepLift(peer).attribute(leaf(resnet_images), target=RESNET_TARGETS).sum(1)
    assert rel_err(ours.maps, ref) < 1e-5  # measured ~6e-7


def test_deepshap_matches_captum(captum, images):
    model = separated_net()
    refs = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    # batch_size=3 inputs: one pair per forward, pairs of both images in turn
    for batch_size in (None, 3):
        ours = explain(
            model, images, "deepshap", target=TARGETS, baselines=refs, batch_size=batch_size
        )
        ref = captum.DeepLiftShap(model).attribute(leaf(images), refs, target=TARGETS)
        assert rel_err(ours.maps, ref.sum(1)) < 1e-5  # measured ~1e-7
        assert ours.samples == 4
        # the logits: of each image's first pair, from the pairs' own forward
        torch.testing.assert_close(ours.logits, model(images).detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("net", ["separated", "resnet18"])
def test_gradientshap_matches_captum_with_the_same_draws(captum, monkeypatch, net, request):
    if net == "separated":
        model, x, targets = separated_net(), request.getfixturevalue("images"), TARGETS
    else:
        model = request.getfixturevalue("resnet")
        x, targets = request.getfixturevalue("resnet_images"), RESNET_TARGETS
    count, samples, seeds = 3, 5, [11, -12]
    refs = torch.randn(count, *x.shape[1:], generator=torch.Generator().manual_seed(6))
    ours = explain(
        model, x, "gradientshap", target=targets, baselines=refs, samples=samples, seed=seeds
    )
    draws = [reference_draws(s, count, samples) for s in seeds]
    which = torch.cat([d[1] for d in draws]).numpy()
    alphas = torch.cat([d[2] for d in draws]).numpy()
    # captum draws the reference of input row b * samples + s with np.random.choice and its
    # path point with np.random.uniform: hand it ours
    monkeypatch.setattr(np.random, "choice", lambda n, size: which)
    monkeypatch.setattr(np.random, "uniform", lambda low, high, size: alphas)
    ref = captum.GradientShap(model).attribute(
        leaf(x), refs, n_samples=samples, stdevs=0.0, target=targets
    )
    assert rel_err(ours.maps, ref.sum(1)) < 1e-5  # measured <= 1e-7
    assert ours.samples == samples and ours.seeds.tolist() == seeds
    torch.testing.assert_close(ours.logits, model(x).detach(), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.SiLU, nn.GELU])
def test_deeplift_is_the_multiplier_chain(images, act):
    model = adjacent_net(act)
    base = torch.tensor([0.2, -0.1, 0.05]).view(3, 1, 1)
    ours = explain(model, images, "deeplift", target=TARGETS, baseline=base)
    ref = deeplift_oracle(model, images, base.expand_as(images), TARGETS)
    assert rel_err(ours.maps, ref.sum(1)) < 1e-5  # measured ~1e-7


# --------------------------------------------------------------------------- summation to delta


def assert_sums_to_delta(maps: Tensor, delta: Tensor) -> None:
    """sum(attr) = f(x) - f(r) to 1e-3 relative (measured ~1e-6)."""
    torch.testing.assert_close(maps.sum(dim=(1, 2)), delta, rtol=1e-3, atol=0)


@pytest.mark.parametrize("model_name", ["resnet18", "adjacent", "adjacent_silu"])
def test_deeplift_sums_to_delta(model_name, resnet, resnet_images, images):
    if model_name == "resnet18":
        model, x, t = resnet, resnet_images, RESNET_TARGETS
    else:
        model = adjacent_net(nn.SiLU if model_name == "adjacent_silu" else nn.Sigmoid)
        x, t = images, TARGETS
    base = torch.tensor([0.3, -0.5, 0.2]).view(3, 1, 1)
    out = explain(model, x, "deeplift", target=t, baseline=base)
    assert_sums_to_delta(out.maps, scores(model, x, t) - scores(model, base.expand_as(x), t))


def test_deepshap_sums_to_delta_of_the_mean_reference(resnet, resnet_images):
    refs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.5
    out = explain(resnet, resnet_images, "deepshap", target=RESNET_TARGETS, baselines=refs)
    f_refs = torch.stack([scores(resnet, r.expand_as(resnet_images), RESNET_TARGETS) for r in refs])
    assert_sums_to_delta(out.maps, scores(resnet, resnet_images, RESNET_TARGETS) - f_refs.mean(0))
    # and it is the mean of DeepLIFT over the references
    each = [
        explain(resnet, resnet_images, "deeplift", target=RESNET_TARGETS, baseline=r).maps
        for r in refs
    ]
    assert rel_err(out.maps, torch.stack(each).mean(0)) < 1e-5


# --------------------------------------------------------------------------- references


def test_drawn_references_follow_the_documented_draws(images):
    model = separated_net()
    x, seed, count = images[:1], 7, 3
    opts = {"baseline": "blur", "blur_sigma": 2.0, "noise": 0.2}
    out = explain(model, x, "deepshap", target=TARGETS[:1], baselines=count, seed=seed, **opts)
    sub_seeds, _, _ = reference_draws(seed, count, 0)
    sigma = 0.2 * float(x.max() - x.min())
    refs = []
    for s in sub_seeds:
        noise = torch.empty_like(x[0]).normal_(generator=torch.Generator().manual_seed(s))
        refs.append(gaussian_blur(x, 2.0)[0] + sigma * noise)
    given = explain(model, x, "deepshap", target=TARGETS[:1], baselines=torch.stack(refs))
    torch.testing.assert_close(out.maps, given.maps, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base", [0.25, "blur"])
def test_without_noise_deepshap_is_deeplift_on_the_base(images, base):
    model = separated_net()
    out = explain(model, images, "deepshap", target=TARGETS, baseline=base, noise=0.0)
    x0 = gaussian_blur(images, 5.0) if base == "blur" else base
    ref = explain(model, images, "deeplift", target=TARGETS, baseline=x0)
    torch.testing.assert_close(out.maps, ref.maps, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["deepshap", "gradientshap"])
def test_seeded_per_image_not_per_batch(images, method):
    model = separated_net()
    opts = {"baselines": 3} if method == "deepshap" else {"baselines": 3, "samples": 4}
    both = explain(model, images, method, seed=[5, 6], **opts)
    again = explain(model, images, method, seed=[5, 6], **opts)
    assert torch.equal(both.maps, again.maps)
    alone = explain(model, images[1:], method, seed=6, **opts)
    torch.testing.assert_close(both.maps[1:], alone.maps, rtol=1e-5, atol=1e-7)
    other = explain(model, images, method, seed=[5, 7], **opts)
    assert not torch.allclose(other.maps[1], both.maps[1])


def test_same_seed_same_references_for_deepshap_and_gradientshap(images):
    """GradientSHAP with many samples is near DeepSHAP's integrated-gradients cousin: both
    use the same drawn references, so fixing the references as a tensor changes neither."""
    model = separated_net()
    seed, count = 9, 2
    sub_seeds, _, _ = reference_draws(seed, count, 0)
    x = images[:1]
    sigma = 0.15 * float(x.max() - x.min())
    refs = torch.stack(
        [torch.empty_like(x[0]).normal_(generator=torch.Generator().manual_seed(s)) * sigma
         for s in sub_seeds]
    )  # fmt: skip
    drawn = explain(model, x, "gradientshap", baselines=count, samples=6, seed=seed)
    given = explain(model, x, "gradientshap", baselines=refs, samples=6, seed=seed)
    torch.testing.assert_close(drawn.maps, given.maps, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------- behaviour


def test_functional_nonlinearities_get_plain_gradients_and_a_warning(images):
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(2)
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4 * 14 * 14, 5)

        def forward(self, x: Tensor) -> Tensor:
            return self.fc(torch.relu(self.conv(x)).flatten(1))

    model = Functional().eval()
    with pytest.warns(RuntimeWarning, match="do not sum to f\\(x\\) - f\\(baseline\\)"):
        out = explain(model, images, "deeplift", target=TARGETS)
    # captum's behaviour: nothing rescaled, so the plain gradient at x times (x - 0)
    ref = explain(model, images, "input_x_gradient", target=TARGETS)
    torch.testing.assert_close(out.maps, ref.maps, rtol=1e-5, atol=1e-7)


def test_no_warning_when_every_nonlinearity_is_rescaled(images, recwarn):
    explain(separated_net(), images, "deeplift", baseline=0.3)
    explain(adjacent_net(), images, "deepshap", baselines=2, seed=0)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def hook_state(model: nn.Module) -> list[tuple[int, int, int, bool, bool]]:
    return [
        (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
         m.training, any(k in m.__dict__ for k in ("input", "output", "input_ref")))
        for m in model.modules()
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["deeplift", "deepshap", "gradientshap"])
def test_model_unchanged_also_after_an_error(resnet, resnet_images, method):
    before = hook_state(resnet)
    grads = [p.requires_grad for p in resnet.parameters()]
    with torch.no_grad():
        plain = resnet(resnet_images)
    opts = {} if method == "deeplift" else {"baselines": 2}
    out = explain(resnet, resnet_images, method, **opts)
    assert not out.maps.requires_grad
    with pytest.raises(InvalidInput, match="class indices"):
        explain(resnet, resnet_images, method, target=torch.tensor([3, 5000]), **opts)

    class Boom(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            raise RuntimeError("boom")

    resnet.layer2.add_module("boom", Boom())  # runs after layer1's ReLUs
    original = resnet.layer2.forward
    resnet.layer2.forward = lambda x: resnet.layer2.boom(original(x))  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="boom"):
            explain(resnet, resnet_images, method, **opts)
    finally:
        del resnet.layer2.forward
        del resnet.layer2.boom
    assert hook_state(resnet) == before
    assert [p.requires_grad for p in resnet.parameters()] == grads
    assert all(p.grad is None for p in resnet.parameters())
    with torch.no_grad():
        assert torch.equal(resnet(resnet_images), plain)


def test_rules_act_only_on_the_installing_thread(images):
    model = adjacent_net()
    z = torch.cat([images, torch.zeros_like(images)]).requires_grad_(True)
    plain = torch.autograd.grad(model(z)[:, 0].sum(), z)[0]
    seen: list[Tensor] = []

    def other() -> None:
        zz = z.detach().clone().requires_grad_(True)
        seen.append(torch.autograd.grad(model(zz)[:, 0].sum(), zz)[0])

    with rescale_rule(model):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        rescaled = torch.autograd.grad(model(z)[:, 0].sum(), z)[0]
    assert torch.equal(seen[0], plain)
    assert not torch.allclose(rescaled, plain)


def test_one_forward_of_image_and_reference_pairs(images):
    model = separated_net()
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        explain(model, images, "deeplift")
        assert calls == [4]  # 2 images + 2 references, logits and top-1 from that pass
        calls.clear()
        explain(model, images, "deepshap", baselines=3, seed=0)
        assert calls == [12]  # 2 x 3 pairs in one pass, the logits from it too
        calls.clear()
        explain(model, images, "gradientshap", baselines=3, samples=5, seed=0)
        assert calls == [2, 10]
        calls.clear()
        explain(model, images, "deepshap", baselines=3, seed=0, batch_size=4)
        assert calls == [4, 4, 4]  # two pairs per forward
    finally:
        handle.remove()


def test_traits_and_options():
    for name in ("deeplift", "deepshap", "gradientshap"):
        cls = get_method(name)
        assert cls.takes_baseline and cls.pixel_level and cls.needs_gradients
        assert not cls.uses_layer and not cls.produces_segments
    assert not get_method("deeplift").randomised
    assert not get_method("deeplift").takes_blur_baseline
    for name in ("deepshap", "gradientshap"):
        cls = get_method(name)
        assert cls.randomised and cls.takes_blur_baseline
        assert cls.options["baselines"] == 8 and cls.options["noise"] == 0.15
    assert get_method("gradientshap").options["samples"] == 16


def test_reference_tensor_of_another_dtype_and_contiguity(images):
    model = separated_net()
    refs = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    ref = explain(model, images, "deepshap", baselines=refs, target=TARGETS).maps
    other = explain(
        model, images, "deepshap", baselines=refs.double().transpose(2, 3).contiguous()
        .transpose(2, 3), target=TARGETS,
    ).maps  # fmt: skip
    torch.testing.assert_close(other, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("method", "kwargs", "match"),
    [
        ("deepshap", {"baselines": 0}, "baselines"),
        ("deepshap", {"baselines": -2}, "baselines"),
        ("deepshap", {"baselines": True}, "baselines"),
        ("gradientshap", {"baselines": 2.5}, "baselines"),
        ("deepshap", {"baselines": torch.zeros(0, 3, 16, 16)}, "baselines"),
        ("deepshap", {"baselines": torch.zeros(2, 3, 8, 8)}, "baselines"),
        ("deepshap", {"baselines": torch.zeros(3, 16, 16)}, "baselines"),
        ("deepshap", {"baselines": torch.zeros(2, 3, 16, 16, dtype=torch.int64)}, "baselines"),
        ("deepshap", {"baselines": torch.full((2, 3, 16, 16), float("nan"))}, "baselines"),
        ("deepshap", {"baselines": torch.zeros(2, 3, 16, 16), "baseline": 0.5}, "not both"),
        ("deepshap", {"baseline": "nope"}, "baseline"),
        ("gradientshap", {"baseline": torch.zeros(3, 1, 1)}, "baseline"),
        ("deepshap", {"noise": -1.0}, "noise"),
        ("gradientshap", {"noise": "x"}, "noise"),
        ("deepshap", {"baseline": "blur", "blur_sigma": 0.0}, "blur_sigma"),
        ("gradientshap", {"samples": 0}, "samples"),
        ("deeplift", {"baseline": "blur"}, "baseline"),
        ("deeplift", {"baseline": torch.zeros(5, 3, 16, 16)}, "baseline"),
        ("deeplift", {"baselines": 3}, "no option"),
        ("deeplift", {"segments": torch.zeros(2, 16, 16, dtype=torch.int64)}, "segments"),
        ("deepshap", {"amp": "fp64"}, "amp"),
    ],
)
def test_bad_values_are_invalid_input(images, method, kwargs, match):
    with pytest.raises(InvalidInput, match=match):
        explain(separated_net(), images, method, seed=0, **kwargs)


@pytest.mark.parametrize(
    ("method", "opts"),
    [
        ("deeplift", {"baseline": 0.2}),
        ("deepshap", {"baselines": 3, "seed": 1}),
        ("gradientshap", {"baselines": 3, "samples": 4, "seed": 1}),
    ],
)
def test_bf16_autocast_stays_close_to_fp32(resnet, resnet_images, method, opts):
    ref = explain(resnet, resnet_images, method, target=RESNET_TARGETS, **opts).maps
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no completeness check (nor warning) under amp
        out = explain(resnet, resnet_images, method, target=RESNET_TARGETS, amp="bf16", **opts)
    assert out.maps.dtype == torch.float32
    # measured (this resnet18, one weight seed): relative L2 error 0.09-0.17, cosine 0.986-0.996
    rel_l2 = float((out.maps - ref).norm() / ref.norm())
    cosine = float(torch.nn.functional.cosine_similarity(out.maps.flatten(), ref.flatten(), 0))
    assert rel_l2 < 0.35, rel_l2
    assert cosine > 0.95, cosine


def test_top1_targets_by_default(resnet, resnet_images):
    top1 = resnet(resnet_images).argmax(1)
    for method, opts in (("deeplift", {}), ("deepshap", {"baselines": 2, "seed": 1})):
        out = explain(resnet, resnet_images, method, **opts)
        assert torch.equal(out.targets, top1)
        ref = explain(resnet, resnet_images, method, target=top1, **opts)
        torch.testing.assert_close(out.maps, ref.maps, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(resnet, resnet_images):
    model = torchvision.models.resnet18(weights=None).eval()
    model.load_state_dict(resnet.state_dict())
    model = model.cuda()
    refs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3)) * 0.5
    for method, opts in (
        ("deeplift", {"baseline": 0.1}),
        ("deepshap", {"baselines": refs}),
        ("gradientshap", {"baselines": refs, "samples": 4, "seed": [1, 2]}),
    ):
        cpu = explain(resnet, resnet_images, method, target=RESNET_TARGETS, **opts).maps
        gpu = explain(model, resnet_images.cuda(), method, target=RESNET_TARGETS, **opts).maps
        assert gpu.is_cuda
        assert rel_err(gpu.cpu(), cpu) < 1e-2  # TF32 convolutions by default on Ampere+
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no completeness warning: the sums hold on CUDA
        out = explain(model, resnet_images.cuda(), "deepshap", baselines=4, seed=[1, 2])
    assert out.maps.is_cuda and out.seeds.is_cuda
