"""The ``timm`` model source: a timm model name and a local state dict, never the hub.

A timm ``test_vit`` (160 x 160, about 0.4 M parameters) and ``test_resnet`` with seeded random
weights are saved as state dicts into ``tmp_path`` and loaded through :func:`load_model`; the
loaded weights and logits equal the saved model's exactly.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests._peers import require

timm = require("timm")

from xai_serve import InvalidInput, NotFound, Unavailable, explain  # noqa: E402
from xai_serve.models import (  # noqa: E402
    ModelConfig,
    TransformConfig,
    load_model,
    model_config_from_dict,
)
from xai_serve.models.config import SOURCES  # noqa: E402

T160 = TransformConfig(resize=None, crop=(160, 160))


def _saved(tmp_path: Path, arch: str, num_classes: int, seed: int = 0) -> tuple[Path, nn.Module]:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes).eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return path, model


def _config(path: Path | None, arch: str = "test_vit", **kw: Any) -> ModelConfig:
    return ModelConfig(
        name="t",
        source="timm",
        arch=arch,
        path=None if path is None else str(path),
        transform=T160,
        **kw,
    )


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch pretrained weights fails the test."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("timm tried to load pretrained weights")

    import timm.models._builder as builder

    monkeypatch.setattr(builder, "load_pretrained", refuse)


def test_timm_is_a_source() -> None:
    assert "timm" in SOURCES
    cfg = model_config_from_dict(
        {"name": "v", "source": "timm", "arch": "vit_small_patch16_224", "path": "w.pth"},
        base_dir=Path("/models"),
    )
    assert (cfg.source, cfg.arch, cfg.path) == ("timm", "vit_small_patch16_224", "/models/w.pth")
    assert cfg.transform == TransformConfig()  # the config's transform, as for other sources


@pytest.mark.parametrize("arch", ["test_vit", "test_resnet"])
def test_state_dict_gives_identical_weights_and_logits(tmp_path: Path, arch: str) -> None:
    path, ref = _saved(tmp_path, arch, num_classes=7)
    model = load_model(_config(path, arch, num_classes=7), allowed_dirs=[tmp_path])
    assert model.num_classes == 7 and model.input_shape == (3, 160, 160)
    assert type(model.module) is type(ref)
    loaded = model.module.state_dict()
    assert loaded.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded[k], v), k
    assert not model.module.training
    assert not any(p.requires_grad for p in model.module.parameters())
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.module(x), ref(x))


def test_loaded_timm_vit_takes_the_attention_methods(tmp_path: Path) -> None:
    path, ref = _saved(tmp_path, "test_vit", num_classes=5)
    model = load_model(_config(path, num_classes=5))
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = ref(x)
    for method in ("attention_rollout", "attention_gradcam"):
        assert method in model.methods
        exp = explain(model.module, x, method)
        assert exp.maps.shape == (2, 160, 160)
        torch.testing.assert_close(exp.logits, plain, atol=1e-5, rtol=0)


def test_bad_arch(tmp_path: Path) -> None:
    with pytest.raises(
        NotFound, match=r"models\[t\]\.arch: timm has no model 'test_vitt'.*test_vit"
    ):
        load_model(_config(None, "test_vitt"))
    with pytest.raises(InvalidInput, match=r"models\[t\]\.arch is required.*timm"):
        ModelConfig(name="t", source="timm", transform=T160)


def test_missing_path_and_weights_that_do_not_fit(tmp_path: Path, caplog: Any) -> None:
    with pytest.raises(NotFound, match=r"models\[t\]\.path: no such file"):
        load_model(_config(tmp_path / "nowhere.pth"))
    path, _ = _saved(tmp_path, "test_vit", num_classes=7)
    with pytest.raises(InvalidInput, match=r"models\[t\]\.path.*does not fit timm test_vit.*head"):
        load_model(_config(path))  # the default head (1000) is not the saved one (7)
    with pytest.raises(InvalidInput, match="does not fit timm test_resnet"):
        load_model(_config(path, "test_resnet", num_classes=7))
    with pytest.raises(InvalidInput, match="outside the allowed model directories"):
        load_model(_config(path, num_classes=7), allowed_dirs=[tmp_path / "other"])
    with caplog.at_level(logging.WARNING, logger="xai_serve.models"):
        m = load_model(_config(None, num_classes=3))
    assert "timm test_vit is randomly initialised" in caplog.text
    assert m.num_classes == 3


def test_missing_timm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    with pytest.raises(
        Unavailable, match=r'source "timm" needs the timm package: pip install timm'
    ):
        load_model(_config(None))
