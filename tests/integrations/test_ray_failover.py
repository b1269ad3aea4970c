"""A two-node Ray cluster on loopback, the Serve application of :mod:`xai_serve.integrations.ray`
with one replica on each node, a few hundred gRPC requests, and the worker node killed in the
middle of them.

What it shows: every request is answered, and every answer equals :func:`xai_serve.explain` in
this process (Grad-CAM, and LIME with a client seed); the requests that were on the lost node
fail with a retryable status and the client sends them again (nothing is lost or answered
wrongly); when a node with room joins again, Serve starts the lost replica on it, and the
application serves on two replicas again.

With ``XAI_SERVE_RAY_RESULTS=<file.json>`` the figures it measured are written there (see
``benchmarks/ray_failover.py``, which runs this test for that).
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tests._peers import require

ray = require("ray")
serve = require("ray.serve")

from tests.integrations.ray_cluster import LoopbackCluster, free_port  # noqa: E402
from tests.integrations.ray_helpers import METHODS, inputs, reference, write_config  # noqa: E402
from xai_serve.integrations._ray_replica import REPLICA_METADATA  # noqa: E402
from xai_serve.integrations.ray import DEPLOYMENT_NAME, load_ray_config, start  # noqa: E402
from xai_serve.models import load_model  # noqa: E402
from xai_serve.proto import explainer_pb2 as pb  # noqa: E402
from xai_serve.proto import explainer_pb2_grpc as pb_grpc  # noqa: E402
from xai_serve.serving import codec  # noqa: E402

pytestmark = pytest.mark.slow

REQUESTS = int(os.environ.get("XAI_SERVE_RAY_REQUESTS", "300"))
AFTER_RECOVERY = 40
CLIENTS = 8
KILL_AT = REQUESTS // 3  # answers received before the worker node is killed
DISTINCT = 12  # distinct inputs (x 2 methods = 24 distinct answers)


def retryable(exc: grpc.RpcError) -> bool:
    """What a request in flight on a lost replica fails with, and only that: UNAVAILABLE, or
    Serve's proxy passing on Ray's actor failure as INTERNAL ("The actor died unexpectedly
    before finishing this task" / "The actor ... is unavailable"). Our own INTERNAL answers
    ("internal error <id> ...") and every other code are not retried."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return (
        code == grpc.StatusCode.INTERNAL
        and details.startswith("The actor ")
        and ("died" in details or "unavailable" in details)
    )


APP = "xai_failover"


def _ray_table(http_port: int, grpc_port: int) -> str:
    return f"""
[ray]
app_name = "{APP}"
num_replicas = 2
num_cpus = 1.0
resources = {{ xai_replica = 1.0 }}
max_ongoing_requests = 16
proxy_location = "HeadOnly"
http_host = "127.0.0.1"
http_port = {http_port}
grpc_port = {grpc_port}
health_check_period_s = 1.0
health_check_timeout_s = 10.0
graceful_shutdown_timeout_s = 2.0
"""


def _request(i: int, x: torch.Tensor) -> pb.ExplainRequest:
    method, options = METHODS[i % len(METHODS)]
    req = pb.ExplainRequest(model="tiny", method=method, request_id=str(i))
    req.tensor.CopyFrom(codec.tensor_to_proto(x))
    for key, value in options.items():
        setattr(req.options, key, value)
    if method == "lime":
        req.options.seed = 1000 + i % DISTINCT
    return req


@dataclass
class Sent:
    resp: pb.ExplainResponse
    attempts: int
    node: str  # the Ray node id of the replica that answered
    at: float  # time.monotonic() of the answer


class Client:
    """Sends requests, retrying the retryable failures; counts everything."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb_grpc.ExplainerStub(self.channel)
        self.lock = threading.Lock()
        self.answered = 0
        self.retried_requests = 0
        self.failed_attempts: Counter[str] = Counter()
        self.first_failure: float | None = None
        self.last_failure: float | None = None
        self.failure_details: list[str] = []

    def send(self, req: pb.ExplainRequest) -> Sent:
        """The answer, how many attempts it took (at most 10), which node answered, when."""
        for attempt in range(1, 11):
            try:
                resp, call = self.stub.Explain.with_call(
                    req, timeout=120, metadata=(("application", APP),)
                )
            except grpc.RpcError as exc:
                if not retryable(exc):
                    raise
                code = exc.code()
                now = time.monotonic()
                with self.lock:
                    self.failed_attempts[code.name] += 1
                    self.retried_requests += attempt == 1
                    self.first_failure = self.first_failure or now
                    self.last_failure = now
                    if len(self.failure_details) < 5:
                        self.failure_details.append(f"{code.name}: {exc.details()[:300]}")
                time.sleep(0.2)
                continue
            replica = dict(call.trailing_metadata() or ()).get(REPLICA_METADATA, "")
            with self.lock:
                self.answered += 1
            return Sent(resp, attempt, replica.split("/")[0], time.monotonic())
        raise AssertionError(f"request {req.request_id} was not answered in 10 attempts")


def _replicas() -> dict[str, int]:
    status = serve.status().applications[APP].deployments[DEPLOYMENT_NAME]
    return {str(state): n for state, n in status.replica_states.items()}


def _worker_nodes() -> list[str]:
    """Ids of the alive nodes other than the head."""
    return [
        n["NodeID"]
        for n in ray.nodes()
        if n["Alive"] and "node:__internal_head__" not in n["Resources"]
    ]


def _running() -> int:
    return sum(n for state, n in _replicas().items() if state.endswith("RUNNING"))


def _check_http(port: int, cases: list[tuple[torch.Tensor, tuple[torch.Tensor, int]]]) -> None:
    """KServe v1 :explain through Serve's HTTP proxy: Grad-CAM answers to ``(input, (map,
    target))`` cases equal the library's."""
    body = {"instances": [x.tolist() for x, _ in cases], "parameters": {"method": "gradcam"}}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/tiny:explain",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers[REPLICA_METADATA]
        out = json.loads(resp.read())["explanations"]
    assert len(out) == len(cases)
    for one, (_, (want_map, want_target)) in zip(out, cases, strict=True):
        assert one["method"] == "gradcam" and one["target"] == want_target
        torch.testing.assert_close(torch.tensor(one["map"]), want_map, atol=1e-5, rtol=1e-4)


def test_two_nodes_lose_one_mid_traffic(tmp_path: Path) -> None:
    t_test = time.monotonic()
    http_port, grpc_port = free_port(), free_port()
    server, cfg = load_ray_config(write_config(tmp_path, _ray_table(http_port, grpc_port)))
    model = load_model(server.models[0])
    xs = inputs(DISTINCT)
    want = {}
    for k in range(2 * DISTINCT):
        method, options = METHODS[k % len(METHODS)]
        seed = 1000 + k % DISTINCT if method == "lime" else None
        want[k] = reference(model, xs[k % DISTINCT], method, options, seed)

    def check(i: int, resp: pb.ExplainResponse) -> None:
        want_map, want_target = want[i % (2 * DISTINCT)]
        assert resp.request_id == str(i)
        assert resp.target == want_target, i
        got = codec.tensor_from_proto(resp.map, field="map", max_elements=10**7)
        torch.testing.assert_close(got, want_map, atol=1e-5, rtol=1e-4)

    figures: dict[str, Any] = {}
    with LoopbackCluster(head_resources={"xai_replica": 1}) as cluster:
        worker = cluster.add_worker(resources={"xai_replica": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            t0 = time.monotonic()
            start(server, cfg)
            figures["deploy_s"] = time.monotonic() - t0
            (worker_id,) = _worker_nodes()
            # each node has room for one replica: two running means one on each node
            assert _running() == 2
            assert ray.available_resources().get("xai_replica", 0) == 0
            assert ray.cluster_resources()["xai_replica"] == 2

            client = Client(grpc_port)
            killed = threading.Event()
            kill_time: list[float] = []

            def killer() -> None:
                while client.answered < KILL_AT:
                    time.sleep(0.01)
                kill_time.append(time.monotonic())
                figures["worker_processes_killed"] = worker.kill()
                killed.set()

            answers: dict[int, Sent] = {}
            t_traffic = time.monotonic()
            kill_thread = threading.Thread(target=killer, daemon=True)
            kill_thread.start()
            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = {
                    i: pool.submit(client.send, _request(i, xs[i % DISTINCT]))
                    for i in range(REQUESTS)
                }
                for i, fut in futures.items():
                    answers[i] = fut.result()
            traffic_s = time.monotonic() - t_traffic
            kill_thread.join(timeout=60)
            assert killed.is_set(), "the worker node was not killed during the traffic"

            # every request answered, each answer right
            assert sorted(answers) == list(range(REQUESTS))
            for i, sent in answers.items():
                check(i, sent.resp)
            # both nodes answered before the kill; only the head after it
            before = Counter(a.node for a in answers.values() if a.at < kill_time[0])
            after = Counter(a.node for a in answers.values() if a.at > kill_time[0] + 1.0)
            assert len(before) == 2, before
            assert worker_id in before and worker_id not in after, (before, after)
            retried = client.retried_requests
            print("failures:", client.failure_details)
            assert retried >= 1, "no request was in flight on the lost node"
            # a request is retried only while the lost replica is being dropped
            assert client.last_failure is not None and client.last_failure >= kill_time[0]
            during = _replicas()

            # a node with room joins: Serve starts the lost replica there, and it answers
            t_join = time.monotonic()
            cluster.add_worker(resources={"xai_replica": 1})
            joined = time.monotonic()
            (new_id,) = _worker_nodes()
            assert new_id != worker_id
            end = joined + 180
            probes = 0
            while time.monotonic() < end:
                probes += 1
                sent = client.send(_request(probes, xs[probes % DISTINCT]))
                check(probes, sent.resp)
                if sent.node == new_id:
                    break
            recovered = time.monotonic()
            assert sent.node == new_id, "no answer from a replica on the new node"
            assert _running() == 2, _replicas()

            # both replicas answer, right, first time
            extra = [
                client.send(_request(REQUESTS + j, xs[(REQUESTS + j) % DISTINCT]))
                for j in range(AFTER_RECOVERY)
            ]
            for j, sent in enumerate(extra):
                check(REQUESTS + j, sent.resp)
                assert sent.attempts == 1
            assert len({sent.node for sent in extra}) == 2  # the head's and the new node's
            _check_http(http_port, [(xs[0], want[0]), (xs[2], want[2])])  # Grad-CAM ones
            listed = client.stub.ListModels(
                pb.ListModelsRequest(), timeout=60, metadata=(("application", APP),)
            )
            assert [m.name for m in listed.models] == ["tiny"] and listed.models[0].ready
            client.channel.close()
        finally:
            ray.shutdown()

    figures.update(
        requests=REQUESTS,
        answered=len(answers),
        answered_correctly=len(answers),
        requests_retried=retried,
        failed_attempts_by_code=dict(client.failed_attempts),
        max_attempts=max(a.attempts for a in answers.values()),
        answers_by_node_before_kill=sorted(before.values()),
        failure_examples=client.failure_details,
        killed_after_answers=KILL_AT,
        failures_window_s=client.last_failure - client.first_failure,
        first_failure_after_kill_s=client.first_failure - kill_time[0],
        last_failure_after_kill_s=client.last_failure - kill_time[0],
        replicas_after_kill=during,
        traffic_s=traffic_s,
        requests_per_s=REQUESTS / traffic_s,
        new_node_join_s=joined - t_join,
        probes_until_new_replica_answered=probes,
        replica_back_after_join_s=recovered - joined,
        replica_back_after_kill_s=recovered - kill_time[0],
        after_recovery_requests=AFTER_RECOVERY,
        after_recovery_first_try=sum(a.attempts == 1 for a in extra),
        test_s=time.monotonic() - t_test,
    )
    out = os.environ.get("XAI_SERVE_RAY_RESULTS")
    if out:
        record = {
            "what": "Ray Serve two-node failover (tests/integrations/test_ray_failover.py)",
            "machine": {
                "cpus": os.cpu_count(),
                "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(),
                "ray": ray.__version__,
                "torch": torch.__version__,
            },
            "setup": {
                "nodes": "head + worker on 127.0.0.1, 1 CPU and xai_replica=1 each",
                "replicas": 2,
                "clients": CLIENTS,
                "model": "resnet18, 10 classes, 48x48 input, seeded random weights",
                "methods": [m for m, _ in METHODS],
                "ray_health_check": "period 500 ms, failure threshold 4 (set in the nodes' env)",
                "serve_routing": "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING=0; proxy on head",
            },
            "figures": {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()},
        }
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(figures, indent=2, default=str))
