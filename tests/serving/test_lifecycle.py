"""The server's life as an operator sees it: the real command line in its own process, from a
TOML file to ``SERVING``, answering requests, exporting metrics, then SIGTERM with requests in
flight: they finish, new ones are refused, the process drains and exits 0. Also start-up
failures (exit codes and error lines) and ``--version``.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import torchvision
from grpc_health.v1 import health_pb2

import xai_serve
from tests.serving.served import GRACE_S, MODEL, Served, assert_drained, write_config
from xai_serve.client import Client, RemoteError, RemoteExplanation, RemoteUnavailable
from xai_serve.serving.process import free_port

SLOW = {"method": "lime", "samples": 256}  # one batch of N_SLOW: ~1.3 s on 2 CPU cores
N_SLOW = 3
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    """Seeded resnet18 weights in ``models/`` (so this process can compute the references)."""
    (tmp_path / "models").mkdir()
    torch.manual_seed(0)
    path = tmp_path / "models" / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    return path


@pytest.fixture()
def served(tmp_path: Path, weights: Path) -> Iterator[Served]:
    port, metrics_port = free_port(), free_port()
    cfg = write_config(tmp_path, port, metrics_port, model='path = "models/resnet18.pt"')
    s = Served(tmp_path, cfg, port, metrics_port)
    try:
        yield s
    finally:
        s.close()


def _reference_model(weights: Path) -> torch.nn.Module:
    module = torchvision.models.resnet18(num_classes=10)
    module.load_state_dict(torch.load(weights, weights_only=True))
    return module.eval()


def _slow(client: Client, x: torch.Tensor, seed: int) -> tuple[Any, float]:
    try:
        result: Any = client.explain(x, model=MODEL, seed=seed, timeout=60, **SLOW)
    except RemoteError as exc:
        result = exc
    return result, time.monotonic()


def test_serve_requests_metrics_and_drain_on_sigterm(served: Served, weights: Path) -> None:
    served.wait_serving()
    log = served.log
    assert f"listening on 127.0.0.1:{served.port}" in log, log
    assert f"metrics on http://127.0.0.1:{served.metrics_port}/metrics" in log, log
    assert f"loaded model '{MODEL}' (torchvision)" in log, log
    assert "input 3x64x64, 10 classes" in log, log
    assert f"ready: {MODEL}" in log, log

    module = _reference_model(weights)
    gen = torch.Generator().manual_seed(0)
    xs = torch.randn(N_SLOW, 3, 64, 64, generator=gen)
    with Client(served.address, timeout=60) as client:
        # A few ordinary requests, checked against the model in this process.
        [info] = client.list_models()
        assert (info.name, info.input_shape, info.num_classes, info.ready) == (
            MODEL,
            (3, 64, 64),
            10,
            True,
        )
        for i in range(2):
            exp = client.explain(xs[i], model=MODEL, method="gradcam", target=i)
            ref = xai_serve.explain(module, xs[i : i + 1], "gradcam", target=i, layer="layer4")
            torch.testing.assert_close(exp.map, ref.maps[0], rtol=1e-4, atol=1e-5)
            assert exp.target == i
        with pytest.raises(RemoteError) as bad:
            client.explain(xs[0], model=MODEL, method="nope")
        assert bad.value.code == grpc.StatusCode.NOT_FOUND

        metrics = served.metrics()
        ok = frozenset(
            {"rpc": "Explain", "model": MODEL, "method": "gradcam", "code": "OK"}.items()
        )
        assert metrics[("xai_serve_requests_total", ok)] == 2
        not_found = frozenset(
            {"rpc": "Explain", "model": MODEL, "method": "<unknown>", "code": "NOT_FOUND"}.items()
        )
        assert metrics[("xai_serve_requests_total", not_found)] == 1
        labels = frozenset({"rpc": "Explain", "model": MODEL, "method": "gradcam"}.items())
        assert metrics[("xai_serve_request_latency_seconds_count", labels)] == 2
        batches = frozenset({"model": MODEL, "method": "gradcam"}.items())
        assert metrics[("xai_serve_batch_size_sum", batches)] == 2
        # grpc.aio's abort sends the error status before the handler's coroutine unwinds, so
        # the refused call leaves the inflight gauge a moment after its client has the answer
        deadline = time.monotonic() + 5
        while served.metrics()[("xai_serve_inflight", frozenset())] != 0:
            assert time.monotonic() < deadline, "a finished call is still counted in flight"
            time.sleep(0.02)

        # Slow requests in flight, then SIGTERM.
        pool = concurrent.futures.ThreadPoolExecutor(N_SLOW)
        futures = [pool.submit(_slow, client, xs[i], i) for i in range(N_SLOW)]
        deadline = time.monotonic() + 30
        while served.metrics()[("xai_serve_inflight", frozenset())] < N_SLOW:
            assert time.monotonic() < deadline, f"requests never in flight:\n{served.log}"
            assert not any(f.done() for f in futures), [f.result() for f in futures if f.done()]
            time.sleep(0.02)
        sigterm_at = time.monotonic()
        served.proc.send_signal(signal.SIGTERM)

        # New calls are refused while the old ones drain: on the open channel, and on a new one.
        served.wait_not_serving()
        assert served.proc.poll() is None, "exited before the in-flight requests finished"
        assert not any(f.done() for f in futures), "the slow requests were not slow enough"
        with pytest.raises(RemoteUnavailable):
            client.explain(xs[0], model=MODEL, method="gradcam", timeout=10)
        with Client(served.address, timeout=10) as fresh, pytest.raises(RemoteUnavailable):
            fresh.list_models()

        outcomes = [f.result(timeout=GRACE_S + 30) for f in futures]
        pool.shutdown()
        code = served.proc.wait(GRACE_S + 30)
        exited_after = time.monotonic() - sigterm_at

    for i, (result, done_at) in enumerate(outcomes):
        assert isinstance(result, RemoteExplanation), result
        assert done_at > sigterm_at
        assert (result.method, result.seed, result.samples) == ("lime", i, SLOW["samples"])
        assert result.map.shape == (64, 64) and bool(torch.isfinite(result.map).all())
    # the first one, recomputed here: the drained answer is the real one
    ref = xai_serve.explain(module, xs[:1], "lime", seed=0, samples=SLOW["samples"])
    torch.testing.assert_close(outcomes[0][0].map, ref.maps[0], rtol=1e-3, atol=1e-4)

    assert_drained(served, code, exited_after)
    with socket.socket() as s:  # the port is closed
        assert s.connect_ex(("127.0.0.1", served.port)) != 0


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``xai-serve ARGS`` (the console script's entry point, through ``python -m``)."""
    env = {k: v for k, v in os.environ.items() if k != "XAI_SERVE_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "xai_serve.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_model_that_fails_to_load_exits_non_zero(tmp_path: Path, kind: str) -> None:
    (tmp_path / "models").mkdir()
    path = tmp_path / "models" / "weights.pt"
    if kind == "corrupt":
        path.write_bytes(b"this is not a state dict")
    cfg = write_config(tmp_path, free_port(), free_port(), model='path = "models/weights.pt"')
    proc = _cli("serve", "--config", str(cfg), "--no-warmup", cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 2, out
    assert f"model '{MODEL}' failed to load: " in errors[0], out
    assert str(path) in errors[0], out
    if kind == "missing":
        assert "NotFound" in errors[0] and "no such file" in errors[0], out
        assert "Traceback" not in out, out
    assert "not all models loaded; shutting down" in errors[1], out


def test_corrupt_weights_are_invalid_input(tmp_path: Path) -> None:
    from tests.serving.harness import tiny_config
    from xai_serve.errors import InvalidInput
    from xai_serve.models import load_model

    path = tmp_path / "weights.pt"
    path.write_bytes(b"this is not a state dict")
    with pytest.raises(InvalidInput, match="could not be read as a PyTorch state dict"):
        load_model(tiny_config(path=str(path)))


@pytest.mark.parametrize("taken", ["port", "metrics_port"])
def test_port_in_use_exits_1_with_one_error_line(tmp_path: Path, taken: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        ports = {"port": free_port(), "metrics_port": free_port()}
        ports[taken] = busy.getsockname()[1]
        cfg = write_config(tmp_path, ports["port"], ports["metrics_port"], model="")
        proc = _cli("serve", "--config", str(cfg), "--no-warmup", cwd=tmp_path, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("xai-serve: error: ")]
    assert len(errors) == 1, out
    assert "cannot listen on" in errors[0], out
    if taken == "metrics_port":
        assert errors[0].startswith("xai-serve: error: metrics_port: "), out
    assert f"127.0.0.1:{ports[taken]}" in errors[0], out
    assert "Traceback" not in out, out


def test_config_error_exits_2_with_one_error_line(tmp_path: Path, weights: Path) -> None:
    """A model file outside ``model_dirs`` is a config error: refused before anything is
    loaded or bound."""
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.move(weights, other / weights.name)
    cfg = write_config(tmp_path, free_port(), free_port(), model='path = "elsewhere/resnet18.pt"')
    proc = _cli("serve", "--config", str(cfg), cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("xai-serve: error: "), proc.stderr
    assert "not inside any of model_dirs" in lines[0]
    assert str(other / weights.name) in lines[0]


def test_version() -> None:
    expected = f"xai-serve {xai_serve.__version__}"
    proc = _cli("--version", cwd=Path.cwd(), timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, expected), proc.stderr


def test_console_script_version() -> None:
    script = Path(sys.executable).with_name("xai-serve")
    if not script.exists():
        pytest.skip(
            f"console script {script} is not installed (the editable install predates "
            "[project.scripts]; reinstalling rebuilds the C++ extension)"
        )
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip()) == (0, f"xai-serve {xai_serve.__version__}")


def test_sigterm_while_loading_stops_cleanly(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """SIGTERM before the models are ready: ``serve`` stops (exit code 0) and the model that
    finishes loading afterwards is never registered on the closing server."""
    import threading

    from tests.serving.harness import tiny_config, tiny_model
    from xai_serve.serving import server as server_mod
    from xai_serve.serving.config import ServerConfig

    model = tiny_model(MODEL)
    release = threading.Event()
    loading = threading.Event()
    built: list[Any] = []

    def slow_load(cfg: Any, *, allowed_dirs: Any = None) -> Any:
        loading.set()
        release.wait(30)
        return model

    def build(config: ServerConfig, models: Any = None) -> Any:
        built.append(server_mod.XaiServer(config, models))
        return built[-1]

    monkeypatch.setattr(server_mod, "load_model", slow_load)
    monkeypatch.setattr(server_mod, "build_server", build)

    def signal_then_release() -> None:
        assert loading.wait(30)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        release.set()

    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, grace_s=5, models=(tiny_config(),))
    helper = threading.Thread(target=signal_then_release, daemon=True)
    helper.start()
    caplog.set_level("INFO", logger="xai_serve.serving")
    try:
        assert server_mod.serve(cfg) == 0
    finally:
        release.set()
        helper.join(10)
    [server] = built
    assert server.state.models == {} and server.state.batchers == {}
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("shutting down: draining") for m in messages), messages
    assert messages[-1] == "stopped", messages
    assert not any(m.startswith("ready:") for m in messages), messages
