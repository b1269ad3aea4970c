"""Network Dissection (xai_serve.concepts.dissection) against closed forms and a plain loop.

The data are built here: 32 x 32 images, each a grey background with one coloured rectangle
(red, green or blue), and one pixel mask per colour. A planted model has one "red detector"
unit, relu(R - max(G, B) - margin), at the input's resolution: it is positive exactly on the
red pixels, so its thresholded map and IoU with "red" have closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.concepts.dissection import (
    CategorySummary,
    Dissection,
    DissectionRow,
    TopQuantile,
    dissect,
    top_count,
)
from xai_serve.concepts.library import load_probe_folder, probe_dataset
from xai_serve.errors import InvalidInput, NotFound

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.1, 0.1, 0.9)}


@dataclass(frozen=True)
class Data:
    images: Tensor
    masks: Tensor
    concepts: list[str]
    categories: list[str]


def blocks(n: int = 12, size: int = 32, seed: int = 0) -> Data:
    """``n`` images: grey noise with one rectangle of colour ``i % 3`` (plus noise); masks:
    red, green, blue (colour) and "top" (shape: the top half of the image, on every image)."""
    g = torch.Generator().manual_seed(seed)
    images = 0.5 + 0.05 * torch.randn(n, 3, size, size, generator=g)
    masks = torch.zeros(n, 4, size, size, dtype=torch.bool)
    for i in range(n):
        c = i % 3
        h, w = (int(v) for v in torch.randint(6, size // 2, (2,), generator=g))
        y, x = (int(v) for v in torch.randint(0, size - 16, (2,), generator=g))
        colour = torch.tensor(list(COLOURS.values())[c]).view(3, 1, 1)
        images[i, :, y : y + h, x : x + w] = colour + 0.05 * torch.randn(3, h, w, generator=g)
        masks[i, c, y : y + h, x : x + w] = True
    masks[:, 3, : size // 2] = True
    return Data(images.clamp(0, 1), masks, [*COLOURS, "top"], ["color"] * 3 + ["shape"])


class Detector(nn.Module):
    """Unit 0: relu(R - max(G, B) - margin); units 1..: fixed random spatial fields (they do
    not look at the image), all at the input's resolution."""

    def __init__(self, size: int = 32, others: int = 5, margin: float = 0.3) -> None:
        super().__init__()
        self.margin = margin
        g = torch.Generator().manual_seed(1)
        self.register_buffer("fields", torch.rand(others, size, size, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        r, gb = x[:, 0], x[:, 1:].amax(dim=1)
        red = torch.relu(r - gb - self.margin)[:, None]
        fields = self.fields.expand(x.shape[0], -1, -1, -1) + 0 * x[:, :1]
        return torch.cat([red, fields], dim=1)


class Planted(nn.Module):
    def __init__(self, margin: float = 0.3) -> None:
        super().__init__()
        self.detect = Detector(margin=margin)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.detect(x))


class Small(nn.Module):
    """A strided conv net: its maps are smaller than the masks, so they are upsampled."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1)
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------- (a) planted unit


def test_planted_red_detector_has_closed_form_iou() -> None:
    data = blocks()
    red = data.masks[:, 0]
    n_red, total = int(red.sum()), red.numel()
    # A quantile just under red's share: k = |red|, so the threshold is the smallest red
    # activation and "> threshold" keeps every red pixel but that one: IoU = (|red|-1)/|red|.
    q = (n_red - 0.5) / total
    assert top_count(q, total) == n_red
    model = Planted().eval()
    d = dissect(model, "detect", data, quantile=q, batch_size=5)
    assert d.layer == "detect" and d.units == 6
    assert d.best_concept[0] == "red" and int(d.best[0]) == 0
    assert float(d.iou[0, 0]) == pytest.approx((n_red - 1) / n_red, abs=1e-6)
    assert float(d.best_iou[0]) > 0.95
    # Thresholds are the activations' k-th largest (closed form for the red unit).
    acts = model.detect(data.images)
    assert float(d.threshold[0]) == pytest.approx(float(acts[:, 0][red].min()), abs=1e-7)
    # The red unit is positive only on red pixels: no intersection with green or blue.
    assert d.intersection[0, 1:3].tolist() == [0, 0]
    # Units that do not look at the image detect nothing well.
    assert float(d.best_iou[1:].max()) < 0.3
    assert d.table(top=1) == [DissectionRow(0, "red", "color", float(d.best_iou[0]))]


def test_planted_detector_at_default_quantile() -> None:
    """At quantile 0.005 the unit keeps its k = ceil(0.005 n) strongest pixels, all red:
    IoU = (k - 1) / |red| (the k-th itself is not above the threshold)."""
    data = blocks()
    red = data.masks[:, 0]
    k = math.ceil(0.005 * red.numel())
    d = dissect(Planted().eval(), "detect", data)
    assert d.quantile == 0.005 and d.min_iou == 0.04
    assert int(d.intersection[0, 0]) == k - 1
    assert float(d.iou[0, 0]) == pytest.approx((k - 1) / int(red.sum()), abs=1e-6)


def test_planted_red_detector_on_the_procedural_probe_set() -> None:
    """The library's probe set: red is (1, 0, 0) +- 0.06 and no other palette colour has
    R - max(G, B) above 0.6 - 2 * 0.06, so with margin 0.6 the unit is positive exactly on the
    red mask. Its colours are constant within a region (ties), so the quantile is set just
    above red's share: k = |red| + 1, the k-th largest activation is 0, "> 0" is the red mask
    and IoU = 1."""
    names = ["red", "green", "blue", "stripes_0_wide", "circle"]
    data = probe_dataset(names, per_concept=4, size=32)
    red = data.masks[:, 0]
    n_red, total = int(red.sum()), red.numel()
    d = dissect(Planted(margin=0.6).eval(), "detect", data, quantile=(n_red + 0.5) / total)
    assert d.concepts == names and d.categories == data.categories
    assert float(d.threshold[0]) == 0.0
    assert d.best_concept[0] == "red"
    assert float(d.iou[0, 0]) == pytest.approx(1.0, abs=1e-6)
    assert float(d.best_iou[1:].max()) < 0.3
    s = d.summary()
    assert s["color"].concepts == {"red": 1} and s["color"].units == 1
    assert d.table(top=1)[0] == DissectionRow(0, "red", "color", pytest.approx(1.0))


def test_folder_dataset(tmp_path: Path) -> None:
    """A Broden-style folder (images/, masks/<concept>/, concepts.csv) read by
    load_probe_folder: the same masks, and the planted unit's IoU of 1."""
    from PIL import Image

    data = blocks(n=6)
    (tmp_path / "images").mkdir()
    for i, img in enumerate(data.images):
        px = (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(px).save(tmp_path / "images" / f"{i:03d}.png")
    for k, name in enumerate(data.concepts):
        (tmp_path / "masks" / name).mkdir(parents=True)
        for i in range(len(data.images)):
            if data.masks[i, k].any():
                m = data.masks[i, k].to(torch.uint8).mul(255).numpy()
                Image.fromarray(m).save(tmp_path / "masks" / name / f"{i:03d}.png")
    rows = [f"{c},{g}" for c, g in zip(data.concepts, data.categories, strict=True)]
    (tmp_path / "concepts.csv").write_text("name,category\n" + "\n".join(rows) + "\n")
    loaded = load_probe_folder(tmp_path, size=32)
    assert loaded.concepts == data.concepts and loaded.categories == data.categories
    assert torch.equal(loaded.masks, data.masks)
    red = loaded.masks[:, 0]
    n_red = int(red.sum())
    # 8-bit pixels tie: k = |red| + 1 puts the threshold at 0, and "> 0" is the red mask.
    d = dissect(Planted().eval(), "detect", loaded, quantile=(n_red + 0.5) / red.numel())
    assert d.best_concept[0] == "red"
    assert float(d.threshold[0]) == 0.0
    assert float(d.iou[0, 0]) == pytest.approx(1.0, abs=1e-6)


# --------------------------------------------------------------------------- (b) reference loop


def reference_dissection(
    model: nn.Module, layer: nn.Module, data: Data, quantile: float
) -> tuple[Tensor, Tensor]:
    """NetDissect-style: activations image by image, each unit's threshold from its sorted
    activations, then per unit, per image, per concept: upsample, threshold, count."""
    maps = []
    for img in data.images:
        out: list[Tensor] = []
        h = layer.register_forward_hook(lambda _m, _i, o, out=out: out.append(o.detach()))
        with torch.no_grad():
            model(img[None])
        h.remove()
        maps.append(out[0][0])
    acts = torch.stack(maps)  # [N, C, h, w]
    n_img, units = acts.shape[:2]
    concepts = data.masks.shape[1]
    size = data.masks.shape[-2:]
    thresholds = []
    for u in range(units):
        values = sorted(acts[:, u].flatten().tolist(), reverse=True)
        k = max(1, math.ceil(round(quantile * len(values), 9)))
        thresholds.append(values[k - 1])
    iou = torch.zeros(units, concepts, dtype=torch.float64)
    for u in range(units):
        inter, area_a, area_m = [0] * concepts, 0, [0] * concepts
        for i in range(n_img):
            up = F.interpolate(acts[i : i + 1, u : u + 1], size=size, mode="bilinear")
            a = up[0, 0] > thresholds[u]
            area_a += int(a.sum())
            for k in range(concepts):
                m = data.masks[i, k]
                inter[k] += int((a & m).sum())
                area_m[k] += int(m.sum())
        for k in range(concepts):
            union = area_a + area_m[k] - inter[k]
            iou[u, k] = inter[k] / union if union else 0.0
    return torch.tensor(thresholds), iou


@pytest.mark.parametrize(
    ("quantile", "batch_size", "mask_size", "cache"),
    [(0.005, 5, 32, 1 << 20), (0.2, 3, 24, 1 << 20), (0.2, 4, 32, 0)],
)
def test_equals_reference_loop(
    quantile: float, batch_size: int, mask_size: int, cache: int
) -> None:
    data = blocks(n=10)
    if mask_size != 32:  # masks at another resolution than the images (and the maps)
        m = F.interpolate(data.masks.float(), size=(mask_size, mask_size), mode="nearest")
        data = Data(data.images, m > 0.5, data.concepts, data.categories)
    model = Small().eval()
    ref_t, ref_iou = reference_dissection(model, model.body, data, quantile)
    d = dissect(
        model, model.body, data, quantile=quantile, batch_size=batch_size, max_cache_bytes=cache
    )
    assert d.layer == "body"
    torch.testing.assert_close(d.threshold, ref_t, rtol=0, atol=1e-6)
    torch.testing.assert_close(d.iou.double(), ref_iou, rtol=0, atol=1e-6)
    assert d.best.tolist() == ref_iou.argmax(dim=1).tolist()
    assert int((ref_iou > 0).sum()) >= 5  # the case is not all zeros


def test_transform_is_applied_before_the_model() -> None:
    data = blocks(n=6)
    model = Small().eval()

    def t(x: Tensor) -> Tensor:
        return (x - 0.5) / 0.25

    wrapped = nn.Sequential()
    wrapped.pre = _Lambda(t)
    wrapped.body = model.body  # the same layer, behind the transform
    a = dissect(model, "body", data, transform=t, quantile=0.1)
    b = dissect(wrapped, "body", data, quantile=0.1)
    torch.testing.assert_close(a.threshold, b.threshold, rtol=0, atol=0)
    torch.testing.assert_close(a.iou, b.iou, rtol=0, atol=0)
    c = dissect(model, "body", data, quantile=0.1)
    assert not torch.equal(a.threshold, c.threshold)


class _Lambda(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


@pytest.mark.parametrize(("cache", "runs"), [(None, 3), (0, 6), (10 * 6 * 16 * 16 * 4 - 1, 6)])
def test_the_model_runs_once_when_the_activations_fit(cache: int | None, runs: int) -> None:
    """10 images in batches of 4: 3 forward passes, or 6 when the [10, 6, 16, 16] float32
    activations exceed ``max_cache_bytes``; the same answer either way."""
    model = Small().eval()
    calls: list[int] = []
    model.body.register_forward_pre_hook(lambda _m, _i: calls.append(1))
    data = blocks(n=10)
    kw = {} if cache is None else {"max_cache_bytes": cache}
    d = dissect(model, "body", data, batch_size=4, quantile=0.05, **kw)
    assert len(calls) == runs
    ref = dissect(Small().eval(), "body", data, batch_size=4, quantile=0.05, max_cache_bytes=0)
    torch.testing.assert_close(d.iou, ref.iou, rtol=0, atol=0)


class Twice(nn.Module):
    """One ReLU module called twice, as in a ResNet block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.a, self.b, self.relu = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.b(self.relu(self.a(x))))


def test_a_module_called_twice_is_read_at_its_first_call() -> None:
    data = blocks(n=4)
    model = Twice().eval()
    d = dissect(model, "relu", data, quantile=0.1)
    first = torch.relu(model.a(data.images)).detach()  # [4, 4, 30, 30]
    flat = first.transpose(0, 1).reshape(4, -1)
    want = flat.sort(dim=1, descending=True).values[:, top_count(0.1, flat.shape[1]) - 1]
    torch.testing.assert_close(d.threshold, want, rtol=0, atol=1e-6)


def test_progress_reports_both_passes() -> None:
    calls: list[tuple[float, str]] = []
    dissect(
        Small().eval(),
        "body",
        blocks(n=7),
        batch_size=3,
        progress=lambda f, s: calls.append((f, s)),
    )
    assert [s for _, s in calls] == ["thresholds"] * 3 + ["iou"] * 3
    assert [f for f, _ in calls] == pytest.approx([i / 6 for i in range(1, 7)])


# --------------------------------------------------------------------------- (c) quantile


def test_top_count_reads_the_decimal() -> None:
    assert top_count(0.005, 2000) == 10
    assert top_count(0.1, 30) == 3  # 0.1 * 30 == 3.0000000000000004 in binary
    assert top_count(0.005, 2001) == 11
    assert top_count(1e-9, 10) == 1


@pytest.mark.parametrize("quantile", [0.005, 0.01, 0.25, 0.5, 0.7, 0.999])
@pytest.mark.parametrize("batch", [1, 4, 40])
def test_top_quantile_is_exact(quantile: float, batch: int) -> None:
    g = torch.Generator().manual_seed(3)
    values = torch.randn(40, 3, 5, 5, generator=g)
    values[:, 1] = values[:, 1].round()  # many ties
    top = TopQuantile(3, 40 * 25, quantile)
    for s in range(0, 40, batch):
        top.update(values[s : s + batch])
    got = top.threshold()
    flat = values.transpose(0, 1).reshape(3, -1)
    k = top_count(quantile, flat.shape[1])
    want = flat.sort(dim=1, descending=True).values[:, k - 1]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert top.keep == min(k, flat.shape[1] - k + 1)


def test_top_quantile_matches_torch_quantile_higher() -> None:
    """With quantile * n an integer, the k-th largest is torch.quantile's "higher" upper
    quantile."""
    values = torch.randn(2, 1000, generator=torch.Generator().manual_seed(4))
    for q in (0.005, 0.01, 0.1, 0.3):
        top = TopQuantile(2, 1000, q)
        top.update(values.T.reshape(1000, 2))  # [B=1000, C=2]
        want = torch.quantile(values, 1 - q, dim=1, interpolation="higher")
        torch.testing.assert_close(top.threshold(), want, rtol=0, atol=0)


def test_top_quantile_counts_its_values() -> None:
    top = TopQuantile(2, 10, 0.1)
    top.update(torch.zeros(4, 2))
    with pytest.raises(InvalidInput, match="saw 4 values"):
        top.threshold()
    with pytest.raises(InvalidInput, match="more values"):
        top.update(torch.zeros(7, 2))
    with pytest.raises(InvalidInput, match=r"Tensor\[B, 2"):
        top.update(torch.zeros(3, 5))


# --------------------------------------------------------------------------- reports


def _made(iou: list[list[float]], min_iou: float = 0.04) -> Dissection:
    t = torch.tensor(iou)
    best_iou, best = t.max(dim=1)
    return Dissection(
        layer="x",
        quantile=0.005,
        min_iou=min_iou,
        concepts=["red", "green", "stripes", "circle"],
        categories=["color", "color", "texture", "shape"],
        threshold=torch.zeros(t.shape[0]),
        iou=t,
        intersection=torch.zeros_like(t, dtype=torch.int64),
        union=torch.ones_like(t, dtype=torch.int64),
        best=best,
        best_iou=best_iou,
    )


def test_table_and_summary() -> None:
    d = _made(
        [
            [0.10, 0.00, 0.01, 0.00],  # unit 0: red 0.10
            [0.00, 0.02, 0.03, 0.00],  # unit 1: stripes 0.03 (below 0.04)
            [0.20, 0.05, 0.00, 0.00],  # unit 2: red 0.20
            [0.00, 0.00, 0.00, 0.50],  # unit 3: circle 0.50
            [0.00, 0.07, 0.00, 0.00],  # unit 4: green 0.07
            [0.00, 0.07, 0.00, 0.00],  # unit 5: green 0.07 (tie with 4: lower unit first)
            [0.00, 0.00, 0.00, 0.00],  # unit 6: nothing (best: the first concept)
        ]
    )
    rows = d.table()
    assert [r.unit for r in rows] == [3, 2, 0, 4, 5, 1, 6]
    assert rows[0] == DissectionRow(3, "circle", "shape", pytest.approx(0.5))
    assert rows[-1] == DissectionRow(6, "red", "color", 0.0)
    assert [r.unit for r in d.table(top=2)] == [3, 2]
    assert [r.unit for r in d.table(detectors_only=True)] == [3, 2, 0, 4, 5]
    assert d.detectors.tolist() == [True, False, True, True, True, True, False]
    s = d.summary()
    assert list(s) == ["color", "texture", "shape"]
    assert s["color"] == CategorySummary("color", 4, {"red": 2, "green": 2})
    assert s["texture"] == CategorySummary("texture", 0, {})
    assert s["shape"] == CategorySummary("shape", 1, {"circle": 1})
    assert (s["color"].unique, s["texture"].unique) == (2, 0)
    # min_iou moves the cut: at 0.08 only red (units 0 and 2) and circle remain.
    s2 = _made(d.iou.tolist(), min_iou=0.08).summary()
    assert s2["color"] == CategorySummary("color", 2, {"red": 2})


# --------------------------------------------------------------------------- (e) errors


def test_errors() -> None:
    data = blocks(n=4)
    model = Small().eval()
    with pytest.raises(NotFound, match="no layer 'nope'"):
        dissect(model, "nope", data)
    with pytest.raises(InvalidInput, match=r"spatial map Tensor\[B, C, h, w\]"):
        dissect(model, "head.1", data)  # Flatten: [B, 6]
    with pytest.raises(InvalidInput, match="no images"):
        dissect(
            model, "body", Data(data.images[:0], data.masks[:0], data.concepts, data.categories)
        )
    with pytest.raises(InvalidInput, match="masks are for 3 images"):
        dissect(model, "body", Data(data.images, data.masks[:3], data.concepts, data.categories))
    with pytest.raises(InvalidInput, match="K = 4 concepts but there are 3"):
        dissect(model, "body", Data(data.images, data.masks, data.concepts[:3], data.categories))
    with pytest.raises(InvalidInput, match="must be bool"):
        dissect(
            model, "body", Data(data.images, data.masks.float(), data.concepts, data.categories)
        )
    with pytest.raises(InvalidInput, match="no concepts"):
        dissect(model, "body", Data(data.images, data.masks[:, :0], [], []))
    with pytest.raises(InvalidInput, match=r"images must be Tensor\[N, 3, H, W\]"):
        dissect(model, "body", Data(data.images[:, :1], data.masks, data.concepts, data.categories))
    with pytest.raises(InvalidInput, match="must be a ProbeDataset"):
        dissect(model, "body", (data.images, data.masks))
    for q in (0, 1, 1.5, -0.1, float("nan"), True):
        with pytest.raises(InvalidInput, match="quantile"):
            dissect(model, "body", data, quantile=q)
    with pytest.raises(InvalidInput, match="batch_size"):
        dissect(model, "body", data, batch_size=0)
    with pytest.raises(InvalidInput, match="min_iou"):
        dissect(model, "body", data, min_iou=1.0)
    with pytest.raises(InvalidInput, match="max_cache_bytes"):
        dissect(model, "body", data, max_cache_bytes=-1)
    with pytest.raises(InvalidInput, match="progress"):
        dissect(model, "body", data, progress=3)  # type: ignore[arg-type]
    with pytest.raises(NotFound, match="not part of the model"):
        dissect(model, nn.Conv2d(3, 3, 1), data)


# --------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_the_reference() -> None:
    """On a GPU, with the dataset on the CPU or on the device: the planted (elementwise) unit
    gives the CPU's thresholds and counts exactly; the strided conv net agrees with the CPU
    reference loop up to the convolutions' rounding."""
    data = blocks(n=10)
    cpu = dissect(Planted().eval(), "detect", data, quantile=0.05, batch_size=4)
    on_device = Data(data.images.cuda(), data.masks.cuda(), data.concepts, data.categories)
    for ds in (data, on_device):
        gpu = dissect(Planted().eval().cuda(), "detect", ds, quantile=0.05, batch_size=4)
        assert gpu.iou.is_cuda
        torch.testing.assert_close(gpu.threshold.cpu(), cpu.threshold, rtol=0, atol=0)
        assert torch.equal(gpu.intersection.cpu(), cpu.intersection)
        assert torch.equal(gpu.union.cpu(), cpu.union)
    model = Small().eval()
    ref_t, ref_iou = reference_dissection(model, model.body, data, 0.2)
    gpu = dissect(model.cuda(), "body", data, quantile=0.2, batch_size=3, max_cache_bytes=0)
    torch.testing.assert_close(gpu.threshold.cpu(), ref_t, rtol=0, atol=1e-5)
    torch.testing.assert_close(gpu.iou.cpu().double(), ref_iou, rtol=0, atol=1e-2)
