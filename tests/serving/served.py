"""The server command line in its own process, as an operator runs it: a TOML config for a
small resnet18 on 64 x 64 inputs (``write_config``) and the process (``Served``), whose waits
fail the test with the server's log. Used by the lifecycle, scale-out and reliability tests."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from xai_serve.errors import Unavailable
from xai_serve.serving.process import ServerProcess

MODEL = "tiny"
GRACE_S = 10.0
START_TIMEOUT_S = 120.0


def write_config(d: Path, port: int, metrics_port: int, *, model: str) -> Path:
    """``d/server.toml`` serving ``MODEL`` on loopback; ``model`` adds lines to its table
    (e.g. its weights ``path``, which must lie in ``d/models``)."""
    cfg = d / "server.toml"
    cfg.write_text(
        f"""\
host = "127.0.0.1"
port = {port}
metrics_port = {metrics_port}
grace_s = {GRACE_S}
model_dirs = ["models"]  # relative to this file

[[models]]
name = "{MODEL}"
source = "torchvision"
arch = "resnet18"
num_classes = 10
max_delay_ms = 20
tune = false  # tuning has its own tests (a first start would measure paths for a minute)
transform = {{ resize = 64, crop = [64, 64] }}
{model}
"""
    )
    return cfg


class Served(ServerProcess):
    """A ``python -m xai_serve.serving --config FILE`` process (started), its log in a file;
    waits fail the test with the log."""

    def __init__(self, d: Path, cfg: Path, port: int, metrics_port: int) -> None:
        env = dict(os.environ)
        env.pop("XAI_SERVE_CONFIG", None)
        super().__init__(
            ["--config", str(cfg)], port=port, log=d / "server.log", env=env, cwd=d, grace=GRACE_S
        )
        self.metrics_port = metrics_port
        self.start()

    def wait_serving(self) -> None:
        """Poll health until SERVING; fail with the log if the process exits or takes too
        long."""
        try:
            self.wait_ready(START_TIMEOUT_S)
        except Unavailable as exc:
            pytest.fail(str(exc))

    def wait_not_serving(self, timeout: float = 10) -> float:
        """Poll health until it is no longer SERVING (or no longer answers): draining began."""
        try:
            return super().wait_not_serving(timeout)
        except Unavailable:
            pytest.fail(f"still SERVING {timeout} s after SIGTERM:\n{self.log}")

    def metrics(self) -> dict[str, Any]:
        """``{(sample name, frozenset(labels)): value}`` from GET /metrics."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = resp.read().decode()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def close(self) -> None:
        self.kill()


def assert_drained(served: ServerProcess, code: int | None, exited_after: float) -> None:
    """After SIGTERM: the process exited 0 within its grace period, its log says it drained and
    stopped, and it holds no traceback."""
    log = served.log
    assert code == 0, log
    assert exited_after < served.grace, (exited_after, log)
    assert f"shutting down: draining in-flight requests (grace {served.grace:.1f} s)" in log, log
    assert log.rstrip().endswith("stopped"), log
    assert "Traceback" not in log, log
