"""The Open Inference Protocol (``inference.GRPCInferenceService``) on the same server.

Triton and KServe clients work unchanged. ``ModelInfer`` takes one input, the preprocessed
batch ``FP32 [B, C, H, W]`` (or ``[C, H, W]``); without parameters it returns the model's
``logits`` ``FP32 [B, classes]``; with the request parameter ``explainer`` = a method name (and
optionally ``target`` (or several classes: ``targets`` = ``"3,5,7"``, or ``top_labels`` = k;
the explanation is then ``FP32 [B, T, H, W]`` and ``target`` ``INT64 [B, T]``), ``foil``,
``layer`` and any method option of ``xai_serve.v1.Options`` under its
own name and type: ``seed``, ``samples``, ``n_segments``, ``segmenter`` = ``"grid"``,
``baseline`` = a number or ``"blur"``, ...) it returns the explanation ``explanation``
``FP32 [B, H, W]``, the explained classes ``target`` ``INT64 [B]`` and the ``logits``. Either
way each image is one job of the same cross-request batcher as ``Explain`` (plain logits are
the model's own fp32 forward), with the same checks, queue limit, out-of-memory policy and
metrics; an image whose logits are not finite fails the call (INVALID_ARGUMENT).

Triton's own request parameters are honoured: ``timeout`` (microseconds, as ``tritonclient``'s
``infer(timeout=...)`` sends it) shortens the call's deadline, and ``priority`` is accepted and
ignored (one priority level). A model has one version, ``"1"`` (``""`` means it too). Input and
output parameters (shared memory, Triton's classification extension) are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

import xai_serve
from xai_serve.errors import InvalidInput, NotFound
from xai_serve.explainers.base import OPTION_SCHEMA, OptionSpec
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving import codec
from xai_serve.serving.engine import LOGITS, ExplainJob
from xai_serve.serving.jobs import (
    build_job,
    call_deadline,
    check_tensor_input,
    gather_or_cancel,
    shorten_deadline,
)
from xai_serve.serving.state import ServerState

__all__ = ["InferenceServicer", "option_param"]

OUTPUTS = ("logits", "explanation", "target")
PARAMETERS = ("explainer", "target", "targets", "top_labels", "foil", "layer", *OPTION_SCHEMA)
TRITON_PARAMETERS = ("priority", "timeout")
VERSIONS = ("", "1")


def _param(p: oip.InferParameter, name: str) -> Any:
    kind = p.WhichOneof("parameter_choice")
    if kind is None:
        raise InvalidInput(f"parameter {name!r} has no value")
    return getattr(p, kind)


def _str_param(p: oip.InferParameter, name: str) -> str:
    value = _param(p, name)
    if not isinstance(value, str):
        raise InvalidInput(f"parameter {name!r} must be a string, got {value!r}")
    return value


def _int_param(p: oip.InferParameter, name: str) -> int:
    value = _param(p, name)
    if isinstance(value, (bool, float)):
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise InvalidInput(f"parameter {name!r} must be an integer, got {value!r}") from None


def option_param(p: oip.InferParameter, spec: OptionSpec, options: pb.Options) -> None:
    """Set ``options``' field ``spec.name`` from a request parameter, typed as the schema says:
    ints from ``int64_param``, numbers from ``double_param`` (or an int), bools from
    ``bool_param``, words from ``string_param``; a baseline is a number or ``"blur"``."""
    name = spec.name
    if spec.kind == "int":
        setattr(options, name, _int_param(p, name))
        return
    value = _param(p, name)
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if spec.kind == "float" or (spec.kind == "baseline" and numeric):
        if not numeric:
            raise InvalidInput(f"parameter {name!r} must be a number, got {value!r}")
        if spec.kind == "baseline":
            options.baseline.value = float(value)
        else:
            setattr(options, name, float(value))
    elif spec.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidInput(f"parameter {name!r} must be a bool, got {value!r}")
        setattr(options, name, value)
    elif spec.kind == "str":
        setattr(options, name, _str_param(p, name))
    elif spec.kind == "choice":
        word = _str_param(p, name).lower()
        numbers = dict(spec.enum)
        if word not in numbers:
            raise InvalidInput(
                f"parameter {name!r} must be one of {', '.join(numbers)}, got {value!r}"
            )
        setattr(options, name, numbers[word])
    else:  # a baseline given as a word
        if _str_param(p, name).lower() != "blur":
            raise InvalidInput(f"parameter {name!r} must be a number or 'blur', got {value!r}")
        options.baseline.blur = True


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """Open Inference Protocol over a :class:`ServerState`."""

    def __init__(self, state: ServerState) -> None:
        self.state = state

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self.state.ready)

    def _check_model(self, name: str, version: str) -> None:
        """NotFound for a model this server does not have (in any state) or another version."""
        if name not in self.state.names:
            known = ", ".join(repr(n) for n in self.state.names) or "none"
            raise NotFound(f"unknown model {name!r}; this server has: {known}")
        if version not in VERSIONS:
            raise NotFound(f"model {name!r} has only version '1', not {version!r}")

    async def ModelReady(self, request, context):
        self._check_model(request.name, request.version)
        return oip.ModelReadyResponse(
            ready=request.name in self.state.models and not self.state.draining
        )

    async def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(
            name="xai_serve", version=xai_serve.__version__, extensions=["explain"]
        )

    async def ModelMetadata(self, request, context):
        model = self.state.model(request.name, field="name")
        self._check_model(request.name, request.version)
        c, h, w = model.input_shape
        meta = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=model.name,
            versions=["1"],
            platform="pytorch",
            inputs=[meta(name="input", datatype="FP32", shape=[-1, c, h, w])],
            outputs=[
                meta(name="logits", datatype="FP32", shape=[-1, model.num_classes]),
                meta(name="explanation", datatype="FP32", shape=[-1, h, w]),
                meta(name="target", datatype="INT64", shape=[-1]),
            ],
        )

    async def ModelInfer(self, request, context):
        call = self._parse(request, call_deadline(context))
        tensors = await self._run(call)
        return _respond(request, call, tensors)

    def _parse(self, request: oip.ModelInferRequest, deadline: float | None) -> _InferCall:
        """Check the request (its input, outputs and parameters) and build one job per image;
        every error names its field."""
        state = self.state
        model = state.model(request.model_name, field="model_name")
        self._check_model(model.name, request.model_version)
        x = _input_tensor(request, state.limits)
        params = dict(request.parameters)
        if "timeout" in params:
            timeout_us = _int_param(params.pop("timeout"), "timeout")
            if timeout_us < 0:
                raise InvalidInput(
                    f"parameter 'timeout' must be >= 0 (microseconds), got {timeout_us}"
                )
            if timeout_us > 0:  # 0: no timeout, as in Triton
                deadline = shorten_deadline(deadline, timeout_us / 1e6)
        params.pop("priority", None)
        unknown = sorted(set(params) - set(PARAMETERS))
        if unknown:
            raise InvalidInput(
                f"unknown parameter(s) {', '.join(unknown)}; known: "
                f"{', '.join(PARAMETERS + TRITON_PARAMETERS)}"
            )
        explaining = "explainer" in params
        wanted = [o.name for o in request.outputs] or (
            ["explanation", "target", "logits"] if explaining else ["logits"]
        )
        for name in wanted:
            if name not in OUTPUTS:
                raise InvalidInput(f"unknown output {name!r}; outputs: {', '.join(OUTPUTS)}")
        images = [check_tensor_input(img, model, "inputs[0]")[0] for img in x]
        if not explaining:
            if "explanation" in wanted or "target" in wanted:
                raise InvalidInput(
                    "outputs 'explanation' and 'target' need the 'explainer' parameter"
                )
            if params:
                raise InvalidInput(f"parameter(s) {', '.join(sorted(params))} need 'explainer'")
            jobs = [
                ExplainJob(request_id=f"{request.id}[{i}]", model=model, method=LOGITS,
                           image=image, top_k=0, deadline=deadline)
                for i, image in enumerate(images)
            ]  # fmt: skip
            return _InferCall(model, wanted, jobs, explaining)
        fields: dict[str, Any] = {"method": _str_param(params["explainer"], "explainer")}
        if "layer" in params:
            fields["layer"] = _str_param(params["layer"], "layer")
        if "target" in params:
            fields["target"] = _int_param(params["target"], "target")
        if "targets" in params:
            fields["targets"] = _class_list(_str_param(params["targets"], "targets"))
        for name in ("top_labels", "foil"):
            if name in params:
                fields[name] = _int_param(params[name], name)
        options = pb.Options()
        for name, spec in OPTION_SCHEMA.items():
            if name in params:
                try:
                    option_param(params[name], spec, options)
                except (ValueError, TypeError) as exc:  # protobuf: out of the field's range
                    raise InvalidInput(f"parameter {name!r}: {exc}") from None
        jobs = [
            build_job(
                state,
                model,
                image,
                None,
                request_id=f"{request.id}[{i}]",
                deadline=deadline,
                options=options,
                **fields,
            )
            for i, image in enumerate(images)
        ]
        return _InferCall(model, wanted, jobs, explaining)

    async def _run(self, call: _InferCall) -> dict[str, torch.Tensor]:
        """Every job through the model's batcher; the output tensors by name."""
        batcher = self.state.batchers[call.model.name]
        results = await gather_or_cancel(batcher.submit(job) for job in call.jobs)
        tensors = {"logits": torch.stack([r.logits for r in results])}
        if call.explaining:
            if results[0].per_target is not None:  # several classes: [B, T, H, W], [B, T]
                tensors["explanation"] = torch.stack(
                    [torch.stack([one.map for one in r.per_target or ()]) for r in results]
                )
                tensors["target"] = torch.tensor(
                    [[one.target for one in r.per_target or ()] for r in results],
                    dtype=torch.int64,
                )
            else:
                tensors["explanation"] = torch.stack([r.map for r in results])
                tensors["target"] = torch.tensor([r.target for r in results], dtype=torch.int64)
        return tensors


@dataclass
class _InferCall:
    """A checked ModelInfer request: its model, the outputs asked for, and one job per image
    (plain :data:`~xai_serve.serving.engine.LOGITS` jobs, or explanations)."""

    model: LoadedModel
    wanted: list[str]
    jobs: list[ExplainJob]
    explaining: bool


def _class_list(text: str) -> list[int]:
    """The ``targets`` parameter: comma-separated class indices, e.g. ``"3,5,7"``."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidInput(
            f"parameter 'targets' must be comma-separated class indices such as '3,5,7', "
            f"got {text!r}"
        ) from None
    return values


def _input_tensor(request: oip.ModelInferRequest, limits: Any) -> torch.Tensor:
    """The request's one input as ``[B, C, H, W]``; input and output parameters refused."""
    if len(request.inputs) != 1:
        raise InvalidInput(f"ModelInfer takes exactly one input, got {len(request.inputs)}")
    inp = request.inputs[0]
    if inp.parameters:
        raise InvalidInput(
            f"inputs[0] has parameter(s) {', '.join(sorted(inp.parameters))}: input "
            "parameters (shared memory among them) are not supported; send the tensor in "
            "raw_input_contents or contents"
        )
    for out in request.outputs:
        if out.parameters:
            raise InvalidInput(
                f"output {out.name!r} has parameter(s) {', '.join(sorted(out.parameters))}: "
                "output parameters (classification, shared memory) are not supported; "
                "outputs come back as raw tensors"
            )
    raw = None
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            raise InvalidInput("raw_input_contents must have one entry per input")
        raw = request.raw_input_contents[0]
    x = codec.oip_input_to_tensor(
        inp, raw, field="inputs[0]", max_elements=limits.max_tensor_elements
    )
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise InvalidInput(f"inputs[0] must be [B, C, H, W] or [C, H, W], got {list(x.shape)}")
    if x.shape[0] > limits.max_queue:
        raise InvalidInput(f"inputs[0] has {x.shape[0]} images; at most {limits.max_queue}")
    return x


def _respond(
    request: oip.ModelInferRequest, call: _InferCall, tensors: dict[str, torch.Tensor]
) -> oip.ModelInferResponse:
    resp = oip.ModelInferResponse(model_name=call.model.name, model_version="1", id=request.id)
    for name in call.wanted:
        out, data = codec.tensor_to_oip_output(name, tensors[name].contiguous())
        resp.outputs.append(out)
        resp.raw_output_contents.append(data)
    return resp
