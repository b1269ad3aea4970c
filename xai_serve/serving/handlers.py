"""Re-wrapping gRPC method handlers: the one helper the server's interceptors share.

An interceptor that changes what a call does returns a new handler of the same kind (unary or
streaming requests, unary or streaming responses) whose behaviour wraps, or replaces, the one
it was given. :func:`rewrap` picks the kind and its grpc factory, so that each interceptor only
says how to wrap one behaviour.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

__all__ = ["Behaviour", "Wrap", "rewrap"]

Behaviour = Callable[..., Any]
"""A handler's behaviour: ``(request or request iterator, context) -> response(s)``."""

Wrap = Callable[[Behaviour, bool, bool], Behaviour]
"""``wrap(behaviour, request_streaming, response_streaming)``: the behaviour to install."""

_KEEP: Any = object()

# (request_streaming, response_streaming) -> (the handler's behaviour attribute, its factory)
_KINDS: dict[tuple[bool, bool], tuple[str, Callable[..., grpc.RpcMethodHandler]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}


def rewrap(
    handler: grpc.RpcMethodHandler,
    wrap: Wrap,
    *,
    request_deserializer: Callable[[bytes], Any] | None = _KEEP,
    response_serializer: Callable[[Any], bytes] | None = _KEEP,
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind whose behaviour is ``wrap(behaviour, request_streaming,
    response_streaming)``, with ``handler``'s (de)serialisers unless others are given (``None``
    for none: the call's bytes are then passed as they are).

    Raises:
        ValueError: ``handler`` has no behaviour of the kind its flags declare.
    """
    kind = (bool(handler.request_streaming), bool(handler.response_streaming))
    attribute, make = _KINDS[kind]
    behaviour = getattr(handler, attribute)
    if behaviour is None:
        raise ValueError(f"the handler declares a {attribute} method but has no {attribute}")
    return make(
        wrap(behaviour, *kind),
        request_deserializer=(
            handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
        ),
        response_serializer=(
            handler.response_serializer if response_serializer is _KEEP else response_serializer
        ),
    )
