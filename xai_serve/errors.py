"""The one exception hierarchy of xai_serve.

Every error the library raises on purpose is an :class:`XaiServeError`. The subclasses also
derive from the matching built-in exception, so ``except ValueError`` keeps working for callers
who do not know this hierarchy. The server maps each class to one gRPC status code.
"""

from __future__ import annotations

import numbers

__all__ = [
    "BudgetTooSmall",
    "Cancelled",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidInput",
    "NotFound",
    "ResourceExhausted",
    "Unavailable",
    "XaiServeError",
    "positive_int",
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


class FailedPrecondition(XaiServeError, RuntimeError):
    """The request is valid but cannot run on this system as it is configured (e.g. a gradient
    method asked of a model that is served elsewhere): retrying will not help until the
    configuration changes; the message says what to change."""


class DeadlineExceeded(XaiServeError):
    """The request's deadline passed (or left too little time) before it could be computed."""


class Cancelled(XaiServeError):
    """The caller cancelled the request while it was being computed (the work was stopped)."""


class BudgetTooSmall(InvalidInput):
    """A time budget (``budget_ms``, or a call's deadline on the server) is too short for even
    the least work a method can answer with; the message gives the estimated minimum."""


def positive_int(value: object, what: str) -> int:
    """``value`` as an int if it is an integer >= 1 (a bool is not); else InvalidInput
    ``"<what> must be a positive integer, got <value>"`` (``what`` may be empty). The one check
    of counts and sizes that the ops, the API, the servers, the explainers, the configs and the
    command line share."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise InvalidInput(f"{what} must be a positive integer, got {value!r}".lstrip())
    return int(value)
