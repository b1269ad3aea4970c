"""Hostile input: thousands of seeded cases (:mod:`tests.reliability.fuzz_cases`) against the
server in its own process, with auth on and small limits. Every case must get one of the codes
its family allows (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, UNAUTHENTICATED; OK only
where the input is in fact valid) with a message that names what is wrong — never INTERNAL or
UNKNOWN, never a crash — while the server's resident memory stays bounded; afterwards a valid
request still gets its correct answer and the log holds no internal error.

``XAI_SERVE_FUZZ_SEED`` (default 0) and ``XAI_SERVE_FUZZ_CASES`` (default 5000) pick the cases;
``test_fuzz_full`` (marked ``soak``) runs 20,000 with another seed.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import xai_serve
from tests.reliability import fuzz_cases
from tests.reliability.fuzz_cases import LIMITS, TOKEN, Case
from tests.reliability.harness import (
    RssSampler,
    ServerProcess,
    load_reference_modules,
    record,
    write_models,
)
from xai_serve.client import decode_tensor
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc

Code = grpc.StatusCode
TIMEOUT = 30.0
MAX_DETAILS = 1200  # a sentence or two (the server clips quotes of what was sent: 1 KiB)
RSS_BOUND_MB = 200  # the server's resident memory may grow this much over its warm level
NEVER = {Code.INTERNAL, Code.UNKNOWN, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("fuzz")
    write_models(d)
    with ServerProcess(d, limits=LIMITS, tokens=[TOKEN]) as s:
        s.wait_serving()
        yield s


def _problems_of_error(case: Case, code: Code, details: str) -> list[str]:
    out = []
    if code not in case.codes:
        out.append(f"code {code.name} not in {sorted(c.name for c in case.codes)}")
    if code != Code.OK:
        if not details:
            out.append("empty message")
        elif case.words and not any(w.lower() in details.lower() for w in case.words):
            out.append(f"message names none of {case.words}")
        if len(details) > MAX_DETAILS:
            out.append(f"message of {len(details)} characters")
        if "Traceback" in details:
            out.append("traceback in the message")
    return out


def _check_explained(raw: bytes) -> list[str]:
    """An OK Explain answer: a finite map of the model's input size."""
    resp = pb.ExplainResponse.FromString(raw)
    m = decode_tensor(resp.map)
    if m.dim() != 2 or not bool(torch.isfinite(m).all()):
        return [f"answered with a {list(m.shape)} map that is not finite"]
    return []


def run_case(channel: grpc.Channel, case: Case) -> tuple[Code, list[str]]:
    """Send ``case``; ``(status code, what is wrong)``."""
    metadata = case.metadata()
    if isinstance(case.payload, list):
        call = channel.stream_stream(case.rpc)
        items: list[bytes] = []
        try:
            for item in call(iter(case.payload), metadata=metadata, timeout=TIMEOUT):
                items.append(item)
            code, details = Code.OK, ""
        except grpc.RpcError as err:
            code, details = err.code(), err.details() or ""
        problems = _problems_of_error(case, code, details)
        if code == Code.OK:
            problems += _check_stream_items(case, items)
        return code, problems
    call = channel.unary_unary(case.rpc)
    try:
        raw = call(case.payload, metadata=metadata, timeout=TIMEOUT)
        code, details = Code.OK, ""
    except grpc.RpcError as err:
        code, details = err.code(), err.details() or ""
    problems = _problems_of_error(case, code, details)
    if code == Code.OK and case.rpc == fuzz_cases.EXPLAIN and not problems:
        problems += _check_explained(raw)
    return code, problems


def _check_stream_items(case: Case, items: list[bytes]) -> list[str]:
    """Each streamed request answered once, with a code its own case allows."""
    if case.rpc != fuzz_cases.STREAM:  # reflection: its answers are its own business
        return []
    answers = [pb.ExplainResponse.FromString(b) for b in items]
    problems = []
    if case.items:
        if len(answers) != len(case.items):
            return [f"{len(answers)} answers to {len(case.items)} requests"]
        expected = {pb.ExplainRequest.FromString(c.payload).request_id: c for c in case.items}  # type: ignore[arg-type]
        for resp in answers:
            sub = expected.get(resp.request_id)
            if sub is None:
                problems.append(f"answer to unknown request {resp.request_id!r}")
                continue
            code = _code(resp.error.code) if resp.HasField("error") else Code.OK
            problems += [
                f"{sub.family}: {p}" for p in _problems_of_error(sub, code, resp.error.message)
            ]
    else:  # raw bytes on a stream: whatever parsed is refused or answered, never INTERNAL
        for resp in answers:
            if resp.HasField("error") and _code(resp.error.code) in NEVER:
                problems.append(f"streamed {resp.error.code}: {resp.error.message}")
    return problems


def _code(value: int) -> Code:
    return next(c for c in Code if c.value[0] == value)


def fuzz(server: ServerProcess, seed: int, n: int) -> dict[str, Any]:
    cases = fuzz_cases.generate(seed, n)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        warm = [stub.ListModels(pb.ListModelsRequest(), metadata=auth, timeout=TIMEOUT)]
        assert [m.name for m in warm[0].models] == ["tiny", "tinyts"]
        base_kb = server.status()["rss_kb"]
        start = time.monotonic()
        with RssSampler(server.pid) as rss, ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda c: run_case(channel, c), cases))
        wall = time.monotonic() - start
        assert server.proc.poll() is None, f"the server died:\n{server.log[-5000:]}"
        end_kb = server.status()["rss_kb"]

    failures = [
        (case.family, code.name, problems)
        for case, (code, problems) in zip(cases, results, strict=True)
        if problems
    ]
    codes = Counter(code.name for code, _ in results)
    families = Counter(case.family.split(".")[0] for case in cases)
    streamed = sum(len(c.items) for c in cases)
    figures = {
        "seed": seed,
        "cases": n,
        "streamed_requests": streamed,
        "families": dict(families),
        "distinct_families": len({c.family for c in cases}),
        "codes": dict(codes),
        "failures": len(failures),
        "rss_mb_warm": round(base_kb / 1024, 1),
        "rss_mb_peak": round(rss.peak_kb / 1024, 1),
        "rss_mb_end": round(end_kb / 1024, 1),
        "wall_s": round(wall, 1),
        "cases_per_s": round(n / wall, 1),
    }
    assert not failures, (failures[:20], figures)
    assert not any(codes[c.name] for c in NEVER), figures
    assert (rss.peak_kb - base_kb) / 1024 < RSS_BOUND_MB, figures
    # the server answered every kind of refusal (the generator reaches them all)
    for code in ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"):
        assert codes[code] > 0, figures
    return figures


def _after_fuzz(server: ServerProcess) -> None:
    """A valid request still gets its correct answer; nothing went wrong inside."""
    d = server.log_path.parent
    module = load_reference_modules(
        {"tiny": d / "models/resnet18.pt", "tinyts": d / "models/small_cnn.pt"}
    )["tiny"]
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(5))
    ref = xai_serve.explain(module, x[None], "gradcam", target=4, layer="layer4")
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        req = pb.ExplainRequest(model="tiny", method="gradcam", target=4, request_id="after")
        req.tensor.CopyFrom(pb.Tensor(shape=[3, 64, 64], dtype=pb.FLOAT32))
        req.tensor.data = x.numpy().astype("<f4").tobytes()
        resp = stub.Explain(req, metadata=auth, timeout=TIMEOUT)
    torch.testing.assert_close(decode_tensor(resp.map), ref.maps[0], rtol=1e-4, atol=1e-5)
    assert resp.target == 4 and resp.request_id == "after"
    log = server.log
    assert "internal error" not in log and "Traceback" not in log, log[-5000:]


def test_fuzz(server: ServerProcess) -> None:
    seed = int(os.environ.get("XAI_SERVE_FUZZ_SEED", "0"))
    n = int(os.environ.get("XAI_SERVE_FUZZ_CASES", "5000"))
    figures = fuzz(server, seed, n)
    _after_fuzz(server)
    record("fuzz", **figures)


@pytest.mark.slow
@pytest.mark.soak
def test_fuzz_full(server: ServerProcess) -> None:
    figures = fuzz(server, seed=1, n=20_000)
    _after_fuzz(server)
    record("fuzz_full", **figures)


# --------------------------------------------------------------------------------------------
# Auth on every RPC the server has
# --------------------------------------------------------------------------------------------


def _reflect(channel: grpc.Channel, requests: list[Any]) -> list[Any]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    return list(stub.ServerReflectionInfo(iter(requests), metadata=auth, timeout=TIMEOUT))


def served_methods(channel: grpc.Channel) -> dict[str, tuple[bool, bool]]:
    """Every RPC the server says it has (through reflection): ``{"/pkg.Service/Method":
    (client streaming, server streaming)}``."""
    [listed] = _reflect(channel, [reflection_pb2.ServerReflectionRequest(list_services="")])
    services = [s.name for s in listed.list_services_response.service]
    answers = _reflect(
        channel,
        [reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in services],
    )
    methods: dict[str, tuple[bool, bool]] = {}
    for service, answer in zip(services, answers, strict=True):
        files = [
            descriptor_pb2.FileDescriptorProto.FromString(raw)
            for raw in answer.file_descriptor_response.file_descriptor_proto
        ]
        for f in files:
            for s in f.service:
                if f"{f.package}.{s.name}" != service:
                    continue
                for m in s.method:
                    methods[f"/{service}/{m.name}"] = (m.client_streaming, m.server_streaming)
    return methods


HEALTH_PROBES = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")


def test_every_rpc_but_health_refuses_missing_or_wrong_tokens(server: ServerProcess) -> None:
    """The RPCs come from the server's own reflection, so an RPC added later is covered too."""
    bad_tokens = [None, "", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN]
    with grpc.insecure_channel(server.address) as channel:
        methods = served_methods(channel)
        services = {name.split("/")[1] for name in methods}
        assert set(HEALTH_PROBES) <= set(methods), methods
        assert {
            "xai_serve.v1.Explainer",
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services, services
        refused = 0
        for name, (client_streaming, server_streaming) in sorted(methods.items()):
            for token in bad_tokens:
                case = Case("auth", name, [b""] if client_streaming else b"", token=token)
                code, details = _call_raw(channel, case, client_streaming, server_streaming)
                if name.startswith("/grpc.health.v1.Health/"):  # probes need no token
                    allowed = {Code.OK} if name in HEALTH_PROBES else {Code.OK, Code.UNIMPLEMENTED}
                    assert code in allowed, (name, token, code, details)
                    continue
                assert code == Code.UNAUTHENTICATED, (name, token, code, details)
                assert details in ("missing bearer token", "invalid bearer token"), details
                refused += 1
            right = Case("auth", name, [b""] if client_streaming else b"")
            code, details = _call_raw(channel, right, client_streaming, server_streaming)
            assert code not in (Code.UNAUTHENTICATED, *NEVER), (name, code, details)
    record("auth", rpcs=len(methods), services=len(services), refused_calls=refused)


def _call_raw(
    channel: grpc.Channel, case: Case, client_streaming: bool, server_streaming: bool
) -> tuple[Code, str]:
    """Call any RPC with raw bytes (an empty message); the first answer of a server stream."""
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    call = kinds[client_streaming, server_streaming](case.rpc)
    request = iter(case.payload) if client_streaming else case.payload
    try:
        result = call(request, metadata=case.metadata(), timeout=5)
        if server_streaming:
            next(iter(result), None)  # Watch streams forever: its first answer is enough
            result.cancel()
        return Code.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


# --------------------------------------------------------------------------------------------
# Quoted values far longer than a status trailer
# --------------------------------------------------------------------------------------------


def test_long_quoted_values_keep_their_status(server: ServerProcess) -> None:
    """An unknown model/method/layer/option value of 20-30 KB is quoted in the error: the
    message is clipped to 1 KiB (start and end kept), so the client still gets the real code
    (before, grpc refused the 17 KB trailer and the client saw RESOURCE_EXHAUSTED)."""
    auth = (("authorization", f"Bearer {TOKEN}"),)
    x = fuzz_cases._tensor(random.Random(0), (3, 64, 64))
    cases = [
        (dict(model="m" * 20_000), Code.NOT_FOUND, "unknown model 'mmm", "'tiny', 'tinyts'"),
        (dict(model="\u00e9" * 9000), Code.NOT_FOUND, "unknown model '\u00e9", "'tinyts'"),
        (dict(method="x" * 30_000), Code.NOT_FOUND, "unknown method 'xxx", "smoothgrad, xgradcam"),
        (dict(layer="l" * 20_000), Code.NOT_FOUND, "unknown layer 'lll", "ListModels lists all)"),
    ]
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for fields, code, start, end in cases:
            req = pb.ExplainRequest(model="tiny", method="gradcam", tensor=x)
            for key, value in fields.items():
                setattr(req, key, value)
            with pytest.raises(grpc.RpcError) as info:
                stub.Explain(req, metadata=auth, timeout=TIMEOUT)
            err = info.value
            assert err.code() == code, (fields.keys(), err.code(), err.details()[:200])
            details = err.details()
            assert len(details.encode()) <= 1024 + 64, len(details)
            assert details.startswith(start) and details.endswith(end), details
            assert "characters left out" in details
            # the same on a stream, as the error of its one answer
            [resp] = list(stub.ExplainStream(iter([req]), metadata=auth, timeout=TIMEOUT))
            assert resp.error.code == code.value[0] and resp.error.message == details


# --------------------------------------------------------------------------------------------
# Hostile connections
# --------------------------------------------------------------------------------------------

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def _raw_connection(port: int, payload: bytes, *, read: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        if payload:
            sock.sendall(payload)
        if not read:
            return b""
        sock.settimeout(2)
        try:
            return sock.recv(4096)
        except (TimeoutError, ConnectionError):
            return b""


def hostile_connections(port: int, seed: int) -> Counter[str]:
    """Junk, HTTP/1.1, truncated HTTP/2 prefaces, bad frames, idle and instantly closed
    connections; returns how many of each were made."""
    rng = random.Random(seed)
    made: Counter[str] = Counter()
    for _ in range(20):
        _raw_connection(port, rng.randbytes(rng.randrange(1, 4096)))
        made["junk"] += 1
    for path in ("/", "/xai_serve.v1.Explainer/Explain", "/metrics"):
        _raw_connection(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        made["http1"] += 1
    for cut in range(1, len(H2_PREFACE), 3):
        _raw_connection(port, H2_PREFACE[:cut], read=False)
        made["partial_preface"] += 1
    for _ in range(10):  # a valid preface, then frames that are garbage
        _raw_connection(port, H2_PREFACE + rng.randbytes(rng.randrange(9, 512)))
        made["bad_frames"] += 1
    for _ in range(50):
        _raw_connection(port, b"", read=False)
        made["open_close"] += 1
    return made


def test_hostile_connections_leave_nothing_behind(server: ServerProcess) -> None:
    """While idle connections are held open and junk arrives on others, a client is served;
    afterwards the process has the descriptors and threads it had before."""
    before = server.quiet_status()
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(8)]
    try:
        made = hostile_connections(server.port, seed=3)
        _after_fuzz(server)  # served, correctly, meanwhile
        assert server.status()["fds"] >= before["fds"] + len(idle)
    finally:
        for sock in idle:
            sock.close()
    fds = server.settle("fds", before["fds"])
    # gRPC's EventEngine thread pool adds a thread when its workers are busy (a loaded machine)
    # and reclaims an extra thread only after it has idled 20 s (kIdleThreadLimit in
    # work_stealing_thread_pool.cc): wait past that before calling a thread left behind
    threads = server.settle("threads", before["threads"], timeout=35.0)
    assert server.proc.poll() is None
    assert fds == before["fds"], (fds, before)
    assert threads <= before["threads"], (threads, before)
    record(
        "hostile_connections",
        connections=sum(made.values()) + len(idle),
        **dict(made),
        fds_before=before["fds"],
        fds_after=fds,
    )
