"""Hostile input on the HTTP listener (KServe v1 and Open Inference Protocol REST): seeded
cases against the server in its own process, with auth on and the fuzz suite's small limits.
Random JSON bodies and values of the wrong type in every field, huge and negative shapes, bad
base64, junk bytes, truncated and deeply nested JSON, wrong content types, bodies past the size
limit, bad and tiny ``X-Request-Timeout`` deadlines, missing and wrong tokens, random paths and
HTTP methods. Every answer must be a status its family allows — a 2xx where the input is in
fact valid, else a 4xx (504 only for a deadline) — with a JSON ``{"error": ...}`` message that
is short and holds no traceback; never a 500. Meanwhile the server's memory stays bounded;
afterwards the connections and threads it held are gone, a valid request (HTTP and gRPC) still
gets its correct answer and the log holds no traceback and no internal error.

``XAI_SERVE_HTTP_FUZZ_SEED`` (default 0) and ``XAI_SERVE_HTTP_FUZZ_CASES`` (default 1000) pick
the cases; ``test_http_fuzz_full`` (marked ``soak``) runs 10,000 with another seed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import xai_serve
from tests.reliability.fuzz_cases import LIMITS, MODELS, TOKEN
from tests.reliability.harness import (
    RssSampler,
    ServerProcess,
    free_port,
    load_reference_modules,
    record,
    write_config,
    write_models,
)
from tests.reliability.test_fuzz import _after_fuzz
from tests.serving.served import Served

httpx = pytest.importorskip("httpx")

TIMEOUT = 30.0
MAX_MESSAGE = 1200  # a sentence or two (the server clips what it quotes: 1 KiB)
RSS_BOUND_MB = 200
LIMIT = LIMITS["max_message_bytes"]
WORKERS = 8
TIMEOUT_HEADER = "X-Request-Timeout"
OK, BAD, MISSING, LIMITED = 200, 400, 404, 429
REFUSED = frozenset({BAD, MISSING, LIMITED})


class HttpServerProcess(ServerProcess):
    """The fuzz suite's server process (both models, ``LIMITS``, auth with ``TOKEN``) with the
    HTTP listener on a free port."""

    def __init__(self, d: Path, **config: Any) -> None:
        port, metrics_port, self.http_port = free_port(), free_port(), free_port()
        cfg = write_config(d, port, metrics_port, **config)
        cfg.write_text(f"http_port = {self.http_port}\n" + cfg.read_text())  # a top-level key
        Served.__init__(self, d, cfg, port, metrics_port)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServerProcess]:
    d = tmp_path_factory.mktemp("http-fuzz")
    write_models(d)
    with HttpServerProcess(d, limits=LIMITS, tokens=[TOKEN]) as s:
        s.wait_serving()
        yield s


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One HTTP request and the statuses it may get."""

    family: str
    method: str
    path: str
    body: bytes | Callable[[], Iterator[bytes]] | None = None
    statuses: frozenset[int] = REFUSED
    headers: dict[str, str | bytes] = field(default_factory=dict)
    token: bool = True  # send the right bearer token

    def all_headers(self) -> dict[str, str | bytes]:
        out: dict[str, str | bytes] = (
            {"content-type": "application/json"} if self.body is not None else {}
        )
        if self.token:
            out["authorization"] = f"Bearer {TOKEN}"
        out.update(self.headers)
        return out


def _png(rng: random.Random, h: int | None = None, w: int | None = None) -> bytes:
    h, w = h or rng.randrange(24, 96), w or rng.randrange(24, 96)
    rgb = np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=rng.choice(["PNG", "JPEG"]))
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _junk_value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: scalars of every type, extremes, nested lists and objects."""
    kind = rng.randrange(12 if depth < 3 else 8)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**31) - 1, 2**63, -(2**63) - 1, 10**30])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e308, 1e-320, 3.5, -0.0])
    if kind == 4:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return rng.choice(["", "gradcam", "../etc/passwd", "\u00e9\u4e2d\U0001f600", "x" * 5000])
    if kind == 6:
        return rng.randrange(-(10**6), 10**6)
    if kind == 7:
        return rng.choice(["NaN", "Infinity", "1e400", "-", "{}", "[]"])
    if kind in (8, 9):
        return [_junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))]
    keys = ["b64", "image", "instances", "parameters", "method", "data", "shape", "name", "x"]
    return {rng.choice(keys): _junk_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


def _instance(rng: random.Random, model: str) -> Any:
    shape = MODELS[model][0]
    if rng.random() < 0.7:
        png = _png(rng)
        return {"image": {"b64": _b64(png)}} if rng.random() < 0.5 else {"b64": _b64(png)}
    x = np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype("<f4")
    return x.round(3).tolist()


def _valid_v1(rng: random.Random) -> tuple[str, dict[str, Any], str]:
    """``(model, body, verb)``: a valid, cheap :explain or :predict request."""
    model = rng.choice(list(MODELS))
    body: dict[str, Any] = {
        "instances": [_instance(rng, model) for _ in range(rng.randrange(1, 3))]
    }
    if rng.random() < 0.25:
        return model, body, "predict"
    params: dict[str, Any] = {"method": rng.choice(MODELS[model][2])}
    if rng.random() < 0.5:
        params["target"] = rng.randrange(MODELS[model][1])
    if rng.random() < 0.3:
        params["top_k"] = rng.randrange(0, LIMITS["max_top_k"] + 1)
    body["parameters"] = params
    return model, body, "explain"


def _v1_path(model: str, verb: str) -> str:
    return f"/v1/models/{model}:{verb}"


def case_v1_valid(rng: random.Random) -> Case:
    model, body, verb = _valid_v1(rng)
    return Case("v1.valid", "POST", _v1_path(model, verb), json.dumps(body).encode(), {OK})


_V1_MUTATIONS: list[tuple[str, Callable[[random.Random, dict[str, Any], str], None]]] = [
    ("instances", lambda r, b, m: b.__setitem__("instances", _junk_value(r))),
    ("instance", lambda r, b, m: b["instances"].__setitem__(0, _junk_value(r))),
    ("b64", lambda r, b, m: b["instances"].__setitem__(0, {"b64": r.choice(
        ["@@@", "=", "a", _b64(r.randbytes(r.randrange(1, 3000))), _b64(_png(r))[:-7]])})),
    ("shape", lambda r, b, m: b["instances"].__setitem__(0, np.zeros(r.choice(
        [(3, 8, 8), (1, 64, 64), (3, 64), (2, 3, 64, 64), (4, 48, 48)])).tolist())),
    ("nan", lambda r, b, m: b["instances"].__setitem__(0, np.full(
        MODELS[m][0], r.choice([1e308, -1e308])).tolist())),
    ("method", lambda r, b, m: b.setdefault("parameters", {}).__setitem__(
        "method", r.choice(["nope", "", "GRADCAM", "lime ", *MODELS["tiny"][2]]))),
    ("method_type", lambda r, b, m: b.setdefault("parameters", {}).__setitem__(
        "method", _junk_value(r))),
    ("target", lambda r, b, m: b.setdefault("parameters", {"method": "saliency"}).__setitem__(
        "target", _junk_value(r))),
    ("targets", lambda r, b, m: b.setdefault("parameters", {"method": "saliency"}).__setitem__(
        "targets", [r.randrange(-3, 20) for _ in range(r.randrange(0, 30))])),
    ("top_k", lambda r, b, m: b.setdefault("parameters", {"method": "saliency"}).__setitem__(
        "top_k", _junk_value(r))),
    ("option", lambda r, b, m: b.setdefault("parameters", {"method": "saliency"}).__setitem__(
        r.choice(["samples", "steps", "n_segments", "seed", "baseline", "budget_ms",
                  "segmenter", "noise", "tolerance"]), _junk_value(r))),
    ("unknown", lambda r, b, m: b.setdefault("parameters", {"method": "saliency"}).__setitem__(
        r.choice(["bogus", "", "instances", "Method"]), _junk_value(r))),
    ("parameters", lambda r, b, m: b.__setitem__("parameters", _junk_value(r))),
    ("drop", lambda r, b, m: b.pop(r.choice(["instances", "parameters"]), None)),
    ("many", lambda r, b, m: b.__setitem__("instances", [{"b64": _b64(_png(r, 8, 8))}] * r.choice(
        [0, LIMITS["max_queue"] + 1, 300]))),
    ("overlay", lambda r, b, m: b.setdefault("parameters", {"method": "saliency"}).__setitem__(
        "overlay", _junk_value(r))),
]  # fmt: skip


def case_v1_mutated(rng: random.Random) -> Case:
    model, body, verb = _valid_v1(rng)
    if verb == "predict" and rng.random() < 0.5:
        body["parameters"] = {}
    names = []
    for _ in range(rng.randrange(1, 3)):
        name, mutate = rng.choice(_V1_MUTATIONS)
        try:
            mutate(rng, body, model)
        except (TypeError, KeyError, IndexError, AttributeError):
            continue  # an earlier mutation took away what this one changes
        names.append(name)
    # a mutation may leave the request valid (a target in range), make it larger than the
    # size limit (413), or make the path another route's (``/v1/models/:explain`` is GET
    # ``/v1/models/{name}``'s path: 405)
    statuses = REFUSED | {OK, 405, 413}
    path = _v1_path(model if rng.random() < 0.9 else rng.choice(["nope", "", "tiny:x"]), verb)
    family = f"v1.{names[0]}" if names else "v1.none"
    return Case(family, "POST", path, json.dumps(body).encode(), statuses)


def _valid_v2(rng: random.Random) -> tuple[str, dict[str, Any], bytes]:
    """``(model, JSON header, binary data)``: a valid ModelInfer request of one image."""
    model = rng.choice(list(MODELS))
    shape = [1, *MODELS[model][0]]
    x = np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype("<f4")
    tensor: dict[str, Any] = {"name": "input", "datatype": "FP32", "shape": shape}
    binary = b""
    if rng.random() < 0.5:
        binary = x.tobytes()
        tensor["parameters"] = {"binary_data_size": len(binary)}
    else:
        tensor["data"] = x.round(3).flatten().tolist()
    body: dict[str, Any] = {"inputs": [tensor]}
    if rng.random() < 0.6:
        body["parameters"] = {"explainer": rng.choice(MODELS[model][2])}
        if rng.random() < 0.5:
            body["parameters"]["target"] = rng.randrange(MODELS[model][1])
    if rng.random() < 0.3:
        body["id"] = f"r{rng.randrange(10**6)}"
    return model, body, binary


def _v2_case(family: str, model: str, body: dict[str, Any], binary: bytes, statuses: frozenset[int],
             header_length: str | None = None) -> Case:  # fmt: skip
    head = json.dumps(body).encode()
    headers: dict[str, str | bytes] = {}
    if binary or header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length or str(len(head))
        headers["content-type"] = "application/octet-stream"
    return Case(family, "POST", f"/v2/models/{model}/infer", head + binary, statuses, headers)


def case_v2_valid(rng: random.Random) -> Case:
    model, body, binary = _valid_v2(rng)
    return _v2_case("v2.valid", model, body, binary, frozenset({OK}))


_V2_MUTATIONS: list[tuple[str, Callable[[random.Random, dict[str, Any]], None]]] = [
    ("shape", lambda r, b: b["inputs"][0].__setitem__("shape", r.choice(
        [[-1, 3, 64, 64], [2**70], [1, 3, 64, 64.5], [], [0, 3, 64, 64], ["1"], [2**40, 2**40],
         [1, 3, 48, 48], [1, 3, 64, 64], [-(2**63)]]))),
    ("shape_type", lambda r, b: b["inputs"][0].__setitem__("shape", _junk_value(r))),
    ("datatype", lambda r, b: b["inputs"][0].__setitem__("datatype", r.choice(
        ["FP16", "BF16", "INT64", "BYTES", "UINT8", "BOOL", "fp32", "", "FP128"]))),
    ("data", lambda r, b: b["inputs"][0].__setitem__("data", _junk_value(r))),
    ("binary_size", lambda r, b: b["inputs"][0].setdefault("parameters", {}).__setitem__(
        "binary_data_size", r.choice([-1, 0, 1, 10**12, "12", None, 2**63]))),
    ("name", lambda r, b: b["inputs"][0].__setitem__("name", _junk_value(r))),
    ("inputs", lambda r, b: b.__setitem__("inputs", _junk_value(r))),
    ("two_inputs", lambda r, b: b["inputs"].append(dict(b["inputs"][0]))),
    ("explainer", lambda r, b: b.setdefault("parameters", {}).__setitem__(
        "explainer", r.choice(["nope", "", 5, None, ["gradcam"], "gradcam"]))),
    ("param", lambda r, b: b.setdefault("parameters", {}).__setitem__(
        r.choice(["target", "timeout", "samples", "binary_data_output", "priority", "foo",
                  "top_k", "steps"]), _junk_value(r))),
    ("parameters", lambda r, b: b.__setitem__("parameters", _junk_value(r))),
    ("outputs", lambda r, b: b.__setitem__("outputs", r.choice(
        [_junk_value(r), [{"name": "nope"}], [{"name": "logits", "parameters": {
            "binary_data": _junk_value(r)}}], [{"name": 5}]]))),
    ("id", lambda r, b: b.__setitem__("id", _junk_value(r))),
]  # fmt: skip


def case_v2_mutated(rng: random.Random) -> Case:
    model, body, binary = _valid_v2(rng)
    name, mutate = rng.choice(_V2_MUTATIONS)
    mutate(rng, body)
    header_length = None
    if rng.random() < 0.15:  # the header's length says something else
        name = "header_length"
        header_length = rng.choice(["-1", "abc", "0", str(10**9), "1e3", "5 5"])
    if rng.random() < 0.1:
        model = rng.choice(["nope", "tiny/versions/2", "tiny/versions/"])
    return _v2_case(f"v2.{name}", model, body, binary, REFUSED | {OK}, header_length)


def _post_path(rng: random.Random) -> str:
    model = rng.choice(list(MODELS))
    return rng.choice([_v1_path(model, "explain"), _v1_path(model, "predict"),
                       f"/v2/models/{model}/infer"])  # fmt: skip


def case_junk_body(rng: random.Random) -> Case:
    kind = rng.randrange(7)
    if kind == 0:
        body = rng.randbytes(rng.randrange(0, 4096))
    elif kind == 1:
        _, valid, _ = _valid_v1(rng)
        text = json.dumps(valid).encode()
        body = text[: rng.randrange(0, len(text))]
    elif kind == 2:
        depth = rng.choice([10, 900, 5000, 100_000])
        body = b'{"instances": ' + b"[" * depth + b"]" * depth + b"}"
    elif kind == 3:
        body = json.dumps(_junk_value(rng)).encode()
    elif kind == 4:
        body = "".join(rng.choice('\u00e9\u4e2d\ud7ff{}[]",:') for _ in range(200)).encode(
            "utf-8", "surrogatepass"
        )
    elif kind == 5:
        body = b""
    else:
        body = b'{"instances": [1, 2], "instances": ' + rng.randbytes(50) + b"}"
    return Case(f"junk.{kind}", "POST", _post_path(rng), body, frozenset({BAD}))


_CONTENT_TYPES = ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  "application/octet-stream", "image/png", "", "application/json; charset=latin-1",
                  "\u00e9/\u00e9".encode()]  # fmt: skip


def case_content_type(rng: random.Random) -> Case:
    """A valid body under another content type: the JSON routes read the body as JSON (as
    KServe's server does), whatever the header says."""
    model, body, verb = _valid_v1(rng)
    return Case("content_type", "POST", _v1_path(model, verb), json.dumps(body).encode(), {OK},
                {"content-type": rng.choice(_CONTENT_TYPES)})  # fmt: skip


_SEGMENTS = ["v1", "v2", "models", "tiny", "tinyts", "nope", "infer", "ready", "health", "live",
             "versions", "1", "tiny:predict", "tiny:explain", ":explain", "..", "%2e%2e", "%00",
             "metrics", "docs", "openapi.json", "", "x" * 300, "\u00e9"]  # fmt: skip


def case_route(rng: random.Random) -> Case:
    method = rng.choice(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    path = "/" + "/".join(rng.choice(_SEGMENTS) for _ in range(rng.randrange(0, 6)))
    path = "/" + path.lstrip("/")  # "//x:y" would be a URL's authority, not a path
    body = json.dumps(_junk_value(rng)).encode() if method in ("POST", "PUT", "PATCH") else None
    statuses = frozenset({OK, BAD, MISSING, 405, LIMITED, 503})  # 503: a model not ready (never)
    return Case("route", method, path, body, statuses)


def case_auth(rng: random.Random) -> Case:
    model, body, verb = _valid_v1(rng)
    wrong = rng.choice([None, "", f"Bearer {TOKEN}x", f"Basic {TOKEN}", TOKEN, "Bearer",
                        f"bearer  {TOKEN[:-1]}", "Bearer " + "t" * 5000])  # fmt: skip
    headers: dict[str, str | bytes] = {} if wrong is None else {"authorization": wrong}
    if rng.random() < 0.3:
        return Case("auth.get", "GET", rng.choice(["/v1/models", f"/v2/models/{model}", "/v2",
                                                   f"/v2/models/{model}/ready"]),
                    None, frozenset({401}), headers, token=False)  # fmt: skip
    return Case("auth.post", "POST", _v1_path(model, verb), json.dumps(body).encode(),
                frozenset({401}), headers, token=False)  # fmt: skip


def case_health(rng: random.Random) -> Case:
    """The probes need no token."""
    path = rng.choice(["/", "/v2/health/live", "/v2/health/ready"])
    return Case("health", "GET", path, None, frozenset({OK}), token=rng.random() < 0.5)


def case_oversized(rng: random.Random) -> Case:
    size = LIMIT + rng.choice([1, 1000, rng.randrange(1, 512 * 1024)])
    filler = rng.choice([b" ", b"[", b"x"])
    if rng.random() < 0.5:
        return Case("oversized.length", "POST", _post_path(rng), filler * size, frozenset({413}))

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        left = size
        while left > 0:
            yield filler * min(left, 16384)
            left -= 16384

    return Case("oversized.chunked", "POST", _post_path(rng), chunks, frozenset({413}))


def case_deadline(rng: random.Random) -> Case:
    model, body, verb = _valid_v1(rng)
    value = rng.choice(["abc", "-1", "0", "nan", "inf", "", "1e12", "2s", "0x10", "1,5",
                        "1e-9", "0.000001", "0.001", "30"])  # fmt: skip
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if 0 < seconds <= 1e9:
        statuses = frozenset({OK, 504}) if seconds < 1 else frozenset({OK})
    else:
        statuses = frozenset({BAD})
    return Case("deadline", "POST", _v1_path(model, verb), json.dumps(body).encode(), statuses,
                {TIMEOUT_HEADER: value})  # fmt: skip


FAMILIES: list[tuple[float, Callable[[random.Random], Case]]] = [
    # valid requests cost a forward and backward pass each: a few are enough to see them
    # answered among the refusals
    (0.04, case_v1_valid), (0.28, case_v1_mutated), (0.03, case_v2_valid),
    (0.20, case_v2_mutated), (0.10, case_junk_body), (0.02, case_content_type),
    (0.14, case_route), (0.07, case_auth), (0.04, case_health), (0.04, case_oversized),
    (0.04, case_deadline),
]  # fmt: skip


def generate(seed: int, n: int) -> list[Case]:
    rng = random.Random(seed)
    weights = [w for w, _ in FAMILIES]
    makers = [m for _, m in FAMILIES]
    return [rng.choices(makers, weights)[0](rng) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# Running and checking
# --------------------------------------------------------------------------------------------


def _problems(case: Case, r: httpx.Response) -> list[str]:
    out = []
    status = r.status_code
    if status not in case.statuses:
        out.append(f"status {status} not in {sorted(case.statuses)}: {r.text[:300]}")
    if status >= 500 and status != 504 and status != 503:
        out.append(f"server error {status}")
    if case.method == "HEAD":
        return out
    if status >= 400:
        if r.headers.get("content-type") != "application/json":
            return [*out, f"{status} answered as {r.headers.get('content-type')}: {r.text[:200]}"]
        try:
            body = r.json()
        except ValueError:
            return [*out, f"{status} with a body that is not JSON: {r.text[:200]}"]
        message = body.get("error") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message:
            out.append(f"{status} without an error message: {r.text[:200]}")
        elif len(message) > MAX_MESSAGE:
            out.append(f"a message of {len(message)} characters")
        elif "Traceback" in message:
            out.append("a traceback in the message")
    elif status == OK and case.family in ("v1.valid", "content_type") and "explain" in case.path:
        out += _check_explanations(case, r.json())
    return out


def _check_explanations(case: Case, body: Any) -> list[str]:
    assert isinstance(case.body, bytes)
    instances = json.loads(case.body)["instances"]
    got = body.get("explanations")
    if not isinstance(got, list) or len(got) != len(instances):
        return [f"{len(instances)} instances, answered {str(body)[:200]}"]
    for one in got:
        m = np.asarray(one["map"], dtype=np.float64)
        if m.ndim != 2 or not np.isfinite(m).all():
            return [f"a map of shape {m.shape} that is not finite"]
    return []


_LOCAL = threading.local()


def _client(base: str) -> httpx.Client:
    client = getattr(_LOCAL, "client", None)
    if client is None or client.is_closed:
        client = _LOCAL.client = httpx.Client(base_url=base, timeout=TIMEOUT)
        _OPEN.append(client)
    return client


_OPEN: list[httpx.Client] = []


def run_case(base: str, case: Case) -> tuple[int, list[str]]:
    """Send ``case``; ``(status, what is wrong)`` (status 0: no answer)."""
    content = case.body() if callable(case.body) else case.body
    try:
        r = _client(base).request(
            case.method, case.path, content=content, headers=case.all_headers()
        )
    except httpx.HTTPError as exc:
        return 0, [f"no answer: {type(exc).__name__}: {exc}"]
    return r.status_code, _problems(case, r)


def hostile_connections(port: int, seed: int) -> Counter[str]:
    """Requests that are not HTTP, or not all of it: junk bytes, a request line cut short,
    headers without an end, an absurd Content-Length, connections opened and closed. The
    protocol layer answers these (a plain 400) or drops them."""
    rng = random.Random(seed)
    made: Counter[str] = Counter()
    payloads = {
        "junk": lambda: rng.randbytes(rng.randrange(1, 4096)),
        "cut_request_line": lambda: b"POST /v1/models/tiny:exp",
        "no_header_end": lambda: b"GET /v2 HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 3000,
        "bad_length": lambda: (
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}"
        ),
        "two_lengths": lambda: (
            b"POST /v2/models/tiny/infer HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 2\r\nContent-Length: 9\r\n\r\n{}"
        ),
        "http2_preface": lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + rng.randbytes(64),
        "open_close": lambda: b"",
    }
    for name, payload in payloads.items():
        for _ in range(10 if name in ("junk", "open_close") else 3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                data = payload()
                if data:
                    sock.sendall(data)
                    sock.settimeout(0.5)  # an incomplete request gets no answer
                    try:
                        answer = sock.recv(4096)
                    except (TimeoutError, ConnectionError):
                        answer = b""
                    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), (name, answer)
            made[name] += 1
    return made


def http_fuzz(server: HttpServerProcess, seed: int, n: int) -> dict[str, Any]:
    cases = generate(seed, n)
    warm = generate(seed + 10_000, min(100, n))
    base = server.base
    before = server.quiet_status()
    with ThreadPoolExecutor(WORKERS) as pool:
        list(pool.map(lambda c: run_case(base, c), warm))  # connections, pools, caches
        warm_status = server.status()
        base_kb = warm_status["rss_kb"]
        start = time.monotonic()
        with RssSampler(server.pid) as rss:
            results = list(pool.map(lambda c: run_case(base, c), cases))
        wall = time.monotonic() - start
    for client in _OPEN:
        client.close()
    _OPEN.clear()
    assert server.proc.poll() is None, f"the server died:\n{server.log[-5000:]}"
    hostile = hostile_connections(server.http_port, seed)
    fds_after = server.settle("fds", before["fds"], timeout=20.0)
    threads_after = server.settle("threads", warm_status["threads"], timeout=30.0)

    failures = [
        (case.family, case.method, case.path[:80], status, problems)
        for case, (status, problems) in zip(cases, results, strict=True)
        if problems
    ]
    statuses = Counter(str(status) for status, _ in results)
    families = Counter(case.family.split(".")[0] for case in cases)
    figures = {
        "seed": seed,
        "cases": n,
        "families": dict(families),
        "distinct_families": len({c.family for c in cases}),
        "statuses": dict(statuses),
        "failures": len(failures),
        "hostile_connections": dict(hostile),
        "rss_mb_warm": round(base_kb / 1024, 1),
        "rss_mb_peak": round(rss.peak_kb / 1024, 1),
        "fds_before": before["fds"],
        "fds_after": fds_after,
        "threads_warm": warm_status["threads"],
        "threads_after": threads_after,
        "wall_s": round(wall, 1),
        "cases_per_s": round(n / wall, 1),
    }
    assert not failures, "\n".join(map(str, [*failures[:30], figures]))
    assert "500" not in statuses and "0" not in statuses, figures
    assert (rss.peak_kb - base_kb) / 1024 < RSS_BOUND_MB, figures
    # every kind of answer was reached: valid requests answered, every refusal exercised
    for status in ("200", "400", "401", "404", "405", "413"):
        assert statuses[status] > 0, (status, figures)
    assert fds_after == before["fds"], figures  # every connection the fuzz opened is closed
    assert threads_after <= warm_status["threads"], figures
    return figures


def _after_http_fuzz(server: HttpServerProcess) -> None:
    """A valid HTTP request still gets its correct answer (the reference computed here), and
    the gRPC side too; the log holds no traceback and no internal error."""
    d = server.log_path.parent
    module = load_reference_modules(
        {"tiny": d / "models/resnet18.pt", "tinyts": d / "models/small_cnn.pt"}
    )["tiny"]
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(9))
    ref = xai_serve.explain(module, x[None], "gradcam", target=2, layer="layer4")
    body = {"instances": [x.tolist()], "parameters": {"method": "gradcam", "target": 2}}
    r = httpx.post(
        f"{server.base}/v1/models/tiny:explain", json=body, timeout=TIMEOUT,
        headers={"authorization": f"Bearer {TOKEN}"},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    (one,) = r.json()["explanations"]
    assert one["target"] == 2
    got = torch.tensor(one["map"], dtype=torch.float32)
    torch.testing.assert_close(got, ref.maps[0].float(), rtol=1e-4, atol=1e-5)
    _after_fuzz(server)  # gRPC answers correctly; no "internal error", no "Traceback" logged


def test_http_fuzz(server: HttpServerProcess) -> None:
    seed = int(os.environ.get("XAI_SERVE_HTTP_FUZZ_SEED", "0"))
    n = int(os.environ.get("XAI_SERVE_HTTP_FUZZ_CASES", "1000"))
    figures = http_fuzz(server, seed, n)
    _after_http_fuzz(server)
    record("http_fuzz", **figures)


@pytest.mark.slow
@pytest.mark.soak
def test_http_fuzz_full(server: HttpServerProcess) -> None:
    figures = http_fuzz(server, seed=1, n=10_000)
    _after_http_fuzz(server)
    record("http_fuzz_full", **figures)
