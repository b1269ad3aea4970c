"""The model registry: configs, loading (torchvision, TorchScript, torch.export, the bundled
EfficientNet-Lite0) and per-model preprocessing.

Typical use::

    cfg = model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"})
    model = load_model(cfg)
    x, view = model.preprocess(rgb_uint8_chw)
    logits = model.module(x[None].to(model.device))
"""

from xai_serve.models.config import (
    BUNDLED_MODELS,
    ModelConfig,
    TransformConfig,
    bundled_model_config,
    model_config_from_dict,
)
from xai_serve.models.registry import LoadedModel, imagenet_classes, load_model, rgb_normaliser

__all__ = [
    "BUNDLED_MODELS",
    "LoadedModel",
    "ModelConfig",
    "TransformConfig",
    "bundled_model_config",
    "imagenet_classes",
    "load_model",
    "model_config_from_dict",
    "rgb_normaliser",
]
