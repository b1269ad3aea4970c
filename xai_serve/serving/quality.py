"""Explanation quality on the server: the ``Evaluate`` RPC's work, the figures an ``Explain``
request asks for (``ExplainRequest.quality``) and the sampled quality of live answers.

All of it runs on the model's device worker (:class:`~xai_serve.serving.batcher.DeviceWorkers`,
one thread per device), the thread that computes the batches, so quality work never overlaps an
explanation on the same model (whose hooks are per call). A long evaluation does not hold the
device: it runs as a sequence of short tasks, one group of at most ``max_batch_size`` inputs
each, and the thread takes its tasks in arrival order, so a batch of explanations that becomes
ready while an evaluation runs waits for one group at most, never for the whole evaluation.
Cancellation and the deadline are checked between groups and at every progress report inside
one.

The metrics themselves are the library's (:mod:`xai_serve.explainers.evaluation`); this module
only groups the inputs, reports progress and turns the figures into plain floats.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from xai_serve.errors import InvalidInput, XaiServeError
from xai_serve.explainers.evaluation import DEFAULT_METRICS, evaluate, metric_info, metric_names
from xai_serve.serving.engine import DeadlineExceeded, ExplainJob, ExplainResult
from xai_serve.serving.state import ServerState

__all__ = [
    "Cancelled",
    "EvaluationWork",
    "ProgressThrottle",
    "check_metrics",
    "check_supported",
    "measure_answer",
    "run_evaluation",
    "sample_answer",
]

log = logging.getLogger("xai_serve.serving")

Report = Callable[[float, str], None]
"""``report(fraction done in [0, 1], stage)``, called on the event loop."""


class ProgressThrottle:
    """``report(fraction, stage)`` passed on to ``send`` when the fraction moved by ``step``
    or more, reached 1 or the stage changed (a stage starts where the one before ended, so the
    fraction alone would hide its start: a slow first step would show the old stage's name);
    the fraction passed on never falls."""

    def __init__(self, send: Report, step: float = 0.01) -> None:
        self._send = send
        self._step = step
        self._fraction = -1.0
        self._stage: str | None = None

    def __call__(self, fraction: float, stage: str) -> None:
        if fraction >= self._fraction + self._step or fraction >= 1.0 or stage != self._stage:
            self._fraction = max(fraction, self._fraction)
            self._stage = stage
            self._send(self._fraction, stage)


class Cancelled(XaiServeError):
    """The caller went away (or the server is stopping): the evaluation stopped early."""


def check_metrics(
    names: Sequence[str], method: str, field_name: str, *, default: bool = False
) -> tuple[str, ...]:
    """``names`` (distinct known metric names) as a tuple; InvalidInput naming ``field_name``
    otherwise. With ``default`` and no names: the library's default metrics that can score
    ``method``. Whether a named metric suits the method is :func:`evaluate`'s check."""
    known = metric_names()
    seen: list[str] = []
    for name in names:
        if name not in known:
            raise InvalidInput(
                f"{field_name}: unknown metric {name!r}; known metrics: {', '.join(known)}"
            )
        if name in seen:
            raise InvalidInput(f"{field_name}: metric {name!r} is named twice")
        seen.append(name)
    if not seen and default:
        infos = metric_info()
        seen = [
            n
            for n in DEFAULT_METRICS
            if infos[n].unsupported(method, infos[n].settings, {}) is None
        ]
    return tuple(seen)


def check_supported(metrics: Sequence[str], method: str, options: Mapping[str, object]) -> None:
    """InvalidInput (naming metric, method and reason) for a metric that cannot score
    ``method`` with these options, before any work starts."""
    infos = metric_info()
    for name in metrics:
        reason = infos[name].unsupported(method, infos[name].settings, options)
        if reason:
            raise InvalidInput(f"metric {name!r} cannot score method {method!r}: {reason}")


@dataclass
class EvaluationWork:
    """One Evaluate request, validated: a job per input (method, layer, options and target
    checked by :func:`~xai_serve.serving.jobs.build_job`), and the metrics (empty: every
    metric the method supports)."""

    request_id: str
    jobs: list[ExplainJob]
    metrics: tuple[str, ...]
    deadline: float | None = None
    cancelled: bool = False
    targets: list[int] = field(default_factory=list)


def _method_args(job: ExplainJob, seed: int | None) -> tuple[dict[str, object], int]:
    """``(options, seed)`` for :func:`evaluate` from ``job``: its method options and baseline,
    and ``seed`` (the answer's, or for Evaluate the client's, default 0). The model's tuned
    forward path is not used: a compiled forward holds the served weights, which the
    randomisation metric must not see."""
    options: dict[str, object] = dict(job.options)
    if job.baseline is not None:
        options["baseline"] = job.baseline
    if seed is None:
        seed = 0 if job.fresh_seed or job.seed is None else job.seed
    return options, seed


def _groups(jobs: list[ExplainJob], size: int) -> list[list[int]]:
    """Indices of ``jobs`` in groups of at most ``size``, each of jobs that all give a target
    or all ask for the model's top-1 (one ``target`` argument per call)."""
    given = [i for i, j in enumerate(jobs) if j.target is not None]
    top1 = [i for i, j in enumerate(jobs) if j.target is None]
    return [part[k : k + size] for part in (given, top1) for k in range(0, len(part), size)]


def _evaluate_group(
    work: EvaluationWork, index: list[int], report: Callable[[float, str], None]
) -> tuple[dict[str, list[float]], list[int]]:
    """Evaluate the inputs ``index`` of ``work`` (on the device worker thread)."""
    jobs = [work.jobs[i] for i in index]
    first = jobs[0]
    model = first.model
    images = torch.stack([j.image for j in jobs]).to(model.device)
    target = None
    if first.target is not None:
        target = torch.tensor([j.target for j in jobs], device=model.device)

    def progress(fraction: float, stage: str) -> None:
        if work.cancelled:
            raise Cancelled(f"evaluation {work.request_id!r} was cancelled")
        if work.deadline is not None and time.monotonic() >= work.deadline:
            raise DeadlineExceeded(f"evaluation {work.request_id!r}: the deadline passed")
        report(fraction, stage)

    options, seed = _method_args(first, None)
    result = evaluate(
        model.module,
        images,
        first.method,
        work.metrics,
        target=target,
        layer=first.layer,
        seed=seed,
        options=options,
        progress=progress,
    )
    values = {name: [float(v) for v in t.tolist()] for name, t in result.metrics.items()}
    return values, [int(t) for t in result.targets.tolist()]


async def run_evaluation(
    state: ServerState, work: EvaluationWork, report: Report
) -> tuple[dict[str, list[float]], list[int]]:
    """Evaluate every input of ``work``, group by group on the model's device worker;
    ``report`` gets the progress on the event loop. Returns ``(metric -> one value per input
    in request order, the class explained for each input)``."""
    model = work.jobs[0].model
    executor = state.workers.get(model.worker)
    loop = asyncio.get_running_loop()
    total = len(work.jobs)
    values: dict[str, list[float]] = {}
    targets: list[int | None] = [None] * total
    done = 0
    groups = _groups(work.jobs, max(1, model.max_batch_size))
    for index in groups:
        if work.cancelled:
            raise Cancelled(f"evaluation {work.request_id!r} was cancelled")
        if work.deadline is not None and time.monotonic() >= work.deadline:
            raise DeadlineExceeded(f"evaluation {work.request_id!r}: the deadline passed")
        start = done

        def inside(fraction: float, stage: str, start: int = start, n: int = len(index)) -> None:
            f = (start + min(max(fraction, 0.0), 1.0) * n) / total
            loop.call_soon_threadsafe(report, f, stage)

        part, part_targets = await loop.run_in_executor(
            executor, _evaluate_group, work, index, inside
        )
        for name, vals in part.items():
            column = values.setdefault(name, [math.nan] * total)
            for i, v in zip(index, vals, strict=True):
                column[i] = v
        for i, t in zip(index, part_targets, strict=True):
            targets[i] = t
        done += len(index)
        report(done / total, "done" if done == total else "evaluate")
    return values, [int(t) for t in targets if t is not None]


def _measure(job: ExplainJob, result: ExplainResult, metrics: tuple[str, ...]) -> dict[str, float]:
    model = job.model
    images = job.image[None].to(model.device)
    maps = result.map[None].to(model.device)
    target = torch.tensor([result.target], device=model.device)
    options, seed = _method_args(job, result.seed if result.seed is not None else 0)
    out = evaluate(
        model.module,
        images,
        job.method,
        metrics,
        target=target,
        layer=result.layer or job.layer,
        seed=seed,
        maps=maps,
        options=options,
    )
    return {name: float(t[0]) for name, t in out.metrics.items()}


async def measure_answer(
    state: ServerState, job: ExplainJob, result: ExplainResult, metrics: tuple[str, ...]
) -> dict[str, float]:
    """The quality figures ``metrics`` of one answer's map (on the model's device worker)."""
    executor = state.workers.get(job.model.worker)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, _measure, job, result, metrics)


def sample_answer(state: ServerState, job: ExplainJob, result: ExplainResult) -> None:
    """With quality sampling on (``[quality] sample_rate``), measure a share of the answers
    after they are sent and record the figures in the quality histogram; a background task
    whose failure is logged, never raised (the answer has gone already)."""
    config = state.quality
    if not config.enabled or result.per_target or result.partial:
        return
    if random.random() >= config.sample_rate:
        return

    async def measure() -> None:
        try:
            figures = await measure_answer(state, job, result, config.metrics)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a metric that does not suit the method, a failure, ...
            log.debug("quality sample of %r not measured: %s", job.request_id, exc)
            return
        for name, value in figures.items():
            if math.isfinite(value):
                state.metrics.observe_quality(job.model.name, job.method, name, value)

    state.background(measure())
