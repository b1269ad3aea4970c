"""The server: one ``grpc.aio`` server with the explain API, the Open Inference Protocol,
health and reflection on one port, plus Prometheus metrics on an HTTP port.

:func:`build_server` assembles an :class:`XaiServer` (not started). :meth:`XaiServer.start`
binds the port, starts answering (health says NOT_SERVING), then loads and warms every model
off the event loop, turning each model's health entry — and finally the overall one — to
SERVING. :meth:`XaiServer.stop` drains: health turns NOT_SERVING and the server itself refuses
new calls with UNAVAILABLE while the calls in flight finish, until none is in flight and none
has come for 0.1 s (or the grace period ends); then the gRPC server stops, cancelling what is
left. The server refuses calls itself, rather than stopping the gRPC server at once, because
grpc core answers a call that arrives as it stops, before any handler takes it, with CANCELLED
(grpc/grpc#41785), which clients do not retry; a client refused with UNAVAILABLE moves on.
:func:`serve` runs all of it until SIGTERM or SIGINT and returns the exit code.

Health service names: ``""`` (overall), ``xai_serve.v1.Explainer``,
``inference.GRPCInferenceService``, and each model's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from xai_serve.errors import InvalidInput, Unavailable, XaiServeError
from xai_serve.explainers.base import list_methods
from xai_serve.models import LoadedModel, load_model
from xai_serve.models.tuning import resolve_cache_dir as resolve_tuning_dir
from xai_serve.proto import explainer_pb2, open_inference_pb2
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.auth import TokenAuthInterceptor, abort_handler, server_credentials
from xai_serve.serving.batcher import set_torch_threads
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.errors import ErrorInterceptor
from xai_serve.serving.handlers import rewrap
from xai_serve.serving.metrics import Metrics
from xai_serve.serving.oip import InferenceServicer
from xai_serve.serving.servicer import ExplainerServicer
from xai_serve.serving.state import ServerState

if TYPE_CHECKING:
    from xai_serve.serving.http import HttpListener

__all__ = ["XaiServer", "build_server", "serve"]

log = logging.getLogger("xai_serve.serving")

EXPLAINER = explainer_pb2.DESCRIPTOR.services_by_name["Explainer"].full_name
INFERENCE = open_inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_PREFIX = f"/{health.SERVICE_NAME}/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class InflightInterceptor(grpc.aio.ServerInterceptor):
    """Keeps the ``inflight`` gauge: +1 when a call's handler starts, -1 when it returns, fails
    or is cancelled (a stream counts once, for its whole life). Outermost, so refused calls
    count too while they are being refused. Health calls are left out: a load balancer's
    ``Watch`` lasts as long as its connection and is no work. ``count`` is the same number, read
    by the drain (all on the event loop)."""

    def __init__(self, metrics: Metrics) -> None:
        self._gauge = metrics.inflight
        self.count = 0

    def _enter(self) -> None:
        self.count += 1
        self._gauge.inc()

    def _leave(self) -> None:
        self.count -= 1
        self._gauge.dec()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        return rewrap(
            handler,
            lambda behaviour, _requests, responses: (
                self._stream(behaviour) if responses else self._unary(behaviour)
            ),
        )

    def _unary(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self._enter()
            try:
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result
            finally:
                self._leave()

        return wrapped

    def _stream(self, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            self._enter()
            try:
                result = behaviour(request, context)
                if hasattr(result, "__aiter__"):
                    async for item in result:
                        yield item
                elif inspect.isawaitable(result):  # writes with context.write()
                    await result
                elif result is not None:
                    for item in result:
                        yield item
            finally:
                self._leave()

        return wrapped


class DrainingInterceptor(grpc.aio.ServerInterceptor):
    """While the server drains, refuses every new call but health with UNAVAILABLE and notes
    when it last did (see the module doc)."""

    MESSAGE = "the server is shutting down; retry on another replica"

    def __init__(self, state: ServerState) -> None:
        self._state = state
        self.last_refusal = 0.0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not self._state.draining or details.method.startswith(HEALTH_PREFIX):
            return handler
        self.last_refusal = time.monotonic()
        return abort_handler(handler, grpc.StatusCode.UNAVAILABLE, self.MESSAGE)


class XaiServer:
    """A configured server; see the module doc. ``models`` (already loaded) skip loading."""

    def __init__(self, config: ServerConfig, models: Sequence[LoadedModel] | None = None) -> None:
        self.config = config
        self._preloaded = list(models) if models is not None else None
        names = [m.name for m in models] if models is not None else [m.name for m in config.models]
        if len(set(names)) != len(names):
            raise InvalidInput(f"model names must be unique, got {names}")
        self.metrics = Metrics()
        self.state = ServerState(
            names, config.limits, self.metrics, config.cache, config.quality, config.concepts
        )
        self.health = health.aio.HealthServicer()
        self._inflight = InflightInterceptor(self.metrics)
        self._draining = DrainingInterceptor(self.state)
        # stop(): refuse new calls until none is in flight and none came for drain_quiet_s
        self.drain_quiet_s = 0.1
        interceptors: list[grpc.aio.ServerInterceptor] = [self._inflight, self._draining]
        if config.auth is not None:
            interceptors.append(TokenAuthInterceptor(config.auth.load_tokens()))
        interceptors.append(ErrorInterceptor(self._observe))
        limit = config.limits.max_message_bytes
        options: list[tuple[str, int]] = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ]
        if config.max_connection_age_s is not None:
            # A GOAWAY at that age (gRPC jitters it by up to 10% so that clients do not all
            # reconnect at once): new calls go over a new connection, while the calls already
            # on the old one run to completion (no max_connection_age_grace_ms: unbounded), so
            # recycling never cuts off a long ExplainStream.
            age_ms = max(1, round(config.max_connection_age_s * 1e3))
            options.append(("grpc.max_connection_age_ms", age_ms))
        self.grpc = grpc.aio.server(interceptors=interceptors, options=options)
        pb_grpc.add_ExplainerServicer_to_server(ExplainerServicer(self.state), self.grpc)
        oip_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.state), self.grpc
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection(
            (EXPLAINER, INFERENCE, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc
        )
        address = f"{config.host}:{config.port}"
        try:
            if config.tls is not None:
                self.port = self.grpc.add_secure_port(address, server_credentials(config.tls))
            else:
                self.port = self.grpc.add_insecure_port(address)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            raise Unavailable(
                f"cannot listen on {address} (port in use, or host not an address of this "
                f"machine?): {exc}"
            ) from None
        self.metrics_port: int | None = None
        self._methods = set(list_methods())
        self.http: HttpListener | None = None
        if config.http_port is not None:
            self.http = _http_listener(config, self.state)

    @property
    def http_port(self) -> int | None:
        """The bound port of the HTTP listener (KServe v1 / OIP REST), or None."""
        return None if self.http is None else self.http.port

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Start answering, then load and warm the models; returns when all are done (a model
        that fails to load is logged and recorded in ``state.failed``)."""
        await self.start_serving()
        await self.load_models()

    async def start_serving(self) -> None:
        """Start answering calls (health NOT_SERVING until :meth:`load_models` is done)."""
        set_torch_threads(1)  # the event loop's own torch ops (see set_torch_threads)
        for name in ("", EXPLAINER, INFERENCE, *self.state.names):
            await self.health.set(name, NOT_SERVING)
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.start_http(
                self.config.metrics_host, self.config.metrics_port
            )
        if self.config.tls is None:
            tls = "plaintext"
        else:
            tls = "mutual TLS" if self.config.tls.client_ca else "TLS"
        metrics = ""
        if self.metrics_port is not None:
            metrics = f", metrics on http://{self.config.metrics_host}:{self.metrics_port}/metrics"
        if self.http is not None:
            metrics += f", HTTP (KServe v1, OIP v2) on port {self.http_port}"
        log.info(
            "listening on %s:%d (%s, auth %s)%s",
            self.config.host,
            self.port,
            tls,
            "on" if self.config.auth else "off",
            metrics,
        )
        if self.state.cache is not None:
            log.info(
                "answer cache: up to %.1f MiB of exact answers",
                self.state.cache.max_bytes / 2**20,
            )

    async def load_models(self) -> None:
        """Load and warm every model (or register the preloaded ones); then the overall health
        turns SERVING if all of them are ready."""
        if self._preloaded is not None:
            for model in self._preloaded:
                self.state.add_model(model, max_queue=self.config.limits.max_queue)
                await self.health.set(model.name, SERVING)
        else:
            await asyncio.gather(*(self._load(cfg) for cfg in self.config.models))
        if self.state.ready:
            for name in ("", EXPLAINER, INFERENCE):
                await self.health.set(name, SERVING)
            log.info("ready: %s", ", ".join(self.state.names))

    async def _load(self, cfg: Any) -> None:
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        allowed = [Path(d) for d in self.config.model_dirs] or None
        tuning_dir = resolve_tuning_dir(self.config.tuning_dir)

        def load() -> LoadedModel:
            model = load_model(cfg, allowed_dirs=allowed)
            if self.config.warmup:
                model.warmup(cache_dir=tuning_dir)
            if self.state.cache is not None:  # digest the weights here, off the event loop
                self.state.cache.prepare(model)
            return model

        try:
            model = await loop.run_in_executor(self.state.workers.get(str(cfg.device)), load)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            expected = isinstance(exc, XaiServeError)
            if not expected and cfg.path:  # a loader bug or an odd file: say which file
                reason += f" (while loading {cfg.path})"
            self.state.failed[cfg.name] = reason
            log.error(
                "model %r failed to load: %s", cfg.name, reason, exc_info=None if expected else exc
            )
            return
        self.state.add_model(model, max_queue=self.config.limits.max_queue)
        await self.health.set(model.name, SERVING)
        log.info(
            "loaded model %r (%s) on %s in %.1f s: input %s, %d classes, %d methods, "
            "default layer %s, max batch %d",
            model.name,
            cfg.source,
            model.device,
            time.monotonic() - start,
            "x".join(map(str, model.input_shape)),
            model.num_classes,
            len(model.methods),
            model.default_layer,
            model.max_batch_size,
        )
        report = model.path.report
        log.info(
            "model %r forward path: %s",
            model.name,
            report.summary() if report is not None else f"{model.path.describe()} (not tuned)",
        )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, let in-flight ones finish within ``grace`` seconds (default:
        the configured grace), then release everything."""
        grace = self.config.grace_s if grace is None else grace
        began = time.monotonic()
        self.state.draining = True
        await self.health.enter_graceful_shutdown()
        while time.monotonic() - began < grace:
            quiet = time.monotonic() - max(began, self._draining.last_refusal)
            http_busy = self.http is not None and self.http.inflight > 0
            if self._inflight.count == 0 and not http_busy and quiet >= self.drain_quiet_s:
                break  # the work is done and nobody is sending here any more
            await asyncio.sleep(0.02)
        if self.http is not None:
            await self.http.stop(max(0.0, grace - (time.monotonic() - began)))
        await self.grpc.stop(max(0.0, grace - (time.monotonic() - began)))
        await self.state.close()
        self.metrics.stop_http()

    # ------------------------------------------------------------------ metrics

    def _observe(self, full_method: str, request: Any, code: str, seconds: float) -> None:
        if request is None:  # streams: ExplainStream records each of its requests itself
            return
        rpc = full_method.rsplit("/", 1)[-1]
        model = getattr(request, "model", None) or getattr(request, "model_name", "") or ""
        method = getattr(request, "method", "") or ""
        if model and model not in self.state.names:
            model = "<unknown>"  # never let clients create label values
        if method and method not in self._methods:
            method = "<unknown>"
        self.metrics.observe_request(rpc, model, method, code, seconds)


def _http_listener(config: ServerConfig, state: ServerState) -> HttpListener:
    """The HTTP listener of ``http_port``. Its ASGI stack (FastAPI, uvicorn) is an optional
    dependency, the ``http`` extra, imported only by a server that serves HTTP."""
    try:
        from xai_serve.serving.http import HttpConfig, HttpFront, HttpListener
    except ImportError as exc:
        raise InvalidInput(
            f"http_port needs the HTTP extra ({exc.name} is not installed): "
            "pip install 'xai-serve[http]'"
        ) from None
    tokens = config.auth.load_tokens() if config.auth is not None else None
    return HttpListener(HttpConfig.of(config), HttpFront(state, tokens))


def build_server(config: ServerConfig, models: Sequence[LoadedModel] | None = None) -> XaiServer:
    """An :class:`XaiServer` for ``config`` (bound, not started)."""
    return XaiServer(config, models)


async def _serve(config: ServerConfig) -> int:
    server = build_server(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = loop.create_task(server.start())
    stopping = loop.create_task(stop.wait())
    done, _ = await asyncio.wait({loading, stopping}, return_when="FIRST_COMPLETED")
    if loading in done:
        try:
            loading.result()
        except BaseException:  # e.g. the metrics port is taken: release the gRPC port too
            stopping.cancel()
            await server.stop(0)
            raise
        if server.state.failed:
            log.error("not all models loaded; shutting down")
            stopping.cancel()
            await server.stop(0)
            return 1
        await stopping
    else:  # stopped while loading: no model may register on a closing server
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
    log.info("shutting down: draining in-flight requests (grace %.1f s)", config.grace_s)
    await server.stop(config.grace_s)
    log.info("stopped")
    return 0


def serve(config: ServerConfig) -> int:
    """Run a server for ``config`` until SIGTERM/SIGINT; drain; return the exit code (0, or 1
    when a model failed to load)."""
    return asyncio.run(_serve(config))
