"""Explanation quality on the server: the Evaluate RPC, ``ExplainRequest.quality`` and the
sampled quality histogram, each checked against the library's :func:`evaluate` on the same
inputs (the server adds transport, grouping and progress, never different numbers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from tests.serving.harness import ServerThread, tiny_model
from xai_serve.client import Client, RemoteInvalidInput, RemoteResourceExhausted
from xai_serve.explainers.evaluation import evaluate, metric_names
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving.config import LimitsConfig, QualityConfig, ServerConfig
from xai_serve.serving.quality import ProgressThrottle


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model("quality", max_batch_size=2)


@pytest.fixture(scope="module")
def served(model: LoadedModel) -> Iterator[ServerThread]:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        warmup=False,
        metrics_port=0,
        limits=LimitsConfig(max_evaluate_inputs=6),
    )
    with ServerThread(config, [model]) as server:
        yield server


@pytest.fixture(scope="module")
def client(served: ServerThread) -> Iterator[Client]:
    with Client(served.address, timeout=120) as c:
        yield c


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_evaluate_equals_the_library(client: Client, model: LoadedModel) -> None:
    """Five images in groups of two (max_batch_size), one with a target: every figure equals
    the library's on the same images, and progress rises to 1."""
    x = _images(5)
    targets = [None, 3, None, None, 7]
    seen: list[tuple[float, str]] = []
    metrics = ["deletion", "insertion", "max_sensitivity"]
    got = client.evaluate(
        list(x), model="quality", method="saliency", metrics=metrics, targets=targets,
        progress=lambda f, s: seen.append((f, s)),
    )  # fmt: skip
    # the library on the same groups (top-1 images together, then the targeted ones)
    want: dict[str, torch.Tensor] = {}
    want_targets = torch.zeros(5, dtype=torch.int64)
    given = [1, 4]
    top1 = [0, 2, 3]
    for rows in (given, top1[:2], top1[2:]):
        t = torch.tensor([targets[i] for i in rows]) if rows == given else None
        ev = evaluate(model.module, x[rows], "saliency", metrics, target=t, seed=0)
        for name, values in ev.metrics.items():
            want.setdefault(name, torch.zeros(5))[rows] = values
        want_targets[rows] = ev.targets
    assert set(got.metrics) == set(metrics)
    for name in metrics:
        torch.testing.assert_close(
            torch.tensor(got.metrics[name].values), want[name], rtol=1e-4, atol=1e-5
        )
        assert got.metrics[name].mean == pytest.approx(float(want[name].mean()), rel=1e-4)
        assert got.metrics[name].stderr == pytest.approx(float(want[name].std() / 5**0.5), rel=1e-3)
    assert got.metrics["deletion"].higher_is_better is False
    assert got.metrics["insertion"].higher_is_better is True
    assert list(got.targets) == want_targets.tolist()
    assert targets[1] == got.targets[1] and targets[4] == got.targets[4]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert len(fractions) >= 4  # a report per group at least, not only start and end
    assert {"explain", *metrics} <= {stage for _, stage in seen}


def test_default_metrics_are_those_the_method_supports(client: Client) -> None:
    got = client.evaluate(_images(1), model="quality", method="gradcam", metrics=None, timeout=300)
    # gradcam's maps are min-max scaled layer maps: infidelity (normalize=True) still
    # applies; every default metric scores it
    assert set(got.metrics) == {
        "deletion", "insertion", "road", "infidelity", "max_sensitivity", "randomisation",
    }  # fmt: skip


def test_explain_quality_scores_the_answered_map(client: Client, model: LoadedModel) -> None:
    x = _images(1, seed=3)
    exp = client.explain(x[0], model="quality", method="saliency", quality=["deletion", "road"])
    assert set(exp.quality) == {"deletion", "road"}
    ev = evaluate(model.module, x, "saliency", ["deletion", "road"], seed=0)
    torch.testing.assert_close(exp.map, ev.maps[0].cpu(), rtol=1e-5, atol=1e-6)
    for name in ("deletion", "road"):
        assert exp.quality[name] == pytest.approx(float(ev.metrics[name][0]), rel=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "code", "words"),
    [
        ({"metrics": ["nope"]}, grpc.StatusCode.INVALID_ARGUMENT, "unknown metric 'nope'"),
        ({"metrics": ["deletion", "deletion"]}, grpc.StatusCode.INVALID_ARGUMENT, "twice"),
        ({"method": "nope"}, grpc.StatusCode.NOT_FOUND, "unknown method"),
        ({"targets": [99]}, grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]: target 99"),
        (
            {"metrics": ["max_sensitivity"], "method": "lime", "budget_ms": 50},
            grpc.StatusCode.INVALID_ARGUMENT,
            "budget_ms",
        ),
    ],
)
def test_bad_evaluate_requests(client: Client, kwargs: dict, code, words: str) -> None:
    kwargs = {"model": "quality", "method": "saliency", **kwargs}
    with pytest.raises(Exception) as info:
        client.evaluate(_images(1), **kwargs)
    assert info.value.code == code, info.value
    assert words in info.value.details


def test_too_many_inputs_and_none(client: Client, served: ServerThread) -> None:
    with pytest.raises(RemoteResourceExhausted, match="max_evaluate_inputs"):
        client.evaluate(list(_images(7)), model="quality", method="saliency")
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Evaluate(pb.EvaluateRequest(model="quality", method="saliency")))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs" in info.value.details()
    bad = pb.EvaluateRequest(model="quality", method="saliency")
    bad.inputs.add().tensor.CopyFrom(pb.Tensor(shape=[3, 5, 5], dtype=pb.FLOAT32, data=b"x"))
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Evaluate(bad))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].tensor" in info.value.details()


def test_quality_errors_on_explain(client: Client) -> None:
    with pytest.raises(RemoteInvalidInput, match="unknown metric"):
        client.explain(_images(1)[0], model="quality", method="saliency", quality=["x"])
    with pytest.raises(RemoteInvalidInput, match="one explained class"):
        client.explain(
            _images(1)[0], model="quality", method="saliency", targets=[1, 2],
            quality=["deletion"],
        )  # fmt: skip


def test_list_metrics(client: Client) -> None:
    got = client.list_metrics()
    assert [m.name for m in got] == metric_names()
    assert {m.name: m.higher_is_better for m in got}["insertion"] is True


def test_explanations_are_not_starved_by_an_evaluation(client: Client, served) -> None:
    """While a long evaluation runs (six images of randomisation + max-sensitivity over
    smoothgrad, three groups), an explanation sent meanwhile is answered long before the
    evaluation ends: the evaluation yields the device between groups."""
    done: dict[str, float] = {}

    def run() -> None:
        client.evaluate(
            list(_images(6, seed=5)), model="quality", method="smoothgrad", samples=16,
            metrics=["max_sensitivity", "randomisation"], timeout=300,
        )  # fmt: skip
        done["evaluation"] = time.monotonic()

    thread = threading.Thread(target=run)
    start = time.monotonic()
    thread.start()
    time.sleep(0.5)  # the evaluation has started its first group
    client.explain(_images(1)[0], model="quality", method="gradcam")
    done["explain"] = time.monotonic()
    thread.join(300)
    assert "evaluation" in done
    assert done["explain"] < done["evaluation"]
    # answered within about one group's work, not after all three
    assert done["explain"] - start < 0.6 * (done["evaluation"] - start)


def test_cancelled_evaluation_stops_early(served: ServerThread, model: LoadedModel) -> None:
    """Cancelling the call stops the work at its next progress report: the device is free
    again well before the whole evaluation would have ended."""
    request = pb.EvaluateRequest(
        model="quality", method="smoothgrad", metrics=["max_sensitivity", "randomisation"]
    )
    request.options.samples = 16
    for x in _images(6, seed=6):
        request.inputs.add().tensor.CopyFrom(
            pb.Tensor(shape=[3, 64, 64], dtype=pb.FLOAT32, data=x.numpy().tobytes())
        )
    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        call = stub.Evaluate(request)
        first = next(call)
        assert first.fraction == 0.0 and not first.done
        start = time.monotonic()
        call.cancel()
        # the next request waits at most for the group in progress
        Client(served.address).explain(_images(1)[0], model="quality", method="gradcam")
        waited = time.monotonic() - start
    full_start = time.monotonic()
    with Client(served.address, timeout=300) as c:
        c.evaluate(
            list(_images(6, seed=6)), model="quality", method="smoothgrad", samples=16,
            metrics=["max_sensitivity", "randomisation"],
        )  # fmt: skip
    full = time.monotonic() - full_start
    assert waited < 0.6 * full, (waited, full)


def test_sampled_quality_is_exported(model: LoadedModel) -> None:
    config = ServerConfig(
        host="127.0.0.1",
        port=0,
        warmup=False,
        metrics_port=0,
        quality=QualityConfig(sample_rate=1.0, metrics=("deletion", "insertion")),
    )
    with ServerThread(config, [model]) as server, Client(server.address) as c:
        for i in range(3):
            c.explain(_images(1, seed=10 + i)[0], model="quality", method="saliency")
        assert server.server is not None
        registry = server.server.metrics.registry
        labels = {"model": "quality", "method": "saliency", "metric": "deletion"}
        deadline = time.monotonic() + 30
        count = None
        while time.monotonic() < deadline:
            count = registry.get_sample_value("xai_serve_explanation_quality_count", labels)
            if count == 3:
                break
            time.sleep(0.05)
        assert count == 3
        labels["metric"] = "insertion"
        assert registry.get_sample_value("xai_serve_explanation_quality_count", labels) == 3
        total = registry.get_sample_value("xai_serve_explanation_quality_sum", labels)
        assert total is not None and 0.0 <= total <= 3.0  # areas of probabilities


def test_progress_throttle() -> None:
    """At most one report per percent, but a new stage is passed on at once (its start is
    where the stage before ended, so the fraction alone would hide it), and the fraction
    never falls."""
    sent: list[tuple[float, str]] = []
    throttle = ProgressThrottle(lambda f, s: sent.append((f, s)))
    for fraction, stage in [
        (0.0, "explain"), (0.004, "explain"), (0.004, "road"), (0.009, "road"),
        (0.003, "road"), (0.02, "road"), (0.5, "road"), (0.5, "done"), (1.0, "done"),
    ]:  # fmt: skip
        throttle(fraction, stage)
    assert sent == [
        (0.0, "explain"), (0.004, "road"), (0.02, "road"), (0.5, "road"), (0.5, "done"),
        (1.0, "done"),
    ]  # fmt: skip
