"""What the servicers share: the models (loading or ready), their batchers, the limits, the
thread pool that decodes images off the event loop, the metrics, the answer cache, the quality
sampling settings, the background tasks (sampled quality measurements) still running, and the
concept workers (the threads that run TCAV, dissection and feature visualisation, apart from the
device workers: :mod:`xai_serve.serving.concepts`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from xai_serve.errors import NotFound, Unavailable
from xai_serve.models import LoadedModel
from xai_serve.serving.batcher import DeviceWorkers, ModelBatcher, set_torch_threads
from xai_serve.serving.cache import AnswerCache
from xai_serve.serving.config import CacheConfig, ConceptsConfig, LimitsConfig, QualityConfig
from xai_serve.serving.metrics import Metrics

__all__ = ["ServerState"]

log = logging.getLogger("xai_serve.serving")

T = TypeVar("T")


def _start_threads(pool: ThreadPoolExecutor, n: int) -> None:
    """Start all ``n`` threads of ``pool`` now. A ThreadPoolExecutor adds a thread only when
    work arrives while every thread it has is busy, so without this the server's thread count
    would depend on how its traffic so far happened to overlap (and a later overlap would look
    like a leaked thread)."""
    barrier = threading.Barrier(n)
    for future in [pool.submit(barrier.wait, 10.0) for _ in range(n)]:
        future.result()


class ServerState:
    """Models by name, in three states: configured (loading), ready, failed. ``cache`` is the
    answer cache every model's batcher shares (None when ``cache_config`` turns it off)."""

    def __init__(
        self,
        names: list[str],
        limits: LimitsConfig,
        metrics: Metrics,
        cache_config: CacheConfig | None = None,
        quality: QualityConfig | None = None,
        concepts: ConceptsConfig | None = None,
    ) -> None:
        self.names = list(names)
        self.limits = limits
        self.metrics = metrics
        self.quality = quality if quality is not None else QualityConfig()
        self.concepts = concepts if concepts is not None else ConceptsConfig()
        self._background: set[asyncio.Task[None]] = set()
        self.cache: AnswerCache | None = None
        if cache_config is not None and cache_config.enabled:
            self.cache = AnswerCache(cache_config.max_bytes, metrics)
        self.models: dict[str, LoadedModel] = {}
        self.failed: dict[str, str] = {}
        self.batchers: dict[str, ModelBatcher] = {}
        self.workers = DeviceWorkers()
        self.cpu_pool = ThreadPoolExecutor(
            max_workers=2,
            thread_name_prefix="xai-serve-decode",
            initializer=set_torch_threads,
            initargs=(1,),
        )
        _start_threads(self.cpu_pool, 2)
        # concept jobs: max_jobs threads of their own, never the device workers' (see
        # xai_serve.serving.concepts); on the CPU with fewer intra-op threads than those
        threads = self.concepts.threads or max(1, self.workers.threads // 2)
        self.concept_pool = ThreadPoolExecutor(
            max_workers=self.concepts.max_jobs,
            thread_name_prefix="xai-serve-concepts",
            initializer=set_torch_threads,
            initargs=(threads,),
        )
        self.draining = False

    def add_model(self, model: LoadedModel, *, max_queue: int) -> None:
        """Register a loaded (and warmed) model and start its batcher (on the running loop).
        With a cache, the model's weights digest is computed here unless its load already
        did (:meth:`AnswerCache.prepare`, best done on the device thread)."""
        cfg = model.config
        if self.cache is not None:
            self.cache.prepare(model)
        batcher = ModelBatcher(
            model.name,
            self.workers.get(model.worker),
            max_batch_size=model.max_batch_size,
            max_delay_ms=cfg.max_delay_ms,
            max_queue=max_queue,
            on_batch=lambda method, size, name=model.name: self.metrics.observe_batch(
                name, method, size
            ),
            on_queue=lambda depth, name=model.name: self.metrics.set_queue_depth(name, depth),
            cache=self.cache,
        )
        batcher.start()
        self.models[model.name] = model
        self.batchers[model.name] = batcher

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self.models) and len(self.models) == len(self.names)

    def model(self, name: str, *, field: str = "model") -> LoadedModel:
        """The ready model ``name``; NotFound for an unknown name, Unavailable while it loads."""
        if name in self.models:
            if self.draining:
                raise Unavailable("the server is shutting down")
            return self.models[name]
        if name in self.failed:
            raise Unavailable(f"model {name!r} failed to load: {self.failed[name]}")
        if name in self.names:
            raise Unavailable(f"model {name!r} is still loading; retry shortly")
        known = ", ".join(repr(n) for n in self.names) or "none"
        if not name:
            raise NotFound(f"`{field}` is required; this server has: {known}")
        raise NotFound(f"unknown {field} {name!r}; this server has: {known}")

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run CPU work (decoding, preprocessing) on the decode pool."""
        call = functools.partial(fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.cpu_pool, call)

    def background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task on the running loop that :meth:`close` cancels if it is
        still running (work done after an answer was sent, e.g. a quality sample)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        for batcher in self.batchers.values():
            await batcher.close()
        # joining the worker threads blocks: do it off the loop (a batch still computing after
        # the grace period finishes in its thread; nothing waits for it on the loop)
        await asyncio.to_thread(self.workers.shutdown)
        self.cpu_pool.shutdown(wait=False, cancel_futures=True)
        # a concept job still running stops at its next batch (its call was cancelled)
        self.concept_pool.shutdown(wait=False, cancel_futures=True)
