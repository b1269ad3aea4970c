"""The one handler re-wrapping helper (xai_serve.serving.handlers.rewrap) and the interceptors
built on it, over all four kinds of gRPC method, against a real grpc.aio server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import pytest

from xai_serve.errors import InvalidInput
from xai_serve.serving.auth import TokenAuthInterceptor
from xai_serve.serving.errors import ErrorInterceptor
from xai_serve.serving.handlers import rewrap
from xai_serve.serving.metrics import Metrics
from xai_serve.serving.server import InflightInterceptor

TIMEOUT = 10.0

# kind -> (request_streaming, response_streaming, factory, behaviour attribute)
KINDS: dict[str, tuple[bool, bool, Callable[..., grpc.RpcMethodHandler], str]] = {
    "unary_unary": (False, False, grpc.unary_unary_rpc_method_handler, "unary_unary"),
    "stream_unary": (True, False, grpc.stream_unary_rpc_method_handler, "stream_unary"),
    "unary_stream": (False, True, grpc.unary_stream_rpc_method_handler, "unary_stream"),
    "stream_stream": (True, True, grpc.stream_stream_rpc_method_handler, "stream_stream"),
}
BEHAVIOURS = ("unary_unary", "stream_unary", "unary_stream", "stream_stream")


def _deserialize(data: bytes) -> bytes:
    return data


def _serialize(message: bytes) -> bytes:
    return message


@pytest.mark.parametrize("kind", list(KINDS))
def test_rewrap_keeps_the_kind_and_the_serialisers(kind: str) -> None:
    requests, responses, make, attribute = KINDS[kind]

    def original(request: Any, context: Any) -> None:
        return None

    def replacement(request: Any, context: Any) -> None:
        return None

    seen: list[tuple[Any, bool, bool]] = []

    def wrap(behaviour: Any, req: bool, resp: bool) -> Any:
        seen.append((behaviour, req, resp))
        return replacement

    handler = make(original, request_deserializer=_deserialize, response_serializer=_serialize)
    out = rewrap(handler, wrap)
    assert seen == [(original, requests, responses)]
    assert (out.request_streaming, out.response_streaming) == (requests, responses)
    for name in BEHAVIOURS:
        assert getattr(out, name) is (replacement if name == attribute else None)
    assert out.request_deserializer is _deserialize
    assert out.response_serializer is _serialize

    bare = rewrap(handler, wrap, request_deserializer=None, response_serializer=None)
    assert bare.request_deserializer is None and bare.response_serializer is None
    assert getattr(bare, attribute) is replacement


def test_rewrap_refuses_a_handler_without_the_behaviour_it_declares() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda r, c: r)._replace(unary_unary=None)
    with pytest.raises(ValueError, match="declares a unary_unary method but has no unary_unary"):
        rewrap(handler, lambda b, req, resp: b)


# --------------------------------------------------------------------------------------------
# The interceptors, one call of each kind
# --------------------------------------------------------------------------------------------


class _Service:
    """``test.Kinds/<kind>``: each method reads its request(s), notes the in-flight count (0
    without an InflightInterceptor) and raises InvalidInput naming its kind."""

    def __init__(self) -> None:
        self.inflight: InflightInterceptor | None = None
        self.counts: list[int] = []

    def _note(self) -> None:
        self.counts.append(self.inflight.count if self.inflight is not None else 0)

    def handler(self) -> grpc.GenericRpcHandler:
        async def unary_unary(request: bytes, context: Any) -> bytes:
            self._note()
            raise InvalidInput(f"bad unary_unary {request!r}")

        async def stream_unary(requests: AsyncIterator[bytes], context: Any) -> bytes:
            got = [r async for r in requests]
            self._note()
            raise InvalidInput(f"bad stream_unary {got!r}")

        async def unary_stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            self._note()
            yield b"first"
            raise InvalidInput(f"bad unary_stream {request!r}")

        async def stream_stream(
            requests: AsyncIterator[bytes], context: Any
        ) -> AsyncIterator[bytes]:
            got = [r async for r in requests]
            self._note()
            yield b"first"
            raise InvalidInput(f"bad stream_stream {got!r}")

        behaviours = {
            "unary_unary": unary_unary,
            "stream_unary": stream_unary,
            "unary_stream": unary_stream,
            "stream_stream": stream_stream,
        }
        return grpc.method_handlers_generic_handler(
            "test.Kinds",
            {name: KINDS[name][2](fn) for name, fn in behaviours.items()},
        )


@contextlib.asynccontextmanager
async def _server(
    service: _Service, interceptors: Sequence[grpc.aio.ServerInterceptor]
) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((service.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


async def _call(
    channel: grpc.aio.Channel, kind: str, metadata: Any = None
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    requests, responses, _, _ = KINDS[kind]
    method = f"/test.Kinds/{kind}"
    arg = iter([b"a", b"b"]) if requests else b"x"
    factory = {
        (False, False): channel.unary_unary,
        (True, False): channel.stream_unary,
        (False, True): channel.unary_stream,
        (True, True): channel.stream_stream,
    }[(requests, responses)]
    call = factory(method)(arg, metadata=metadata, timeout=TIMEOUT)
    received: list[bytes] = []
    try:
        if responses:
            async for item in call:
                received.append(item)
        else:
            received.append(await call)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", received
    return grpc.StatusCode.OK, "", received


def test_error_and_inflight_interceptors_wrap_every_kind() -> None:
    """Every kind, stream_unary included, gets its domain error mapped to its status code, is
    observed once, and counts as in flight while it runs."""
    observed: list[tuple[str, str]] = []
    service = _Service()
    service.inflight = InflightInterceptor(Metrics())

    def observer(method: str, request: Any, code: str, seconds: float) -> None:
        observed.append((method, code))

    async def body() -> None:
        async with _server(service, [service.inflight, ErrorInterceptor(observer)]) as channel:
            for kind in KINDS:
                code, details, _ = await _call(channel, kind)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (kind, code, details)
                assert details.startswith(f"bad {kind} "), details

    asyncio.run(body())
    assert observed == [(f"/test.Kinds/{kind}", "INVALID_ARGUMENT") for kind in KINDS]
    assert service.counts == [1, 1, 1, 1]
    assert service.inflight.count == 0


def test_token_refusal_covers_every_kind() -> None:
    service = _Service()

    async def body() -> None:
        async with _server(service, [TokenAuthInterceptor({"t0ken"})]) as channel:
            for kind in KINDS:
                code, details, received = await _call(channel, kind)
                assert (code, details, received) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing bearer token",
                    [],
                ), kind
                authorised = (("authorization", "Bearer t0ken"),)
                code, details, _ = await _call(channel, kind, authorised)
                assert code == grpc.StatusCode.UNKNOWN, (kind, code)  # no ErrorInterceptor here

    asyncio.run(body())
    assert len(service.counts) == len(KINDS)  # only the authorised calls reached the service
