"""Bearer-token auth and TLS against a real grpc.aio server on 127.0.0.1.

The server hosts a fake ``test.Echo`` service (one unary-unary and one stream-stream method,
raw bytes in and out) plus the standard health service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.serving.certs import have_openssl, make_certs
from xai_serve.errors import InvalidInput, NotFound
from xai_serve.serving import auth
from xai_serve.serving.auth import TokenAuthInterceptor, server_credentials
from xai_serve.serving.config import TlsConfig

TOKENS = frozenset({"s3cret-token", "other.token_2"})
UNARY = "/test.Echo/Unary"
STREAM = "/test.Echo/Stream"
TIMEOUT = 10.0

needs_openssl = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b"echo:" + request


async def _stream(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for r in requests:
        yield b"echo:" + r


def _echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        },
    )


@contextlib.asynccontextmanager
async def _server(
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[int]:
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers((_echo_handler(),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    try:
        yield port
    finally:
        await server.stop(None)


async def _call_unary(channel: grpc.aio.Channel, metadata: Any = None) -> bytes:
    fn = channel.unary_unary(UNARY)
    return await fn(b"hi", metadata=metadata, timeout=TIMEOUT)


async def _call_stream(channel: grpc.aio.Channel, metadata: Any = None) -> list[bytes]:
    fn = channel.stream_stream(STREAM)
    call = fn(iter([b"a", b"b"]), metadata=metadata, timeout=TIMEOUT)
    return [r async for r in call]


async def _code(coro: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await coro
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(fn())


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def test_token_interceptor_refuses_and_accepts() -> None:
    async def body() -> None:
        async with (
            _server([TokenAuthInterceptor(TOKENS)]) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            for call in (_call_unary, _call_stream):
                assert await _code(call(ch)) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "missing bearer token",
                )
                wrong = (("authorization", "Bearer s3cret-tokem"),)
                assert await _code(call(ch, wrong)) == (
                    grpc.StatusCode.UNAUTHENTICATED,
                    "invalid bearer token",
                )
                basic = (("authorization", "Basic s3cret-token"),)
                code, details = await _code(call(ch, basic))
                assert code == grpc.StatusCode.UNAUTHENTICATED
                assert "s3cret" not in details
            good = (("authorization", "Bearer s3cret-token"),)
            assert await _call_unary(ch, good) == b"echo:hi"
            assert await _call_stream(ch, good) == [b"echo:a", b"echo:b"]
            # The other token works too; the scheme is case-insensitive.
            other = (("authorization", "bearer other.token_2"),)
            assert await _call_unary(ch, other) == b"echo:hi"
            # Health is open without a token.
            stub = health_pb2_grpc.HealthStub(ch)
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

    _run(body)


def test_refused_streams_get_unauthenticated_not_internal() -> None:
    """A refused request stream reads what the client sends before aborting, so the grpc.aio
    client reports UNAUTHENTICATED rather than INTERNAL (grpc/grpc#36066, a race)."""

    async def body() -> None:
        async with (
            _server([TokenAuthInterceptor(TOKENS)]) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            wrong = (("authorization", "Bearer nope"),)
            for _ in range(40):
                code, _details = await _code(_call_stream(ch, wrong))
                assert code == grpc.StatusCode.UNAUTHENTICATED

    _run(body)


def test_refused_stream_that_never_half_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "DRAIN_MAX_SECONDS", 0.2)

    async def body() -> None:
        never = asyncio.Event()

        async def requests() -> AsyncIterator[bytes]:
            yield b"a"
            await never.wait()

        async with (
            _server([TokenAuthInterceptor(TOKENS)]) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            loop = asyncio.get_running_loop()
            start = loop.time()
            call = ch.stream_stream(STREAM)(requests(), timeout=TIMEOUT)
            code, details = await _code(_collect(call))
            assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
            assert 0.15 < loop.time() - start < 5.0

    _run(body)


async def _collect(call: Any) -> list[bytes]:
    return [r async for r in call]


def test_open_prefixes_and_unknown_methods() -> None:
    async def body() -> None:
        interceptor = TokenAuthInterceptor(TOKENS, open_prefixes=("/test.Echo/Un",))
        async with (
            _server([interceptor]) as port,
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch,
        ):
            assert await _call_unary(ch) == b"echo:hi"  # open now
            code, _ = await _code(_call_stream(ch))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            # Health is no longer open: open_prefixes replaced the default.
            stub = health_pb2_grpc.HealthStub(ch)
            code, _ = await _code(stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            unknown = ch.unary_unary("/test.Echo/Nope")
            code, _ = await _code(unknown(b"", timeout=TIMEOUT))
            assert code == grpc.StatusCode.UNIMPLEMENTED

    _run(body)


def test_interceptor_needs_tokens() -> None:
    with pytest.raises(InvalidInput):
        TokenAuthInterceptor(frozenset())
    with pytest.raises(InvalidInput):
        TokenAuthInterceptor(frozenset({""}))


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not have_openssl():
        pytest.skip("needs the openssl command")
    return make_certs(tmp_path_factory.mktemp("tls"))


def _tls_channel(port: int, certs: dict[str, Path], *, client_cert: bool) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=certs["ca"].read_bytes(),
        private_key=certs["client_key"].read_bytes() if client_cert else None,
        certificate_chain=certs["client_cert"].read_bytes() if client_cert else None,
    )
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}", creds, options=(("grpc.ssl_target_name_override", "localhost"),)
    )


@needs_openssl
def test_tls_accepts_tls_client_and_refuses_plaintext(certs: dict[str, Path]) -> None:
    tls = TlsConfig(cert=str(certs["server_cert"]), key=str(certs["server_key"]))

    async def body() -> None:
        async with _server(credentials=server_credentials(tls)) as port:
            async with _tls_channel(port, certs, client_cert=False) as ch:
                assert await _call_unary(ch) == b"echo:hi"
                assert await _call_stream(ch) == [b"echo:a", b"echo:b"]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                code, _ = await _code(_call_unary(ch))
                assert code == grpc.StatusCode.UNAVAILABLE

    _run(body)


@needs_openssl
def test_mutual_tls_requires_client_certificate(certs: dict[str, Path]) -> None:
    tls = TlsConfig(
        cert=str(certs["server_cert"]), key=str(certs["server_key"]), client_ca=str(certs["ca"])
    )

    async def body() -> None:
        async with _server(credentials=server_credentials(tls)) as port:
            async with _tls_channel(port, certs, client_cert=True) as ch:
                assert await _call_unary(ch) == b"echo:hi"
            async with _tls_channel(port, certs, client_cert=False) as ch:
                code, _ = await _code(_call_unary(ch))
                assert code == grpc.StatusCode.UNAVAILABLE

    _run(body)


@needs_openssl
def test_tls_and_tokens_together(certs: dict[str, Path]) -> None:
    tls = TlsConfig(cert=str(certs["server_cert"]), key=str(certs["server_key"]))

    async def body() -> None:
        creds = server_credentials(tls)
        async with (
            _server([TokenAuthInterceptor(TOKENS)], creds) as port,
            _tls_channel(port, certs, client_cert=False) as ch,
        ):
            code, _ = await _code(_call_unary(ch))
            assert code == grpc.StatusCode.UNAUTHENTICATED
            assert await _call_unary(ch, (("authorization", "Bearer s3cret-token"),)) == b"echo:hi"

    _run(body)


def test_server_credentials_errors_name_the_key(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(NotFound, match=r"tls\.cert"):
        server_credentials(TlsConfig(cert=str(tmp_path / "missing.pem"), key=str(pem)))
    with pytest.raises(NotFound, match=r"tls\.key"):
        server_credentials(TlsConfig(cert=str(pem), key=str(tmp_path / "missing.key")))
    with pytest.raises(NotFound, match=r"tls\.client_ca"):
        server_credentials(TlsConfig(cert=str(pem), key=str(pem), client_ca=str(tmp_path / "n")))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(InvalidInput, match=r"tls\.key.*not a PEM"):
        server_credentials(TlsConfig(cert=str(pem), key=str(junk)))
