"""The one place where exceptions become gRPC status codes.

:func:`status_of` maps the :mod:`xai_serve.errors` hierarchy to status codes;
:class:`ErrorInterceptor` wraps every handler of the server so that a deliberate error becomes
its status code with its message, and anything else becomes INTERNAL with a request id that is
also written to the log with the traceback. A bad request therefore never yields INTERNAL
(validation raises the domain errors) and never takes the server down.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from xai_serve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.serving.handlers import rewrap

__all__ = ["MAX_MESSAGE_BYTES", "ErrorInterceptor", "clip_message", "request_id_of", "status_of"]

log = logging.getLogger("xai_serve.serving")

_CODES: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
    (Cancelled, grpc.StatusCode.CANCELLED),
)


MAX_MESSAGE_BYTES = 1024
"""The most UTF-8 bytes of a status message. Messages quote what the client sent (an unknown
model name, a bad option value); a quote of unbounded size would make the status trailer
exceed the client's metadata limit (16 KiB: grpc then reports RESOURCE_EXHAUSTED "received
metadata size exceeds hard limit" instead of the real status)."""


def clip_message(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` if it fits in ``limit`` UTF-8 bytes, else its start and end with the middle
    left out (the start says what is wrong, the end often what is allowed)."""
    if len(message.encode("utf-8")) <= limit:
        return message
    head, tail = (limit * 5) // 8, (limit * 2) // 8
    cut_head = message.encode("utf-8")[:head].decode("utf-8", "ignore")
    cut_tail = message.encode("utf-8")[-tail:].decode("utf-8", "ignore")
    omitted = len(message) - len(cut_head) - len(cut_tail)
    return f"{cut_head} [... {omitted} characters left out ...] {cut_tail}"


def status_of(
    exc: BaseException, request_id: str = "", *, rpc: str = ""
) -> tuple[grpc.StatusCode, str]:
    """``(code, message)`` for ``exc``. Unexpected exceptions are logged with a fresh error id,
    the request id (the client's ``request_id``, or an OIP request's ``id``; ``''`` when it
    sent none) and the RPC, with the traceback, and answered INTERNAL with the error id and
    request id only: no internals leak."""
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code, clip_message(str(exc))
    if isinstance(exc, XaiServeError):
        return grpc.StatusCode.INVALID_ARGUMENT, clip_message(str(exc))
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "cancelled"
    error_id = uuid.uuid4().hex[:12]
    log.error(
        "internal error %s (request id %r%s): %s: %s",
        error_id,
        request_id,
        f", rpc {rpc}" if rpc else "",
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
    where = f" for request {request_id!r}" if request_id else ""
    message = f"internal error {error_id}{where}; see the server log"
    return grpc.StatusCode.INTERNAL, clip_message(message)


def request_id_of(request: Any) -> str:
    """The id a client gave its request: ``request_id`` (xai_serve.v1) or ``id`` (Open
    Inference Protocol); ``''`` for none."""
    for name in ("request_id", "id"):
        value = getattr(request, name, None)
        if isinstance(value, str) and value:
            return value
    return ""


Observer = Callable[[str, Any, str, float], None]
"""``observer(full_method, request_or_None, status_code_name, seconds)`` after each call."""


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of every handler to status codes (see :func:`status_of`) and reports
    each finished call to ``observer`` (metrics)."""

    def __init__(self, observer: Observer | None = None) -> None:
        self._observer = observer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method

        def wrap(behaviour: Callable[..., Any], requests: bool, responses: bool) -> Any:
            if responses:
                return self._wrap_stream(method, behaviour, streaming_requests=requests)
            return self._wrap_unary(method, behaviour, streaming_requests=requests)

        return rewrap(handler, wrap, request_deserializer=_tolerant(handler.request_deserializer))

    def _done(self, method: str, request: Any, code: grpc.StatusCode, start: float) -> None:
        if self._observer is not None:
            self._observer(method, request, code.name, time.monotonic() - start)

    def _wrap_unary(
        self, method: str, behaviour: Callable[..., Any], *, streaming_requests: bool = False
    ) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            # What the observer and the error message see: the request of a unary call; a
            # stream of requests is not one request (as for the streaming wrapper).
            seen = None if streaming_requests else request
            try:
                if streaming_requests:
                    request = _checked_stream(request)
                else:
                    _check_decoded(request)
                result = behaviour(request, context)
                if asyncio.iscoroutine(result):
                    result = await result
            except asyncio.CancelledError:
                self._done(method, seen, grpc.StatusCode.CANCELLED, start)
                raise
            except Exception as exc:
                if _aborted(exc):
                    self._done(method, seen, context.code() or grpc.StatusCode.UNKNOWN, start)
                    raise
                code, message = _unimplemented(exc, context) or status_of(
                    exc, request_id_of(seen), rpc=method
                )
                self._done(method, seen, code, start)
                await context.abort(code, message)
            self._done(method, seen, context.code() or grpc.StatusCode.OK, start)
            return result

        return wrapped

    def _wrap_stream(
        self, method: str, behaviour: Callable[..., Any], *, streaming_requests: bool = False
    ) -> Callable[..., Any]:
        def checked(request: Any) -> Any:
            """The request (or request stream) with undecodable messages raising InvalidInput
            where the handler reads them."""
            if streaming_requests:
                return _checked_stream(request)
            _check_decoded(request)
            return request

        def seen(request: Any) -> Any:
            """What the observer sees: the request of a call with one request (Evaluate); a
            stream of requests is not one request (ExplainStream records each itself)."""
            return None if streaming_requests else request

        async def failed(
            exc: Exception, context: grpc.aio.ServicerContext, start: float, request: Any
        ) -> None:
            if _aborted(exc):
                self._done(method, seen(request), context.code() or grpc.StatusCode.UNKNOWN, start)
                raise exc
            code, message = _unimplemented(exc, context) or status_of(
                exc, request_id_of(seen(request)), rpc=method
            )
            self._done(method, seen(request), code, start)
            await context.abort(code, message)

        if not inspect.isasyncgenfunction(behaviour):
            # A coroutine handler that streams with ``await context.write(...)`` (e.g. the
            # health service's Watch): the wrapper must be a coroutine too, since grpc.aio
            # picks the streaming style from the handler's kind.
            async def wrapped_coroutine(request: Any, context: grpc.aio.ServicerContext) -> None:
                start = time.monotonic()
                try:
                    await behaviour(checked(request), context)
                except asyncio.CancelledError:
                    self._done(method, seen(request), grpc.StatusCode.CANCELLED, start)
                    raise
                except Exception as exc:
                    await failed(exc, context, start, request)
                self._done(method, seen(request), context.code() or grpc.StatusCode.OK, start)

            return wrapped_coroutine

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            start = time.monotonic()
            try:
                async for item in behaviour(checked(request), context):
                    yield item
            except asyncio.CancelledError:
                self._done(method, seen(request), grpc.StatusCode.CANCELLED, start)
                raise
            except Exception as exc:
                await failed(exc, context, start, request)
            self._done(method, seen(request), context.code() or grpc.StatusCode.OK, start)

        return wrapped


class _Undecodable:
    """What the tolerant deserializer returns for bytes that are not a valid message: grpc
    would answer UNKNOWN for a deserializer's exception before any handler runs; this way the
    handler's wrapper answers INVALID_ARGUMENT instead."""

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Undecodable(f"the request message cannot be decoded: {exc}")

    return deserialize


def _check_decoded(request: Any) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidInput(request.message)


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _check_decoded(request)
        yield request


def _unimplemented(
    exc: BaseException, context: grpc.aio.ServicerContext
) -> tuple[grpc.StatusCode, str] | None:
    """UNIMPLEMENTED for a method a servicer does not override: the generated base class sets
    that code and raises NotImplementedError (e.g. grpc.health.v1's ``List``). Any other
    NotImplementedError (say, an operator missing on a device) stays an internal error."""
    if isinstance(exc, NotImplementedError) and context.code() == grpc.StatusCode.UNIMPLEMENTED:
        return grpc.StatusCode.UNIMPLEMENTED, context.details() or "method not implemented"
    return None


def _aborted(exc: BaseException) -> bool:
    """True for the exception ``context.abort`` raises (the status is already set)."""
    return isinstance(exc, grpc.aio.AbortError)
