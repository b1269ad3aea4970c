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
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

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


def _after_fuzz(server: ServerProcess, tmp: Path) -> None:
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
        req.tensor.CopyFrom(fuzz_cases.pb.Tensor(shape=[3, 64, 64], dtype=pb.FLOAT32))
        req.tensor.data = x.numpy().astype("<f4").tobytes()
        resp = stub.Explain(req, metadata=auth, timeout=TIMEOUT)
    torch.testing.assert_close(decode_tensor(resp.map), ref.maps[0], rtol=1e-4, atol=1e-5)
    assert resp.target == 4 and resp.request_id == "after"
    log = server.log
    assert "internal error" not in log and "Traceback" not in log, log[-5000:]


def test_fuzz(server: ServerProcess, tmp_path: Path) -> None:
    seed = int(os.environ.get("XAI_SERVE_FUZZ_SEED", "0"))
    n = int(os.environ.get("XAI_SERVE_FUZZ_CASES", "5000"))
    figures = fuzz(server, seed, n)
    _after_fuzz(server, tmp_path)
    record("fuzz", **figures)


@pytest.mark.slow
@pytest.mark.soak
def test_fuzz_full(server: ServerProcess, tmp_path: Path) -> None:
    figures = fuzz(server, seed=1, n=20_000)
    _after_fuzz(server, tmp_path)
    record("fuzz_full", **figures)
