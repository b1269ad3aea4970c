"""Models served elsewhere: an Open Inference Protocol (KServe v2 / Triton) gRPC client that
the black-box explanation methods call like a local model.

:class:`RemoteModel` is a :class:`~xai_serve.explainers.base.BlackBoxModel`: ``model(x)``
sends ``x`` (``Tensor[N, C, H, W]``, split into calls of at most ``max_batch`` images) to the
remote model's ``ModelInfer`` and returns its ``[N, classes]`` scores as float32 on the
model's device. :meth:`RemoteModel.forward_chunks` is the pipelined path the perturbation
methods use: it keeps up to ``in_flight`` calls outstanding and only then takes the next chunk
from the (lazy) iterable, so the network and the remote compute overlap the building and
scoring of the chunks here.

Deadlines and cancellation. :func:`call_scope` sets, for the calls made in its ``with`` block
on this thread, the instant (``time.monotonic()``) by which the answer is due and a callable
that says whether the caller gave up. Every call then gets as its gRPC timeout the time the
deadline leaves (at most ``timeout_s``); while waiting, the client checks the cancel callable
every :data:`POLL_S` seconds and cancels its outstanding calls when it says so. The server's
engine opens such a scope around each batch (:func:`xai_serve.serving.engine.run_batch`).

Errors. A failed call becomes the :mod:`xai_serve.errors` class its status means to our
caller, with the remote's status and (clipped) message: UNAVAILABLE (or an unreachable
server) -> :class:`~xai_serve.errors.Unavailable`; DEADLINE_EXCEEDED ->
:class:`~xai_serve.errors.DeadlineExceeded`; RESOURCE_EXHAUSTED ->
:class:`~xai_serve.errors.ResourceExhausted`; INVALID_ARGUMENT / OUT_OF_RANGE (the remote
refused the input) -> :class:`~xai_serve.errors.InvalidInput`; NOT_FOUND, UNIMPLEMENTED,
UNAUTHENTICATED, PERMISSION_DENIED, FAILED_PRECONDITION (our config does not fit the
remote) -> :class:`~xai_serve.errors.FailedPrecondition`; anything else (INTERNAL, UNKNOWN,
...) -> :class:`~xai_serve.errors.Unavailable`: the remote failed, not our caller. An answer
that is not what was asked for (no such output, the wrong shape, a non-numeric datatype, a
byte count that does not fit) is :class:`~xai_serve.errors.Unavailable` too, naming what came
back: gRPC's mapping of an HTTP gateway's 502 "bad gateway"; INVALID_ARGUMENT would blame our
caller and INTERNAL our own code.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import Tensor

from xai_serve.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.explainers.base import BlackBoxModel
from xai_serve.models.config import RemoteConfig
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc

__all__ = [
    "DEFAULT_MAX_BATCH",
    "POLL_S",
    "CallScope",
    "RemoteModel",
    "call_scope",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BATCH = 32
"""Images per call when neither the config nor the remote's metadata bounds the batch."""

POLL_S = 0.05
"""How often a waiting call checks whether its caller cancelled."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""The largest answer the client accepts (gRPC's default of 4 MiB is too small for a batch
of scores over many classes)."""

_DTYPES: dict[str, torch.dtype] = {
    "FP32": torch.float32,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP64": torch.float64,
}
_TYPED_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}
_DETAILS_CHARS = 300

# Remote status -> the error class it means to our caller (see the module doc).
_PRECONDITION = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
_REFUSED_INPUT = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


# --------------------------------------------------------------------------------------------
# Deadline and cancellation of the calls made on this thread
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CallScope:
    """What the remote calls of one piece of work must respect: ``deadline`` (a
    ``time.monotonic()`` instant, or None) and ``cancelled`` (True once the caller gave up)."""

    deadline: float | None = None
    cancelled: Callable[[], bool] | None = None

    def is_cancelled(self) -> bool:
        return self.cancelled is not None and bool(self.cancelled())


_NO_SCOPE = CallScope()
_SCOPE: ContextVar[CallScope | None] = ContextVar("xai_serve_remote_scope", default=None)


def _current_scope() -> CallScope:
    return _SCOPE.get() or _NO_SCOPE


@contextlib.contextmanager
def call_scope(
    deadline: float | None = None, cancelled: Callable[[], bool] | None = None
) -> Iterator[CallScope]:
    """Remote calls made in this block (on this thread) end by ``deadline`` and are cancelled
    once ``cancelled()`` is true (see the module doc)."""
    scope = CallScope(deadline, cancelled)
    token = _SCOPE.set(scope)
    try:
        yield scope
    finally:
        _SCOPE.reset(token)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def _clip(text: str, limit: int = _DETAILS_CHARS) -> str:
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[:limit] + " ..."


class RemoteModel(BlackBoxModel):
    """A model served by an Open Inference Protocol gRPC server (see the module doc).

    Args:
        cfg: the endpoint and how to call it.
        name: the name of the model here (the remote name defaults to it).
        input_shape: ``(C, H, W)`` of one preprocessed image.
        device: where the returned scores go (and what :func:`xai_serve.explain` moves the
            images to before they are perturbed).

    Call :meth:`connect` (as :func:`xai_serve.models.load_model` does) before the first
    forward: it reads the remote's metadata, settles the input and output names, the
    datatype and the batch bound, and probes one forward for the class count.
    """

    def __init__(
        self,
        cfg: RemoteConfig,
        name: str,
        input_shape: tuple[int, int, int],
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if sys.byteorder != "little":  # raw tensors travel little-endian
            raise Unavailable("models served elsewhere need a little-endian host")
        self.config = cfg
        self.where = f"models[{name}].remote"
        self.remote_name = cfg.model or name
        self.version = cfg.version
        self.url = cfg.url
        self.input_shape = tuple(input_shape)
        # No parameters: this buffer only says which device the scores (and images) live on.
        self.register_buffer("_anchor", torch.empty(0, device=device), persistent=False)
        self.input_name = cfg.input
        self.output_name = cfg.output
        self.datatype = "FP32" if cfg.dtype == "auto" else cfg.dtype
        self.max_batch = cfg.max_batch or DEFAULT_MAX_BATCH
        self.in_flight = cfg.in_flight
        self.num_classes: int | None = None
        self.calls = 0  # ModelInfer calls sent (for tests and benchmarks)
        self._ids = itertools.count()
        self._metadata = self._auth_metadata(cfg)
        self._channel = self._open_channel(cfg)
        stub = oip_grpc.GRPCInferenceServiceStub(self._channel)
        self._infer = stub.ModelInfer
        self._model_metadata = stub.ModelMetadata

    # ------------------------------------------------------------------ setup

    def _auth_metadata(self, cfg: RemoteConfig) -> tuple[tuple[str, str], ...]:
        if cfg.token_env is None:
            return ()
        token = os.environ.get(cfg.token_env, "").strip()
        if not token:
            raise InvalidInput(
                f"{self.where}.token_env: the environment variable ${cfg.token_env} is unset or "
                "empty; set it to the bearer token of the remote server"
            )
        return (("authorization", f"Bearer {token}"),)

    def _open_channel(self, cfg: RemoteConfig) -> grpc.Channel:
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", -1),
        ]
        if not cfg.secure:
            return grpc.insecure_channel(cfg.url, options=options)
        roots = None
        if cfg.ca_file is not None:
            try:
                roots = Path(cfg.ca_file).read_bytes()
            except OSError as e:
                raise InvalidInput(
                    f"{self.where}.ca_file: cannot read {cfg.ca_file}: {e.strerror or e}"
                ) from None
        creds = grpc.ssl_channel_credentials(root_certificates=roots)
        return grpc.secure_channel(cfg.url, creds, options=options)

    def describe(self) -> str:
        version = f" version {self.version!r}" if self.version else ""
        return f"remote model {self.remote_name!r}{version} at {self.url}"

    def connect(self, probe: Tensor) -> int:
        """Read the remote's metadata, settle the input/output names, the datatype and the
        batch bound, and run ``probe`` (``Tensor[1, C, H, W]``) through it. Returns the class
        count.

        Raises:
            Unavailable: the server cannot be reached (or failed the probe).
            NotFound: it has no such model (or version).
            InvalidInput: the metadata or the probe's answer does not fit the config.
        """
        meta = self._read_metadata()
        if meta is not None:
            self._settle(meta)
        elif self.input_name is None:
            self.input_name = "input"
            logger.warning(
                "%s: %s gives no model metadata; sending the input as %r (set remote.input "
                "to change it)",
                self.where,
                self.describe(),
                self.input_name,
            )
        try:
            out = self(probe)
        except XaiServeError as e:
            raise type(e)(f"{self.where}: a probe call failed: {e}") from None
        self.num_classes = int(out.shape[1])
        return self.num_classes

    def _read_metadata(self) -> oip.ModelMetadataResponse | None:
        request = oip.ModelMetadataRequest(name=self.remote_name, version=self.version)
        try:
            return self._model_metadata(
                request, timeout=self.config.timeout_s, metadata=self._metadata
            )
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return None
            details = _clip(e.details() if hasattr(e, "details") else str(e))
            if code == grpc.StatusCode.NOT_FOUND:
                raise NotFound(
                    f"{self.where}: the server at {self.url} has no model "
                    f"{self.remote_name!r}{f' version {self.version!r}' if self.version else ''}"
                    f" ({details})"
                ) from None
            raise self._error(e, CallScope(), "ModelMetadata") from None

    def _settle(self, meta: oip.ModelMetadataResponse) -> None:
        """Input/output names, datatype and batch bound from the metadata (where the config
        leaves them open), checked against the config."""
        inputs = {t.name: t for t in meta.inputs}
        if self.input_name is None:
            if len(meta.inputs) > 1:
                raise InvalidInput(
                    f"{self.where}.input: {self.describe()} has {len(meta.inputs)} inputs "
                    f"({', '.join(inputs)}); name the image input"
                )
            self.input_name = meta.inputs[0].name if meta.inputs else "input"
        elif inputs and self.input_name not in inputs:
            raise InvalidInput(
                f"{self.where}.input: {self.describe()} has no input {self.input_name!r}; its "
                f"inputs: {', '.join(inputs)}"
            )
        spec = inputs.get(self.input_name)
        if spec is not None and spec.datatype:
            if self.config.dtype == "auto":
                if spec.datatype not in _DTYPES:
                    raise InvalidInput(
                        f"{self.where}.dtype: {self.describe()} takes {spec.datatype} input; "
                        f"explanations send one of {', '.join(_DTYPES)}"
                    )
                self.datatype = spec.datatype
            elif spec.datatype != self.datatype:
                raise InvalidInput(
                    f"{self.where}.dtype is {self.datatype} but {self.describe()} takes "
                    f"{spec.datatype} input"
                )
        if spec is not None and len(spec.shape) > 0:
            self._check_input_shape(list(spec.shape))
        outputs = [t.name for t in meta.outputs]
        if self.output_name is None:
            if len(outputs) == 1:
                self.output_name = outputs[0]
            elif "logits" in outputs:
                self.output_name = "logits"
            elif outputs:
                raise InvalidInput(
                    f"{self.where}.output: {self.describe()} has outputs {', '.join(outputs)}; "
                    "name the one with the [batch, classes] scores"
                )
        elif outputs and self.output_name not in outputs:
            raise InvalidInput(
                f"{self.where}.output: {self.describe()} has no output {self.output_name!r}; "
                f"its outputs: {', '.join(outputs)}"
            )

    def _check_input_shape(self, shape: list[int]) -> None:
        c, h, w = self.input_shape
        want = [c, h, w] if self.config.layout == "NCHW" else [h, w, c]
        if len(shape) != 4 or any(d not in (-1, x) for d, x in zip(shape[1:], want, strict=False)):
            raise InvalidInput(
                f"{self.where}: {self.describe()} takes input {shape}, but this model's "
                f"images are {['batch', *want]} ({self.config.layout}); check transform, "
                "input_size and remote.layout"
            )
        if shape[0] > 0:
            if self.config.max_batch is not None and self.config.max_batch > shape[0]:
                raise InvalidInput(
                    f"{self.where}.max_batch is {self.config.max_batch} but {self.describe()} "
                    f"takes batches of {shape[0]}"
                )
            if self.config.max_batch is None:
                self.max_batch = shape[0]

    # ------------------------------------------------------------------ calls

    def forward(self, x: Tensor) -> Tensor:
        """``Tensor[N, classes]`` float32 scores of ``x`` (``Tensor[N, C, H, W]``), in calls
        of at most ``max_batch`` images, up to ``in_flight`` of them at once."""
        return torch.cat(list(self.forward_chunks(self._split(x))))

    def forward_chunks(self, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        """The scores of each chunk, in order, with up to ``in_flight`` calls outstanding: the
        next chunk is drawn from ``chunks`` (and sent) as soon as fewer calls are out; a chunk
        larger than ``max_batch`` goes as several calls. Outstanding calls are cancelled when
        the caller stops early or a call fails."""
        scope = _current_scope()
        source = iter(chunks)
        pending: deque[list[tuple[grpc.Future, int]]] = deque()
        out_now = 0
        exhausted = False
        try:
            while True:
                while not exhausted and (not pending or out_now < self.in_flight):
                    x = next(source, None)
                    if x is None:
                        exhausted = True
                        break
                    calls = [(self._send(p, scope), int(p.shape[0])) for p in self._split(x)]
                    pending.append(calls)
                    out_now += len(calls)
                if not pending:
                    return
                calls = pending[0]
                parts = [self._receive(call, n, scope) for call, n in calls]
                pending.popleft()
                out_now -= len(calls)
                yield torch.cat(parts).to(self._anchor.device)
        finally:
            for calls in pending:
                for call, _ in calls:
                    call.cancel()

    def _split(self, x: Tensor) -> tuple[Tensor, ...]:
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            got = list(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise InvalidInput(
                f"{self.describe()} takes Tensor[N, {', '.join(map(str, self.input_shape))}], "
                f"got {got}"
            )
        if x.shape[0] == 0:
            raise InvalidInput(f"{self.describe()}: an empty batch")
        return x.split(self.max_batch)

    def _timeout(self, scope: CallScope) -> float:
        if scope.is_cancelled():
            raise Cancelled(f"the request was cancelled before calling {self.describe()}")
        timeout = self.config.timeout_s
        if scope.deadline is not None:
            left = scope.deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(
                    f"the deadline passed before {self.describe()} could be called"
                )
            timeout = min(timeout, left)
        return timeout

    def _request(self, x: Tensor) -> oip.ModelInferRequest:
        t = x.detach().to(device="cpu", dtype=_DTYPES[self.datatype])
        if self.config.layout == "NHWC":
            t = t.permute(0, 2, 3, 1)
        t = t.contiguous()
        request = oip.ModelInferRequest(
            model_name=self.remote_name, model_version=self.version, id=f"xai-{next(self._ids)}"
        )
        request.inputs.add(
            name=self.input_name or "input", datatype=self.datatype, shape=list(t.shape)
        )
        if self.output_name is not None:
            request.outputs.add(name=self.output_name)
        request.raw_input_contents.append(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return request

    def _send(self, x: Tensor, scope: CallScope) -> grpc.Future:
        timeout = self._timeout(scope)
        self.calls += 1
        return self._infer.future(self._request(x), timeout=timeout, metadata=self._metadata)

    def _receive(self, call: grpc.Future, n: int, scope: CallScope) -> Tensor:
        while True:
            try:
                response = call.result(timeout=POLL_S)
            except grpc.FutureTimeoutError:
                if scope.is_cancelled():
                    call.cancel()
                    raise Cancelled(
                        f"the request was cancelled while waiting for {self.describe()}"
                    ) from None
                continue
            except grpc.FutureCancelledError:
                raise Cancelled(f"the call to {self.describe()} was cancelled") from None
            except grpc.RpcError as e:
                raise self._error(e, scope, "ModelInfer") from None
            return self._decode(response, n)

    def _error(self, e: grpc.RpcError, scope: CallScope, rpc: str) -> XaiServeError:
        """The :mod:`xai_serve.errors` class a failed call means to our caller."""
        code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
        details = _clip((e.details() if hasattr(e, "details") else None) or str(e))
        said = f"{self.describe()} answered {rpc} with {code.name}: {details}"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if scope.deadline is not None and time.monotonic() >= scope.deadline - 1e-3:
                return DeadlineExceeded(f"the deadline passed while waiting for {self.describe()}")
            return DeadlineExceeded(
                f"{self.describe()} did not answer {rpc} within {self.where}.timeout_s = "
                f"{self.config.timeout_s:g} s"
            )
        if code == grpc.StatusCode.CANCELLED:
            if scope.is_cancelled():
                return Cancelled(f"the request was cancelled while waiting for {self.describe()}")
            return Unavailable(said)
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"{self.describe()} is unavailable ({details})")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hint = ""
            if "message" in details.lower() and "larger" in details.lower():
                hint = f"; lower {self.where}.max_batch (now {self.max_batch})"
            return ResourceExhausted(said + hint)
        if code in _REFUSED_INPUT:
            return InvalidInput(f"{self.describe()} refused the input: {details}")
        if code in _PRECONDITION:
            return FailedPrecondition(f"{said}; check {self.where} (url, model, auth)")
        return Unavailable(said)

    def _bad_answer(self, what: str, n: int) -> Unavailable:
        classes = self.num_classes if self.num_classes is not None else "classes"
        output = f"output {self.output_name!r}" if self.output_name else "one output"
        return Unavailable(
            f"{self.describe()} answered with {what}; expected {output} of numeric scores "
            f"[{n}, {classes}]"
        )

    def _decode(self, response: Any, n: int) -> Tensor:
        """The float32 ``[n, classes]`` scores in an answer, checked."""
        outputs = list(response.outputs)
        if self.output_name is not None:
            index = next((i for i, o in enumerate(outputs) if o.name == self.output_name), None)
            if index is None:
                names = ", ".join(repr(o.name) for o in outputs) or "none"
                raise self._bad_answer(f"outputs {names}", n)
        elif len(outputs) == 1:
            index = 0
        else:
            raise self._bad_answer(f"{len(outputs)} outputs", n)
        out = outputs[index]
        shape = [int(d) for d in out.shape]
        dtype = _DTYPES.get(out.datatype)
        if dtype is None:
            raise self._bad_answer(f"datatype {out.datatype!r}", n)
        if len(shape) != 2 or shape[0] != n or shape[1] < 1:
            raise self._bad_answer(f"shape {shape}", n)
        if self.num_classes is not None and shape[1] != self.num_classes:
            raise self._bad_answer(f"{shape[1]} classes (it had {self.num_classes})", n)
        count = shape[0] * shape[1]
        raw = list(response.raw_output_contents)
        if raw:
            if len(raw) != len(outputs):
                raise self._bad_answer(
                    f"{len(raw)} raw_output_contents for {len(outputs)} outputs", n
                )
            data = raw[index]
            if len(data) != count * dtype.itemsize:
                raise self._bad_answer(f"{len(data)} bytes for shape {shape} of {out.datatype}", n)
            t = torch.frombuffer(bytearray(data), dtype=dtype)
        else:
            field = _TYPED_CONTENTS.get(out.datatype)
            values = getattr(out.contents, field) if field is not None else ()
            if len(values) != count:
                raise self._bad_answer(
                    f"{len(values)} values in contents for shape {shape} of {out.datatype}", n
                )
            t = torch.tensor(list(values), dtype=dtype)
        return t.reshape(shape).float()

    def close(self) -> None:
        """Close the channel (outstanding calls are cancelled)."""
        self._channel.close()
