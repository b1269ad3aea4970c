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

__all__ = [
    "Explainer",
    "Explanation",
    "Request",
    "explain",
    "get_method",
    "list_methods",
    "register",
]
