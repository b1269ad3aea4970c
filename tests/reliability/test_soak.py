"""The server under sustained load, in its own process (``python -m xai_serve.serving``), as
an operator runs it: 16 concurrent clients, each on its own connection, mixing methods, both
models (a torchvision state dict and a TorchScript file) and RPCs (``Explain``,
``ExplainStream``, the Open Inference Protocol's ``ModelInfer``), with encoded images and raw
tensors. Every answer is checked against its own request's in-process reference.

From outside the process (``/proc/<pid>``): resident memory after warm-up grows by less than
5% from the first to the last window of requests (medians of samples taken every 50 ms), and
once the clients are gone the process has the file descriptors it had before they came and no
more threads than after warm-up. The server's own metrics agree: every request counted OK.

``test_soak_fast`` (CI): 500 warm-up + 400 measured requests, windows of 100.
``test_soak_full`` (``-m soak``): 500 warm-up + 5,000 measured requests, windows of 1,000.
``test_sigterm_under_load``: SIGTERM while the 16 clients keep sending.
"""

from __future__ import annotations

import random
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tests.reliability.harness import (
    Catalogue,
    Kind,
    RssSampler,
    ServerProcess,
    check_answer,
    load_reference_modules,
    record,
    write_models,
)
from tests.serving.harness import oip_request
from tests.serving.served import GRACE_S, assert_drained
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc

CLIENTS = 16
TIMEOUT = 60.0
MAX_RSS_GROWTH = 0.05
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("soak")
    write_models(d)
    return d


@pytest.fixture(scope="module")
def catalogue(workdir: Path) -> Catalogue:
    files = {"tiny": workdir / "models/resnet18.pt", "tinyts": workdir / "models/small_cnn.pt"}
    return Catalogue(load_reference_modules(files))


@pytest.fixture()
def server(workdir: Path, tmp_path: Path) -> Iterator[ServerProcess]:
    (tmp_path / "models").symlink_to(workdir / "models", target_is_directory=True)
    with ServerProcess(tmp_path, grace_s=GRACE_S) as s:
        s.wait_serving()
        yield s


# --------------------------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------------------------


def _check_logits(resp: oip.ModelInferResponse, kind: Kind, request_id: str) -> str | None:
    want = kind.reference.logits[0].detach().float()
    if resp.id != request_id or resp.model_name != kind.model:
        return f"ModelInfer answered {resp.model_name}/{resp.id!r} for {request_id!r}"
    got = torch.frombuffer(bytearray(resp.raw_output_contents[0]), dtype=torch.float32)
    if got.numel() != want.numel():
        return f"logits of {got.numel()} values, not {want.numel()}"
    err = float((got - want).abs().max())
    if err > 1e-3 * (float(want.abs().max()) or 1.0):
        return f"logits differ by {err:.3g}"
    return None


@dataclass
class Load:
    """16 clients sending mixed requests until ``total`` are answered (or ``stop`` is set)."""

    address: str
    catalogue: Catalogue
    total: int
    seed: int = 0
    clients: int = CLIENTS
    refusals: int | None = None  # a client stops after this many UNAVAILABLE answers
    stop: threading.Event = field(default_factory=threading.Event)
    # (start, end, rpc, code, what is wrong or None) of every request
    outcomes: list[tuple[float, float, str, Code, str | None]] = field(default_factory=list)
    _next: int = 0
    _done: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        return self._done

    def _ticket(self, n: int) -> tuple[int, int] | None:
        """``(first request number, count)`` for up to ``n`` more requests; None when done."""
        with self._lock:
            if self._next >= self.total or self.stop.is_set():
                return None
            n = min(n, self.total - self._next)
            start, self._next = self._next, self._next + n
            return start, n

    def _finish(self, items: list[tuple[float, float, str, Code, str | None]]) -> None:
        with self._lock:
            self.outcomes.extend(items)
            self._done += len(items)

    def _client(self, c: int) -> None:
        rng = random.Random(self.seed * 1000 + c)
        kinds = self.catalogue.kinds
        # a connection of its own (grpc shares one per target in a process by default)
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            explain = pb_grpc.ExplainerStub(channel)
            infer = oip_grpc.GRPCInferenceServiceStub(channel)
            refused = 0
            while self.refusals is None or refused < self.refusals:
                if refused:
                    time.sleep(0.05)  # refused: try again a little later, as clients do
                op = rng.random()
                ticket = self._ticket(4 if op < 0.1 else 1)
                if ticket is None:
                    return
                first, n = ticket
                picked = [rng.choice(kinds) for _ in range(n)]
                ids = [f"c{c}-{first + i}" for i in range(n)]
                start = time.monotonic()
                if op < 0.1:
                    items = self._stream(explain, picked, ids, start)
                elif op < 0.2:
                    items = [self._logits(infer, picked[0], ids[0], start)]
                else:
                    items = [self._unary(explain, picked[0], ids[0], start)]
                self._finish(items)
                refused += any(item[3] == Code.UNAVAILABLE for item in items)

    def _unary(
        self, stub: pb_grpc.ExplainerStub, kind: Kind, rid: str, start: float
    ) -> tuple[float, float, str, Code, str | None]:
        try:
            resp = stub.Explain(kind.request(rid), timeout=TIMEOUT)
        except grpc.RpcError as err:
            return start, time.monotonic(), "Explain", err.code(), err.details()
        return start, time.monotonic(), "Explain", Code.OK, check_answer(resp, kind, rid)

    def _logits(
        self, stub: oip_grpc.GRPCInferenceServiceStub, kind: Kind, rid: str, start: float
    ) -> tuple[float, float, str, Code, str | None]:
        try:
            resp = stub.ModelInfer(oip_request(kind.model, kind.input[None], rid), timeout=TIMEOUT)
        except grpc.RpcError as err:
            return start, time.monotonic(), "ModelInfer", err.code(), err.details()
        return start, time.monotonic(), "ModelInfer", Code.OK, _check_logits(resp, kind, rid)

    def _stream(
        self, stub: pb_grpc.ExplainerStub, kinds: list[Kind], ids: list[str], start: float
    ) -> list[tuple[float, float, str, Code, str | None]]:
        reqs = [k.request(rid) for k, rid in zip(kinds, ids, strict=True)]
        by_id = dict(zip(ids, kinds, strict=True))
        out = []
        try:
            for resp in stub.ExplainStream(iter(reqs), timeout=TIMEOUT):
                end = time.monotonic()
                kind = by_id.pop(resp.request_id, None)
                if kind is None:
                    out.append((start, end, "ExplainStream", Code.OK, f"stray {resp.request_id}"))
                elif resp.HasField("error"):
                    code = _code_of(resp.error.code)
                    out.append((start, end, "ExplainStream", code, resp.error.message))
                else:
                    problem = check_answer(resp, kind, resp.request_id)
                    out.append((start, end, "ExplainStream", Code.OK, problem))
        except grpc.RpcError as err:
            end = time.monotonic()
            out += [(start, end, "ExplainStream", err.code(), err.details()) for _ in by_id]
            by_id.clear()
        end = time.monotonic()
        out += [(start, end, "ExplainStream", Code.UNKNOWN, f"{rid}: no answer") for rid in by_id]
        return out

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._client, args=(c,), name=f"load-{c}")
            for c in range(self.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def failures(self) -> list[tuple[str, Code, str | None]]:
        return [
            (rpc, code, why) for _, _, rpc, code, why in self.outcomes if code != Code.OK or why
        ]


def _code_of(value: int) -> Code:
    for code in Code:
        if code.value[0] == value:
            return code
    raise AssertionError(f"unknown status code {value}")


# --------------------------------------------------------------------------------------------
# Soak
# --------------------------------------------------------------------------------------------


def _served_ok(server: ServerProcess) -> dict[str, float]:
    """The server's own count of answered requests, by status code (all RPCs)."""
    counts: dict[str, float] = {}
    for (name, labels), value in server.metrics().items():
        if name == "xai_serve_requests_total":
            code = dict(labels)["code"]
            counts[code] = counts.get(code, 0.0) + value
    return counts


def soak(
    server: ServerProcess, catalogue: Catalogue, *, warmup: int, measured: int, window: int
) -> dict[str, Any]:
    """Run ``warmup`` then ``measured`` requests; assert the soak's promises; return figures."""
    assert measured % window == 0 and measured >= 2 * window
    before = server.quiet_status()
    started = time.monotonic()
    load = Load(server.address, catalogue, warmup + measured, seed=warmup + measured)
    with RssSampler(server.pid) as rss:
        sampler_thread = threading.Thread(target=_label_loop, args=(rss, load, warmup, window))
        sampler_thread.start()
        warm: dict[str, int] = {}
        watcher = threading.Thread(target=_watch_warmup, args=(server, load, warmup, warm))
        watcher.start()
        load.run()
        load.stop.set()
        watcher.join()
        sampler_thread.join()
    wall = time.monotonic() - started

    failures = load.failures()
    assert len(load.outcomes) == warmup + measured
    assert not failures, failures[:10]

    rss_first = statistics.median(rss.of("0"))
    rss_last = statistics.median(rss.of(str(measured // window - 1)))
    growth = (rss_last - rss_first) / rss_first
    # the clients are gone: their connections close, no thread stays behind
    fds_after = server.settle("fds", before["fds"])
    threads_after = server.settle("threads", warm["threads"])
    counts = _served_ok(server)
    figures = {
        "requests": len(load.outcomes),
        "warmup_requests": warmup,
        "measured_requests": measured,
        "window": window,
        "failures": len(failures),
        "by_rpc": {
            rpc: sum(1 for o in load.outcomes if o[2] == rpc)
            for rpc in ("Explain", "ExplainStream", "ModelInfer")
        },
        "rss_mb_first_window": round(rss_first / 1024, 1),
        "rss_mb_last_window": round(rss_last / 1024, 1),
        "rss_growth_pct": round(100 * growth, 2),
        "rss_mb_window_medians": [
            round(statistics.median(rss.of(str(w))) / 1024, 1) for w in range(measured // window)
        ],
        "rss_mb_peak": round(rss.peak_kb / 1024, 1),
        "fds_before": before["fds"],
        "fds_loaded": warm["fds"],
        "fds_after": fds_after,
        "threads_before": before["threads"],
        "threads_after_warmup": warm["threads"],
        "threads_after": threads_after,
        "server_counted_ok": counts.get("OK", 0),
        "wall_s": round(wall, 1),
        "requests_per_s": round(len(load.outcomes) / wall, 1),
    }
    assert growth < MAX_RSS_GROWTH, figures
    assert warm["fds"] >= before["fds"] + CLIENTS, figures  # each client had its connection
    assert fds_after == before["fds"], figures
    assert threads_after <= warm["threads"], figures
    # the server's count: every Explain/ModelInfer call and every streamed request, all OK
    assert set(counts) == {"OK"}, counts
    assert counts["OK"] >= len(load.outcomes), counts
    return figures


def _label_loop(rss: RssSampler, load: Load, warmup: int, window: int) -> None:
    """Tag the memory samples with the window of measured requests they fall in."""
    while not load.stop.is_set():
        done = load.done
        rss.mark("warmup" if done < warmup else str((done - warmup) // window))
        time.sleep(0.01)


def _watch_warmup(server: ServerProcess, load: Load, warmup: int, out: dict[str, int]) -> None:
    """Read the process's fds and threads when warm-up ends (the clients still connected)."""
    while load.done < warmup and not load.stop.is_set():
        time.sleep(0.01)
    out.update(server.status())


def test_soak_fast(server: ServerProcess, catalogue: Catalogue) -> None:
    figures = soak(server, catalogue, warmup=500, measured=400, window=100)
    record("soak_fast", **figures)


@pytest.mark.slow
@pytest.mark.soak
def test_soak_full(server: ServerProcess, catalogue: Catalogue) -> None:
    figures = soak(server, catalogue, warmup=500, measured=5000, window=1000)
    record("soak_full", **figures)


# --------------------------------------------------------------------------------------------
# SIGTERM under load
# --------------------------------------------------------------------------------------------


def test_sigterm_under_load(server: ServerProcess, catalogue: Catalogue) -> None:
    """SIGTERM while 16 clients keep sending: the requests in flight finish with their correct
    answers, requests sent once draining began are refused (UNAVAILABLE), nothing else
    happens to any request, and the process exits 0 within the grace period."""
    load = Load(server.address, catalogue, total=10**9, seed=7, refusals=3)
    clients = threading.Thread(target=load.run)
    clients.start()
    while load.done < 150:  # well under way
        assert clients.is_alive() and server.proc.poll() is None
        time.sleep(0.01)
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.wait_not_serving(timeout=10)
    not_serving_at = time.monotonic()
    code = server.proc.wait(GRACE_S + 30)
    exited_after = time.monotonic() - sigterm_at
    load.stop.set()
    clients.join(TIMEOUT)

    outcomes = load.outcomes
    wrong = [
        o for o in outcomes if o[3] not in (Code.OK, Code.UNAVAILABLE) or (o[3] == Code.OK and o[4])
    ]
    assert not wrong, (sigterm_at, not_serving_at, wrong[:10], server.log[-3000:])
    in_flight = [o for o in outcomes if o[0] < sigterm_at < o[1]]
    finished = [o for o in in_flight if o[3] == Code.OK]
    assert finished, "no request was in flight at SIGTERM"
    # sent long enough before SIGTERM to be in the server's hands: finished, not refused
    early = [o for o in in_flight if o[0] < sigterm_at - 1.0]
    assert all(o[3] == Code.OK for o in early), early
    refused = [o for o in outcomes if o[3] == Code.UNAVAILABLE]
    late = [o for o in outcomes if o[0] > not_serving_at]
    assert late and all(o[3] == Code.UNAVAILABLE for o in late), late[:10]
    assert_drained(server, code, exited_after)
    record(
        "sigterm_under_load",
        requests=len(outcomes),
        in_flight_at_sigterm=len(in_flight),
        finished_after_sigterm=len(finished),
        refused_unavailable=len(refused),
        other_failures=0,
        exit_code=code,
        exit_s_after_sigterm=round(exited_after, 2),
        grace_s=GRACE_S,
    )
