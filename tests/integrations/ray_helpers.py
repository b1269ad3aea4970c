"""What the Ray Serve tests share: a small seeded model written to a config file, inputs, and
the in-process reference answer of :func:`xai_serve.explain`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision

import xai_serve
from xai_serve.models import LoadedModel

#: (method, options) pairs the tests send: a CAM method and a seeded randomised one.
METHODS = (("gradcam", {}), ("lime", {"samples": 24, "n_segments": 16}))
SIDE = 48
CLASSES = 10


def write_config(folder: Path, ray_table: str = "") -> Path:
    """A resnet18 (10 classes, seeded random weights saved as a state dict) on 48 x 48 inputs,
    fp32 and untuned so that answers equal the in-process ones; ``ray_table`` is appended."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=CLASSES)
    torch.save(net.state_dict(), folder / "tiny.pth")
    text = f"""
warmup = false
log_level = "WARNING"

[limits]
max_samples = 64

[[models]]
name = "tiny"
source = "torchvision"
arch = "resnet18"
path = "tiny.pth"
num_classes = {CLASSES}
max_batch_size = 8
max_delay_ms = 20.0
tune = false
precision = "fp32"
memory_format = "contiguous"
[models.transform]
resize = {SIDE}
crop = [{SIDE}, {SIDE}]
"""
    path = folder / "server.toml"
    path.write_text(text + ray_table)
    return path


def inputs(n: int) -> list[torch.Tensor]:
    """``n`` distinct preprocessed inputs [3, SIDE, SIDE]."""
    g = torch.Generator().manual_seed(1)
    return [torch.randn(3, SIDE, SIDE, generator=g) for _ in range(n)]


def reference(
    model: LoadedModel, x: torch.Tensor, method: str, options: dict[str, Any], seed: int | None
) -> tuple[torch.Tensor, int]:
    """The map and target that :func:`xai_serve.explain` gives in this process."""
    expl = xai_serve.explain(
        model.module,
        x[None],
        method,
        seed=None if seed is None else [seed],
        path=model.path,
        **options,
    )
    return expl.maps[0].cpu(), int(expl.targets[0])
