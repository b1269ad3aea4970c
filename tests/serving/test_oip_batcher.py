"""Plain Open Inference Protocol ``ModelInfer`` calls (logits, no ``explainer``) go through the
model's batcher like every explanation: one queue, one out-of-memory policy, the same metrics
and the same refusal of non-finite answers. (They had a forward path of their own before.)"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import torch
from torch import nn

from tests.serving.harness import ServerThread, oip_request, tiny_config
from xai_serve.models import LoadedModel, load_model
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc

TIMEOUT = 60


class _OutOfMemoryAboveOne(nn.Module):
    """The wrapped model, except that a forward of more than one image raises the CPU
    allocator's out-of-memory error; counts the forwards by batch size."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.sizes.append(x.shape[0])
        if x.shape[0] > 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ...")
        return self.inner(x)


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[ServerThread, LoadedModel, LoadedModel]]:
    torch.manual_seed(0)
    plain = load_model(tiny_config("plain"))
    torch.manual_seed(0)
    small = load_model(tiny_config("small"))
    small.module = _OutOfMemoryAboveOne(small.module)
    with ServerThread(models=[plain, small]) as s:
        yield s, plain, small


def _logits(resp, classes: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32).reshape(
        -1, classes
    )


def test_plain_logits_are_batched_jobs_with_metrics(served) -> None:
    s, plain, _ = served
    xs = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    registry = s.server.metrics.registry
    labels = {"model": "plain", "method": "logits"}
    before = registry.get_sample_value("xai_serve_batch_size_sum", labels) or 0.0
    with grpc.insecure_channel(s.address) as channel:
        resp = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            oip_request("plain", xs, "p-1"), timeout=TIMEOUT
        )
    with torch.no_grad():
        want = plain.module(xs)
    torch.testing.assert_close(_logits(resp, 10), want, rtol=1e-4, atol=1e-4)
    assert resp.id == "p-1"
    # the batcher computed the three images (as one batch or several) and counted them
    after = registry.get_sample_value("xai_serve_batch_size_sum", labels)
    assert after == before + 3


def test_plain_logits_share_the_out_of_memory_policy(served) -> None:
    """A batch that runs out of memory is split and retried (the batcher's policy), so a
    model that can only take one image at a time still answers a request of four."""
    s, _, small = served
    xs = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    small.module.sizes.clear()
    with grpc.insecure_channel(s.address) as channel:
        resp = oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            oip_request("small", xs), timeout=TIMEOUT
        )
    with torch.no_grad():
        want = small.module.inner(xs)
    torch.testing.assert_close(_logits(resp, 10), want, rtol=1e-4, atol=1e-4)
    assert max(small.module.sizes) > 1  # tried together first ...
    assert small.module.sizes.count(1) >= 4  # ... then one image at a time


def test_plain_logits_that_are_not_finite_are_invalid_argument(served) -> None:
    s, _, _ = served
    huge = torch.full((1, 3, 64, 64), 3e38)
    huge[:, :, ::2] *= -1
    with grpc.insecure_channel(s.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(oip_request("plain", huge, "nan-1"), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not finite" in info.value.details()
