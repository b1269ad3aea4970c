"""xai_serve: fast, batched, on-device explanations for PyTorch vision models."""

from xai_serve.errors import InvalidInput, NotFound, ResourceExhausted, Unavailable, XaiServeError
from xai_serve.explainers import Explanation, explain, list_methods

__version__ = "0.1.0"

__all__ = [
    "Explanation",
    "InvalidInput",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "XaiServeError",
    "__version__",
    "explain",
    "list_methods",
]
