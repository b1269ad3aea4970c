"""Explanation methods over any ``nn.Module`` image classifier: batched, on the device.

One file per family (``cam.py``, ``gradients.py``), one registration per method; see
:func:`xai_serve.explain` and :func:`list_methods`.
"""

from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    explain,
    get_method,
    list_methods,
    register,
)

# The built-in families: importing them runs their @register decorators. Any import of an
# ``xai_serve.explainers`` module runs this first, so the registry is complete before use.
from xai_serve.explainers import (  # noqa: F401  isort: skip
    attention,
    cam,
    deeplift,
    gradients,
    guided,
    perturbation,
)

__all__ = [
    "Explainer",
    "Explanation",
    "Request",
    "explain",
    "get_method",
    "list_methods",
    "register",
]
