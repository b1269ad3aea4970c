"""Explanation methods over any ``nn.Module`` image classifier: batched, on the device.

One file per family (``cam.py``, ``gradients.py``), one registration per method; see
:func:`xai_serve.explain` and :func:`list_methods`. The quality metrics of explanations are
:mod:`xai_serve.explainers.metrics`, and :func:`evaluate` runs a method and scores its maps.
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

from xai_serve.explainers.evaluation import (  # isort: skip
    Evaluation,
    MetricInfo,
    evaluate,
    metric_info,
    metric_names,
)

__all__ = [
    "Evaluation",
    "Explainer",
    "Explanation",
    "MetricInfo",
    "Request",
    "evaluate",
    "explain",
    "get_method",
    "list_methods",
    "metric_info",
    "metric_names",
    "register",
]
