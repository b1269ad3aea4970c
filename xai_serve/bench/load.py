"""The load generator: requests to an xai_serve (or any Open Inference Protocol) endpoint, in a
closed loop at a fixed concurrency or in an open loop at a fixed rate, one asyncio loop and
one gRPC channel for all of them (no thread per request).

- Closed loop (:class:`Setting` ``"concurrency"``, ``c``): ``c`` workers, each sending its
  next request when its answer arrives. A request's latency starts when it is sent.
- Open loop (``"rate"``, ``r`` per second): requests are sent on a schedule (fixed intervals
  of ``1/r``, or Poisson arrivals) whatever the answers, so a server slower than the rate
  queues them. A request's latency starts at its scheduled time.

Each setting first runs its warm-up (requests or seconds, not counted), then its measured part:
a number of requests or a duration (requests started within it are measured; the setting
then waits for their answers).

Protocols: ``explain`` (unary ``Explain``), ``stream`` (``ExplainStream``: in a closed loop one
stream per worker, one request in flight on each; in an open loop one stream carrying every
request), ``oip`` (``ModelInfer`` with the ``explainer`` parameter, or plain inference for
method ``none``). The server's timing (queue, compute, batch size) comes with the first two.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
import torch

from xai_serve import __version__
from xai_serve.bench.report import OK, BenchReport, Sample, Setting, summarise
from xai_serve.client import (
    auth_metadata,
    build_base_request,
    build_options,
    build_request,
    channel_credentials,
    parse_models,
    remote_error,
)
from xai_serve.errors import InvalidInput, NotFound, Unavailable
from xai_serve.models import TransformConfig
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.codec import infer_parameter

__all__ = [
    "PROTOCOLS",
    "BenchProgress",
    "Endpoint",
    "Inputs",
    "Plan",
    "Workload",
    "arrival_offsets",
    "arun_bench",
    "run_bench",
]

PROTOCOLS = ("explain", "stream", "oip")
#: ``--method none`` with ``oip``: plain inference (logits), no explanation.
NO_METHOD = "none"
INPUT_KINDS = ("bundled", "files", "synthetic")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
PREFLIGHT_TIMEOUT_S = 15.0
PROGRESS_EVERY_S = 0.2
#: How long a setting is measured when the plan names neither requests nor a duration.
DEFAULT_DURATION_S = 5.0


# --------------------------------------------------------------------------------------------
# What to measure
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where the server is and how to connect: ``address`` ``host:port``, TLS (``ca``: a PEM
    file of the CA to trust, implies TLS) and a bearer ``token``."""

    address: str
    tls: bool = False
    ca: str | None = None
    token: str | None = None


@dataclass(frozen=True)
class Inputs:
    """The images the requests carry, used in turn: ``"bundled"`` (the demo's photos from
    scikit-image), ``"files"`` (``paths``: files, folders, globs) or ``"synthetic"`` (``count``
    seeded random tensors of the model's input shape)."""

    kind: str = "bundled"
    paths: tuple[str, ...] = ()
    count: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in INPUT_KINDS:
            raise InvalidInput(f"inputs kind must be one of {', '.join(INPUT_KINDS)}")
        if self.kind == "files" and not self.paths:
            raise InvalidInput("inputs of kind 'files' need paths")
        if self.count < 1:
            raise InvalidInput(f"inputs count must be >= 1, got {self.count}")


@dataclass(frozen=True)
class Workload:
    """What every request asks: ``model`` (None: the server's first), ``method`` and its
    ``options`` (pairs or a mapping; checked against the option schema) and ``layer``, over
    ``protocol``, with ``inputs``. ``transform`` preprocesses
    image files for ``oip``, which takes tensors (None: the bundled model's transform when the
    model is a bundled one, else resize and centre crop to the model's input size with the
    ImageNet mean and std). ``timeout_s``: each request's deadline."""

    model: str | None = None
    method: str = "gradcam"
    protocol: str = "explain"
    options: tuple[tuple[str, Any], ...] = ()
    layer: str | None = None
    inputs: Inputs = field(default_factory=Inputs)
    transform: TransformConfig | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise InvalidInput(
                f"protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}"
            )
        if self.method == NO_METHOD and self.protocol != "oip":
            raise InvalidInput("method 'none' (plain inference) works with protocol oip only")
        if not 0 < self.timeout_s < math.inf:
            raise InvalidInput(f"timeout must be a number of seconds > 0, got {self.timeout_s}")
        options = dict(self.options)
        build_options(options)  # names and types checked now, before any request
        object.__setattr__(self, "options", tuple(options.items()))


@dataclass(frozen=True)
class Plan:
    """How long each setting runs: ``requests`` measured requests or ``duration_s`` seconds
    (at most one; neither: :data:`DEFAULT_DURATION_S`), after ``warmup_requests`` requests
    and ``warmup_s`` seconds of warm-up. ``arrivals`` (open loop): ``"fixed"`` intervals or
    ``"poisson"`` (seeded by ``seed``)."""

    requests: int | None = None
    duration_s: float | None = None
    warmup_requests: int = 0
    warmup_s: float = 1.0
    arrivals: str = "fixed"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests is not None and self.duration_s is not None:
            raise InvalidInput("a plan runs for a number of requests or a duration, not both")
        if self.requests is None and self.duration_s is None:
            object.__setattr__(self, "duration_s", DEFAULT_DURATION_S)
        if self.requests is not None and self.requests < 1:
            raise InvalidInput(f"requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and not 0 < self.duration_s < math.inf:
            raise InvalidInput(f"duration must be a number of seconds > 0, got {self.duration_s}")
        if self.warmup_requests < 0 or not 0 <= self.warmup_s < math.inf:
            raise InvalidInput("warm-up must be >= 0")
        if self.arrivals not in ("fixed", "poisson"):
            raise InvalidInput(f"arrivals are 'fixed' or 'poisson', got {self.arrivals!r}")


@dataclass(frozen=True)
class BenchProgress:
    """A progress report, several a second while a setting runs: the ``index``-th of
    ``total`` settings, whether it is warming up, the share of it done (0..1), and its
    measured requests and errors so far."""

    index: int
    total: int
    setting: Setting
    warming_up: bool
    fraction: float
    requests: int
    errors: int


ProgressCallback = Callable[[BenchProgress], None]


# --------------------------------------------------------------------------------------------
# Connection, the model, the inputs
# --------------------------------------------------------------------------------------------


def _channel(endpoint: Endpoint) -> grpc.aio.Channel:
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ]
    credentials = channel_credentials(
        bool(endpoint.tls), Path(endpoint.ca) if endpoint.ca else None, None, None
    )
    if credentials is None:
        return grpc.aio.insecure_channel(endpoint.address, options=options)
    return grpc.aio.secure_channel(endpoint.address, credentials, options=options)


def _metadata(endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
    return auth_metadata(endpoint.token or None)


def _unreachable(endpoint: Endpoint, err: grpc.RpcError) -> Unavailable:
    code = err.code() if callable(getattr(err, "code", None)) else grpc.StatusCode.UNKNOWN
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    return Unavailable(f"cannot use the server at {endpoint.address}: {code.name}: {details}")


@dataclass(frozen=True)
class _Model:
    name: str
    input_shape: tuple[int, int, int]
    input_name: str = "input"


async def _describe_model(
    channel: grpc.aio.Channel, endpoint: Endpoint, workload: Workload
) -> _Model:
    """The model's name and input shape, from ListModels (or, for ``oip``, ModelMetadata, so
    that servers with the Open Inference Protocol only work too). Unavailable when the server
    cannot be reached; NotFound for a model it does not have."""
    metadata = _metadata(endpoint)
    name = workload.model
    listed = None
    if workload.protocol != "oip" or name is None:
        try:
            response = await pb_grpc.ExplainerStub(channel).ListModels(
                pb.ListModelsRequest(), timeout=PREFLIGHT_TIMEOUT_S, metadata=metadata
            )
        except grpc.RpcError as err:
            if workload.protocol == "oip" and err.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise InvalidInput(
                    f"{endpoint.address} does not list its models: name one (--model)"
                ) from None
            raise _unreachable(endpoint, err) from None
        listed = {m.name: m for m in parse_models(response)}
        if not listed:
            raise Unavailable(f"the server at {endpoint.address} has no models")
        name = name if name is not None else next(iter(listed))
        if name not in listed:
            raise NotFound(f"the server has no model {name!r}; it has: {', '.join(listed)}")
    assert name is not None
    if workload.protocol != "oip":
        assert listed is not None
        shape = listed[name].input_shape
        return _Model(name, (int(shape[0]), int(shape[1]), int(shape[2])))
    try:
        meta = await oip_grpc.GRPCInferenceServiceStub(channel).ModelMetadata(
            oip.ModelMetadataRequest(name=name), timeout=PREFLIGHT_TIMEOUT_S, metadata=metadata
        )
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            raise NotFound(f"the server has no model {name!r}: {err.details()}") from None
        raise _unreachable(endpoint, err) from None
    if len(meta.inputs) != 1 or len(meta.inputs[0].shape) != 4:
        raise InvalidInput(
            f"model {name!r} must take one input [B, C, H, W]; its metadata says "
            f"{[list(i.shape) for i in meta.inputs]}"
        )
    if meta.inputs[0].datatype != "FP32":
        raise InvalidInput(f"model {name!r} takes {meta.inputs[0].datatype}; bench sends FP32")
    _, c, h, w = (int(s) for s in meta.inputs[0].shape)
    return _Model(name, (c, h, w), meta.inputs[0].name)


def _photos(inputs: Inputs) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of the images of ``inputs`` (bundled photos or files)."""
    if inputs.kind == "bundled":
        from xai_serve.demo import load_photos
        from xai_serve.imaging import encode_png

        return [(name, encode_png(rgb)) for name, rgb in load_photos()]
    from xai_serve.runner import collect_images

    files, failures = collect_images(inputs.paths)
    if failures:
        raise InvalidInput(f"{failures[0].source}: {failures[0].reason}")
    out = []
    for path in files:
        try:
            out.append((str(path), path.read_bytes()))
        except OSError as exc:
            raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from None
    return out


def _transform(workload: Workload, model: _Model) -> TransformConfig:
    if workload.transform is not None:
        return workload.transform
    from xai_serve.models import BUNDLED_MODELS, bundled_model_config

    if model.name in BUNDLED_MODELS:
        return bundled_model_config(model.name).transform
    c, h, w = model.input_shape
    return TransformConfig(resize=min(h, w), crop=(h, w), grayscale=c == 1)


def _payloads(workload: Workload, model: _Model) -> tuple[list[bytes | torch.Tensor], str]:
    """The request payloads (encoded images, or float tensors ``[C, H, W]``) and a note of
    what they are."""
    inputs = workload.inputs
    if inputs.kind == "synthetic":
        g = torch.Generator().manual_seed(inputs.seed)
        tensors = [torch.randn(model.input_shape, generator=g) for _ in range(inputs.count)]
        shape = "x".join(map(str, model.input_shape))
        return list(tensors), f"{inputs.count} synthetic tensors {shape}"
    photos = _photos(inputs)
    note = f"{len(photos)} {'bundled photos' if inputs.kind == 'bundled' else 'image files'}"
    if workload.protocol != "oip":
        return [data for _, data in photos], note
    from xai_serve.imaging import decode_image
    from xai_serve.models.registry import preprocess_image
    from xai_serve.runner import MAX_IMAGE_PIXELS

    transform = _transform(workload, model)
    tensors = []
    for name, data in photos:
        try:
            rgb = decode_image(data, max_pixels=MAX_IMAGE_PIXELS, field=name)
            tensors.append(preprocess_image(rgb, transform, model.input_shape[1:])[0])
        except InvalidInput as exc:
            raise InvalidInput(f"{name}: {exc}") from None
    return tensors, f"{note}, preprocessed here"


def workload_payloads(
    workload: Workload, model: str, input_shape: Sequence[int]
) -> tuple[list[bytes | torch.Tensor], str]:
    """The images the requests of ``workload`` carry for ``model`` (input ``[C, H, W]``):
    encoded images, or float tensors ``[C, H, W]`` (synthetic inputs, or files preprocessed
    here for ``oip``), and a note of what they are."""
    c, h, w = (int(s) for s in input_shape)
    return _payloads(workload, _Model(model, (c, h, w)))


# --------------------------------------------------------------------------------------------
# Callers: one request, its status code and the server's timing
# --------------------------------------------------------------------------------------------

_Outcome = tuple[str, pb.Timing | None]


def _code_of(err: grpc.RpcError) -> str:
    code = err.code() if callable(getattr(err, "code", None)) else None
    return code.name if code is not None else "UNKNOWN"


def _answer(response: pb.ExplainResponse) -> _Outcome:
    if response.HasField("error"):
        return remote_error(response.error.code, response.error.message).code.name, None
    return OK, response.timing


class _Lane(Protocol):
    async def call(self, n: int) -> _Outcome: ...

    async def close(self) -> None: ...


class _Unary:
    """``Explain`` or ``ModelInfer`` calls; every request is its own call."""

    def __init__(self, rpc: Any, requests: Sequence[Any], timeout: float, metadata: Any) -> None:
        self._rpc = rpc
        self._requests = requests
        self._timeout = timeout
        self._metadata = metadata

    async def call(self, n: int) -> _Outcome:
        request = self._requests[n % len(self._requests)]
        try:
            response = await self._rpc(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            return _code_of(err), None
        if isinstance(response, pb.ExplainResponse):
            return _answer(response)
        return OK, None

    async def close(self) -> None:
        return None


class _StreamLane:
    """One ``ExplainStream`` carrying any number of requests at once (each with its own
    request id; answers are matched by it). A stream that fails fails its pending requests
    with its status; the next request opens a new stream."""

    def __init__(
        self, stub: pb_grpc.ExplainerStub, requests: Sequence[pb.ExplainRequest],
        timeout: float, metadata: Any,
    ) -> None:  # fmt: skip
        self._stub = stub
        self._requests = requests
        self._timeout = timeout
        self._metadata = metadata
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[_Outcome]] = {}
        self._write = asyncio.Lock()

    def _open(self) -> Any:
        if self._call is None or self._call.done():
            self._call = self._stub.ExplainStream(metadata=self._metadata)
            self._reader = asyncio.get_running_loop().create_task(self._read(self._call))
        return self._call

    async def _read(self, call: Any) -> None:
        code = "UNKNOWN"
        try:
            while True:
                response = await call.read()
                if response is grpc.aio.EOF:
                    break
                future = self._pending.pop(response.request_id, None)
                if future is not None and not future.done():
                    future.set_result(_answer(response))
        except grpc.RpcError as err:
            code = _code_of(err)
        for future in self._pending.values():  # the stream ended under them
            if not future.done():
                future.set_result((code, None))
        self._pending.clear()

    async def call(self, n: int) -> _Outcome:
        request = pb.ExplainRequest()
        request.CopyFrom(self._requests[n % len(self._requests)])
        request.request_id = f"bench-{n}"
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._pending[request.request_id] = future
        try:
            async with self._write:
                await self._open().write(request)
        except (grpc.RpcError, asyncio.InvalidStateError) as err:
            self._pending.pop(request.request_id, None)
            code = _code_of(err) if isinstance(err, grpc.RpcError) else "UNAVAILABLE"
            return code, None
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout)
        except TimeoutError:
            self._pending.pop(request.request_id, None)
            return grpc.StatusCode.DEADLINE_EXCEEDED.name, None

    async def close(self) -> None:
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def _explain_requests(workload: Workload, model: _Model, payloads: Sequence[Any]) -> list[Any]:
    base = build_base_request(
        model=model.name, method=workload.method, layer=workload.layer, top_k=None,
        overlay=False, want_map=True, options=dict(workload.options),
    )  # fmt: skip
    return [build_request(base, p, request_id=f"bench-{i}") for i, p in enumerate(payloads)]


def _oip_requests(workload: Workload, model: _Model, payloads: Sequence[Any]) -> list[Any]:
    requests = []
    for i, x in enumerate(payloads):
        x = x.detach().to(torch.float32).contiguous()[None]
        request = oip.ModelInferRequest(
            model_name=model.name,
            id=f"bench-{i}",
            inputs=[oip.ModelInferRequest.InferInputTensor(
                name=model.input_name, datatype="FP32", shape=list(x.shape))],
            raw_input_contents=[x.numpy().astype("<f4").tobytes()],
        )  # fmt: skip
        if workload.method != NO_METHOD:
            request.parameters["explainer"].CopyFrom(infer_parameter(workload.method, "--method"))
            if workload.layer is not None:
                request.parameters["layer"].CopyFrom(infer_parameter(workload.layer, "--layer"))
            for key, value in workload.options:
                request.parameters[key].CopyFrom(infer_parameter(value, f"-o {key}"))
        requests.append(request)
    return requests


# --------------------------------------------------------------------------------------------
# Closed and open loops
# --------------------------------------------------------------------------------------------


class _Run:
    """The bookkeeping of one setting: which request is warm-up, when the measured part ends,
    the samples, and the counts a progress report shows."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.begin = time.perf_counter()
        self.issued = 0
        self.measured = 0
        self.window: float | None = None
        self.samples: list[Sample] = []
        self.errors = 0

    def warm(self, n: int, at: float) -> bool:
        return n < self.plan.warmup_requests or at < self.begin + self.plan.warmup_s

    def take(self, n: int, at: float) -> bool | None:
        """Whether request ``n`` (starting at ``at``) is measured; None once the measured part
        is over."""
        if self.warm(n, at):
            return False
        if self.window is None:
            self.window = at
        if self.plan.requests is not None and self.measured >= self.plan.requests:
            return None
        if self.plan.duration_s is not None and at >= self.window + self.plan.duration_s:
            return None
        self.measured += 1
        return True

    def record(self, start: float, outcome: _Outcome) -> None:
        code, timing = outcome
        end = time.perf_counter()
        if code != OK:
            self.errors += 1
        if timing is None:
            self.samples.append(Sample(start, end, code))
        else:
            self.samples.append(Sample(
                start, end, code, queue_ms=float(timing.queue_ms),
                compute_ms=float(timing.compute_ms), batch_size=int(timing.batch_size),
                cache_hit=bool(timing.cache_hit),
            ))  # fmt: skip

    def fraction(self) -> tuple[bool, float]:
        now = time.perf_counter()
        plan = self.plan
        if self.window is None:
            if plan.warmup_s > 0:
                return True, min(1.0, (now - self.begin) / plan.warmup_s)
            return True, self.issued / max(1, plan.warmup_requests)
        if plan.duration_s is not None:
            return False, min(1.0, (now - self.window) / plan.duration_s)
        assert plan.requests is not None
        return False, len(self.samples) / plan.requests


async def _closed(run: _Run, lanes: Sequence[_Lane]) -> None:
    async def worker(lane: _Lane) -> None:
        while True:
            n = run.issued
            start = time.perf_counter()
            measured = run.take(n, start)
            if measured is None:
                return
            run.issued += 1
            outcome = await lane.call(n)
            if measured:
                run.record(start, outcome)

    await asyncio.gather(*(worker(lane) for lane in lanes))


def arrival_offsets(rate: float, arrivals: str = "fixed", seed: int = 0) -> Iterator[float]:
    """The open loop's schedule: the seconds from the first request to each request, without
    end. ``"fixed"``: ``n / rate`` (computed from ``n``, so rounding does not add up);
    ``"poisson"``: sums of exponential gaps of mean ``1 / rate``, from ``random.Random(seed)``.
    """
    if not 0 < rate < math.inf:
        raise InvalidInput(f"rate must be a finite number > 0 per second, got {rate!r}")
    if arrivals == "fixed":
        for n in itertools.count():
            yield n / rate
    elif arrivals == "poisson":
        rng = random.Random(seed)
        at = 0.0
        while True:
            yield at
            at += rng.expovariate(rate)
    else:
        raise InvalidInput(f"arrivals are 'fixed' or 'poisson', got {arrivals!r}")


async def _open(run: _Run, lane: _Lane, rate: float) -> None:
    tasks: list[asyncio.Task[None]] = []

    async def one(n: int, due: float, measured: bool) -> None:
        outcome = await lane.call(n)
        if measured:
            run.record(due, outcome)

    first = time.perf_counter()
    loop = asyncio.get_running_loop()
    for offset in arrival_offsets(rate, run.plan.arrivals, run.plan.seed):
        due = first + offset
        measured = run.take(run.issued, due)
        if measured is None:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(run.issued, due, measured)))
        run.issued += 1
    await asyncio.gather(*tasks)


async def _ticker(run: _Run, report: Callable[[_Run], None]) -> None:
    while True:
        report(run)
        await asyncio.sleep(PROGRESS_EVERY_S)


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


async def arun_bench(
    endpoint: Endpoint,
    workload: Workload,
    settings: Sequence[Setting],
    plan: Plan | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> BenchReport:
    """:func:`run_bench` on the running event loop."""
    plan = plan if plan is not None else Plan()
    if not settings:
        raise InvalidInput("no settings to measure")
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    channel = _channel(endpoint)
    metadata = _metadata(endpoint)
    lanes: list[_Lane] = []
    try:
        model = await _describe_model(channel, endpoint, workload)
        payloads, inputs_note = _payloads(workload, model)
        timeout = workload.timeout_s
        if workload.protocol == "oip":
            stub: Any = oip_grpc.GRPCInferenceServiceStub(channel)
            unary = _Unary(stub.ModelInfer, _oip_requests(workload, model, payloads), timeout,
                           metadata)  # fmt: skip
        else:
            stub = pb_grpc.ExplainerStub(channel)
            requests = _explain_requests(workload, model, payloads)
            unary = _Unary(stub.Explain, requests, timeout, metadata)
        rows = []
        for index, setting in enumerate(settings):
            run = _Run(plan)

            def report(run: _Run, index: int = index, setting: Setting = setting) -> None:
                if progress is not None:
                    warming, fraction = run.fraction()
                    progress(BenchProgress(index, len(settings), setting, warming, fraction,
                                      len(run.samples), run.errors))  # fmt: skip

            ticker = asyncio.get_running_loop().create_task(_ticker(run, report))
            try:
                if workload.protocol == "stream":
                    count = int(setting.value) if setting.mode == "concurrency" else 1
                    lanes = [_StreamLane(stub, requests, timeout, metadata) for _ in range(count)]
                else:
                    lanes = [unary] * (int(setting.value) if setting.mode == "concurrency" else 1)
                if setting.mode == "concurrency":
                    await _closed(run, lanes)
                else:
                    await _open(run, lanes[0], float(setting.value))
            finally:
                ticker.cancel()
                for lane in lanes:
                    await lane.close()
                lanes = []
            report(run)
            rows.append(summarise(setting, run.samples))
    finally:
        await channel.close()
    info = {
        "server": endpoint.address,
        "protocol": workload.protocol,
        "model": model.name,
        "input_shape": list(model.input_shape),
        "method": workload.method,
        "layer": workload.layer,
        "options": dict(workload.options),
        "inputs": inputs_note,
        "requests_per_setting": plan.requests,
        "duration_s_per_setting": plan.duration_s,
        "warmup_requests": plan.warmup_requests,
        "warmup_s": plan.warmup_s,
        "arrivals": plan.arrivals,
        "timeout_s": workload.timeout_s,
        "started": started,
        "xai_serve": __version__,
    }
    return BenchReport(tuple(rows), info)


def run_bench(
    endpoint: Endpoint,
    workload: Workload,
    settings: Sequence[Setting],
    plan: Plan | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> BenchReport:
    """Measure ``workload`` on ``endpoint`` at each of ``settings`` in turn (each run as
    ``plan`` says) and return the rows.

    Raises:
        Unavailable: the server cannot be reached (before any setting runs).
        NotFound: the server has no such model.
        InvalidInput: bad options, unreadable images, a plan or settings that make no sense.

    Requests that fail while the benchmark runs are counted by status code in their row, never
    raised.

    Runs on an event loop kept for the calling thread, never closed: grpc.aio may still call
    back into the loop a channel used after the channel is closed, which a closed loop (one
    per ``asyncio.run``) reports as errors. Inside a running loop, await :func:`arun_bench`.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # none running: good
        pass
    else:
        raise InvalidInput("run_bench was called inside a running event loop: await arun_bench")
    loop = getattr(_LOOPS, "loop", None)
    if loop is None or loop.is_closed():
        loop = _LOOPS.loop = asyncio.new_event_loop()
    return loop.run_until_complete(
        arun_bench(endpoint, workload, settings, plan, progress=progress)
    )


_LOOPS = threading.local()
