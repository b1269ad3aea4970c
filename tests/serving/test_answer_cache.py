"""The server's cache of exact answers (xai_serve.serving.cache): its keys never collide when
any component differs, it evicts least recently used answers to stay within its bytes, it never
keeps unseeded randomised, budgeted, partial or failed answers, and through a real gRPC server
a repeated request is answered from it with the same bytes, counted in the metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from tests.serving.harness import ServerThread, tiny_model
from xai_serve.errors import InvalidInput, ResourceExhausted
from xai_serve.explainers import gradients
from xai_serve.explainers.forward import ForwardPath
from xai_serve.models.tuning import weights_digest
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving import codec
from xai_serve.serving.batcher import ModelBatcher
from xai_serve.serving.cache import (
    ENTRY_OVERHEAD,
    AnswerCache,
    AnswerKey,
    answer_key,
    canonical,
    entry_size,
)
from xai_serve.serving.config import CacheConfig, ServerConfig
from xai_serve.serving.engine import ExplainJob, ExplainResult, TargetResult, run_batch
from xai_serve.serving.metrics import Metrics

TIMEOUT = 60.0
MiB = 2**20


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _module(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(4, 3)


def fake_model(
    name: str = "m", module: nn.Module | None = None, device: str = "cpu", **path: Any
) -> Any:
    """What a key reads of a LoadedModel: its name, module, device and forward path."""
    return SimpleNamespace(
        name=name,
        module=module if module is not None else MODULE,
        device=torch.device(device),
        path=ForwardPath(**path),
    )


MODULE = _module(0)
IMAGE = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4) / 7
VIEW = torch.arange(24, dtype=torch.uint8).reshape(3, 2, 4)
MODEL = fake_model()
WEIGHTS = weights_digest(MODULE)


def job(**changes: Any) -> ExplainJob:
    """A seeded LIME job with a target, options and a baseline; ``changes`` replace fields."""
    fields: dict[str, Any] = dict(
        request_id="r",
        model=MODEL,
        method="lime",
        image=IMAGE,
        target=3,
        options={"samples": 64, "kernel_width": 0.25, "paired": False},
        baseline=0.0,
        seed=7,
    )
    fields.update(changes)
    return ExplainJob(**fields)


def key(j: ExplainJob) -> AnswerKey:
    return answer_key(j, weights_digest(j.model.module))


def result(j: ExplainJob, n: int = 100, *, exact: bool = True, **kw: Any) -> ExplainResult:
    """An answer to ``j`` whose map has ``n`` float32 elements."""
    return ExplainResult(
        request_id=j.request_id,
        map=torch.full((n,), float(j.seed or 0)),
        target=int(j.target or 0),
        logits=torch.arange(10, dtype=torch.float32),
        seed=j.seed,
        exact=exact,
        **kw,
    )


def _next_after(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one element moved to the next float: the smallest possible change."""
    y = x.clone().reshape(-1)
    y[5] = torch.nextafter(y[5], torch.tensor(float("inf")))
    return y.reshape(x.shape)


# One job per component, each differing from job() in that component alone.
VARIANTS: dict[str, ExplainJob] = {
    "base": job(),
    "model name": job(model=fake_model("other")),
    "weights": job(model=fake_model(module=_module(1))),
    "device": job(model=fake_model(device="cuda:0")),
    "precision": job(model=fake_model(precision="bf16")),
    "memory format": job(model=fake_model(channels_last=True)),
    "forward batch": job(model=fake_model(batch_size=16)),
    "image: one ulp": job(image=_next_after(IMAGE)),
    "image: same bytes, other shape": job(image=IMAGE.reshape(3, 4, 2)),
    "image: same bytes, other dtype": job(image=IMAGE.view(torch.int32)),
    "method": job(method="kernelshap"),
    "layer": job(layer="layer4"),
    "option value": job(options={"samples": 65, "kernel_width": 0.25, "paired": False}),
    "option float": job(options={"samples": 64, "kernel_width": 0.5, "paired": False}),
    "option bool": job(options={"samples": 64, "kernel_width": 0.25, "paired": True}),
    "option int as float": job(options={"samples": 64.0, "kernel_width": 0.25, "paired": False}),
    "option bool as int": job(options={"samples": 64, "kernel_width": 0.25, "paired": 0}),
    "option left out": job(options={"samples": 64, "kernel_width": 0.25}),
    "option added": job(
        options={"samples": 64, "kernel_width": 0.25, "paired": False, "tolerance": 0.1}
    ),
    "option renamed": job(options={"samples": 64, "kernel_width": 0.25, "abs": False}),
    "baseline none": job(baseline=None),
    "baseline blur": job(baseline="blur"),
    "baseline int": job(baseline=0),
    "baseline -0.0": job(baseline=-0.0),
    "baseline 1.0": job(baseline=1.0),
    "baseline tensor": job(baseline=torch.zeros(3, 2, 4)),
    "target none": job(target=None),
    "target": job(target=4),
    "seed none": job(seed=None),
    "seed": job(seed=8),
    "overlay": job(want_overlay=True, view=VIEW),
    "overlay, other view": job(want_overlay=True, view=VIEW.flip(-1).contiguous()),
    "targets": job(target=None, targets=(3, 4)),
    "targets, other order": job(target=None, targets=(4, 3)),
    "targets, one": job(target=None, targets=(3,)),
    "top_labels": job(target=None, top_labels=2),
    "top_labels, other k": job(target=None, top_labels=3),
    "foil": job(foil=1),
    "foil, other": job(foil=2),
}


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


def test_keys_differing_in_any_one_component_never_collide() -> None:
    keys = {name: key(j) for name, j in VARIANTS.items()}
    seen: dict[AnswerKey, str] = {}
    for name, k in keys.items():
        assert k not in seen, f"{name!r} collides with {seen.get(k)!r}"
        seen[k] = name
    assert len({hash(k) for k in keys.values()}) == len(keys)


def test_what_does_not_change_the_answer_does_not_change_the_key() -> None:
    base = key(job())
    same = [
        job(request_id="another"),
        job(top_k=0),
        job(want_map=False),
        job(deadline=time.monotonic() + 5),
        job(progress=True),
        job(options={"paired": False, "kernel_width": 0.25, "samples": 64}),  # order
        job(image=IMAGE.clone()),
        job(image=IMAGE.permute(0, 2, 1).contiguous().permute(0, 2, 1)),  # not contiguous
        job(model=fake_model(module=_module(0))),  # another module, equal weights
    ]
    for j in same:
        assert key(j) == base
    # an overlay is part of the answer: the key says which picture it is drawn on
    assert key(job(want_overlay=True, view=VIEW)) == key(job(want_overlay=True, view=VIEW + 0))


def test_canonical_values_keep_their_types() -> None:
    values = [None, 0, 1, 0.0, -0.0, 1.0, True, False, "1", b"1", (1,), [1], {"a": 1}]
    assert len({canonical(v) for v in values}) == len(values) - 1  # (1,) and [1] are one seq
    assert canonical({"a": 1, "b": 2.5}) == canonical({"b": 2.5, "a": 1})
    with pytest.raises(TypeError, match="set"):
        canonical({1, 2})
    with pytest.raises(TypeError, match="non-string keys"):
        canonical({1: 2})


# The hypothesis property: two requests drawn from small domains (so that equal components are
# frequent) get equal keys exactly when an independent, type-strict comparison of their
# components says they are equal.

_IMAGES = [IMAGE, _next_after(IMAGE), IMAGE.reshape(3, 4, 2), IMAGE.view(torch.int32)]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 2),
    st.sampled_from([0.0, -0.0, 1.0, 2.0, 0.25]),
    st.sampled_from(["blur", "1", ""]),
)
_COMPONENTS: dict[str, st.SearchStrategy[Any]] = {
    "name": st.sampled_from(["a", "b"]),
    "weights": st.sampled_from([0, 1]),
    "precision": st.sampled_from(["fp32", "bf16"]),
    "image": st.integers(0, len(_IMAGES) - 1),
    "method": st.sampled_from(["lime", "kernelshap", "gradcam"]),
    "layer": st.sampled_from([None, "layer4", "layer3"]),
    "options": st.dictionaries(
        st.sampled_from(["samples", "kernel_width", "paired", "rule"]), _scalars, max_size=3
    ),
    "baseline": _scalars,
    "target": st.one_of(st.none(), st.integers(0, 2)),
    "seed": st.one_of(st.none(), st.integers(0, 2)),
    "overlay": st.booleans(),
}
_requests = st.fixed_dictionaries(_COMPONENTS)
_MODULES = [_module(0), _module(1)]


def _strict(value: Any) -> Any:
    """Type-strict identity of a plain value: ``1``, ``1.0``, ``True`` and ``-0.0`` differ."""
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _strict(v)) for k, v in value.items())))
    return (type(value).__name__, repr(value))


def _job_of(r: dict[str, Any]) -> ExplainJob:
    return job(
        model=fake_model(r["name"], _MODULES[r["weights"]], precision=r["precision"]),
        image=_IMAGES[r["image"]],
        method=r["method"],
        layer=r["layer"],
        options=r["options"],
        baseline=r["baseline"],
        target=r["target"],
        seed=r["seed"],
        want_overlay=r["overlay"],
        view=VIEW if r["overlay"] else None,
    )


@settings(max_examples=300, deadline=None)
@given(_requests, _requests, st.sets(st.sampled_from(sorted(_COMPONENTS))))
def test_keys_are_equal_exactly_when_every_component_is(
    a: dict[str, Any], other: dict[str, Any], shared: set[str]
) -> None:
    # b takes the components in `shared` from a and the rest from another draw, so that
    # equal requests and requests differing in one component are common
    b = {k: a[k] if k in shared else other[k] for k in a}
    ka, kb = key(_job_of(a)), key(_job_of(b))
    same = {k: _strict(v) for k, v in a.items()} == {k: _strict(v) for k, v in b.items()}
    assert (ka == kb) == same, (a, b)
    # and a request always meets its own key again
    assert key(_job_of(a)) == ka and hash(key(_job_of(a))) == hash(ka)


# --------------------------------------------------------------------------------------------
# Entries: LRU by bytes, shared results, metrics
# --------------------------------------------------------------------------------------------


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_least_recently_used_answers_go_first_within_the_bytes() -> None:
    jobs = [job(seed=s) for s in range(5)]
    results = [result(j, n=1000) for j in jobs]
    size = entry_size(results[0])
    assert size == ENTRY_OVERHEAD + 1000 * 4 + 10 * 4
    metrics = Metrics()
    cache = AnswerCache(3 * size + size // 2, metrics)  # room for three
    for j, r in zip(jobs[:3], results[:3], strict=True):
        assert cache.put(key(j), r)
    assert (len(cache), cache.bytes) == (3, 3 * size)
    assert cache.get(key(jobs[0]), jobs[0]) is not None  # 0 is now the most recently used
    assert cache.put(key(jobs[3]), results[3])  # evicts 1, the least recently used
    assert cache.get(key(jobs[1]), jobs[1]) is None
    for i in (0, 2, 3):
        assert cache.get(key(jobs[i]), jobs[i]) is not None
    assert cache.put(key(jobs[4]), results[4])  # evicts 0: of 0, 2, 3 the first used above
    assert cache.get(key(jobs[0]), jobs[0]) is None
    assert (len(cache), cache.bytes, cache.evictions) == (3, 3 * size, 2)
    # putting a key again replaces its entry: no double count
    assert cache.put(key(jobs[4]), results[4])
    assert (len(cache), cache.bytes, cache.evictions) == (3, 3 * size, 2)

    assert _value(metrics, "xai_serve_cache_bytes") == 3 * size
    assert _value(metrics, "xai_serve_cache_entries") == 3
    assert _value(metrics, "xai_serve_cache_evictions_total", model="m") == 2
    assert _value(metrics, "xai_serve_cache_hits_total", model="m", method="lime") == 4
    assert _value(metrics, "xai_serve_cache_misses_total", model="m", method="lime") == 2
    assert (cache.hits, cache.misses) == (4, 2)


def test_an_answer_larger_than_the_cache_is_not_kept_and_evicts_nothing() -> None:
    small, big = job(seed=1), job(seed=2)
    cache = AnswerCache(entry_size(result(small, n=10)) + 100)
    assert cache.put(key(small), result(small, n=10))
    assert not cache.put(key(big), result(big, n=1000))
    assert len(cache) == 1 and cache.get(key(small), small) is not None


def test_entries_own_their_bytes_and_hits_are_fresh_results() -> None:
    """A result that is a view of its batch's map is copied: the entry is counted (and holds)
    its own bytes, and later writes to the batch tensor do not reach it. A hit is a result of
    its own: the new request id, cache_hit, no queue or compute time, no batch."""
    batch_maps = torch.zeros(16, 1000)
    j = job()
    r = dataclasses.replace(result(j, n=1000), map=batch_maps[3], compute_ms=12.0, batch_size=16)
    cache = AnswerCache(1 * MiB)
    assert cache.put(key(j), r)
    assert cache.bytes == entry_size(r)
    batch_maps.fill_(5.0)
    again = job(request_id="again")
    hit = cache.get(key(again), again)
    assert hit is not None
    assert hit.request_id == "again" and hit.cache_hit
    assert (hit.queue_ms, hit.compute_ms, hit.batch_size) == (0.0, 0.0, 0)
    assert torch.equal(hit.map, torch.zeros(1000))
    assert hit.map.untyped_storage().nbytes() == 4000
    assert hit.seed == 7 and torch.equal(hit.logits, r.logits)
    second = cache.get(key(again), job(request_id="third"))
    assert second is not None and second.request_id == "third" and hit.request_id == "again"


def test_cache_is_thread_safe() -> None:
    cache = AnswerCache(40 * entry_size(result(job(), n=10)))
    jobs = [job(seed=s) for s in range(200)]
    keys = [key(j) for j in jobs]

    def work(offset: int) -> None:
        for i in range(len(jobs)):
            k = (i + offset) % len(jobs)
            cache.put(keys[k], result(jobs[k], n=10))
            cache.get(keys[(k * 7) % len(jobs)], jobs[0])

    threads = [threading.Thread(target=work, args=(o,)) for o in (0, 50, 100, 150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 40 and cache.bytes == 40 * entry_size(result(job(), n=10))
    assert cache.hits + cache.misses == 800


# --------------------------------------------------------------------------------------------
# What is never cached
# --------------------------------------------------------------------------------------------


def test_unseeded_randomised_and_budgeted_requests_are_not_looked_up() -> None:
    cache = AnswerCache(1 * MiB)
    assert cache.key(job(seed=7)) is not None
    assert cache.key(job(seed=7, fresh_seed=True)) is None  # the server drew the seed
    assert cache.key(job(seed=None)) is None
    assert cache.key(job(method="smoothgrad", seed=None, options={})) is None
    assert cache.key(job(options={"samples": 64, "budget_ms": 500})) is None
    # a deterministic method has no seed and needs none
    assert cache.key(job(method="gradcam", seed=None, options={}, baseline=None)) is not None
    # a deadline does not change the answer the cache holds (see run_batch's budgets below)
    assert cache.key(job(deadline=time.monotonic() + 1)) == cache.key(job())


def test_partial_inexact_and_hit_results_are_not_kept() -> None:
    cache = AnswerCache(1 * MiB)
    j = job()
    assert not cache.put(key(j), result(j, exact=False))
    assert not cache.put(key(j), result(j, partial=True))
    assert not cache.put(key(j), result(j, cache_hit=True))
    assert len(cache) == 0 and cache.bytes == 0


def test_server_drawn_seed_is_marked_on_the_job() -> None:
    """The servicer tells a seed the client chose from one it drew (both are in job.seed)."""
    from xai_serve.serving.jobs import build_job

    m = tiny_model("tiny")
    state = SimpleNamespace(limits=ServerConfig().limits)
    x = torch.zeros(3, 64, 64)

    def built(method: str, **options: Any) -> ExplainJob:
        return build_job(
            state, m, x, None, request_id="r", method=method, options=pb.Options(**options)
        )  # type: ignore[arg-type]

    drawn, chosen = built("lime"), built("lime", seed=5)
    assert drawn.seed is not None and drawn.fresh_seed
    assert chosen.seed == 5 and not chosen.fresh_seed
    assert not built("gradcam").fresh_seed


def test_run_batch_marks_budgeted_and_partial_answers_inexact() -> None:
    """An answer is exact unless a time budget cut it short: a ``budget_ms`` option or a
    deadline (which lowers the budget of methods that take one) that left room for all the
    work changes nothing, one that did not makes it depend on timing; partial answers are
    unfinished."""
    m = tiny_model("tiny")
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(3))
    partials: list[ExplainResult] = []

    def sg(**kw: Any) -> ExplainJob:
        return ExplainJob(request_id="r", model=m, method="smoothgrad", image=x, seed=1, **kw)

    [free] = run_batch([sg(options={"samples": 4})])
    [roomy] = run_batch([sg(options={"samples": 4, "budget_ms": 60_000})])
    [near] = run_batch([sg(options={"samples": 4}, deadline=time.monotonic() + 60)])
    # a gradient evaluation declared to take 0.5 s: 2 s hold about 3 of 100,000 samples
    timed = gradients._timed_logits

    def slow(request: Any, amp: Any, budget: bool) -> Any:
        logits, targets, _ = timed(request, amp, budget)
        return logits, targets, 0.5

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gradients, "_timed_logits", slow)
        [cut] = run_batch([sg(options={"samples": 100_000, "budget_ms": 2_000})])
    assert isinstance(free, ExplainResult) and free.exact
    assert isinstance(roomy, ExplainResult) and roomy.exact and roomy.samples == 4
    assert isinstance(near, ExplainResult) and near.exact
    torch.testing.assert_close(roomy.map, free.map)
    torch.testing.assert_close(near.map, free.map)
    assert isinstance(cut, ExplainResult) and not cut.exact and cut.samples < 100_000

    lime = ExplainJob(
        request_id="p",
        model=m,
        method="lime",
        image=x,
        seed=2,
        options={"samples": 32, "n_segments": 8, "segmenter": "grid", "tolerance": 1e-9},
        on_partial=partials.append,
    )
    [final] = run_batch([lime])
    assert isinstance(final, ExplainResult) and final.exact and not final.partial
    assert partials and all(p.partial and not p.exact for p in partials)
    [gradcam] = run_batch(
        [ExplainJob(request_id="g", model=m, method="gradcam", image=x, layer="layer4",
                    deadline=time.monotonic() + 60)]
    )  # fmt: skip
    assert isinstance(gradcam, ExplainResult) and gradcam.exact  # no budget to lower


# --------------------------------------------------------------------------------------------
# The batcher: lookups before the queue, stores after the result
# --------------------------------------------------------------------------------------------


class Counting:
    """A batcher compute that answers each job with ``make(job)`` and records the request ids
    of each batch; jobs whose request id starts with "hold" wait for ``release``."""

    def __init__(self, make: Callable[[ExplainJob], ExplainResult | BaseException]) -> None:
        self.make = make
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, jobs: list[ExplainJob]) -> Sequence[ExplainResult | BaseException]:
        self.batches.append([j.request_id for j in jobs])
        if any(j.request_id.startswith("hold") for j in jobs):
            assert self.release.wait(TIMEOUT)
        return [self.make(j) for j in jobs]


def _with_batcher(
    compute: Counting, cache: AnswerCache, scenario: Callable[[ModelBatcher], Any], **kw: Any
) -> Any:
    async def main() -> Any:
        with ThreadPoolExecutor(1) as pool:
            batcher = ModelBatcher(
                "m", pool, max_batch_size=4, max_delay_ms=0.0, max_queue=kw.get("max_queue", 8),
                compute=compute, cache=cache,
            )  # fmt: skip
            batcher.start()
            try:
                return await scenario(batcher)
            finally:
                compute.release.set()
                await batcher.close()

    return asyncio.run(main())


def test_batcher_computes_a_repeated_exact_request_once() -> None:
    compute = Counting(result)
    cache = AnswerCache(1 * MiB)

    async def scenario(b: ModelBatcher) -> list[ExplainResult]:
        return [await b.submit(job(request_id=f"r{i}")) for i in range(3)]

    first, second, third = _with_batcher(compute, cache, scenario)
    assert compute.batches == [["r0"]]
    assert not first.cache_hit and second.cache_hit and third.cache_hit
    assert (second.request_id, third.request_id) == ("r1", "r2")
    assert torch.equal(second.map, first.map) and second.seed == first.seed == 7


@pytest.mark.parametrize(
    "case",
    ["server-drawn seed", "inexact", "error", "budget option"],
)
def test_batcher_computes_uncacheable_requests_every_time(case: str) -> None:
    changes: dict[str, Any] = {}
    make: Callable[[ExplainJob], ExplainResult | BaseException] = result
    if case == "server-drawn seed":
        changes = {"fresh_seed": True}
    elif case == "inexact":

        def make(j: ExplainJob) -> ExplainResult | BaseException:
            return result(j, exact=False)
    elif case == "error":

        def make(j: ExplainJob) -> ExplainResult | BaseException:
            return InvalidInput(f"request {j.request_id!r}: not finite")
    else:
        changes = {"options": {"samples": 64, "budget_ms": 100}}
    compute = Counting(make)
    cache = AnswerCache(1 * MiB)

    async def scenario(b: ModelBatcher) -> list[Any]:
        out = []
        for i in range(2):
            try:
                out.append(await b.submit(job(request_id=f"r{i}", **changes)))
            except InvalidInput as exc:
                out.append(exc)
        return out

    answers = _with_batcher(compute, cache, scenario)
    assert compute.batches == [["r0"], ["r1"]]
    assert not any(isinstance(a, ExplainResult) and a.cache_hit for a in answers)
    assert len(cache) == 0


def test_a_hit_needs_no_queue_slot() -> None:
    """With the queue full, a cached answer is still served (a miss is refused)."""
    compute = Counting(result)
    cache = AnswerCache(1 * MiB)

    async def scenario(b: ModelBatcher) -> tuple[ExplainResult, str]:
        await b.submit(job(request_id="warm"))
        holding = asyncio.ensure_future(b.submit(job(request_id="hold", seed=100)))
        while not compute.batches or compute.batches[-1] != ["hold"]:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(b.submit(job(request_id="w", seed=101)))
        await asyncio.sleep(0.05)
        assert b.depth == 1  # full (max_queue=1)
        hit = await b.submit(job(request_id="cached"))
        with pytest.raises(ResourceExhausted) as refused:
            await b.submit(job(request_id="new", seed=102))
        compute.release.set()
        await asyncio.gather(holding, waiting)
        return hit, str(refused.value)

    hit, refused = _with_batcher(compute, cache, scenario, max_queue=1)
    assert hit.cache_hit and hit.request_id == "cached"
    assert "max_queue=1" in refused
    assert compute.batches == [["warm"], ["hold"], ["w"]]


# --------------------------------------------------------------------------------------------
# End to end through the gRPC server
# --------------------------------------------------------------------------------------------


def _request(x: torch.Tensor, method: str, **fields: Any) -> pb.ExplainRequest:
    req = pb.ExplainRequest(model="tiny", method=method, **fields)
    req.tensor.CopyFrom(codec.tensor_to_proto(x.contiguous()))
    return req


def _metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as page:
        text = page.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_server_answers_a_repeated_request_from_the_cache() -> None:
    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, cache=CacheConfig(16 * MiB))
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(11))
    lime_opts = pb.Options(seed=11, samples=32, n_segments=8, segmenter=pb.GRID)
    seeded = _request(x, "lime", options=lime_opts, request_id="a")
    with ServerThread(cfg, models=[tiny_model("tiny")], metrics_port=0) as s:
        assert s.server is not None and s.server.metrics_port
        with grpc.insecure_channel(s.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)

            def call(req: pb.ExplainRequest, timeout: float | None = None) -> pb.ExplainResponse:
                # no gRPC deadline unless asked: a deadline gives LIME a time budget, and an
                # answer computed under one is never kept
                return stub.Explain.future(req, timeout=timeout).result(timeout=TIMEOUT)

            first = call(seeded)
            seeded.request_id = "b"
            second = call(seeded)
            seeded.request_id = "c"
            third = call(seeded, timeout=TIMEOUT)  # a deadline may still be served a kept one
            assert not first.timing.cache_hit and first.timing.compute_ms > 0
            for hit, rid in ((second, "b"), (third, "c")):
                assert hit.timing.cache_hit and hit.request_id == rid
                assert (hit.timing.compute_ms, hit.timing.batch_size) == (0.0, 0)
                assert hit.map.SerializeToString() == first.map.SerializeToString()
                assert hit.segments.SerializeToString() == first.segments.SerializeToString()
                assert list(hit.segment_weights) == list(first.segment_weights)
                assert list(hit.top_k) == list(first.top_k)
                assert hit.seed == first.seed == 11

            other_seed = _request(x, "lime", options=pb.Options(seed=12, samples=32, n_segments=8,
                                                                segmenter=pb.GRID))  # fmt: skip
            assert not call(other_seed).timing.cache_hit

            # unseeded: a fresh draw each time, never looked up or kept
            unseeded = _request(x, "lime", options=pb.Options(samples=32, n_segments=8,
                                                              segmenter=pb.GRID))  # fmt: skip
            u1, u2 = call(unseeded), call(unseeded)
            assert not u1.timing.cache_hit and not u2.timing.cache_hit and u1.seed != u2.seed

            # a deadline that leaves room for all the work changes nothing: the answer is
            # kept (one that a deadline cuts short is not: test_run_batch_marks_...)
            budgeted = _request(x, "lime", options=pb.Options(seed=13, samples=32, n_segments=8,
                                                              segmenter=pb.GRID))  # fmt: skip
            b1, b2 = call(budgeted, TIMEOUT), call(budgeted, TIMEOUT)
            assert not b1.timing.cache_hit and b2.timing.cache_hit
            cam = _request(x, "gradcam", returns=pb.MAP_AND_OVERLAY)
            c1, c2 = call(cam, TIMEOUT), call(cam, TIMEOUT)
            assert not c1.timing.cache_hit and c2.timing.cache_hit
            assert c2.map.SerializeToString() == c1.map.SerializeToString()
            assert c2.overlay_png == c1.overlay_png and c1.overlay_png
            # the overlay is part of the key: a map-only request is a miss
            assert not call(_request(x, "gradcam")).timing.cache_hit

        metrics = _metrics(s.server.metrics_port)

    def value(name: str, **labels: str) -> float:
        return metrics.get((name, frozenset(labels.items())), 0.0)

    lime = dict(model="tiny", method="lime")
    cam = dict(model="tiny", method="gradcam")
    assert value("xai_serve_cache_hits_total", **lime) == 3  # seed 11 twice, 13 once
    assert value("xai_serve_cache_misses_total", **lime) == 3  # seeds 11, 12 and 13
    assert value("xai_serve_cache_hits_total", **cam) == 1
    assert value("xai_serve_cache_misses_total", **cam) == 2
    assert value("xai_serve_cache_entries") == 5  # lime 11, 12, 13, gradcam with/without overlay
    assert value("xai_serve_cache_bytes") > 5 * ENTRY_OVERHEAD
    assert value("xai_serve_cache_evictions_total", model="tiny") == 0
    # every request computed is counted in a batch; the hits in none
    assert value("xai_serve_batch_size_sum", **lime) == 5  # 11, 12, 13 and two unseeded
    assert value("xai_serve_batch_size_sum", **cam) == 2


def test_cache_off_by_default() -> None:
    with ServerThread(models=[tiny_model("tiny")]) as s:
        assert s.server is not None and s.server.state.cache is None
        assert all(b.cache is None for b in s.server.state.batchers.values())


def test_an_answer_with_several_classes_is_counted_and_kept_whole() -> None:
    """Every class's map counts against the cache's bytes (the first shares the singular
    fields' tensors), and a hit gives every class back."""
    j = job(target=None, targets=(3, 4))
    one = result(j, 100)
    second = TargetResult(target=4, map=torch.full((100,), 2.0), segment_weights=torch.ones(5))
    several = dataclasses.replace(
        one, per_target=[TargetResult(target=3, map=one.map), second], overlay_png=b"x" * 7
    )
    assert entry_size(several) == entry_size(one) + 400 + 20 + 7
    cache = AnswerCache(1 << 20)
    assert cache.put(key(j), several)
    hit = cache.get(key(j), j)
    assert hit is not None and hit.per_target is not None
    assert [t.target for t in hit.per_target] == [3, 4]
    assert torch.equal(hit.per_target[1].map, second.map)
    assert hit.per_target[0].map is hit.map  # one tensor, not two
    assert cache.bytes == entry_size(several)
