"""Back-pressure: with ``max_queue`` set low, a burst far over it is answered at once — the
excess with RESOURCE_EXHAUSTED (naming the model and the limit), the rest with their correct
answers — on unary calls, on a stream and on an Open Inference Protocol batch alike. Another
model's requests are not held up by the full queue; afterwards nothing of the burst is left
and the server serves as before, including a second burst.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch

import xai_serve
from tests.reliability.harness import record
from tests.serving.harness import ServerThread, oip_request, tiny_model
from tests.serving.test_server import (
    NAME,
    TIMEOUT,
    assert_close_batched,
    model,
    rand_input,
    reference,
    request,
    wait_until,
)
from xai_serve.client import decode_tensor
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving import codec
from xai_serve.serving.config import LimitsConfig, ServerConfig

Code = grpc.StatusCode
MAX_QUEUE = 4
BURST = 64
OTHER = "other"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    cfg = ServerConfig(
        host="127.0.0.1", port=0, warmup=False, limits=LimitsConfig(max_queue=MAX_QUEUE)
    )
    other = tiny_model(OTHER, max_delay_ms=5.0)
    with ServerThread(cfg, models=[model(), other]) as s:
        yield s


def _counted(s: ServerThread, code: str) -> float:
    """The server's own count of ``tiny`` requests answered with ``code`` (all RPCs)."""
    assert s.server is not None
    total = 0.0
    for metric in s.server.metrics.registry.collect():
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name == "xai_serve_requests_total"
                and labels.get("model") == NAME
                and labels.get("code") == code
            ):
                total += sample.value
    return total


def _burst(s: ServerThread, pool: list[torch.Tensor]) -> dict[str, Any]:
    """BURST unary requests at once, a stream of 16 and three requests for the other model;
    returns what came back and when."""
    n = len(pool)
    out: dict[str, Any] = {"unary": [], "stream": [], "other": []}
    with grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        sent = time.monotonic()
        futures = []
        for i in range(BURST):
            fut = stub.Explain.future(
                request(pool[i % n], target=i % n, request_id=f"u{i}"), timeout=TIMEOUT
            )
            futures.append((i, fut))
            fut.add_done_callback(lambda f, i=i: out["unary"].append((i, f, time.monotonic())))
        others = [
            stub.Explain.future(
                pb.ExplainRequest(
                    model=OTHER, method="saliency", request_id=f"o{i}", tensor=_proto(pool[i])
                ),
                timeout=TIMEOUT,
            )
            for i in range(3)
        ]
        stream = stub.ExplainStream(
            iter([request(pool[i % n], target=i % n, request_id=f"s{i}") for i in range(16)]),
            timeout=TIMEOUT,
        )
        out["stream"] = list(stream)
        out["other"] = [f.result(timeout=TIMEOUT) for f in others]
        for _, fut in futures:
            fut.exception(timeout=TIMEOUT)
        out["sent"] = sent
        wait_until(lambda: len(out["unary"]) == BURST)
    return out


def _proto(x: torch.Tensor) -> pb.Tensor:
    return codec.tensor_to_proto(x.contiguous())


def _check_burst(
    out: dict[str, Any], refs: list[Any], other_refs: list[Any]
) -> tuple[int, int, list[float], list[float]]:
    """``(answered, refused, refusal latencies, answer latencies)``; asserts every answer."""
    n = len(refs)
    answered = refused = 0
    lat_refused, lat_answered = [], []
    for i, fut, done_at in out["unary"]:
        err = fut.exception()
        latency = done_at - out["sent"]
        if err is not None:
            assert err.code() == Code.RESOURCE_EXHAUSTED, (i, err.code(), err.details())
            assert f"max_queue={MAX_QUEUE}" in err.details() and f"'{NAME}'" in err.details()
            refused += 1
            lat_refused.append(latency)
            continue
        resp = fut.result()
        assert resp.request_id == f"u{i}" and resp.target == i % n
        assert_close_batched(decode_tensor(resp.map), refs[i % n].maps[0])
        answered += 1
        lat_answered.append(latency)
    stream = {r.request_id: r for r in out["stream"]}
    assert sorted(stream) == sorted(f"s{i}" for i in range(16))
    for rid, resp in stream.items():
        i = int(rid[1:])
        if resp.HasField("error"):
            assert resp.error.code == Code.RESOURCE_EXHAUSTED.value[0], resp.error
            assert f"max_queue={MAX_QUEUE}" in resp.error.message
            refused += 1
        else:
            assert_close_batched(decode_tensor(resp.map), refs[i % n].maps[0])
            answered += 1
    for i, resp in enumerate(out["other"]):  # another model: its own queue, never refused
        assert resp.request_id == f"o{i}"
        assert_close_batched(decode_tensor(resp.map), other_refs[i].maps[0])
    return answered, refused, lat_refused, lat_answered


def test_burst_over_max_queue(server: ServerThread) -> None:
    s = server
    assert s.server is not None
    pool = [rand_input(1100 + i) for i in range(8)]
    refs = [reference(x, "gradcam", i) for i, x in enumerate(pool)]
    other_module = tiny_model(OTHER, max_delay_ms=5.0).module
    other_refs = [xai_serve.explain(other_module, x[None], "saliency") for x in pool[:3]]
    refused_before = _counted(s, "RESOURCE_EXHAUSTED")

    figures: dict[str, Any] = {}
    refused_total = 0
    for wave in (1, 2):  # the second burst finds the server as the first did
        out = _burst(s, pool)
        answered, refused, lat_refused, lat_answered = _check_burst(out, refs, other_refs)
        total = BURST + 16
        assert answered + refused == total
        # at most MAX_QUEUE wait while a batch (itself at most MAX_QUEUE) computes: most of a
        # burst that arrives within a few batches' time is refused
        assert refused >= total // 2, (answered, refused)
        assert answered >= MAX_QUEUE, (answered, refused)
        # promptly: a refusal does not wait for the model
        assert max(lat_refused) < 2.0, max(lat_refused)
        assert statistics.median(lat_refused) < statistics.median(lat_answered)
        figures[f"wave{wave}"] = {
            "requests": total,
            "answered": answered,
            "refused": refused,
            "refusal_ms_median": round(1e3 * statistics.median(lat_refused), 1),
            "refusal_ms_max": round(1e3 * max(lat_refused), 1),
            "answer_ms_median": round(1e3 * statistics.median(lat_answered), 1),
        }
        # nothing of the burst is left; the server's count agrees with what clients saw
        batcher = s.server.state.batchers[NAME]
        wait_until(lambda b=batcher: b.depth == 0)
        refused_total += refused
        assert _counted(s, "RESOURCE_EXHAUSTED") - refused_before == refused_total
        depth = s.server.metrics.registry.get_sample_value("xai_serve_queue_depth", {"model": NAME})
        assert depth == 0

    # recovery: sequential requests, then exactly MAX_QUEUE + 1 at once (one computes, four
    # wait: the queue is full, not over), all answered
    with grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for i in range(8):
            resp = stub.Explain(request(pool[i], target=i, request_id=f"r{i}"), timeout=TIMEOUT)
            assert_close_batched(decode_tensor(resp.map), refs[i].maps[0])
        gate = threading.Event()
        batcher = s.server.state.batchers[NAME]
        real = batcher._compute

        def held(jobs: Any) -> Any:
            assert gate.wait(TIMEOUT)
            return real(jobs)

        batcher._compute = held
        try:
            first = stub.Explain.future(request(pool[0], target=0), timeout=TIMEOUT)
            wait_until(lambda: batcher.depth == 0 and not first.done())
            time.sleep(0.1)  # the first is computing (held)
            rest = [
                stub.Explain.future(request(pool[i], target=i), timeout=TIMEOUT)
                for i in range(1, MAX_QUEUE + 1)
            ]
            wait_until(lambda: batcher.depth == MAX_QUEUE)
        finally:
            gate.set()
            batcher._compute = real
        for i, fut in enumerate([first, *rest]):
            assert_close_batched(decode_tensor(fut.result(timeout=TIMEOUT).map), refs[i].maps[0])
    record("backpressure", max_queue=MAX_QUEUE, **figures)


def test_oip_batch_over_the_queue_is_refused_whole_and_leaves_nothing(server: ServerThread) -> None:
    """An OIP request of MAX_QUEUE images while the queue is partly full: the images that did
    not fit are refused, so the request is RESOURCE_EXHAUSTED, and the images of it that had
    been queued leave the queue at once (their slots are free for the next request)."""
    s = server
    assert s.server is not None
    batcher = s.server.state.batchers[NAME]
    gate = threading.Event()
    real = batcher._compute

    def held(jobs: Any) -> Any:
        assert gate.wait(TIMEOUT)
        return real(jobs)

    xs = torch.stack([rand_input(1200 + i) for i in range(MAX_QUEUE)])
    refs = [reference(xs[i], "gradcam", i) for i in range(3)]  # while the server is idle
    top1 = reference(xs[0], "gradcam")
    batcher._compute = held
    try:
        with grpc.insecure_channel(s.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            infer = oip_grpc.GRPCInferenceServiceStub(channel)
            busy = stub.Explain.future(request(xs[0], target=0), timeout=TIMEOUT)
            wait_until(lambda: batcher.depth == 0 and not busy.done())
            time.sleep(0.1)  # busy is computing (held)
            waiting = [
                stub.Explain.future(request(xs[i], target=i), timeout=TIMEOUT) for i in (1, 2)
            ]
            wait_until(lambda: batcher.depth == 2)
            with pytest.raises(grpc.RpcError) as info:
                too_many = oip_request(NAME, xs, "too-many", explainer="gradcam")
                infer.ModelInfer(too_many, timeout=TIMEOUT)
            assert info.value.code() == Code.RESOURCE_EXHAUSTED, info.value.details()
            assert batcher.depth == 2  # its queued images were withdrawn
            gate.set()
            for i, fut in zip((0, 1, 2), [busy, *waiting], strict=True):
                resp = fut.result(timeout=TIMEOUT)
                assert_close_batched(decode_tensor(resp.map), refs[i].maps[0])
            fits = oip_request(NAME, xs[:2], "fits", explainer="gradcam")
            resp = infer.ModelInfer(fits, timeout=TIMEOUT)
            maps = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
            assert_close_batched(maps.reshape(2, 64, 64)[0], top1.maps[0])
    finally:
        gate.set()
        batcher._compute = real
