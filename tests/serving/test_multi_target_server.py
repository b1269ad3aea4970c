"""Several classes per request, and a foil, through the server: ``ExplainRequest.targets`` /
``top_labels`` / ``foil`` and the Open Inference Protocol's parameters of the same names; the
answers equal the in-process library's, the batcher merges requests that explain the same
number of classes, the answer cache keys them apart, and bad requests are INVALID_ARGUMENT
naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

import xai_serve
from tests.serving.harness import ServerThread, oip_request, tiny_model
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.codec import tensor_from_proto, tensor_to_proto
from xai_serve.serving.config import CacheConfig, LimitsConfig, ServerConfig
from xai_serve.serving.engine import run_batch
from xai_serve.serving.jobs import build_job

TIMEOUT = 60
LIME = pb.Options(samples=32, n_segments=9, segmenter=pb.GRID, seed=5)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model("tiny_multi")


@pytest.fixture(scope="module")
def served(model: LoadedModel) -> Iterator[ServerThread]:
    config = ServerConfig(
        host="127.0.0.1", port=0, warmup=False, cache=CacheConfig(max_bytes=64 << 20)
    )
    with ServerThread(config, [model]) as s:
        yield s


@pytest.fixture(scope="module")
def stub(served: ServerThread) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def _x(seed: int) -> torch.Tensor:
    return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(seed))


def _request(x: torch.Tensor, method: str = "gradcam", **fields: Any) -> pb.ExplainRequest:
    return pb.ExplainRequest(model="tiny_multi", method=method, tensor=tensor_to_proto(x), **fields)


def _map(t: pb.Tensor) -> torch.Tensor:
    return tensor_from_proto(t, field="map", max_elements=1 << 24)


def _local(model: LoadedModel, x: torch.Tensor, method: str, **kw: Any) -> xai_serve.Explanation:
    return xai_serve.explain(model.module, x[None], method, path=model.path, **kw)


@pytest.mark.parametrize(
    ("method", "options", "kw"),
    [("gradcam", None, {}), ("lime", LIME, {"samples": 32, "n_segments": 9,
                                            "segmenter": "grid", "seed": 5})],
)  # fmt: skip
def test_targets_answer_one_map_per_class(stub, model, method, options, kw) -> None:
    x = _x(1)
    resp = stub.Explain(_request(x, method, targets=[4, 1, 7], options=options), timeout=TIMEOUT)
    want = _local(model, x, method, target=torch.tensor([[4, 1, 7]]), **kw)
    assert [e.target for e in resp.per_target] == [4, 1, 7]
    for t, entry in enumerate(resp.per_target):
        torch.testing.assert_close(_map(entry.map), want.maps[0, t], rtol=1e-4, atol=1e-5)
        if method == "lime":
            torch.testing.assert_close(
                torch.tensor(list(entry.segment_weights)), want.weights[0, t, :9],
                rtol=1e-4, atol=1e-6,
            )  # fmt: skip
            assert len(entry.segment_stderr) == 9 and entry.HasField("intercept")
    # the singular fields hold the first class's, for clients that read only them
    assert resp.target == 4
    torch.testing.assert_close(_map(resp.map), want.maps[0, 0], rtol=1e-4, atol=1e-5)


def test_top_labels_are_the_model_top_classes(stub, model) -> None:
    x = _x(2)
    resp = stub.Explain(_request(x, top_labels=3), timeout=TIMEOUT)
    with torch.no_grad():
        top = model.module(x[None]).topk(3, dim=1).indices[0].tolist()
    assert [e.target for e in resp.per_target] == top
    assert resp.top_k[0].index == top[0]


def test_foil_contrasts_each_map(stub, model) -> None:
    x = _x(3)
    resp = stub.Explain(_request(x, target=2, foil=5), timeout=TIMEOUT)
    want = _local(model, x, "gradcam", target=2, foil=5)
    assert resp.foil == 5 and resp.target == 2 and not resp.per_target
    torch.testing.assert_close(_map(resp.map), want.maps[0], rtol=1e-4, atol=1e-5)


def test_an_old_request_gets_the_old_answer(stub) -> None:
    resp = stub.Explain(_request(_x(4), target=2), timeout=TIMEOUT)
    assert not resp.per_target and not resp.HasField("foil")


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"target": 1, "targets": [2, 3]}, "one of `target`, `targets`"),
        ({"targets": [2, 3], "top_labels": 2}, "one of `target`, `targets`"),
        ({"targets": [2, 2]}, "twice"),
        ({"targets": [2, 10]}, "targets 10 is out of range"),
        ({"targets": list(range(10)), "method": "saliency"}, None),  # 10 <= max_targets: fine
        ({"top_labels": 0}, "top_labels"),
        ({"top_labels": 11}, "top_labels"),
        ({"target": 3, "foil": 3}, "foil 3 is also a class"),
        ({"targets": [1, 3], "foil": 3}, "foil 3 is also a class"),
        ({"foil": 12}, "foil 12 is out of range"),
        ({"targets": [1, 2], "method": "eigencam"}, "does not depend on the class"),
    ],
)
def test_bad_requests_are_invalid_argument(stub, fields: dict[str, Any], words) -> None:
    fields = dict(fields)
    method = fields.pop("method", "gradcam")
    if words is None:
        resp = stub.Explain(_request(_x(5), method, **fields), timeout=TIMEOUT)
        assert len(resp.per_target) == 10
        return
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(_request(_x(5), method, **fields), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert words in info.value.details()


def test_more_targets_than_the_server_takes(model) -> None:
    config = ServerConfig(host="127.0.0.1", port=0, warmup=False)
    with (
        ServerThread(config, [model], limits=LimitsConfig(max_targets=2)) as s,
        grpc.insecure_channel(s.address) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        pb_grpc.ExplainerStub(channel).Explain(_request(_x(6), targets=[1, 2, 3]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at most 2" in info.value.details()


def test_jobs_with_several_targets_share_one_batch(served, model) -> None:
    """The engine explains jobs that each name T classes in one batched call; their answers
    equal the single-image library calls."""
    state = served.server.state
    xs = [_x(10 + i) for i in range(3)]
    lists = [(1, 2), (3, 4), (5, 6)]
    jobs = [
        build_job(state, model, x, None, request_id=f"j{i}", method="gradcam", targets=t)
        for i, (x, t) in enumerate(zip(xs, lists, strict=True))
    ]
    assert len({j.batch_key() for j in jobs}) == 1
    other = build_job(state, model, xs[0], None, request_id="k", method="gradcam", targets=(1,))
    assert other.batch_key() != jobs[0].batch_key()  # another count of classes
    foil = build_job(state, model, xs[0], None, request_id="f", method="gradcam", target=1, foil=2)
    assert (
        foil.batch_key()
        != build_job(
            state, model, xs[0], None, request_id="g", method="gradcam", target=1
        ).batch_key()
    )
    results = run_batch(jobs)
    for x, t, r in zip(xs, lists, results, strict=True):
        assert not isinstance(r, Exception) and r.per_target is not None
        want = _local(model, x, "gradcam", target=torch.tensor([t]))
        assert [one.target for one in r.per_target] == list(t)
        for k, one in enumerate(r.per_target):
            torch.testing.assert_close(one.map, want.maps[0, k], rtol=1e-4, atol=1e-5)


def test_the_cache_keeps_several_targets_apart(stub) -> None:
    x = _x(20)
    first = stub.Explain(_request(x, targets=[1, 2]), timeout=TIMEOUT)
    again = stub.Explain(_request(x, targets=[1, 2]), timeout=TIMEOUT)
    other = stub.Explain(_request(x, targets=[2, 1]), timeout=TIMEOUT)
    assert not first.timing.cache_hit and again.timing.cache_hit and not other.timing.cache_hit
    assert [e.target for e in again.per_target] == [1, 2]
    for a, b in zip(first.per_target, again.per_target, strict=True):
        assert torch.equal(_map(a.map), _map(b.map))
    torch.testing.assert_close(_map(other.per_target[0].map), _map(first.per_target[1].map))


def test_oip_targets_and_foil(served, model) -> None:
    xs = torch.stack([_x(30), _x(31)])
    with grpc.insecure_channel(served.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        resp = stub.ModelInfer(
            oip_request("tiny_multi", xs, "m", explainer="gradcam", targets="3,1", foil=7),
            timeout=TIMEOUT,
        )
        outputs = {
            o.name: (o, raw) for o, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)
        }
        out, raw = outputs["explanation"]
        assert list(out.shape) == [2, 2, 64, 64]
        maps = torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(2, 2, 64, 64)
        t_out, t_raw = outputs["target"]
        assert list(t_out.shape) == [2, 2]
        assert torch.frombuffer(bytearray(t_raw), dtype=torch.int64).tolist() == [3, 1, 3, 1]
        want = xai_serve.explain(
            model.module, xs, "gradcam", target=torch.tensor([[3, 1], [3, 1]]), foil=7
        )
        torch.testing.assert_close(maps, want.maps, rtol=1e-4, atol=1e-5)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(
                oip_request("tiny_multi", xs, "bad", explainer="gradcam", targets="3,x"),
                timeout=TIMEOUT,
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "targets" in info.value.details()
