"""The HTTP listener: KServe's v1 REST protocol and the Open Inference Protocol's REST binding
(v2), beside the gRPC port, over the same :class:`ServerState` (models, batchers, limits,
cache, metrics).

This module only translates: a JSON request becomes the protobuf request the gRPC servicers
take (``xai_serve.v1.ExplainRequest`` or ``inference.ModelInferRequest``), the servicer answers
it exactly as it answers a gRPC call (same checks, jobs, batcher, deadlines, out-of-memory
policy), and its answer becomes JSON. Errors become HTTP status codes in :func:`_error` only.

Routes (``{m}`` is a model name):

KServe v1
  - ``GET /v1/models`` -> ``{"models": [names]}``
  - ``GET /v1/models/{m}`` -> ``{"name": m, "ready": bool}``
  - ``POST /v1/models/{m}:predict`` with ``{"instances": [...]}`` -> ``{"predictions":
    [[p_0, ..., p_{K-1}], ...]}``: each instance's class probabilities (softmax of the
    model's fp32 logits).
  - ``POST /v1/models/{m}:explain`` with ``{"instances": [...], "parameters": {"method":
    "gradcam", "target": 3, ...}}`` -> ``{"explanations": [{"method", "target", "layer",
    "map": [[...H...]...W], "top_k": [{"index", "label", "probability", "logit"}],
    "overlay_png"?: base64 PNG, "seed"?: int, "per_target"?: [{"target", "map"}]}]}``.
    Parameters: ``method`` (required), ``target``, ``targets`` (a list of class indices),
    ``top_labels``, ``foil``, ``layer``, ``top_k`` (default 5), ``overlay`` (bool: also
    return the heatmap drawn over the image) and any method option under its own name
    (``samples``, ``seed``, ``n_segments``, ``baseline`` = a number or ``"blur"``, ...).

  An instance is an encoded image, ``{"image": {"b64": "..."}}`` or ``{"b64": "..."}`` (as
  KServe's image examples send it; decoded and preprocessed by the model's transform), or a
  preprocessed tensor as nested float lists ``[C][H][W]``.

Open Inference Protocol (REST)
  - ``GET /v2`` (server metadata), ``GET /v2/health/live``, ``GET /v2/health/ready``
  - ``GET /v2/models/{m}`` (model metadata), ``GET /v2/models/{m}/ready``
  - ``POST /v2/models/{m}/infer`` (and ``/v2/models/{m}/versions/{v}/infer``): the JSON tensor
    format, with the binary tensor data extension (``binary_data_size`` input parameters,
    ``binary_data`` / ``binary_data_output`` for outputs, ``Inference-Header-Content-Length``)
    that ``tritonclient.http`` uses by default. Inputs, outputs and parameters mean what they
    mean to the gRPC ``ModelInfer`` (see :mod:`xai_serve.serving.oip`).

Liveness: ``GET /`` -> ``{"status": "alive"}`` (KServe's own server and its SDK's v1
``is_server_live``), ``GET /v2/health/live``. Readiness answers 200 when ready and 503 when not
(as KServe's server does). With ``[auth]`` every route except ``/`` and ``/v2/health/*`` needs
``Authorization: Bearer <token>`` (401 otherwise).

Deadline: a request may carry ``X-Request-Timeout: <seconds>`` (a positive decimal number, e.g.
``2.5``). It is the request's deadline exactly as a gRPC call's deadline is: counted from the
request's arrival, given to its jobs (a job still queued at the deadline is never computed; a
method with ``budget_ms`` gets the time left as its budget), and when it passes the request is
cancelled and answered 504. A malformed header is a 400. (A v2 ``/infer`` request may also
carry Triton's ``timeout`` parameter, in microseconds; the earlier of the two applies.)

Bodies: a request body larger than the server's ``limits.max_message_bytes`` (the same limit
as a gRPC message) is refused with 413 before it is read: a larger ``Content-Length`` is
refused at once, and a streamed (chunked) body is read only up to the limit.

Errors are ``{"error": "<message>"}`` with 400 (bad input, malformed JSON, a bad header), 401,
404 (unknown model, method, layer or route), 405 (a route's wrong HTTP method), 413 (body too
large), 429 (a limit), 503 (loading, draining, out of memory), 504 (deadline) or 500 (a bug,
logged with an error id; never a traceback in the answer). Requests count in the server's
metrics under ``rpc`` = ``"http:<route>"``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from xai_serve.errors import (
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.explainers.base import OPTION_SCHEMA, list_methods
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.serving import codec
from xai_serve.serving.auth import TokenAuthInterceptor
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.engine import DeadlineExceeded
from xai_serve.serving.errors import clip_message, status_of
from xai_serve.serving.jobs import check_tensor_input, gather_or_cancel
from xai_serve.serving.oip import InferenceServicer, option_param
from xai_serve.serving.servicer import ExplainerServicer
from xai_serve.serving.state import ServerState

__all__ = [
    "TIMEOUT_HEADER",
    "HttpConfig",
    "HttpListener",
    "build_app",
    "error_response",
    "v1_explain_body",
    "v1_explain_requests",
    "v1_explanations",
]

log = logging.getLogger("xai_serve.serving")

HEADER_LENGTH = "Inference-Header-Content-Length"
TIMEOUT_HEADER = "X-Request-Timeout"
# How much of a body past the size limit is still read (and dropped) so that the connection
# stays usable; past this the connection is closed under the rest of the body.
DRAIN_BYTES = 1024 * 1024
EXPLAIN_PARAMETERS = (
    "method", "target", "targets", "top_labels", "foil", "layer", "top_k", "overlay",
    *OPTION_SCHEMA,
)  # fmt: skip

# The one map from status code names (what status_of gives, and what the metrics count) to
# HTTP statuses.
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.FAILED_PRECONDITION: 400,  # e.g. a gradient method of a remote model
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

# OIP datatypes the JSON tensor format carries, as little-endian NumPy dtypes.
_NP_DTYPES = {
    "BOOL": "?", "UINT8": "u1", "INT8": "i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}  # fmt: skip


@dataclass(frozen=True)
class HttpConfig:
    """Where and how the HTTP listener listens: the server's ``host``, ``http_port`` (0 picks
    an ephemeral port) and, when the server has ``[tls]``, the same certificate and key (and
    client CA: mutual TLS)."""

    host: str
    port: int
    log_level: str = "INFO"
    certfile: str | None = None
    keyfile: str | None = None
    client_ca: str | None = None

    @classmethod
    def of(cls, config: ServerConfig) -> HttpConfig:
        if config.http_port is None:
            raise InvalidInput("http_port is not set: the HTTP listener is off")
        tls = config.tls
        return cls(
            host=config.host,
            port=config.http_port,
            log_level=config.log_level,
            certfile=tls.cert if tls else None,
            keyfile=tls.key if tls else None,
            client_ca=tls.client_ca if tls else None,
        )


class _Unauthenticated(XaiServeError):
    """A request without a valid bearer token (401)."""


class _TooLarge(ResourceExhausted):
    """A request body past ``limits.max_message_bytes`` (413; RESOURCE_EXHAUSTED, as gRPC
    answers an oversized message). ``close``: the rest of the body was left unread, so the
    connection must close after the answer."""

    def __init__(self, message: str, *, close: bool) -> None:
        super().__init__(message)
        self.close = close


class _Call:
    """What the servicers read of a gRPC call's context: the time left (None: no deadline).
    ``method`` is the explanation method the request names, for the metrics' label."""

    def __init__(self, deadline: float | None = None) -> None:
        self.deadline = deadline
        self.method = ""

    def time_remaining(self) -> float | None:
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())


def request_deadline(value: str | None, arrived: float) -> float | None:
    """The ``time.monotonic()`` deadline of a request that arrived at ``arrived`` with
    ``X-Request-Timeout: value`` (None: no header, no deadline); InvalidInput for a value that
    is not a positive finite number of seconds."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 10**9:
        raise InvalidInput(
            f"{TIMEOUT_HEADER} must be a positive number of seconds (e.g. 2.5), got "
            f"{clip_message(value, 64)!r}"
        )
    return arrived + seconds


def error_response(exc: BaseException, rpc: str) -> JSONResponse:
    """The JSON error answer (``{"error": ...}`` with its HTTP status) for ``exc``."""
    return _error(exc, rpc)[1]


def _error(exc: BaseException, rpc: str) -> tuple[str, JSONResponse]:
    """The one place where exceptions become HTTP statuses: ``(code name, response)``."""
    status = None
    if isinstance(exc, _Unauthenticated):
        code, message = grpc.StatusCode.UNAUTHENTICATED, str(exc)
    else:
        code, message = status_of(exc, rpc=rpc)
        if isinstance(exc, _TooLarge):
            status = 413
    status = status or HTTP_STATUS.get(code, 500)
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, _TooLarge) and exc.close:  # the rest of the body is never read
        headers = {"Connection": "close"}
    return code.name, JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------- JSON -> domain


def v1_explain_body(data: bytes) -> dict[str, Any]:
    """A KServe v1 ``:explain`` body: a JSON object whose ``parameters`` (if any) is one."""
    body = _object(_parse_json(data), "the request body")
    _object(body.get("parameters", {}), "parameters")
    return body


def v1_explain_requests(
    model: str, body: dict[str, Any], state: ServerState
) -> list[pb.ExplainRequest]:
    """One ExplainRequest per instance of a :func:`v1_explain_body` (request ids ``"[i]"``),
    each with the method and options of its ``parameters``."""
    base = _explain_request(model, body.get("parameters", {}))
    requests = []
    for i, item in enumerate(_instances(body, state)):
        req = pb.ExplainRequest()
        req.CopyFrom(base)
        req.request_id = f"[{i}]"
        if isinstance(item, bytes):
            req.image = item
        else:
            req.tensor.CopyFrom(codec.tensor_to_proto(item))
        requests.append(req)
    return requests


def v1_explanations(answers: Iterable[pb.ExplainResponse]) -> dict[str, Any]:
    """The KServe v1 ``:explain`` answer: ``{"explanations": [...]}``, one per instance."""
    return {"explanations": [_explanation_json(a) for a in answers]}


def _parse_json(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidInput("the request body's JSON nests too deeply") from None


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def _int(value: Any, field: str, bits: int = 64) -> int:
    """``value`` if it is a JSON integer that fits a signed ``bits``-bit field."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field} must be an integer, got {value!r}")
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):
        raise InvalidInput(f"{field} is out of the int{bits} range: {value}")
    return value


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64") from None


def _instance(value: Any, field: str, max_elements: int) -> bytes | torch.Tensor:
    """An encoded image (``{"image": {"b64": ...}}`` or ``{"b64": ...}``) as bytes, or a
    preprocessed tensor (nested float lists) as float32."""
    if isinstance(value, dict):
        if "image" in value:
            image = _object(value["image"], f"{field}.image")
            return _b64(image.get("b64"), f"{field}.image.b64")
        if "b64" in value:
            return _b64(value["b64"], f"{field}.b64")
        raise InvalidInput(
            f"{field} must be {{'image': {{'b64': ...}}}}, {{'b64': ...}} or a nested list of "
            "floats [C][H][W]"
        )
    if not isinstance(value, list):
        raise InvalidInput(f"{field} must be an object with base64 image bytes or a nested list")
    try:
        x = torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise InvalidInput(f"{field} is not a rectangular nested list of numbers: {exc}") from None
    if x.numel() > max_elements:
        raise InvalidInput(f"{field} has {x.numel()} elements; at most {max_elements}")
    return x


def _instances(body: Any, state: ServerState) -> list[bytes | torch.Tensor]:
    instances = _object(body, "the request body").get("instances")
    if not isinstance(instances, list) or not instances:
        raise InvalidInput("`instances` must be a non-empty list")
    cap = state.limits.max_queue
    if len(instances) > cap:
        raise InvalidInput(f"`instances` has {len(instances)} items; at most {cap}")
    limit = state.limits.max_tensor_elements
    return [_instance(v, f"instances[{i}]", limit) for i, v in enumerate(instances)]


def _explain_request(model: str, params: dict[str, Any]) -> pb.ExplainRequest:
    """The ExplainRequest fields (all but the input) from v1 ``parameters``."""
    unknown = sorted(set(params) - set(EXPLAIN_PARAMETERS))
    if unknown:
        raise InvalidInput(
            f"unknown parameter(s) {', '.join(unknown)}; known: {', '.join(EXPLAIN_PARAMETERS)}"
        )
    method = params.get("method")
    if not isinstance(method, str) or not method:
        raise InvalidInput("parameters.method (a method name such as 'gradcam') is required")
    req = pb.ExplainRequest(model=model, method=method)
    if "target" in params:
        req.target = _int(params["target"], "parameters.target")
    if "targets" in params:
        targets = params["targets"]
        if not isinstance(targets, list):
            raise InvalidInput("parameters.targets must be a list of class indices")
        req.targets.extend(_int(t, "parameters.targets[]") for t in targets)
    if "top_labels" in params:
        req.top_labels = _int(params["top_labels"], "parameters.top_labels", bits=32)
    if "foil" in params:
        req.foil = _int(params["foil"], "parameters.foil")
    if "top_k" in params:
        top_k = _int(params["top_k"], "parameters.top_k", bits=32)
        if top_k < 0:
            raise InvalidInput(f"parameters.top_k must be >= 0, got {top_k}")
        req.top_k = top_k
    if "layer" in params:
        if not isinstance(params["layer"], str):
            raise InvalidInput("parameters.layer must be a string")
        req.layer = params["layer"]
    overlay = params.get("overlay", False)
    if not isinstance(overlay, bool):
        raise InvalidInput(f"parameters.overlay must be true or false, got {overlay!r}")
    req.returns = pb.MAP_AND_OVERLAY if overlay else pb.MAP
    for name, spec in OPTION_SCHEMA.items():
        if name in params:
            try:
                option_param(codec.infer_parameter(params[name], name), spec, req.options)
            except (ValueError, TypeError) as exc:  # protobuf: out of the field's range
                raise InvalidInput(f"parameter {name!r}: {exc}") from None
    return req


def _nested(t: pb.Tensor) -> Any:
    return codec.tensor_from_proto(t, field="map", max_elements=2**62).tolist()


def _explanation_json(resp: pb.ExplainResponse) -> dict[str, Any]:
    out: dict[str, Any] = {"method": resp.method, "target": resp.target, "layer": resp.layer}
    if resp.HasField("map"):
        out["map"] = _nested(resp.map)
    out["top_k"] = [
        {"index": c.index, "label": c.label, "probability": c.probability, "logit": c.logit}
        for c in resp.top_k
    ]
    if resp.overlay_png:
        out["overlay_png"] = base64.b64encode(resp.overlay_png).decode("ascii")
    if resp.HasField("seed"):
        out["seed"] = resp.seed
    if resp.HasField("foil"):
        out["foil"] = resp.foil
    if resp.per_target:
        out["per_target"] = [
            {"target": one.target, **({"map": _nested(one.map)} if one.HasField("map") else {})}
            for one in resp.per_target
        ]
    return out


def _infer_request(
    model: str, version: str, header: Any, binary: bytes
) -> tuple[oip.ModelInferRequest, dict[str, bool]]:
    """A ModelInferRequest from the JSON tensor format (plus the binary data that follows the
    JSON header), and which outputs to send as binary data (``"*"``: the default)."""
    body = _object(header, "the request body")
    req = oip.ModelInferRequest(model_name=model, model_version=version)
    if "id" in body:
        if not isinstance(body["id"], str):
            raise InvalidInput("id must be a string")
        req.id = body["id"]
    params = dict(_object(body.get("parameters", {}), "parameters"))
    binary_out = params.pop("binary_data_output", False)
    if not isinstance(binary_out, bool):
        raise InvalidInput("parameters.binary_data_output must be true or false")
    for key, value in params.items():
        req.parameters[key].CopyFrom(codec.infer_parameter(value, f"parameters.{key}"))
    inputs = body.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInput("inputs must be a list of tensors")
    offset = 0
    for i, item in enumerate(inputs):
        field = f"inputs[{i}]"
        item = _object(item, field)
        name, datatype, shape = item.get("name", ""), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"{field} needs a string name and datatype")
        if not isinstance(shape, list):
            raise InvalidInput(f"{field}.shape must be a list of integers")
        dims = [_int(d, f"{field}.shape[]") for d in shape]
        if any(d < 0 for d in dims):
            raise InvalidInput(f"{field}.shape must not have negative sizes, got {dims}")
        tensor = oip.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=dims)
        in_params = dict(_object(item.get("parameters", {}), f"{field}.parameters"))
        size = in_params.pop("binary_data_size", None)
        for key, value in in_params.items():
            tensor.parameters[key].CopyFrom(
                codec.infer_parameter(value, f"{field}.parameters.{key}")
            )
        if size is not None:
            size = _int(size, f"{field}.parameters.binary_data_size")
            if size < 0 or offset + size > len(binary):
                raise InvalidInput(f"{field}: binary_data_size {size} runs past the body's end")
            raw = binary[offset : offset + size]
            offset += size
        else:
            if datatype not in _NP_DTYPES:
                raise InvalidInput(
                    f"{field}.datatype {datatype!r} is not supported; one of "
                    f"{', '.join(_NP_DTYPES)}"
                )
            try:
                array = np.asarray(item.get("data"), dtype=_NP_DTYPES[datatype])
            except (TypeError, ValueError, OverflowError) as exc:
                raise InvalidInput(f"{field}.data is not a list of {datatype}: {exc}") from None
            if array.size != math.prod(dims):
                raise InvalidInput(
                    f"{field}.data has {array.size} values; shape {dims} needs {math.prod(dims)}"
                )
            raw = array.tobytes()
        req.inputs.append(tensor)
        req.raw_input_contents.append(raw)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data are not any input's")
    binary_of: dict[str, bool] = {"*": binary_out}
    outputs = body.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        raise InvalidInput("outputs must be a list of requested outputs ({'name': ...})")
    for i, item in enumerate(outputs or ()):
        item = _object(item, f"outputs[{i}]")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidInput(f"outputs[{i}].name must be a string")
        out_params = dict(_object(item.get("parameters", {}), f"outputs[{i}].parameters"))
        flag = out_params.pop("binary_data", binary_out)
        if not isinstance(flag, bool):
            raise InvalidInput(f"outputs[{i}].parameters.binary_data must be true or false")
        binary_of[name] = flag
        out = req.outputs.add(name=name)
        for key, value in out_params.items():
            out.parameters[key].CopyFrom(
                codec.infer_parameter(value, f"outputs[{i}].parameters.{key}")
            )
    return req, binary_of


def _infer_response(resp: oip.ModelInferResponse, binary_of: dict[str, bool]) -> Response:
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for out, raw in zip(resp.outputs, resp.raw_output_contents, strict=True):
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype,
                                 "shape": list(out.shape)}  # fmt: skip
        if binary_of.get(out.name, binary_of["*"]):
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            entry["data"] = np.frombuffer(raw, dtype=_NP_DTYPES[out.datatype]).tolist()
        outputs.append(entry)
    header = {"model_name": resp.model_name, "model_version": resp.model_version,
              "outputs": outputs}  # fmt: skip
    if resp.id:
        header["id"] = resp.id
    if not blobs:
        return JSONResponse(header)
    head = json.dumps(header).encode()
    return Response(
        head + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )


# ---------------------------------------------------------------------------- the app


class HttpFront:
    """The routes' behaviour over a :class:`ServerState` (see the module doc)."""

    def __init__(self, state: ServerState, tokens: Iterable[str] | None = None) -> None:
        self.state = state
        self.explainer = ExplainerServicer(state)
        self.inference = InferenceServicer(state)
        self._auth = TokenAuthInterceptor(tokens) if tokens else None
        self._methods = frozenset(list_methods())
        self.inflight = 0

    async def handle(
        self,
        request: Request,
        rpc: str,
        work: Callable[[_Call], Awaitable[Any]],
        *,
        model: str = "",
        open_route: bool = False,
    ) -> Response:
        """Run ``work`` with the request's call context (its deadline, from
        ``X-Request-Timeout``; ``work`` may set its ``method``): authorise, enforce the
        deadline, map errors, count."""
        start = time.monotonic()
        call = _Call()
        metrics = self.state.metrics
        counted = not open_route
        if counted:
            self.inflight += 1
            metrics.inflight.inc()
        try:
            if self._auth is not None and not open_route:
                header = request.headers.get("authorization")
                refusal = self._auth.check([("authorization", header)] if header else [])
                if refusal is not None:
                    raise _Unauthenticated(refusal)
            call.deadline = request_deadline(request.headers.get(TIMEOUT_HEADER), start)
            result = await self._within_deadline(work(call), call.deadline)
            code = "OK"
            response = result if isinstance(result, Response) else JSONResponse(result)
        except Exception as exc:
            code, response = _error(exc, rpc)
        finally:
            if counted:
                self.inflight -= 1
                metrics.inflight.dec()
        if counted:
            if model and model not in self.state.names:
                model = "<unknown>"
            method = call.method
            if method and method not in self._methods:
                method = "<unknown>"
            metrics.observe_request(rpc, model, method, code, time.monotonic() - start)
        return response

    @staticmethod
    async def _within_deadline(work: Awaitable[Any], deadline: float | None) -> Any:
        """``await work``; at ``deadline`` it is cancelled (its jobs leave the queue, as a
        gRPC call's do when its deadline passes) and DeadlineExceeded raised."""
        if deadline is None:
            return await work
        try:
            return await asyncio.wait_for(work, max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            if time.monotonic() < deadline:  # the work's own timeout, not the deadline
                raise
            raise DeadlineExceeded(
                f"the request's deadline ({TIMEOUT_HEADER}) passed before it was answered"
            ) from None

    async def body(self, request: Request) -> bytes:
        """The request body; 413 past the server's ``limits.max_message_bytes``, never read
        into memory: a larger Content-Length is refused from the header, a streamed (chunked)
        body once it passes the limit. What follows (at most :data:`DRAIN_BYTES`) is read and
        dropped, so that the client gets its 413 on a connection that stays open; past that
        the connection is closed under the rest."""
        limit = self.state.limits.max_message_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            message = (
                f"the request body has {length} bytes; this server takes at most {limit} "
                "(limits.max_message_bytes)"
            )
            if int(length) > limit + DRAIN_BYTES:
                raise _TooLarge(message, close=True)
            async for _ in request.stream():
                pass
            raise _TooLarge(message, close=False)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + DRAIN_BYTES:
                break
            if size <= limit:
                chunks.append(chunk)
            else:
                chunks.clear()  # from here on dropped, up to DRAIN_BYTES
        if size > limit:
            raise _TooLarge(
                f"the request body exceeds {limit} bytes, the most this server takes "
                "(limits.max_message_bytes)",
                close=size > limit + DRAIN_BYTES,
            )
        return b"".join(chunks)

    def _check_model(self, name: str) -> None:
        if name not in self.state.names:
            known = ", ".join(repr(n) for n in self.state.names) or "none"
            raise NotFound(f"unknown model {name!r}; this server has: {known}")

    # ------------------------------------------------------------ KServe v1

    async def v1_models(self, call: _Call) -> Any:
        return {"models": list(self.state.names)}

    async def v1_model(self, name: str) -> Any:
        self._check_model(name)
        ready = name in self.state.models and not self.state.draining
        return JSONResponse({"name": name, "ready": ready}, status_code=200 if ready else 503)

    async def v1_predict(self, name: str, request: Request, call: _Call) -> Any:
        model = self.state.model(name)
        items = _instances(_parse_json(await self.body(request)), self.state)
        xs = []
        for i, item in enumerate(items):
            if isinstance(item, bytes):
                rgb = await self.state.off_loop(
                    codec.decode_image, item, max_pixels=self.state.limits.max_image_pixels
                )
                x, _ = await self.state.off_loop(model.preprocess, rgb)
            else:
                x, _ = check_tensor_input(item, model, f"instances[{i}]")
            xs.append(x)
        x = torch.stack(xs).contiguous()
        req = oip.ModelInferRequest(
            model_name=name,
            inputs=[oip.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(x.shape))],
            raw_input_contents=[x.numpy().astype("<f4").tobytes()],
        )  # fmt: skip
        resp = await self.inference.ModelInfer(req, call)
        logits = torch.from_numpy(
            np.frombuffer(resp.raw_output_contents[0], dtype="<f4").copy()
        ).reshape(list(resp.outputs[0].shape))
        return {"predictions": torch.softmax(logits.double(), dim=1).tolist()}

    async def v1_explain(self, name: str, request: Request, call: _Call) -> Any:
        body = v1_explain_body(await self.body(request))
        method = body.get("parameters", {}).get("method")
        if isinstance(method, str):
            call.method = method
        requests = v1_explain_requests(name, body, self.state)
        answers = await gather_or_cancel(self.explainer.Explain(r, call) for r in requests)
        return v1_explanations(answers)

    # ------------------------------------------------------------ Open Inference Protocol

    async def v2_metadata(self, name: str, version: str, call: _Call) -> Any:
        meta = await self.inference.ModelMetadata(
            oip.ModelMetadataRequest(name=name, version=version), call
        )

        def tensors(ts: Sequence[Any]) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {
            "name": meta.name,
            "versions": list(meta.versions),
            "platform": meta.platform,
            "inputs": tensors(meta.inputs),
            "outputs": tensors(meta.outputs),
        }

    async def v2_ready(self, name: str, version: str, call: _Call) -> Any:
        answer = await self.inference.ModelReady(
            oip.ModelReadyRequest(name=name, version=version), call
        )
        return JSONResponse({"ready": answer.ready}, status_code=200 if answer.ready else 503)

    async def v2_infer(self, name: str, version: str, request: Request, call: _Call) -> Response:
        data = await self.body(request)
        length = request.headers.get(HEADER_LENGTH.lower())
        if length is not None:
            if not length.isdigit() or int(length) > len(data):
                raise InvalidInput(f"{HEADER_LENGTH} {length!r} does not fit the body")
            header, binary = data[: int(length)], data[int(length) :]
        else:
            header, binary = data, b""
        req, binary_of = _infer_request(name, version, _parse_json(header), binary)
        if "explainer" in req.parameters:
            call.method = req.parameters["explainer"].string_param
        resp = await self.inference.ModelInfer(req, call)
        return _infer_response(resp, binary_of)


def build_app(front: HttpFront) -> FastAPI:
    """The FastAPI app of ``front``'s routes (no docs pages: the protocols are the docs)."""
    app = FastAPI(title="xai_serve", docs_url=None, redoc_url=None, openapi_url=None)
    h = front.handle

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, exc: HTTPException) -> Response:
        """An unknown path (404) or a route's wrong HTTP method (405): the JSON error shape
        of every other error."""
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see the server's README"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(
            {"error": clip_message(message)}, status_code=exc.status_code, headers=exc.headers
        )

    @app.get("/")
    async def live(request: Request) -> Response:
        async def work(_: _Call) -> Any:
            return {"status": "alive"}

        return await h(request, "http:/", work, open_route=True)

    @app.get("/v1/models")
    async def v1_models(request: Request) -> Response:
        return await h(request, "http:/v1/models", front.v1_models)

    @app.get("/v1/models/{name}")
    async def v1_model(name: str, request: Request) -> Response:
        return await h(request, "http:/v1/models/{m}", lambda _: front.v1_model(name), model=name)

    @app.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Response:
        return await h(
            request, "http:/v1/models/{m}:predict",
            lambda call: front.v1_predict(name, request, call), model=name,
        )  # fmt: skip

    @app.post("/v1/models/{name}:explain")
    async def v1_explain(name: str, request: Request) -> Response:
        return await h(
            request, "http:/v1/models/{m}:explain",
            lambda call: front.v1_explain(name, request, call), model=name,
        )  # fmt: skip

    @app.get("/v2")
    async def v2_server(request: Request) -> Response:
        async def work(call: _Call) -> Any:
            meta = await front.inference.ServerMetadata(oip.ServerMetadataRequest(), call)
            return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}

        return await h(request, "http:/v2", work)

    @app.get("/v2/health/live")
    async def v2_live(request: Request) -> Response:
        async def work(_: _Call) -> Any:
            return {"live": True}

        return await h(request, "http:/v2/health/live", work, open_route=True)

    @app.get("/v2/health/ready")
    async def v2_server_ready(request: Request) -> Response:
        async def work(_: _Call) -> Any:
            ready = front.state.ready
            return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

        return await h(request, "http:/v2/health/ready", work, open_route=True)

    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):

        @app.get(prefix)
        async def v2_metadata(request: Request, name: str, version: str = "") -> Response:
            return await h(
                request, "http:/v2/models/{m}",
                lambda call: front.v2_metadata(name, version, call), model=name,
            )  # fmt: skip

        @app.get(prefix + "/ready")
        async def v2_ready(request: Request, name: str, version: str = "") -> Response:
            return await h(
                request, "http:/v2/models/{m}/ready",
                lambda call: front.v2_ready(name, version, call), model=name,
            )  # fmt: skip

        @app.post(prefix + "/infer")
        async def v2_infer(request: Request, name: str, version: str = "") -> Response:
            return await h(
                request, "http:/v2/models/{m}/infer",
                lambda call: front.v2_infer(name, version, request, call), model=name,
            )  # fmt: skip

    return app


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the server's event loop: the server's own SIGTERM/SIGINT handling
    (drain) stays in charge, so uvicorn installs no signal handlers."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpListener:
    """The HTTP listener: binds in :meth:`start` (``port`` is then the bound port), serves on
    the running event loop, stops in :meth:`stop`."""

    def __init__(self, config: HttpConfig, front: HttpFront) -> None:
        self.config = config
        self.front = front
        self.port: int | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def inflight(self) -> int:
        return self.front.inflight

    async def start(self) -> int:
        cfg = self.config
        family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        try:
            sock = socket.create_server((cfg.host, cfg.port), family=family)
        except OSError as exc:
            raise Unavailable(
                f"http_port: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror or exc}"
            ) from None
        self.port = int(sock.getsockname()[1])
        tls: dict[str, Any] = {}
        if cfg.certfile:
            tls = {"ssl_certfile": cfg.certfile, "ssl_keyfile": cfg.keyfile}
            if cfg.client_ca:
                tls.update(ssl_ca_certs=cfg.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(
            build_app(self.front),
            log_config=None,  # the server's own logging setup stays as it is
            log_level=cfg.log_level.lower(),
            lifespan="off",
            access_log=False,
            **tls,
        )
        self._server = _EmbeddedServer(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started and not self._task.done():
            await asyncio.sleep(0.005)
        if self._task.done():  # e.g. an unreadable certificate
            sock.close()
            self._task.result()
            raise Unavailable("the HTTP listener stopped as it started")
        return self.port

    async def stop(self, grace: float) -> None:
        """Stop accepting; let open requests finish within ``grace`` seconds, then cut them."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), max(grace, 0.1))
        except asyncio.TimeoutError:
            self._server.force_exit = True
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._task, 1.0)
        self._server = self._task = None
