"""``xai_serve.v1.Explainer``: protobuf <-> domain objects, nothing else.

:func:`request_to_job` validates an :class:`~xai_serve.proto.explainer_pb2.ExplainRequest`
field by field (every error names its field) and turns it into an
:class:`~xai_serve.serving.engine.ExplainJob`; :func:`result_to_response` does the reverse for
the answer. Computing is the batcher's job; status codes are the error interceptor's.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import torch
from torch import Tensor

from xai_serve.errors import InvalidInput, NotFound, ResourceExhausted
from xai_serve.explainers.base import (
    ARGUMENT_OPTIONS,
    OPTION_SCHEMA,
    Explainer,
    get_method,
    list_methods,
    positive_int,
)
from xai_serve.explainers.forward import ForwardPath
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving import codec
from xai_serve.serving.engine import ExplainJob, ExplainResult
from xai_serve.serving.errors import status_of
from xai_serve.serving.state import ServerState

__all__ = [
    "ExplainerServicer",
    "build_job",
    "check_tensor_input",
    "request_to_job",
    "result_to_response",
]

MAX_REQUEST_ID = 256
MAX_SEGMENTS = 4096
DEFAULT_TOP_K = 5


def parse_options(
    options: pb.Options, method: str, state: ServerState
) -> tuple[dict[str, Any], float | str | None, int | None]:
    """``(explain options, baseline, seed)`` from the typed options message.

    Every field is read through the one option schema (:data:`OPTION_SCHEMA`): a field's name
    is the explain() option it sets, and whether the method takes it is read from the method's
    class (its option table, and its ``randomised`` / ``takes_baseline`` traits)."""
    cls = get_method(method)
    limits = state.limits
    out: dict[str, Any] = {}
    for spec in OPTION_SCHEMA.values():
        if spec.name in ARGUMENT_OPTIONS:
            continue
        field = spec.name
        if spec.kind == "choice":
            number = getattr(options, field)
            if not number:  # unset: the method's default
                continue
            _method_takes(cls, field)
            words = {n: w for w, n in spec.enum}
            if number not in words:
                raise InvalidInput(f"options.{field} has an unknown value {number}")
            out[field] = words[number]
            continue
        if not options.HasField(field):
            continue
        _method_takes(cls, field)
        value = getattr(options, field)
        if spec.positive:
            value = positive_int(value, f"options.{field}")
        elif spec.kind == "float" and not math.isfinite(value):
            raise InvalidInput(f"options.{field} must be finite, got {value}")
        out[field] = value
    _check_limits(out, limits)
    return out, _baseline(options, cls), _seed(options, cls)


def _method_takes(cls: type[Explainer], field: str) -> None:
    if field not in cls.options:
        raise InvalidInput(f"options.{field} does not apply to method {cls.name!r}")


def _check_limits(parsed: dict[str, Any], limits: Any) -> None:
    samples, steps = parsed.get("samples"), parsed.get("steps")
    if samples is not None and samples > limits.max_samples:
        raise ResourceExhausted(
            f"options.samples={samples} exceeds this server's max_samples ({limits.max_samples})"
        )
    if steps is not None and steps > limits.max_steps:
        raise ResourceExhausted(
            f"options.steps={steps} exceeds this server's max_steps ({limits.max_steps})"
        )
    segments = parsed.get("n_segments")
    if segments is not None and segments > MAX_SEGMENTS:
        raise InvalidInput(f"options.n_segments must be <= {MAX_SEGMENTS}, got {segments}")


def _baseline(options: pb.Options, cls: type[Explainer]) -> float | str | None:
    if not options.HasField("baseline"):
        return None
    kind = options.baseline.WhichOneof("kind")
    if kind is None:
        return None
    if not cls.takes_baseline:
        raise InvalidInput(f"options.baseline does not apply to method {cls.name!r}")
    if kind == "value":
        if not math.isfinite(options.baseline.value):
            raise InvalidInput("options.baseline.value must be finite")
        return float(options.baseline.value)
    if not options.baseline.blur:
        return None
    if not cls.takes_blur_baseline:
        raise InvalidInput(
            f"options.baseline.blur does not apply to method {cls.name!r}; "
            f"it takes a baseline value"
        )
    return "blur"


def _seed(options: pb.Options, cls: type[Explainer]) -> int | None:
    """The client's seed, or a fresh one for a randomised method (None for the others)."""
    if options.HasField("seed"):
        if not cls.randomised:
            raise InvalidInput(f"options.seed does not apply to method {cls.name!r}")
        seed = int(options.seed)
        if seed < 0:
            raise InvalidInput(f"options.seed must be >= 0, got {seed}")
        return seed
    return secrets.randbits(62) if cls.randomised else None


def check_tensor_input(x: Tensor, model: LoadedModel, field: str) -> tuple[Tensor, Tensor]:
    """A preprocessed ``[C, H, W]`` (or ``[1, C, H, W]``) input checked against the model, as
    float32, and a uint8 RGB view of it (min-max scaled) to draw overlays on."""
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if tuple(x.shape) != tuple(model.input_shape):
        raise InvalidInput(
            f"{field} has shape {list(x.shape)}; model {model.name!r} takes "
            f"{list(model.input_shape)} (or [1, ...]) after preprocessing"
        )
    if not x.dtype.is_floating_point:
        raise InvalidInput(f"{field} must be a float tensor, got {x.dtype}")
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise InvalidInput(f"{field} contains NaN or Inf")
    lo, hi = x.amin(), x.amax()
    view = ((x - lo) / (hi - lo).clamp_min(1e-12) * 255).round().to(torch.uint8)
    if view.shape[0] != 3:
        view = view[:1].expand(3, -1, -1).contiguous()
    return x, view


def build_job(
    state: ServerState,
    model: LoadedModel,
    image: Tensor,
    view: Tensor | None,
    *,
    request_id: str,
    method: str,
    target: int | None = None,
    layer: str = "",
    options: pb.Options | None = None,
    returns: int = pb.RETURN_UNSPECIFIED,
    top_k: int | None = None,
    deadline: float | None = None,
    progress: bool = False,
) -> ExplainJob:
    """Validate the request's fields against ``model`` and the limits; build the job."""
    if len(request_id.encode()) > MAX_REQUEST_ID:
        raise InvalidInput(f"request_id must be at most {MAX_REQUEST_ID} bytes (UTF-8)")
    if not method:
        raise InvalidInput(
            f"`method` is required; model {model.name!r} supports: " + ", ".join(model.methods)
        )
    if method not in model.methods:
        raise NotFound(
            f"unknown method {method!r} for model {model.name!r}; it supports: "
            + ", ".join(model.methods)
        )
    cls = get_method(method)
    if layer:
        if not cls.uses_layer:
            raise InvalidInput(f"`layer` applies to methods that explain a layer, not {method!r}")
        if layer not in model.layers:
            hint = ", ".join(model.layers[-5:])
            raise NotFound(
                f"unknown layer {layer!r} for model {model.name!r} "
                f"(its last layers: {hint}; ListModels lists all)"
            )
    elif cls.uses_layer:
        layer = model.default_layer or ""
    if target is not None and not 0 <= target < model.num_classes:
        raise InvalidInput(
            f"target {target} is out of range: model {model.name!r} has "
            f"{model.num_classes} classes [0, {model.num_classes})"
        )
    if top_k is None:
        top_k = DEFAULT_TOP_K
    elif not 0 <= top_k <= state.limits.max_top_k:
        raise InvalidInput(f"top_k must lie in [0, {state.limits.max_top_k}], got {top_k}")
    if returns not in (pb.RETURN_UNSPECIFIED, pb.MAP, pb.OVERLAY, pb.MAP_AND_OVERLAY):
        raise InvalidInput(f"returns has an unknown value {returns}")
    want_overlay = returns in (pb.OVERLAY, pb.MAP_AND_OVERLAY)
    parsed, baseline, seed = parse_options(options or pb.Options(), method, state)
    return ExplainJob(
        request_id=request_id,
        model=model,
        method=method,
        image=image,
        view=view if want_overlay else None,
        target=target,
        layer=layer or None,
        options=parsed,
        baseline=baseline,
        seed=seed,
        want_map=returns != pb.OVERLAY,
        want_overlay=want_overlay,
        top_k=top_k,
        deadline=deadline,
        progress=progress,
        fresh_seed=seed is not None and not (options is not None and options.HasField("seed")),
    )


async def request_to_job(
    request: pb.ExplainRequest, state: ServerState, deadline: float | None
) -> ExplainJob:
    """Validate ``request`` and build its job (decoding and preprocessing off the loop)."""
    model = state.model(request.model)
    fields = {
        "request_id": request.request_id,
        "method": request.method,
        "target": int(request.target) if request.HasField("target") else None,
        "layer": request.layer,
        "options": request.options,
        "returns": request.returns,
        "top_k": request.top_k if request.HasField("top_k") else None,
        "deadline": deadline,
        "progress": request.progress,
    }
    # validate the cheap fields before decoding anything
    build_job(state, model, torch.empty(0), None, **fields)
    kind = request.WhichOneof("input")
    if kind == "image":
        rgb = await state.off_loop(
            codec.decode_image, request.image, max_pixels=state.limits.max_image_pixels
        )
        image, view = await state.off_loop(model.preprocess, rgb)
    elif kind == "tensor":
        x = codec.tensor_from_proto(
            request.tensor, field="tensor", max_elements=state.limits.max_tensor_elements
        )
        image, view = check_tensor_input(x, model, "tensor")
    else:
        raise InvalidInput("one of `image` (encoded bytes) or `tensor` is required")
    return build_job(state, model, image, view, **fields)


def result_to_response(job: ExplainJob, result: ExplainResult) -> pb.ExplainResponse:
    resp = pb.ExplainResponse(
        request_id=job.request_id,
        model=job.model.name,
        method=job.method,
        layer=result.layer or "",
        target=result.target,
        samples=result.samples,
        timing=pb.Timing(
            queue_ms=result.queue_ms,
            compute_ms=result.compute_ms,
            batch_size=result.batch_size,
            cache_hit=result.cache_hit,
        ),
        partial=result.partial,
    )
    if job.want_map:
        resp.map.CopyFrom(codec.tensor_to_proto(result.map.contiguous()))
    if result.overlay_png is not None:
        resp.overlay_png = result.overlay_png
    for index, prob, logit in result.top_k(job.top_k):
        resp.top_k.add(index=index, label=job.model.label(index), probability=prob, logit=logit)
    if result.segments is not None:
        resp.segments.CopyFrom(codec.tensor_to_proto(result.segments.contiguous()))
    if result.segment_weights is not None:
        resp.segment_weights.extend(result.segment_weights.tolist())
    if result.segment_stderr is not None:
        resp.segment_stderr.extend(result.segment_stderr.tolist())
    if result.intercept is not None:
        resp.intercept = result.intercept
    if result.score is not None:
        resp.score = result.score
    if result.seed is not None:
        resp.seed = result.seed
    return resp


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class ExplainerServicer(pb_grpc.ExplainerServicer):
    """The ``xai_serve.v1.Explainer`` service over a :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._methods = frozenset(list_methods())

    def _labels(self, request: pb.ExplainRequest) -> tuple[str, str]:
        """Metric labels of ``request``: names the server does not know become "<unknown>",
        so that clients cannot create time series (as the unary calls' observer does)."""
        model, method = request.model, request.method
        if model and model not in self.state.names:
            model = "<unknown>"
        if method and method not in self._methods:
            method = "<unknown>"
        return model, method

    async def explain_one(
        self,
        request: pb.ExplainRequest,
        deadline: float | None,
        on_partial: Callable[[pb.ExplainResponse], None] | None = None,
    ) -> pb.ExplainResponse:
        """Explain one request; with ``on_partial`` (ExplainStream with ``progress``), each
        partial answer is passed to it (on the event loop) before the final one returns."""
        job = await request_to_job(request, self.state, deadline)
        if job.progress:
            if on_partial is None:
                raise InvalidInput(
                    "`progress` (partial answers) needs ExplainStream; Explain answers once"
                )
            loop = asyncio.get_running_loop()

            def forward(result: ExplainResult) -> None:  # on the device worker thread
                resp = result_to_response(job, result)
                loop.call_soon_threadsafe(on_partial, resp)

            job.on_partial = forward
        result = await self.state.batchers[job.model.name].submit(job)
        return result_to_response(job, result)

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        return await self.explain_one(request, _deadline(context))

    async def ExplainStream(
        self, request_iterator: AsyncIterator[pb.ExplainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainResponse]:
        deadline = _deadline(context)
        answers: asyncio.Queue[pb.ExplainResponse | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()
        metrics = self.state.metrics

        async def answer(request: pb.ExplainRequest) -> None:
            start = time.monotonic()
            try:
                resp = await self.explain_one(request, deadline, answers.put_nowait)
                code = grpc.StatusCode.OK
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code, message = status_of(
                    exc, request.request_id, rpc="/xai_serve.v1.Explainer/ExplainStream"
                )
                resp = pb.ExplainResponse(
                    request_id=request.request_id,
                    model=request.model,
                    method=request.method,
                    error=pb.Error(code=code.value[0], message=message),
                )
            model, method = self._labels(request)
            metrics.observe_request(
                "ExplainStream", model, method, code.name, time.monotonic() - start
            )
            await answers.put(resp)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    task = asyncio.get_running_loop().create_task(answer(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.gather(*list(tasks), return_exceptions=True)
            finally:
                # also when reading fails (an undecodable message): the loop below must end,
                # and `await reader` then raises the reader's error for the interceptor
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        try:
            while True:
                resp = await answers.get()
                if resp is None:
                    break
                yield resp
            await reader
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        resp = pb.ListModelsResponse()
        for name in self.state.names:
            model = self.state.models.get(name)
            info = resp.models.add(name=name, ready=model is not None)
            if model is None:
                continue
            info.input_shape.extend(model.input_shape)
            info.num_classes = model.num_classes
            info.default_layer = model.default_layer or ""
            info.layers.extend(model.layers)
            info.methods.extend(model.methods)
            info.device = str(model.device)
            info.max_batch_size = model.max_batch_size
            info.has_class_names = model.class_names is not None
            path_to_proto(model.path, info.forward_path)
        return resp


def path_to_proto(path: ForwardPath, out: pb.ForwardPath) -> None:
    """Fill ``out`` (a ModelInfo's ``forward_path``) from a model's forward path."""
    report = path.report
    out.tuned = report is not None
    out.memory_format = "channels_last" if path.channels_last else "contiguous"
    out.precision = path.precision
    out.batch_size = path.batch_size or 0
    out.grad_batch_size = path.grad_batch_size or 0
    out.compiled = path.compiled is not None
    out.images_per_s = path.images_per_s or 0.0
    if report is None:
        out.summary = f"{path.describe()} (not tuned)"
        return
    out.speedup = report.speedup
    out.summary = report.summary()
    if report.fidelity is not None:
        out.top1_agreement = report.fidelity.top1_agreement
        out.logit_error = report.fidelity.logit_error
        if report.fidelity.rank_correlation is not None:
            out.rank_correlation = report.fidelity.rank_correlation
