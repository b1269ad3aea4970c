"""The HTTP listener's edges: bodies past the server's request-size limit (413, refused before
they are read), the ``X-Request-Timeout`` deadline (the job's deadline as a gRPC call's is:
504 when it passes, in the queue or in the compute; 400 for a bad header), and the mapping of
every kind of bad request to its HTTP status with a JSON message (never a 500)."""

from __future__ import annotations

import base64
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from tests._peers import require_installed
from tests.serving.harness import ServerThread, random_png, tiny_model
from tests.serving.test_server import Gate, request, stub_of
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.serving.config import LimitsConfig, ServerConfig

require_installed("httpx")
import httpx  # noqa: E402

MODEL = "tiny"  # tests.serving.test_server.NAME: its Gate wraps this model's batcher
LIMIT = 64 * 1024  # max_message_bytes of these servers
TIMEOUT_HEADER = "X-Request-Timeout"


def _png(seed: int) -> bytes:
    return random_png(seed, (64, 64))


def _config(**kw: Any) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1", port=0, http_port=0, warmup=False,
        limits=LimitsConfig(max_message_bytes=LIMIT), **kw,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(_config(), [tiny_model(MODEL, max_delay_ms=5.0)]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpx.Client]:
    assert server.server is not None and server.server.http_port
    with httpx.Client(base_url=f"http://127.0.0.1:{server.server.http_port}", timeout=60) as c:
        yield c


def _explain_body(seed: int = 1, **params: Any) -> dict[str, Any]:
    png = base64.b64encode(_png(seed)).decode()
    return {"instances": [{"b64": png}], "parameters": {"method": "gradcam", **params}}


def _error_of(r: httpx.Response, status: int) -> str:
    """The JSON error message of a ``status`` answer."""
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], body
    assert "Traceback" not in body["error"]
    return body["error"]


# ------------------------------------------------------------------ 413: request size


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}:explain", f"/v2/models/{MODEL}/infer"])
def test_a_body_past_max_message_bytes_is_413(http: httpx.Client, path: str) -> None:
    at_limit = b" " * LIMIT  # not JSON: read, then refused as bad input
    assert "JSON" in _error_of(http.post(path, content=at_limit), 400)
    message = _error_of(http.post(path, content=at_limit + b" "), 413)
    assert f"{LIMIT + 1} bytes" in message and "max_message_bytes" in message
    # a valid request just under the limit is answered
    assert http.post(f"/v1/models/{MODEL}:explain", json=_explain_body()).status_code == 200


def test_a_declared_length_past_the_limit_is_refused_before_any_body_is_read(
    server: ServerThread,
) -> None:
    """A request that claims a terabyte and sends none of it gets its 413 at once: the server
    answers from the Content-Length header and never waits for (or reads) the body."""
    assert server.server is not None
    with socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/{MODEL}:explain HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n".encode()
        )
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        elapsed = time.monotonic() - start
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), answer
    assert "1000000000000 bytes" in json.loads(body)["error"]
    assert elapsed < 5


def test_a_streamed_body_past_the_limit_is_413(http: httpx.Client) -> None:
    """A chunked body (no Content-Length) a little past the limit: 413 once it passes it (the
    little more is read and dropped), and the connection goes on."""

    def chunks() -> Iterator[bytes]:
        for _ in range((LIMIT + 256 * 1024) // 4096):
            yield b"[" * 4096

    for _ in range(3):
        message = _error_of(http.post(f"/v1/models/{MODEL}:explain", content=chunks()), 413)
        assert f"exceeds {LIMIT} bytes" in message
        assert http.get("/v1/models").json() == {"models": [MODEL]}


def test_an_endless_streamed_body_is_cut_off(server: ServerThread) -> None:
    """A chunked body that never ends: the server reads at most DRAIN_BYTES past the limit,
    answers 413 and closes the connection; the client could send little more than that (plus
    what the sockets buffer), not the gigabyte it meant to."""
    from xai_serve.serving.http import DRAIN_BYTES

    assert server.server is not None
    sock = socket.create_connection(("127.0.0.1", server.server.http_port), timeout=10)
    sent, answer = 0, b""
    chunk = b"1000\r\n" + b"[" * 4096 + b"\r\n"
    with sock:
        sock.sendall(
            f"POST /v1/models/{MODEL}:explain HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
        )
        sock.setblocking(False)
        deadline = time.monotonic() + 30
        while sent < 1 << 30 and time.monotonic() < deadline:
            try:
                got = sock.recv(65536)
                if not got:
                    break
                answer += got
            except BlockingIOError:
                pass
            except ConnectionResetError:
                break
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
    assert sent < LIMIT + DRAIN_BYTES + 16 * 1024 * 1024, sent  # the server stopped reading
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413 "), answer[:200]


# ------------------------------------------------------------------ deadline header


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "", "1e12", "2s"])
def test_a_bad_timeout_header_is_400(http: httpx.Client, value: str) -> None:
    r = http.post(
        f"/v1/models/{MODEL}:explain", json=_explain_body(), headers={TIMEOUT_HEADER: value}
    )
    assert TIMEOUT_HEADER in _error_of(r, 400)


def test_a_deadline_that_does_not_pass_changes_nothing(http: httpx.Client) -> None:
    url = f"/v1/models/{MODEL}:explain"
    plain = http.post(url, json=_explain_body(7, target=2))
    timed = http.post(url, json=_explain_body(7, target=2), headers={TIMEOUT_HEADER: "30"})
    assert plain.status_code == timed.status_code == 200, (plain.text, timed.text)
    a, b = plain.json()["explanations"][0], timed.json()["explanations"][0]
    assert (a["target"], a["layer"]) == (b["target"], b["layer"]) == (2, b["layer"])
    np.testing.assert_allclose(np.array(a["map"]), np.array(b["map"]), atol=1e-6)


def _metrics_count(s: ServerThread, rpc: str, code: str) -> float:
    assert s.server is not None
    labels = {"rpc": rpc, "model": MODEL, "method": "gradcam", "code": code}
    value = s.server.metrics.registry.get_sample_value("xai_serve_requests_total", labels)
    return value or 0.0


def test_deadline_in_the_queue_is_504_and_never_computed() -> None:
    """As a gRPC call's deadline (tests.serving.test_server.
    test_deadline_in_queue_is_never_computed): a request whose X-Request-Timeout passes while
    it waits behind a busy batch is answered 504 and never computed."""
    with ServerThread(_config(), [tiny_model(MODEL, max_delay_ms=5.0)]) as s:
        assert s.server is not None
        base = f"http://127.0.0.1:{s.server.http_port}"
        rpc = "http:/v1/models/{m}:explain"
        with Gate(s, blocked=True) as gate, httpx.Client(base_url=base, timeout=60) as http:
            channel, stub = stub_of(s)
            with channel:
                x = torch.randn(3, 64, 64)
                busy = stub.Explain.future(request(x, target=1, request_id="busy"), timeout=60)
                assert gate.entered.wait(60)
                before = _metrics_count(s, rpc, "DEADLINE_EXCEEDED")
                start = time.monotonic()
                r = http.post(
                    f"/v1/models/{MODEL}:explain", json=_explain_body(3),
                    headers={TIMEOUT_HEADER: "0.2"},
                )  # fmt: skip
                elapsed = time.monotonic() - start
                assert "deadline" in _error_of(r, 504)
                assert 0.2 <= elapsed < 5
                assert _metrics_count(s, rpc, "DEADLINE_EXCEEDED") == before + 1
                gate.open.set()
                assert busy.result(timeout=60).target == 1
                after = http.post(f"/v1/models/{MODEL}:explain", json=_explain_body(4))
                assert after.status_code == 200, after.text
            # the late request never reached the model: only "busy" and the one after it
            assert [rid for batch in gate.batches for rid in batch] == ["busy", "[0]"]


def test_deadline_in_the_compute_is_504_and_the_server_goes_on() -> None:
    """A request whose deadline passes while its batch computes: 504 at the deadline (not when
    the compute ends), as the gRPC client gets DEADLINE_EXCEEDED; the server then answers."""
    with ServerThread(_config(), [tiny_model(MODEL, max_delay_ms=5.0)]) as s:
        assert s.server is not None
        base = f"http://127.0.0.1:{s.server.http_port}"
        with Gate(s, blocked=True) as gate, httpx.Client(base_url=base, timeout=60) as http:
            start = time.monotonic()
            r = http.post(
                f"/v2/models/{MODEL}/infer",
                json={"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 64, 64],
                                  "data": [0.5] * (3 * 64 * 64)}],
                      "parameters": {"explainer": "gradcam"}},
                headers={TIMEOUT_HEADER: "0.5"},
            )  # fmt: skip
            elapsed = time.monotonic() - start
            assert gate.entered.is_set()  # it was computing, not waiting
            assert "deadline" in _error_of(r, 504)
            assert 0.5 <= elapsed < 5
            gate.open.set()
            ok = http.post(f"/v1/models/{MODEL}:explain", json=_explain_body(5))
            assert ok.status_code == 200, ok.text


# ------------------------------------------------------------------ error mapping


def _deep(n: int) -> bytes:
    return b'{"instances": ' + b"[" * n + b"]" * n + b', "parameters": {"method": "gradcam"}}'


def _infer(shape: list[Any], data: Any = None, **params: Any) -> dict[str, Any]:
    tensor = {"name": "input", "datatype": "FP32", "shape": shape}
    if data is not None:
        tensor["data"] = data
    return {"inputs": [tensor], **({"parameters": params} if params else {})}


EXPLAIN = f"/v1/models/{MODEL}:explain"
PREDICT = f"/v1/models/{MODEL}:predict"
INFER = f"/v2/models/{MODEL}/infer"
_PIXELS = [[[0.0] * 64] * 64] * 3
# (method, path, body: JSON or bytes, status, a word the message must hold)
CASES: list[tuple[str, str, Any, int, str]] = [
    ("POST", EXPLAIN, b"{not json", 400, "JSON"),
    ("POST", EXPLAIN, b"\xff\xfe\x00junk", 400, "JSON"),
    ("POST", EXPLAIN, _deep(30_000), 400, "deep"),
    ("POST", EXPLAIN, _deep(500), 400, "instances"),
    ("POST", EXPLAIN, [1, 2], 400, "object"),
    ("POST", EXPLAIN, {"instances": [_PIXELS]}, 400, "method"),
    (
        "POST",
        EXPLAIN,
        {"instances": [[[1.0, 2.0], [3.0]]], "parameters": {"method": "gradcam"}},
        400,
        "rectangular",
    ),
    (
        "POST",
        EXPLAIN,
        {"instances": [[[[1e400]]]], "parameters": {"method": "gradcam"}},
        400,
        "shape",
    ),
    (
        "POST",
        EXPLAIN,
        {"instances": [_PIXELS], "parameters": {"method": "gradcam", "target": 10**30}},
        400,
        "range",
    ),
    (
        "POST",
        EXPLAIN,
        {"instances": [_PIXELS], "parameters": {"method": "gradcam", "top_k": 2**40}},
        400,
        "range",
    ),
    ("POST", EXPLAIN, {"instances": [_PIXELS], "parameters": {"method": "nope"}}, 404, "nope"),
    (
        "POST",
        EXPLAIN,
        {"instances": [{"image": {"b64": "@@@"}}], "parameters": {"method": "gradcam"}},
        400,
        "base64",
    ),
    (
        "POST",
        EXPLAIN,
        {
            "instances": [{"b64": base64.b64encode(b"not an image").decode()}],
            "parameters": {"method": "gradcam"},
        },
        400,
        "image",
    ),
    (
        "POST",
        "/v1/models/nope:explain",
        {"instances": [_PIXELS], "parameters": {"method": "gradcam"}},
        404,
        "nope",
    ),
    ("POST", PREDICT, {"instances": "all"}, 400, "instances"),
    ("POST", PREDICT, {"instances": [[[[0.0]]]]}, 400, "shape"),
    ("POST", INFER, _infer([1, 3, 64, 64], [0.0] * 5), 400, "values"),
    ("POST", INFER, _infer([-1, 3, 64, 64], [0.0]), 400, "negative"),
    ("POST", INFER, _infer([2**70], [0.0]), 400, "range"),
    ("POST", INFER, _infer([1], ["x"]), 400, "FP32"),
    ("POST", INFER, _infer([1], [1e400]), 400, "input"),
    ("POST", INFER, {"inputs": "x"}, 400, "inputs"),
    ("POST", INFER, {**_infer([1, 3, 64, 64], [0.0] * 12288), "outputs": 5}, 400, "outputs"),
    ("POST", INFER, {**_infer([1, 3, 64, 64], [0.0] * 12288), "id": 5}, 400, "id"),
    ("POST", INFER, _infer([1, 3, 64, 64], [0.0] * 12288, explainer="nope"), 404, "nope"),
    ("POST", INFER, _infer([1, 3, 64, 64], [0.0] * 12288, explainer=[1]), 400, "explainer"),
    ("POST", "/v2/models/nope/infer", _infer([1], [0.0]), 404, "nope"),
    ("GET", "/v2/models/nope", None, 404, "nope"),
    ("GET", "/v1/models/nope", None, 404, "nope"),
    ("GET", "/no/such/route", None, 404, "route"),
    ("DELETE", "/v1/models", None, 405, "DELETE"),
    ("GET", EXPLAIN, None, 404, "unknown model"),  # GET /v1/models/{m}, m = "tiny:explain"
    ("GET", INFER, None, 405, "GET"),
    ("PUT", INFER, None, 405, "PUT"),
]


@pytest.mark.parametrize(("method", "path", "body", "status", "word"), CASES)
def test_bad_requests_map_to_statuses_with_a_json_message(
    http: httpx.Client, method: str, path: str, body: Any, status: int, word: str
) -> None:
    content = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    r = http.request(method, path, content=content)
    message = _error_of(r, status)
    assert word.lower() in message.lower(), message
    assert len(message) <= 1200  # the server clips what it quotes of the request


def test_liveness_at_the_root(http: httpx.Client) -> None:
    """KServe's own liveness route (what its SDK's v1 is_server_live reads)."""
    r = http.get("/")
    assert (r.status_code, r.json()) == (200, {"status": "alive"})


def test_grpc_and_http_refuse_the_same_oversized_request_alike(
    server: ServerThread, http: httpx.Client
) -> None:
    """The limit is one: a request past max_message_bytes is RESOURCE_EXHAUSTED over gRPC
    and 413 over HTTP (counted RESOURCE_EXHAUSTED in the metrics), and one under it is read
    by both (then refused for what it holds)."""
    channel, stub = stub_of(server)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.Explain(pb.ExplainRequest(model=MODEL, method="gradcam", image=b"\0" * LIMIT))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = request(torch.randn(3, 32, 32), target=1)
        assert small.ByteSize() < LIMIT
        with pytest.raises(grpc.RpcError) as err:
            stub.Explain(small, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # read: a wrong shape
    assert server.server is not None
    registry = server.server.metrics.registry
    labels = {"rpc": "http:/v1/models/{m}:explain", "model": MODEL, "method": "",
              "code": "RESOURCE_EXHAUSTED"}  # fmt: skip
    before = registry.get_sample_value("xai_serve_requests_total", labels) or 0.0
    image = base64.b64encode(b"\0" * LIMIT).decode()
    body = json.dumps({"instances": [{"b64": image}], "parameters": {"method": "gradcam"}})
    _error_of(http.post(EXPLAIN, content=body), 413)
    assert registry.get_sample_value("xai_serve_requests_total", labels) == before + 1
    small_body = {"instances": [torch.randn(3, 32, 32).tolist()],
                  "parameters": {"method": "gradcam"}}  # fmt: skip
    assert "shape" in _error_of(http.post(EXPLAIN, json=small_body), 400)
