"""``xai-serve ray up --detach`` against a one-node Ray cluster on loopback, then requests
through Serve's own proxies: gRPC ``Explain`` (answers equal :func:`xai_serve.explain`; a bad
request keeps the status code ``xai-serve serve`` gives it) and HTTP (KServe v1 ``:explain``)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch

from tests._peers import require

require("ray.serve")

from tests.integrations.ray_cluster import LoopbackCluster, free_port  # noqa: E402
from tests.integrations.ray_helpers import METHODS, inputs, reference, write_config  # noqa: E402
from xai_serve.integrations._ray_replica import REPLICA_METADATA  # noqa: E402
from xai_serve.integrations.ray import load_ray_config  # noqa: E402
from xai_serve.models import load_model  # noqa: E402
from xai_serve.proto import explainer_pb2 as pb  # noqa: E402
from xai_serve.proto import explainer_pb2_grpc as pb_grpc  # noqa: E402
from xai_serve.serving import codec  # noqa: E402

pytestmark = pytest.mark.slow

XAI_SERVE = str(Path(sys.executable).with_name("xai-serve"))


def test_ray_up_deploys_the_config(tmp_path: Path) -> None:
    http_port, grpc_port = free_port(), free_port()
    table = f"""
[ray]
app_name = "xai_cli"
num_replicas = 1
num_cpus = 1.0
proxy_location = "HeadOnly"
http_host = "127.0.0.1"
http_port = {http_port}
grpc_port = {grpc_port}
"""
    path = write_config(tmp_path, table)
    server, _ = load_ray_config(path)
    model = load_model(server.models[0])
    x = inputs(1)[0]
    with LoopbackCluster(head_cpus=1) as cluster:
        up = subprocess.run(
            [XAI_SERVE, "ray", "up", "--config", str(path), "--address", cluster.address,
             "--detach"],
            capture_output=True, text=True, env=cluster.env, timeout=600,
        )  # fmt: skip
        assert up.returncode == 0, up.stderr[-3000:]
        assert f"deployed 'xai_cli': tiny; HTTP 127.0.0.1:{http_port}/" in up.stdout

        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            for method, options in METHODS:
                req = pb.ExplainRequest(model="tiny", method=method)
                req.tensor.CopyFrom(codec.tensor_to_proto(x))
                for key, value in options.items():
                    setattr(req.options, key, value)
                seed = 11 if method == "lime" else None
                if seed is not None:
                    req.options.seed = seed
                resp, call = stub.Explain.with_call(req, timeout=120)
                want_map, want_target = reference(model, x, method, options, seed)
                got = codec.tensor_from_proto(resp.map, field="map", max_elements=10**7)
                assert resp.target == want_target
                torch.testing.assert_close(got, want_map, atol=1e-5, rtol=1e-4)
                assert dict(call.trailing_metadata())[REPLICA_METADATA].count("/") == 1
            bad = pb.ExplainRequest(model="tiny", method="gradcam", target=99)
            bad.tensor.CopyFrom(codec.tensor_to_proto(x))
            with pytest.raises(grpc.RpcError) as info:
                stub.Explain(bad, timeout=60)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "target 99 is out of range" in info.value.details()
            with pytest.raises(grpc.RpcError) as info:
                stub.Explain(pb.ExplainRequest(model="nope", method="gradcam"), timeout=60)
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
            # ExplainStream through Serve's proxy: answers and in-band errors
            good = pb.ExplainRequest(model="tiny", method="gradcam", request_id="good")
            good.tensor.CopyFrom(codec.tensor_to_proto(x))
            bad.request_id = "bad"
            answers = {a.request_id: a for a in stub.ExplainStream(iter([good, bad]), timeout=120)}
            assert sorted(answers) == ["bad", "good"]
            want_map, want_target = reference(model, x, "gradcam", {}, None)
            assert answers["good"].target == want_target
            got = codec.tensor_from_proto(answers["good"].map, field="map", max_elements=10**7)
            torch.testing.assert_close(got, want_map, atol=1e-5, rtol=1e-4)
            assert answers["bad"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]

        base = f"http://127.0.0.1:{http_port}/v1/models"
        body = {"instances": [x.tolist()], "parameters": {"method": "gradcam"}}
        req = urllib.request.Request(f"{base}/tiny:explain", data=json.dumps(body).encode())
        with urllib.request.urlopen(req, timeout=60) as resp:
            (one,) = json.loads(resp.read())["explanations"]
        want_map, want_target = reference(model, x, "gradcam", {}, None)
        assert one["target"] == want_target
        torch.testing.assert_close(torch.tensor(one["map"]), want_map, atol=1e-5, rtol=1e-4)
        req = urllib.request.Request(f"{base}/nope:explain", data=json.dumps(body).encode())
        with pytest.raises(urllib.error.HTTPError) as http_error:
            urllib.request.urlopen(req, timeout=60)
        assert http_error.value.code == 404


def test_serve_run_takes_the_generated_config(tmp_path: Path) -> None:
    """Serve's own way: `xai-serve ray config` > serve.yaml, then `serve run serve.yaml`
    (Serve imports our application builder with the config file as its argument)."""
    http_port, grpc_port = free_port(), free_port()
    table = f"""
[ray]
app_name = "xai_serve_run"
num_replicas = 1
proxy_location = "HeadOnly"
http_host = "127.0.0.1"
http_port = {http_port}
grpc_port = {grpc_port}
"""
    path = write_config(tmp_path, table)
    model = load_model(load_ray_config(path)[0].models[0])
    x = inputs(1)[0]
    made = subprocess.run(
        [XAI_SERVE, "ray", "config", "--config", str(path)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (tmp_path / "serve.yaml").write_text(made.stdout)
    serve_cli = str(Path(sys.executable).with_name("serve"))
    with LoopbackCluster(head_cpus=1) as cluster:
        run = subprocess.run(
            [serve_cli, "run", "--address", cluster.address, "--non-blocking",
             str(tmp_path / "serve.yaml")],
            capture_output=True, text=True, env=cluster.env, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        # --non-blocking returns once the config is submitted; the replica then starts
        req = pb.ExplainRequest(model="tiny", method="gradcam")
        req.tensor.CopyFrom(codec.tensor_to_proto(x))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            resp = None
            for _ in range(150):
                try:
                    resp = stub.Explain(req, timeout=60)
                    break
                except grpc.RpcError as exc:  # no application / replica yet
                    if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                        raise
                    time.sleep(1)
            assert resp is not None, "the application did not start in time"
        want_map, want_target = reference(model, x, "gradcam", {}, None)
        assert resp.target == want_target
        got = codec.tensor_from_proto(resp.map, field="map", max_elements=10**7)
        torch.testing.assert_close(got, want_map, atol=1e-5, rtol=1e-4)
