"""Domain objects of the server and the one function that computes a batch of them.

An :class:`ExplainJob` is one validated request, already decoded and preprocessed, in domain
terms (no protobuf here). :func:`run_batch` explains several jobs of one model that share a
:meth:`ExplainJob.batch_key` with ONE batched :func:`xai_serve.explain` call, one target per
job, and splits the result back into one :class:`ExplainResult` per job. It runs on the
model's device worker thread, never on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from xai_serve.errors import (
    BudgetTooSmall,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.explainers.base import Explanation, explain, get_method
from xai_serve.models import LoadedModel, call_scope

__all__ = [
    "LOGITS",
    "DeadlineExceeded",
    "ExplainJob",
    "ExplainResult",
    "TargetResult",
    "run_batch",
]

# Which methods take a layer, a seed or a baseline is read from each method's registered class
# (xai_serve.explainers.base.Explainer's traits), never listed here.


# What a deadline-derived budget keeps back for everything after the compute (copying the
# result off the device, the overlay, encoding, the network): this share of the time left,
# and at least DEADLINE_MARGIN_MS.
DEADLINE_MARGIN_SHARE = 0.05
DEADLINE_MARGIN_MS = 25.0

# The ``method`` of a job that asks for the model's logits only (the Open Inference Protocol's
# plain ModelInfer): one exact forward, no explanation, through the same batcher as every
# explanation (one queue limit, one out-of-memory policy, the same metrics).
LOGITS = "logits"


@dataclass(eq=False)
class ExplainJob:
    """One request for the batcher: everything :func:`run_batch` needs, validated.

    ``image`` is the preprocessed input ``Tensor[C, H, W]`` (CPU); ``view`` the uint8 RGB
    ``[3, H, W]`` to draw an overlay on (None when no overlay is wanted). ``options`` are the
    method's :func:`xai_serve.explain` options; ``baseline`` its ``baseline`` argument.
    ``deadline`` is a ``time.monotonic()`` instant or None. ``on_partial``, when set, receives
    the partial results of methods that refine in rounds (called on the device worker thread).
    ``fresh_seed``: the server drew ``seed`` because the client gave none; the answer is then
    meant to be a new random draw, so the answer cache neither serves nor keeps it.
    """

    request_id: str
    model: LoadedModel
    method: str
    image: Tensor
    view: Tensor | None = None
    target: int | None = None
    layer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    baseline: float | str | None = None
    seed: int | None = None
    want_map: bool = True
    want_overlay: bool = False
    top_k: int = 5
    deadline: float | None = None
    arrival: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    progress: bool = False
    on_partial: Callable[[ExplainResult], None] | None = None
    fresh_seed: bool = False
    targets: tuple[int, ...] | None = None  # several classes (one map each)
    top_labels: int | None = None  # the model's k most likely classes (one map each)
    foil: int | None = None  # each map explains score(target) - score(foil)

    @property
    def several(self) -> bool:
        """Several classes per image: the answer has one :class:`TargetResult` per class."""
        return bool(self.targets) or self.top_labels is not None

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with equal keys can share one batched explanation (targets, foils and seeds
        may differ: they are per image; how many classes each explains may not)."""
        return (
            self.method,
            self.layer,
            tuple(sorted(self.options.items())),
            self.baseline,
            len(self.targets) if self.targets else 0,
            self.top_labels,
            self.foil is not None,
        )

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.monotonic()) >= self.deadline


@dataclass
class TargetResult:
    """One class of an answer with several (:attr:`ExplainResult.per_target`)."""

    target: int
    map: Tensor  # float32 [H, W]
    overlay_png: bytes | None = None
    segment_weights: Tensor | None = None  # float32 [S]
    segment_stderr: Tensor | None = None  # float32 [S]
    intercept: float | None = None
    score: float | None = None


@dataclass
class ExplainResult:
    """The answer to one job (CPU tensors).

    ``exact``: the answer is a function of the request alone (model, input, method, options,
    target, seed), so the same request may be answered with it again. :func:`run_batch` sets
    it, and clears it for partial answers and for answers that a time budget (a ``budget_ms``
    option, or one a deadline set) cut short (:attr:`Explanation.budget_limited`): how much
    such a run got done depends on the machine's speed at that moment. Answers made elsewhere
    default to not exact.
    """

    request_id: str
    map: Tensor  # float32 [H, W]
    target: int
    logits: Tensor  # float32 [classes]
    layer: str | None = None
    overlay_png: bytes | None = None
    segments: Tensor | None = None  # int32 [H, W]
    segment_weights: Tensor | None = None  # float32 [S]
    intercept: float | None = None
    score: float | None = None
    seed: int | None = None
    samples: int = 0
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 1
    segment_stderr: Tensor | None = None  # float32 [S]
    partial: bool = False
    cache_hit: bool = False
    exact: bool = False
    # several classes (ExplainJob.several): one entry per class, in order; the fields above
    # (target, map, overlay, segment weights and errors, intercept, score) hold the first's
    per_target: list[TargetResult] | None = None
    foil: int | None = None

    def top_k(self, k: int) -> list[tuple[int, float, float]]:
        """``(class, probability, logit)`` of the ``k`` most likely classes."""
        k = min(k, self.logits.numel())
        if k <= 0:
            return []
        probs = torch.softmax(self.logits.double(), dim=0)
        values, index = probs.topk(k)
        return [
            (int(i), float(p), float(self.logits[i]))
            for p, i in zip(values.tolist(), index.tolist(), strict=True)
        ]


def _targets(jobs: list[ExplainJob], device: torch.device) -> Tensor | None:
    """The batch's ``target`` argument: ``[B, T]`` for several classes each, ``[B]`` for one
    each, None for the model's top-1 (or its top ``top_labels``)."""
    if jobs[0].targets:
        return torch.tensor([j.targets for j in jobs], dtype=torch.int64, device=device)
    if all(j.target is None for j in jobs):
        return None
    return torch.tensor([j.target for j in jobs], dtype=torch.int64, device=device)


def _foils(jobs: list[ExplainJob], device: torch.device) -> Tensor | None:
    if jobs[0].foil is None:
        return None
    return torch.tensor([j.foil for j in jobs], dtype=torch.int64, device=device)


def _gives_target(job: ExplainJob) -> bool:
    return job.target is not None or bool(job.targets)


def run_batch(jobs: list[ExplainJob]) -> list[ExplainResult | InvalidInput]:
    """Explain ``jobs`` (same model, same :meth:`ExplainJob.batch_key`) in one batched call.

    Jobs that give a target and jobs that ask for the model's top-1 are explained in two
    calls (each batched), since :func:`xai_serve.explain` takes one kind per call. A job whose
    logits, map or segment weights are not finite (an input far outside the model's range
    overflows its activations) gets an :class:`~xai_serve.errors.InvalidInput` in place of its
    result: a server never answers OK with NaNs, and the other jobs are not affected.
    """
    if not jobs:
        return []
    if jobs[0].method == LOGITS:
        return _logits(jobs)
    given = [j for j in jobs if _gives_target(j)]
    top1 = [j for j in jobs if not _gives_target(j)]
    if given and top1:
        out = {
            id(r_job): r
            for part in (given, top1)
            for r_job, r in zip(part, run_batch(part), strict=False)
        }
        return [out[id(j)] for j in jobs]

    first = jobs[0]
    model = first.model
    start = time.monotonic()
    images = torch.stack([j.image for j in jobs]).to(model.device, non_blocking=True)
    seeds = None
    if get_method(first.method).randomised:
        seeds = [j.seed if j.seed is not None else 0 for j in jobs]
    options, from_deadline = _budgeted(first, jobs, start)
    listeners = [(i, j.on_partial) for i, j in enumerate(jobs) if j.on_partial is not None]
    progress = None
    if listeners:

        def progress(partial: Explanation) -> None:
            for i, res in enumerate(
                _results(jobs, partial, seeds, start, partial=True, exact=False)
            ):
                callback = jobs[i].on_partial
                if callback is not None and isinstance(res, ExplainResult):
                    callback(res)

    try:
        with _remote_scope(jobs):
            expl = explain(
                model.module,
                images,
                first.method,
                target=_targets(jobs, model.device),
                top_labels=first.top_labels,
                foil=_foils(jobs, model.device),
                layer=first.layer,
                baseline=first.baseline,
                seed=seeds,
                path=model.path,
                progress=progress,
                **options,
            )
    except _REMOTE_FAILURES as exc:
        if model.remote is None:
            raise
        return _each(jobs, exc)
    except BudgetTooSmall as exc:
        if not from_deadline:
            raise
        return [
            DeadlineExceeded(f"request {j.request_id!r}: too little time left before the "
                             f"deadline: {exc}")
            for j in jobs
        ]  # fmt: skip
    # A budget that cut the work short makes the answer depend on this moment's speed; one
    # that did not leaves the answer the request would get without it. A model served
    # elsewhere may change under us (its weights are not ours to digest): never exact.
    exact = not expl.budget_limited and model.remote is None
    return _results(jobs, expl, seeds, start, partial=False, exact=exact)


# What a model served elsewhere raises for the whole batch (its server is down, slow, out of
# resources, or does not fit the config; the request was cancelled): every job gets it at
# once, instead of the batcher splitting the batch to find "the" bad input. (A remote that
# refuses an input answers InvalidInput, which is left to the batcher's split.)
_REMOTE_FAILURES = (Unavailable, DeadlineExceeded, ResourceExhausted, FailedPrecondition, Cancelled)


def _each(jobs: list[ExplainJob], exc: XaiServeError) -> list[Any]:
    """A copy of ``exc`` per job (one exception object is not raised in several places)."""
    return [type(exc)(str(exc)) for _ in jobs]


def _remote_scope(jobs: list[ExplainJob]) -> Any:
    """The deadline and cancellation of a batch for the calls of a model served elsewhere
    (:func:`xai_serve.models.call_scope`): the calls end by the latest deadline of the batch
    (None when a job has none: the model's ``timeout_s``), and stop once every job of the
    batch was cancelled."""
    deadlines = [j.deadline for j in jobs]
    latest = None if any(d is None for d in deadlines) else max(deadlines)  # type: ignore[type-var]
    return call_scope(deadline=latest, cancelled=lambda: all(j.cancelled for j in jobs))


def _logits(jobs: list[ExplainJob]) -> list[ExplainResult | InvalidInput]:
    """The logits of ``jobs``' images: the model's own fp32 forward (not a tuned reduced-
    precision path: a client asking for logits gets the model's numbers), in chunks of at most
    the model's ``max_batch_size`` (its memory budget, or 1 for a batch-1 export)."""
    model = jobs[0].model
    start = time.monotonic()
    images = torch.stack([j.image for j in jobs]).to(model.device, non_blocking=True)
    try:
        with torch.no_grad(), _remote_scope(jobs):
            logits = torch.cat(
                [model.module(chunk).float().cpu() for chunk in images.split(model.max_batch_size)]
            )
    except _REMOTE_FAILURES as exc:
        if model.remote is None:
            raise
        return _each(jobs, exc)
    compute_ms = (time.monotonic() - start) * 1e3
    finite = torch.isfinite(logits).all(dim=1).tolist()
    return [
        ExplainResult(
            request_id=job.request_id,
            map=torch.empty(0),
            target=int(logits[i].argmax()),
            logits=logits[i],
            queue_ms=max(0.0, (start - job.arrival) * 1e3),
            compute_ms=compute_ms,
            batch_size=len(jobs),
        )
        if finite[i]
        else _not_finite(job)
        for i, job in enumerate(jobs)
    ]


def _not_finite(job: ExplainJob) -> InvalidInput:
    return InvalidInput(
        f"request {job.request_id!r}: the model's output for this input is not finite (NaN or "
        "Inf in its logits or the explanation); is the input preprocessed for the model (its "
        "scale)?"
    )


def _budgeted(
    first: ExplainJob, jobs: list[ExplainJob], start: float
) -> tuple[dict[str, Any], bool]:
    """The batch's options, with ``budget_ms`` lowered to the time its earliest deadline
    leaves (less a margin for sending the answer) when the method takes a budget. Returns
    ``(options, whether the deadline set the budget)``."""
    options = dict(first.options)
    deadlines = [j.deadline for j in jobs if j.deadline is not None]
    if not deadlines or "budget_ms" not in get_method(first.method).options:
        return options, False
    left_ms = (min(deadlines) - start) * 1e3
    left_ms -= max(DEADLINE_MARGIN_MS, DEADLINE_MARGIN_SHARE * left_ms)
    given = options.get("budget_ms")
    if given is not None and given <= left_ms:
        return options, False
    options["budget_ms"] = max(1, int(left_ms))
    return options, True


def _results(
    jobs: list[ExplainJob],
    expl: Explanation,
    seeds: list[int] | None,
    start: float,
    *,
    partial: bool,
    exact: bool,
) -> list[ExplainResult | InvalidInput]:
    """One result per job from a (partial or final) batched explanation; ``exact`` says
    whether the final one was computed without a time budget (see :class:`ExplainResult`)."""
    first = jobs[0]
    several = first.several
    maps = expl.maps.detach().float().cpu()
    targets = expl.targets.cpu().tolist()
    logits = expl.logits.detach().float().cpu() if expl.logits is not None else None
    if logits is None:  # every method reports its forward; guard against a silent None
        raise RuntimeError(f"method {first.method!r} returned no logits")
    segments = expl.segments.to(torch.int32).cpu() if expl.segments is not None else None
    weights = expl.weights.detach().float().cpu() if expl.weights is not None else None
    stderr = expl.stderr.detach().float().cpu() if expl.stderr is not None else None
    intercept = expl.intercept.detach().double().cpu() if expl.intercept is not None else None
    score = expl.score.detach().double().cpu() if expl.score is not None else None
    counts = expl.sample_counts.cpu().tolist() if expl.sample_counts is not None else None
    compute_ms = (time.monotonic() - start) * 1e3
    finite = torch.isfinite(logits).all(dim=1) & torch.isfinite(maps.flatten(1)).all(dim=1)
    if weights is not None:
        finite &= torch.isfinite(weights.flatten(1)).all(dim=1)

    results: list[ExplainResult | InvalidInput] = []
    for i, job in enumerate(jobs):
        if not bool(finite[i]):
            results.append(_not_finite(job))
            continue
        used = int(segments[i].max()) + 1 if segments is not None else 0
        per_target = []
        for t in range(len(targets[i]) if several else 1):
            at = (i, t) if several else (i,)
            per_target.append(
                TargetResult(
                    target=int(targets[i][t] if several else targets[i]),
                    map=maps[at],
                    overlay_png=(
                        _overlay(job.view, maps[at])
                        if job.want_overlay and job.view is not None and not partial
                        else None
                    ),
                    segment_weights=(
                        weights[at][:used].clone()
                        if weights is not None and segments is not None
                        else None
                    ),
                    segment_stderr=(
                        stderr[at][:used].clone()
                        if stderr is not None and segments is not None
                        else None
                    ),
                    intercept=_finite(intercept, at),
                    score=_finite(score, at),
                )
            )
        one = per_target[0]
        results.append(
            ExplainResult(
                request_id=job.request_id,
                map=one.map,
                target=one.target,
                logits=logits[i],
                layer=expl.layer,
                overlay_png=one.overlay_png,
                segments=segments[i] if segments is not None else None,
                segment_weights=one.segment_weights,
                intercept=one.intercept,
                score=one.score,
                seed=seeds[i] if seeds is not None else None,
                samples=int(counts[i]) if counts is not None else int(expl.samples or 0),
                queue_ms=max(0.0, (start - job.arrival) * 1e3),
                compute_ms=compute_ms,
                batch_size=len(jobs),
                segment_stderr=one.segment_stderr,
                partial=partial,
                exact=exact and not partial,
                per_target=per_target if several else None,
                foil=job.foil,
            )
        )
    return results


def _overlay(view: Tensor, heat: Tensor) -> bytes:
    from xai_serve.viz import overlay_png

    return overlay_png(view, heat)


def _finite(values: Tensor | None, at: tuple[int, ...]) -> float | None:
    if values is None:
        return None
    v = float(values[at])
    return v if math.isfinite(v) else None
