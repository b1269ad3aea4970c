"""Prometheus metrics: exposition text and the /metrics HTTP endpoint."""

from __future__ import annotations

import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xai_serve.errors import InvalidInput, Unavailable
from xai_serve.serving.metrics import Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of an exposition text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _filled() -> Metrics:
    m = Metrics()
    m.observe_request("Explain", "lite0", "gradcam", "OK", 0.004)
    m.observe_request("Explain", "lite0", "gradcam", "OK", 0.2)
    m.observe_request("Explain", "lite0", "gradcam", "INVALID_ARGUMENT", 0.0005)
    m.observe_batch("lite0", "gradcam", 3)
    m.observe_batch("lite0", "gradcam", 16)
    m.set_queue_depth("lite0", 7)
    m.set_queue_depth("lite0", 5)
    m.inflight.inc(2)
    return m


def _get(s: dict, name: str, **labels: str) -> float:
    return s[(name, tuple(sorted(labels.items())))]


def test_render_counts_histograms_and_gauges() -> None:
    s = _samples(_filled().render().decode())
    lbl = {"rpc": "Explain", "model": "lite0", "method": "gradcam"}
    assert _get(s, "xai_serve_requests_total", code="OK", **lbl) == 2.0
    assert _get(s, "xai_serve_requests_total", code="INVALID_ARGUMENT", **lbl) == 1.0
    # Latency: 3 observations (0.0005, 0.004, 0.2), cumulative buckets.
    assert _get(s, "xai_serve_request_latency_seconds_count", **lbl) == 3.0
    assert _get(s, "xai_serve_request_latency_seconds_sum", **lbl) == pytest.approx(0.2045)
    by_le = {
        le: _get(s, "xai_serve_request_latency_seconds_bucket", le=le, **lbl)
        for le in ("0.001", "0.0025", "0.005", "0.1", "0.25", "60.0", "+Inf")
    }
    assert by_le == {
        "0.001": 1.0, "0.0025": 1.0, "0.005": 2.0, "0.1": 2.0, "0.25": 3.0, "60.0": 3.0,
        "+Inf": 3.0,
    }  # fmt: skip
    # Batch sizes 3 and 16 with buckets 1, 2, 4, ..., 128.
    batch = {dict(k[1])["le"]: v for k, v in s.items() if k[0] == "xai_serve_batch_size_bucket"}
    assert batch == {
        "1.0": 0.0, "2.0": 0.0, "4.0": 1.0, "8.0": 1.0, "16.0": 2.0, "32.0": 2.0,
        "64.0": 2.0, "128.0": 2.0, "+Inf": 2.0,
    }  # fmt: skip
    assert _get(s, "xai_serve_batch_size_sum", model="lite0", method="gradcam") == 19.0
    assert _get(s, "xai_serve_queue_depth", model="lite0") == 5.0
    assert _get(s, "xai_serve_inflight") == 2.0


def test_instances_are_independent() -> None:
    a, b = Metrics(), Metrics()  # a shared registry would raise "Duplicated timeseries"
    a.observe_batch("m", "saliency", 4)
    assert b"xai_serve_batch_size_count" not in b.render()
    assert b'xai_serve_batch_size_count{method="saliency",model="m"} 1.0' in a.render()


def test_http_endpoint_serves_metrics() -> None:
    m = _filled()
    port = m.start_http("127.0.0.1", 0)
    try:
        assert port > 0 and m.http_port == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            body = resp.read().decode()
        assert _get(_samples(body), "xai_serve_queue_depth", model="lite0") == 5.0
        with pytest.raises(InvalidInput, match="already runs"):
            m.start_http("127.0.0.1", 0)
    finally:
        m.stop_http()
    assert m.http_port is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    m.stop_http()  # idempotent


def test_http_port_in_use_is_unavailable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Unavailable, match=f"metrics_port.*{port}"):
            Metrics().start_http("127.0.0.1", port)
