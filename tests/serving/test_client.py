"""xai_serve.client against a real grpc.aio server that runs a fake Explainer servicer.

The fake servicer answers in a way the tests can check number for number: the map is
``arange(H*W) + 1000 * samples + target``, the top-k classes start at the target, and every
request proto and its metadata are recorded so the tests assert the exact typed fields the
client sent. ExplainStream answers in reverse order and fails some items with ``error``; for a
request with ``progress`` on a sampling method it first sends :data:`PARTIAL_ROUNDS` partial
answers (``samples`` = the round, ``segment_stderr`` shrinking with it).

The last section runs the real server (tests/serving/harness.py) with its tiny model for what
only the server can show: partial answers that come from real sampling rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import torch

from xai_serve.client import (
    OPTION_NAMES,
    AsyncClient,
    ClassScore,
    Client,
    ForwardPathInfo,
    ModelInfo,
    RemoteError,
    RemoteExplanation,
    RemoteInvalidInput,
    RemoteNotFound,
    Timing,
    decode_tensor,
    encode_tensor,
    error_from_rpc,
    parse_forward_path,
    parse_response,
    remote_error,
)
from xai_serve.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc

H, W = 4, 6
DEFAULT_TARGET = 7
PNG = b"\x89PNG\r\n\x1a\n" + b"not really a png"
UNANSWERED_TARGET = 999  # ExplainStream silently drops requests with this target
PARTIAL_ROUNDS = 2  # partial answers the fake sends before the final one, with progress
STDERR = [0.01, 0.0, 0.5]  # the final segment_stderr of lime / kernelshap answers


def expected_map(samples: int, target: int) -> torch.Tensor:
    """The map the fake servicer returns for ``samples`` and ``target``."""
    return torch.arange(H * W, dtype=torch.float32).reshape(H, W) + 1000 * samples + target


def fake_classes(request: pb.ExplainRequest) -> list[int]:
    """The classes the fake explains for several targets: ``targets``, or for ``top_labels``
    k the classes DEFAULT_TARGET, DEFAULT_TARGET + 1, ... (its top-k); [] for one class."""
    if request.targets:
        return list(request.targets)
    if request.HasField("top_labels"):
        return [DEFAULT_TARGET + i for i in range(request.top_labels)]
    return []


def fill_target(
    message: pb.ExplainResponse | pb.TargetExplanation,
    request: pb.ExplainRequest,
    target: int,
    samples: int,
) -> None:
    """The one-class fields of an answer (an ExplainResponse's singular fields or one
    TargetExplanation), encoding the class: map = expected_map(samples, target), overlay =
    PNG + request id + "/target", weights shifted by the target, intercept 0.125 + target."""
    message.target = target
    if request.returns in (pb.RETURN_UNSPECIFIED, pb.MAP, pb.MAP_AND_OVERLAY):
        data = expected_map(samples, target).numpy().astype("<f4").tobytes()
        message.map.CopyFrom(pb.Tensor(shape=[H, W], dtype=pb.FLOAT32, data=data))
    if request.returns in (pb.OVERLAY, pb.MAP_AND_OVERLAY):
        suffix = f"/{target}" if fake_classes(request) else ""
        message.overlay_png = PNG + request.request_id.encode() + suffix.encode()
    if request.method in ("lime", "kernelshap"):
        shift = target - DEFAULT_TARGET if fake_classes(request) else 0
        message.segment_weights.extend([w + shift for w in (0.25, -0.5, 1.0)])
        message.segment_stderr.extend(STDERR)
        message.intercept = 0.125 + shift
        if request.method == "lime":
            message.score = 0.75


def fake_answer(request: pb.ExplainRequest) -> pb.ExplainResponse:
    """A response that encodes what the request asked for; with several classes
    (``targets``, ``top_labels``) one ``per_target`` entry each (see :func:`fill_target`),
    the singular fields holding the first one's, and the foil echoed."""
    classes = fake_classes(request)
    if classes:
        target = classes[0]
    else:
        target = request.target if request.HasField("target") else DEFAULT_TARGET
    samples = request.options.samples if request.options.HasField("samples") else 0
    k = request.top_k if request.HasField("top_k") else 2
    response = pb.ExplainResponse(
        request_id=request.request_id,
        model=request.model,
        method=request.method,
        layer=request.layer or ("features.8" if "cam" in request.method else ""),
        target=target,
        samples=samples,
        top_k=[
            pb.ClassScore(
                index=target + i,
                label=f"class{target + i}",
                probability=0.5 / (i + 1),
                logit=float(target - i),
            )
            for i in range(k)
        ],
        timing=pb.Timing(
            queue_ms=1.5, compute_ms=2.25, batch_size=3, cache_hit=request.model == "cached"
        ),
    )
    fill_target(response, request, target, samples)
    for t in classes:
        fill_target(response.per_target.add(), request, t, samples)
    if request.method in ("lime", "kernelshap"):
        segments = (np.arange(H * W, dtype="<i4") % 3).reshape(H, W)
        response.segments.CopyFrom(pb.Tensor(shape=[H, W], dtype=pb.INT32, data=segments.tobytes()))
    if request.HasField("foil"):
        response.foil = request.foil
    if request.options.HasField("seed"):
        response.seed = request.options.seed
    return response


def fake_partials(request: pb.ExplainRequest) -> list[pb.ExplainResponse]:
    """The partial answers sent before ``fake_answer`` for a ``progress`` request: round r has
    ``samples`` = r (so its map encodes r) and ``segment_stderr`` = STDERR * (ROUNDS + 1 - r)."""
    if not request.progress or request.method not in ("lime", "kernelshap"):
        return []
    out = []
    for r in range(1, PARTIAL_ROUNDS + 1):
        partial = pb.ExplainRequest()
        partial.CopyFrom(request)
        partial.options.samples = r
        response = fake_answer(partial)
        response.partial = True
        response.ClearField("overlay_png")
        del response.segment_stderr[:]
        response.segment_stderr.extend([e * (PARTIAL_ROUNDS + 1 - r) for e in STDERR])
        out.append(response)
    return out


class FakeExplainer(pb_grpc.ExplainerServicer):
    """Records what it receives; fails on purpose for some models and targets."""

    def __init__(self) -> None:
        self.requests: list[pb.ExplainRequest] = []
        self.stream_requests: list[pb.ExplainRequest] = []
        self.metadata: list[dict[str, str]] = []

    def reset(self) -> None:
        self.requests.clear()
        self.stream_requests.clear()
        self.metadata.clear()

    def _record_metadata(self, context: grpc.aio.ServicerContext) -> None:
        self.metadata.append({m.key: m.value for m in context.invocation_metadata() or ()})

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        self.requests.append(request)
        self._record_metadata(context)
        if request.model == "nope":
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown model 'nope'")
        if request.model.startswith("status:"):
            code = grpc.StatusCode[request.model.removeprefix("status:")]
            await context.abort(code, f"forced {code.name}")
        if request.HasField("target") and request.target < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "target: must be >= 0")
        if request.model == "slow":
            await asyncio.sleep(3.0)
        if request.model == "garbage":
            response = fake_answer(request)
            response.map.data = b"\x00" * 3
            return response
        return fake_answer(request)

    async def ExplainStream(
        self, request_iterator: AsyncIterator[pb.ExplainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainResponse]:
        self._record_metadata(context)
        received = [request async for request in request_iterator]
        self.stream_requests.extend(received)
        if received and received[0].model.startswith("status:"):
            code = grpc.StatusCode[received[0].model.removeprefix("status:")]
            await context.abort(code, f"forced {code.name}")
        for request in reversed(received):
            if request.HasField("target") and request.target == UNANSWERED_TARGET:
                continue
            if request.HasField("target") and request.target < 0:
                error = pb.Error(code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="target")
                yield pb.ExplainResponse(request_id=request.request_id, error=error)
            elif request.model == "nope":
                error = pb.Error(code=grpc.StatusCode.NOT_FOUND.value[0], message="no model")
                yield pb.ExplainResponse(request_id=request.request_id, error=error)
            else:
                for partial in fake_partials(request):
                    yield partial
                if request.model != "partial-only":
                    yield fake_answer(request)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        self._record_metadata(context)
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name="efficientnet_lite0",
                    input_shape=[3, 224, 224],
                    num_classes=1000,
                    default_layer="features.8",
                    layers=["features.6", "features.8"],
                    methods=["gradcam", "lime"],
                    device="cpu",
                    max_batch_size=16,
                    ready=True,
                    has_class_names=True,
                    forward_path=pb.ForwardPath(
                        tuned=True,
                        memory_format="channels_last",
                        precision="bf16",
                        batch_size=32,
                        grad_batch_size=8,
                        compiled=True,
                        images_per_s=812.5,
                        speedup=2.75,
                        top1_agreement=1.0,
                        logit_error=0.03125,
                        rank_correlation=0.96875,
                        summary="channels_last bf16 batch 32 compiled: 2.75x",
                    ),
                ),
                pb.ModelInfo(
                    name="digits",
                    input_shape=[1, 28, 28],
                    num_classes=10,
                    methods=["saliency"],
                    device="cuda:0",
                    max_batch_size=64,
                ),
            ]
        )


@contextlib.asynccontextmanager
async def serving(
    fake: FakeExplainer, credentials: grpc.ServerCredentials | None = None, host: str = "127.0.0.1"
) -> AsyncIterator[str]:
    """A started grpc.aio server with ``fake`` on a free port; yields its address."""
    server = grpc.aio.server()
    pb_grpc.add_ExplainerServicer_to_server(fake, server)
    if credentials is None:
        port = server.add_insecure_port(f"{host}:0")
    else:
        port = server.add_secure_port(f"{host}:0", credentials)
    await server.start()
    try:
        yield f"{host}:{port}"
    finally:
        await server.stop(None)


@pytest.fixture(scope="module")
def background_server() -> Iterator[tuple[FakeExplainer, str]]:
    """The server on its own event loop in a thread, for the blocking client."""
    fake = FakeExplainer()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = serving(fake)
    address = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(10)
    try:
        yield fake, address
    finally:
        asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def fake(background_server: tuple[FakeExplainer, str]) -> FakeExplainer:
    background_server[0].reset()
    return background_server[0]


@pytest.fixture
def client(background_server: tuple[FakeExplainer, str]) -> Iterator[Client]:
    with Client(background_server[1], token="s3cret", timeout=10) as c:
        yield c


ALL_OPTIONS: dict[str, Any] = {
    "samples": 64,
    "steps": 16,
    "rule": "riemann_middle",
    "n_segments": 50,
    "segmenter": "grid",
    "baseline": 0.5,
    "seed": 2**40 + 3,
    "kernel_width": 0.25,
    "alpha": 1.5,
    "keep_prob": 0.75,
    "paired": True,
    "blur_sigma": 2.5,
    "output": "logit",
    "noise": 0.125,
    "base": "input_x_gradient",
    "abs": False,
    "window": 8,
    "stride": 4,
    "top_channels": 32,
    "tolerance": 0.015625,
    "budget_ms": 1500,
    "cam_linear": "fc",
    "head_fusion": "max",
    "discard_ratio": 0.875,
    "baselines": 6,
}


# --------------------------------------------------------------------------------------------
# Request building
# --------------------------------------------------------------------------------------------


def test_the_option_table_covers_every_proto_field() -> None:
    assert set(OPTION_NAMES) == {f.name for f in pb.Options.DESCRIPTOR.fields}
    assert set(ALL_OPTIONS) == set(OPTION_NAMES)


def test_every_option_reaches_its_typed_field(client: Client, fake: FakeExplainer) -> None:
    client.explain(PNG, model="m", method="lime", **ALL_OPTIONS)
    (request,) = fake.requests
    o = request.options
    assert {f.name for f, _ in o.ListFields()} == set(OPTION_NAMES)  # every one was sent
    ints = (
        "samples",
        "steps",
        "n_segments",
        "window",
        "stride",
        "top_channels",
        "seed",
        "budget_ms",
        "baselines",
    )
    assert {name: getattr(o, name) for name in ints} == {name: ALL_OPTIONS[name] for name in ints}
    floats = ("kernel_width", "alpha", "keep_prob", "blur_sigma", "noise", "tolerance",
              "discard_ratio")  # exact  # fmt: skip
    assert {n: getattr(o, n) for n in floats} == {n: ALL_OPTIONS[n] for n in floats}
    assert (o.rule, o.base) == ("riemann_middle", "input_x_gradient")
    assert (o.cam_linear, o.head_fusion) == ("fc", "max")
    assert (o.segmenter, o.output) == (pb.GRID, pb.LOGIT)
    assert o.baseline.WhichOneof("kind") == "value"
    assert o.baseline.value == 0.5
    assert o.paired is True
    assert o.HasField("abs") and o.abs is False  # an explicit False is sent, not left unset


def test_unset_options_stay_unset_and_defaults(client: Client, fake: FakeExplainer) -> None:
    client.explain(PNG, samples=None)
    (request,) = fake.requests
    assert request.options == pb.Options()
    assert (request.model, request.method) == ("efficientnet_lite0", "gradcam")
    assert not request.HasField("target") and not request.HasField("top_k")
    assert request.layer == ""
    assert request.returns == pb.MAP
    assert len(request.request_id) == 32  # a fresh uuid4 hex


def test_tolerance_and_budget_from_text_and_checked(client: Client) -> None:
    from xai_serve.client import option_from_text

    assert option_from_text("tolerance", " 0.01 ") == 0.01
    assert option_from_text("budget_ms", "250") == 250
    with pytest.raises(InvalidInput, match=r"option budget_ms takes an int, got '2\.5'"):
        option_from_text("budget_ms", "2.5")
    with pytest.raises(InvalidInput, match="option tolerance takes a number"):
        option_from_text("tolerance", "small")
    with pytest.raises(InvalidInput, match="budget_ms takes an int, got float"):
        client.explain(PNG, budget_ms=2.5)
    with pytest.raises(InvalidInput, match="tolerance takes a number, got str"):
        client.explain(PNG, tolerance="0.1")
    with pytest.raises(InvalidInput, match=r"option budget_ms=8589934592: "):
        client.explain(PNG, budget_ms=2**33)  # beyond the int32 field


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"baseline": 0.0}, "value", 0.0),  # a zero baseline is still set (oneof presence)
        ({"baseline": -1}, "value", -1.0),
        ({"baseline": "blur"}, "blur", True),
        ({"baseline": "BLUR"}, "blur", True),
    ],
)
def test_baseline_oneof(client: Client, fake: FakeExplainer, kwargs, field, expected) -> None:
    client.explain(PNG, method="occlusion", **kwargs)
    baseline = fake.requests[0].options.baseline
    assert baseline.WhichOneof("kind") == field
    assert getattr(baseline, field) == expected


@pytest.mark.parametrize(
    ("kwargs", "field", "expected"),
    [
        ({"segmenter": "slic"}, "segmenter", pb.SLIC),
        ({"segmenter": "SLIC"}, "segmenter", pb.SLIC),
        ({"output": "probability"}, "output", pb.PROBABILITY),
        ({"seed": np.int64(5)}, "seed", 5),
        ({"noise": np.float32(0.5)}, "noise", 0.5),
        ({"paired": np.bool_(True)}, "paired", True),
    ],
)
def test_enum_and_numpy_scalar_options(
    client: Client, fake: FakeExplainer, kwargs, field, expected
) -> None:
    client.explain(PNG, method="lime", **kwargs)
    assert getattr(fake.requests[0].options, field) == expected


def test_target_layer_top_k_and_request_id(client: Client, fake: FakeExplainer) -> None:
    result = client.explain(
        PNG, model="m", method="gradcam++", target=0, layer="features.6", top_k=0, request_id="r-1"
    )
    (request,) = fake.requests
    assert request.HasField("target") and request.target == 0  # target 0 is sent, not dropped
    assert request.layer == "features.6"
    assert request.HasField("top_k") and request.top_k == 0
    assert request.request_id == "r-1"
    assert result.request_id == "r-1"
    assert result.top_k == ()
    assert result.layer == "features.6"


@pytest.mark.parametrize(
    ("want_map", "overlay", "returns"),
    [(True, False, pb.MAP), (False, True, pb.OVERLAY), (True, True, pb.MAP_AND_OVERLAY)],
)
def test_returns(client: Client, fake: FakeExplainer, want_map, overlay, returns) -> None:
    result = client.explain(PNG, map=want_map, overlay=overlay, request_id="ov")
    assert fake.requests[0].returns == returns
    assert (result.map is not None) == want_map
    assert result.overlay_png == (PNG + b"ov" if overlay else None)


def test_neither_map_nor_overlay_is_refused_locally(client: Client, fake: FakeExplainer) -> None:
    with pytest.raises(InvalidInput, match="nothing to return"):
        client.explain(PNG, map=False, overlay=False)
    assert fake.requests == [] and fake.metadata == []


def test_unknown_option_is_refused_locally(client: Client, fake: FakeExplainer) -> None:
    with pytest.raises(InvalidInput) as info:
        client.explain(PNG, sample=3)
    message = str(info.value)
    assert "'sample'" in message and "did you mean 'samples'" in message
    for name in OPTION_NAMES:
        assert name in message
    with pytest.raises(InvalidInput, match="unknown option"):
        client.explain_many([PNG], method="lime", bogus=1)
    assert fake.requests == [] and fake.stream_requests == [] and fake.metadata == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": "3"}, "samples takes an int"),
        ({"samples": 3.0}, "samples takes an int"),
        ({"samples": True}, "samples takes an int"),
        ({"samples": 2**40}, "samples"),  # out of int32 range
        ({"noise": "0.1"}, "noise takes a number"),
        ({"paired": 1}, "paired takes a bool"),
        ({"rule": 3}, "rule takes a str"),
        ({"segmenter": "watershed"}, "segmenter must be one of"),
        ({"output": "softmax"}, "output must be one of"),
        ({"baseline": "zero"}, "baseline takes a number or 'blur'"),
        ({"target": 1.0}, "target takes an int"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"request_id": "x" * 257}, "request_id"),
        ({"timeout": -1.0}, "timeout"),
    ],
)
def test_bad_values_are_refused_locally(client: Client, fake: FakeExplainer, kwargs, match) -> None:
    with pytest.raises(InvalidInput, match=match):
        client.explain(PNG, **kwargs)
    assert fake.requests == []


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def test_image_from_bytes_and_paths(client: Client, fake: FakeExplainer, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG + b"file")
    client.explain(bytearray(PNG))
    client.explain(memoryview(PNG))
    client.explain(path)
    client.explain(str(path))
    images = [r.image for r in fake.requests]
    assert [r.WhichOneof("input") for r in fake.requests] == ["image"] * 4
    assert images == [PNG, PNG, PNG + b"file", PNG + b"file"]


@pytest.mark.parametrize(
    "image",
    [
        torch.linspace(-2, 2, 3 * 5 * 7).reshape(3, 5, 7),
        torch.linspace(-2, 2, 3 * 5 * 7, dtype=torch.float64).reshape(1, 3, 5, 7),
        torch.linspace(-2, 2, 3 * 5 * 7, dtype=torch.bfloat16).reshape(3, 5, 7),
        torch.linspace(-2, 2, 3 * 7 * 5).reshape(3, 7, 5).transpose(1, 2),  # not contiguous
        torch.linspace(-2, 2, 3 * 5 * 7).reshape(3, 5, 7).requires_grad_(),
        np.linspace(-2, 2, 3 * 5 * 7, dtype=np.float32).reshape(3, 5, 7),
        np.linspace(-2, 2, 3 * 5 * 7).reshape(1, 3, 5, 7).astype(">f8"),  # big-endian float64
        np.asfortranarray(np.linspace(-2, 2, 3 * 5 * 7, dtype=np.float16).reshape(3, 5, 7)),
    ],
    ids=["f32", "f64-4d", "bf16", "strided", "grad", "np-f32", "np-f64-be", "np-f16-fortran"],
)
def test_image_from_tensor(client: Client, fake: FakeExplainer, image: Any) -> None:
    client.explain(image)
    tensor = fake.requests[0].tensor
    assert fake.requests[0].WhichOneof("input") == "tensor"
    assert list(tensor.shape) == list(image.shape)
    assert tensor.dtype == pb.FLOAT32
    if isinstance(image, torch.Tensor):
        reference = image.detach().float().numpy()
    else:
        reference = image.astype(np.float32)
    expected = np.ascontiguousarray(reference).astype("<f4").tobytes()
    assert tensor.data == expected
    # and it reads back as the same tensor
    np.testing.assert_array_equal(decode_tensor(tensor).numpy(), reference)


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (torch.zeros(3, 5, 7, dtype=torch.uint8), "float tensor"),
        (np.zeros((3, 5, 7), dtype=np.int32), "float array"),
        (torch.zeros(2, 3, 5, 7), r"\[C, H, W\] or \[1, C, H, W\]"),
        (torch.zeros(5, 7), r"\[C, H, W\]"),
        (b"", "empty"),
        (12, "got int"),
    ],
)
def test_bad_images_are_refused_locally(
    client: Client, fake: FakeExplainer, image: Any, match: str
) -> None:
    with pytest.raises(InvalidInput, match=match):
        client.explain(image)
    assert fake.requests == []


def test_missing_image_file(client: Client, fake: FakeExplainer, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read image file"):
        client.explain(tmp_path / "missing.png")
    assert fake.requests == []


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def test_response_is_decoded(client: Client) -> None:
    result = client.explain(PNG, model="m", method="lime", samples=3, target=11, seed=42)
    assert isinstance(result, RemoteExplanation)
    assert (result.model, result.method, result.target, result.samples) == ("m", "lime", 11, 3)
    assert result.layer is None  # "" on the wire
    assert result.map is not None
    assert result.map.dtype == torch.float32 and result.map.shape == (H, W)
    torch.testing.assert_close(result.map, expected_map(3, 11), rtol=0, atol=0)
    result.map.add_(1)  # writable (its own buffer)
    assert result.top_k == (
        ClassScore(index=11, label="class11", probability=0.5, logit=11.0),
        ClassScore(index=12, label="class12", probability=0.25, logit=10.0),
    )
    assert result.timing == Timing(queue_ms=1.5, compute_ms=2.25, batch_size=3)
    assert result.segments is not None and result.segments.dtype == torch.int32
    torch.testing.assert_close(
        result.segments, (torch.arange(H * W, dtype=torch.int32) % 3).reshape(H, W)
    )
    assert result.segment_weights is not None
    assert result.segment_weights.tolist() == [0.25, -0.5, 1.0]
    assert result.segment_stderr is not None and result.segment_stderr.dtype == torch.float32
    torch.testing.assert_close(result.segment_stderr, torch.tensor(STDERR), rtol=0, atol=0)
    assert (result.intercept, result.score, result.seed) == (0.125, 0.75, 42)
    assert result.overlay_png is None
    assert result.partial is False and result.timing.cache_hit is False


def test_cache_hit_is_decoded(client: Client) -> None:
    result = client.explain(PNG, model="cached")
    assert result.timing == Timing(queue_ms=1.5, compute_ms=2.25, batch_size=3, cache_hit=True)


def test_optional_response_fields_are_none(client: Client) -> None:
    result = client.explain(PNG, method="gradcam")
    assert result.layer == "features.8"
    assert result.target == DEFAULT_TARGET
    assert result.segments is None and result.segment_weights is None
    assert result.segment_stderr is None and result.partial is False
    assert result.intercept is None and result.score is None and result.seed is None


def test_decode_tensor_dtypes_and_checks() -> None:
    for dtype, proto in [
        (torch.float16, pb.FLOAT16),
        (torch.bfloat16, pb.BFLOAT16),
        (torch.float64, pb.FLOAT64),
        (torch.uint8, pb.UINT8),
        (torch.int64, pb.INT64),
    ]:
        x = torch.arange(12).reshape(3, 4).to(dtype)
        data = x.view(torch.uint8).numpy().tobytes()  # this machine is little-endian
        out = decode_tensor(pb.Tensor(shape=[3, 4], dtype=proto, data=data))
        assert out.dtype == dtype and torch.equal(out, x)
    empty = decode_tensor(pb.Tensor(shape=[0, 4], dtype=pb.FLOAT32))
    assert empty.shape == (0, 4) and empty.dtype == torch.float32
    with pytest.raises(ValueError, match="needs 48"):
        decode_tensor(pb.Tensor(shape=[3, 4], dtype=pb.FLOAT32, data=b"\x00" * 47))
    with pytest.raises(ValueError, match="unsupported dtype"):
        decode_tensor(pb.Tensor(shape=[1], dtype=pb.DATA_TYPE_UNSPECIFIED, data=b"\x00"))


def test_malformed_response_is_a_remote_error(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.explain(PNG, model="garbage", request_id="g")
    assert info.value.code == grpc.StatusCode.INTERNAL
    assert "malformed response" in info.value.details
    assert info.value.request_id == "g"
    result = parse_response(pb.ExplainResponse(request_id="x", error=pb.Error(code=0, message="?")))
    assert isinstance(result, RemoteError) and result.code == grpc.StatusCode.UNKNOWN


# --------------------------------------------------------------------------------------------
# Errors, deadlines, metadata
# --------------------------------------------------------------------------------------------


def test_not_found_is_caught_by_the_domain_class(client: Client) -> None:
    try:
        client.explain(PNG, model="nope", request_id="req-7")
    except NotFound as err:  # the domain class catches the remote error
        assert isinstance(err, RemoteError) and isinstance(err, LookupError)
        assert isinstance(err, RemoteNotFound)
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert err.details == "unknown model 'nope'"
        assert err.request_id == "req-7"
        assert "NOT_FOUND" in str(err) and "req-7" in str(err)
    else:
        pytest.fail("no error raised")


def test_invalid_argument_is_invalid_input(client: Client) -> None:
    with pytest.raises(InvalidInput) as info:
        client.explain(PNG, target=-1, request_id="neg")
    err = info.value
    assert isinstance(err, RemoteInvalidInput) and isinstance(err, ValueError)
    assert (err.code, err.details, err.request_id) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "target: must be >= 0",
        "neg",
    )


@pytest.mark.parametrize(
    ("code", "domain"),
    [
        ("RESOURCE_EXHAUSTED", ResourceExhausted),
        ("UNAVAILABLE", Unavailable),
        ("UNAUTHENTICATED", None),
        ("PERMISSION_DENIED", None),
        ("INTERNAL", None),
        ("FAILED_PRECONDITION", FailedPrecondition),
    ],
)
def test_status_codes_map_to_classes(client: Client, code: str, domain: type | None) -> None:
    with pytest.raises(RemoteError) as info:
        client.explain(PNG, model=f"status:{code}")
    err = info.value
    assert err.code == grpc.StatusCode[code]
    assert err.details == f"forced {code}"
    domains = (InvalidInput, NotFound, ResourceExhausted, Unavailable, FailedPrecondition)
    if domain is None:
        assert type(err) is RemoteError
        assert not isinstance(err, domains)
    else:
        assert isinstance(err, domain)
        assert [d for d in domains if isinstance(err, d)] == [domain]


def test_remote_errors_pickle_and_map_integer_codes() -> None:
    err = remote_error(5, "gone", "r")
    assert isinstance(err, RemoteNotFound) and err.code == grpc.StatusCode.NOT_FOUND
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RemoteNotFound
    assert (back.code, back.details, back.request_id) == (err.code, "gone", "r")
    assert type(remote_error(12345, "?")) is RemoteError
    assert remote_error(12345, "?").code == grpc.StatusCode.UNKNOWN


def test_deadline_exceeded(background_server: tuple[FakeExplainer, str]) -> None:
    with Client(background_server[1], timeout=0.3) as quick:
        start = time.perf_counter()
        with pytest.raises(RemoteError) as info:
            quick.explain(PNG, model="slow", request_id="s")  # the client's default deadline
        assert time.perf_counter() - start < 2.0
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert info.value.request_id == "s"
        assert isinstance(info.value, XaiServeError)
    with Client(background_server[1], timeout=None) as patient:
        with pytest.raises(RemoteError) as info:
            patient.explain(PNG, model="slow", timeout=0.2)  # a per-call deadline
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_bearer_token_on_every_call(
    client: Client, fake: FakeExplainer, background_server: tuple[FakeExplainer, str]
) -> None:
    client.explain(PNG)
    client.list_models()
    list(client.explain_many([PNG]))
    assert [m.get("authorization") for m in fake.metadata] == ["Bearer s3cret"] * 3
    fake.reset()
    with Client(background_server[1]) as anonymous:
        anonymous.explain(PNG)
    assert "authorization" not in fake.metadata[0]


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as c, pytest.raises(Unavailable) as info:
        c.explain(PNG)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------------------------
# explain_many
# --------------------------------------------------------------------------------------------


def test_explain_many_in_completion_order_with_failures(
    client: Client, fake: FakeExplainer
) -> None:
    images = [PNG, torch.zeros(3, 5, 7), np.ones((1, 3, 5, 7), np.float32), PNG]
    results = list(
        client.explain_many(images, method="smoothgrad", samples=2, image_targets=[1, -1, 3, None])
    )
    # the fake answers in reverse order: completion order is kept, not request order
    assert [r.request_id for r in results] == ["3", "2", "1", "0"]
    sent = fake.stream_requests
    assert [r.request_id for r in sent] == ["0", "1", "2", "3"]
    assert [r.WhichOneof("input") for r in sent] == ["image", "tensor", "tensor", "image"]
    assert [r.target if r.HasField("target") else None for r in sent] == [1, -1, 3, None]
    assert all(r.options.samples == 2 and r.method == "smoothgrad" for r in sent)
    failed = results[2]
    assert isinstance(failed, RemoteError) and isinstance(failed, InvalidInput)
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT and failed.request_id == "1"
    for result, target in zip(
        (results[0], results[1], results[3]), (DEFAULT_TARGET, 3, 1), strict=True
    ):
        assert isinstance(result, RemoteExplanation)
        assert result.target == target
        torch.testing.assert_close(result.map, expected_map(2, target), rtol=0, atol=0)


def test_explain_many_request_ids_and_shared_target(client: Client, fake: FakeExplainer) -> None:
    results = list(client.explain_many([PNG, PNG], request_ids=["a", "b"], target=4, top_k=1))
    assert [r.request_id for r in results] == ["b", "a"]
    assert all(isinstance(r, RemoteExplanation) and r.target == 4 for r in results)
    assert all(r.top_k == 1 and r.target == 4 for r in fake.stream_requests)


def test_explain_many_lazy_iterator_and_domain_errors(client: Client) -> None:
    def images() -> Iterator[bytes]:
        yield PNG
        yield PNG

    results = list(client.explain_many(images(), model="nope"))
    assert [type(r) for r in results] == [RemoteNotFound, RemoteNotFound]
    assert sorted(r.request_id for r in results) == ["0", "1"]


def test_explain_many_local_failure_does_not_stop_the_others(
    client: Client, fake: FakeExplainer, tmp_path: Path
) -> None:
    results = list(client.explain_many([PNG, tmp_path / "missing.png", PNG]))
    assert [r.request_id for r in fake.stream_requests] == ["0", "2"]  # "1" was never sent
    by_id = {r.request_id: r for r in results}
    assert sorted(by_id) == ["0", "1", "2"]
    assert isinstance(by_id["1"], RemoteInvalidInput)
    assert "cannot read image file" in by_id["1"].details
    assert isinstance(by_id["0"], RemoteExplanation) and isinstance(by_id["2"], RemoteExplanation)


def test_explain_many_unanswered_request(client: Client) -> None:
    results = list(client.explain_many([PNG, PNG], image_targets=[UNANSWERED_TARGET, 2]))
    assert [r.request_id for r in results] == ["1", "0"]
    missing = results[1]
    assert isinstance(missing, RemoteError) and missing.code == grpc.StatusCode.UNKNOWN


def test_explain_many_stream_failure_raises(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        list(client.explain_many([PNG, PNG], model="status:UNAUTHENTICATED"))
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_explain_many_failing_image_iterator_raises(client: Client) -> None:
    def images() -> Iterator[bytes]:
        yield PNG
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(client.explain_many(images()))


async def _async_images() -> AsyncIterator[bytes]:
    yield PNG


def test_explain_many_checks_arguments_before_the_stream(
    client: Client, fake: FakeExplainer
) -> None:
    with pytest.raises(InvalidInput, match="2 images but 1 image_targets"):
        client.explain_many([PNG, PNG], image_targets=[1])
    with pytest.raises(InvalidInput, match="unique"):
        client.explain_many([PNG, PNG], request_ids=["a", "a"])
    for shared in ({"target": 1}, {"targets": [1, 2]}):
        with pytest.raises(InvalidInput, match=r"either target/targets .* or image_targets"):
            client.explain_many([PNG], image_targets=[1], **shared)
    with pytest.raises(InvalidInput, match="iterable of images"):
        client.explain_many("cat.png")
    with pytest.raises(InvalidInput, match="sync"):
        client.explain_many(_async_images())
    with pytest.raises(InvalidInput, match="not one str"):
        client.explain_many([PNG, PNG], request_ids="ab")
    with pytest.raises(InvalidInput, match=r"image_targets\[1\] takes a sequence of ints"):
        client.explain_many([PNG, PNG], image_targets=[1, "2"])
    with pytest.raises(InvalidInput, match=r"image_targets\[0\]\[1\] takes an int"):
        client.explain_many([PNG, PNG], image_targets=[[1, 2.0], None])
    # the per-image list of old is image_targets now: a None among targets says so
    with pytest.raises(InvalidInput, match=r"targets\[1\] takes an int.*image_targets="):
        client.explain_many([PNG, PNG], targets=[1, None])
    assert fake.metadata == []


def test_explain_many_early_exit_cancels(client: Client) -> None:
    items = client.explain_many([PNG] * 5)
    first = next(items)
    assert isinstance(first, RemoteExplanation)
    items.close()  # cancels the call; no hang, no error
    assert isinstance(client.explain(PNG), RemoteExplanation)  # the channel is still good


# --------------------------------------------------------------------------------------------
# Several targets, top_labels and a foil
# --------------------------------------------------------------------------------------------


def _class_fields(
    request: pb.ExplainRequest,
) -> tuple[int | None, list[int], int | None, int | None]:
    """``(target, targets, top_labels, foil)`` as sent (None: unset)."""
    return (
        request.target if request.HasField("target") else None,
        list(request.targets),
        request.top_labels if request.HasField("top_labels") else None,
        request.foil if request.HasField("foil") else None,
    )


def test_targets_top_labels_and_foil_reach_the_request(client: Client, fake: FakeExplainer) -> None:
    client.explain(PNG, targets=[3, 5, 0], foil=2)
    client.explain(PNG, top_labels=2, foil=0)  # foil 0 is sent, not dropped
    client.explain(PNG, targets=(np.int64(4), 9))
    client.explain(PNG, targets=torch.tensor([6, 1]))
    client.explain(PNG, targets=np.array([8]), top_labels=1, target=2)  # the server refuses
    client.explain(PNG)
    assert [_class_fields(r) for r in fake.requests] == [
        (None, [3, 5, 0], None, 2),
        (None, [], 2, 0),
        (None, [4, 9], None, None),
        (None, [6, 1], None, None),
        (2, [8], 1, None),
        (None, [], None, None),
    ]


def test_per_target_answers_are_decoded(client: Client) -> None:
    result = client.explain(
        PNG, method="lime", targets=[3, 5], foil=2, overlay=True, samples=4, request_id="mt"
    )
    assert [t.target for t in result.per_target] == [3, 5] and result.foil == 2
    for t in result.per_target:
        assert t.map is not None
        torch.testing.assert_close(t.map, expected_map(4, t.target), rtol=0, atol=0)
        assert t.overlay_png == PNG + f"mt/{t.target}".encode()
        shift = t.target - DEFAULT_TARGET
        assert t.segment_weights is not None and t.segment_stderr is not None
        assert t.segment_weights.tolist() == [0.25 + shift, -0.5 + shift, 1.0 + shift]
        assert t.segment_stderr.tolist() == pytest.approx(STDERR)
        assert t.intercept == 0.125 + shift and t.score == 0.75
    first = result.per_target[0]
    # the singular fields are the first class's, decoded by the same code
    assert result.target == 3 and result.overlay_png == first.overlay_png
    assert result.map is not None and first.map is not None and torch.equal(result.map, first.map)
    assert result.segment_weights is not None and first.segment_weights is not None
    assert torch.equal(result.segment_weights, first.segment_weights)
    assert result.intercept == first.intercept and result.score == first.score
    assert result.segments is not None and result.segments.shape == (H, W)

    top = client.explain(PNG, method="gradcam", top_labels=3, map=True)
    assert [t.target for t in top.per_target] == [7, 8, 9] and top.foil is None
    assert all(
        t.segment_weights is None and t.intercept is None and t.overlay_png is None
        for t in top.per_target
    )
    torch.testing.assert_close(top.per_target[2].map, expected_map(0, 9), rtol=0, atol=0)
    only_overlay = client.explain(PNG, targets=[1, 2], map=False, overlay=True)
    assert [t.map for t in only_overlay.per_target] == [None, None]


def test_one_class_answers_have_no_per_target(client: Client) -> None:
    plain = client.explain(PNG, method="lime", target=4)
    assert plain.per_target == () and plain.foil is None
    contrast = client.explain(PNG, target=4, foil=3)
    assert contrast.per_target == () and contrast.foil == 3 and contrast.target == 4
    # an answer of a server that predates per_target: the fields decode as before
    old = pb.ExplainResponse(request_id="o", target=5, intercept=0.5)
    decoded = parse_response(old)
    assert isinstance(decoded, RemoteExplanation)
    assert decoded.per_target == () and decoded.foil is None
    assert decoded.target == 5 and decoded.intercept == 0.5 and decoded.map is None


def test_a_malformed_per_target_map_is_a_remote_error() -> None:
    response = pb.ExplainResponse(request_id="bad", target=1)
    entry = response.per_target.add(target=1)
    entry.map.CopyFrom(pb.Tensor(shape=[2, 2], dtype=pb.FLOAT32, data=b"\x00" * 3))
    result = parse_response(response)
    assert isinstance(result, RemoteError) and result.code == grpc.StatusCode.INTERNAL
    assert "malformed response" in result.details and result.request_id == "bad"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": 3}, r"targets takes a sequence of ints .*got int 3; one class is target="),
        ({"targets": "35"}, "targets takes a sequence of ints"),
        ({"targets": {1, 2}}, "targets takes a sequence of ints"),
        ({"targets": []}, "targets is empty"),
        ({"targets": [1, 2.0]}, r"targets\[1\] takes an int"),
        ({"targets": [True]}, r"targets\[0\] takes an int"),
        ({"targets": torch.zeros(2, 2, dtype=torch.int64)}, r"1-D sequence of ints, got shape"),
        ({"targets": [2**70]}, r"targets=\[1180591620717411303424\]"),  # out of int64 range
        ({"top_labels": 0}, "top_labels must be >= 1, got 0"),
        ({"top_labels": "3"}, "top_labels takes an int"),
        ({"top_labels": 2**40}, "top_labels=1099511627776"),  # out of int32 range
        ({"foil": 1.5}, "foil takes an int"),
        ({"foil": None, "target": 2**70}, "target=1180591620717411303424"),
        ({"foil": 2**70}, "foil=1180591620717411303424"),
    ],
)
def test_bad_class_arguments_are_refused_locally(
    client: Client, fake: FakeExplainer, kwargs: dict[str, Any], match: str
) -> None:
    for call in (
        lambda: client.explain(PNG, **kwargs),
        lambda: client.explain_progressive(PNG, method="lime", **kwargs),
        lambda: client.explain_many([PNG], **kwargs),
    ):
        with pytest.raises(InvalidInput, match=match):
            call()
    assert fake.requests == [] and fake.stream_requests == [] and fake.metadata == []


def test_explain_many_shared_and_per_image_classes(client: Client, fake: FakeExplainer) -> None:
    results = list(client.explain_many([PNG, PNG], targets=[3, 5], foil=1, top_k=1))
    assert [_class_fields(r) for r in fake.stream_requests] == [(None, [3, 5], None, 1)] * 2
    for r in results:
        assert isinstance(r, RemoteExplanation)
        assert [t.target for t in r.per_target] == [3, 5] and r.foil == 1
    fake.reset()
    results = list(client.explain_many([PNG, PNG], top_labels=2))
    assert [_class_fields(r) for r in fake.stream_requests] == [(None, [], 2, None)] * 2
    assert all([t.target for t in r.per_target] == [7, 8] for r in results)  # type: ignore[union-attr]
    fake.reset()
    images = [PNG, PNG, PNG, PNG]
    by_id = {
        r.request_id: r
        for r in client.explain_many(images, image_targets=[4, [1, 2], None, (6,)], foil=0)
    }
    assert [_class_fields(r) for r in fake.stream_requests] == [
        (4, [], None, 0), (None, [1, 2], None, 0), (None, [], None, 0), (None, [6], None, 0),
    ]  # fmt: skip
    assert by_id["0"].per_target == () and by_id["0"].target == 4  # type: ignore[union-attr]
    assert [t.target for t in by_id["1"].per_target] == [1, 2]  # type: ignore[union-attr]
    assert by_id["2"].target == DEFAULT_TARGET  # type: ignore[union-attr]
    assert [t.target for t in by_id["3"].per_target] == [6]  # type: ignore[union-attr]


def test_progressive_answers_carry_every_target(client: Client, fake: FakeExplainer) -> None:
    answers = list(client.explain_progressive(PNG, method="kernelshap", samples=16, targets=[2, 9]))
    assert [(a.partial, a.samples) for a in answers] == [(True, 1), (True, 2), (False, 16)]
    for a in answers:
        assert [t.target for t in a.per_target] == [2, 9]
        for t in a.per_target:
            torch.testing.assert_close(t.map, expected_map(a.samples, t.target), rtol=0, atol=0)
    assert _class_fields(fake.stream_requests[0]) == (None, [2, 9], None, None)
    seen: list[RemoteExplanation] = []
    final = client.explain(PNG, method="lime", top_labels=2, foil=1, progress=seen.append)
    assert [t.target for t in final.per_target] == [7, 8] and final.foil == 1
    assert [len(p.per_target) for p in seen] == [2, 2]


def test_async_client_sends_and_decodes_several_targets() -> None:
    fake = FakeExplainer()

    async def main() -> None:
        async with serving(fake) as address, AsyncClient(address, timeout=10) as c:
            one = await c.explain(PNG, method="lime", targets=[3, 4], foil=0)
            assert [t.target for t in one.per_target] == [3, 4] and one.foil == 0
            with pytest.raises(InvalidInput, match="top_labels must be >= 1"):
                await c.explain(PNG, top_labels=0)
            answers = [a async for a in c.explain_progressive(PNG, method="lime", top_labels=2)]
            assert [[t.target for t in a.per_target] for a in answers] == [[7, 8]] * 3
            many = [r async for r in c.explain_many([PNG], image_targets=[[5, 6]], foil=2)]
            assert isinstance(many[0], RemoteExplanation)
            assert [t.target for t in many[0].per_target] == [5, 6] and many[0].foil == 2

    asyncio.run(main())
    assert [_class_fields(r) for r in fake.requests] == [(None, [3, 4], None, 0)]
    assert [_class_fields(r) for r in fake.stream_requests] == [
        (None, [], 2, None), (None, [5, 6], None, 2),
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Progressive answers
# --------------------------------------------------------------------------------------------


def test_explain_progressive_yields_partials_then_the_final(
    client: Client, fake: FakeExplainer
) -> None:
    answers = list(
        client.explain_progressive(
            PNG, model="m", method="lime", samples=64, target=3, overlay=True, request_id="p"
        )
    )
    assert [(a.partial, a.samples) for a in answers] == [(True, 1), (True, 2), (False, 64)]
    assert all(a.request_id == "p" and a.target == 3 for a in answers)
    for a in answers:
        assert a.map is not None
        torch.testing.assert_close(a.map, expected_map(a.samples, 3), rtol=0, atol=0)
    assert answers[0].segment_stderr is not None
    torch.testing.assert_close(
        answers[0].segment_stderr, torch.tensor(STDERR) * PARTIAL_ROUNDS, rtol=0, atol=0
    )
    assert [a.overlay_png for a in answers] == [None, None, PNG + b"p"]
    # one request, on the stream, asking for progress; nothing on unary Explain
    (request,) = fake.stream_requests
    assert request.progress is True and request.options.samples == 64
    assert fake.requests == []


def test_explain_progressive_of_a_one_shot_method_is_just_the_final(client: Client) -> None:
    (only,) = list(client.explain_progressive(PNG, method="gradcam"))
    assert only.partial is False and only.target == DEFAULT_TARGET


def test_explain_with_progress_callback(client: Client, fake: FakeExplainer) -> None:
    seen: list[RemoteExplanation] = []
    final = client.explain(PNG, method="kernelshap", samples=32, progress=seen.append)
    assert [(p.partial, p.samples) for p in seen] == [(True, 1), (True, 2)]
    assert final.partial is False and final.samples == 32
    assert fake.stream_requests[0].progress and fake.requests == []
    # no callback: unary Explain, progress not asked for
    client.explain(PNG, method="kernelshap", samples=32)
    assert fake.requests[-1].progress is False


def test_progress_errors(client: Client, fake: FakeExplainer) -> None:
    with pytest.raises(InvalidInput, match="progress takes a callable"):
        client.explain(PNG, method="lime", progress=True)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="did you mean 'samples'"):
        client.explain_progressive(PNG, method="lime", sample=3)  # checked at the call
    assert fake.stream_requests == []
    # the image's own failure raises, with its request id
    with pytest.raises(RemoteInvalidInput) as info:
        list(client.explain_progressive(PNG, method="lime", target=-1, request_id="bad"))
    assert info.value.request_id == "bad"
    # a stream that ends after partials only
    answers = client.explain_progressive(PNG, model="partial-only", method="lime")
    assert next(answers).partial
    with pytest.raises(RemoteError, match="without a final answer") as info:
        list(answers)
    assert info.value.code == grpc.StatusCode.UNKNOWN

    class Stop(Exception):
        pass

    def stop(_: RemoteExplanation) -> None:
        raise Stop

    with pytest.raises(Stop):  # the callback's error is the caller's, unchanged
        client.explain(PNG, method="lime", progress=stop)
    assert client.explain(PNG).partial is False  # the channel is still good


def test_explain_many_with_progress_keeps_requests_pending(
    client: Client, fake: FakeExplainer
) -> None:
    items = list(client.explain_many([PNG, PNG], method="lime", samples=8, progress=True))
    # per request: its partials, then its final; no "ended without an answer" errors
    assert all(isinstance(i, RemoteExplanation) for i in items)
    by_id: dict[str, list[tuple[bool, int]]] = {}
    for i in items:
        by_id.setdefault(i.request_id, []).append((i.partial, i.samples))
    assert by_id == {rid: [(True, 1), (True, 2), (False, 8)] for rid in ("0", "1")}
    assert all(r.progress for r in fake.stream_requests)
    plain = list(client.explain_many([PNG], method="lime", samples=8))
    assert [(i.partial, i.samples) for i in plain] == [(False, 8)]


# --------------------------------------------------------------------------------------------
# list_models, lifecycle, channel
# --------------------------------------------------------------------------------------------

EXPECTED_MODELS = [
    ModelInfo(
        name="efficientnet_lite0",
        input_shape=(3, 224, 224),
        num_classes=1000,
        default_layer="features.8",
        layers=("features.6", "features.8"),
        methods=("gradcam", "lime"),
        device="cpu",
        max_batch_size=16,
        ready=True,
        has_class_names=True,
        forward_path=ForwardPathInfo(
            tuned=True,
            memory_format="channels_last",
            precision="bf16",
            batch_size=32,
            grad_batch_size=8,
            compiled=True,
            images_per_s=812.5,
            speedup=2.75,
            top1_agreement=1.0,
            logit_error=0.03125,
            rank_correlation=0.96875,
            summary="channels_last bf16 batch 32 compiled: 2.75x",
        ),
    ),
    ModelInfo(
        name="digits",
        input_shape=(1, 28, 28),
        num_classes=10,
        default_layer="",
        layers=(),
        methods=("saliency",),
        device="cuda:0",
        max_batch_size=64,
        ready=False,
        has_class_names=False,
    ),
]


def test_list_models(client: Client) -> None:
    assert client.list_models() == EXPECTED_MODELS
    assert EXPECTED_MODELS[1].forward_path is None  # not on the wire: not reported


def test_untuned_forward_path_reads_zeros_as_unreported() -> None:
    # What the server sends for a model whose warm-up did not tune (see path_to_proto).
    info = parse_forward_path(
        pb.ForwardPath(
            tuned=False, memory_format="contiguous", precision="fp32",
            summary="contiguous fp32 (not tuned)",
        )
    )  # fmt: skip
    assert info == ForwardPathInfo(
        tuned=False, memory_format="contiguous", precision="fp32", batch_size=None,
        grad_batch_size=None, compiled=False, images_per_s=None, speedup=None,
        top1_agreement=None, logit_error=None, rank_correlation=None,
        summary="contiguous fp32 (not tuned)",
    )  # fmt: skip
    # A guard that ran reports both figures, even a perfect logit error of 0.
    guarded = parse_forward_path(pb.ForwardPath(top1_agreement=1.0, logit_error=0.0))
    assert (guarded.top1_agreement, guarded.logit_error) == (1.0, 0.0)


def test_closed_client_refuses_calls(background_server: tuple[FakeExplainer, str]) -> None:
    c = Client(background_server[1])
    assert "open" in repr(c)
    c.close()
    c.close()  # idempotent
    with pytest.raises(Unavailable, match="closed"):
        c.explain(PNG)
    with pytest.raises(Unavailable, match="closed"):
        c.list_models()


def test_channel_arguments_are_checked() -> None:
    with pytest.raises(InvalidInput, match="go together"):
        Client("127.0.0.1:1", client_cert=b"cert")
    with pytest.raises(InvalidInput, match="cannot read root_certificates"):
        Client("127.0.0.1:1", root_certificates="/no/such/ca.pem")
    with pytest.raises(InvalidInput, match="max_message_bytes"):
        Client("127.0.0.1:1", max_message_bytes=0)
    with pytest.raises(InvalidInput, match="token"):
        Client("127.0.0.1:1", token="a\nb")


def test_max_message_bytes_applies(background_server: tuple[FakeExplainer, str]) -> None:
    with Client(background_server[1], max_message_bytes=1024) as small:
        with pytest.raises(ResourceExhausted) as info:
            small.explain(b"x" * 4096)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    # extra channel options are passed through (a later option of the same key wins)
    options = [("grpc.max_send_message_length", 1 << 20), ("grpc.lb_policy_name", "round_robin")]
    with Client(background_server[1], max_message_bytes=1024, options=options) as c:
        assert isinstance(c.explain(b"x" * 4096), RemoteExplanation)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path: Path) -> None:
    """A server that requires client certificates; the client trusts the test CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
             "-keyout", "ca.key", "-out", "ca.pem", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=tmp_path)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-extfile", "san.ext",
                 "-out", f"{name}.pem", cwd=tmp_path)  # fmt: skip
    read = lambda name: (tmp_path / name).read_bytes()  # noqa: E731
    credentials = grpc.ssl_server_credentials(
        [(read("server.key"), read("server.pem"))],
        root_certificates=read("ca.pem"),
        require_client_auth=True,
    )
    fake = FakeExplainer()

    async def main() -> None:
        async with serving(fake, credentials, host="localhost") as address:
            port = address.rsplit(":", 1)[1]
            target = f"localhost:{port}"
            async with AsyncClient(
                target,
                root_certificates=tmp_path / "ca.pem",  # a path
                client_cert=read("client.pem"),  # bytes
                client_key=read("client.key").decode(),  # PEM text
                token="t",
                timeout=10,
            ) as c:
                result = await c.explain(PNG, target=2)
                assert result.target == 2
            with Client(target, tls=True, root_certificates=tmp_path / "ca.pem", timeout=10) as c:
                with pytest.raises(RemoteError) as info:  # no client certificate
                    await asyncio.to_thread(c.explain, PNG)
                assert info.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(main())
    assert fake.metadata[0]["authorization"] == "Bearer t"


# --------------------------------------------------------------------------------------------
# AsyncClient (the server runs on the test's own event loop)
# --------------------------------------------------------------------------------------------


def test_async_explain_options_token_and_errors() -> None:
    fake = FakeExplainer()

    async def main() -> None:
        async with serving(fake) as address, AsyncClient(address, token="tok") as c:
            result = await c.explain(
                torch.ones(3, 5, 7),
                model="m",
                method="lime",
                target=5,
                overlay=True,
                request_id="a1",
                **ALL_OPTIONS,
            )
            assert result.request_id == "a1" and result.target == 5
            torch.testing.assert_close(result.map, expected_map(64, 5), rtol=0, atol=0)
            assert result.overlay_png == PNG + b"a1"
            (request,) = fake.requests
            assert request.returns == pb.MAP_AND_OVERLAY
            assert request.options.segmenter == pb.GRID and request.options.seed == 2**40 + 3
            assert list(request.tensor.shape) == [3, 5, 7]
            assert fake.metadata[0]["authorization"] == "Bearer tok"

            with pytest.raises(NotFound) as info:
                await c.explain(PNG, model="nope", request_id="a2")
            assert info.value.request_id == "a2"
            assert info.value.code == grpc.StatusCode.NOT_FOUND
            with pytest.raises(InvalidInput):
                await c.explain(PNG, target=-3)
            with pytest.raises(RemoteError) as info:
                await c.explain(PNG, model="slow", timeout=0.2)
            assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

            count = len(fake.requests)
            with pytest.raises(InvalidInput, match="did you mean 'steps'"):
                await c.explain(PNG, step=3)
            assert len(fake.requests) == count

            assert await c.list_models() == EXPECTED_MODELS

    asyncio.run(main())


def test_async_explain_many() -> None:
    fake = FakeExplainer()

    async def images() -> AsyncIterator[Any]:
        yield PNG
        yield torch.zeros(1, 3, 5, 7)
        yield PNG

    async def main() -> None:
        async with serving(fake) as address:
            c = AsyncClient(address, timeout=10)
            try:
                with pytest.raises(InvalidInput, match="unknown option"):
                    c.explain_many([PNG], nope=1)  # refused at the call, not on iteration
                results = [
                    r async for r in c.explain_many(images(), image_targets=[0, -1, 2], samples=1)
                ]
                assert [r.request_id for r in results] == ["2", "1", "0"]
                assert isinstance(results[1], RemoteInvalidInput)
                assert results[1].request_id == "1"
                assert isinstance(results[0], RemoteExplanation) and results[0].target == 2
                assert isinstance(results[2], RemoteExplanation) and results[2].target == 0
                ids = [
                    r.request_id async for r in c.explain_many([PNG, PNG], request_ids=["x", "y"])
                ]
                assert ids == ["y", "x"]
                with pytest.raises(RemoteError) as info:
                    async for _ in c.explain_many([PNG], model="status:PERMISSION_DENIED"):
                        pass
                assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
            finally:
                await c.close()
            with pytest.raises(Unavailable, match="closed"):
                await c.explain(PNG)

    asyncio.run(main())


def test_async_progressive() -> None:
    fake = FakeExplainer()

    async def main() -> None:
        async with serving(fake) as address, AsyncClient(address, timeout=10) as c:
            answers = [
                a async for a in c.explain_progressive(PNG, method="lime", samples=16, seed=4)
            ]
            assert [(a.partial, a.samples) for a in answers] == [(True, 1), (True, 2), (False, 16)]
            assert answers[-1].seed == 4 and answers[-1].segment_stderr is not None

            seen: list[int] = []

            async def record(partial: RemoteExplanation) -> None:  # awaited
                await asyncio.sleep(0)
                seen.append(partial.samples)

            final = await c.explain(PNG, method="kernelshap", samples=9, progress=record)
            assert seen == [1, 2] and final.samples == 9 and not final.partial
            plain: list[int] = []
            await c.explain(PNG, method="lime", progress=lambda p: plain.append(p.samples))
            assert plain == [1, 2]

            with pytest.raises(InvalidInput, match="unknown option"):
                c.explain_progressive(PNG, nope=1)  # refused at the call, not on iteration
            with pytest.raises(RemoteInvalidInput):
                async for _ in c.explain_progressive(PNG, method="lime", target=-1):
                    pass
            items = [
                (i.request_id, i.partial)
                async for i in c.explain_many([PNG], method="lime", progress=True)
            ]
            assert items == [("0", True), ("0", True), ("0", False)]

    asyncio.run(main())


def test_async_client_is_built_outside_a_loop() -> None:
    fake = FakeExplainer()
    c = AsyncClient("127.0.0.1:0")  # no running loop: the channel opens on first use

    async def main() -> None:
        async with serving(fake) as address:
            late = AsyncClient(address)
            async with late:
                assert (await late.explain(PNG)).target == DEFAULT_TARGET
        await c.close()  # never opened: nothing to close

    asyncio.run(main())


# --------------------------------------------------------------------------------------------
# Against the real server (tiny model): partial answers from real sampling rounds
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server() -> Iterator[str]:
    from tests.serving.harness import ServerThread, tiny_model

    with ServerThread(models=[tiny_model()]) as server:
        yield server.address


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_real_progressive_explain(real_server: str, method: str) -> None:
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    opts = {"samples": 256, "n_segments": 16, "segmenter": "grid", "seed": 3}
    with Client(real_server, timeout=120) as c:
        answers = list(c.explain_progressive(image, model="tiny", method=method, **opts))
        *partials, final = answers
        assert len(partials) >= 1 and all(p.partial for p in partials)
        assert final.partial is False and final.samples == 256
        counts = [p.samples for p in partials]
        assert counts == sorted(counts) and 0 < counts[0] < 256  # rounds, growing
        for a in answers:
            assert a.segment_weights is not None and a.segment_stderr is not None
            assert a.segment_stderr.shape == a.segment_weights.shape == (16,)
            assert bool((a.segment_stderr >= 0).all())
        # the first round's weights are less certain than the final ones
        assert float(partials[0].segment_stderr.max()) > float(final.segment_stderr.max())
        # the final answer is the one a plain call gives (same seed, same samples)
        plain = c.explain(image, model="tiny", method=method, **opts)
        torch.testing.assert_close(final.segment_weights, plain.segment_weights)
        assert plain.partial is False and plain.samples == 256


def test_real_unary_explain_refuses_progress(real_server: str) -> None:
    request = pb.ExplainRequest(
        model="tiny", method="lime", progress=True, tensor=encode_tensor(torch.zeros(3, 64, 64))
    )
    channel = grpc.insecure_channel(real_server)
    try:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ExplainerStub(channel).Explain(request, timeout=60)
    finally:
        channel.close()
    error = error_from_rpc(info.value)
    assert isinstance(error, RemoteInvalidInput) and isinstance(error, InvalidInput)
    assert "needs ExplainStream" in error.details


def test_real_list_models_reports_the_forward_path(real_server: str) -> None:
    with Client(real_server) as c:
        (info,) = c.list_models()
    # warm-up is off in the harness: the configured path, not measured
    assert info.forward_path is not None
    assert (info.forward_path.tuned, info.forward_path.precision) == (False, "fp32")
    assert info.forward_path.summary == "contiguous fp32 (not tuned)"
