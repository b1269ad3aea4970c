"""xai_serve: fast, batched, on-device explanations for PyTorch vision models, served over gRPC.

In-process: :func:`explain`. Over the network: :class:`Client` / :class:`AsyncClient` against
``xai-serve serve`` (imported on first use, so ``import xai_serve`` does not load gRPC).
"""

from __future__ import annotations

from typing import Any

from xai_serve.errors import InvalidInput, NotFound, ResourceExhausted, Unavailable, XaiServeError
from xai_serve.explainers import Explanation, explain, list_methods

__version__ = "0.1.0"

_CLIENT_NAMES = ("AsyncClient", "Client", "RemoteError", "RemoteExplanation")

__all__ = [
    "AsyncClient",
    "Client",
    "Explanation",
    "InvalidInput",
    "NotFound",
    "RemoteError",
    "RemoteExplanation",
    "ResourceExhausted",
    "Unavailable",
    "XaiServeError",
    "__version__",
    "explain",
    "list_methods",
]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from xai_serve import client

        return getattr(client, name)
    raise AttributeError(f"module 'xai_serve' has no attribute {name!r}")
