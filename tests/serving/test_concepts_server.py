"""The concept RPCs (Tcav, Dissect, Visualize) on a real server, each checked against the
library call (:mod:`xai_serve.concepts`) on a copy of the same model with the same images and
seed: the server adds transport, preprocessing, progress, limits, queueing and cancellation,
never different numbers."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from torch import Tensor, nn

from tests.serving.harness import ServerThread, tiny_model
from xai_serve.concepts.dissection import dissect
from xai_serve.concepts.library import (
    concept_from_images,
    concept_names,
    load_probe_folder,
    probe_dataset,
    procedural,
)
from xai_serve.concepts.tcav import tcav
from xai_serve.concepts.visualize import visualize
from xai_serve.imaging import decode_image, encode_png
from xai_serve.models import LoadedModel, TransformConfig
from xai_serve.models.registry import preprocess_image
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving.concepts import _input_image, model_transform, unnormalise
from xai_serve.serving.config import ConceptsConfig, ServerConfig

MODEL = "concepts"
BATCH = 4  # the model's max_batch_size: the server's images per forward of a concept job


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def _png(rgb: Tensor) -> bytes:
    return encode_png(rgb)


def _rgb(n: int, h: int, w: int, seed: int) -> Tensor:
    """``n`` uint8 RGB images with some structure (smooth colour fields plus noise)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 3, 4, 4, generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear")
    noisy = (smooth + 0.1 * torch.rand(n, 3, h, w, generator=g)).clamp(0, 1)
    return (noisy * 255).round().to(torch.uint8)


def _write_concept_folder(folder: Path) -> None:
    folder.mkdir()
    for i, img in enumerate(_rgb(3, 50, 70, seed=11)):
        (folder / f"{i}.png").write_bytes(_png(img))


def _write_probe_folder(root: Path) -> None:
    """A Broden-style folder: 4 images of 48 x 48, masks of "red" (a known colour name) and
    "blob" (a custom concept) on some of them."""
    (root / "images").mkdir(parents=True)
    for name in ("red", "blob"):
        (root / "masks" / name).mkdir(parents=True)
    images = _rgb(4, 48, 48, seed=12)
    for i, img in enumerate(images):
        img = img.clone()
        img[:, 8:30, 10:40] = torch.tensor([230, 20, 20], dtype=torch.uint8)[:, None, None]
        (root / "images" / f"im{i}.png").write_bytes(_png(img))
        mask = torch.zeros(3, 48, 48, dtype=torch.uint8)
        mask[:, 8:30, 10:40] = 255
        (root / "masks" / "red" / f"im{i}.png").write_bytes(_png(mask))
        if i % 2 == 0:
            blob = torch.zeros(3, 48, 48, dtype=torch.uint8)
            blob[:, 30 + i : 44, 4:20] = 255
            (root / "masks" / "blob" / f"im{i}.png").write_bytes(_png(blob))


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model(MODEL, max_batch_size=BATCH)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("concepts")
    _write_concept_folder(root / "mine")
    _write_probe_folder(root / "probe")
    return {"set": root / "mine", "dataset": root / "probe"}


@pytest.fixture(scope="module")
def served(model: LoadedModel, folders: dict[str, Path]) -> Iterator[ServerThread]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        warmup=False,
        metrics_port=0,
        concepts=ConceptsConfig(
            max_images=80,
            max_units=300,
            max_steps=2000,
            max_objectives=3,
            max_size=64,
            max_jobs=1,
            max_waiting=1,
            sets={"mine": str(folders["set"])},
            datasets={"tiny": str(folders["dataset"])},
        ),
    )
    with ServerThread(config, [model]) as server:
        yield server


@pytest.fixture(scope="module")
def stub(served: ServerThread) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(served.address) as channel:
        yield pb_grpc.ExplainerStub(channel)


def _copy(model: LoadedModel) -> nn.Module:
    module = copy.deepcopy(model.module).eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _normalise(model: LoadedModel) -> Callable[[Tensor], Tensor]:
    """The model's normalisation of [0, 1] images, as its transform does it."""
    t = model.config.transform
    mean = torch.tensor(t.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(t.std, dtype=torch.float32).view(1, -1, 1, 1)
    return lambda x: (x - mean.to(x)) / std.to(x)


def _mean_std(model: LoadedModel) -> tuple[Tensor, Tensor]:
    t = model.config.transform
    return (
        torch.tensor(t.mean, dtype=torch.float32).view(-1, 1, 1),
        torch.tensor(t.std, dtype=torch.float32).view(-1, 1, 1),
    )


def _tensor(x: Tensor) -> pb.Tensor:
    x = x.contiguous().float()
    return pb.Tensor(shape=list(x.shape), dtype=pb.FLOAT32, data=x.numpy().tobytes())


def _check_progress(messages: list[Any]) -> None:
    """Progress rises from 0 to 1 in at most ~100 messages, then one `done` message."""
    *progress, last = messages
    assert last.done and last.fraction == 1.0
    assert progress and not any(m.done for m in progress)
    fractions = [m.fraction for m in progress]
    assert fractions == sorted(fractions)
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert len(progress) <= 110
    assert all(m.stage for m in progress)


def _code(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --------------------------------------------------------------------------------------------
# Results equal the library's
# --------------------------------------------------------------------------------------------


def test_tcav_equals_the_library(
    stub: pb_grpc.ExplainerStub, model: LoadedModel, folders: dict[str, Path]
) -> None:
    """Bundled, sent and configured concept sets; tensor and encoded inputs: the scores,
    p-values, accuracies and the null equal the library's on the same images."""
    x01 = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    mean, std = _mean_std(model)
    sent_tensors = (x01 - mean) / std  # preprocessed, as an Explain request sends them
    encoded = _rgb(1, 64, 64, seed=2)  # already the model's size: resize and crop keep it
    sent_concept = _rgb(3, 40, 52, seed=3)
    request = pb.TcavRequest(
        request_id="t1", model=MODEL, target=3, runs=2, random_size=4, concept_size=4, seed=5
    )
    request.concepts.add(name="red")
    request.concepts.add(name="drawn", images=[_png(img) for img in sent_concept])
    request.concepts.add(name="mine")
    for x in sent_tensors:
        request.inputs.add(tensor=_tensor(x))
    request.inputs.add(image=_png(encoded[0]))
    messages = list(stub.Tcav(request, timeout=120))
    _check_progress(messages)
    got = messages[-1]

    # the library: the inputs in [0, 1] (the tensors un-normalised, x * std + mean), the
    # sets at the model's input size, the model's normalisation as `transform`
    inputs = torch.cat([sent_tensors * std + mean, encoded.float() / 255.0])
    sets = [
        procedural("red", 4, size=64, seed=5),
        concept_from_images("drawn", sent_concept, size=64),
        concept_from_images("mine", folders["set"], size=64),
    ]
    want = tcav(
        _copy(model), inputs, sets, 3, model.default_layer, random_sets=4, runs=2,
        transform=_normalise(model), batch_size=BATCH, seed=5, alpha=0.05,
    )  # fmt: skip
    assert (got.request_id, got.layer, got.target) == ("t1", want.layer, 3)
    assert got.alpha == pytest.approx(0.05)
    assert [c.concept for c in got.concepts] == ["red", "drawn", "mine"]
    for mine, theirs in zip(got.concepts, want.concepts, strict=True):
        assert list(mine.scores) == pytest.approx(theirs.scores.tolist(), abs=1e-7)
        assert list(mine.cav_accuracies) == pytest.approx(theirs.accuracies.tolist(), abs=1e-7)
        assert mine.mean == pytest.approx(theirs.mean, abs=1e-6)
        assert mine.std == pytest.approx(theirs.std, abs=1e-6)
        assert mine.p_value == pytest.approx(theirs.p_value, rel=1e-9, abs=1e-12)
        assert mine.significant == theirs.significant
    assert list(got.random_scores) == pytest.approx(want.random_scores.tolist(), abs=1e-7)
    stages = {m.stage for m in messages[:-1]}
    assert {"activations", "cavs", "gradients", "statistics"} <= stages


def test_tcav_tensor_and_image_inputs_agree(
    stub: pb_grpc.ExplainerStub, model: LoadedModel
) -> None:
    """The same image sent encoded and as the model's preprocessed tensor gives the same
    TCAV scores: the tensor is un-normalised back to the image's pixels (to rounding)."""
    rgb = _rgb(3, 64, 64, seed=4)
    x, _ = model.preprocess(rgb[0])
    answers = []
    for as_tensor in (False, True):
        request = pb.TcavRequest(model=MODEL, target=1, runs=2, random_size=3, concept_size=3)
        request.concepts.add(name="blue")
        for img in rgb:
            if as_tensor:
                request.inputs.add(tensor=_tensor(model.preprocess(img)[0]))
            else:
                request.inputs.add(image=_png(img))
        answers.append(list(stub.Tcav(request, timeout=120))[-1])
    a, b = answers
    assert list(a.concepts[0].scores) == list(b.concepts[0].scores)
    assert list(a.concepts[0].cav_accuracies) == list(b.concepts[0].cav_accuracies)
    mean, std = _mean_std(model)
    torch.testing.assert_close(x * std + mean, rgb[0].float() / 255.0, atol=1e-6, rtol=0)


def test_dissect_equals_the_library(stub: pb_grpc.ExplainerStub, model: LoadedModel) -> None:
    request = pb.DissectRequest(
        request_id="d1", model=MODEL, layer="layer2", per_concept=2, quantile=0.01,
        min_iou=0.02, top=6, seed=1,
    )  # fmt: skip
    messages = list(stub.Dissect(request, timeout=120))
    _check_progress(messages)
    got = messages[-1]
    want = dissect(
        _copy(model), "layer2", probe_dataset(per_concept=2, size=64, seed=1), quantile=0.01,
        transform=_normalise(model), batch_size=BATCH, min_iou=0.02,
    )  # fmt: skip
    _same_dissection(got, want, top=6)
    assert {m.stage for m in messages[:-1]} >= {"thresholds", "iou"}


def _same_dissection(got: pb.DissectResponse, want: Any, top: int | None) -> None:
    rows = want.table(top)
    assert (got.layer, got.total_units) == (want.layer, want.units)
    assert got.min_iou == pytest.approx(want.min_iou)
    assert [u.unit for u in got.units] == [r.unit for r in rows]
    assert [u.concept for u in got.units] == [r.concept for r in rows]
    assert [u.category for u in got.units] == [r.category for r in rows]
    assert [u.iou for u in got.units] == pytest.approx([r.iou for r in rows], abs=1e-7)
    thresholds = want.threshold.tolist()
    assert [u.threshold for u in got.units] == pytest.approx(
        [thresholds[r.unit] for r in rows], rel=1e-6
    )
    ious = [u.iou for u in got.units]
    assert ious == sorted(ious, reverse=True)
    summary = want.summary()
    assert [s.category for s in got.summary] == list(summary)
    for s in got.summary:
        assert s.units == summary[s.category].units
        assert dict(s.concepts) == summary[s.category].concepts


def test_configured_dataset_equals_the_library(
    stub: pb_grpc.ExplainerStub, model: LoadedModel, folders: dict[str, Path]
) -> None:
    got = list(
        stub.Dissect(pb.DissectRequest(model=MODEL, layer="layer3", dataset="tiny"), timeout=120)
    )[-1]
    want = dissect(
        _copy(model), "layer3", load_probe_folder(folders["dataset"], size=64),
        transform=_normalise(model), batch_size=BATCH,
    )  # fmt: skip
    _same_dissection(got, want, top=None)
    assert len(got.units) == want.units  # no `top`: every unit
    assert {s.category for s in got.summary} == {"color", "custom"}


def test_visualize_equals_the_library(stub: pb_grpc.ExplainerStub, model: LoadedModel) -> None:
    objectives = ["channel:layer3:1", "unit:layer2:3", "logit:2"]
    request = pb.VisualizeRequest(
        request_id="v1", model=MODEL, objectives=objectives, steps=6, size=32, lr=0.1, seed=2
    )
    messages = list(stub.Visualize(request, timeout=120))
    _check_progress(messages)
    got = messages[-1]
    want = visualize(
        _copy(model), objectives, steps=6, size=32, lr=0.1, seed=2, transform=_normalise(model)
    )
    assert [g.objective for g in got.images] == objectives
    for i, g in enumerate(got.images):
        assert list(g.trace) == pytest.approx(want.trace[i].tolist(), rel=1e-5, abs=1e-6)
        assert g.value == pytest.approx(float(want.values[i]), rel=1e-5, abs=1e-6)
        image = decode_image(g.png, max_pixels=32 * 32).float() / 255.0
        assert image.shape == (3, 32, 32)
        assert float((image - want.images[i]).abs().max()) <= 0.5 / 255 + 1e-6
    assert len(messages) - 1 <= 8  # one per step (6), the start, the end


# --------------------------------------------------------------------------------------------
# Errors and limits
# --------------------------------------------------------------------------------------------


def _tcav(**kw: Any) -> pb.TcavRequest:
    concepts = kw.pop("concepts", [pb.ConceptSet(name="red")])
    inputs = kw.pop("inputs", [pb.Image(tensor=_tensor(torch.zeros(3, 64, 64)))])
    fields = {"model": MODEL, "target": 1, "runs": 2, "random_size": 2, "concept_size": 2, **kw}
    return pb.TcavRequest(concepts=concepts, inputs=inputs, **fields)


_BAD = [
    ("Tcav", _tcav(model="nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("Tcav", _tcav(layer="nope"), grpc.StatusCode.NOT_FOUND, "unknown layer 'nope'"),
    (
        "Tcav",
        _tcav(concepts=[pb.ConceptSet(name="plaid")]),
        grpc.StatusCode.NOT_FOUND,
        "unknown concept 'plaid'",
    ),
    ("Tcav", _tcav(target=10), grpc.StatusCode.INVALID_ARGUMENT, "target 10 is out of range"),
    ("Tcav", _tcav(target=None), grpc.StatusCode.INVALID_ARGUMENT, "`target` is required"),
    ("Tcav", _tcav(runs=1), grpc.StatusCode.INVALID_ARGUMENT, "runs must be at least 2"),
    ("Tcav", _tcav(alpha=1.5), grpc.StatusCode.INVALID_ARGUMENT, "alpha must lie in (0, 1)"),
    ("Tcav", _tcav(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT, "`inputs` is empty"),
    ("Tcav", _tcav(concepts=[]), grpc.StatusCode.INVALID_ARGUMENT, "`concepts` is empty"),
    ("Tcav", _tcav(inputs=[pb.Image()]), grpc.StatusCode.INVALID_ARGUMENT, "inputs[0].image"),
    (
        "Tcav",
        _tcav(inputs=[pb.Image(tensor=_tensor(torch.zeros(3, 8, 8)))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].tensor has shape",
    ),
    (
        "Tcav",
        _tcav(inputs=[pb.Image(image=b"not an image")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "inputs[0].image",
    ),
    (
        "Tcav",
        _tcav(concepts=[pb.ConceptSet(name="x", images=[b"junk", b"junk"])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "concepts[0].images[0]",
    ),
    (
        "Tcav",
        _tcav(concepts=[pb.ConceptSet(name="x", images=[b"one"])]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "at least 2",
    ),
    (
        "Tcav",
        _tcav(concepts=[pb.ConceptSet(name="red"), pb.ConceptSet(name="red")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "named twice",
    ),
    (
        "Tcav",  # 1 input + 2 runs * 30 random + 30 concept images = 91 > max_images 80
        _tcav(random_size=30, concept_size=30),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "concepts.max_images (80)",
    ),
    (
        "Dissect",
        pb.DissectRequest(model=MODEL, dataset="broden"),
        grpc.StatusCode.NOT_FOUND,
        "unknown dataset 'broden'; this server has: procedural, tiny",
    ),
    (
        "Dissect",
        pb.DissectRequest(model=MODEL, layer="layer9"),
        grpc.StatusCode.NOT_FOUND,
        "unknown layer 'layer9'",
    ),
    (
        "Dissect",
        pb.DissectRequest(model=MODEL, per_concept=4),  # 4 * 26 concepts = 104 > 80 images
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "concepts.max_images (80)",
    ),
    (
        "Dissect",  # layer4 has 512 units
        pb.DissectRequest(model=MODEL, layer="layer4", per_concept=1),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "512 units, more than this server's concepts.max_units (300)",
    ),
    (
        "Dissect",
        pb.DissectRequest(model=MODEL, quantile=0.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "quantile must lie in (0, 1)",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["nonsense"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "objectives[0]: cannot parse the objective 'nonsense'",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["logit:1", "channel:layer9:0"]),
        grpc.StatusCode.NOT_FOUND,
        "objectives[1]: model 'concepts' has no layer 'layer9'",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["logit:10"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "class 10 is out of range",
    ),
    (
        "Visualize",  # found when the job reads the layer: the library's own check
        pb.VisualizeRequest(model=MODEL, objectives=["channel:layer3:999"], steps=1, size=16),
        grpc.StatusCode.INVALID_ARGUMENT,
        "999",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=[]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "`objectives` is empty",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["logit:1"] * 4),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "concepts.max_objectives (3)",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["logit:1"], steps=2001),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "concepts.max_steps (2000)",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["logit:1"], size=65),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "concepts.max_size (64)",
    ),
    (
        "Visualize",
        pb.VisualizeRequest(model=MODEL, objectives=["logit:1"], lr=-1.0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lr must be a positive finite number",
    ),
]


@pytest.mark.parametrize(
    ("rpc", "request_", "code", "words"), _BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(_BAD)]
)
def test_bad_requests(
    stub: pb_grpc.ExplainerStub, rpc: str, request_: Any, code: grpc.StatusCode, words: str
) -> None:
    error = _code(lambda: list(getattr(stub, rpc)(request_, timeout=60)))
    assert error.code() == code, error.details()
    assert words in error.details()


def test_unknown_concept_lists_the_known_ones(stub: pb_grpc.ExplainerStub) -> None:
    error = _code(lambda: list(stub.Tcav(_tcav(concepts=[pb.ConceptSet(name="plaid")]))))
    details = error.details()
    assert "mine" in details  # the configured set
    assert all(name in details for name in concept_names())


# --------------------------------------------------------------------------------------------
# Sharing the device, queueing, cancellation, metrics
# --------------------------------------------------------------------------------------------


def _visualize(steps: int, size: int = 32, seed: int = 0) -> pb.VisualizeRequest:
    return pb.VisualizeRequest(
        model=MODEL, objectives=["channel:layer3:5"], steps=steps, size=size, seed=seed
    )


def _explain() -> pb.ExplainRequest:
    x = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(9)) * 2 - 1
    return pb.ExplainRequest(model=MODEL, method="gradcam", tensor=_tensor(x))


def test_explanations_are_not_starved_by_a_concept_job(stub: pb_grpc.ExplainerStub) -> None:
    """While a long visualisation runs, explanations are answered in a small fraction of its
    time: the job runs on its own model copy in its own thread, not on the device worker."""
    stub.Explain(_explain(), timeout=60)  # warm
    call = stub.Visualize(_visualize(250), timeout=300)
    start = time.monotonic()
    for message in call:
        if message.fraction > 0.0:
            break  # the job is computing
    latencies = []
    for _ in range(3):
        t = time.monotonic()
        stub.Explain(_explain(), timeout=60)
        latencies.append(time.monotonic() - t)
    answered = time.monotonic()
    messages = list(call)
    job = time.monotonic() - start
    assert messages[-1].done
    assert answered - start < 0.5 * job, (latencies, job)
    assert max(latencies) < 0.15 * job, (latencies, job)


def test_queueing_and_cancellation(stub: pb_grpc.ExplainerStub) -> None:
    """max_jobs=1, max_waiting=1: a second job waits ("queued"), a third is refused; cancelling
    the first stops it at its next step, and the waiting job then runs at once."""
    first = stub.Visualize(_visualize(2000), timeout=300)
    start = time.monotonic()
    fraction = 0.0
    for message in first:
        fraction = message.fraction
        if fraction >= 0.01:
            break
    rate = (time.monotonic() - start) / fraction  # seconds for the whole first job
    second = stub.Visualize(_visualize(3, seed=1), timeout=300)
    waiting = next(second)
    assert (waiting.stage, waiting.fraction, waiting.done) == ("queued", 0.0, False)
    error = _code(lambda: list(stub.Visualize(_visualize(3, seed=2), timeout=60)))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_jobs" in error.details()
    cancelled = time.monotonic()
    first.cancel()
    rest = list(second)
    waited = time.monotonic() - cancelled
    assert rest[-1].done and len(rest[-1].images) == 1
    remaining = rate * (1.0 - fraction)
    assert waited < 0.1 * remaining, (waited, remaining)
    cancelled_error = _code(lambda: list(first))
    assert cancelled_error.code() == grpc.StatusCode.CANCELLED


def test_a_deadline_stops_the_job(stub: pb_grpc.ExplainerStub, model: LoadedModel) -> None:
    """A job past its deadline stops; the worker is free again at once, and the model copy it
    ran on (reused by the next job) is intact: the next answer equals the library's."""
    error = _code(lambda: list(stub.Visualize(_visualize(2000), timeout=1.0)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    start = time.monotonic()
    done = list(stub.Visualize(_visualize(2, seed=4), timeout=60))[-1]
    assert done.done and time.monotonic() - start < 5.0
    want = visualize(
        _copy(model), ["channel:layer3:5"], steps=2, size=32, seed=4, transform=_normalise(model)
    )
    assert done.images[0].value == pytest.approx(float(want.values[0]), rel=1e-5)
    assert list(done.images[0].trace) == pytest.approx(want.trace[0].tolist(), rel=1e-5)


def test_concept_calls_are_counted(stub: pb_grpc.ExplainerStub, served: ServerThread) -> None:
    assert served.server is not None
    registry = served.server.metrics.registry

    def count(rpc: str, code: str) -> float:
        labels = {"rpc": rpc, "model": MODEL, "method": "", "code": code}
        return registry.get_sample_value("xai_serve_requests_total", labels) or 0.0

    before = {
        "Visualize": count("Visualize", "OK"),
        "Tcav": count("Tcav", "NOT_FOUND"),
        "Dissect": count("Dissect", "RESOURCE_EXHAUSTED"),
    }
    list(stub.Visualize(_visualize(1), timeout=60))
    _code(lambda: list(stub.Tcav(_tcav(concepts=[pb.ConceptSet(name="plaid")]))))
    _code(lambda: list(stub.Dissect(pb.DissectRequest(model=MODEL, per_concept=4))))
    deadline = time.monotonic() + 5
    while (
        time.monotonic() < deadline and count("Dissect", "RESOURCE_EXHAUSTED") == before["Dissect"]
    ):
        time.sleep(0.02)
    assert count("Visualize", "OK") == before["Visualize"] + 1
    assert count("Tcav", "NOT_FOUND") == before["Tcav"] + 1
    assert count("Dissect", "RESOURCE_EXHAUSTED") == before["Dissect"] + 1


def test_two_jobs_at_once_with_max_jobs_2(model: LoadedModel) -> None:
    """With max_jobs=2 two jobs run side by side (neither is queued), each on its own copy,
    and both equal the library's answer."""
    config = ServerConfig(
        host="127.0.0.1", port=0, warmup=False, concepts=ConceptsConfig(max_jobs=2, max_waiting=0)
    )
    with ServerThread(config, [model]) as server, grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.ExplainerStub(ch)
        results: dict[int, list[Any]] = {}

        def run(seed: int) -> None:
            results[seed] = list(stub.Visualize(_visualize(20, seed=seed), timeout=120))

        threads = [threading.Thread(target=run, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    assert set(results) == {1, 2}
    for seed, messages in results.items():
        assert all(m.stage != "queued" for m in messages)
        want = visualize(
            _copy(model), ["channel:layer3:5"], steps=20, size=32, seed=seed,
            transform=_normalise(model),
        )  # fmt: skip
        assert messages[-1].images[0].value == pytest.approx(float(want.values[0]), rel=1e-5)


def test_preprocessing_matches_the_models_own() -> None:
    """For a grayscale model with a non-square input: an encoded input prepared for the
    library (resized and cropped, in [0, 1]) and then put through the library's `transform`
    equals the model's own preprocessing; a preprocessed tensor un-normalised and transformed
    again is itself; square concept images are resized to the model's input."""
    transform_config = TransformConfig(resize=40, crop=(32, 48), grayscale=True, mean=0.5, std=0.25)
    fake = SimpleNamespace(
        name="gray", config=SimpleNamespace(transform=transform_config), input_shape=(1, 32, 48)
    )
    rgb = _rgb(1, 57, 75, seed=6)[0]
    want, _ = preprocess_image(rgb, transform_config, (32, 48))
    x01 = _input_image(_png(rgb), fake, 10**6, "inputs[0].image")  # type: ignore[arg-type]
    assert x01.shape == (3, 32, 48) and float(x01.min()) >= 0.0 and float(x01.max()) <= 1.0
    transform = model_transform(fake)  # type: ignore[arg-type]
    torch.testing.assert_close(transform(x01[None])[0], want, atol=1e-6, rtol=0)
    back = unnormalise(want, fake)  # type: ignore[arg-type]
    assert back.shape == (3, 32, 48)
    torch.testing.assert_close(transform(back[None])[0], want, atol=1e-5, rtol=0)
    assert transform(torch.rand(2, 3, 48, 48)).shape == (2, 1, 32, 48)
