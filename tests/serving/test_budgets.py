"""Budgets, tolerances, progress and forward paths through the gRPC server.

- A call's deadline becomes the method's time budget: a LIME request asking for far more
  samples than fit answers OK before its deadline with the samples it used and the standard
  errors of its weights; a user's ``budget_ms`` too small for the least work is
  INVALID_ARGUMENT before any sampling.
- ``tolerance`` travels over gRPC and stops sampling early.
- ``progress`` on ExplainStream sends partial answers (marked, with standard errors) before
  the final one, which equals the in-process answer; unary Explain refuses it.
- ``ListModels`` reports each model's forward path: the tuned one after warm-up.

The model is the seeded random resnet18 of the other server tests (10 classes, 64 x 64).
"""

from __future__ import annotations

import queue
import time
from pathlib import Path

import grpc
import pytest
import torch

import xai_serve
from tests.serving.harness import ServerThread, tiny_config, tiny_model
from xai_serve.client import decode_tensor
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving import codec
from xai_serve.serving.config import ServerConfig

NAME = "tiny"
TIMEOUT = 120.0
Code = grpc.StatusCode


def _input(seed: int) -> torch.Tensor:
    return torch.randn((3, 64, 64), generator=torch.Generator().manual_seed(seed))


def _request(x: torch.Tensor, method: str = "lime", **options: object) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model=NAME, method=method, options=pb.Options(**options))
    req.tensor.CopyFrom(codec.tensor_to_proto(x.contiguous()))
    return req


@pytest.fixture(scope="module")
def served():
    with ServerThread(models=[tiny_model(NAME)]) as s:
        channel = grpc.insecure_channel(s.address)
        with channel:
            yield s, pb_grpc.ExplainerStub(channel)


def test_the_deadline_becomes_the_budget(served) -> None:
    _, stub = served
    x = _input(1)
    # warm: the first LIME call pays for segmentation set-up
    stub.Explain(_request(x, samples=64, seed=1), timeout=TIMEOUT)
    timeout = 3.0
    start = time.monotonic()
    resp = stub.Explain(_request(x, samples=4096, seed=1, n_segments=16), timeout=timeout)
    elapsed = time.monotonic() - start
    assert elapsed < timeout
    assert 64 <= resp.samples < 4096
    segments = int(decode_tensor(resp.segments).max()) + 1 if resp.HasField("segments") else 0
    assert len(resp.segment_stderr) == len(resp.segment_weights) > 0
    if segments:
        assert len(resp.segment_weights) == segments
    assert all(s >= 0 for s in resp.segment_stderr)
    assert not resp.partial


def test_a_user_budget_too_small_is_invalid_argument(served) -> None:
    _, stub = served
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(_request(_input(2), samples=4096, budget_ms=1), timeout=TIMEOUT)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "budget_ms" in info.value.details()


def test_a_deadline_too_short_for_the_least_work_is_deadline_exceeded(served) -> None:
    _, stub = served
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(_request(_input(3), samples=4096, n_segments=200), timeout=0.06)
    assert info.value.code() == Code.DEADLINE_EXCEEDED


def test_tolerance_over_grpc_stops_early(served) -> None:
    _, stub = served
    x = _input(4)
    loose = stub.Explain(_request(x, samples=2048, seed=3, tolerance=1e6), timeout=TIMEOUT)
    assert loose.samples < 2048
    assert max(loose.segment_stderr) <= 1e6


def test_progress_streams_partials_then_the_final_answer(served) -> None:
    _, stub = served
    x = _input(5)
    req = _request(x, method="kernelshap", samples=1024, seed=7, n_segments=24)
    req.progress = True
    req.request_id = "p1"
    answers = list(stub.ExplainStream(iter([req]), timeout=TIMEOUT))
    assert [a.request_id for a in answers] == ["p1"] * len(answers)
    partials, final = answers[:-1], answers[-1]
    assert len(partials) >= 1 and all(a.partial for a in partials)
    assert not final.partial and final.samples == 1024
    samples = [a.samples for a in answers]
    assert samples == sorted(samples) and samples[0] < 1024
    assert all(len(a.segment_stderr) == len(a.segment_weights) for a in answers)
    ref = xai_serve.explain(
        tiny_model(NAME).module, x[None], "kernelshap", samples=1024, seed=7, n_segments=24
    )
    used = len(final.segment_weights)
    torch.testing.assert_close(
        torch.tensor(list(final.segment_weights)), ref.weights[0, :used].float(),
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip
    torch.testing.assert_close(
        torch.tensor(list(final.segment_stderr)), ref.stderr[0, :used].float(),
        rtol=1e-4, atol=1e-6,
    )  # fmt: skip


def test_progress_on_unary_explain_is_refused(served) -> None:
    _, stub = served
    req = _request(_input(6), samples=256)
    req.progress = True
    with pytest.raises(grpc.RpcError) as info:
        stub.Explain(req, timeout=TIMEOUT)
    assert info.value.code() == Code.INVALID_ARGUMENT
    assert "ExplainStream" in info.value.details()


def test_stream_progress_interleaves_with_other_requests(served) -> None:
    """A partial-answer request and a plain one on the same stream: each gets its answers."""
    _, stub = served
    a = _request(_input(7), samples=512, seed=1, n_segments=16)
    a.progress, a.request_id = True, "a"
    b = _request(_input(8), method="saliency")
    b.request_id = "b"
    got: queue.Queue[pb.ExplainResponse] = queue.Queue()
    for resp in stub.ExplainStream(iter([a, b]), timeout=TIMEOUT):
        got.put(resp)
    answers = list(got.queue)
    assert sum(1 for r in answers if r.request_id == "b") == 1
    finals = [r for r in answers if r.request_id == "a" and not r.partial]
    assert len(finals) == 1 and finals[0].samples == 512


def test_list_models_reports_the_tuned_forward_path(tmp_path: Path) -> None:
    model = tiny_config(NAME, compile="off")  # a build would add a minute to the test
    cfg = ServerConfig(
        host="127.0.0.1", port=0, warmup=True, tuning_dir=str(tmp_path), models=(model,)
    )
    with ServerThread(cfg) as s:
        channel = grpc.insecure_channel(s.address)
        with channel:
            (info,) = (
                pb_grpc.ExplainerStub(channel).ListModels(pb.ListModelsRequest(), timeout=TIMEOUT)
            ).models
    path = info.forward_path
    assert path.tuned and not path.compiled
    assert path.memory_format in ("channels_last", "contiguous")
    assert path.precision in ("fp32", "bf16")  # bf16 only where this CPU runs it natively
    if path.precision != "fp32":
        assert path.top1_agreement >= 0.9 and path.HasField("rank_correlation")
    assert path.batch_size >= 1 and path.images_per_s > 0 and path.speedup > 0
    assert "x the fp32 contiguous batch-64 forward" in path.summary
    assert list((tmp_path / "tune").glob("*.json"))  # kept for the next start


def test_list_models_says_when_a_path_is_not_tuned(served) -> None:
    _, stub = served
    (info,) = stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT).models
    assert not info.forward_path.tuned
    assert info.forward_path.summary.endswith("(not tuned)")
