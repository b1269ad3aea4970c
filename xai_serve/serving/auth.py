"""Transport security: bearer-token authentication and TLS server credentials.

:class:`TokenAuthInterceptor` checks ``authorization: Bearer <token>`` on every RPC except the
open ones (health by default) and refuses the others with ``UNAUTHENTICATED``. The comparison
runs in constant time against every accepted token, and no reply says which tokens exist.

:func:`server_credentials` turns a :class:`~xai_serve.serving.config.TlsConfig` into gRPC
server credentials; a ``client_ca`` makes it mutual TLS.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import grpc

from xai_serve.errors import InvalidInput, NotFound
from xai_serve.serving.config import TlsConfig
from xai_serve.serving.handlers import rewrap

__all__ = ["TokenAuthInterceptor", "abort_handler", "server_credentials"]

_log = logging.getLogger(__name__)

MISSING_TOKEN = "missing bearer token"
INVALID_TOKEN = "invalid bearer token"

# A refused request-streaming call first reads (and drops, unparsed) what the client sends, up to
# these bounds, before it aborts. Aborting while the client is still writing makes the grpc.aio
# client report INTERNAL "Internal error from Core" instead of UNAUTHENTICATED
# (grpc/grpc#36066); a client that half-closes within the bounds gets the right status.
DRAIN_MAX_MESSAGES = 64
DRAIN_MAX_SECONDS = 1.0


def _bearer_token(metadata: Sequence[Any] | None) -> str | None:
    """The token of the first ``authorization`` metadata entry, if it is ``Bearer <token>``."""
    for item in metadata or ():
        key, value = item[0], item[1]
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            return token
        return None
    return None


async def _drain(requests: AsyncIterator[Any]) -> None:
    """Read and drop up to DRAIN_MAX_MESSAGES requests for at most DRAIN_MAX_SECONDS, or until
    the client half-closes (see DRAIN_MAX_MESSAGES for why)."""

    async def consume() -> None:
        n = 0
        async for _ in requests:
            n += 1
            if n >= DRAIN_MAX_MESSAGES:
                return

    try:
        await asyncio.wait_for(consume(), DRAIN_MAX_SECONDS)
    except asyncio.TimeoutError:
        pass
    except Exception as exc:  # best effort: the call is refused whatever happens here
        _log.debug("draining a refused call's requests failed: %r", exc)


def abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that only aborts with ``code``.

    No (de)serialisers: the request bytes of a refused call are never parsed.
    """

    async def _abort(context: grpc.aio.ServicerContext) -> NoReturn:
        await context.abort(code, message)
        raise AssertionError("unreachable: context.abort raises")  # pragma: no cover

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _abort(context)

    async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        await _drain(requests)
        await _abort(context)

    async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await _abort(context)
        yield  # pragma: no cover - makes this an async generator

    async def stream_stream(
        requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        await _drain(requests)
        await _abort(context)
        yield  # pragma: no cover - makes this an async generator

    refusals = {
        (False, False): unary_unary,
        (True, False): stream_unary,
        (False, True): unary_stream,
        (True, True): stream_stream,
    }
    return rewrap(
        handler,
        lambda _behaviour, *kind: refusals[kind],
        request_deserializer=None,
        response_serializer=None,
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Require ``authorization: Bearer <token>`` metadata matching one of ``tokens``.

    Methods whose full name (``/package.Service/Method``) starts with one of ``open_prefixes``
    need no token (default: the gRPC health service, so load balancers can probe). Unknown
    methods are passed on (they fail with UNIMPLEMENTED as usual).
    """

    def __init__(
        self,
        tokens: Iterable[str],
        *,
        open_prefixes: tuple[str, ...] = ("/grpc.health.v1.Health/",),
    ) -> None:
        self._tokens = tuple(t.encode("utf-8") for t in frozenset(tokens))
        if not self._tokens or not all(self._tokens):
            raise InvalidInput("TokenAuthInterceptor needs at least one non-empty token")
        self._open_prefixes = tuple(open_prefixes)

    def check(self, metadata: Sequence[Any] | None) -> str | None:
        """None if the call is authorised, else the UNAUTHENTICATED message."""
        token = _bearer_token(metadata)
        if token is None:
            return MISSING_TOKEN
        given = token.encode("utf-8")
        ok = False
        for accepted in self._tokens:  # no early exit: the time does not depend on which one
            ok |= hmac.compare_digest(given, accepted)
        return None if ok else INVALID_TOKEN

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        """Pass authorised (or open) calls on; replace the handler of the others."""
        method = handler_call_details.method
        if method.startswith(self._open_prefixes):
            return await continuation(handler_call_details)
        refusal = self.check(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if refusal is None or handler is None:
            return handler
        _log.info("refused %s: %s", method, refusal)
        return abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, refusal)


def _read_pem(path: str, key: str) -> bytes:
    """The bytes of a PEM file named by config key ``key``; NotFound / InvalidInput otherwise."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise NotFound(f"{key}: cannot read {path!r}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise InvalidInput(f"{key}: {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """gRPC server credentials from the PEM files of ``tls``.

    With ``tls.client_ca`` the server requires a client certificate signed by that CA (mutual
    TLS). Unreadable files raise NotFound naming the config key (``tls.cert``, ...).
    """
    cert = _read_pem(tls.cert, "tls.cert")
    key = _read_pem(tls.key, "tls.key")
    client_ca = _read_pem(tls.client_ca, "tls.client_ca") if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )
