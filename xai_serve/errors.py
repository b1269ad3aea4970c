"""The one exception hierarchy of xai_serve.

Every error the library raises on purpose is an :class:`XaiServeError`. The subclasses also
derive from the matching built-in exception, so ``except ValueError`` keeps working for callers
who do not know this hierarchy. The server maps each class to one gRPC status code.
"""

from __future__ import annotations

__all__ = [
    "BudgetTooSmall",
    "InvalidInput",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "XaiServeError",
]


class XaiServeError(Exception):
    """Base class of every deliberate xai_serve error."""


class InvalidInput(XaiServeError, ValueError):
    """An argument has the wrong shape, dtype, device or value; the message names it."""


class NotFound(XaiServeError, LookupError):
    """A named model, method, layer or backend does not exist."""


class Unavailable(XaiServeError, RuntimeError):
    """Something that exists cannot run here (e.g. a kernel backend that was not built)."""


class ResourceExhausted(XaiServeError, RuntimeError):
    """A limit was reached (queue length, memory, sample count)."""


class BudgetTooSmall(InvalidInput):
    """A time budget (``budget_ms``, or a call's deadline on the server) is too short for even
    the least work a method can answer with; the message gives the estimated minimum."""
