"""A server-side cache of exact answers.

Explanations cost from one backward pass to thousands of forwards, and clients do send the
same request again (a page reloaded, a retry after a lost response, one image explained for
several users). An answer that is a function of the request alone can then be sent again
without computing it. :class:`AnswerCache` keeps such answers, least recently used first out,
within a bound in bytes (``[cache] max_bytes``; 0 turns it off).

What makes two requests "the same" is :class:`AnswerKey`: the model (its name, a digest of its
weights, its device and its forward path, since precision and memory layout change the
numbers), a digest of the preprocessed input tensor (dtype, shape and bytes), the method, the
layer, every option with its type (``1``, ``1.0`` and ``True`` are different keys), the
baseline, the target, the seed and whether an overlay is wanted (with a digest of the image
it is drawn on). Fields that change only how an answer is sent (``request_id``, ``top_k``,
whether the map is returned, the deadline) are not part of it: the cached
:class:`~xai_serve.serving.engine.ExplainResult` holds the full logits and map, and the
servicer cuts the response from it as for a computed one.

What is never cached:

- randomised methods whose seed the server drew (the client gave none): such a request asks
  for a fresh random draw, and serving it an old one would break that promise;
- answers that a time budget (``budget_ms``, or one a deadline set) cut short, and partial
  answers: how much work they got done depends on the machine's speed at that moment
  (:attr:`ExplainResult.exact` is False). A budget that did not cut the work short leaves
  the answer the request gets without one, which is kept under the key without the
  deadline; requests that carry their own ``budget_ms`` are not looked up at all;
- errors.

A request with a deadline may still be served an exact answer from the cache: it is the
answer the same request gets without time pressure.

Cached results are shared between the responses they answer: their tensors are treated as
immutable (the servicers only read them). Each hit is a fresh :class:`ExplainResult` (its own
``request_id``, ``cache_hit=True``, zero queue and compute time, ``batch_size=0``: it was
computed in no batch). The cache is thread-safe; the batchers use it on the event loop.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xai_serve.explainers.base import get_method
from xai_serve.models.tuning import weights_digest
from xai_serve.serving.engine import LOGITS, ExplainJob, ExplainResult
from xai_serve.serving.metrics import Metrics

__all__ = [
    "ENTRY_OVERHEAD",
    "AnswerCache",
    "AnswerKey",
    "answer_key",
    "cacheable",
    "canonical",
    "digest",
]

log = logging.getLogger("xai_serve.serving")

ENTRY_OVERHEAD = 1024
"""Bytes counted for each entry on top of its tensors and overlay: the result and key
objects, the tensors' headers and the dictionary slot (a rough, deliberately high figure)."""


def digest(t: Tensor) -> bytes:
    """A 256-bit BLAKE2b digest of a tensor's dtype, shape and bytes (in C order). Two tensors
    with the same bytes but another dtype or shape get different digests."""
    h = hashlib.blake2b(digest_size=32)
    data = t.detach().to("cpu").contiguous()
    h.update(f"{data.dtype}:{tuple(data.shape)};".encode())
    if data.numel():
        h.update(data.reshape(-1).view(torch.uint8).numpy())
    return h.digest()


def canonical(value: Any) -> tuple[Any, ...]:
    """``value`` as a hashable tuple that carries its type, for use in a key.

    Python's own equality makes ``1 == 1.0 == True`` and ``0.0 == -0.0``; here each becomes a
    different tuple, since a method may read them differently. Floats are written exactly
    (``float.hex``). Lists, tuples and mappings (string keys, order-free) are taken apart
    recursively; tensors become their :func:`digest`. Any other type raises TypeError: a key
    must never be built from a value whose identity it cannot state.
    """
    if value is None:
        return ("none",)
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int):
        return ("int", int(value))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, str):
        return ("str", value)
    if isinstance(value, bytes):
        return ("bytes", value)
    if isinstance(value, Tensor):
        return ("tensor", digest(value))
    if isinstance(value, (list, tuple)):
        return ("seq", tuple(canonical(v) for v in value))
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"cannot key a mapping with non-string keys: {list(value)!r}")
        return ("map", tuple(sorted((k, canonical(v)) for k, v in value.items())))
    raise TypeError(f"cannot key a value of type {type(value).__name__}: {value!r}")


@dataclass(frozen=True)
class AnswerKey:
    """Everything an exact answer depends on; see the module doc. Equal keys mean the same
    answer. Every field is compared as itself (no hash of the whole), so keys that differ in
    any field never collide; only the tensors are compared through 256-bit digests."""

    model: str
    weights: str  # weights_digest of the module
    device: str
    path: str  # ForwardPath.describe(): memory format, precision, batch, compiled
    image: bytes  # digest() of the preprocessed input
    method: str
    layer: str | None
    options: tuple[Any, ...]  # canonical(options)
    baseline: tuple[Any, ...]  # canonical(baseline)
    target: int | None
    seed: int | None
    overlay: bytes | None  # digest() of the image the overlay is drawn on; None: no overlay
    targets: tuple[int, ...] | None = None  # several classes
    top_labels: int | None = None
    foil: int | None = None


def answer_key(job: ExplainJob, weights: str) -> AnswerKey:
    """The key of ``job``'s answer, given the digest of its model's weights."""
    model = job.model
    overlay = None
    if job.want_overlay:
        overlay = digest(job.view) if job.view is not None else b""
    return AnswerKey(
        model=model.name,
        weights=weights,
        device=str(model.device),
        path=model.path.describe(),
        image=digest(job.image),
        method=job.method,
        layer=job.layer,
        options=canonical(dict(job.options)),
        baseline=canonical(job.baseline),
        target=None if job.target is None else int(job.target),
        seed=None if job.seed is None else int(job.seed),
        overlay=overlay,
        targets=None if not job.targets else tuple(int(t) for t in job.targets),
        top_labels=job.top_labels,
        foil=job.foil,
    )


def cacheable(job: ExplainJob) -> bool:
    """Whether ``job``'s answer may come from (and go to) the cache: not a randomised method
    without a seed the client chose, and not a run under a time budget of its own. Plain
    logits (:data:`~xai_serve.serving.engine.LOGITS` jobs) are cheap and never kept."""
    if job.method == LOGITS:
        return False
    if get_method(job.method).randomised and (job.seed is None or job.fresh_seed):
        return False
    return job.options.get("budget_ms") is None


def _tensors(result: ExplainResult) -> list[Tensor]:
    """Every tensor an entry holds; a class of several that is the first shares the singular
    fields' tensors and is counted once."""
    singular = (result.map, result.logits, result.segments, result.segment_weights,
                result.segment_stderr)  # fmt: skip
    extra = [
        t
        for one in (result.per_target or [])[1:]
        for t in (one.map, one.segment_weights, one.segment_stderr)
    ]
    return [t for t in (*singular, *extra) if t is not None]


def _compact(t: Tensor | None) -> Tensor | None:
    """A tensor that owns exactly its own bytes: results are often views of their batch's
    tensors, which would keep the whole batch alive and make the byte count a lie."""
    if t is None:
        return None
    return t.detach().clone(memory_format=torch.contiguous_format)


def entry_size(result: ExplainResult) -> int:
    """Bytes an entry holding ``result`` is counted as (tensors + overlay + overhead)."""
    size = ENTRY_OVERHEAD + sum(t.nbytes for t in _tensors(result))
    overlays = [result.overlay_png, *(one.overlay_png for one in (result.per_target or [])[1:])]
    return size + sum(len(png) for png in overlays if png is not None)


class AnswerCache:
    """Exact answers by :class:`AnswerKey`, least recently used first out, at most
    ``max_bytes`` in all (see the module doc). ``metrics`` (optional) gets hits and misses
    by model and method, evictions by model, and the bytes and entries held."""

    def __init__(self, max_bytes: int, metrics: Metrics | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self.metrics = metrics
        self._entries: OrderedDict[AnswerKey, tuple[ExplainResult, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        # weights digests by module: a model's weights do not change while it is served
        self._weights: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ------------------------------------------------------------------ keys

    def prepare(self, model: Any) -> str:
        """The digest of ``model``'s weights (a :class:`~xai_serve.models.LoadedModel`),
        computed once per module. It reads every parameter: call it where that may take a
        while (the model's load, on its device thread), not first on the event loop."""
        module = model.module
        with self._lock:
            known = self._weights.get(module)
        if known is not None:
            return known
        value = weights_digest(module)
        with self._lock:
            self._weights[module] = value
        return value

    def key(self, job: ExplainJob) -> AnswerKey | None:
        """``job``'s key, or None when its answer must not be cached (see :func:`cacheable`)."""
        if not cacheable(job):
            return None
        return answer_key(job, self.prepare(job.model))

    # ------------------------------------------------------------------ entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes held now (as :func:`entry_size` counts them)."""
        return self._bytes

    def get(self, key: AnswerKey, job: ExplainJob) -> ExplainResult | None:
        """The cached answer to ``job`` (whose key is ``key``) as a new result of its own, or
        None; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
        if self.metrics is not None:
            self.metrics.observe_cache(key.model, key.method, hit=entry is not None)
        if entry is None:
            return None
        return dataclasses.replace(
            entry[0],
            request_id=job.request_id,
            queue_ms=0.0,
            compute_ms=0.0,
            batch_size=0,
            cache_hit=True,
        )

    def put(self, key: AnswerKey, result: ExplainResult) -> bool:
        """Keep ``result`` as the answer of ``key`` when it is exact and fits; evicts the least
        recently used entries to make room. Returns whether it was kept."""
        if not result.exact or result.partial or result.cache_hit:
            return False
        stored = dataclasses.replace(
            result,
            request_id="",
            map=_compact(result.map),
            logits=_compact(result.logits),
            segments=_compact(result.segments),
            segment_weights=_compact(result.segment_weights),
            segment_stderr=_compact(result.segment_stderr),
        )
        if result.per_target is not None:
            first, *rest = result.per_target
            stored.per_target = [
                # the singular fields are the first class's: share their compact tensors
                dataclasses.replace(
                    first,
                    map=stored.map,
                    segment_weights=stored.segment_weights,
                    segment_stderr=stored.segment_stderr,
                ),
                *(
                    dataclasses.replace(
                        one,
                        map=_compact(one.map),
                        segment_weights=_compact(one.segment_weights),
                        segment_stderr=_compact(one.segment_stderr),
                    )
                    for one in rest
                ),
            ]
        size = entry_size(stored)
        if size > self.max_bytes:
            return False
        evicted: list[str] = []
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            while self._entries and self._bytes + size > self.max_bytes:
                gone, (_, gone_size) = self._entries.popitem(last=False)
                self._bytes -= gone_size
                evicted.append(gone.model)
            self._entries[key] = (stored, size)
            self._bytes += size
            self.evictions += len(evicted)
            held, count = self._bytes, len(self._entries)
        if self.metrics is not None:
            for model in evicted:
                self.metrics.observe_cache_eviction(model)
            self.metrics.set_cache_size(held, count)
        return True

    def clear(self) -> None:
        """Drop every entry (the counters stay)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
        if self.metrics is not None:
            self.metrics.set_cache_size(0, 0)
