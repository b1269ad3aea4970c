"""``xai_serve.v1.Explainer``: protobuf <-> domain objects, nothing else.

:func:`request_to_job` validates an :class:`~xai_serve.proto.explainer_pb2.ExplainRequest`
field by field (every error names its field) and turns it into an
:class:`~xai_serve.serving.engine.ExplainJob`; :func:`result_to_response` does the reverse for
the answer. The checks of the fields and the job itself are :mod:`xai_serve.serving.jobs`'
(shared with the Open Inference Protocol); computing is the batcher's job (and, for quality
figures and Evaluate, :mod:`xai_serve.serving.quality`'s; for the concept RPCs Tcav, Dissect
and Visualize, :mod:`xai_serve.serving.concepts`'); status codes are the error interceptor's.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import torch

from xai_serve.errors import InvalidInput, ResourceExhausted
from xai_serve.explainers.base import list_methods
from xai_serve.explainers.evaluation import metric_info
from xai_serve.explainers.forward import ForwardPath
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.serving import codec
from xai_serve.serving.concepts import (
    ConceptRunner,
    DissectOutcome,
    ImageInput,
    Progress,
    TcavOutcome,
    VisualizeOutcome,
)
from xai_serve.serving.engine import ExplainJob, ExplainResult, TargetResult
from xai_serve.serving.errors import status_of
from xai_serve.serving.jobs import build_job, call_deadline, check_tensor_input
from xai_serve.serving.quality import (
    EvaluationWork,
    ProgressThrottle,
    check_metrics,
    check_supported,
    measure_answer,
    run_evaluation,
    sample_answer,
)
from xai_serve.serving.state import ServerState

__all__ = [
    "ExplainerServicer",
    "path_to_proto",
    "request_to_evaluation",
    "request_to_job",
    "result_to_response",
]


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
        "targets": list(request.targets),
        "top_labels": request.top_labels if request.HasField("top_labels") else None,
        "foil": int(request.foil) if request.HasField("foil") else None,
    }
    # validate the cheap fields before decoding anything
    build_job(state, model, torch.empty(0), None, **fields)
    image, view = await _decode_input(request, state, model, "")
    return build_job(state, model, image, view, **fields)


async def _decode_input(
    message: pb.ExplainRequest | pb.EvaluateInput, state: ServerState, model: Any, prefix: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The preprocessed image and its RGB view from a message's ``image`` / ``tensor``
    oneof (``prefix`` names the message in errors, e.g. ``"inputs[3]."``)."""
    kind = message.WhichOneof("input")
    if kind == "image":
        rgb = await state.off_loop(
            codec.decode_image, message.image, max_pixels=state.limits.max_image_pixels
        )
        return await state.off_loop(model.preprocess, rgb)
    if kind == "tensor":
        x = codec.tensor_from_proto(
            message.tensor,
            field=f"{prefix}tensor",
            max_elements=state.limits.max_tensor_elements,
        )
        return check_tensor_input(x, model, f"{prefix}tensor")
    raise InvalidInput(f"one of `{prefix}image` (encoded bytes) or `{prefix}tensor` is required")


async def request_to_evaluation(
    request: pb.EvaluateRequest, state: ServerState, deadline: float | None
) -> EvaluationWork:
    """Validate an Evaluate request (every error names its field) and build its work: one
    job per input, as an Explain request with the same method, layer and options would."""
    model = state.model(request.model)
    limit = state.limits.max_evaluate_inputs
    if not request.inputs:
        raise InvalidInput("`inputs` is empty: send at least one image or tensor")
    if len(request.inputs) > limit:
        raise ResourceExhausted(
            f"{len(request.inputs)} inputs exceed this server's max_evaluate_inputs ({limit})"
        )
    fields = {
        "request_id": request.request_id,
        "method": request.method,
        "layer": request.layer,
        "options": request.options,
        "deadline": deadline,
    }
    probe = build_job(state, model, torch.empty(0), None, **fields)  # method, layer, options
    metrics = check_metrics(list(request.metrics), request.method, "metrics", default=True)
    check_supported(metrics, probe.method, probe.options)
    jobs = []
    for i, item in enumerate(request.inputs):
        target = int(item.target) if item.HasField("target") else None
        try:
            build_job(state, model, torch.empty(0), None, target=target, **fields)
            image, _ = await _decode_input(item, state, model, f"inputs[{i}].")
        except InvalidInput as exc:
            if f"inputs[{i}]" in str(exc):
                raise
            raise InvalidInput(f"inputs[{i}]: {exc}") from None
        jobs.append(build_job(state, model, image, None, target=target, **fields))
    return EvaluationWork(request.request_id, jobs, metrics, deadline=deadline)


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
    _put_class(resp, result, job.want_map)
    for index, prob, logit in result.top_k(job.top_k):
        resp.top_k.add(index=index, label=job.model.label(index), probability=prob, logit=logit)
    if result.segments is not None:
        resp.segments.CopyFrom(codec.tensor_to_proto(result.segments.contiguous()))
    if result.seed is not None:
        resp.seed = result.seed
    if result.foil is not None:
        resp.foil = result.foil
    for one in result.per_target or ():
        _put_class(resp.per_target.add(target=one.target), one, job.want_map)
    return resp


def _put_class(
    out: pb.ExplainResponse | pb.TargetExplanation,
    answer: ExplainResult | TargetResult,
    want_map: bool,
) -> None:
    """One class's fields, which an answer and each of its ``per_target`` entries share:
    the map, the overlay, the segment weights and their errors, the intercept, the score."""
    if want_map:
        out.map.CopyFrom(codec.tensor_to_proto(answer.map.contiguous()))
    if answer.overlay_png is not None:
        out.overlay_png = answer.overlay_png
    if answer.segment_weights is not None:
        out.segment_weights.extend(answer.segment_weights.tolist())
    if answer.segment_stderr is not None:
        out.segment_stderr.extend(answer.segment_stderr.tolist())
    if answer.intercept is not None:
        out.intercept = answer.intercept
    if answer.score is not None:
        out.score = answer.score


class ExplainerServicer(pb_grpc.ExplainerServicer):
    """The ``xai_serve.v1.Explainer`` service over a :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._methods = frozenset(list_methods())
        self.concepts = ConceptRunner(state)

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
        quality = check_metrics(list(request.quality), job.method, "quality")
        if quality and job.several:
            raise InvalidInput(
                "`quality` takes one explained class per request (not `targets` / `top_labels`)"
            )
        check_supported(quality, job.method, job.options)
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
        resp = result_to_response(job, result)
        if quality:
            figures = await measure_answer(self.state, job, result, quality)
            for name, value in figures.items():
                resp.quality[name] = value
        else:
            sample_answer(self.state, job, result)
        return resp

    async def Explain(
        self, request: pb.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExplainResponse:
        return await self.explain_one(request, call_deadline(context))

    async def ExplainStream(
        self, request_iterator: AsyncIterator[pb.ExplainRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExplainResponse]:
        deadline = call_deadline(context)
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

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateResponse]:
        work = await request_to_evaluation(request, self.state, call_deadline(context))
        updates: asyncio.Queue[tuple[float, str]] = asyncio.Queue()
        report = ProgressThrottle(lambda f, stage: updates.put_nowait((f, stage)))
        task = asyncio.get_running_loop().create_task(run_evaluation(self.state, work, report))
        try:
            yield pb.EvaluateResponse(request_id=work.request_id, fraction=0.0, stage="start")
            while not task.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    fraction, stage = getter.result()
                    yield pb.EvaluateResponse(
                        request_id=work.request_id, fraction=min(fraction, 1.0), stage=stage
                    )
                else:
                    getter.cancel()
            values, targets = task.result()
        finally:
            work.cancelled = True  # a cancelled call stops the work at its next report
            if not task.done():
                task.cancel()
        yield _evaluation_response(work.request_id, values, targets)

    async def Tcav(
        self, request: pb.TcavRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TcavResponse]:
        if not request.HasField("target"):
            raise InvalidInput("`target` is required: the class whose concept sensitivity TCAV "
                               "measures")  # fmt: skip
        work = await self.concepts.tcav_work(
            request_id=request.request_id,
            model=request.model,
            layer=request.layer,
            target=int(request.target),
            concepts=[(c.name, list(c.images)) for c in request.concepts],
            inputs=[self._image_input(x, f"inputs[{i}].") for i, x in enumerate(request.inputs)],
            runs=_optional(request, "runs"),
            random_size=_optional(request, "random_size"),
            concept_size=_optional(request, "concept_size"),
            alpha=_optional(request, "alpha"),
            seed=_optional(request, "seed"),
            deadline=call_deadline(context),
        )
        async for message in self._streamed(work, pb.TcavResponse, _tcav_response):
            yield message

    async def Dissect(
        self, request: pb.DissectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DissectResponse]:
        work = await self.concepts.dissect_work(
            request_id=request.request_id,
            model=request.model,
            layer=request.layer,
            dataset=request.dataset,
            per_concept=_optional(request, "per_concept"),
            quantile=_optional(request, "quantile"),
            min_iou=_optional(request, "min_iou"),
            top=_optional(request, "top"),
            seed=_optional(request, "seed"),
            deadline=call_deadline(context),
        )
        async for message in self._streamed(work, pb.DissectResponse, _dissect_response):
            yield message

    async def Visualize(
        self, request: pb.VisualizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.VisualizeResponse]:
        work = await self.concepts.visualize_work(
            request_id=request.request_id,
            model=request.model,
            objectives=list(request.objectives),
            steps=_optional(request, "steps"),
            size=_optional(request, "size"),
            lr=_optional(request, "lr"),
            seed=_optional(request, "seed"),
            deadline=call_deadline(context),
        )
        async for message in self._streamed(work, pb.VisualizeResponse, _visualize_response):
            yield message

    async def _streamed(
        self, work: Any, message: Callable[..., Any], respond: Callable[[str, Any], Any]
    ) -> AsyncIterator[Any]:
        """A concept job's answers: a ``message`` per progress report, then ``respond``'s
        answer from its result."""
        async for item in self.concepts.run(work):
            if isinstance(item, Progress):
                yield message(request_id=work.request_id, fraction=item.fraction, stage=item.stage)
            else:
                yield respond(work.request_id, item)

    def _image_input(self, message: pb.Image, prefix: str) -> ImageInput:
        """An Image message's encoded bytes, or its tensor (``prefix`` names it in errors)."""
        kind = message.WhichOneof("input")
        if kind == "image":
            return message.image
        if kind == "tensor":
            return codec.tensor_from_proto(
                message.tensor,
                field=f"{prefix}tensor",
                max_elements=self.state.limits.max_tensor_elements,
            )
        raise InvalidInput(
            f"one of `{prefix}image` (encoded bytes) or `{prefix}tensor` is required"
        )

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        resp = pb.ListModelsResponse()
        for info in metric_info().values():
            resp.metrics.add(
                name=info.name,
                higher_is_better=info.higher_is_better,
                description=info.description,
            )
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


def _evaluation_response(
    request_id: str, values: dict[str, list[float]], targets: list[int]
) -> pb.EvaluateResponse:
    """The last Evaluate message: every metric's values, their mean and its standard error."""
    info = metric_info()
    resp = pb.EvaluateResponse(request_id=request_id, fraction=1.0, stage="done", done=True)
    resp.targets.extend(targets)
    for name, column in values.items():
        n = len(column)
        mean = math.fsum(column) / n
        stderr = 0.0
        if n > 1:
            var = math.fsum((v - mean) ** 2 for v in column) / (n - 1)
            stderr = math.sqrt(var / n)
        resp.metrics.add(
            metric=name,
            values=column,
            mean=mean,
            stderr=stderr,
            higher_is_better=info[name].higher_is_better,
        )
    return resp


def _optional(message: Any, name: str) -> Any:
    """An ``optional`` field's value, or None when the request leaves it unset."""
    return getattr(message, name) if message.HasField(name) else None


def _tcav_response(request_id: str, out: TcavOutcome) -> pb.TcavResponse:
    resp = pb.TcavResponse(
        request_id=request_id,
        fraction=1.0,
        stage="done",
        done=True,
        layer=out.layer,
        target=out.target,
        random_scores=out.random_scores,
        alpha=out.alpha,
    )
    for c in out.concepts:
        resp.concepts.add(
            concept=c.concept,
            scores=c.scores,
            mean=c.mean,
            std=c.std,
            p_value=c.p_value,
            significant=c.significant,
            cav_accuracies=c.cav_accuracies,
        )
    return resp


def _dissect_response(request_id: str, out: DissectOutcome) -> pb.DissectResponse:
    resp = pb.DissectResponse(
        request_id=request_id,
        fraction=1.0,
        stage="done",
        done=True,
        layer=out.layer,
        total_units=out.total_units,
        min_iou=out.min_iou,
    )
    for u in out.units:
        resp.units.add(
            unit=u.unit, concept=u.concept, category=u.category, iou=u.iou, threshold=u.threshold
        )
    for category, units, concepts in out.summary:
        resp.summary.add(category=category, units=units, concepts=concepts)
    return resp


def _visualize_response(request_id: str, out: VisualizeOutcome) -> pb.VisualizeResponse:
    resp = pb.VisualizeResponse(request_id=request_id, fraction=1.0, stage="done", done=True)
    for image in out.images:
        resp.images.add(
            objective=image.objective, png=image.png, trace=image.trace, value=image.value
        )
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
    out.linear = path.linear
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
