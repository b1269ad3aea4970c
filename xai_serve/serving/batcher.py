"""Cross-request dynamic batching.

One :class:`ModelBatcher` per model holds the waiting jobs in arrival order. Its loop takes the
oldest job, waits until ``max_batch_size`` jobs with the same :meth:`ExplainJob.batch_key` are
waiting or the oldest has waited ``max_delay_ms``, and hands up to ``max_batch_size`` of them to
the model's device worker (:class:`DeviceWorkers`: one thread per device, so explanations on one
device never overlap and a model's hooks are never used from two threads) while the event loop
keeps accepting. A batch that is computing lets the next one fill up, so under load batches
grow without any extra delay.

Cancelled jobs leave the queue at once; jobs whose deadline passed are answered
DEADLINE_EXCEEDED and never computed. If a batch of several jobs fails, it is split in two halves
and each half is retried, recursively, down to single jobs (jobs cancelled or expired meanwhile
are dropped before each retry). So a batch too large for the device's memory shrinks until its
parts fit, and an input that makes the model raise fails only its own request, found in about
``2 * log2(batch size)`` retries. A single job that still runs out of memory is answered
RESOURCE_EXHAUSTED; any other error of a single job is raised as it is (INTERNAL, logged with
the request id and traceback, unless it is one of the domain errors).

A batch of ``n`` jobs that runs out of memory also caps batches of that kind (the same
:meth:`ExplainJob.batch_key`: method, layer, options) at ``n // 2`` for ``oom_memory_s``
(60 s) after the last such failure: the retries of the rest of that batch and the batches
taken next are cut to the cap up front instead of each running out of memory again. Then full
batches are tried again, since memory that other work held may have been freed.

With an :class:`~xai_serve.serving.cache.AnswerCache`, :meth:`ModelBatcher.submit` first looks
the job up: a hit is answered at once, without a queue slot (so even while the queue is full),
and an exact answer computed for a miss is kept for the next identical request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from xai_serve.errors import ResourceExhausted
from xai_serve.serving.cache import AnswerCache
from xai_serve.serving.engine import DeadlineExceeded, ExplainJob, ExplainResult, run_batch

__all__ = [
    "DeadlineExceeded",
    "DeviceWorkers",
    "ModelBatcher",
    "is_out_of_memory",
    "set_torch_threads",
]

log = logging.getLogger("xai_serve.serving")


_OOM_MESSAGES = (
    "out of memory",
    "can't allocate memory",
    "cannot allocate memory",
    "alloc_failed",  # CUBLAS_STATUS_ALLOC_FAILED, CUSOLVER_STATUS_ALLOC_FAILED
)
_OOM_TYPES: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),
    MemoryError,
)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors of a device (or host) allocator that ran out of memory:
    ``torch.OutOfMemoryError`` (CUDA, MPS), the CPU allocator's ``RuntimeError`` ("can't
    allocate memory"), cuDNN/cuBLAS allocation failures, and Python's ``MemoryError``."""
    if isinstance(exc, _OOM_TYPES):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def _release_cached_memory(jobs: Sequence[ExplainJob]) -> None:
    """After an out-of-memory error on a CUDA model: return the allocator's cached blocks, so
    the retried halves find the memory the failed batch left behind."""
    device = jobs[0].model.device if jobs else None
    if isinstance(device, torch.device) and device.type == "cuda":
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()


def _ids(jobs: Sequence[ExplainJob], at_most: int = 8) -> str:
    """The request ids of ``jobs`` for a log line (the first ``at_most``)."""
    ids = ", ".join(repr(j.request_id) for j in jobs[:at_most])
    return ids + (f", ... ({len(jobs)} in all)" if len(jobs) > at_most else "")


_PER_THREAD_THREADS = "parallel backend: OpenMP" in torch.__config__.parallel_info()


def set_torch_threads(count: int) -> None:
    """Give the calling thread ``count`` intra-op threads for torch's CPU ops.

    With ATen's OpenMP backend the count is a per-thread setting, and it matters: every OS
    thread that runs a parallel torch op gets its own OpenMP team, whose idle workers spin
    between regions. On a machine with few cores, the teams of the event loop and the decode
    pool (small ops on each request) then take cores from the device worker: on 2 cores a
    batch-1 Grad-CAM took twice as long. So the server gives the device workers the process's
    thread count and every other thread that touches torch one thread (no team). With another
    parallel backend the setting is process-wide and this does nothing."""
    if _PER_THREAD_THREADS:
        # a thread's first ATen call sets its team size to the count some thread set last;
        # make that happen now, so that it cannot undo the count set here later
        torch.get_num_threads()
        torch.set_num_threads(count)


class DeviceWorkers:
    """One single-thread executor per worker name: a device ("cpu", "cuda:0", ...), with the
    intra-op thread count the process had when this was made (see :func:`set_torch_threads`),
    or ``"remote:<model>"`` (:attr:`LoadedModel.worker`), with one intra-op thread: its work
    here is building perturbed batches while it waits for another server's forwards, and a
    second full OpenMP team would slow the device worker's forwards down."""

    def __init__(self, threads: int | None = None) -> None:
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self.threads = threads if threads is not None else torch.get_num_threads()

    def get(self, device: str) -> ThreadPoolExecutor:
        if device not in self._pools:
            self._pools[device] = ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix=f"xai-serve-{device}",
                initializer=set_torch_threads,
                initargs=(1 if device.startswith("remote:") else self.threads,),
            )
        return self._pools[device]

    def shutdown(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        self._pools.clear()


class ModelBatcher:
    """Batches the jobs of one model; see the module doc."""

    def __init__(
        self,
        name: str,
        executor: ThreadPoolExecutor,
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        on_batch: Callable[[str, int], None] | None = None,
        on_queue: Callable[[int], None] | None = None,
        compute: Callable[[list[ExplainJob]], Sequence[ExplainResult | BaseException]] = run_batch,
        cache: AnswerCache | None = None,
    ) -> None:
        self.name = name
        self.executor = executor
        self.max_batch_size = max(1, max_batch_size)
        self.max_delay = max(0.0, max_delay_ms) / 1e3
        self.max_queue = max_queue
        self._on_batch = on_batch
        self._on_queue = on_queue
        self._compute = compute
        self.cache = cache
        self._queue: deque[tuple[ExplainJob, asyncio.Future[ExplainResult]]] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        # batch key -> (largest batch to try, monotonic time of the out-of-memory that set it);
        # written by the device worker, read by the loop
        self.oom_memory_s = 60.0
        self._oom_caps: dict[tuple[object, ...], tuple[int, float]] = {}
        self._caps_lock = threading.Lock()

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def close(self) -> None:
        """Stop the loop; waiting jobs fail with UNAVAILABLE-like errors (none should be left
        after a drain)."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue:
            _, fut = self._queue.popleft()
            if not fut.done():
                fut.cancel()

    @property
    def depth(self) -> int:
        return len(self._queue)

    def batch_limit(self, key: tuple[object, ...]) -> int:
        """The largest batch of jobs with this key to compute now: ``max_batch_size``, or less
        for ``oom_memory_s`` after a batch of them ran out of memory."""
        with self._caps_lock:
            cap = self._oom_caps.get(key)
            if cap is None:
                return self.max_batch_size
            if time.monotonic() - cap[1] >= self.oom_memory_s:
                del self._oom_caps[key]
                log.info(
                    "model %r: trying batches of up to %d %s jobs again (%.0f s after running "
                    "out of memory)",
                    self.name,
                    self.max_batch_size,
                    key[0],
                    self.oom_memory_s,
                )
                return self.max_batch_size
            return min(cap[0], self.max_batch_size)

    def _lower_limit(self, key: tuple[object, ...], failed_size: int) -> None:
        """A batch of ``failed_size`` (> 1) jobs with this key ran out of memory."""
        limit = max(1, failed_size // 2)
        with self._caps_lock:
            old = self._oom_caps.get(key)
            if old is not None and old[0] <= limit:
                self._oom_caps[key] = (old[0], time.monotonic())
                return
            self._oom_caps[key] = (limit, time.monotonic())
        log.warning(
            "model %r: a batch of %d %s jobs ran out of memory; batches of them are capped at "
            "%d for %.0f s",
            self.name,
            failed_size,
            key[0],
            limit,
            self.oom_memory_s,
        )

    async def submit(self, job: ExplainJob) -> ExplainResult:
        """The cached answer to ``job``, or queue it and wait for its result (then cache it
        when it is exact). Raises ResourceExhausted when the queue is full; cancelling the
        awaiting task takes the job out of the queue."""
        cache = self.cache
        key = cache.key(job) if cache is not None else None
        if cache is None or key is None:
            return await self._queued(job)
        cached = cache.get(key, job)
        if cached is not None:
            return cached
        result = await self._queued(job)
        cache.put(key, result)
        return result

    async def _queued(self, job: ExplainJob) -> ExplainResult:
        """Queue ``job`` and wait for its result (see :meth:`submit`)."""
        if len(self._queue) >= self.max_queue:
            raise ResourceExhausted(
                f"model {self.name!r} has {len(self._queue)} requests waiting "
                f"(max_queue={self.max_queue}); retry later"
            )
        fut: asyncio.Future[ExplainResult] = asyncio.get_running_loop().create_future()
        entry = (job, fut)
        self._queue.append(entry)
        self._queue_changed()
        self._wake.set()
        try:
            return await fut
        except asyncio.CancelledError:
            job.cancelled = True
            try:
                self._queue.remove(entry)
                self._queue_changed()
            except ValueError:
                pass  # already taken into a batch: its result is dropped
            raise

    # ------------------------------------------------------------------ loop

    def _queue_changed(self) -> None:
        if self._on_queue is not None:
            self._on_queue(len(self._queue))

    def _take(self) -> list[tuple[ExplainJob, asyncio.Future[ExplainResult]]]:
        """Up to :meth:`batch_limit` waiting entries with the oldest entry's key, in order."""
        key = self._queue[0][0].batch_key()
        limit = self.batch_limit(key)
        batch = []
        kept: deque[tuple[ExplainJob, asyncio.Future[ExplainResult]]] = deque()
        while self._queue:
            entry = self._queue.popleft()
            if len(batch) < limit and entry[0].batch_key() == key:
                batch.append(entry)
            else:
                kept.append(entry)
        self._queue = kept
        self._queue_changed()
        return batch

    def _ready_count(self) -> tuple[int, int]:
        """How many waiting jobs share the oldest one's key, and the batch limit for them."""
        key = self._queue[0][0].batch_key()
        return sum(1 for job, _ in self._queue if job.batch_key() == key), self.batch_limit(key)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            oldest = self._queue[0][0]
            wait = oldest.arrival + self.max_delay - time.monotonic()
            ready, limit = self._ready_count()
            if wait > 0 and ready < limit:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                continue
            batch = self._live(self._take())
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            if self._on_batch is not None:
                self._on_batch(jobs[0].method, len(jobs))
            try:
                outcomes = await loop.run_in_executor(self.executor, self._compute_safely, jobs)
            except asyncio.CancelledError:
                for _, fut in batch:
                    fut.cancel()
                raise
            except Exception as exc:  # e.g. the executor was shut down: fail this batch only
                outcomes = [exc] * len(batch)
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if fut.done():
                    continue
                if isinstance(outcome, BaseException):
                    fut.set_exception(outcome)
                else:
                    fut.set_result(outcome)

    def _live(self, batch: list[tuple[ExplainJob, asyncio.Future[ExplainResult]]]):
        """Drop cancelled entries; fail expired ones without computing them."""
        now = time.monotonic()
        live = []
        for job, fut in batch:
            if job.cancelled or fut.done():
                continue
            if job.expired(now):
                fut.set_exception(
                    DeadlineExceeded(f"request {job.request_id!r}: deadline passed in the queue")
                )
                continue
            live.append((job, fut))
        return live

    def _compute_checked(self, jobs: list[ExplainJob]) -> list[ExplainResult | BaseException]:
        """``compute(jobs)``: one result per job, or an exception for a job that failed on its
        own (the others' results stand)."""
        results = list(self._compute(jobs))
        if len(results) != len(jobs):
            raise RuntimeError(f"compute returned {len(results)} results for {len(jobs)} jobs")
        return results

    def _compute_safely(self, jobs: list[ExplainJob]) -> list[ExplainResult | BaseException]:
        """``compute(jobs)``, splitting a failed batch in halves (see the module doc): one
        result or exception per job, in order. Never raises (an exception escaping here would
        end the batching loop and hang the model)."""
        out: list[ExplainResult | BaseException | None] = [None] * len(jobs)
        self._bisect(jobs, list(range(len(jobs))), out, retry=False)
        return [
            o if o is not None else RuntimeError("job was not computed (batcher bug)") for o in out
        ]

    def _bisect(
        self,
        jobs: list[ExplainJob],
        index: list[int],
        out: list[ExplainResult | BaseException | None],
        *,
        retry: bool,
    ) -> None:
        """Compute ``jobs[i] for i in index`` into ``out[i]``; on failure of several, split."""
        if retry:  # drop what was cancelled or expired while the failed batch computed
            live = []
            for i in index:
                job = jobs[i]
                if job.cancelled:
                    out[i] = asyncio.CancelledError()
                elif job.expired():
                    out[i] = DeadlineExceeded(f"request {job.request_id!r}: deadline passed")
                else:
                    live.append(i)
            index = live
            if not index:
                return
            limit = self.batch_limit(jobs[index[0]].batch_key())
            if len(index) > limit:  # an out-of-memory meanwhile lowered the limit
                for at in range(0, len(index), limit):
                    self._bisect(jobs, index[at : at + limit], out, retry=False)
                return
        part = [jobs[i] for i in index]
        try:
            results = self._compute_checked(part)
        except Exception as exc:
            oom = is_out_of_memory(exc)
            if len(part) == 1:
                out[index[0]] = self._single_failure(part[0], exc) if oom else exc
            else:
                log.warning(
                    "batch of %d %s jobs on %s failed (%s: %s); splitting it in two and "
                    "retrying each half; requests: %s",
                    len(part),
                    part[0].method,
                    self.name,
                    type(exc).__name__,
                    exc,
                    _ids(part),
                )
            # what follows runs after this block: `exc` (whose traceback holds the failed
            # batch's tensors) is released before the cache is emptied and the halves run
        else:
            for i, result in zip(index, results, strict=True):
                out[i] = result
            return
        if oom:
            _release_cached_memory(part)
            if len(part) > 1:
                self._lower_limit(part[0].batch_key(), len(part))
        if len(part) > 1:
            half = len(index) // 2
            self._bisect(jobs, index[:half], out, retry=True)
            self._bisect(jobs, index[half:], out, retry=True)

    def _single_failure(self, job: ExplainJob, exc: BaseException) -> ResourceExhausted:
        """The answer to one job that ran out of memory even alone."""
        log.warning(
            "request %r (%s on %s) ran out of memory alone: %s: %s",
            job.request_id,
            job.method,
            self.name,
            type(exc).__name__,
            exc,
        )
        return ResourceExhausted(
            f"request {job.request_id!r}: model {self.name!r} ran out of memory explaining "
            f"this one image with {job.method!r}; retry later, or with fewer samples/steps"
        )
