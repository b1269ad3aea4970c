"""The replica of the Ray Serve ``Explainer`` deployment (:mod:`xai_serve.integrations.ray`).

Imported only where Ray Serve runs (it imports Ray and the HTTP listener's JSON translation).
The replica holds a :class:`~xai_serve.serving.state.ServerState` with every model of the
config loaded, but no batcher of ours: requests become jobs through the gRPC servicer's
:func:`~xai_serve.serving.servicer.request_to_job`, are batched by ``@serve.batch`` (one queue
per model) and computed by :func:`~xai_serve.serving.engine.run_batch` on the device's worker
thread; answers are built by :func:`~xai_serve.serving.servicer.result_to_response`.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.serve.grpc_util import RayServegRPCContext
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from xai_serve.errors import InvalidInput, NotFound, ResourceExhausted
from xai_serve.models import LoadedModel, load_model
from xai_serve.models.tuning import resolve_cache_dir
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.serving import http as kserve_json
from xai_serve.serving.batcher import is_out_of_memory
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.engine import ExplainJob, ExplainResult, run_batch
from xai_serve.serving.errors import status_of
from xai_serve.serving.jobs import gather_or_cancel
from xai_serve.serving.metrics import Metrics
from xai_serve.serving.servicer import ExplainerServicer, request_to_job, result_to_response
from xai_serve.serving.state import ServerState

__all__ = ["REPLICA_METADATA", "ExplainerReplica"]

log = logging.getLogger("xai_serve.integrations.ray")

_EXPLAIN = "/xai_serve.v1.Explainer/Explain"
_EXPLAIN_ROUTE = re.compile(r"/v1/models/([^/:]+):explain/?")
_MODELS_ROUTE = re.compile(r"/v1/models/?")

Answer = ExplainResult | BaseException
#: gRPC trailing metadata / HTTP header naming the replica that answered: "<node id>/<replica>"
REPLICA_METADATA = "xai-serve-replica"


def _compute(jobs: list[ExplainJob]) -> list[Answer]:
    """``run_batch(jobs)``; if the batch fails, each job alone (so one bad input fails only its
    own request); a single job that runs out of memory is RESOURCE_EXHAUSTED."""
    try:
        return list(run_batch(jobs))
    except Exception as exc:
        if len(jobs) > 1:
            return [answer for job in jobs for answer in _compute([job])]
        if is_out_of_memory(exc):
            return [ResourceExhausted(f"request {jobs[0].request_id!r}: out of memory: {exc}")]
        return [exc]


def _batched(model: LoadedModel, executor: Executor) -> Callable[[ExplainJob], Awaitable[Answer]]:
    """A ``@serve.batch`` queue for ``model``'s jobs: ``max_batch_size`` and ``max_delay_ms``
    from its config; each batch computed as one call per kind of job (batch key)."""

    @serve.batch(
        max_batch_size=model.max_batch_size,
        batch_wait_timeout_s=model.config.max_delay_ms / 1e3,
    )
    async def explain_batch(jobs: list[ExplainJob]) -> list[Answer]:
        loop = asyncio.get_running_loop()
        kinds: dict[tuple[Any, ...], list[int]] = defaultdict(list)
        for i, job in enumerate(jobs):
            kinds[job.batch_key()].append(i)
        out: list[Answer] = [RuntimeError("job was not computed")] * len(jobs)
        for where in kinds.values():
            answers = await loop.run_in_executor(executor, _compute, [jobs[i] for i in where])
            for i, answer in zip(where, answers, strict=True):
                out[i] = answer
        return out

    return explain_batch


def _replica_name() -> str:
    """``<Ray node id>/<Serve replica id>`` (``local`` for each outside Ray / a replica)."""
    try:
        replica = serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        replica = "local"
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    return f"{node}/{replica}"


class _NoDeadline:
    """The call context the servicer reads a deadline from: Serve's gRPC context has none
    (``grpc_options.request_timeout_s`` bounds calls instead)."""

    def time_remaining(self) -> float | None:
        return None


class _BatchedServicer(ExplainerServicer):
    """The gRPC servicer with each request answered through ``explain`` (the replica's
    ``@serve.batch`` path) instead of our batcher: its ExplainStream (concurrent answers,
    errors in-band per request) is reused as it is."""

    def __init__(
        self, state: ServerState, explain: Callable[[pb.ExplainRequest], Awaitable[Any]]
    ) -> None:
        super().__init__(state)
        self._explain = explain

    async def explain_one(
        self, request: pb.ExplainRequest, deadline: float | None, on_partial: Any = None
    ) -> pb.ExplainResponse:
        return await self._explain(request)


class ExplainerReplica:
    """One replica: every model of ``server`` loaded; gRPC ``Explain``, ``ExplainStream`` and
    ``ListModels``, and the KServe v1 explain route over HTTP (see
    :mod:`xai_serve.integrations.ray`)."""

    def __init__(self, server: ServerConfig) -> None:
        logging.getLogger("xai_serve").setLevel(server.log_level)
        names = [m.name for m in server.models]
        self.state = ServerState(names, server.limits, Metrics(), concepts=server.concepts)
        allowed = [Path(d) for d in server.model_dirs] or None
        tuning_dir = resolve_cache_dir(server.tuning_dir)
        self._batch: dict[str, Callable[[ExplainJob], Awaitable[Answer]]] = {}
        for cfg in server.models:
            executor = self.state.workers.get(str(cfg.device))

            def load(cfg: Any = cfg) -> LoadedModel:
                model = load_model(cfg, allowed_dirs=allowed)
                if server.warmup:
                    model.warmup(cache_dir=tuning_dir)
                return model

            # on the device's worker thread, which later computes its batches
            model = executor.submit(load).result()
            self.state.models[model.name] = model
            self._batch[model.name] = _batched(model, executor)
        self._servicer = _BatchedServicer(self.state, self.explain)
        self.replica = _replica_name()
        log.info("replica %s ready: %s", self.replica, ", ".join(names))

    async def explain(self, request: pb.ExplainRequest) -> pb.ExplainResponse:
        """Validate ``request``, queue its job in its model's ``@serve.batch`` and answer."""
        job = await request_to_job(request, self.state, None)
        if request.quality:
            raise InvalidInput(
                "`quality` figures are not computed by the Ray Serve deployment; ask "
                "xai-serve serve for them"
            )
        if job.progress:
            raise InvalidInput(
                "`progress` (partial answers) is not served by the Ray Serve deployment; "
                "ExplainStream of xai-serve serve sends them"
            )
        answer = await self._batch[job.model.name](job)
        if isinstance(answer, BaseException):
            raise answer
        return result_to_response(job, answer)

    # ------------------------------------------------------------------ gRPC ingress

    async def Explain(
        self, request: pb.ExplainRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.ExplainResponse:
        if grpc_context is not None:  # which replica answered (or failed), for operators
            trailing = [*grpc_context.trailing_metadata(), (REPLICA_METADATA, self.replica)]
            grpc_context.set_trailing_metadata(trailing)
        try:
            return await self.explain(request)
        except Exception as exc:
            # the status code xai-serve serve would answer; Serve's proxy sends it
            code, message = status_of(exc, request.request_id, rpc=_EXPLAIN)
            if grpc_context is not None:
                grpc_context.set_code(code)
                grpc_context.set_details(message)
            raise

    async def ExplainStream(
        self,
        request_stream: AsyncIterator[pb.ExplainRequest],
        grpc_context: RayServegRPCContext | None = None,
    ) -> AsyncIterator[pb.ExplainResponse]:
        """Answers in completion order, each request's error in its own answer (as
        ``xai-serve serve`` does); ``progress`` is refused per request."""
        stream = self._servicer.ExplainStream(request_stream, _NoDeadline())  # type: ignore[arg-type]
        async for answer in stream:
            yield answer

    async def ListModels(
        self, request: pb.ListModelsRequest, grpc_context: RayServegRPCContext | None = None
    ) -> pb.ListModelsResponse:
        return await self._servicer.ListModels(request, None)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ HTTP ingress

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        try:
            if request.method == "GET" and _MODELS_ROUTE.search(path):
                return JSONResponse({"models": list(self.state.names)})
            route = _EXPLAIN_ROUTE.search(path)
            if request.method == "POST" and route is not None:
                answer = await self._explain_json(route.group(1), await request.body())
                return JSONResponse(answer, headers={REPLICA_METADATA: self.replica})
            raise NotFound(
                f"no route {request.method} {path}; this deployment answers GET /v1/models and "
                "POST /v1/models/{model}:explain"
            )
        except Exception as exc:
            return kserve_json.error_response(exc, rpc="http:explain")

    async def _explain_json(self, model: str, data: bytes) -> dict[str, Any]:
        """KServe v1 ``:explain``, decoded and encoded as ``xai-serve serve``'s HTTP listener
        does: one ExplainRequest per instance, all batched together."""
        self.state.model(model)
        body = kserve_json.v1_explain_body(data)
        requests = kserve_json.v1_explain_requests(model, body, self.state)
        answers = await gather_or_cancel(self.explain(r) for r in requests)
        return kserve_json.v1_explanations(answers)
