"""Faults inside the server: a model that raises on some inputs, a batch that runs out of
memory, requests cancelled or expired while their batch computes, a client that disconnects in
the middle of a stream. Each test checks what the others in the batch got (answers compared
with the in-process explanation), that the server holds nothing of the failed or abandoned
requests afterwards (queue, in-flight gauge, event-loop tasks) and that it keeps serving.

The faults come from a forward pre-hook on a copy of the tiny model's module
(:class:`Faults`): an input whose pixel ``[0, 0, 0]`` is :data:`POISON` makes the forward raise,
and a forward of more than ``oom_above`` images runs out of memory, either as CUDA's
``torch.OutOfMemoryError`` or as a real CPU allocator failure (an allocation of 2**60 bytes).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch

from tests.reliability.harness import record
from tests.serving.harness import ServerThread, oip_request
from tests.serving.test_server import (
    NAME,
    TIMEOUT,
    assert_close_batched,
    model,
    queue_in_order,
    rand_input,
    reference,
    request,
    stub_of,
    wait_until,
)
from xai_serve.client import decode_tensor
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.config import LimitsConfig, ServerConfig
from xai_serve.serving.engine import ExplainJob, ExplainResult, run_batch

Code = grpc.StatusCode
POISON = 7.25
INTERNAL_RE = re.compile(r"internal error ([0-9a-f]{12}) for request '([^']*)'")

FAULTS_INJECTED = {"raise": 0, "oom": 0}
_FAULTS_LOCK = threading.Lock()


class Faults:
    """A forward pre-hook that injects faults (see the module doc) and records the batch size
    of every forward it sees."""

    def __init__(self) -> None:
        self.oom_above: int | None = None
        self.oom_kind = "cuda"
        self.forwards: list[int] = []

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0]
        self.forwards.append(int(x.shape[0]))
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            with _FAULTS_LOCK:
                FAULTS_INJECTED["oom"] += 1
            if self.oom_kind == "cuda":
                raise torch.OutOfMemoryError(
                    "CUDA out of memory. Tried to allocate 20.00 GiB (injected)"
                )
            torch.empty(2**60, dtype=torch.uint8)  # the CPU allocator refuses: RuntimeError
        if bool((x[:, 0, 0, 0] == POISON).any()):
            with _FAULTS_LOCK:
                FAULTS_INJECTED["raise"] += 1
            raise RuntimeError("injected fault: the model cannot take this input")


def faulty_model() -> tuple[LoadedModel, Faults]:
    """The tiny model (name, layers, transform) with a hooked copy of its module; the
    references keep using the original module."""
    base = model()
    faults = Faults()
    module = copy.deepcopy(base.module)
    module.register_forward_pre_hook(faults)
    loaded = copy.copy(base)
    loaded.module = module
    return loaded, faults


def poisoned(seed: int) -> torch.Tensor:
    x = rand_input(seed)
    x[0, 0, 0] = POISON
    return x


class Valve:
    """A compute wrapper for a batcher: records the request ids of every batch it is given
    (retries included) and lets batch ``i`` run only once ``allow`` has admitted it."""

    def __init__(self, s: ServerThread) -> None:
        self.batches: list[list[str]] = []
        self._allowed = 0
        self._cond = threading.Condition()
        assert s.server is not None
        s.server.state.batchers[NAME]._compute = self

    def __call__(self, jobs: list[ExplainJob]) -> list[ExplainResult]:
        with self._cond:
            i = len(self.batches)
            self.batches.append([j.request_id for j in jobs])
            self._cond.notify_all()
            assert self._cond.wait_for(lambda: self._allowed > i, TIMEOUT)
        return run_batch(jobs)

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._allowed += n
            self._cond.notify_all()

    def open(self) -> None:
        self.allow(10**6)

    def wait_batches(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.batches) >= n, TIMEOUT), self.batches

    def __enter__(self) -> Valve:
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()  # never leave the device thread blocked


def bisection(ids: list[str], fails: Callable[[list[str]], bool]) -> list[list[str]]:
    """The batches a batch of ``ids`` is computed as when a failed batch of several is split
    in two halves, recursively (what the batcher promises)."""
    calls: list[list[str]] = []

    def run(part: list[str]) -> None:
        calls.append(part)
        if fails(part) and len(part) > 1:
            half = len(part) // 2
            run(part[:half])
            run(part[half:])

    run(ids)
    return calls


def server_tasks(s: ServerThread) -> int:
    async def count() -> int:
        return len(asyncio.all_tasks())

    return int(s.call(count()))


def inflight(s: ServerThread) -> float:
    assert s.server is not None
    return float(s.server.metrics.registry.get_sample_value("xai_serve_inflight") or 0.0)


def assert_nothing_left(s: ServerThread, tasks_before: int) -> None:
    """No queued job, no call in flight, no more event-loop tasks than before."""
    assert s.server is not None
    batcher = s.server.state.batchers[NAME]
    wait_until(lambda: batcher.depth == 0, timeout=10)
    wait_until(lambda: inflight(s) == 0, timeout=10)
    wait_until(lambda: server_tasks(s) <= tasks_before, timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _report_injected_faults() -> Iterator[None]:
    yield
    record("faults_injected", **FAULTS_INJECTED)


@pytest.fixture()
def faulty() -> Iterator[tuple[ServerThread, Faults]]:
    loaded, faults = faulty_model()
    with ServerThread(models=[loaded]) as s:
        yield s, faults


def _queue_behind_busy(
    stub: pb_grpc.ExplainerStub, valve: Valve, s: ServerThread, reqs: list[pb.ExplainRequest]
) -> tuple[Any, list[Any]]:
    """Send a ``busy`` request and hold its batch, queue ``reqs`` behind it, release ``busy``:
    ``reqs`` then form one batch, in their order. Returns ``(busy future, futures of reqs)``."""
    assert s.server is not None
    batcher = s.server.state.batchers[NAME]
    busy = stub.Explain.future(request(rand_input(1), request_id="busy"), timeout=TIMEOUT)
    valve.wait_batches(1)
    futures = queue_in_order(stub, batcher, reqs)
    valve.allow(1)
    return busy, futures


# --------------------------------------------------------------------------------------------
# A model that raises on some inputs
# --------------------------------------------------------------------------------------------


def test_model_raising_on_some_inputs_fails_only_those(
    faulty: tuple[ServerThread, Faults], caplog: pytest.LogCaptureFixture
) -> None:
    s, _ = faulty
    bad = {2, 9, 13}
    xs = [poisoned(600 + i) if i in bad else rand_input(600 + i) for i in range(16)]
    refs = {i: reference(xs[i], "gradcam", i % 10) for i in range(16) if i not in bad}
    ids = [f"r{i}" for i in range(16)]
    caplog.set_level(logging.WARNING, logger="xai_serve.serving")
    channel, stub = stub_of(s)
    with channel, Valve(s) as valve:
        reqs = [request(x, target=i % 10, request_id=ids[i]) for i, x in enumerate(xs)]
        busy, futures = _queue_behind_busy(stub, valve, s, reqs)
        valve.open()
        busy.result(timeout=TIMEOUT)
        errors: dict[int, grpc.RpcError] = {}
        for i, fut in enumerate(futures):
            err = fut.exception(timeout=TIMEOUT)
            if err is not None:
                errors[i] = err
                continue
            resp = fut.result()
            assert resp.request_id == ids[i] and resp.target == i % 10
            assert_close_batched(decode_tensor(resp.map), refs[i].maps[0])
        assert set(errors) == bad
        # the batch was bisected: the failing requests were isolated in 2 * log2(16) retries
        poisoned_ids = {ids[i] for i in bad}
        plan = bisection(ids, lambda part: bool(poisoned_ids & set(part)))
        assert valve.batches == [["busy"], *plan]
        assert len(plan) <= 1 + 2 * len(bad) * 4

    # INTERNAL with an error id and the request id; the log has both, with the traceback
    for i, err in errors.items():
        assert err.code() == Code.INTERNAL, err.details()
        found = INTERNAL_RE.search(err.details())
        assert found and found.group(2) == ids[i], err.details()
        assert "injected" not in err.details()
        [rec] = [r for r in caplog.records if found.group(1) in r.getMessage()]
        assert rec.levelno == logging.ERROR
        assert f"request id '{ids[i]}'" in rec.getMessage()
        assert "/xai_serve.v1.Explainer/Explain" in rec.getMessage()
        assert rec.exc_info is not None and "injected fault" in str(rec.exc_info[1])
    record("faults", raised_requests=len(errors), raise_batches=len(plan))

    # the server keeps serving, correctly
    with grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        x = rand_input(650)
        resp = stub.Explain(request(x, target=3, request_id="after"), timeout=TIMEOUT)
        assert_close_batched(decode_tensor(resp.map), reference(x, "gradcam", 3).maps[0])


def test_oip_fault_is_internal_with_its_request_id_in_the_log(
    faulty: tuple[ServerThread, Faults], caplog: pytest.LogCaptureFixture
) -> None:
    """An Open Inference Protocol request carries its id in ``id``, not ``request_id``: the
    INTERNAL answer and the log line name it (they did not before)."""
    s, _ = faulty
    caplog.set_level(logging.ERROR, logger="xai_serve.serving")
    xs = torch.stack([rand_input(660), poisoned(661), rand_input(662)])
    with grpc.insecure_channel(s.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for params in ({}, {"explainer": "gradcam"}):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(oip_request(NAME, xs, "oip-7", **params), timeout=TIMEOUT)
            err = info.value
            assert err.code() == Code.INTERNAL, err.details()
            found = INTERNAL_RE.search(err.details())
            assert found and found.group(2) == "oip-7", err.details()
            [rec] = [r for r in caplog.records if found.group(1) in r.getMessage()]
            assert "request id 'oip-7'" in rec.getMessage()
            assert "ModelInfer" in rec.getMessage()
        resp = stub.ModelInfer(oip_request(NAME, xs[::2], "fine"), timeout=TIMEOUT)
        logits = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
        with torch.no_grad():
            want = model().module(xs[::2])
        torch.testing.assert_close(logits.reshape(2, 10), want, rtol=1e-4, atol=1e-4)


def test_input_that_overflows_the_model_fails_alone(faulty: tuple[ServerThread, Faults]) -> None:
    """A finite input far outside the model's range (its activations overflow to Inf/NaN) is
    INVALID_ARGUMENT, not an OK answer with a NaN map; the others in its batch are answered."""
    s, _ = faulty
    xs = [rand_input(670 + i) for i in range(4)]
    huge = torch.full((3, 64, 64), 3e38)
    huge[:, ::2] *= -1
    xs[1] = huge
    refs = {i: reference(xs[i], "gradcam", i) for i in (0, 2, 3)}
    channel, stub = stub_of(s)
    with channel, Valve(s) as valve:
        reqs = [request(x, target=i, request_id=f"h{i}") for i, x in enumerate(xs)]
        busy, futures = _queue_behind_busy(stub, valve, s, reqs)
        valve.open()
        busy.result(timeout=TIMEOUT)
        err = futures[1].exception(timeout=TIMEOUT)
        assert err is not None and err.code() == Code.INVALID_ARGUMENT, err
        assert "'h1'" in err.details() and "not finite" in err.details()
        for i in (0, 2, 3):
            resp = futures[i].result(timeout=TIMEOUT)
            assert resp.timing.batch_size == 4  # computed together, failed alone
            assert_close_batched(decode_tensor(resp.map), refs[i].maps[0])
        assert valve.batches == [["busy"], ["h0", "h1", "h2", "h3"]]  # no retry needed


# --------------------------------------------------------------------------------------------
# Out of memory
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_batch_is_split_until_it_fits(
    faulty: tuple[ServerThread, Faults], caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    s, faults = faulty
    faults.oom_kind = kind
    xs = [rand_input(700 + i) for i in range(16)]
    refs = [reference(x, "gradcam", i % 10) for i, x in enumerate(xs)]
    ids = [f"m{i}" for i in range(16)]
    caplog.set_level(logging.WARNING, logger="xai_serve.serving")
    channel, stub = stub_of(s)
    with channel, Valve(s) as valve:
        faults.oom_above = 4
        reqs = [request(x, target=i % 10, request_id=ids[i]) for i, x in enumerate(xs)]
        busy, futures = _queue_behind_busy(stub, valve, s, reqs)
        valve.open()
        busy.result(timeout=TIMEOUT)
        for i, fut in enumerate(futures):
            resp = fut.result(timeout=TIMEOUT)  # nothing failed
            assert resp.request_id == ids[i] and resp.target == i % 10
            assert resp.timing.batch_size == 4
            assert_close_batched(decode_tensor(resp.map), refs[i].maps[0])
        # 16 runs out of memory: halves of 8, and batches of this kind are capped at 8; the
        # first 8 runs out too: halves of 4, cap 4; so the second 8 is cut to 4s up front
        plan = [ids, ids[:8], ids[:4], ids[4:8], ids[8:12], ids[12:]]
        assert valve.batches == [["busy"], *plan]
        assert max(faults.forwards[-4:]) == 4
    splits = [r for r in caplog.records if "splitting it in two" in r.getMessage()]
    assert len(splits) == 2 and all(r.levelno == logging.WARNING for r in splits)
    assert "'m0', 'm1'" in splits[0].getMessage()
    caps = [r.getMessage() for r in caplog.records if "are capped at" in r.getMessage()]
    assert [c.split("capped at ")[1].split()[0] for c in caps] == ["8", "4"], caps
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    record(f"oom_{kind}", batches=len(plan), failed=0)

    # the batches taken next are capped up front: no forward of more than 4, nothing retried
    assert s.server is not None
    batcher = s.server.state.batchers[NAME]
    channel, stub = stub_of(s)
    with channel, Valve(s) as valve:
        faults.forwards.clear()
        reqs = [request(x, target=i % 10, request_id=f"n{i}") for i, x in enumerate(xs)]
        busy, futures = _queue_behind_busy(stub, valve, s, reqs)
        valve.open()
        busy.result(timeout=TIMEOUT)
        for i, fut in enumerate(futures):
            assert_close_batched(decode_tensor(fut.result(timeout=TIMEOUT).map), refs[i].maps[0])
        assert [len(b) for b in valve.batches[1:]] == [4, 4, 4, 4]
        assert max(faults.forwards) == 4

    # once the memory lapses, a full batch is tried again (and fits, with memory freed)
    batcher.oom_memory_s = 0.0
    faults.oom_above = None
    caplog.set_level(logging.INFO, logger="xai_serve.serving")
    channel, stub = stub_of(s)
    with channel, Valve(s) as valve:
        busy, futures = _queue_behind_busy(stub, valve, s, reqs)
        valve.open()
        busy.result(timeout=TIMEOUT)
        for i, fut in enumerate(futures):
            resp = fut.result(timeout=TIMEOUT)
            assert resp.timing.batch_size == 16
            assert_close_batched(decode_tensor(resp.map), refs[i].maps[0])
    assert "trying batches of up to 16 gradcam jobs again" in caplog.text

    # a request that does not fit even alone: RESOURCE_EXHAUSTED (not INTERNAL), its own only
    faults.oom_above = 0
    with grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Explain(request(xs[0], target=0, request_id="huge"), timeout=TIMEOUT)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED, info.value.details()
        assert "'huge'" in info.value.details() and "out of memory" in info.value.details()
        faults.oom_above = None
        resp = stub.Explain(request(xs[1], target=1, request_id="fits"), timeout=TIMEOUT)
        assert_close_batched(decode_tensor(resp.map), refs[1].maps[0])


def test_out_of_memory_on_the_logits_forward_is_split(
    faulty: tuple[ServerThread, Faults],
) -> None:
    """The Open Inference Protocol's plain forward (logits, no explainer) splits too: its
    images are jobs of the batcher, whose policy (halves, and a cap of n / 2 on the jobs of
    that kind after a batch of n ran out of memory) applies as to explanations."""
    s, faults = faulty
    xs = torch.stack([rand_input(720 + i) for i in range(8)])
    with torch.no_grad():
        want = model().module(xs)
    with grpc.insecure_channel(s.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        faults.oom_above = 2
        faults.forwards.clear()
        resp = stub.ModelInfer(oip_request(NAME, xs, "split"), timeout=TIMEOUT)
        logits = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
        torch.testing.assert_close(logits.reshape(8, 10), want, rtol=1e-4, atol=1e-4)
        # 8 fails (cap 4); its first half, 4, fails (cap 2) and runs as 2 + 2; the second
        # half is cut to the cap up front: 2 + 2, without failing again
        assert faults.forwards == [8, 4, 2, 2, 2, 2]
        faults.oom_above = 0
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(oip_request(NAME, xs[:1], "alone"), timeout=TIMEOUT)
        assert info.value.code() == Code.RESOURCE_EXHAUSTED, info.value.details()
        assert "out of memory" in info.value.details()


# --------------------------------------------------------------------------------------------
# Cancellation and deadlines while the batch computes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("also_fails", [False, True], ids=["batch-ok", "batch-fails"])
def test_cancelled_and_expired_mid_batch(
    faulty: tuple[ServerThread, Faults], also_fails: bool
) -> None:
    """Of a batch of four that is computing, one request is cancelled and one expires; the
    other two get their answers. When the batch also fails (a poisoned input), the retries
    leave the cancelled and expired requests out."""
    s, _ = faulty
    xs = [rand_input(800 + i) for i in range(4)]
    if also_fails:
        xs[3] = poisoned(803)
    refs = [reference(x, "gradcam", i + 1) for i, x in enumerate(xs)]
    tasks_before = server_tasks(s)
    channel, stub = stub_of(s)
    with channel, Valve(s) as valve:
        reqs = [request(x, target=i + 1, request_id=f"k{i}") for i, x in enumerate(xs)]
        busy = stub.Explain.future(request(rand_input(1), request_id="busy"), timeout=TIMEOUT)
        valve.wait_batches(1)
        assert s.server is not None
        batcher = s.server.state.batchers[NAME]
        futures = queue_in_order(stub, batcher, reqs, [TIMEOUT, TIMEOUT, 3.0, TIMEOUT])
        valve.allow(1)
        valve.wait_batches(2)
        assert valve.batches[1] == ["k0", "k1", "k2", "k3"]  # computing now
        assert futures[1].cancel()
        err = futures[2].exception(timeout=TIMEOUT)  # its deadline passes while it computes
        assert err is not None and err.code() == Code.DEADLINE_EXCEEDED
        valve.open()
        busy.result(timeout=TIMEOUT)
        resp = futures[0].result(timeout=TIMEOUT)
        assert resp.request_id == "k0"
        assert_close_batched(decode_tensor(resp.map), refs[0].maps[0])
        assert futures[1].cancelled()
        if also_fails:
            err = futures[3].exception(timeout=TIMEOUT)
            assert err is not None and err.code() == Code.INTERNAL
            # the failed batch's halves: k1 (cancelled) and k2 (expired) are not recomputed
            assert valve.batches == [["busy"], ["k0", "k1", "k2", "k3"], ["k0"], ["k3"]]
        else:
            resp = futures[3].result(timeout=TIMEOUT)
            assert_close_batched(decode_tensor(resp.map), refs[3].maps[0])
            assert resp.timing.batch_size == 4
            assert valve.batches == [["busy"], ["k0", "k1", "k2", "k3"]]
    assert_nothing_left(s, tasks_before)


def _wrong_answer(resp: pb.ExplainResponse, rid: str, target: int, want: torch.Tensor) -> str:
    """'' if ``resp`` answers request ``rid`` (target ``target``, map ``want``), else what
    differs (checked in client threads, where an assert would go unseen)."""
    if resp.request_id != rid or resp.target != target:
        return f"got {resp.request_id!r} target {resp.target} for {rid!r} target {target}"
    try:
        assert_close_batched(decode_tensor(resp.map), want)
    except AssertionError as exc:
        return f"{rid}: map differs: {exc}"
    return ""


def test_cancellation_and_deadline_storm_under_load() -> None:
    """16 clients, 240 requests: a quarter cancelled at a random moment, a quarter with a
    deadline of 20-300 ms, the rest ordinary. Every ordinary request gets its own correct
    answer, no request is refused for a queue held by abandoned requests, and afterwards the
    server holds nothing of them."""
    import random

    clients, per_client = 16, 15
    pool = [rand_input(900 + i) for i in range(8)]
    refs = [reference(x, "gradcam", i) for i, x in enumerate(pool)]
    cfg = ServerConfig(host="127.0.0.1", port=0, warmup=False, limits=LimitsConfig(max_queue=24))
    outcomes: list[tuple[str, Code, str]] = []  # (behaviour, code, what is wrong with it)
    lock = threading.Lock()
    with ServerThread(cfg, models=[model()]) as s:
        tasks_before = server_tasks(s)

        def client(c: int) -> None:
            rng = random.Random(c)
            options = [("grpc.use_local_subchannel_pool", 1)]
            with grpc.insecure_channel(s.address, options=options) as channel:
                stub = pb_grpc.ExplainerStub(channel)
                for n in range(per_client):
                    i = rng.randrange(len(pool))
                    behaviour = rng.choice(["plain", "plain", "cancel", "deadline"])
                    timeout = rng.uniform(0.02, 0.3) if behaviour == "deadline" else TIMEOUT
                    rid = f"c{c}-{n}-{i}"
                    fut = stub.Explain.future(
                        request(pool[i], target=i, request_id=rid), timeout=timeout
                    )
                    if behaviour == "cancel":
                        time.sleep(rng.uniform(0.0, 0.2))
                        fut.cancel()
                    wrong = ""
                    if fut.cancelled():
                        code = Code.CANCELLED
                    else:
                        err = fut.exception(timeout=TIMEOUT)
                        code = Code.OK if err is None else err.code()
                        if err is None:
                            wrong = _wrong_answer(fut.result(), rid, i, refs[i].maps[0])
                    with lock:
                        outcomes.append((behaviour, code, wrong))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert len(outcomes) == clients * per_client
        allowed = {
            "plain": {Code.OK},
            "cancel": {Code.OK, Code.CANCELLED},
            "deadline": {Code.OK, Code.DEADLINE_EXCEEDED},
        }
        wrong = [o for o in outcomes if o[1] not in allowed[o[0]] or o[2]]
        assert not wrong, wrong
        counts = {b: sum(1 for o in outcomes if o[0] == b and o[1] != Code.OK) for b in allowed}
        assert counts["cancel"] > 0 and counts["deadline"] > 0, counts
        assert_nothing_left(s, tasks_before)
        with grpc.insecure_channel(s.address) as channel:
            stub = pb_grpc.ExplainerStub(channel)
            futures = [
                stub.Explain.future(request(pool[i], target=i), timeout=TIMEOUT) for i in range(8)
            ]
            for i, fut in enumerate(futures):
                assert_close_batched(decode_tensor(fut.result().map), refs[i].maps[0])
    record(
        "cancel_deadline_storm",
        requests=len(outcomes),
        cancelled=counts["cancel"],
        expired=counts["deadline"],
        failed_ordinary=0,
    )


# --------------------------------------------------------------------------------------------
# A client that disconnects in the middle of a stream
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "close-channel"])
def test_stream_client_disconnect_leaves_nothing(
    faulty: tuple[ServerThread, Faults], how: str
) -> None:
    """A stream of 12 requests: 4 computing, 8 queued, when the client goes away. The queued
    ones are never computed, the computing batch's answers are dropped, and the server's
    queue, in-flight gauge and tasks are back where they were; the next request is served."""
    s, _ = faulty
    xs = [rand_input(1000 + i) for i in range(12)]
    tasks_before = server_tasks(s)
    assert s.server is not None
    batcher = s.server.state.batchers[NAME]
    with Valve(s) as valve:
        channel = grpc.insecure_channel(s.address)
        stub = pb_grpc.ExplainerStub(channel)
        busy = stub.Explain.future(request(rand_input(1), request_id="busy"), timeout=TIMEOUT)
        valve.wait_batches(1)
        done = threading.Event()

        def requests() -> Iterator[pb.ExplainRequest]:
            for i, x in enumerate(xs):
                yield request(x, target=i % 10, request_id=f"s{i}")
            done.wait(TIMEOUT)  # keep the stream open: a client still writing

        call = stub.ExplainStream(requests(), timeout=TIMEOUT)
        wait_until(lambda: batcher.depth == 12)
        # the first four go into a batch of their own: max_batch_size is 16, so shrink it
        batcher.max_batch_size = 4
        valve.allow(1)
        valve.wait_batches(2)
        assert valve.batches[1] == ["s0", "s1", "s2", "s3"]
        assert inflight(s) >= 1
        if how == "cancel":
            call.cancel()
        else:
            channel.close()
        wait_until(lambda: batcher.depth == 0, timeout=10)
        valve.open()
        if how == "cancel":
            assert busy.result(timeout=TIMEOUT).request_id == "busy"
            channel.close()
        done.set()
        batcher.max_batch_size = 16
        assert_nothing_left(s, tasks_before)
        assert valve.batches == [["busy"], ["s0", "s1", "s2", "s3"]]  # nothing else computed
    with grpc.insecure_channel(s.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        x = rand_input(1050)
        answers = list(stub.ExplainStream(iter([request(x, target=2, request_id="z")])))
        assert [a.request_id for a in answers] == ["z"]
        assert_close_batched(decode_tensor(answers[0].map), reference(x, "gradcam", 2).maps[0])
