"""Deletion / insertion AUC against closed forms and a slow per-step oracle."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from xai_serve import InvalidInput
from xai_serve.explainers.metrics import deletion_auc, insertion_auc


class WeightedSum(nn.Module):
    """``logits = [scale * sum(x * w), 0]``: class 0's probability is ``sigmoid(scale * sum)``."""

    def __init__(self, weight: Tensor, scale: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale * (x * self.weight).sum(dim=(1, 2, 3))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def trapezoid(ys: list[float]) -> float:
    steps = len(ys) - 1
    return sum((ys[k] + ys[k + 1]) / 2 for k in range(steps)) / steps


def small_cnn() -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 6),
    ).eval()


def oracle_curve(
    model: nn.Module,
    image: Tensor,
    saliency: Tensor,
    target: int,
    steps: int,
    baseline: Tensor,
    insert: bool,
) -> list[float]:
    """One image, one step at a time, the pixel order by an explicit Python sort."""
    _, h, w = image.shape
    values = saliency.reshape(-1).tolist()
    order = sorted(range(h * w), key=lambda p: (-values[p], p))
    base = baseline.expand_as(image)
    ys = []
    for k in range(steps + 1):
        n = k * h * w // steps
        x = base.clone() if insert else image.clone()
        for p in order[:n]:
            y, xx = divmod(p, w)
            x[:, y, xx] = image[:, y, xx] if insert else base[:, y, xx]
        with torch.no_grad():
            ys.append(float(model(x[None]).softmax(dim=1)[0, target]))
    return ys


# --------------------------------------------------------------------------- closed forms

H = W = 4
SCALE = 0.7


@pytest.fixture(scope="module")
def weighted() -> tuple[nn.Module, Tensor]:
    """A model whose pixel weights (summed over the 3 channels) are a permutation of
    ``1/16, 2/16, ..., 16/16``, and the map that ranks pixels by that weight."""
    perm = torch.randperm(H * W, generator=torch.Generator().manual_seed(0))
    pixel = ((perm + 1).double() / (H * W)).view(H, W)
    weight = (pixel / 3).expand(3, H, W).contiguous()
    return WeightedSum(weight, SCALE), pixel.float()


def test_deletion_and_insertion_closed_form(weighted):
    model, pixel = weighted
    images = torch.ones(2, 3, H, W, dtype=torch.float64)
    maps = torch.stack([pixel, -pixel])  # ideal order, reversed order
    steps = 8  # 2 more pixels per step
    total = sum(range(1, 17)) / 16
    top = [sum(range(17 - 2 * k, 17)) / 16 for k in range(steps + 1)]  # the 2k largest
    bottom = [sum(range(1, 2 * k + 1)) / 16 for k in range(steps + 1)]  # the 2k smallest

    deletion = deletion_auc(model, images, maps, 0, steps=steps)
    expected = [
        trapezoid([sigmoid(SCALE * (total - r)) for r in top]),
        trapezoid([sigmoid(SCALE * (total - r)) for r in bottom]),
    ]
    assert deletion.dtype == torch.float32 and deletion.shape == (2,)
    assert deletion.tolist() == pytest.approx(expected, abs=1e-6)

    insertion = insertion_auc(model, images, maps, 0, steps=steps)
    expected = [
        trapezoid([sigmoid(SCALE * r) for r in top]),
        trapezoid([sigmoid(SCALE * r) for r in bottom]),
    ]
    assert insertion.tolist() == pytest.approx(expected, abs=1e-6)


def test_one_step_is_the_mean_of_the_end_points(weighted):
    model, pixel = weighted
    images = torch.ones(1, 3, H, W)
    out = deletion_auc(model, images, pixel[None], 1, steps=1)
    # target 1 has logit 0: its probability is 1 - sigmoid(s); all removed -> 1/2.
    full = 1 - sigmoid(SCALE * sum(range(1, 17)) / 16)
    assert float(out[0]) == pytest.approx((full + 0.5) / 2, abs=1e-6)


def test_ideal_beats_random_beats_reversed():
    torch.manual_seed(0)
    h = w = 8
    g = torch.Generator().manual_seed(1)
    pixel = torch.rand(h, w, generator=g)
    model = WeightedSum((pixel / 3).expand(3, h, w).contiguous(), 0.3)
    images = torch.ones(3, 3, h, w)
    maps = torch.stack([pixel, torch.rand(h, w, generator=g), -pixel])
    deletion = deletion_auc(model, images, maps, 0).tolist()
    insertion = insertion_auc(model, images, maps, 0).tolist()
    assert deletion[0] < deletion[1] < deletion[2]
    assert insertion[0] > insertion[1] > insertion[2]
    # The ranking is all that matters: any increasing transform of a map gives the same area.
    same = deletion_auc(model, images, maps.mul(3).exp(), 0).tolist()
    assert same == deletion


# --------------------------------------------------------------------------- against the oracle


@pytest.mark.parametrize("insert", [False, True])
def test_matches_per_step_oracle_with_ties_and_channel_baseline(insert):
    model = small_cnn()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(3, 3, 6, 6, generator=g)
    # Few distinct values: many ties, broken by the lower flat index.
    maps = torch.randint(0, 4, (3, 6, 6), generator=g).float()
    target = torch.tensor([1, 4, 0])
    baseline = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1)
    steps = 7  # does not divide 36 pixels: floor(k * 36 / 7) per step
    fn = insertion_auc if insert else deletion_auc
    out = fn(model, images, maps, target, steps=steps, baseline=baseline, batch_size=5)
    expected = [
        trapezoid(oracle_curve(model, images[b], maps[b], int(target[b]), steps, baseline, insert))
        for b in range(3)
    ]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)


def test_full_tensor_baseline_and_int_target():
    model = small_cnn()
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 5, 5, generator=g)
    blurred = torch.nn.functional.avg_pool2d(images, 3, 1, 1)
    maps = torch.randn(2, 5, 5, generator=g)
    out = insertion_auc(model, images, maps, 2, steps=5, baseline=blurred)
    expected = [
        trapezoid(oracle_curve(model, images[b], maps[b], 2, 5, blurred[b], True)) for b in range(2)
    ]
    assert out.tolist() == pytest.approx(expected, abs=1e-5)
    same = insertion_auc(model, images, maps, torch.tensor([2, 2]), steps=5, baseline=blurred)
    assert torch.equal(out, same)


# --------------------------------------------------------------------------- batching


def test_batch_size_does_not_change_results(weighted):
    model, _ = weighted
    g = torch.Generator().manual_seed(4)
    images = torch.rand(3, 3, H, W, generator=g)
    maps = torch.randn(3, H, W, generator=g)
    for fn in (deletion_auc, insertion_auc):
        one = fn(model, images, maps, 0, steps=6, batch_size=1)
        assert torch.equal(one, fn(model, images, maps, 0, steps=6, batch_size=64))
        assert torch.equal(one, fn(model, images, maps, 0, steps=6, batch_size=4))

    cnn = small_cnn()
    one = deletion_auc(cnn, images, maps, 3, steps=6, batch_size=1)
    torch.testing.assert_close(
        one, deletion_auc(cnn, images, maps, 3, steps=6, batch_size=64), rtol=1e-6, atol=1e-7
    )


def test_forwards_are_chunks_of_batch_size_across_images(weighted):
    model, _ = weighted
    calls: list[int] = []
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    try:
        deletion_auc(model, torch.rand(2, 3, H, W), torch.rand(2, H, W), 0, steps=5, batch_size=5)
    finally:
        handle.remove()
    assert calls == [5, 5, 2]  # 2 images x 6 points


def test_float32_result_for_a_float64_model_and_any_map_dtype():
    model = small_cnn()
    images = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(6))
    maps = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(7))
    ref = deletion_auc(model, images, maps, 0, steps=4)
    out = deletion_auc(model.double(), images.double(), maps.double(), 0, steps=4)
    assert out.dtype == torch.float32 and out.shape == (2,)
    torch.testing.assert_close(out, ref)
    # only the order of a map matters, so an integer map with the same order is the same map
    ranks = maps.flatten(1).argsort(dim=1).argsort(dim=1).view(2, 6, 6)
    assert torch.equal(deletion_auc(model, images.double(), ranks, 0, steps=4), out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    model = small_cnn()
    g = torch.Generator().manual_seed(8)
    images = torch.rand(3, 3, 6, 6, generator=g)
    maps = torch.randint(0, 4, (3, 6, 6), generator=g).float()
    baseline = torch.tensor([0.5, -1.0, 2.0]).view(3, 1, 1)
    for fn in (deletion_auc, insertion_auc):
        ref = fn(model, images, maps, 1, steps=7, baseline=baseline, batch_size=5)
        # inputs on the CPU are moved to the model's device; the result stays there
        out = fn(model.cuda(), images, maps, 1, steps=7, baseline=baseline, batch_size=5)
        assert out.device.type == "cuda"
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
        model.cpu()


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"maps": torch.rand(2, 4, 5)}, "maps"),
        ({"maps": torch.rand(4, 4)}, "maps"),
        ({"maps": torch.full((2, 4, 4), float("nan"))}, "maps"),
        ({"images": torch.rand(2, 4, 4)}, "images"),
        ({"images": torch.ones(2, 3, 4, 4, dtype=torch.int64)}, "images"),
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"baseline": torch.zeros(2, 1, 1)}, "baseline"),
        ({"baseline": "blur"}, "baseline"),
        ({"baseline": float("nan")}, "baseline"),
        ({"target": torch.tensor([0, 1, 0])}, "target"),
        ({"target": 2}, "target"),
        ({"target": -1}, "target"),
        ({"target": None}, "target"),
    ],
)
def test_invalid_input(weighted, kwargs, name):
    model, _ = weighted
    args = {"images": torch.ones(2, 3, 4, 4), "maps": torch.rand(2, 4, 4), "target": 0}
    args.update(kwargs)
    rest = {k: v for k, v in args.items() if k not in ("images", "maps", "target")}
    for fn in (deletion_auc, insertion_auc):
        with pytest.raises(InvalidInput, match=f"`{name}`"):
            fn(model, args["images"], args["maps"], args["target"], **rest)
