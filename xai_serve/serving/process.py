"""A server in a child process: start ``python -m xai_serve.serving``, wait until its health
check says ``SERVING``, stop it with SIGTERM.

Used by ``xai-serve demo``, the serving benchmark and the tests that need a real process
(signals, exit codes, memory). Every wait is bounded: a process that exits early or is not
ready in time is reported as :class:`~xai_serve.errors.Unavailable` with the end of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from xai_serve.errors import Unavailable

__all__ = ["ServerProcess", "free_port", "log_tail"]

_LOG_TAIL = 25


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def log_tail(path: Path, lines: int = _LOG_TAIL) -> str:
    """The last ``lines`` lines of a log file, indented (or a note that there is none)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "    (no log)"
    return "\n".join("    " + line for line in text[-lines:]) or "    (empty log)"


class ServerProcess:
    """``python -m xai_serve.serving ARGS`` with stdout and stderr in ``log``.

    ``port`` is where it will listen (pass the matching ``--port`` in ``args``, or a
    ``--config`` that sets it); ``host`` where to reach it. A context manager: leaving it
    always ends the process (:meth:`stop`).
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        port: int,
        log: Path,
        host: str = "127.0.0.1",
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        grace: float = 10.0,
    ) -> None:
        self.args = list(args)
        self.host, self.port = host, port
        self.log_path = Path(log)
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.grace = grace
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log(self) -> str:
        """The whole log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self.log_path.open("wb") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "xai_serve.serving", *self.args],
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
                env=env,
            )
        return self

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _health(self, timeout: float, until_serving: bool) -> float:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        assert self.proc is not None, "start() the process first"
        serving = health_pb2.HealthCheckResponse.SERVING
        start = time.monotonic()
        with grpc.insecure_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                code = self.proc.poll()
                elapsed = time.monotonic() - start
                if code is not None:
                    if not until_serving:
                        return elapsed
                    raise Unavailable(
                        f"the server exited with code {code} before it was ready; the end of "
                        f"{self.log_path}:\n{log_tail(self.log_path)}"
                    )
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if (reply.status == serving) == until_serving:
                        return elapsed
                except grpc.RpcError:
                    if not until_serving:
                        return elapsed
                if elapsed > timeout:
                    state = "ready" if until_serving else "draining"
                    raise Unavailable(
                        f"the server was not {state} after {timeout:g} s; the end of "
                        f"{self.log_path}:\n{log_tail(self.log_path)}"
                    )
                time.sleep(0.2 if until_serving else 0.01)

    def wait_ready(self, timeout: float = 300.0) -> float:
        """Seconds until the overall health (``""``) is SERVING; Unavailable, with the end of
        the log, if the process exits first or ``timeout`` passes."""
        return self._health(timeout, until_serving=True)

    def wait_not_serving(self, timeout: float = 10.0) -> float:
        """Seconds until health is no longer SERVING (or no longer answers): draining began."""
        return self._health(timeout, until_serving=False)

    def terminate(self) -> None:
        """Send SIGTERM (the server drains and exits)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """The exit code, waiting at most ``timeout`` seconds (TimeoutExpired after)."""
        assert self.proc is not None
        return int(self.proc.wait(timeout))

    def stop(self) -> int:
        """SIGTERM and wait, SIGKILL after ``grace`` + 20 s; the exit code (0 if never
        started)."""
        if self.proc is None:
            return 0
        self.terminate()
        try:
            self.proc.wait(self.grace + 20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return int(self.proc.returncode)

    def kill(self) -> None:
        """End the process now (SIGKILL), if it is still running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
