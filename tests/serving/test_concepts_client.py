"""The client's concept methods (``tcav``, ``dissect``, ``visualize``): request building checked
field by field, hand-made responses parsed number for number, progress and errors through a
fake Explainer servicer on a real gRPC server (blocking and asyncio clients), and, where the
server implements the concept RPCs, the real server's answers against the library's."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from xai_serve.client import (
    AsyncClient,
    Client,
    RemoteError,
    RemoteNotFound,
    build_dissect_request,
    build_tcav_request,
    build_visualize_request,
    parse_dissection,
    parse_tcav,
    parse_visualization,
)
from xai_serve.errors import InvalidInput, NotFound
from xai_serve.imaging import decode_image, encode_png
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc

GEN = torch.Generator().manual_seed(0)
PIXELS = [(torch.rand(3, 8, 10, generator=GEN) * 255).to(torch.uint8) for _ in range(3)]
FAKE_MODEL = "fake"
FAKE_CLASSES = 10
# exactly representable in float32, so the parsed numbers equal them
SCORES = {"red": (0.75, 0.5, 1.0), "mine": (0.25, 0.0, 0.5)}
ACCURACIES = {"red": (1.0, 0.875, 0.75), "mine": (0.5, 0.625, 0.5)}
RANDOM = (0.5, 0.25, 0.75)


# --------------------------------------------------------------------------------------------
# A fake servicer: known answers to the concept RPCs
# --------------------------------------------------------------------------------------------


def _stats(values: tuple[float, ...]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(correction=1))


class FakeConcepts(pb_grpc.ExplainerServicer):
    """Tcav: one progress message, then fixed figures for the concepts asked (``red``
    significant, others not). Dissect: NOT_FOUND for layer ``missing``, else two progress
    messages and a fixed table. Visualize: for ``logit:9`` the stream ends without a result;
    else one image per objective, :data:`PIXELS` in turn, value ``index + 0.5``."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.metadata: list[dict[str, str]] = []

    def _record(self, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))

    def ListModels(self, request: Any, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[pb.ModelInfo(
            name=FAKE_MODEL, input_shape=[3, 64, 64], num_classes=FAKE_CLASSES,
            default_layer="layer3", ready=True,
        )])  # fmt: skip

    def Tcav(self, request: pb.TcavRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record(request, context)
        yield pb.TcavResponse(request_id=request.request_id, fraction=0.4, stage="cavs")
        done = pb.TcavResponse(
            request_id=request.request_id, done=True, fraction=1.0, stage="done",
            layer=request.layer or "layer3", target=request.target,
            random_scores=list(RANDOM), alpha=request.alpha if request.HasField("alpha") else 0.05,
        )  # fmt: skip
        for c in request.concepts:
            scores = SCORES.get(c.name, SCORES["mine"])
            mean, std = _stats(scores)
            done.concepts.add(
                concept=c.name, scores=scores, mean=mean, std=std,
                p_value=0.01 if c.name == "red" else 0.5, significant=c.name == "red",
                cav_accuracies=ACCURACIES.get(c.name, ACCURACIES["mine"]),
            )  # fmt: skip
        yield done

    def Dissect(self, request: pb.DissectRequest, context: grpc.ServicerContext) -> Iterator[Any]:
        self._record(request, context)
        if request.layer == "missing":
            context.abort(grpc.StatusCode.NOT_FOUND, "the model has no layer 'missing'")
        for fraction, stage in ((0.25, "thresholds"), (0.75, "iou")):
            yield pb.DissectResponse(request_id=request.request_id, fraction=fraction, stage=stage)
        done = pb.DissectResponse(
            request_id=request.request_id, done=True, fraction=1.0, layer=request.layer or "layer3",
            total_units=64, min_iou=0.0625,
        )  # fmt: skip
        units = [(5, "red", "color", 0.25, 1.5), (9, "stripes_0_wide", "texture", 0.125, 0.5),
                 (2, "circle", "shape", 0.03125, 2.0)]  # fmt: skip
        top = request.top if request.HasField("top") else len(units)
        for unit, concept, category, iou, threshold in units[:top]:
            done.units.add(unit=unit, concept=concept, category=category, iou=iou,
                           threshold=threshold)  # fmt: skip
        done.summary.add(category="color", units=3, concepts={"blue": 1, "red": 2})
        done.summary.add(category="texture", units=1, concepts={"stripes_0_wide": 1})
        done.summary.add(category="shape", units=0)
        yield done

    def Visualize(
        self, request: pb.VisualizeRequest, context: grpc.ServicerContext
    ) -> Iterator[Any]:
        self._record(request, context)
        yield pb.VisualizeResponse(request_id=request.request_id, fraction=0.5, stage="step 1/2")
        if request.objectives[0] == "logit:9":
            return
        done = pb.VisualizeResponse(request_id=request.request_id, done=True, fraction=1.0)
        for i, objective in enumerate(request.objectives):
            done.images.add(objective=objective, png=encode_png(PIXELS[i % len(PIXELS)]),
                            trace=[float(i), i + 0.25], value=i + 0.5)  # fmt: skip
        yield done


class FakeServer:
    """``with FakeServer() as (address, servicer): ...``: :class:`FakeConcepts` on a real
    loopback gRPC server (thread pool)."""

    def __enter__(self) -> tuple[str, FakeConcepts]:
        self.servicer = FakeConcepts()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_ExplainerServicer_to_server(self.servicer, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        return f"127.0.0.1:{port}", self.servicer

    def __exit__(self, *exc: object) -> None:
        self.server.stop(None)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeConcepts]]:
    with FakeServer() as served:
        yield served


# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


def test_tcav_request_carries_every_argument(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    for i, pixels in enumerate(PIXELS[:2]):
        (folder / f"{i}.png").write_bytes(encode_png(pixels))
    (folder / "notes.txt").write_text("not an image")
    floats = torch.rand(2, 3, 5, 5, generator=GEN)
    image = tmp_path / "in.png"
    image.write_bytes(encode_png(PIXELS[2]))
    request = build_tcav_request(
        [str(image), b"\x89PNGbytes", torch.zeros(3, 4, 4)], model="m", layer="layer3",
        target=7, concepts=["red", ("mine", folder), ("floats", floats),
                            ("listed", [PIXELS[0], b"raw"])],
        runs=4, random_size=16, concept_size=12, alpha=0.01, seed=-3, request_id="r1",
    )  # fmt: skip
    assert (request.request_id, request.model, request.layer, request.target) == (
        "r1", "m", "layer3", 7,
    )  # fmt: skip
    assert (request.runs, request.random_size, request.concept_size) == (4, 16, 12)
    assert request.seed == -3
    assert request.alpha == 0.01
    assert [c.name for c in request.concepts] == ["red", "mine", "floats", "listed"]
    assert list(request.concepts[0].images) == []  # a library concept: the name only
    # a folder's image files in name order, as they are on disk
    assert list(request.concepts[1].images) == [encode_png(p) for p in PIXELS[:2]]
    # float images in [0, 1] go as PNGs of their rounded pixels
    decoded = [decode_image(b, max_pixels=1 << 20) for b in request.concepts[2].images]
    expected = floats.mul(255).round().to(torch.uint8)
    assert all(torch.equal(d, e) for d, e in zip(decoded, expected, strict=True))
    assert list(request.concepts[3].images) == [encode_png(PIXELS[0]), b"raw"]
    assert [i.WhichOneof("input") for i in request.inputs] == ["image", "image", "tensor"]
    assert request.inputs[0].image == encode_png(PIXELS[2])
    assert list(request.inputs[2].tensor.shape) == [3, 4, 4]
    # defaults stay unset: the server's own
    bare = build_tcav_request(b"x", model="m", layer=None, target=0, concepts="red")
    assert not any(bare.HasField(f) for f in ("runs", "random_size", "concept_size", "alpha",
                                              "seed"))  # fmt: skip
    assert bare.layer == "" and len(bare.inputs) == 1 and len(bare.request_id) == 32


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": None}, "target is required"),
        ({"target": -1}, "target must be in 0.."),
        ({"concepts": []}, "concepts is empty"),
        ({"concepts": ["red", "red"]}, "names 'red' twice"),
        ({"concepts": [("", [b"x"])]}, "a concept name is empty"),
        ({"concepts": [("mine", [])]}, "concept 'mine' has no images"),
        ({"concepts": [("mine", "/no/such/folder")]}, "is not a folder"),
        ({"concepts": [("mine", torch.full((1, 3, 4, 4), 2.0))]}, "must be RGB in [0, 1]"),
        ({"concepts": [3]}, "must be a name (str) or a (name, images) pair"),
        ({"inputs": []}, "inputs is empty"),
        ({"inputs": ["/no/such/image.png"]}, "cannot read image file"),
        ({"runs": 1}, "runs must be in 2.."),
        ({"random_size": 0}, "random_size must be in 2.."),
        ({"alpha": 1.0}, "alpha must be in (0, 1)"),
        ({"seed": 2**63}, "seed must be in"),
        ({"request_id": "x" * 300}, "request_id is longer than"),
    ],
)
def test_tcav_request_refuses_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = {"inputs": [b"x"], "model": "m", "layer": None, "target": 1,
                            "concepts": ["red"]}  # fmt: skip
    args.update(kwargs)
    inputs = args.pop("inputs")
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):  # fmt: skip
        build_tcav_request(inputs, **args)


def test_library_concept_set_is_sent_as_its_images() -> None:
    from xai_serve.concepts.library import procedural

    s = procedural("red", 3, size=16)
    request = build_tcav_request(b"x", model="m", layer=None, target=1, concepts=[s])
    (sent,) = request.concepts
    assert sent.name == "red" and len(sent.images) == 3
    got = torch.stack([decode_image(b, max_pixels=1 << 20) for b in sent.images])
    assert torch.equal(got, s.images.mul(255).round().to(torch.uint8))


def test_dissect_request_fields_and_checks() -> None:
    request = build_dissect_request(
        model="m", layer="layer2", dataset="procedural", per_concept=4, quantile=0.01,
        min_iou=0.0, top=5, seed=2, request_id="d",
    )  # fmt: skip
    assert (request.model, request.layer, request.dataset, request.per_concept, request.top,
            request.seed) == ("m", "layer2", "procedural", 4, 5, 2)  # fmt: skip
    assert request.quantile == 0.01 and request.HasField("min_iou") and request.min_iou == 0.0
    bare = build_dissect_request(model="m")
    assert not any(bare.HasField(f) for f in ("per_concept", "quantile", "min_iou", "top",
                                              "seed"))  # fmt: skip
    for kwargs, message in (
        ({"quantile": 0.0}, "quantile must be in"), ({"min_iou": 1.0}, "min_iou must be in"),
        ({"top": 0}, "top must be in 1.."), ({"per_concept": 0}, "per_concept must be in"),
        ({"dataset": 3}, "dataset takes a str"), ({"per_concept": 2**31}, "per_concept must be"),
    ):  # fmt: skip
        with pytest.raises(InvalidInput, match=message):
            build_dissect_request(model="m", **kwargs)


def test_visualize_request_parses_objectives_before_sending() -> None:
    request = build_visualize_request(
        [" channel:layer2:3", "unit:layer3:1:2:2", "logit:4"], model="m", steps=8, size=32,
        lr=0.1, seed=1,
    )  # fmt: skip
    assert list(request.objectives) == ["channel:layer2:3", "unit:layer3:1:2:2", "logit:4"]
    assert (request.steps, request.size, request.seed) == (8, 32, 1)
    assert abs(request.lr - 0.1) < 1e-7  # a float field
    assert list(build_visualize_request("logit:1", model="m").objectives) == ["logit:1"]
    for objectives, message in ((["nonsense"], "cannot parse the objective"),
                                (["logit:x"], "the class must be an integer"),
                                ([], "objectives is empty")):  # fmt: skip
        with pytest.raises(InvalidInput, match=message):
            build_visualize_request(objectives, model="m")
    with pytest.raises(InvalidInput, match="lr must be a positive finite number"):
        build_visualize_request(["logit:1"], model="m", lr=0.0)
    with pytest.raises(InvalidInput, match=r"steps must be in 1\.\."):
        build_visualize_request(["logit:1"], model="m", steps=0)


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


def test_parse_tcav_response() -> None:
    message = pb.TcavResponse(request_id="t", done=True, layer="layer3", target=4,
                              random_scores=[0.5, 0.25], alpha=0.05)  # fmt: skip
    message.concepts.add(concept="red", scores=[0.75, 0.5], mean=0.625, std=0.125,
                         p_value=0.0123, significant=True, cav_accuracies=[1.0, 0.75])  # fmt: skip
    result = parse_tcav(message, "m")
    assert (result.request_id, result.model, result.layer, result.target) == ("t", "m", "layer3", 4)
    red = result["red"]
    assert red.scores == (0.75, 0.5) and red.cav_accuracies == (1.0, 0.75)
    assert (red.mean, red.std, red.p_value, red.significant) == (0.625, 0.125, 0.0123, True)
    assert result.random_scores == (0.5, 0.25) and result.alpha == 0.05
    with pytest.raises(NotFound, match="no concept 'blue' in this result; it has red"):
        result["blue"]


def test_parse_dissection_response() -> None:
    message = pb.DissectResponse(request_id="d", done=True, layer="layer2", total_units=128,
                                 min_iou=0.0625)  # fmt: skip
    message.units.add(unit=7, concept="red", category="color", iou=0.5, threshold=1.25)
    message.summary.add(category="color", units=4, concepts={"blue": 1, "red": 2, "green": 1})
    message.summary.add(category="shape", units=0)
    result = parse_dissection(message, "m")
    (unit,) = result.units
    assert (unit.unit, unit.concept, unit.category, unit.iou, unit.threshold) == (
        7, "red", "color", 0.5, 1.25,
    )  # fmt: skip
    assert list(result.summary) == ["color", "shape"]
    # most detectors first, then by name (a proto map has no order)
    assert list(result.summary["color"].concepts.items()) == [("red", 2), ("blue", 1),
                                                               ("green", 1)]  # fmt: skip
    assert result.summary["shape"].concepts == {}
    assert (result.total_units, result.min_iou, result.detectors) == (128, 0.0625, 4)


def test_parse_visualization_response() -> None:
    message = pb.VisualizeResponse(request_id="v", done=True)
    message.images.add(objective="logit:3", png=encode_png(PIXELS[1]), trace=[0.5, 1.5],
                       value=2.25)  # fmt: skip
    result = parse_visualization(message, "m")
    (image,) = result.images
    assert (image.objective, image.trace, image.value) == ("logit:3", (0.5, 1.5), 2.25)
    assert image.png == encode_png(PIXELS[1])
    assert torch.equal(image.image, PIXELS[1])


# --------------------------------------------------------------------------------------------
# Calls (fake servicer)
# --------------------------------------------------------------------------------------------


def test_client_tcav_reports_progress_and_returns_the_result(
    fake: tuple[str, FakeConcepts],
) -> None:
    address, servicer = fake
    seen: list[tuple[float, str]] = []
    with Client(address, token="tok") as client:
        result = client.tcav([encode_png(PIXELS[0])], model=FAKE_MODEL, target=3,
                             concepts=["red", ("mine", [PIXELS[1], PIXELS[2]])], runs=3,
                             progress=lambda f, s: seen.append((f, s)))  # fmt: skip
    sent = servicer.requests[-1]
    assert isinstance(sent, pb.TcavRequest) and sent.runs == 3 and sent.target == 3
    assert servicer.metadata[-1]["authorization"] == "Bearer tok"
    assert seen == [(0.4, "cavs")]
    assert [c.concept for c in result.concepts] == ["red", "mine"]
    assert result["red"].scores == SCORES["red"] and result["red"].significant
    assert result["mine"].cav_accuracies == ACCURACIES["mine"] and not result["mine"].significant
    mean, std = _stats(SCORES["mine"])
    assert result["mine"].mean == pytest.approx(mean, abs=1e-7)
    assert result["mine"].std == pytest.approx(std, abs=1e-7)
    assert (result.layer, result.target, result.random_scores) == ("layer3", 3, RANDOM)
    assert result.request_id == sent.request_id and result.model == FAKE_MODEL


def test_client_dissect_and_visualize(fake: tuple[str, FakeConcepts]) -> None:
    address, servicer = fake
    seen: list[tuple[float, str]] = []
    with Client(address) as client:
        d = client.dissect(model=FAKE_MODEL, layer="layer2", top=2,
                           progress=lambda f, s: seen.append((f, s)))  # fmt: skip
        assert seen == [(0.25, "thresholds"), (0.75, "iou")]
        assert [(u.unit, u.concept, u.iou) for u in d.units] == [
            (5, "red", 0.25),
            (9, "stripes_0_wide", 0.125),
        ]
        assert d.layer == "layer2" and d.total_units == 64 and d.detectors == 4
        with pytest.raises(RemoteNotFound, match="no layer 'missing'") as info:
            client.dissect(model=FAKE_MODEL, layer="missing", request_id="rid")
        assert info.value.request_id == "rid"
        v = client.visualize(["channel:layer2:1", "logit:2"], model=FAKE_MODEL, steps=2)
        assert [o.objective for o in v.images] == ["channel:layer2:1", "logit:2"]
        assert torch.equal(v.images[1].image, PIXELS[1])
        assert [o.value for o in v.images] == [0.5, 1.5] and v.images[1].trace == (1.0, 1.25)
        with pytest.raises(RemoteError, match="ended Visualize without a result") as err:
            client.visualize("logit:9", model=FAKE_MODEL)
        assert err.value.code == grpc.StatusCode.INTERNAL
        count = len(servicer.requests)
        with pytest.raises(InvalidInput):  # checked before any call
            client.visualize(["bogus"], model=FAKE_MODEL)
        with pytest.raises(InvalidInput, match="progress must be callable"):
            client.dissect(model=FAKE_MODEL, progress=3)  # type: ignore[arg-type]
        assert len(servicer.requests) == count


def test_async_client_concept_methods(fake: tuple[str, FakeConcepts]) -> None:
    address, _ = fake
    seen: list[tuple[float, str]] = []

    async def record(fraction: float, stage: str) -> None:  # a coroutine callback is awaited
        await asyncio.sleep(0)
        seen.append((fraction, stage))

    async def run() -> tuple[Any, Any, Any]:
        async with AsyncClient(address) as client:
            t = await client.tcav(b"png", model=FAKE_MODEL, target=1, concepts=["red"],
                                  progress=record)  # fmt: skip
            d = await client.dissect(model=FAKE_MODEL, progress=record)
            v = await client.visualize(["logit:0"], model=FAKE_MODEL)
            with pytest.raises(RemoteNotFound):
                await client.dissect(model=FAKE_MODEL, layer="missing")
            return t, d, v

    t, d, v = asyncio.run(run())
    assert seen == [(0.4, "cavs"), (0.25, "thresholds"), (0.75, "iou")]
    assert t["red"].scores == SCORES["red"] and len(d.units) == 3
    assert torch.equal(v.images[0].image, PIXELS[0])


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=5) as client, pytest.raises(RemoteError) as info:
        client.dissect(model="m")
    assert info.value.code == grpc.StatusCode.UNAVAILABLE


# --------------------------------------------------------------------------------------------
# The real server, where it implements the concept RPCs: its answers equal the library's
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_server() -> Iterator[tuple[str, Any]]:
    from tests.serving.harness import ServerThread, tiny_model

    model = tiny_model()
    with ServerThread(models=[model]) as server:
        yield server.address, model


def _normalise(model: Any) -> Any:
    t = model.config.transform
    mean = torch.tensor(t.mean).view(1, -1, 1, 1)
    std = torch.tensor(t.std).view(1, -1, 1, 1)
    return lambda x: (x - mean.to(x.device)) / std.to(x.device)


def test_real_server_dissect_equals_the_library(real_server: tuple[str, Any]) -> None:
    from xai_serve.concepts.dissection import dissect
    from xai_serve.concepts.library import probe_dataset

    address, model = real_server
    with Client(address, timeout=120) as client:
        remote = client.dissect(model="tiny", layer="layer2", per_concept=2, top=5)
    data = probe_dataset(per_concept=2, size=64, seed=0)
    local = dissect(model.module, "layer2", data, transform=_normalise(model),
                    batch_size=model.max_batch_size)  # as the server batches  # fmt: skip
    assert remote.total_units == local.units and remote.layer == "layer2"
    assert [(u.unit, u.concept) for u in remote.units] == [
        (r.unit, r.concept) for r in local.table(5)
    ]
    # to a few ulps: the server's worker threads may sum in another order
    assert [u.iou for u in remote.units] == pytest.approx([r.iou for r in local.table(5)],
                                                          rel=1e-5)  # fmt: skip
    assert {k: v.units for k, v in remote.summary.items()} == {
        k: v.units for k, v in local.summary().items()
    }


def test_real_server_visualize_equals_the_library(real_server: tuple[str, Any]) -> None:
    from xai_serve.concepts.visualize import visualize

    address, model = real_server
    objectives = ["channel:layer2:3", "logit:4"]
    with Client(address, timeout=120) as client:
        remote = client.visualize(objectives, model="tiny", steps=4, size=32, seed=0)
    local = visualize(model.module, objectives, steps=4, size=32, seed=0,
                      transform=_normalise(model))  # fmt: skip
    assert [o.objective for o in remote.images] == objectives
    assert [o.value for o in remote.images] == pytest.approx(local.values.tolist(), rel=1e-4)
    pixels = local.images.mul(255).round().clamp(0, 255).to(torch.uint8)
    for o, p in zip(remote.images, pixels, strict=True):
        assert (o.image.int() - p.int()).abs().max() <= 1
