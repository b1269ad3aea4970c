"""Conformance with KServe's own Python SDK (``kserve``, its REST client
``InferenceRESTClient``): the v1 protocol (``:predict``, ``:explain``, model readiness,
liveness) and the Open Inference Protocol REST binding (``/infer`` with JSON and binary tensor
data, the ``explainer`` parameter, server and model readiness) against our HTTP listener. Every
answer the SDK reads is checked against the gRPC answer to the same request on the same server;
every refusal is an ``httpx.HTTPStatusError`` whose text carries our JSON message, as the SDK
builds it."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from tests._peers import require_installed
from tests.serving.harness import ServerThread, grpc_infer, random_png, tiny_model
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving import codec
from xai_serve.serving.config import LimitsConfig, ServerConfig

require_installed("kserve")

MODEL = "tiny"
TARGET = 3
LIMIT = 1024 * 1024

# The kserve SDK registers its own copy of the Open Inference Protocol's protobuf package
# (``inference.*``) in protobuf's one default pool, and so do our stubs: the two cannot be
# imported into one process. The SDK therefore runs in a child process, which performs a list
# of calls with it and prints what it read, as JSON (float32 values round-trip exactly).
SDK_CLIENT = r"""
import asyncio, json, sys
import httpx
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
import numpy as np

def v2_request(spec):
    inputs = []
    for t in spec["inputs"]:
        inp = InferInput(t["name"], t["shape"], t["datatype"])
        data = np.asarray(t["data"], dtype=np.float32).reshape(t["shape"])
        inp.set_data_from_numpy(data, binary_data=t["binary"])
        inputs.append(inp)
    outputs = [RequestedOutput(n, p) for n, p in spec.get("outputs", [])] or None
    return InferRequest(spec["model"], inputs, request_id=spec.get("id"),
                        parameters=spec.get("parameters"), request_outputs=outputs)

def plain(value):
    if hasattr(value, "outputs"):  # an InferResponse
        return {"id": value.id, "model_name": value.model_name, "outputs": [
            {"name": o.name, "datatype": o.datatype, "shape": list(o.shape),
             "data": o.as_numpy().tolist()} for o in value.outputs]}
    return value

async def call(client, base, op, kw):
    if op == "infer" and "request" in kw:
        kw["data"] = v2_request(kw.pop("request"))
    return await getattr(client, op)(base, **kw)

async def main(plan):
    answers = []
    for step in plan["calls"]:
        config = RESTConfig(protocol=step["protocol"], timeout=60)
        async with InferenceRESTClient(config) as client:
            try:
                value = await call(client, plan["base"], step["op"], dict(step.get("kw", {})))
                answers.append({"ok": plain(value)})
            except httpx.HTTPStatusError as exc:
                answers.append({"status": exc.response.status_code, "text": str(exc)})
    print(json.dumps(answers))

asyncio.run(main(json.load(sys.stdin)))
"""


def sdk(base: str, *calls: dict[str, Any]) -> list[dict[str, Any]]:
    """Run ``calls`` (``{"protocol": "v1"|"v2", "op": client method, "kw": arguments}``)
    with kserve's InferenceRESTClient against ``base``: per call ``{"ok": what it returned}``
    or ``{"status": HTTP status, "text": the HTTPStatusError's text}``."""
    plan = json.dumps({"base": base, "calls": list(calls)})
    done = subprocess.run(
        [sys.executable, "-c", SDK_CLIENT], input=plan, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answers) == len(calls)
    return answers


def _ok(answer: dict[str, Any]) -> Any:
    assert "ok" in answer, answer
    return answer["ok"]


def _v2_input(x: torch.Tensor, binary: bool) -> dict[str, Any]:
    return {"name": "input", "shape": list(x.shape), "datatype": "FP32",
            "data": x.flatten().tolist(), "binary": binary}  # fmt: skip


def _png(seed: int) -> bytes:
    return random_png(seed, (72, 90))


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    cfg = ServerConfig(host="127.0.0.1", port=0, http_port=0, warmup=False,
                       limits=LimitsConfig(max_message_bytes=LIMIT))  # fmt: skip
    with ServerThread(cfg, [tiny_model(MODEL)]) as s:
        yield s


@pytest.fixture(scope="module")
def base(server: ServerThread) -> str:
    assert server.server is not None and server.server.http_port
    return f"http://127.0.0.1:{server.server.http_port}"


@pytest.fixture(scope="module")
def channel(server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    torch.manual_seed(11)
    return torch.randn(2, 3, 64, 64)


def _grpc_infer(channel: grpc.Channel, xs: torch.Tensor, **params: Any) -> dict[str, np.ndarray]:
    return grpc_infer(channel, MODEL, xs, **params)


# ------------------------------------------------------------------ health


def test_sdk_liveness_and_readiness(base: str) -> None:
    answers = sdk(
        base,
        {"protocol": "v1", "op": "is_server_live"},
        {"protocol": "v1", "op": "is_model_ready", "kw": {"model_name": MODEL}},
        {"protocol": "v1", "op": "is_model_ready", "kw": {"model_name": "nope"}},
        {"protocol": "v2", "op": "is_server_live"},
        {"protocol": "v2", "op": "is_server_ready"},
        {"protocol": "v2", "op": "is_model_ready", "kw": {"model_name": MODEL}},
        {"protocol": "v2", "op": "is_model_ready", "kw": {"model_name": "nope"}},
    )
    assert [_ok(a) for i, a in enumerate(answers) if i != 2] == [True, True, True, True, True,
                                                                  False]  # fmt: skip
    # v1: 503 is "not ready"; any other refusal is raised, with our message in its text
    assert answers[2]["status"] == 404 and "unknown model 'nope'" in answers[2]["text"]


def test_sdk_sees_a_draining_server_not_ready(base: str, server: ServerThread) -> None:
    """Readiness as KServe's server answers it: 503 while draining, which the SDK's
    is_model_ready reads as False (v1 and v2)."""
    assert server.server is not None
    state = server.server.state
    ready = [{"protocol": p, "op": "is_model_ready", "kw": {"model_name": MODEL}}
             for p in ("v1", "v2")]  # fmt: skip
    state.draining = True
    try:
        assert [_ok(a) for a in sdk(base, *ready)] == [False, False]
    finally:
        state.draining = False
    assert [_ok(a) for a in sdk(base, *ready)] == [True, True]


# ------------------------------------------------------------------ KServe v1


def test_sdk_v1_predict_equals_grpc(base: str, channel: grpc.Channel, x: torch.Tensor) -> None:
    data = {"instances": [x[0].tolist(), x[1].tolist()]}
    (answer,) = sdk(base, {"protocol": "v1", "op": "infer",
                           "kw": {"data": data, "model_name": MODEL}})  # fmt: skip
    preds = np.array(_ok(answer)["predictions"])
    logits = torch.from_numpy(_grpc_infer(channel, x)["logits"].copy()).double()
    np.testing.assert_allclose(preds, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(preds.sum(1), [1.0, 1.0], rtol=1e-9)


def test_sdk_v1_explain_equals_grpc(base: str, channel: grpc.Channel, x: torch.Tensor) -> None:
    png = _png(3)
    data = {
        "instances": [{"image": {"b64": base64.b64encode(png).decode()}}, x[0].tolist()],
        "parameters": {"method": "saliency", "target": TARGET, "top_k": 2},
    }
    (answer,) = sdk(base, {"protocol": "v1", "op": "explain",
                           "kw": {"model_name": MODEL, "data": data}})  # fmt: skip
    got = _ok(answer)["explanations"]
    stub = pb_grpc.ExplainerStub(channel)
    inputs = [{"image": png}, {"tensor": codec.tensor_to_proto(x[0].contiguous())}]
    for one, kw in zip(got, inputs, strict=True):
        want = stub.Explain(
            pb.ExplainRequest(model=MODEL, method="saliency", target=TARGET, top_k=2, **kw)
        )
        assert (one["method"], one["target"]) == ("saliency", TARGET)
        want_map = codec.tensor_from_proto(want.map, field="map", max_elements=10**6).numpy()
        assert np.array(one["map"]).shape == want_map.shape == (64, 64)
        np.testing.assert_allclose(np.array(one["map"]), want_map, atol=1e-5)
        assert [c["index"] for c in one["top_k"]] == [c.index for c in want.top_k]
        np.testing.assert_allclose(
            [c["probability"] for c in one["top_k"]], [c.probability for c in want.top_k],
            rtol=1e-5,
        )  # fmt: skip


# ------------------------------------------------------------------ Open Inference Protocol


@pytest.mark.parametrize("binary", [True, False])
def test_sdk_v2_infer_with_explainer_equals_grpc(
    base: str, channel: grpc.Channel, x: torch.Tensor, binary: bool
) -> None:
    request = {
        "model": MODEL, "id": "k-1", "inputs": [_v2_input(x, binary)],
        "parameters": {"explainer": "gradcam", "target": TARGET},
        "outputs": [[n, {"binary_data": binary}] for n in ("explanation", "target")],
    }  # fmt: skip
    (answer,) = sdk(base, {"protocol": "v2", "op": "infer",
                           "kw": {"request": request, "model_name": MODEL}})  # fmt: skip
    got = _ok(answer)
    want = _grpc_infer(channel, x, explainer="gradcam", target=TARGET)
    assert (got["id"], got["model_name"]) == ("k-1", MODEL)
    outputs = {o["name"]: o for o in got["outputs"]}
    assert list(outputs) == ["explanation", "target"]
    assert (outputs["explanation"]["datatype"], outputs["explanation"]["shape"]) == (
        "FP32", [2, 64, 64]
    )  # fmt: skip
    explanation = np.array(outputs["explanation"]["data"], dtype=np.float32)
    np.testing.assert_array_equal(explanation, want["explanation"])
    assert outputs["target"]["datatype"] == "INT64"
    np.testing.assert_array_equal(outputs["target"]["data"], [TARGET, TARGET])


def test_sdk_v2_infer_logits_equal_grpc(base: str, channel: grpc.Channel, x: torch.Tensor) -> None:
    # binary input, outputs as JSON (the SDK's and the protocol's default)
    request = {"model": MODEL, "inputs": [_v2_input(x[:1], True)]}
    (answer,) = sdk(base, {"protocol": "v2", "op": "infer",
                           "kw": {"request": request, "model_name": MODEL}})  # fmt: skip
    (out,) = _ok(answer)["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("logits", "FP32", [1, 10])
    np.testing.assert_array_equal(
        np.array(out["data"], dtype=np.float32), _grpc_infer(channel, x[:1])["logits"]
    )


# ------------------------------------------------------------------ refusals through the SDK


def test_sdk_reports_our_errors(base: str, x: torch.Tensor) -> None:
    bad = {"model": MODEL, "inputs": [_v2_input(x[:1], True)],
           "parameters": {"explainer": "nope"}}  # fmt: skip
    wrong_target = {"instances": [x[0].tolist()],
                    "parameters": {"method": "gradcam", "target": 99}}  # fmt: skip
    huge = {"instances": [{"b64": base64.b64encode(b"\0" * LIMIT).decode()}],
            "parameters": {"method": "gradcam"}}  # fmt: skip
    predict = {"data": {"instances": [x[0].tolist()]}, "model_name": MODEL}
    answers = sdk(
        base,
        {"protocol": "v2", "op": "infer", "kw": {"request": bad, "model_name": MODEL}},
        {"protocol": "v1", "op": "explain", "kw": {"model_name": MODEL, "data": wrong_target}},
        {"protocol": "v1", "op": "explain", "kw": {"model_name": MODEL, "data": huge}},
        {"protocol": "v1", "op": "infer",
         "kw": {**predict, "headers": {"X-Request-Timeout": "soon"}}},
        {"protocol": "v1", "op": "infer",
         "kw": {**predict, "headers": {"X-Request-Timeout": "30"}}},
    )  # fmt: skip
    expected = [
        (404, "unknown method 'nope'"),
        (400, "target 99 is out of range"),
        (413, "max_message_bytes"),  # past the server's request-size limit
        (400, "X-Request-Timeout must be a positive number of seconds"),
    ]
    for answer, (status, words) in zip(answers, expected, strict=False):
        assert answer.get("status") == status and words in answer["text"], answer
    assert np.array(_ok(answers[-1])["predictions"]).shape == (1, 10)
