"""The model registry: configs, loading (torchvision, TorchScript, torch.export, the bundled
EfficientNet-Lite0, or a model served elsewhere over the Open Inference Protocol) and
per-model preprocessing.

Typical use::

    cfg = model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"})
    model = load_model(cfg)
    x, view = model.preprocess(rgb_uint8_chw)
    logits = model.module(x[None].to(model.device))
"""

from xai_serve.models.config import (
    BUNDLED_MODELS,
    ModelConfig,
    RemoteConfig,
    TransformConfig,
    bundled_model_config,
    model_config_from_dict,
)
from xai_serve.models.registry import LoadedModel, imagenet_classes, load_model, rgb_normaliser
from xai_serve.models.remote import RemoteModel, call_scope

__all__ = [
    "BUNDLED_MODELS",
    "LoadedModel",
    "ModelConfig",
    "RemoteConfig",
    "RemoteModel",
    "TransformConfig",
    "bundled_model_config",
    "call_scope",
    "imagenet_classes",
    "load_model",
    "model_config_from_dict",
    "rgb_normaliser",
]
