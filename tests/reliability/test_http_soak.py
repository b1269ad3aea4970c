"""The HTTP listener in the soak: the server in its own process with ``http_port`` on, 8 HTTP
clients (each on its own keep-alive connection) sending KServe v1 ``:explain`` and
``:predict`` (raw tensors as nested lists, encoded images as base64) and Open Inference
Protocol ``/infer`` requests (binary tensor data, the ``explainer`` parameter), while 2 gRPC
clients of :mod:`tests.reliability.test_soak` keep sending on the gRPC port. Every answer, on
either port, is checked against its own request's in-process reference.

From outside the process (``/proc/<pid>``): resident memory grows by less than 5% from the
first to the last window of HTTP requests (medians of samples taken every 50 ms); once the
clients are gone the process has the file descriptors it had before they came and no more
threads than after warm-up. The server's own metrics count every request, HTTP routes
included, as OK.

``test_http_soak_fast``: 120 warm-up + ``XAI_SERVE_HTTP_SOAK_REQUESTS`` (default 210, a
multiple of 3) measured HTTP requests in three windows; ``test_http_soak_full`` (``-m soak``):
300 + 3,000, windows of 500.
"""

from __future__ import annotations

import base64
import json
import os
import random
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.reliability.harness import (
    Catalogue,
    Kind,
    RssSampler,
    map_problem,
    record,
    write_models,
)
from tests.reliability.test_http_fuzz import HttpServerProcess
from tests.reliability.test_soak import Load, _served_ok
from tests.serving.served import GRACE_S
from xai_serve.explainers.base import OPTION_SCHEMA

httpx = pytest.importorskip("httpx")

HTTP_CLIENTS = 8
GRPC_CLIENTS = 2
TIMEOUT = 60.0
MAX_RSS_GROWTH = 0.05
HEADER_LENGTH = "Inference-Header-Content-Length"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("http-soak")
    write_models(d)
    return d


@pytest.fixture(scope="module")
def catalogue(workdir: Path) -> Catalogue:
    from tests.reliability.harness import load_reference_modules

    files = {"tiny": workdir / "models/resnet18.pt", "tinyts": workdir / "models/small_cnn.pt"}
    return Catalogue(load_reference_modules(files))


@pytest.fixture()
def server(workdir: Path, tmp_path: Path) -> Iterator[HttpServerProcess]:
    (tmp_path / "models").symlink_to(workdir / "models", target_is_directory=True)
    with HttpServerProcess(tmp_path, grace_s=GRACE_S) as s:
        s.wait_serving()
        yield s


# --------------------------------------------------------------------------------------------
# Requests and their checks
# --------------------------------------------------------------------------------------------

_WORDS = {
    name: {number: word for word, number in spec.enum}
    for name, spec in OPTION_SCHEMA.items()
    if spec.kind == "choice"
}


def _params(kind: Kind) -> dict[str, Any]:
    """The kind's method options as request parameters (choices by their word)."""
    out: dict[str, Any] = {}
    for name, value in kind.options.items():
        out[name] = _WORDS[name][value] if name in _WORDS else value
    if kind.target is not None:
        out["target"] = kind.target
    return out


def _instance(kind: Kind) -> Any:
    """The kind's input as a v1 instance: its image as base64, or its tensor as nested lists."""
    if kind.png is not None:
        return {"b64": base64.b64encode(kind.png).decode()}
    return kind.input.tolist()


def v1_explain(http: httpx.Client, kind: Kind) -> str | None:
    instance = _instance(kind)
    body = {"instances": [instance],
            "parameters": {"method": kind.method, "top_k": 3, **_params(kind)}}  # fmt: skip
    r = http.post(f"/v1/models/{kind.model}:explain", json=body)
    if r.status_code != 200:
        return f"{r.status_code}: {r.text[:300]}"
    (one,) = r.json()["explanations"]
    ref = kind.reference
    if (one["method"], one["target"]) != (kind.method, int(ref.targets[0])):
        return f"answered {one['method']}/{one['target']} for {kind.method}/{int(ref.targets[0])}"
    problem = map_problem(torch.tensor(one["map"]), ref.maps[0].detach().float())
    if problem:
        return problem
    top = int(ref.logits[0].argmax())
    if not one["top_k"] or one["top_k"][0]["index"] != top:
        return f"top-1 {[c['index'] for c in one['top_k']]} != {top}"
    if "seed" in kind.options and one.get("seed") != kind.options["seed"]:
        return f"seed {one.get('seed')} != {kind.options['seed']}"
    return None


def v1_predict(http: httpx.Client, kind: Kind) -> str | None:
    instance = _instance(kind)
    r = http.post(f"/v1/models/{kind.model}:predict", json={"instances": [instance]})
    if r.status_code != 200:
        return f"{r.status_code}: {r.text[:300]}"
    (got,) = r.json()["predictions"]
    want = torch.softmax(kind.reference.logits[0].detach().double(), 0).numpy()
    if not np.allclose(got, want, rtol=1e-3, atol=1e-5):
        return f"predictions differ by {np.abs(np.asarray(got) - want).max():.3g}"
    return None


def v2_infer(http: httpx.Client, kind: Kind, request_id: str) -> str | None:
    x = kind.input[None].contiguous().numpy().astype("<f4")
    raw = x.tobytes()
    head = json.dumps({
        "id": request_id,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": len(raw)}}],
        "parameters": {"explainer": kind.method, "binary_data_output": True, **_params(kind)},
    }).encode()  # fmt: skip
    r = http.post(
        f"/v2/models/{kind.model}/infer", content=head + raw,
        headers={HEADER_LENGTH: str(len(head)), "content-type": "application/octet-stream"},
    )  # fmt: skip
    if r.status_code != 200:
        return f"{r.status_code}: {r.text[:300]}"
    n = int(r.headers[HEADER_LENGTH])
    answer, blob = json.loads(r.content[:n]), r.content[n:]
    if answer.get("id") != request_id or answer["model_name"] != kind.model:
        return f"answered {answer['model_name']}/{answer.get('id')} for {request_id}"
    outputs, offset = {}, 0
    for out in answer["outputs"]:
        size = out["parameters"]["binary_data_size"]
        dtype = {"FP32": "<f4", "INT64": "<i8"}[out["datatype"]]
        outputs[out["name"]] = np.frombuffer(blob[offset : offset + size], dtype).reshape(
            out["shape"]
        )
        offset += size
    ref = kind.reference
    if int(outputs["target"][0]) != int(ref.targets[0]):
        return f"target {outputs['target']} != {int(ref.targets[0])}"
    problem = map_problem(torch.from_numpy(outputs["explanation"][0].copy()), ref.maps[0].float())
    if problem:
        return problem
    want = ref.logits[0].detach().float()
    err = float((torch.from_numpy(outputs["logits"][0].copy()) - want).abs().max())
    if err > 1e-3 * (float(want.abs().max()) or 1.0):
        return f"logits differ by {err:.3g}"
    return None


@dataclass
class HttpLoad:
    """HTTP clients sending mixed requests until ``total`` are answered."""

    base: str
    catalogue: Catalogue
    total: int
    seed: int = 0
    clients: int = HTTP_CLIENTS
    # (start, end, route, HTTP status or 0, what is wrong or None)
    outcomes: list[tuple[float, float, str, str | None]] = field(default_factory=list)
    _next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def done(self) -> int:
        return len(self.outcomes)

    def _ticket(self) -> int | None:
        with self._lock:
            if self._next >= self.total:
                return None
            self._next += 1
            return self._next - 1

    def _client(self, c: int) -> None:
        rng = random.Random(self.seed * 1000 + c)
        with httpx.Client(base_url=self.base, timeout=TIMEOUT) as http:
            while (n := self._ticket()) is not None:
                kind = rng.choice(self.catalogue.kinds)
                op = rng.random()
                start = time.monotonic()
                try:
                    if op < 0.6:
                        route, problem = ":explain", v1_explain(http, kind)
                    elif op < 0.85:
                        route, problem = "/infer", v2_infer(http, kind, f"h{c}-{n}")
                    else:
                        route, problem = ":predict", v1_predict(http, kind)
                except httpx.HTTPError as exc:
                    route, problem = "?", f"no answer: {type(exc).__name__}: {exc}"
                with self._lock:
                    self.outcomes.append((start, time.monotonic(), route, problem))

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._client, args=(c,), name=f"http-load-{c}")
            for c in range(self.clients)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


# --------------------------------------------------------------------------------------------
# Soak
# --------------------------------------------------------------------------------------------


def http_soak(
    server: HttpServerProcess, catalogue: Catalogue, *, warmup: int, measured: int, window: int
) -> dict[str, Any]:
    assert measured % window == 0 and measured >= 2 * window
    before = server.quiet_status()
    started = time.monotonic()
    load = HttpLoad(server.base, catalogue, warmup + measured, seed=measured)
    grpc_load = Load(server.address, catalogue, total=10**9, seed=measured + 1,
                     clients=GRPC_CLIENTS)  # fmt: skip
    warm: dict[str, int] = {}
    with RssSampler(server.pid) as rss:
        grpc_thread = threading.Thread(target=grpc_load.run, name="grpc-load")
        grpc_thread.start()
        done = threading.Event()
        labeller = threading.Thread(
            target=_label_loop, args=(rss, load, warmup, window, server, warm, done)
        )
        labeller.start()
        try:
            load.run()
        finally:
            done.set()
            grpc_load.stop.set()
            grpc_thread.join(TIMEOUT)
            labeller.join()
    wall = time.monotonic() - started

    failures = [(route, why) for _, _, route, why in load.outcomes if why]
    grpc_failures = grpc_load.failures()
    assert len(load.outcomes) == warmup + measured
    assert not failures, failures[:10]
    assert not grpc_failures, grpc_failures[:10]
    windows = [statistics.median(rss.of(str(w))) for w in range(measured // window)]
    growth = (windows[-1] - windows[0]) / windows[0]
    fds_after = server.settle("fds", before["fds"], timeout=20.0)
    threads_after = server.settle("threads", warm["threads"], timeout=30.0)
    counts = _served_ok(server)
    http_ok = _http_ok(server)
    figures = {
        "http_requests": len(load.outcomes),
        "grpc_requests": len(grpc_load.outcomes),
        "warmup_requests": warmup,
        "measured_requests": measured,
        "window": window,
        "failures": len(failures) + len(grpc_failures),
        "by_route": dict(Counter(o[2] for o in load.outcomes)),
        "rss_mb_window_medians": [round(w / 1024, 1) for w in windows],
        "rss_growth_pct": round(100 * growth, 2),
        "rss_mb_peak": round(rss.peak_kb / 1024, 1),
        "fds_before": before["fds"],
        "fds_loaded": warm["fds"],
        "fds_after": fds_after,
        "threads_before": before["threads"],
        "threads_after_warmup": warm["threads"],
        "threads_after": threads_after,
        "server_counted_http_ok": http_ok,
        "wall_s": round(wall, 1),
        "http_requests_per_s": round(len(load.outcomes) / wall, 1),
    }
    assert growth < MAX_RSS_GROWTH, figures
    # each client had its connection (HTTP and gRPC) while loaded; all are closed now
    assert warm["fds"] >= before["fds"] + HTTP_CLIENTS + GRPC_CLIENTS, figures
    assert fds_after == before["fds"], figures
    assert threads_after <= warm["threads"], figures
    assert set(counts) == {"OK"}, counts
    assert http_ok == len(load.outcomes), figures  # every HTTP request counted, as OK
    return figures


def _http_ok(server: HttpServerProcess) -> float:
    """The server's count of HTTP requests answered OK on the three loaded routes."""
    routes = {f"http:/v1/models/{{m}}:{v}" for v in ("explain", "predict")}
    routes.add("http:/v2/models/{m}/infer")
    total = 0.0
    for (name, labels), value in server.metrics().items():
        labels = dict(labels)
        if name == "xai_serve_requests_total" and labels["rpc"] in routes:
            assert labels["code"] == "OK", labels
            total += value
    return total


def _label_loop(
    rss: RssSampler,
    load: HttpLoad,
    warmup: int,
    window: int,
    server: HttpServerProcess,
    warm: dict[str, int],
    done: threading.Event,
) -> None:
    """Tag the memory samples with the window of measured HTTP requests they fall in; read
    the process's fds and threads when warm-up ends (the clients still connected)."""
    while not done.is_set():
        n = load.done
        if n >= warmup and not warm:
            warm.update(server.status())
        rss.mark("warmup" if n < warmup else str((n - warmup) // window))
        time.sleep(0.01)
    if not warm:
        warm.update(server.status())


def test_http_soak_fast(server: HttpServerProcess, catalogue: Catalogue) -> None:
    measured = int(os.environ.get("XAI_SERVE_HTTP_SOAK_REQUESTS", "210"))
    figures = http_soak(server, catalogue, warmup=120, measured=measured, window=measured // 3)
    record("http_soak_fast", **figures)


@pytest.mark.slow
@pytest.mark.soak
def test_http_soak_full(server: HttpServerProcess, catalogue: Catalogue) -> None:
    figures = http_soak(server, catalogue, warmup=300, measured=3000, window=500)
    record("http_soak_full", **figures)
