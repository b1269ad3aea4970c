"""Security of the full server (explain API, Open Inference Protocol, health, reflection):
TLS and mutual TLS, bearer tokens, and model files confined to ``model_dirs``.

Unlike ``test_auth.py`` (the interceptor and credentials on a fake service), these run the real
:class:`~xai_serve.serving.server.XaiServer` through the test harness and call it with the real
:class:`~xai_serve.client.Client`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torchvision
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import xai_serve
from tests.serving.certs import have_openssl, make_certs
from tests.serving.harness import ServerThread, oip_request, tiny_config, tiny_model
from xai_serve.client import Client, RemoteError, RemoteUnavailable
from xai_serve.errors import InvalidInput
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.config import AuthConfig, ServerConfig, TlsConfig

needs_openssl = pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")

MODEL = "tiny"
TIMEOUT = 20.0
TOKEN = "s3cret-Token_1"
OTHER_TOKEN = "second.token-2"
TOKENS_ENV = "XAI_SERVE_TEST_TOKENS"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(1))


def _reference_map(x: torch.Tensor) -> torch.Tensor:
    model = tiny_model(MODEL)
    return xai_serve.explain(model.module, x[None], "gradcam", target=2, layer="layer4").maps[0]


def _check_explain(client: Client, x: torch.Tensor) -> None:
    """A call that works returns the right numbers, not just 'no error'."""
    exp = client.explain(x, model=MODEL, method="gradcam", target=2)
    assert exp.target == 2
    torch.testing.assert_close(exp.map, _reference_map(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# TLS
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not have_openssl():
        pytest.skip("needs the openssl command")
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second, unrelated CA with its own server and client certificates."""
    if not have_openssl():
        pytest.skip("needs the openssl command")
    return make_certs(tmp_path_factory.mktemp("tls-other"))


def _tls(certs: dict[str, Path], *, mutual: bool = False) -> TlsConfig:
    return TlsConfig(
        cert=str(certs["server_cert"]),
        key=str(certs["server_key"]),
        client_ca=str(certs["ca"]) if mutual else None,
    )


def _refused(fn: Any) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        fn()
    return info.value


@needs_openssl
def test_tls_accepts_tls_clients_and_refuses_plaintext(
    certs: dict[str, Path], other_certs: dict[str, Path], x: torch.Tensor
) -> None:
    with ServerThread(models=[tiny_model(MODEL)], tls=_tls(certs)) as s:
        with Client(s.address, root_certificates=certs["ca"], timeout=TIMEOUT) as client:
            assert [m.name for m in client.list_models()] == [MODEL]
            _check_explain(client, x)
        # the PEM bytes work as well as a path
        with Client(s.address, root_certificates=certs["ca"].read_bytes(), timeout=TIMEOUT) as c:
            assert c.list_models()[0].ready
        # plaintext against a TLS port
        with Client(s.address, timeout=5) as client:
            err = _refused(client.list_models)
            assert isinstance(err, RemoteUnavailable), err
        # a client that does not trust the server's CA
        with Client(s.address, root_certificates=other_certs["ca"], timeout=5) as client:
            err = _refused(client.list_models)
            assert err.code == grpc.StatusCode.UNAVAILABLE, err


@needs_openssl
def test_mutual_tls_requires_a_client_certificate_from_the_ca(
    certs: dict[str, Path], other_certs: dict[str, Path], x: torch.Tensor
) -> None:
    with ServerThread(models=[tiny_model(MODEL)], tls=_tls(certs, mutual=True)) as s:
        with Client(s.address, root_certificates=certs["ca"], timeout=5) as client:
            err = _refused(client.list_models)
            assert err.code == grpc.StatusCode.UNAVAILABLE, err
        # a certificate signed by another CA
        with Client(
            s.address,
            root_certificates=certs["ca"],
            client_cert=other_certs["client_cert"],
            client_key=other_certs["client_key"],
            timeout=5,
        ) as client:
            err = _refused(client.list_models)
            assert err.code == grpc.StatusCode.UNAVAILABLE, err
        with Client(
            s.address,
            root_certificates=certs["ca"],
            client_cert=certs["client_cert"],
            client_key=certs["client_key"],
            timeout=TIMEOUT,
        ) as client:
            _check_explain(client, x)


# --------------------------------------------------------------------------------------------
# Bearer tokens
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def token_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[ServerThread]:
    """A server that accepts TOKEN (from the environment) and OTHER_TOKEN (from a file)."""
    monkeypatch.setenv(TOKENS_ENV, f" {TOKEN} ,")
    tokens_file = tmp_path / "tokens.txt"
    tokens_file.write_text(f"# comment\n\n{OTHER_TOKEN}\n")
    auth = AuthConfig(tokens_env=TOKENS_ENV, tokens_file=str(tokens_file))
    with ServerThread(models=[tiny_model(MODEL)], auth=auth) as s:
        yield s


def _bearer(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else (("authorization", f"Bearer {token}"),)


def _oip_infer(channel: grpc.Channel, x: torch.Tensor, token: str | None) -> Any:
    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    return stub.ModelInfer(oip_request(MODEL, x[None]), metadata=_bearer(token), timeout=TIMEOUT)


def _list_services(channel: grpc.Channel, token: str | None) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = stub.ServerReflectionInfo(iter([request]), metadata=_bearer(token), timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def _rpc_code(fn: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def test_tokens_guard_every_service_but_health(token_server: ServerThread, x: torch.Tensor) -> None:
    address = token_server.address
    for token, details in ((None, "missing bearer token"), ("wrong", "invalid bearer token")):
        with Client(address, token=token, timeout=TIMEOUT) as client:
            for call in (
                client.list_models,
                lambda c=client: c.explain(x, model=MODEL, method="gradcam"),
                lambda c=client: list(c.explain_many([x, x], model=MODEL, method="gradcam")),
            ):
                err = _refused(call)
                assert err.code == grpc.StatusCode.UNAUTHENTICATED, err
                assert err.details == details
                assert TOKEN not in str(err) and OTHER_TOKEN not in str(err)
        with grpc.insecure_channel(address) as channel:
            code, got = _rpc_code(lambda ch=channel, t=token: _oip_infer(ch, x, t))
            assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, details)
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            code, _ = _rpc_code(
                lambda s=stub, t=token: s.ServerLive(oip.ServerLiveRequest(), metadata=_bearer(t))
            )
            assert code == grpc.StatusCode.UNAUTHENTICATED
            code, _ = _rpc_code(lambda ch=channel, t=token: _list_services(ch, t))
            assert code == grpc.StatusCode.UNAUTHENTICATED

    # Every refused call left the inflight gauge (the server finishes a call just after the
    # client sees its status, hence the short wait).
    registry = token_server.server.metrics.registry
    deadline = time.monotonic() + 5
    while registry.get_sample_value("xai_serve_inflight") != 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert registry.get_sample_value("xai_serve_inflight") == 0

    # Health stays open: load balancers probe it without credentials.
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "xai_serve.v1.Explainer", MODEL):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert resp.status == SERVING, service


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN])
def test_right_token_is_accepted_everywhere(
    token_server: ServerThread, x: torch.Tensor, token: str
) -> None:
    with Client(token_server.address, token=token, timeout=TIMEOUT) as client:
        assert [m.name for m in client.list_models()] == [MODEL]
        _check_explain(client, x)
        results = list(client.explain_many([x, x], model=MODEL, method="gradcam", target=2))
        assert sorted(r.request_id for r in results) == ["0", "1"]
        for r in results:
            assert not isinstance(r, RemoteError), r
            torch.testing.assert_close(r.map, _reference_map(x), rtol=1e-4, atol=1e-5)
    with grpc.insecure_channel(token_server.address) as channel:
        resp = _oip_infer(channel, x, token)
        logits = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
        with torch.no_grad():
            ref = tiny_model(MODEL).module(x[None])[0]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
        services = _list_services(channel, token)
        assert {"xai_serve.v1.Explainer", "inference.GRPCInferenceService"} <= set(services)
        assert "grpc.health.v1.Health" in services


@needs_openssl
def test_tls_and_tokens_together(
    certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, x: torch.Tensor
) -> None:
    monkeypatch.setenv(TOKENS_ENV, TOKEN)
    auth = AuthConfig(tokens_env=TOKENS_ENV)
    with ServerThread(models=[tiny_model(MODEL)], tls=_tls(certs), auth=auth) as s:
        with Client(s.address, root_certificates=certs["ca"], timeout=TIMEOUT) as client:
            assert _refused(client.list_models).code == grpc.StatusCode.UNAUTHENTICATED
        with Client(
            s.address, root_certificates=certs["ca"], token=TOKEN, timeout=TIMEOUT
        ) as client:
            _check_explain(client, x)


# --------------------------------------------------------------------------------------------
# model_dirs
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every path ``torch.load`` is called with (the call still happens)."""
    calls: list[str] = []
    real = torch.load

    def spy(f: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture()
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(allowed, outside, weights)``: two folders, a valid state dict in the second."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    weights = outside / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    return allowed, outside, weights


def _config(path: Path | str, model_dirs: tuple[Path, ...]) -> ServerConfig:
    return ServerConfig(
        host="127.0.0.1",
        port=0,
        warmup=False,
        models=(tiny_config(MODEL, path=str(path)),),
        model_dirs=tuple(str(d) for d in model_dirs),
    )


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT).status


def _outside_path(how: str, allowed: Path, weights: Path) -> Path | str:
    if how == "outside":
        return weights
    if how == "dotdot":
        return f"{allowed}/../outside/{weights.name}"
    link = allowed / "link.pt"
    link.symlink_to(weights)
    return link


@pytest.mark.parametrize("how", ["outside", "dotdot", "symlink"])
def test_config_refuses_a_model_outside_model_dirs(
    dirs: tuple[Path, Path, Path], torch_loads: list[str], how: str
) -> None:
    """The first check: the config itself (file, flags or Python) is refused."""
    allowed, _, weights = dirs
    path = _outside_path(how, allowed, weights)
    with pytest.raises(InvalidInput, match="not inside any of model_dirs") as info:
        _config(path, (allowed,))
    assert str(path) in str(info.value) and str(allowed) in str(info.value)
    assert torch_loads == []


def test_model_moved_outside_model_dirs_is_refused_at_load_unopened(
    dirs: tuple[Path, Path, Path], torch_loads: list[str], x: torch.Tensor
) -> None:
    """The second check, at load time: a symlink inside ``model_dirs`` that pointed inside
    when the config was read and points outside when the model loads."""
    allowed, _, weights = dirs
    inside = allowed / "inside.pt"
    inside.write_bytes(weights.read_bytes())
    link = allowed / "model.pt"
    link.symlink_to(inside)
    cfg = _config(link, (allowed,))  # accepted: the link resolves inside
    link.unlink()
    link.symlink_to(weights)
    with ServerThread(config=cfg) as s:
        state = s.server.state
        assert MODEL in state.failed and MODEL not in state.models
        message = state.failed[MODEL]
        assert str(link) in message and str(weights) in message  # given and resolved paths
        assert "outside the allowed model directories" in message
        assert str(allowed) in message
        for service in ("", MODEL, "xai_serve.v1.Explainer", "inference.GRPCInferenceService"):
            assert _health(s.address, service) == NOT_SERVING, service
        with Client(s.address, timeout=TIMEOUT) as client:
            err = _refused(lambda c=client: c.explain(x, model=MODEL, method="gradcam"))
            assert isinstance(err, RemoteUnavailable), err
            assert "failed to load" in err.details and str(weights) in err.details
            assert not client.list_models()[0].ready
    assert torch_loads == []


def test_model_inside_model_dirs_loads(
    dirs: tuple[Path, Path, Path], torch_loads: list[str], x: torch.Tensor
) -> None:
    """The control: the same file with its folder allowed is read (through the spied
    torch.load) and served."""
    allowed, outside, weights = dirs
    cfg = _config(weights, (allowed, outside))
    with ServerThread(config=cfg) as s:
        assert s.server.state.failed == {}
        assert _health(s.address, "") == SERVING
        with Client(s.address, timeout=TIMEOUT) as client:
            exp = client.explain(x, model=MODEL, method="gradcam", target=1)
            model = s.server.state.models[MODEL]
            ref = xai_serve.explain(model.module, x[None], "gradcam", target=1, layer="layer4")
            torch.testing.assert_close(exp.map, ref.maps[0], rtol=1e-4, atol=1e-5)
    assert torch_loads == [str(weights)]
