"""xai_serve: fast, batched, on-device explanations for PyTorch vision models, served over gRPC.

In-process: :func:`explain` (and :func:`evaluate`, which scores its maps with quality
metrics; the concept methods :func:`tcav`, :func:`dissect` and :func:`visualize` of
:mod:`xai_serve.concepts`; and :func:`tune`, which measures a model's fastest faithful
:class:`ForwardPath` that ``explain`` then uses). Over the network: :class:`Client` /
:class:`AsyncClient` against ``xai-serve serve`` (imported on first use, so ``import xai_serve``
does not load gRPC; nor does it load the model registry that :func:`tune` lives beside).
"""

from __future__ import annotations

from typing import Any

from xai_serve.errors import (
    BudgetTooSmall,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.explainers import (
    Evaluation,
    Explanation,
    evaluate,
    explain,
    list_methods,
    metric_info,
    metric_names,
)
from xai_serve.explainers.forward import ForwardPath

__version__ = "0.1.0"

_LAZY = {
    "AsyncClient": "xai_serve.client",
    "dissect": "xai_serve.concepts",
    "tcav": "xai_serve.concepts",
    "visualize": "xai_serve.concepts",
    "Client": "xai_serve.client",
    "RemoteError": "xai_serve.client",
    "RemoteExplanation": "xai_serve.client",
    "TuneSettings": "xai_serve.models.tuning",
    "tune": "xai_serve.models.tuning",
}

__all__ = [
    "AsyncClient",
    "BudgetTooSmall",
    "Client",
    "Evaluation",
    "Explanation",
    "FailedPrecondition",
    "ForwardPath",
    "InvalidInput",
    "NotFound",
    "RemoteError",
    "RemoteExplanation",
    "ResourceExhausted",
    "TuneSettings",
    "Unavailable",
    "XaiServeError",
    "__version__",
    "dissect",
    "evaluate",
    "explain",
    "list_methods",
    "metric_info",
    "metric_names",
    "tcav",
    "tune",
    "visualize",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xai_serve' has no attribute {name!r}")
