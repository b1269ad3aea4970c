"""The HTTP listener (KServe v1 and Open Inference Protocol REST) against a real server: every
answer is checked against the gRPC answer to the same request on the same server, the v2
routes through the real Triton HTTP client (``tritonclient.http``)."""

from __future__ import annotations

import base64
import dataclasses
import io
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from PIL import Image

from tests._peers import require_installed
from tests.serving.certs import have_openssl, make_certs
from tests.serving.harness import ServerThread, grpc_infer, random_png, tiny_model
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving import codec
from xai_serve.serving.config import AuthConfig, ServerConfig, TlsConfig

require_installed("httpx")
require_installed("tritonclient")
import httpx  # noqa: E402
import tritonclient.http as triton  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

MODEL = "tiny"
TARGET = 3
TOKEN = "s3cret-token"


def _png(seed: int) -> bytes:
    return random_png(seed, (80, 96))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, warmup=False)
    with ServerThread(cfg, [tiny_model(MODEL)]) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: ServerThread) -> Iterator[httpx.Client]:
    assert server.server is not None and server.server.http_port
    with httpx.Client(base_url=f"http://127.0.0.1:{server.server.http_port}", timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(5)
    return torch.randn(2, 3, 64, 64)


def _grpc_infer(channel: grpc.Channel, xs: torch.Tensor, **params: Any) -> dict[str, np.ndarray]:
    return grpc_infer(channel, MODEL, xs, **params)


def _triton(server: ServerThread, **kw: Any) -> triton.InferenceServerClient:
    assert server.server is not None
    return triton.InferenceServerClient(f"127.0.0.1:{server.server.http_port}", **kw)


# ------------------------------------------------------------------ Open Inference Protocol


def test_v2_health_and_metadata_match_grpc(server: ServerThread, channel: grpc.Channel) -> None:
    client = _triton(server)
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and not client.is_model_ready(MODEL, "2")
    assert not client.is_model_ready("nope")
    server_meta = client.get_server_metadata()
    want_server = oip_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
        oip.ServerMetadataRequest()
    )
    assert (server_meta["name"], server_meta["version"], server_meta["extensions"]) == (
        want_server.name, want_server.version, list(want_server.extensions)
    )  # fmt: skip
    meta = client.get_model_metadata(MODEL)
    want = oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
        oip.ModelMetadataRequest(name=MODEL)
    )
    assert meta["name"] == want.name and meta["platform"] == want.platform == "pytorch"
    assert meta["versions"] == list(want.versions)
    for got, exp in ((meta["inputs"], want.inputs), (meta["outputs"], want.outputs)):
        assert [(t["name"], t["datatype"], t["shape"]) for t in got] == [
            (t.name, t.datatype, list(t.shape)) for t in exp
        ]
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("nope")
    assert err.value.status() == "404"


@pytest.mark.parametrize("binary", [True, False])
def test_v2_infer_logits_equal_grpc(
    server: ServerThread, channel: grpc.Channel, x: torch.Tensor, binary: bool
) -> None:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy(), binary_data=binary)
    outputs = None if binary else [triton.InferRequestedOutput("logits", binary_data=False)]
    got = _triton(server).infer(MODEL, [inp], outputs=outputs, request_id="r-1")
    want = _grpc_infer(channel, x)
    assert got.get_response()["id"] == "r-1"
    assert got.get_response()["outputs"][0]["shape"] == [2, 10]
    np.testing.assert_array_equal(got.as_numpy("logits"), want["logits"])


def test_v2_infer_explainer_equals_grpc(
    server: ServerThread, channel: grpc.Channel, x: torch.Tensor
) -> None:
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x.numpy())
    params = {"explainer": "gradcam", "target": TARGET}
    got = _triton(server).infer(MODEL, [inp], parameters=params)
    want = _grpc_infer(channel, x, explainer="gradcam", target=TARGET)
    names = [o["name"] for o in got.get_response()["outputs"]]
    assert names == ["explanation", "target", "logits"]
    assert got.as_numpy("explanation").shape == (2, 64, 64)
    np.testing.assert_array_equal(got.as_numpy("target"), [TARGET, TARGET])
    for name in names:
        np.testing.assert_array_equal(got.as_numpy(name), want[name])


def test_v2_infer_errors(http: httpx.Client, x: torch.Tensor) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 3, 64, 64], "datatype": "FP32",
                        "data": x[0].flatten().tolist()}]}  # fmt: skip
    r = http.post(f"/v2/models/{MODEL}/infer", json={**body, "parameters": {"explainer": "nope"}})
    assert r.status_code == 404 and "nope" in r.json()["error"]
    r = http.post(f"/v2/models/{MODEL}/infer", json={**body, "parameters": {"foo": 1}})
    assert r.status_code == 400 and "foo" in r.json()["error"]
    short = {"inputs": [{**body["inputs"][0], "data": [0.0] * 5}]}
    assert http.post(f"/v2/models/{MODEL}/infer", json=short).status_code == 400
    assert http.post("/v2/models/nope/infer", json=body).status_code == 404
    r = http.post(f"/v2/models/{MODEL}/infer", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    # Triton's own timeout parameter (microseconds): 1 us has passed before the batch runs
    r = http.post(f"/v2/models/{MODEL}/infer", json={**body, "parameters": {"timeout": 1}})
    assert r.status_code == 504, r.text
    limit = {"explainer": "lime", "samples": 10**6}
    r = http.post(f"/v2/models/{MODEL}/infer", json={**body, "parameters": limit})
    assert r.status_code == 429 and "max_samples" in r.json()["error"]


# ------------------------------------------------------------------ KServe v1


def test_v1_models(http: httpx.Client) -> None:
    assert http.get("/v1/models").json() == {"models": [MODEL]}
    assert http.get(f"/v1/models/{MODEL}").json() == {"name": MODEL, "ready": True}
    assert http.get("/v1/models/nope").status_code == 404


def test_v1_predict_equals_grpc(http: httpx.Client, channel: grpc.Channel, x: torch.Tensor) -> None:
    png = _png(1)
    instances = [x[0].tolist(), {"image": {"b64": base64.b64encode(png).decode()}}]
    r = http.post(f"/v1/models/{MODEL}:predict", json={"instances": instances})
    assert r.status_code == 200, r.text
    preds = np.array(r.json()["predictions"])
    assert preds.shape == (2, 10)
    logits = torch.from_numpy(_grpc_infer(channel, x[:1])["logits"].copy()).double()
    # batched with another image here, alone there: equal up to fp32 rounding
    np.testing.assert_allclose(preds[0], torch.softmax(logits, 1)[0].numpy(), rtol=2e-5)
    # the image: the gRPC Explain's top-10 probabilities of the same bytes
    stub = pb_grpc.ExplainerStub(channel)
    ans = stub.Explain(pb.ExplainRequest(model=MODEL, method="gradcam", image=png, top_k=10))
    np.testing.assert_allclose(
        [preds[1][c.index] for c in ans.top_k], [c.probability for c in ans.top_k], rtol=1e-5
    )


def test_v1_explain_equals_grpc(http: httpx.Client, channel: grpc.Channel, x: torch.Tensor) -> None:
    png = _png(2)
    instances = [{"b64": base64.b64encode(png).decode()}, x[1].tolist()]
    params = {"method": "gradcam", "target": TARGET, "overlay": True, "top_k": 3}
    r = http.post(f"/v1/models/{MODEL}:explain", json={"instances": instances,
                                                       "parameters": params})  # fmt: skip
    assert r.status_code == 200, r.text
    got = r.json()["explanations"]
    stub = pb_grpc.ExplainerStub(channel)
    inputs = [{"image": png}, {"tensor": codec.tensor_to_proto(x[1].contiguous())}]
    for one, kw in zip(got, inputs, strict=True):
        want = stub.Explain(pb.ExplainRequest(
            model=MODEL, method="gradcam", target=TARGET, top_k=3, returns=pb.MAP_AND_OVERLAY,
            **kw))  # fmt: skip
        assert one["method"] == "gradcam" and one["target"] == TARGET
        assert one["layer"] == want.layer != ""
        want_map = codec.tensor_from_proto(want.map, field="map", max_elements=10**6)
        assert np.array(one["map"]).shape == (64, 64)
        # two images in one batch here, one each there: equal up to fp32 rounding
        np.testing.assert_allclose(np.array(one["map"]), want_map.numpy(), atol=1e-5)
        assert [(c["index"], c["label"]) for c in one["top_k"]] == [
            (c.index, c.label) for c in want.top_k
        ]
        np.testing.assert_allclose(
            [c["probability"] for c in one["top_k"]],
            [c.probability for c in want.top_k],
            rtol=1e-5,
        )
        overlay = base64.b64decode(one["overlay_png"])
        assert overlay.startswith(b"\x89PNG") and want.overlay_png.startswith(b"\x89PNG")
        a, b = (np.asarray(Image.open(io.BytesIO(p)), dtype=np.int16)
                for p in (overlay, want.overlay_png))  # fmt: skip
        assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_v1_errors_map_to_statuses(http: httpx.Client, x: torch.Tensor) -> None:
    url = f"/v1/models/{MODEL}:explain"
    inst = [x[0].tolist()]
    cases = [
        ({"instances": inst}, 400, "method"),
        ({"instances": inst, "parameters": {"method": "nope"}}, 404, "nope"),
        ({"instances": inst, "parameters": {"method": "gradcam", "target": 10}}, 400, "range"),
        ({"instances": [[[1.0]]], "parameters": {"method": "gradcam"}}, 400, "shape"),
        ({"instances": [{"b64": "!!"}], "parameters": {"method": "gradcam"}}, 400, "base64"),
        ({"instances": [], "parameters": {"method": "gradcam"}}, 400, "instances"),
        ({"instances": inst, "parameters": {"method": "gradcam", "bogus": 1}}, 400, "bogus"),
        ({"instances": inst, "parameters": {"method": "lime", "samples": 10**6}}, 429, "max"),
    ]
    for body, status, word in cases:
        r = http.post(url, json=body)
        assert (r.status_code, word in r.json()["error"]) == (status, True), (body, r.text)
    r = http.post(url, content=b"[1, 2", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert http.post("/v1/models/nope:predict", json={"instances": inst}).status_code == 404


def test_http_requests_counted_in_metrics(server: ServerThread, http: httpx.Client) -> None:
    assert server.server is not None
    registry = server.server.metrics.registry
    rpc = "http:/v1/models/{m}:explain"

    def count(code: str, method: str) -> float:
        labels = {"rpc": rpc, "model": MODEL, "method": method, "code": code}
        return registry.get_sample_value("xai_serve_requests_total", labels) or 0.0

    ok, bad = count("OK", "gradcam"), count("INVALID_ARGUMENT", "gradcam")
    body = {"instances": [[[[0.0] * 64] * 64] * 3], "parameters": {"method": "gradcam"}}
    assert http.post(f"/v1/models/{MODEL}:explain", json=body).status_code == 200
    body["parameters"]["target"] = -1
    assert http.post(f"/v1/models/{MODEL}:explain", json=body).status_code == 400
    assert (count("OK", "gradcam"), count("INVALID_ARGUMENT", "gradcam")) == (ok + 1, bad + 1)


def test_auth_on_every_route_but_health(tmp_path: Path, x: torch.Tensor) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, warmup=False,
                       auth=AuthConfig(tokens_file=str(tokens)))  # fmt: skip
    with ServerThread(cfg, [tiny_model(MODEL)]) as s:
        assert s.server is not None
        base = f"http://127.0.0.1:{s.server.http_port}"
        with httpx.Client(base_url=base, timeout=60) as c:
            assert c.get("/v2/health/live").status_code == 200
            assert c.get("/v2/health/ready").status_code == 200
            r = c.get("/v1/models")
            assert r.status_code == 401 and r.json() == {"error": "missing bearer token"}
            bad = {"Authorization": "Bearer wrong"}
            assert c.get(f"/v2/models/{MODEL}", headers=bad).status_code == 401
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert c.get("/v1/models", headers=good).json() == {"models": [MODEL]}
        inp = triton.InferInput("input", [1, 3, 64, 64], "FP32")
        inp.set_data_from_numpy(x[:1].numpy())
        client = triton.InferenceServerClient(f"127.0.0.1:{s.server.http_port}")
        with pytest.raises(InferenceServerException):
            client.infer(MODEL, [inp])
        got = client.infer(MODEL, [inp], headers=good)
        assert got.as_numpy("logits").shape == (1, 10)
        s.stop()
        # drained: the listener is closed with the gRPC port
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/v2/health/live", timeout=5)


@pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")
def test_tls_same_cert_as_grpc(tmp_path: Path, x: torch.Tensor) -> None:
    certs = make_certs(tmp_path)
    tls = TlsConfig(cert=str(certs["server_cert"]), key=str(certs["server_key"]))
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, warmup=False, tls=tls)
    with ServerThread(cfg, [tiny_model(MODEL)]) as s:
        assert s.server is not None
        url = f"https://localhost:{s.server.http_port}"
        r = httpx.get(f"{url}/v1/models", verify=ssl.create_default_context(cafile=certs["ca"]))
        assert r.json() == {"models": [MODEL]}
        with pytest.raises(httpx.ConnectError):  # the server's cert is not one the system trusts
            httpx.get(f"{url}/v1/models", timeout=5)
        with pytest.raises(httpx.RemoteProtocolError):  # plaintext to a TLS port
            httpx.get(f"http://127.0.0.1:{s.server.http_port}/v1/models", timeout=5)
    # mutual TLS: a client certificate signed by client_ca is required
    mutual = TlsConfig(cert=tls.cert, key=tls.key, client_ca=str(certs["ca"]))
    with ServerThread(dataclasses.replace(cfg, tls=mutual), [tiny_model(MODEL)]) as s:
        assert s.server is not None
        url = f"https://localhost:{s.server.http_port}/v1/models"
        ctx = ssl.create_default_context(cafile=certs["ca"])
        with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
            httpx.get(url, verify=ctx, timeout=5)
        ctx.load_cert_chain(certs["client_cert"], certs["client_key"])
        assert httpx.get(url, verify=ctx, timeout=5).json() == {"models": [MODEL]}


def test_http_port_config_and_flag(tmp_path: Path) -> None:
    from xai_serve.cli import build_parser, serve_config
    from xai_serve.errors import InvalidInput
    from xai_serve.serving.config import config_from_dict, with_overrides

    assert ServerConfig().http_port is None
    assert config_from_dict({"http_port": 8080}).http_port == 8080
    assert with_overrides(ServerConfig(), http_port=0).http_port == 0
    with pytest.raises(InvalidInput, match="http_port"):
        config_from_dict({"http_port": 70000})
    args = build_parser().parse_args(["serve", "--http-port", "8081"])
    assert serve_config(args).http_port == 8081


def test_drain_lets_http_request_in_flight_finish(x: torch.Tensor) -> None:
    import threading

    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, warmup=False)
    with ServerThread(cfg, [tiny_model(MODEL)]) as s:
        assert s.server is not None
        base = f"http://127.0.0.1:{s.server.http_port}"
        params = {"method": "lime", "samples": 256, "seed": 1}
        body = {"instances": [x[0].tolist()] * 4, "parameters": params}
        answers: list[httpx.Response] = []
        slow = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{base}/v1/models/{MODEL}:explain", json=body, timeout=60)
            )
        )
        slow.start()
        deadline = time.monotonic() + 30
        server, listener = s.server, s.server.http
        assert listener is not None
        while listener.inflight == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.3)  # past reading the body: its jobs are with the batcher
        stopping = threading.Thread(target=lambda: s.call(server.stop(30)))
        stopping.start()
        time.sleep(0.05)
        refused = httpx.post(f"{base}/v1/models/{MODEL}:predict", json=body, timeout=10)
        slow.join(60)
        stopping.join(60)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert answers and answers[0].status_code == 200, answers
        assert len(answers[0].json()["explanations"]) == 4


def test_v1_explain_several_targets_equals_grpc(
    http: httpx.Client, channel: grpc.Channel, x: torch.Tensor
) -> None:
    params = {"method": "gradcam", "targets": [1, 7], "top_k": 0}
    r = http.post(f"/v1/models/{MODEL}:explain", json={"instances": [x[0].tolist()],
                                                       "parameters": params})  # fmt: skip
    assert r.status_code == 200, r.text
    (one,) = r.json()["explanations"]
    want = pb_grpc.ExplainerStub(channel).Explain(pb.ExplainRequest(
        model=MODEL, method="gradcam", targets=[1, 7], top_k=0,
        tensor=codec.tensor_to_proto(x[0].contiguous())))  # fmt: skip
    assert one["top_k"] == [] and [t["target"] for t in one["per_target"]] == [1, 7]
    for got, exp in zip(one["per_target"], want.per_target, strict=True):
        exp_map = codec.tensor_from_proto(exp.map, field="map", max_elements=10**6).numpy()
        np.testing.assert_allclose(np.array(got["map"]), exp_map, atol=1e-5)
        assert np.array(got["map"]).shape == (64, 64)


def test_http_port_in_use_is_unavailable() -> None:
    import socket

    from xai_serve.errors import Unavailable

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cfg = ServerConfig(host="127.0.0.1", port=0, http_port=port, warmup=False)
        failed = ServerThread(cfg, [tiny_model(MODEL)])
        with pytest.raises(Unavailable, match=f"http_port: cannot listen on 127.0.0.1:{port}"):
            failed.__enter__()
        assert failed.server is not None  # release the gRPC port it bound, as serve() does
        failed.loop.run_until_complete(failed.server.stop(0))


def test_http_port_without_the_http_extra_is_a_clear_error(monkeypatch) -> None:
    """FastAPI and uvicorn are the optional `http` extra: a server asked for an HTTP port
    without them refuses to build, saying what to install (a server without one never
    imports them)."""
    import asyncio
    import sys

    from xai_serve.errors import InvalidInput
    from xai_serve.serving.server import build_server

    monkeypatch.delitem(sys.modules, "xai_serve.serving.http", raising=False)
    monkeypatch.setitem(sys.modules, "fastapi", None)
    config = ServerConfig(host="127.0.0.1", port=0, warmup=False)

    async def build(http_port: int | None) -> None:  # grpc.aio wants a running loop
        server = build_server(dataclasses.replace(config, http_port=http_port), [tiny_model()])
        await server.grpc.stop(None)  # bound, never started

    asyncio.run(build(None))  # no HTTP port: fine without the extra
    with pytest.raises(InvalidInput, match=r"fastapi is not installed.*xai-serve\[http\]"):
        asyncio.run(build(0))
