"""A server in this process, for a quick local measurement: :class:`LocalServer` runs
:func:`~xai_serve.serving.server.build_server` on its own event loop in a thread, on an
ephemeral loopback port, plaintext and without auth (the config's ``host``, ``port``,
``tls``, ``auth`` and ``metrics_port`` are replaced).

The load generator then shares this process with the server (and its interpreter lock), so a
separate ``xai-serve serve`` measured with ``--server`` gives the cleaner figures.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Sequence

from xai_serve.errors import Unavailable
from xai_serve.models import LoadedModel
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.server import XaiServer, build_server

__all__ = ["LocalServer"]


class LocalServer:
    """``with LocalServer(config) as server: server.address``; the models of ``config`` are
    loaded (and warmed, if the config says so) before ``__enter__`` returns, or ``models``
    (already loaded) are served instead. Leaving the block stops the server."""

    def __init__(
        self,
        config: ServerConfig,
        models: Sequence[LoadedModel] | None = None,
        *,
        startup_timeout: float = 600.0,
    ) -> None:
        self.config = dataclasses.replace(
            config, host="127.0.0.1", port=0, tls=None, auth=None, metrics_port=None
        )
        self.models = list(models) if models is not None else None
        self.startup_timeout = startup_timeout
        self.server: XaiServer | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-server")
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self.server = build_server(self.config, self.models)
            self._loop.run_until_complete(self.server.start())
        except BaseException as exc:  # handed to the thread that waits in start()
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()

    @property
    def address(self) -> str:
        if self.server is None:
            raise Unavailable("the local server is not started")
        return self.server.address

    def start(self) -> LocalServer:
        self._thread.start()
        if not self._started.wait(self.startup_timeout):
            raise Unavailable(f"the local server did not start in {self.startup_timeout:g} s")
        if self._error is not None:
            raise self._error
        assert self.server is not None
        failed = self.server.state.failed
        if failed:
            self.stop()
            reasons = "; ".join(f"{name}: {why}" for name, why in failed.items())
            raise Unavailable(f"the local server could not load its models: {reasons}")
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None and self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop)
            future.result(grace + 30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
