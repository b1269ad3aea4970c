"""Our server explaining models that are served elsewhere (source ``"oip"``), over gRPC.

Two real Open Inference Protocol servers that this project did not write the serving side of
-- or that run as a separate process -- serve the same seeded TorchScript CNN: the KServe SDK's
``ModelServer`` (gRPC v2, ``kserve_cnn.py``) and a second ``xai-serve`` process (its
``ModelInfer``). Our server (in this process) has each as a remote model and the same file
loaded locally; LIME, KernelSHAP and occlusion through the remote models answer what the local
model answers for the same seed. Then the ways a remote fails, each with its status code and
a message, never INTERNAL: a gradient or CAM method (FAILED_PRECONDITION), a stopped remote
(UNAVAILABLE), garbage answers (UNAVAILABLE), a slow remote under a deadline
(DEADLINE_EXCEEDED, quickly) and a cancelled call (the remote calls stop; the device is free).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
import torch

import xai_serve
from tests._peers import require_installed
from tests.serving.harness import ServerThread, oip_request
from tests.serving.remote_servers import (
    INPUT,
    KServeProcess,
    local_config,
    remote_config,
    start_xai_serve,
    write_scripted,
)
from xai_serve.client import Client, RemoteError, RemoteFailedPrecondition, set_image
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.process import ServerProcess

require_installed("kserve")

SEED = 9
TIMEOUT = 60.0
REMOTES = ("via_kserve", "via_xai_serve")
OPTIONS = {
    "lime": {"samples": 128, "n_segments": 16, "segmenter": "grid"},
    "kernelshap": {"samples": 128, "n_segments": 16, "segmenter": "grid"},
    "occlusion": {"window": 8, "stride": 4},
}


class Remotes:
    """The remote servers and our server (the models it serves are named in ``REMOTES``,
    plus ``local``, ``doomed`` (its server is stopped by a test), ``garbage`` (answers a
    flat shape after its probe) and ``slow`` (1 s per call))."""

    def __init__(self, d: Path) -> None:
        self.procs: list[KServeProcess | ServerProcess] = []
        scripted = write_scripted(d / "cnn.pt", seed=2)
        kserve = self._add(KServeProcess(d, scripted, name="cnn"))
        self.doomed = self._add(KServeProcess(d, scripted, name="cnn"))
        garbage = self._add(KServeProcess(d, scripted, name="cnn", mode="shape", good=1))
        slow = self._add(KServeProcess(d, scripted, name="cnn", delay_s=1.0))
        xai = self._add(start_xai_serve(d, scripted, name="cnn"))
        models = (
            local_config("local", scripted),
            remote_config("via_kserve", kserve.address, model="cnn", max_batch=16),
            remote_config("via_xai_serve", xai.address, model="cnn", max_batch=16),
            remote_config("doomed", self.doomed.address, model="cnn"),
            remote_config("garbage", garbage.address, model="cnn"),
            remote_config("slow", slow.address, model="cnn", max_batch=8),
        )
        config = ServerConfig(host="127.0.0.1", port=0, http_port=0, warmup=False, models=models)
        self.server = ServerThread(config)
        self.server.__enter__()

    def _add(self, proc: KServeProcess | ServerProcess) -> KServeProcess | ServerProcess:
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        self.server.stop()
        for proc in self.procs:
            proc.kill() if isinstance(proc, ServerProcess) else proc.close()


@pytest.fixture(scope="module")
def remotes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remotes]:
    r = Remotes(tmp_path_factory.mktemp("remote_oip"))
    yield r
    r.close()


@pytest.fixture(scope="module")
def client(remotes: Remotes) -> Iterator[Client]:
    with Client(remotes.server.address, timeout=TIMEOUT) as c:
        yield c


def _image(seed: int = 0) -> torch.Tensor:
    return torch.randn(INPUT, generator=torch.Generator().manual_seed(seed))


def _error(call: object) -> RemoteError:
    try:
        call()  # type: ignore[operator]
    except RemoteError as e:
        return e
    raise AssertionError("the call did not fail")


def test_models_load_and_offer_only_black_box_methods(client: Client) -> None:
    models = {m.name: m for m in client.list_models()}
    for name in (*REMOTES, "doomed", "garbage", "slow"):
        assert tuple(models[name].methods) == ("kernelshap", "lime", "occlusion"), name
        assert models[name].num_classes == models["local"].num_classes == 5
    assert "gradcam" in models["local"].methods or "saliency" in models["local"].methods


@pytest.mark.parametrize("remote", REMOTES)
@pytest.mark.parametrize("method", sorted(OPTIONS))
def test_remote_answer_equals_the_local_answer(client: Client, remote: str, method: str) -> None:
    x = _image(seed=len(method))
    kw = {**({"seed": SEED} if method != "occlusion" else {}), **OPTIONS[method]}
    got = client.explain(x, model=remote, method=method, **kw)
    want = client.explain(x, model="local", method=method, **kw)
    assert got.target == want.target
    assert got.map is not None and want.map is not None
    assert want.map.abs().max() > 0
    torch.testing.assert_close(got.map, want.map, rtol=1e-4, atol=1e-5)
    assert [c.index for c in got.top_k] == [c.index for c in want.top_k]
    for a, b in zip(got.top_k, want.top_k, strict=True):
        assert abs(a.logit - b.logit) < 1e-4


@pytest.mark.parametrize("remote", REMOTES)
def test_model_infer_passes_the_remote_logits_through(remotes: Remotes, remote: str) -> None:
    xs = torch.stack([_image(i) for i in range(3)])
    with grpc.insecure_channel(remotes.server.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        got, want = (
            stub.ModelInfer(oip_request(name, xs), timeout=TIMEOUT) for name in (remote, "local")
        )
    assert list(got.outputs[0].shape) == [3, 5]
    assert got.raw_output_contents[0] and got.raw_output_contents[0] != b""
    a = torch.frombuffer(bytearray(got.raw_output_contents[0]), dtype=torch.float32)
    b = torch.frombuffer(bytearray(want.raw_output_contents[0]), dtype=torch.float32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated_gradients"])
def test_gradient_and_cam_methods_are_failed_precondition(client: Client, method: str) -> None:
    e = _error(lambda: client.explain(_image(), model="via_kserve", method=method))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(e, RemoteFailedPrecondition) and isinstance(e, xai_serve.FailedPrecondition)
    assert f"method {method!r} needs the model's" in e.details
    assert "served elsewhere" in e.details and "load the model locally" in e.details


def test_over_http_a_gradient_method_is_400_and_lime_equals_grpc(
    remotes: Remotes, client: Client
) -> None:
    """The HTTP listener maps FAILED_PRECONDITION to 400 with the message, not to a 500."""
    x = _image(seed=3)
    assert remotes.server.server is not None
    base = f"http://127.0.0.1:{remotes.server.server.http_port}"
    body = {"instances": [x.tolist()], "parameters": {"method": "gradcam"}}
    with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        r = http.post("/v1/models/via_kserve:explain", json=body)
        assert r.status_code == 400, r.text
        assert "load the model locally" in r.json()["error"]
        body["parameters"] = {"method": "lime", "seed": SEED, **OPTIONS["lime"]}
        r = http.post("/v1/models/via_kserve:explain", json=body)
    assert r.status_code == 200, r.text
    want = client.explain(x, model="local", method="lime", seed=SEED, **OPTIONS["lime"])
    assert want.map is not None
    got = torch.tensor(r.json()["explanations"][0]["map"])
    torch.testing.assert_close(got, want.map, rtol=1e-4, atol=1e-5)


def test_garbage_answers_are_unavailable_with_a_message(client: Client) -> None:
    e = _error(lambda: client.explain(_image(), model="garbage", method="occlusion"))
    assert e.code == grpc.StatusCode.UNAVAILABLE, e
    assert "answered with shape [5]; expected output 'logits' of numeric scores [1, 5]" in str(e)


def _remote_calls(remotes: Remotes, name: str) -> int:
    """How many ModelInfer calls our server has sent to model ``name``'s remote."""
    assert remotes.server.server is not None
    remote = remotes.server.server.state.models[name].remote
    assert remote is not None
    return remote.calls


def _no_more_calls(remotes: Remotes, name: str, wait_s: float = 1.5) -> bool:
    """No new remote call is sent for ``wait_s`` (each round of the slow remote takes 1 s)."""
    before = _remote_calls(remotes, name)
    time.sleep(wait_s)
    return _remote_calls(remotes, name) == before


def test_slow_remote_under_a_deadline_is_deadline_exceeded_quickly(
    remotes: Remotes, client: Client
) -> None:
    start = time.monotonic()
    e = _error(lambda: client.explain(_image(), model="slow", method="lime", timeout=0.7))
    assert e.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.0
    # the work stopped with the deadline: no further rounds of remote calls
    assert _no_more_calls(remotes, "slow")


def test_cancelling_a_call_stops_its_remote_calls(remotes: Remotes, client: Client) -> None:
    """LIME on the slow remote takes about 1 s per round of four calls (many seconds in all);
    after the call is cancelled no further round is sent, and the next request on the same
    remote model is computed at once (its worker is free), not after the remaining rounds."""
    request = pb.ExplainRequest(model="slow", method="lime", request_id="to-cancel")
    request.options.samples = 256
    set_image(request, _image())
    with grpc.insecure_channel(remotes.server.address) as channel:
        call = pb_grpc.ExplainerStub(channel).Explain.future(request)  # no deadline
        time.sleep(1.5)  # the unperturbed call and the first round are out
        sent = _remote_calls(remotes, "slow")
        assert sent >= 2
        assert call.cancel()
    assert _no_more_calls(remotes, "slow")
    # occlusion of a whole-image window: the unperturbed call and one of the occluded images
    start = time.monotonic()
    client.explain(_image(), model="slow", method="occlusion", window=32, stride=32)
    assert time.monotonic() - start < 3.5  # two 1 s rounds, not the cancelled LIME's ~8


def test_a_slow_remote_does_not_hold_up_local_models(remotes: Remotes, client: Client) -> None:
    """A model served elsewhere computes on a worker of its own: while LIME on the slow remote
    waits for its rounds (seconds), a local model on the same device answers at once."""
    request = pb.ExplainRequest(model="slow", method="lime", request_id="long")
    request.options.samples = 256
    set_image(request, _image())
    with grpc.insecure_channel(remotes.server.address) as channel:
        call = pb_grpc.ExplainerStub(channel).Explain.future(request)
        try:
            time.sleep(0.5)
            start = time.monotonic()
            client.explain(_image(), model="local", method="occlusion", **OPTIONS["occlusion"])
            assert time.monotonic() - start < 1.0
            assert not call.done()  # the slow LIME was computing all along
        finally:
            call.cancel()


def test_stopped_remote_is_unavailable(remotes: Remotes, client: Client) -> None:
    assert client.explain(_image(), model="doomed", method="occlusion").map is not None
    remotes.doomed.close()  # type: ignore[union-attr]
    e = _error(lambda: client.explain(_image(), model="doomed", method="occlusion"))
    assert e.code == grpc.StatusCode.UNAVAILABLE
    assert "remote model 'cnn' at 127.0.0.1:" in e.details and "is unavailable" in e.details
