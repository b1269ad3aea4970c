"""Prometheus metrics of one server.

Each :class:`Metrics` owns its own ``CollectorRegistry``, so several servers (tests) can live in
one process without "duplicated timeseries" errors. Metric names (all prefixed ``xai_serve_``):

- ``requests_total{rpc, model, method, code}``: finished RPCs by status code name;
- ``request_latency_seconds{rpc, model, method}``: RPC latency, 1 ms .. 60 s buckets;
- ``batch_size{model, method}``: images per batched forward/explain call;
- ``queue_depth{model}``: requests waiting for a batch;
- ``inflight``: RPCs being handled now;
- ``cache_hits_total{model, method}`` / ``cache_misses_total{model, method}``: lookups in the
  answer cache that found / did not find an answer (requests that may not be cached are not
  looked up, so they count in neither);
- ``cache_evictions_total{model}``: answers dropped to make room;
- ``cache_bytes`` / ``cache_entries``: what the answer cache holds now;
- ``explanation_quality{model, method, metric}``: quality figures of sampled answers
  (``[quality] sample_rate``; see :mod:`xai_serve.serving.quality`).
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from xai_serve.errors import InvalidInput, Unavailable

__all__ = ["BATCH_BUCKETS", "CONTENT_TYPE_LATEST", "LATENCY_BUCKETS", "QUALITY_BUCKETS", "Metrics"]

NAMESPACE = "xai_serve"
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# Quality figures: areas and probabilities in [0, 1] (fine steps), rank correlations (a
# negative one counts in the 0 bucket: no bucket below 0, so that the sum is still exported)
# and the unbounded ones (infidelity, max-sensitivity) on a coarse log scale.
QUALITY_BUCKETS = (
    0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 2.0, 5.0, 10.0, 100.0,
)  # fmt: skip


class Metrics:
    """The server's counters, histograms and gauges, and an optional ``/metrics`` endpoint."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests_total = Counter(
            "requests",
            "Finished RPCs by status code",
            ("rpc", "model", "method", "code"),
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.request_latency_seconds = Histogram(
            "request_latency_seconds",
            "RPC latency in seconds, from receipt to the last response byte handed to gRPC",
            ("rpc", "model", "method"),
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Images per batched model call",
            ("model", "method"),
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=BATCH_BUCKETS,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Requests waiting to be batched",
            ("model",),
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.inflight = Gauge(
            "inflight", "RPCs being handled now", namespace=NAMESPACE, registry=self.registry
        )
        self.cache_hits = Counter(
            "cache_hits",
            "Requests answered from the cache of exact answers",
            ("model", "method"),
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.cache_misses = Counter(
            "cache_misses",
            "Cacheable requests whose answer was not in the cache (computed)",
            ("model", "method"),
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.cache_evictions = Counter(
            "cache_evictions",
            "Answers dropped from the cache to make room (least recently used first)",
            ("model",),
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.cache_bytes = Gauge(
            "cache_bytes",
            "Bytes held by the cache of exact answers",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.cache_entries = Gauge(
            "cache_entries",
            "Answers held by the cache of exact answers",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.explanation_quality = Histogram(
            "explanation_quality",
            "Quality figures of sampled answers (see each metric's direction in ListModels)",
            ("model", "method", "metric"),
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=QUALITY_BUCKETS,
        )
        self._http: tuple[WSGIServer, threading.Thread] | None = None

    def observe_request(self, rpc: str, model: str, method: str, code: str, seconds: float) -> None:
        """Count one finished RPC (``code``: a status code name such as ``"OK"``) and its
        latency."""
        self.requests_total.labels(rpc, model, method, code).inc()
        self.request_latency_seconds.labels(rpc, model, method).observe(seconds)

    def observe_quality(self, model: str, method: str, metric: str, value: float) -> None:
        """Record one sampled answer's figure for ``metric``."""
        self.explanation_quality.labels(model, method, metric).observe(value)

    def observe_batch(self, model: str, method: str, size: int) -> None:
        """Record the size of one batched model call."""
        self.batch_size.labels(model, method).observe(size)

    def set_queue_depth(self, model: str, depth: int) -> None:
        """Set the number of requests waiting for ``model``."""
        self.queue_depth.labels(model).set(depth)

    def observe_cache(self, model: str, method: str, *, hit: bool) -> None:
        """Count one lookup in the answer cache."""
        (self.cache_hits if hit else self.cache_misses).labels(model, method).inc()

    def observe_cache_eviction(self, model: str) -> None:
        """Count one answer of ``model`` dropped from the cache to make room."""
        self.cache_evictions.labels(model).inc()

    def set_cache_size(self, held_bytes: int, entries: int) -> None:
        """Set what the answer cache holds now."""
        self.cache_bytes.set(held_bytes)
        self.cache_entries.set(entries)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric (content type
        :data:`CONTENT_TYPE_LATEST`)."""
        return generate_latest(self.registry)

    @property
    def http_port(self) -> int | None:
        """The port of the running ``/metrics`` endpoint, or None."""
        return None if self._http is None else int(self._http[0].server_port)

    def start_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` in a daemon thread; returns the bound port
        (``port=0`` picks a free one). Unavailable if the address cannot be bound."""
        if self._http is not None:
            raise InvalidInput(f"the metrics endpoint already runs on port {self.http_port}")
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise Unavailable(
                f"metrics_port: cannot listen on {host}:{port}: {exc.strerror or exc}"
            ) from None
        self._http = (server, thread)
        return int(server.server_port)

    def stop_http(self) -> None:
        """Stop the ``/metrics`` endpoint (no-op when it is not running)."""
        if self._http is None:
            return
        server, thread = self._http
        self._http = None
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)
