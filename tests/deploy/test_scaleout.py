"""Scale-out as deploy/README.md describes it, on loopback: three independent server processes
(``python -m xai_serve.serving --config FILE``, as in the container) and one client whose
channel balances calls over all three with gRPC's own ``round_robin`` policy.

Every call succeeds with the answer the model gives in this process, whichever replica served
it; each replica's Prometheus counter shows it served a share. Then one replica drains
(SIGTERM, as in a rolling update or a scale-in) while calls continue: with the retry policy the
README recommends, no call fails. Every process exits 0.
"""

from __future__ import annotations

import importlib.util
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torchvision

import xai_serve
from tests.serving.served import GRACE_S, MODEL, Served, write_config
from xai_serve.client import Client, RemoteExplanation
from xai_serve.serving.process import free_port

N_REPLICAS = 3
N_CALLS = 48  # round robin: 16 per replica
MIN_SHARE = N_CALLS // 6  # each replica serves at least this many
N_AFTER_DRAIN = 12
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

OK = frozenset({"rpc": "Explain", "model": MODEL, "method": "gradcam", "code": "OK"}.items())
ROUND_ROBIN = [("grpc.lb_policy_name", "round_robin")]
# The README's client config: round robin, and a call refused by a draining replica
# (UNAVAILABLE) is retried on another one. Explain has no side effects: retrying is safe.
SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": "xai_serve.v1.Explainer"}],
            "retryPolicy": {
                "maxAttempts": 3,
                "initialBackoff": "0.05s",
                "maxBackoff": "0.5s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


def _healthcheck() -> ModuleType:
    """deploy/healthcheck.py, the image's HEALTHCHECK, imported from its file."""
    spec = importlib.util.spec_from_file_location(
        "xai_serve_healthcheck", DEPLOY / "healthcheck.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _served_ok(replica: Served) -> float:
    """Explain/gradcam calls this replica answered OK, from its own /metrics."""
    return replica.metrics().get(("xai_serve_requests_total", OK), 0.0)


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    """One seeded resnet18 state dict that every replica loads (the same model everywhere)."""
    models = tmp_path / "models"
    models.mkdir()
    torch.manual_seed(0)
    path = models / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.fixture()
def replicas(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[list[Served]]:
    """Three server processes, started together and all SERVING."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # three processes share this machine's cores
    ports = _distinct_ports(2 * N_REPLICAS)
    started: list[Served] = []
    try:
        for i in range(N_REPLICAS):
            d = tmp_path / f"replica{i}"
            d.mkdir()
            # each config allows only its own models/ directory: link it to the shared one
            (d / "models").symlink_to(weights.parent, target_is_directory=True)
            port, metrics_port = ports[2 * i], ports[2 * i + 1]
            cfg = write_config(d, port, metrics_port, model='path = "models/resnet18.pt"')
            started.append(Served(d, cfg, port, metrics_port))
        for replica in started:  # they load concurrently; wait for the slowest
            replica.wait_serving()
        yield started
    finally:
        for replica in started:
            replica.close()


def _reference(weights: Path, xs: torch.Tensor) -> xai_serve.Explanation:
    module = torchvision.models.resnet18(num_classes=10)
    module.load_state_dict(torch.load(weights, weights_only=True))
    return xai_serve.explain(module.eval(), xs, "gradcam", layer="layer4")


def _check(result: RemoteExplanation, ref: xai_serve.Explanation, i: int) -> None:
    assert isinstance(result, RemoteExplanation), result
    assert result.target == int(ref.targets[i]), (i, result.target, ref.targets[i])
    torch.testing.assert_close(result.map, ref.maps[i], rtol=1e-4, atol=1e-4)


def test_round_robin_over_three_replicas_then_one_drains(
    replicas: list[Served], weights: Path
) -> None:
    health = _healthcheck()
    for replica in replicas:
        assert health.main([replica.address]) == 0
    assert [_served_ok(r) for r in replicas] == [0.0] * N_REPLICAS

    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(N_CALLS + N_AFTER_DRAIN, 3, 64, 64, generator=gen)
    ref = _reference(weights, xs)
    target = "ipv4:" + ",".join(r.address for r in replicas)

    # 1. One channel, round robin over all three: every call succeeds, each replica serves a
    #    share, and the answer does not depend on which one served it.
    with Client(target, timeout=30, options=ROUND_ROBIN) as client:
        for i in range(N_CALLS):
            _check(client.explain(xs[i], model=MODEL, method="gradcam"), ref, i)
    shares = [_served_ok(r) for r in replicas]
    assert sum(shares) == N_CALLS, shares
    assert min(shares) >= MIN_SHARE, shares

    # 2. Replica 0 drains while calls continue; the retry policy sends a refused call to
    #    another replica. After it has exited, the other two serve everything.
    drained, rest = replicas[0], replicas[1:]
    options = [("grpc.service_config", json.dumps(SERVICE_CONFIG)), ("grpc.enable_retries", 1)]
    with Client(target, timeout=30, options=options) as client:
        for i in range(3):  # the channel is connected to all three before the drain
            _check(client.explain(xs[i], model=MODEL, method="gradcam"), ref, i)
        before = [_served_ok(r) for r in rest]
        drained.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S + 30
        i = N_CALLS
        while drained.proc.poll() is None:  # calls during the drain
            assert time.monotonic() < deadline, f"replica 0 did not exit:\n{drained.log}"
            _check(client.explain(xs[i % len(xs)], model=MODEL, method="gradcam"), ref, i % len(xs))
            i += 1
        for i in range(N_CALLS, N_CALLS + N_AFTER_DRAIN):  # calls after it has gone
            _check(client.explain(xs[i], model=MODEL, method="gradcam"), ref, i)
    assert drained.proc.returncode == 0, drained.log
    assert drained.log.rstrip().endswith("stopped"), drained.log
    assert health.main([drained.address, "--timeout", "1"]) == 1
    after = [_served_ok(r) for r in rest]
    assert sum(after) - sum(before) >= N_AFTER_DRAIN, (before, after)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)

    # 3. The rest stop on SIGTERM too, exit 0, with nothing in flight to wait for.
    for replica in rest:
        replica.proc.send_signal(signal.SIGTERM)
    for replica in rest:
        assert replica.proc.wait(GRACE_S + 30) == 0, replica.log
        assert "Traceback" not in replica.log, replica.log
