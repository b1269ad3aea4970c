"""``max_connection_age_s``: the server closes client connections of that age (GOAWAY), so
clients reconnect and re-resolve the target; calls keep succeeding across the reconnects."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from tests.serving.harness import ServerThread, tiny_model
from xai_serve.client import encode_tensor
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc

READY = grpc.ChannelConnectivity.READY


class _States:
    """The connectivity states a channel goes through (``channel.subscribe``)."""

    def __init__(self) -> None:
        self.seen: list[grpc.ChannelConnectivity] = []
        self.left_ready = threading.Event()

    def __call__(self, state: grpc.ChannelConnectivity) -> None:
        self.seen.append(state)
        if READY in self.seen and state != READY:
            self.left_ready.set()


@pytest.mark.parametrize("age_s", [0.4, None])
def test_connections_are_recycled_only_when_asked(age_s: float | None) -> None:
    server = ServerThread(models=[tiny_model()], max_connection_age_s=age_s, grace_s=1.0)
    with server as s, grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        states = _States()
        channel.subscribe(states, try_to_connect=False)
        names = [m.name for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models]
        assert names == ["tiny"]
        # gRPC jitters the age by up to +-10%; without a limit the connection stays up.
        assert states.left_ready.wait(3.0) is (age_s is not None), states.seen
        # Calls made across recycled connections all succeed.
        end = time.monotonic() + 2.0
        calls = 0
        while time.monotonic() < end:
            assert stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].name == "tiny"
            calls += 1
            time.sleep(0.05)
        assert calls > 5
        reconnects = states.seen.count(READY)
        if age_s is None:
            assert reconnects == 1, states.seen
        else:
            assert reconnects >= 3, states.seen
        channel.unsubscribe(states)


def test_a_stream_outlives_its_connection_age() -> None:
    """Recycling never cuts off work: a stream that runs well past the age of its connection
    (which the server has meanwhile sent a GOAWAY) completes, every request answered."""
    server = ServerThread(models=[tiny_model()], max_connection_age_s=0.3, grace_s=0.1)
    with server as s, grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        states = _States()
        channel.subscribe(states, try_to_connect=False)
        image = encode_tensor(torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)))

        def requests() -> Iterator[pb.ExplainRequest]:
            for i in range(30):
                yield pb.ExplainRequest(
                    model="tiny", method="saliency", request_id=str(i), tensor=image
                )
                time.sleep(0.05)

        start = time.monotonic()
        ids = [r.request_id for r in stub.ExplainStream(requests(), timeout=60)]
        assert time.monotonic() - start > 1.0  # > 3 connection ages
        assert sorted(ids, key=int) == [str(i) for i in range(30)]
        assert states.left_ready.is_set(), states.seen  # the connection was told to go
        channel.unsubscribe(states)
