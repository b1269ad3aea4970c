"""The Ray Serve replica without a Ray cluster: its gRPC methods and HTTP route called in this
process, so that batching (``@serve.batch``), the answers (equal to :func:`xai_serve.explain`)
and the status codes are checked quickly. The two-node cluster test is
``test_ray_failover.py``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch

from tests._peers import require

serve = require("ray.serve")

from starlette.requests import Request  # noqa: E402

from tests.integrations.ray_helpers import METHODS, inputs, reference, write_config  # noqa: E402
from xai_serve.errors import InvalidInput, NotFound  # noqa: E402
from xai_serve.integrations._ray_replica import REPLICA_METADATA, ExplainerReplica  # noqa: E402
from xai_serve.integrations.ray import load_ray_config  # noqa: E402
from xai_serve.proto import explainer_pb2 as pb  # noqa: E402
from xai_serve.serving import codec  # noqa: E402


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """One event loop for the module: a ``@serve.batch`` queue stays on the loop it began on
    (as a replica's does)."""
    loop = asyncio.new_event_loop()
    yield loop
    tasks = asyncio.all_tasks(loop)  # the batch queues' loops
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


@pytest.fixture(scope="module")
def replica(
    tmp_path_factory: pytest.TempPathFactory, loop: asyncio.AbstractEventLoop
) -> Iterator[ExplainerReplica]:
    # what @serve.batch reads of the replica it runs in (the deployment's request cap)
    context = SimpleNamespace(
        _deployment_config=SimpleNamespace(max_ongoing_requests=64),
        replica_id=SimpleNamespace(unique_id="in-process"),
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(serve, "get_replica_context", lambda: context)
        server, _ = load_ray_config(write_config(tmp_path_factory.mktemp("ray_replica")))
        replica = ExplainerReplica(server)
        yield replica
        loop.run_until_complete(replica.state.close())  # its device and decode threads


def _request(x: torch.Tensor, method: str, options: dict[str, Any], seed: int) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model="tiny", method=method, request_id=f"{method}-{seed}")
    req.tensor.CopyFrom(codec.tensor_to_proto(x))
    for key, value in options.items():
        setattr(req.options, key, value)
    if method == "lime":
        req.options.seed = seed
    return req


class _Context:
    """What the replica writes to Serve's gRPC context: the status code and details."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing = [("request_id", "r")]

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def trailing_metadata(self) -> list[tuple[str, str]]:
        return self.trailing

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        self.trailing = metadata


def test_concurrent_requests_are_batched_and_equal_the_library(
    replica: ExplainerReplica, loop: asyncio.AbstractEventLoop
) -> None:
    xs = inputs(6)
    requests = [
        (x, method, options, 100 + i) for i, x in enumerate(xs) for method, options in METHODS
    ]

    async def send() -> list[pb.ExplainResponse]:
        return await asyncio.gather(*(replica.Explain(_request(*r)) for r in requests))

    answers = loop.run_until_complete(send())
    model = replica.state.models["tiny"]
    for (x, method, options, seed), resp in zip(requests, answers, strict=True):
        want_map, want_target = reference(
            model, x, method, options, seed if method == "lime" else None
        )
        got = codec.tensor_from_proto(resp.map, field="map", max_elements=10**7)
        assert resp.method == method and resp.target == want_target
        torch.testing.assert_close(got, want_map, atol=1e-5, rtol=1e-4)
        if method == "lime":
            assert resp.seed == seed
    # 12 requests sent at once, 6 of each kind: @serve.batch put several in one batch
    sizes = [a.timing.batch_size for a in answers]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 8  # the model's max_batch_size


@pytest.mark.parametrize(
    ("change", "code", "error"),
    [
        ({"model": "nope"}, grpc.StatusCode.NOT_FOUND, NotFound),
        ({"method": "nope"}, grpc.StatusCode.NOT_FOUND, NotFound),
        ({"target": 10}, grpc.StatusCode.INVALID_ARGUMENT, InvalidInput),
        ({"quality": ["deletion"]}, grpc.StatusCode.INVALID_ARGUMENT, InvalidInput),
    ],
)
def test_errors_carry_the_servers_status_codes(
    replica: ExplainerReplica,
    loop: asyncio.AbstractEventLoop,
    change: dict[str, Any],
    code: grpc.StatusCode,
    error: type,
) -> None:
    req = _request(inputs(1)[0], "gradcam", {}, 0)
    for key, value in change.items():
        if isinstance(value, list):
            getattr(req, key).extend(value)
        else:
            setattr(req, key, value)
    context = _Context()
    with pytest.raises(error):
        loop.run_until_complete(replica.Explain(req, context))  # type: ignore[arg-type]
    assert context.code == code
    assert context.details
    # the replica that answered, after Serve's own metadata
    assert context.trailing == [("request_id", "r"), (REPLICA_METADATA, "local/in-process")]


def _http(method: str, path: str, body: bytes = b"") -> Request:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_http_kserve_v1_explain(replica: ExplainerReplica, loop: asyncio.AbstractEventLoop) -> None:
    xs = inputs(2)
    body = json.dumps(
        {
            "instances": [x.tolist() for x in xs],
            "parameters": {"method": "lime", "seed": 5, "samples": 24, "n_segments": 16},
        }
    ).encode()
    resp = loop.run_until_complete(replica(_http("POST", "/v1/models/tiny:explain", body)))
    assert resp.status_code == 200
    assert resp.headers[REPLICA_METADATA] == "local/in-process"
    out = json.loads(resp.body)["explanations"]
    model = replica.state.models["tiny"]
    for x, one in zip(xs, out, strict=True):
        want_map, want_target = reference(model, x, "lime", METHODS[1][1], 5)
        assert one["target"] == want_target and one["seed"] == 5
        torch.testing.assert_close(torch.tensor(one["map"]), want_map, atol=1e-5, rtol=1e-4)

    listed = loop.run_until_complete(replica(_http("GET", "/v1/models")))
    assert json.loads(listed.body) == {"models": ["tiny"]}
    missing = loop.run_until_complete(replica(_http("POST", "/v1/models/nope:explain", body)))
    assert missing.status_code == 404 and "nope" in json.loads(missing.body)["error"]
    bad = loop.run_until_complete(replica(_http("POST", "/v1/models/tiny:explain", b"{")))
    assert bad.status_code == 400 and "JSON" in json.loads(bad.body)["error"]


def test_list_models(replica: ExplainerReplica, loop: asyncio.AbstractEventLoop) -> None:
    resp = loop.run_until_complete(replica.ListModels(pb.ListModelsRequest()))
    (info,) = resp.models
    assert info.name == "tiny" and info.ready and info.num_classes == 10
    assert list(info.input_shape) == [3, 48, 48]


def test_config_path_is_relative_to_the_file(tmp_path: Path) -> None:
    server, _ = load_ray_config(write_config(tmp_path))
    assert server.models[0].path == str(tmp_path / "tiny.pth")


def test_explain_stream_answers_each_request_errors_in_band(
    replica: ExplainerReplica, loop: asyncio.AbstractEventLoop
) -> None:
    xs = inputs(3)
    requests = [_request(x, "gradcam", {}, i) for i, x in enumerate(xs)]
    bad = _request(xs[0], "gradcam", {}, 9)
    bad.request_id, bad.target = "bad", 10
    partial = _request(xs[1], "gradcam", {}, 8)
    partial.request_id, partial.progress = "partial", True

    async def stream() -> AsyncIterator[pb.ExplainRequest]:
        for req in (*requests, bad, partial):
            yield req

    async def collect() -> list[pb.ExplainResponse]:
        return [a async for a in replica.ExplainStream(stream())]

    answers = {a.request_id: a for a in loop.run_until_complete(collect())}
    assert sorted(answers) == sorted([r.request_id for r in requests] + ["bad", "partial"])
    model = replica.state.models["tiny"]
    for x, req in zip(xs, requests, strict=True):
        want_map, want_target = reference(model, x, "gradcam", {}, None)
        resp = answers[req.request_id]
        assert not resp.HasField("error") and resp.target == want_target
        got = codec.tensor_from_proto(resp.map, field="map", max_elements=10**7)
        torch.testing.assert_close(got, want_map, atol=1e-5, rtol=1e-4)
    assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "target 10 is out of range" in answers["bad"].error.message
    assert answers["partial"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "progress" in answers["partial"].error.message
