"""Python client of the ``xai_serve.v1.Explainer`` gRPC API.

:class:`Client` (blocking, ``grpc``) and :class:`AsyncClient` (``grpc.aio``) share one set of
functions that turn Python arguments into ``ExplainRequest`` messages, responses into
:class:`RemoteExplanation` objects, and gRPC status codes into :class:`RemoteError`; the two
classes differ only in how they call the channel.

Typical use::

    with Client("localhost:50051", token="...") as client:
        exp = client.explain("cat.jpg", model="efficientnet_lite0", method="gradcam")
        exp.map            # float32 [H, W] heatmap (CPU tensor)
        exp.top_k[0]       # ClassScore(index=..., label=..., probability=..., logit=...)
        for item in client.explain_many(paths, method="lime", samples=512, seed=0):
            if isinstance(item, RemoteError):
                ...        # that image failed; the others go on
        # LIME/KernelSHAP refine in rounds: watch the map converge, or stop sampling early
        for exp in client.explain_progressive("cat.jpg", method="lime", samples=1024):
            exp.partial, exp.samples, exp.segment_stderr.max()
        client.explain("cat.jpg", method="kernelshap", tolerance=0.01, budget_ms=500)
        # several classes of one image, each a map of its own (per_target), maybe vs a foil
        exp = client.explain("cat.jpg", top_labels=3, foil=285)
        [(t.target, t.map.shape) for t in exp.per_target], exp.foil
        # quality figures beside a map, and a metric over a set of images
        client.explain("cat.jpg", quality=["deletion", "insertion"]).quality
        ev = client.evaluate(paths, method="gradcam", metrics=["deletion", "road"])
        ev.metrics["deletion"].mean, ev.metrics["deletion"].values
        # concepts: TCAV of class 340 for library concepts and a folder of one's own,
        # Network Dissection of a layer, feature visualisation of channels and logits
        tc = client.tcav(zebra_paths, target=340, concepts=["stripes_0_wide", ("mine", "dir/")])
        tc["stripes_0_wide"].mean, tc["stripes_0_wide"].p_value, tc.random_scores
        d = client.dissect(layer="_blocks.8", top=10)
        d.units[0].concept, d.units[0].iou, d.summary["texture"].units
        v = client.visualize(["channel:_blocks.8:7", "logit:340"], steps=128)
        v.images[0].png, v.images[0].image, v.images[0].value

Errors: a failed call raises a :class:`RemoteError` whose class also derives from the matching
:mod:`xai_serve.errors` class (``except NotFound`` catches an unknown model on the server as well
as locally). Arguments that are wrong before any call is made (an unknown option name, an option
of the wrong type, an unreadable image file) raise :class:`~xai_serve.errors.InvalidInput`.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import math
import numbers
import os
import sys
import threading
import uuid
from collections import deque
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from types import EllipsisType
from typing import Any, TypeAlias

import grpc
import grpc.aio
import numpy as np
import torch

from xai_serve.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.explainers.base import OPTION_SCHEMA
from xai_serve.imaging import decode_image, encode_png
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import explainer_pb2_grpc as pb_grpc
from xai_serve.wire import DTYPES

__all__ = [
    "OPTION_NAMES",
    "AsyncClient",
    "ClassScore",
    "Client",
    "ForwardPathInfo",
    "MetricInfo",
    "MetricSummary",
    "ModelInfo",
    "RemoteConceptScore",
    "RemoteDissectCategory",
    "RemoteDissectUnit",
    "RemoteDissection",
    "RemoteError",
    "RemoteEvaluation",
    "RemoteExplanation",
    "RemoteFailedPrecondition",
    "RemoteInvalidInput",
    "RemoteNotFound",
    "RemoteResourceExhausted",
    "RemoteTCAV",
    "RemoteTarget",
    "RemoteUnavailable",
    "RemoteVisualization",
    "RemoteVisualizedObjective",
    "Timing",
    "auth_metadata",
    "channel_credentials",
    "option_from_text",
]

ImageInput: TypeAlias = (
    bytes | bytearray | memoryview | str | os.PathLike | torch.Tensor | np.ndarray
)
"""What ``explain`` takes as an image: encoded PNG/JPEG/WebP bytes, a path to such a file, or a
preprocessed float tensor ``[C, H, W]`` / ``[1, C, H, W]`` (torch or NumPy)."""

PemInput: TypeAlias = bytes | str | os.PathLike
"""A PEM certificate or key: its bytes, a path to the file, or the PEM text itself."""

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_METHOD = "gradcam"
MAX_REQUEST_ID_BYTES = 256
MAX_VISUALIZED_PIXELS = 1 << 26

_USE_DEFAULT: EllipsisType = ...

# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassScore:
    """One of the model's top-k classes, from the same forward pass as the explanation."""

    index: int
    label: str
    probability: float
    logit: float


@dataclass(frozen=True)
class Timing:
    """Where the server spent the request's time.

    ``queue_ms``: arrival until its batch started; ``compute_ms``: that batch's compute time
    (shared by every request in it); ``batch_size``: requests in that batch; ``cache_hit``:
    the server answered from its cache of exact answers, without computing.
    """

    queue_ms: float
    compute_ms: float
    batch_size: int
    cache_hit: bool = False


@dataclass(frozen=True, eq=False)
class RemoteTarget:
    """The explanation of one class of an answer that explains several (``targets=`` or
    ``top_labels=``; mirrors ``xai_serve.v1.TargetExplanation``).

    ``map`` is a float32 ``[H, W]`` CPU tensor (None when only the overlay was asked for);
    ``segment_weights`` and ``segment_stderr`` (float32 ``[S]``, over the answer's
    ``segments``), ``intercept`` and ``score`` are set by the superpixel methods (lime,
    kernelshap) only. With a foil, the map explains ``score(target) - score(foil)``.
    """

    target: int
    map: torch.Tensor | None
    overlay_png: bytes | None
    segment_weights: torch.Tensor | None
    segment_stderr: torch.Tensor | None
    intercept: float | None
    score: float | None


@dataclass(frozen=True, eq=False)
class RemoteExplanation:
    """The answer to one explain request.

    ``map`` is a float32 ``[H, W]`` CPU tensor at the model's input size, or ``None`` when only
    the overlay was asked for. ``segments`` (int32 ``[H, W]`` superpixel ids),
    ``segment_weights`` (float32 ``[S]``), ``intercept`` and ``score`` are set by the
    superpixel methods (lime, kernelshap) only; ``seed`` by randomised methods.

    ``samples`` counts the model evaluations this image used (fewer than asked when it stopped
    at its ``tolerance`` or ``budget_ms``); ``segment_stderr`` (float32 ``[S]``, lime and
    kernelshap) is the standard error of each entry of ``segment_weights`` (0 where computed
    exactly), so a caller can tell a settled weight from noise. ``partial`` marks an
    intermediate answer of :meth:`Client.explain_progressive` (its ``samples`` so far; never
    an overlay); the final answer has ``partial=False``.

    ``per_target`` holds one :class:`RemoteTarget` per explained class, in order, when the
    request asked for several (``targets=`` or ``top_labels=``); the singular fields
    (``target``, ``map``, ``overlay_png``, ``segment_weights``, ``segment_stderr``,
    ``intercept``, ``score``) then hold the first one's. It is empty for a one-class answer
    (and from servers that predate it). ``foil`` is the class the maps are contrasted with
    (each explains ``score(target) - score(foil)``), None without one. ``quality`` holds the
    figures of the metrics the request asked for (``quality=``), by metric name.
    """

    request_id: str
    model: str
    method: str
    layer: str | None
    target: int
    map: torch.Tensor | None
    top_k: tuple[ClassScore, ...]
    overlay_png: bytes | None
    segments: torch.Tensor | None
    segment_weights: torch.Tensor | None
    intercept: float | None
    score: float | None
    seed: int | None
    samples: int
    timing: Timing
    segment_stderr: torch.Tensor | None = None
    partial: bool = False
    per_target: tuple[RemoteTarget, ...] = ()
    foil: int | None = None
    quality: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class MetricInfo:
    """A quality metric the server offers (mirrors ``xai_serve.v1.MetricInfo``)."""

    name: str
    higher_is_better: bool
    description: str


@dataclass(frozen=True)
class MetricSummary:
    """One metric's figures over an evaluation's images: ``values`` one per image, in the
    order sent; ``mean`` and ``stderr`` (its standard error; 0 with one image)."""

    metric: str
    values: tuple[float, ...]
    mean: float
    stderr: float
    higher_is_better: bool


@dataclass(frozen=True)
class RemoteEvaluation:
    """The answer to :meth:`Client.evaluate`: ``metrics`` by name, and the class explained
    in each image (``targets``, in the order sent)."""

    request_id: str
    model: str
    method: str
    metrics: Mapping[str, MetricSummary]
    targets: tuple[int, ...]


@dataclass(frozen=True)
class RemoteConceptScore:
    """One concept's TCAV figures over the runs (mirrors ``xai_serve.v1.TcavConcept``):
    ``scores`` (one per run: the share of inputs whose directional derivative towards that
    run's CAV is positive), their ``mean`` and sample ``std``, the two-sided t-test's
    ``p_value`` against the random CAVs' scores, ``significant`` (``p_value < alpha``) and
    each run's CAV's held-out accuracy (``cav_accuracies``)."""

    concept: str
    scores: tuple[float, ...]
    mean: float
    std: float
    p_value: float
    significant: bool
    cav_accuracies: tuple[float, ...]


@dataclass(frozen=True)
class RemoteTCAV:
    """The answer to :meth:`Client.tcav`: one :class:`RemoteConceptScore` per concept, in the
    order asked; ``random_scores``, the null (random-vs-random CAVs' scores, one per run); the
    ``layer`` and ``target`` class measured and the significance level ``alpha``.
    ``result["red"]`` is concept ``"red"``'s figures."""

    request_id: str
    model: str
    layer: str
    target: int
    concepts: tuple[RemoteConceptScore, ...]
    random_scores: tuple[float, ...]
    alpha: float

    def __getitem__(self, concept: str) -> RemoteConceptScore:
        for c in self.concepts:
            if c.concept == concept:
                return c
        names = ", ".join(c.concept for c in self.concepts)
        raise NotFound(f"no concept {concept!r} in this result; it has {names}")


@dataclass(frozen=True)
class RemoteDissectUnit:
    """One unit of a dissected layer (mirrors ``xai_serve.v1.DissectUnit``): its best
    ``concept`` (of ``category``), that concept's ``iou`` and the unit's activation
    ``threshold`` (its top-quantile activation)."""

    unit: int
    concept: str
    category: str
    iou: float
    threshold: float


@dataclass(frozen=True)
class RemoteDissectCategory:
    """The detectors of one concept category (mirrors ``xai_serve.v1.DissectCategory``):
    ``units`` whose best concept (IoU above ``min_iou``) is in it, and how many detect each
    ``concepts`` entry (most first)."""

    category: str
    units: int
    concepts: Mapping[str, int]


@dataclass(frozen=True)
class RemoteDissection:
    """The answer to :meth:`Client.dissect`: ``units`` best IoU first (as many as ``top``
    asked, else all ``total_units``), ``summary`` by category (over every unit), and the
    ``min_iou`` above which a unit counts as a detector."""

    request_id: str
    model: str
    layer: str
    total_units: int
    units: tuple[RemoteDissectUnit, ...]
    summary: Mapping[str, RemoteDissectCategory]
    min_iou: float

    @property
    def detectors(self) -> int:
        """How many units detect a concept (the summary's units, summed)."""
        return sum(c.units for c in self.summary.values())


@dataclass(frozen=True)
class RemoteVisualizedObjective:
    """One optimised image (mirrors ``xai_serve.v1.VisualizedObjective``): the ``objective``
    string, the image as ``png`` bytes (RGB), its ``trace`` (the objective's value at each
    step) and ``value`` at the final image. :attr:`image` decodes the PNG."""

    objective: str
    png: bytes
    trace: tuple[float, ...]
    value: float

    @property
    def image(self) -> torch.Tensor:
        """The image as ``uint8 Tensor[3, H, W]`` (decoded from :attr:`png` on each access)."""
        return decode_image(self.png, max_pixels=MAX_VISUALIZED_PIXELS, field="visualized image")


@dataclass(frozen=True)
class RemoteVisualization:
    """The answer to :meth:`Client.visualize`: one :class:`RemoteVisualizedObjective` per
    objective, in the order asked."""

    request_id: str
    model: str
    images: tuple[RemoteVisualizedObjective, ...]


@dataclass(frozen=True)
class ForwardPathInfo:
    """How a served model's forwards run, as its server measured them at warm-up (mirrors
    ``xai_serve.v1.ForwardPath``; the in-process counterpart is
    :class:`xai_serve.ForwardPath`). Figures the server did not report are None.

    Attributes:
        tuned: the path was chosen by measuring (False: the default or configured path).
        memory_format: ``"channels_last"`` or ``"contiguous"``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        batch_size, grad_batch_size: inputs per no-grad / differentiated forward (None: each
            method's default).
        compiled: the no-grad forward is an ahead-of-time compiled program.
        images_per_s: measured no-grad throughput on this path.
        speedup: vs the fp32 contiguous batch-64 forward in the same warm-up (tuned only).
        top1_agreement, logit_error, rank_correlation: the fidelity guard's figures for a
            reduced-precision or compiled path, vs fp32 eager.
        summary: one line: the choice, the rejected candidates and why.
        linear: the fp32 linear layers' kernels, ``"aten"`` or ``"onednn"`` (exact both; ""
            from a server that does not report it).
    """

    tuned: bool
    memory_format: str
    precision: str
    batch_size: int | None
    grad_batch_size: int | None
    compiled: bool
    images_per_s: float | None
    speedup: float | None
    top1_agreement: float | None
    logit_error: float | None
    rank_correlation: float | None
    summary: str
    linear: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """A model the server holds (mirrors ``xai_serve.v1.ModelInfo``); ``forward_path`` is
    None when the server reports none (a model that is not loaded yet, an older server)."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    default_layer: str
    layers: tuple[str, ...]
    methods: tuple[str, ...]
    device: str
    max_batch_size: int
    ready: bool
    has_class_names: bool
    forward_path: ForwardPathInfo | None = None


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class RemoteError(XaiServeError):
    """A call (or, on :meth:`Client.explain_many`, one request of a stream) failed.

    ``code`` is the gRPC status code, ``details`` the server's message and ``request_id`` the id
    of the request it answers (``""`` for a call that carried none, e.g. ``list_models``).
    Codes with a domain meaning raise a subclass that also derives from the domain class:
    :class:`RemoteInvalidInput`, :class:`RemoteNotFound`, :class:`RemoteResourceExhausted`,
    :class:`RemoteUnavailable` and :class:`RemoteFailedPrecondition`.
    """

    def __init__(self, code: grpc.StatusCode, details: str, request_id: str = "") -> None:
        where = f" (request {request_id!r})" if request_id else ""
        super().__init__(f"{code.name}: {details}{where}")
        self.code = code
        self.details = details
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.details, self.request_id))


class RemoteInvalidInput(RemoteError, InvalidInput):
    """The server answered INVALID_ARGUMENT."""


class RemoteNotFound(RemoteError, NotFound):
    """The server answered NOT_FOUND (unknown model, method or layer)."""


class RemoteResourceExhausted(RemoteError, ResourceExhausted):
    """The server answered RESOURCE_EXHAUSTED (a limit or a full queue)."""


class RemoteUnavailable(RemoteError, Unavailable):
    """The server answered UNAVAILABLE (not reachable, not ready or shutting down)."""


class RemoteFailedPrecondition(RemoteError, FailedPrecondition):
    """The server answered FAILED_PRECONDITION (e.g. a gradient method asked of a model it
    explains through another server: it needs the model loaded locally)."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[RemoteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: RemoteInvalidInput,
    grpc.StatusCode.NOT_FOUND: RemoteNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RemoteResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: RemoteUnavailable,
    grpc.StatusCode.FAILED_PRECONDITION: RemoteFailedPrecondition,
}
_STATUS_BY_VALUE: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def remote_error(code: grpc.StatusCode | int, details: str, request_id: str = "") -> RemoteError:
    """The :class:`RemoteError` (subclass) for a status ``code`` (enum or its integer value)."""
    if not isinstance(code, grpc.StatusCode):
        code = _STATUS_BY_VALUE.get(int(code), grpc.StatusCode.UNKNOWN)
    return _ERROR_CLASSES.get(code, RemoteError)(code, details, request_id)


def error_from_rpc(err: grpc.RpcError, request_id: str = "") -> RemoteError:
    """Map a ``grpc.RpcError`` (sync) or ``grpc.aio.AioRpcError`` to a :class:`RemoteError`."""
    code_of = getattr(err, "code", None)
    details_of = getattr(err, "details", None)
    code = code_of() if callable(code_of) else None
    details = details_of() if callable(details_of) else None
    return remote_error(code or grpc.StatusCode.UNKNOWN, details or str(err), request_id)


# ---------------------------------------------------------------------------------------------
# Request building (shared by Client and AsyncClient)
# ---------------------------------------------------------------------------------------------

OPTION_NAMES: tuple[str, ...] = tuple(sorted(OPTION_SCHEMA))
"""The method options ``explain`` takes as keyword arguments: the fields of
``xai_serve.v1.Options``, typed as the one option schema
(:data:`xai_serve.explainers.base.OPTION_SCHEMA`) says. Which ones a method accepts is checked
by the server."""


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"{name} takes an int, got {type(value).__name__} {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"{name} takes a number, got {type(value).__name__} {value!r}")
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidInput(f"{name} takes a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{name} takes a str, got {type(value).__name__} {value!r}")
    return value


def _as_choice(name: str, value: Any, choices: Mapping[str, int]) -> int:
    key = _as_str(name, value).lower()
    if key not in choices:
        raise InvalidInput(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return choices[key]


def _check_option_names(options: Mapping[str, Any]) -> None:
    unknown = sorted(set(options) - set(OPTION_SCHEMA))
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, OPTION_NAMES, n=1)
        hints.append(f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name))
    raise InvalidInput(
        f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
        f"valid options: {', '.join(OPTION_NAMES)}"
    )


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def option_from_text(name: str, text: str) -> Any:
    """The value of option ``name`` written as text (a command line's ``KEY=VALUE``), typed as
    the option is: ``int``, ``float``, ``bool`` (true/false, yes/no, on/off, 1/0) or ``str``;
    ``baseline`` is a number or ``blur``. InvalidInput names the option and what it takes."""
    _check_option_names({name: None})
    kind = OPTION_SCHEMA[name].kind
    word = text.strip()
    try:
        if kind == "int":
            return int(word)
        if kind == "float":
            return float(word)
        if kind == "baseline":
            return word.lower() if word.lower() == "blur" else float(word)
    except ValueError:
        what = {"int": "an int", "float": "a number", "baseline": "a number or 'blur'"}[kind]
        raise InvalidInput(f"option {name} takes {what}, got {text!r}") from None
    if kind == "bool":
        if word.lower() in _TRUE:
            return True
        if word.lower() in _FALSE:
            return False
        raise InvalidInput(f"option {name} takes true or false, got {text!r}")
    return word


def build_options(options: Mapping[str, Any]) -> pb.Options:
    """``pb.Options`` from keyword options; ``None`` values are left unset (method default).

    Raises InvalidInput for an unknown name (listing the valid ones), a value of the wrong
    type, an unknown enum choice or a value out of the field's range.
    """
    _check_option_names(options)
    message = pb.Options()
    for name, value in options.items():
        if value is None:
            continue
        spec = OPTION_SCHEMA[name]
        kind = spec.kind
        try:
            if kind == "int":
                setattr(message, name, _as_int(name, value))
            elif kind == "float":
                setattr(message, name, _as_float(name, value))
            elif kind == "bool":
                setattr(message, name, _as_bool(name, value))
            elif kind == "str":
                setattr(message, name, _as_str(name, value))
            elif kind == "choice":
                setattr(message, name, _as_choice(name, value, dict(spec.enum)))
            elif isinstance(value, str):  # baseline
                if value.lower() != "blur":
                    raise InvalidInput(f"baseline takes a number or 'blur', got {value!r}")
                message.baseline.blur = True
            else:
                message.baseline.value = _as_float(name, value)
        except InvalidInput:
            raise
        except (ValueError, TypeError) as err:  # protobuf: out of the field's range
            raise InvalidInput(f"option {name}={value!r}: {err}") from err
    return message


def _returns(want_map: bool, overlay: bool) -> pb.Return:
    if want_map and overlay:
        return pb.MAP_AND_OVERLAY
    if want_map:
        return pb.MAP
    if overlay:
        return pb.OVERLAY
    raise InvalidInput("nothing to return: set map=True, overlay=True or both")


def _put(request: pb.ExplainRequest, field: str, value: int | list[int], name: str) -> None:
    """Set the integer ``field`` (extend it, if repeated) of ``request``; a value out of the
    field's range is InvalidInput that names ``name``, not protobuf's ValueError."""
    try:
        if isinstance(value, list):
            getattr(request, field).extend(value)
        else:
            setattr(request, field, value)
    except (ValueError, TypeError) as err:
        raise InvalidInput(f"{name}={value!r}: {err}") from err


def _class_list(name: str, values: Any, hint: str = "") -> list[int]:
    """``values`` (a sequence of ints, or a 1-D integer tensor/array) as a non-empty list of
    class indices; InvalidInput names ``name`` (and adds ``hint``) otherwise."""
    if isinstance(values, (torch.Tensor, np.ndarray)):
        if values.ndim != 1:
            raise InvalidInput(
                f"{name} takes a 1-D sequence of ints, got shape {list(values.shape)}"
            )
        values = values.tolist()
    if isinstance(values, (str, bytes, bytearray)) or not isinstance(values, Sequence):
        what = f"{type(values).__name__} {values!r}"
        one = "; one class is target=" if isinstance(values, numbers.Integral) else ""
        raise InvalidInput(f"{name} takes a sequence of ints (class indices), got {what}{one}")
    if not values:
        raise InvalidInput(f"{name} is empty: name at least one class (None: the top-1)")
    try:
        return [_as_int(f"{name}[{i}]", v) for i, v in enumerate(values)]
    except InvalidInput as err:
        raise InvalidInput(f"{err}{hint}") from None


def build_base_request(
    *,
    model: str,
    method: str,
    target: int | None = None,
    targets: Sequence[int] | None = None,
    top_labels: int | None = None,
    foil: int | None = None,
    layer: str | None,
    top_k: int | None,
    overlay: bool,
    want_map: bool,
    options: Mapping[str, Any],
    progress: bool = False,
    targets_hint: str = "",
    quality: Sequence[str] | None = None,
) -> pb.ExplainRequest:
    """The fields every request of one call shares (no image or request id).

    ``target`` / ``targets`` / ``top_labels`` choose the classes explained, ``foil`` the class
    they are contrasted with; which combinations are allowed, and class ranges, are the
    server's to check (its INVALID_ARGUMENT names the field). ``progress`` asks for partial
    answers, which only ``ExplainStream`` sends."""
    request = pb.ExplainRequest(
        model=_as_str("model", model),
        method=_as_str("method", method),
        returns=_returns(_as_bool("map", want_map), _as_bool("overlay", overlay)),
        progress=_as_bool("progress", progress),
    )
    if target is not None:
        _put(request, "target", _as_int("target", target), "target")
    if targets is not None:
        _put(request, "targets", _class_list("targets", targets, targets_hint), "targets")
    if top_labels is not None:
        k = _as_int("top_labels", top_labels)
        if k < 1:
            raise InvalidInput(f"top_labels must be >= 1, got {k}")
        _put(request, "top_labels", k, "top_labels")
    if foil is not None:
        _put(request, "foil", _as_int("foil", foil), "foil")
    if layer is not None:
        request.layer = _as_str("layer", layer)
    if top_k is not None:
        k = _as_int("top_k", top_k)
        if k < 0:
            raise InvalidInput(f"top_k must be >= 0, got {k}")
        _put(request, "top_k", k, "top_k")
    request.options.CopyFrom(build_options(options))
    if quality is not None:
        request.quality.extend(_metric_names("quality", quality))
    return request


def _metric_names(name: str, values: Any) -> list[str]:
    """A sequence of metric names (strings), checked; the server checks that it knows them."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InvalidInput(f"{name} must be a list of metric names, got {values!r}")
    out = [_as_str(name, v) for v in values]
    if any(not v for v in out):
        raise InvalidInput(f"{name} has an empty metric name")
    return out


def _check_request_id(request_id: Any) -> str:
    request_id = _as_str("request_id", request_id)
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidInput(f"request_id is longer than {MAX_REQUEST_ID_BYTES} bytes")
    return request_id


def encode_tensor(image: torch.Tensor | np.ndarray) -> pb.Tensor:
    """A preprocessed float image ``[C, H, W]`` / ``[1, C, H, W]`` as a float32 ``pb.Tensor``."""
    if isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise InvalidInput(
                f"image tensor must be a preprocessed float tensor, got {image.dtype}; "
                "send raw pixels as encoded PNG/JPEG bytes"
            )
        array = image.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    else:
        if image.dtype.kind != "f":
            raise InvalidInput(
                f"image array must be a preprocessed float array, got {image.dtype}; "
                "send raw pixels as encoded PNG/JPEG bytes"
            )
        array = image
    shape = tuple(int(s) for s in array.shape)
    if not (len(shape) == 3 or (len(shape) == 4 and shape[0] == 1)):
        raise InvalidInput(
            f"image tensor must be [C, H, W] or [1, C, H, W], got shape {list(shape)}; "
            "use explain_many for several images"
        )
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=data)


def _read_image_file(path: str | os.PathLike) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read image file {os.fspath(path)!r}: {err}") from err
    if not data:
        raise InvalidInput(f"image file {os.fspath(path)!r} is empty")
    return data


def set_image(request: pb.ExplainRequest, image: ImageInput) -> None:
    """Put ``image`` into ``request`` (``image`` bytes or ``tensor``)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        data = bytes(image)
        if not data:
            raise InvalidInput("image is empty bytes")
        request.image = data
    elif isinstance(image, (str, os.PathLike)):
        request.image = _read_image_file(image)
    elif isinstance(image, (torch.Tensor, np.ndarray)):
        request.tensor.CopyFrom(encode_tensor(image))
    else:
        raise InvalidInput(
            "image must be encoded image bytes, a path to an image file, or a preprocessed "
            f"float tensor/array [C, H, W]; got {type(image).__name__}"
        )


ImageTarget: TypeAlias = int | Sequence[int] | None
"""One image's classes in ``explain_many(image_targets=...)``: a class, several classes, or
None for the defaults (the top-1, or ``top_labels``)."""


def _image_target(name: str, value: Any) -> int | list[int] | None:
    """An :data:`ImageTarget` checked: None, an int or a non-empty list of ints."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    return _class_list(name, value)


def build_request(
    base: pb.ExplainRequest,
    image: ImageInput,
    *,
    request_id: str,
    classes: int | list[int] | None = None,
    name: str = "image_targets",
) -> pb.ExplainRequest:
    """One ``ExplainRequest``: ``base`` plus the image, the request id and, if given, this
    image's own ``classes`` (from :func:`_image_target`: ``target`` for an int, ``targets``
    for a list; ``base`` then sets neither)."""
    request = pb.ExplainRequest()
    request.CopyFrom(base)
    request.request_id = _check_request_id(request_id)
    if classes is not None:
        _put(request, "targets" if isinstance(classes, list) else "target", classes, name)
    set_image(request, image)
    return request


# ---------------------------------------------------------------------------------------------
# Response parsing (shared)
# ---------------------------------------------------------------------------------------------


def decode_tensor(message: pb.Tensor) -> torch.Tensor:
    """A ``pb.Tensor`` (little-endian, row-major) as a CPU torch tensor of its dtype and shape."""
    dtype = DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"tensor has an unsupported dtype {message.dtype}")
    shape = tuple(int(s) for s in message.shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"tensor has a negative dimension: {list(shape)}")
    count = math.prod(shape)
    if len(message.data) != count * dtype.itemsize:
        raise ValueError(
            f"tensor data has {len(message.data)} bytes; shape {list(shape)} of {dtype} "
            f"needs {count * dtype.itemsize}"
        )
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(bytearray(message.data), dtype=dtype)
    if sys.byteorder == "big" and dtype.itemsize > 1:
        flat = flat.view(torch.uint8).view(-1, dtype.itemsize).flip(1).contiguous().view(dtype)
    return flat.reshape(shape)


def _floats(values: Iterable[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32)


def parse_target(
    message: pb.ExplainResponse | pb.TargetExplanation, *, segmented: bool
) -> RemoteTarget:
    """The one-class fields of ``message``: an ``ExplainResponse``'s singular fields or one
    ``TargetExplanation`` of its ``per_target`` (they share their names). ``segmented``: the
    answer carries segments, so its segment weights are set even when empty."""
    return RemoteTarget(
        target=int(message.target),
        map=decode_tensor(message.map) if message.HasField("map") else None,
        overlay_png=bytes(message.overlay_png) or None,
        segment_weights=(
            _floats(message.segment_weights) if message.segment_weights or segmented else None
        ),
        segment_stderr=_floats(message.segment_stderr) if message.segment_stderr else None,
        intercept=float(message.intercept) if message.HasField("intercept") else None,
        score=float(message.score) if message.HasField("score") else None,
    )


def parse_response(response: pb.ExplainResponse) -> RemoteExplanation | RemoteError:
    """A :class:`RemoteExplanation`, or the :class:`RemoteError` that ``response`` carries.

    A response the client cannot decode becomes a RemoteError with code INTERNAL.
    """
    if response.HasField("error"):
        code = response.error.code or grpc.StatusCode.UNKNOWN.value[0]
        return remote_error(code, response.error.message, response.request_id)
    try:
        segmented = response.HasField("segments")
        first = parse_target(response, segmented=segmented)
        return RemoteExplanation(
            request_id=response.request_id,
            model=response.model,
            method=response.method,
            layer=response.layer or None,
            target=first.target,
            map=first.map,
            top_k=tuple(
                ClassScore(
                    index=int(s.index),
                    label=s.label,
                    probability=float(s.probability),
                    logit=float(s.logit),
                )
                for s in response.top_k
            ),
            overlay_png=first.overlay_png,
            segments=decode_tensor(response.segments) if segmented else None,
            segment_weights=first.segment_weights,
            intercept=first.intercept,
            score=first.score,
            seed=int(response.seed) if response.HasField("seed") else None,
            samples=int(response.samples),
            timing=Timing(
                queue_ms=float(response.timing.queue_ms),
                compute_ms=float(response.timing.compute_ms),
                batch_size=int(response.timing.batch_size),
                cache_hit=bool(response.timing.cache_hit),
            ),
            segment_stderr=first.segment_stderr,
            partial=bool(response.partial),
            per_target=tuple(parse_target(t, segmented=segmented) for t in response.per_target),
            foil=int(response.foil) if response.HasField("foil") else None,
            quality=dict(response.quality),
        )
    except ValueError as err:
        return remote_error(
            grpc.StatusCode.INTERNAL, f"malformed response: {err}", response.request_id
        )


def _unary_result(response: pb.ExplainResponse) -> RemoteExplanation:
    result = parse_response(response)
    if isinstance(result, RemoteError):
        raise result
    return result


ProgressCallback: TypeAlias = Callable[[RemoteExplanation], Any]
"""Called with each partial :class:`RemoteExplanation` (``partial=True``) of a progressive
explain; :class:`AsyncClient` also awaits what it returns, if that is awaitable."""


def _check_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise InvalidInput(
            f"progress takes a callable (called with each partial answer) or None, "
            f"got {type(progress).__name__}"
        )


def _progressive_result(response: pb.ExplainResponse, request_id: str) -> RemoteExplanation:
    """One answer of a progressive explain: the request's only image, so its error raises."""
    result = parse_response(response)
    if isinstance(result, RemoteError):
        raise result
    if result.request_id != request_id:
        raise remote_error(
            grpc.StatusCode.INTERNAL,
            f"the server answered request {result.request_id!r} on this stream",
            request_id,
        )
    return result


def _no_final_answer(request_id: str) -> RemoteError:
    return remote_error(
        grpc.StatusCode.UNKNOWN, "the stream ended without a final answer", request_id
    )


def parse_forward_path(message: pb.ForwardPath) -> ForwardPathInfo:
    """A :class:`ForwardPathInfo` from a ``pb.ForwardPath``. proto3 cannot tell an unset
    number from 0, so 0 reads as "not reported" (None) where 0 is no real value: batch sizes,
    throughput, speed-up; the guard's figures are None together when both are 0 (no guard
    ran: a real verdict always has top-1 agreement or a logit error above 0)."""
    guarded = message.top1_agreement != 0 or message.logit_error != 0
    return ForwardPathInfo(
        tuned=bool(message.tuned),
        memory_format=message.memory_format,
        precision=message.precision,
        batch_size=int(message.batch_size) or None,
        grad_batch_size=int(message.grad_batch_size) or None,
        compiled=bool(message.compiled),
        images_per_s=float(message.images_per_s) or None,
        speedup=float(message.speedup) or None,
        top1_agreement=float(message.top1_agreement) if guarded else None,
        logit_error=float(message.logit_error) if guarded else None,
        rank_correlation=(
            float(message.rank_correlation) if message.HasField("rank_correlation") else None
        ),
        summary=message.summary,
        linear=message.linear,
    )


def parse_models(response: pb.ListModelsResponse) -> list[ModelInfo]:
    """The models of a ``ListModelsResponse``."""
    return [
        ModelInfo(
            name=m.name,
            input_shape=tuple(int(s) for s in m.input_shape),
            num_classes=int(m.num_classes),
            default_layer=m.default_layer,
            layers=tuple(m.layers),
            methods=tuple(m.methods),
            device=m.device,
            max_batch_size=int(m.max_batch_size),
            ready=bool(m.ready),
            has_class_names=bool(m.has_class_names),
            forward_path=(
                parse_forward_path(m.forward_path) if m.HasField("forward_path") else None
            ),
        )
        for m in response.models
    ]


def parse_metrics(response: pb.ListModelsResponse) -> list[MetricInfo]:
    """The quality metrics of a ``ListModelsResponse``."""
    return [MetricInfo(m.name, bool(m.higher_is_better), m.description) for m in response.metrics]


EvaluateProgress: TypeAlias = Callable[[float, str], Any]
"""``progress(fraction done, stage)`` of :meth:`Client.evaluate`."""


def build_evaluate_request(
    images: Iterable[ImageInput],
    *,
    model: str,
    method: str,
    metrics: Sequence[str] | None,
    targets: Sequence[int | None] | None,
    layer: str | None,
    request_id: str | None,
    options: Mapping[str, Any],
) -> pb.EvaluateRequest:
    """An ``EvaluateRequest``, every argument checked (InvalidInput) before any call."""
    request = pb.EvaluateRequest(
        request_id=_check_request_id(uuid.uuid4().hex if request_id is None else request_id),
        model=_as_str("model", model),
        method=_as_str("method", method),
    )
    if metrics is not None:
        request.metrics.extend(_metric_names("metrics", metrics))
    if layer is not None:
        request.layer = _as_str("layer", layer)
    request.options.CopyFrom(build_options(options))
    if isinstance(images, (str, bytes, os.PathLike, torch.Tensor, np.ndarray)):
        images = [images]  # one image, not a sequence of them
    for image in images:
        set_image(request.inputs.add(), image)  # type: ignore[arg-type]
    if not request.inputs:
        raise InvalidInput("images is empty: give at least one image")
    if targets is not None:
        if isinstance(targets, (str, bytes)) or len(targets) != len(request.inputs):
            raise InvalidInput(
                f"targets must give one class (or None) per image: {len(request.inputs)} "
                f"images, got {targets!r}"
            )
        for item, target in zip(request.inputs, targets, strict=True):
            if target is not None:
                item.target = _as_int("targets", target)
    return request


def _check_evaluate_progress(progress: Any) -> None:
    if progress is not None and not callable(progress):
        raise InvalidInput(f"progress must be callable(fraction, stage), got {progress!r}")


def parse_evaluation(response: pb.EvaluateResponse, model: str, method: str) -> RemoteEvaluation:
    """The last message of an Evaluate call as a :class:`RemoteEvaluation`."""
    return RemoteEvaluation(
        request_id=response.request_id,
        model=model,
        method=method,
        metrics={
            m.metric: MetricSummary(
                metric=m.metric,
                values=tuple(float(v) for v in m.values),
                mean=float(m.mean),
                stderr=float(m.stderr),
                higher_is_better=bool(m.higher_is_better),
            )
            for m in response.metrics
        },
        targets=tuple(int(t) for t in response.targets),
    )


# ---------------------------------------------------------------------------------------------
# Concept methods: TCAV, Network Dissection, feature visualisation (shared)
# ---------------------------------------------------------------------------------------------

ConceptProgress: TypeAlias = Callable[[float, str], Any]
"""``progress(fraction done, stage)`` of :meth:`Client.tcav`, :meth:`Client.dissect` and
:meth:`Client.visualize`, called as the server reports progress."""

ConceptImages: TypeAlias = (
    str
    | os.PathLike
    | Sequence[bytes | bytearray | memoryview | str | os.PathLike | torch.Tensor]
    | torch.Tensor
)
"""A concept's own images: a folder (its PNG/JPEG/WebP files in name order), a sequence of
encoded images (bytes or file paths; ``uint8 Tensor[3, H, W]`` RGB is encoded as PNG here), or
one ``Tensor[N, 3, H, W]`` (uint8, or float RGB in ``[0, 1]`` such as a
:class:`xai_serve.concepts.library.ConceptSet`'s ``images``)."""

ConceptSpec: TypeAlias = str | tuple[str, ConceptImages]
"""A concept of :meth:`Client.tcav`: the name of a concept the server knows (its procedural
library: ``"red"``, ``"stripes_0_wide"``, ...), or ``(name, images)`` to send the images; a
:class:`~xai_serve.concepts.library.ConceptSet` is sent as ``(its name, its images)``."""

CONCEPT_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_INT32_MAX = 2**31 - 1
_INT64 = (-(2**63), 2**63 - 1)


def _request_id(request_id: str | None) -> str:
    return _check_request_id(uuid.uuid4().hex if request_id is None else request_id)


def _bounded_int(name: str, value: Any, low: int, high: int = _INT32_MAX) -> int:
    number = _as_int(name, value)
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be in {low}..{high}, got {number}")
    return number


def _seed(value: Any) -> int:
    return _bounded_int("seed", value, *_INT64)


def _open_fraction(name: str, value: Any) -> float:
    number = _as_float(name, value)
    if not 0.0 < number < 1.0:
        raise InvalidInput(f"{name} must be in (0, 1), got {value!r}")
    return number


def _folder_images(name: str, folder: Path) -> list[bytes]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in CONCEPT_IMAGE_SUFFIXES
    )
    if not files:
        raise InvalidInput(
            f"concept {name!r}: folder {os.fspath(folder)!r} has no image files "
            f"({', '.join(CONCEPT_IMAGE_SUFFIXES)})"
        )
    return [_read_image_file(p) for p in files]


def _tensor_images(name: str, images: torch.Tensor) -> list[bytes]:
    """``Tensor[N, 3, H, W]`` or ``[3, H, W]`` (uint8, or float RGB in [0, 1]) as PNGs."""
    batch = images.detach().cpu()
    if batch.dim() == 3:
        batch = batch[None]
    if batch.dim() != 4 or batch.shape[1] != 3 or batch.shape[0] == 0:
        raise InvalidInput(
            f"concept {name!r}: an image tensor must be [N, 3, H, W] or [3, H, W] RGB, got "
            f"{list(images.shape)}"
        )
    if batch.is_floating_point():
        if bool(torch.isnan(batch).any()) or batch.min() < 0 or batch.max() > 1:
            raise InvalidInput(
                f"concept {name!r}: float images must be RGB in [0, 1] (not normalised)"
            )
        batch = batch.mul(255.0).round_().to(torch.uint8)
    elif batch.dtype != torch.uint8:
        raise InvalidInput(f"concept {name!r}: images must be uint8 or float, got {batch.dtype}")
    return [encode_png(image) for image in batch]


def _concept_images(name: str, images: Any) -> list[bytes]:
    """A concept's images as encoded bytes (see :data:`ConceptImages`)."""
    if isinstance(images, (str, os.PathLike)):
        folder = Path(images)
        if not folder.is_dir():
            raise InvalidInput(
                f"concept {name!r}: {os.fspath(images)!r} is not a folder; give a folder or a "
                "list of images"
            )
        return _folder_images(name, folder)
    if isinstance(images, torch.Tensor):
        return _tensor_images(name, images)
    if isinstance(images, (bytes, bytearray, memoryview)) or not isinstance(images, Iterable):
        raise InvalidInput(
            f"concept {name!r}: images must be a folder, a list of encoded images or paths, or "
            f"a Tensor[N, 3, H, W]; got {type(images).__name__}"
        )
    out: list[bytes] = []
    for item in images:
        if isinstance(item, (bytes, bytearray, memoryview)):
            if not bytes(item):
                raise InvalidInput(f"concept {name!r}: an image is empty bytes")
            out.append(bytes(item))
        elif isinstance(item, (str, os.PathLike)):
            out.append(_read_image_file(item))
        elif isinstance(item, torch.Tensor):
            out.extend(_tensor_images(name, item))
        else:
            raise InvalidInput(
                f"concept {name!r}: each image must be encoded bytes, a file path or a uint8 "
                f"Tensor[3, H, W]; got {type(item).__name__}"
            )
    if not out:
        raise InvalidInput(f"concept {name!r} has no images")
    return out


def _concept_set(item: Any) -> pb.ConceptSet:
    if isinstance(item, str):
        if not item.strip():
            raise InvalidInput("a concept name is empty")
        return pb.ConceptSet(name=item)
    if hasattr(item, "name") and isinstance(getattr(item, "images", None), torch.Tensor):
        item = (item.name, item.images)  # a library ConceptSet
    if isinstance(item, (bytes, bytearray)) or not isinstance(item, Sequence) or len(item) != 2:
        raise InvalidInput(
            f"each concept must be a name (str) or a (name, images) pair, got {type(item).__name__}"
        )
    name = _as_str("concept name", item[0])
    if not name.strip():
        raise InvalidInput("a concept name is empty")
    return pb.ConceptSet(name=name, images=_concept_images(name, item[1]))


def _inputs(images: Any, add: Callable[[], Any], what: str) -> None:
    if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike, torch.Tensor,
                           np.ndarray)):  # fmt: skip
        images = [images]  # one image, not a sequence of them
    if not isinstance(images, Iterable):
        raise InvalidInput(f"{what} must be an image or an iterable of images")
    count = 0
    for image in images:
        set_image(add(), image)  # type: ignore[arg-type]
        count += 1
    if count == 0:
        raise InvalidInput(f"{what} is empty: give at least one image")


def build_tcav_request(
    inputs: Iterable[ImageInput] | ImageInput,
    *,
    model: str,
    layer: str | None,
    target: int,
    concepts: Sequence[ConceptSpec] | ConceptSpec,
    runs: int | None = None,
    random_size: int | None = None,
    concept_size: int | None = None,
    alpha: float | None = None,
    seed: int | None = None,
    request_id: str | None = None,
) -> pb.TcavRequest:
    """A ``TcavRequest``, every argument checked (InvalidInput) before any call; concept images
    are read and encoded here."""
    if target is None:
        raise InvalidInput("target is required: the class whose sensitivity TCAV measures")
    request = pb.TcavRequest(
        request_id=_request_id(request_id),
        model=_as_str("model", model),
        target=_bounded_int("target", target, 0, _INT64[1]),
    )
    if layer is not None:
        request.layer = _as_str("layer", layer)
    if isinstance(concepts, str) or hasattr(concepts, "images"):
        concepts = [concepts]  # one concept
    if not isinstance(concepts, Sequence) or not concepts:
        raise InvalidInput("concepts is empty: name at least one concept")
    sets = [_concept_set(c) for c in concepts]
    names = [s.name for s in sets]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"concepts names {repeated[0]!r} twice")
    request.concepts.extend(sets)
    _inputs(inputs, request.inputs.add, "inputs")
    if runs is not None:
        request.runs = _bounded_int("runs", runs, 2)
    if random_size is not None:
        request.random_size = _bounded_int("random_size", random_size, 2)
    if concept_size is not None:
        request.concept_size = _bounded_int("concept_size", concept_size, 2)
    if alpha is not None:
        request.alpha = _open_fraction("alpha", alpha)
    if seed is not None:
        request.seed = _seed(seed)
    return request


def build_dissect_request(
    *,
    model: str,
    layer: str | None = None,
    dataset: str = "",
    per_concept: int | None = None,
    quantile: float | None = None,
    min_iou: float | None = None,
    top: int | None = None,
    seed: int | None = None,
    request_id: str | None = None,
) -> pb.DissectRequest:
    """A ``DissectRequest``, every argument checked (InvalidInput) before any call."""
    request = pb.DissectRequest(
        request_id=_request_id(request_id),
        model=_as_str("model", model),
        dataset=_as_str("dataset", dataset),
    )
    if layer is not None:
        request.layer = _as_str("layer", layer)
    if per_concept is not None:
        request.per_concept = _bounded_int("per_concept", per_concept, 1)
    if quantile is not None:
        request.quantile = _open_fraction("quantile", quantile)
    if min_iou is not None:
        value = _as_float("min_iou", min_iou)
        if not 0.0 <= value < 1.0:
            raise InvalidInput(f"min_iou must be in [0, 1), got {min_iou!r}")
        request.min_iou = value
    if top is not None:
        request.top = _bounded_int("top", top, 1)
    if seed is not None:
        request.seed = _seed(seed)
    return request


def build_visualize_request(
    objectives: Sequence[str] | str,
    *,
    model: str,
    steps: int | None = None,
    size: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    request_id: str | None = None,
) -> pb.VisualizeRequest:
    """A ``VisualizeRequest``, every argument checked (InvalidInput) before any call: each
    objective must parse (:func:`xai_serve.concepts.visualize.parse_objective`); whether its
    layer, channel or class exists is the server's to check."""
    from xai_serve.concepts.visualize import parse_objective

    if isinstance(objectives, str):
        objectives = [objectives]
    if not isinstance(objectives, Sequence) or not objectives:
        raise InvalidInput(
            "objectives is empty: give at least one, e.g. 'channel:<layer>:<c>' or 'logit:<k>'"
        )
    texts = [_as_str("objective", o).strip() for o in objectives]
    for text in texts:
        parse_objective(text)
    request = pb.VisualizeRequest(
        request_id=_request_id(request_id), model=_as_str("model", model), objectives=texts
    )
    if steps is not None:
        request.steps = _bounded_int("steps", steps, 1)
    if size is not None:
        request.size = _bounded_int("size", size, 1)
    if lr is not None:
        value = _as_float("lr", lr)
        if not 0.0 < value < math.inf:
            raise InvalidInput(f"lr must be a positive finite number, got {lr!r}")
        request.lr = value
    if seed is not None:
        request.seed = _seed(seed)
    return request


def parse_tcav(response: pb.TcavResponse, model: str) -> RemoteTCAV:
    """The last message of a Tcav call (``done`` set) as a :class:`RemoteTCAV`."""
    return RemoteTCAV(
        request_id=response.request_id,
        model=model,
        layer=response.layer,
        target=int(response.target),
        concepts=tuple(
            RemoteConceptScore(
                concept=c.concept,
                scores=tuple(float(v) for v in c.scores),
                mean=float(c.mean),
                std=float(c.std),
                p_value=float(c.p_value),
                significant=bool(c.significant),
                cav_accuracies=tuple(float(v) for v in c.cav_accuracies),
            )
            for c in response.concepts
        ),
        random_scores=tuple(float(v) for v in response.random_scores),
        alpha=float(response.alpha),
    )


def parse_dissection(response: pb.DissectResponse, model: str) -> RemoteDissection:
    """The last message of a Dissect call (``done`` set) as a :class:`RemoteDissection`; each
    category's concepts most detectors first (ties: by name)."""
    return RemoteDissection(
        request_id=response.request_id,
        model=model,
        layer=response.layer,
        total_units=int(response.total_units),
        units=tuple(
            RemoteDissectUnit(
                unit=int(u.unit),
                concept=u.concept,
                category=u.category,
                iou=float(u.iou),
                threshold=float(u.threshold),
            )
            for u in response.units
        ),
        summary={
            c.category: RemoteDissectCategory(
                category=c.category,
                units=int(c.units),
                concepts=dict(sorted(c.concepts.items(), key=lambda kv: (-kv[1], kv[0]))),
            )
            for c in response.summary
        },
        min_iou=float(response.min_iou),
    )


def parse_visualization(response: pb.VisualizeResponse, model: str) -> RemoteVisualization:
    """The last message of a Visualize call (``done`` set) as a :class:`RemoteVisualization`."""
    return RemoteVisualization(
        request_id=response.request_id,
        model=model,
        images=tuple(
            RemoteVisualizedObjective(
                objective=o.objective,
                png=bytes(o.png),
                trace=tuple(float(v) for v in o.trace),
                value=float(o.value),
            )
            for o in response.images
        ),
    )


def _no_result(rpc: str, request_id: str) -> RemoteError:
    return remote_error(
        grpc.StatusCode.INTERNAL, f"the server ended {rpc} without a result", request_id
    )


# ---------------------------------------------------------------------------------------------
# Streams (shared)
# ---------------------------------------------------------------------------------------------


class _Stream:
    """The bookkeeping of one ``explain_many`` call.

    Builds the requests lazily from the images (a local failure of one image, e.g. an
    unreadable file, becomes a :class:`RemoteInvalidInput` for its request id and is not sent),
    remembers which ids are still unanswered, and keeps an unexpected exception (from the
    caller's image iterator) to re-raise in the consumer. The sync client's request iterator
    runs on a gRPC thread, hence the lock.
    """

    def __init__(
        self,
        base: pb.ExplainRequest,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        image_targets: Sequence[ImageTarget] | None,
        request_ids: Sequence[str] | None,
    ) -> None:
        if isinstance(images, (str, bytes, bytearray, memoryview, os.PathLike)) or not (
            isinstance(images, (Iterable, AsyncIterable))
        ):
            raise InvalidInput(
                f"images must be an iterable of images, got {type(images).__name__}; "
                "use explain() for one image"
            )
        self._targets: list[int | list[int] | None] | None = None
        if image_targets is not None:
            if base.HasField("target") or base.targets:
                raise InvalidInput(
                    "pass either target/targets (the same classes for every image) or "
                    "image_targets (each image's own), not both"
                )
            if isinstance(image_targets, (str, bytes)) or not isinstance(image_targets, Sequence):
                raise InvalidInput(
                    "image_targets takes a sequence with one entry per image (an int, a "
                    f"sequence of ints or None), got {type(image_targets).__name__}"
                )
            self._targets = [
                _image_target(f"image_targets[{i}]", t) for i, t in enumerate(image_targets)
            ]
        self._ids: list[str] | None = None
        if isinstance(request_ids, str):
            raise InvalidInput("request_ids takes a sequence of str, not one str")
        if request_ids is not None:
            self._ids = [_check_request_id(r) for r in request_ids]
            if len(set(self._ids)) != len(self._ids):
                raise InvalidInput("request_ids must be unique")
        if hasattr(images, "__len__"):
            count = len(images)  # type: ignore[arg-type]
            for what, values in (("image_targets", self._targets), ("request_ids", self._ids)):
                if values is not None and len(values) != count:
                    raise InvalidInput(f"{count} images but {len(values)} {what}")
        self._base = base
        self.images = images
        self._lock = threading.Lock()
        self._pending: dict[str, None] = {}
        self._failures: deque[RemoteError] = deque()
        self._fatal: BaseException | None = None

    def request(self, index: int, image: ImageInput) -> pb.ExplainRequest | None:
        """The request for the ``index``-th image, or None after recording why it failed."""
        for what, values in (("request_ids", self._ids), ("image_targets", self._targets)):
            if values is not None and index >= len(values):
                raise InvalidInput(f"more images than {what} ({len(values)})")
        request_id = self._ids[index] if self._ids is not None else str(index)
        classes = self._targets[index] if self._targets is not None else None
        try:
            request = build_request(
                self._base, image, request_id=request_id, classes=classes,
                name=f"image_targets[{index}]",
            )  # fmt: skip
        except (XaiServeError, ValueError, TypeError) as err:
            code = grpc.StatusCode.INVALID_ARGUMENT
            self._failures.append(remote_error(code, f"not sent: {err}", request_id))
            return None
        with self._lock:
            self._pending[request_id] = None
        return request

    def requests(self) -> Iterator[pb.ExplainRequest]:
        """The requests of a sync iterable of images (runs on a gRPC thread)."""
        images = self.images
        try:
            if not isinstance(images, Iterable):
                raise InvalidInput("the blocking Client takes a (sync) iterable of images")
            for index, image in enumerate(images):
                request = self.request(index, image)
                if request is not None:
                    yield request
        except Exception as err:  # the caller's iterator failed: stop sending, re-raise later
            self._fatal = err

    async def arequests(self) -> AsyncIterator[pb.ExplainRequest]:
        """The requests of a sync or async iterable of images."""
        try:
            if isinstance(self.images, AsyncIterable):
                index = 0
                async for image in self.images:
                    request = self.request(index, image)
                    index += 1
                    if request is not None:
                        yield request
            else:
                for index, image in enumerate(self.images):
                    request = self.request(index, image)
                    if request is not None:
                        yield request
        except Exception as err:
            self._fatal = err

    def answer(self, response: pb.ExplainResponse) -> RemoteExplanation | RemoteError:
        """The parsed ``response``; unless it is a partial answer (the final one follows),
        its request is no longer pending."""
        if not response.partial or response.HasField("error"):
            with self._lock:
                self._pending.pop(response.request_id, None)
        return parse_response(response)

    def local_failures(self) -> Iterator[RemoteError]:
        """The requests that failed locally since the last call."""
        while self._failures:
            yield self._failures.popleft()

    def finish(self) -> Iterator[RemoteError]:
        """At the end of the stream: re-raise a failure of the image iterator, then yield the
        remaining local failures and an error for each request the server never answered."""
        if self._fatal is not None:
            raise self._fatal
        yield from self.local_failures()
        with self._lock:
            unanswered = list(self._pending)
            self._pending.clear()
        for request_id in unanswered:
            yield remote_error(
                grpc.StatusCode.UNKNOWN, "the stream ended without an answer", request_id
            )


# ---------------------------------------------------------------------------------------------
# Channels (shared)
# ---------------------------------------------------------------------------------------------


def _read_pem(what: str, value: PemInput | None) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    try:
        return Path(value).read_bytes()
    except OSError as err:
        raise InvalidInput(f"cannot read {what} {os.fspath(value)!r}: {err}") from err


def channel_credentials(
    tls: bool,
    root_certificates: PemInput | None,
    client_cert: PemInput | None,
    client_key: PemInput | None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials, or None for a plaintext channel. Certificates imply TLS."""
    if (client_cert is None) != (client_key is None):
        raise InvalidInput("client_cert and client_key go together (mutual TLS)")
    if not tls and root_certificates is None and client_cert is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem("root_certificates", root_certificates),
        private_key=_read_pem("client_key", client_key),
        certificate_chain=_read_pem("client_cert", client_cert),
    )


def _channel_options(
    max_message_bytes: int, options: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    size = _as_int("max_message_bytes", max_message_bytes)
    if size <= 0:
        raise InvalidInput(f"max_message_bytes must be > 0, got {size}")
    merged: dict[str, Any] = {
        "grpc.max_send_message_length": size,
        "grpc.max_receive_message_length": size,
    }
    merged.update(dict(options))
    return list(merged.items())


def _check_timeout(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    seconds = _as_float("timeout", timeout)
    if not seconds > 0 or math.isinf(seconds):
        raise InvalidInput(f"timeout must be a positive number of seconds or None, got {timeout}")
    return seconds


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (``authorization: Bearer <token>``); none
    without a token."""
    if token is None:
        return ()
    token = _as_str("token", token)
    if not token or any(c in token for c in "\r\n"):
        raise InvalidInput("token must be a non-empty single-line string")
    return (("authorization", f"Bearer {token}"),)


class _ClientBase:
    """What Client and AsyncClient share: configuration and argument handling."""

    def __init__(
        self,
        target: str,
        *,
        tls: bool = False,
        root_certificates: PemInput | None = None,
        client_cert: PemInput | None = None,
        client_key: PemInput | None = None,
        token: str | None = None,
        timeout: float | None = 60.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = _as_str("target", target)
        self.timeout = _check_timeout(timeout)
        self._metadata = auth_metadata(token)
        self._credentials = channel_credentials(tls, root_certificates, client_cert, client_key)
        self._channel_options = _channel_options(max_message_bytes, options)
        self._closed = False
        self._open_channel()

    def _open_channel(self) -> None:  # pragma: no cover - each client defines it
        raise NotImplementedError

    def _deadline(self, timeout: float | EllipsisType | None) -> float | None:
        return self.timeout if timeout is ... else _check_timeout(timeout)

    @staticmethod
    def _one_request(
        image: ImageInput, *, request_id: str | None, **shared: Any
    ) -> pb.ExplainRequest:
        """The request of a one-image call, every argument checked (InvalidInput);
        ``shared``: the keyword arguments of :func:`build_base_request`."""
        base = build_base_request(**shared)
        request_id = uuid.uuid4().hex if request_id is None else request_id
        return build_request(base, image, request_id=request_id)

    @staticmethod
    def _many_requests(
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        image_targets: Sequence[ImageTarget] | None,
        request_ids: Sequence[str] | None,
        **shared: Any,
    ) -> _Stream:
        """The requests of a many-image call (one stream), every shared argument checked
        (InvalidInput); each image is read when its request is sent. ``shared``: the keyword
        arguments of :func:`build_base_request`."""
        hint = (
            "; targets lists the classes explained in every image (one entry per image: "
            "image_targets=)"
        )
        base = build_base_request(**shared, targets_hint=hint)
        return _Stream(base, images, image_targets=image_targets, request_ids=request_ids)

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable(f"the client of {self.target} is closed")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        tls = "tls" if self._credentials is not None else "plaintext"
        return f"{type(self).__name__}({self.target!r}, {tls}, {state})"


# ---------------------------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------------------------


class Client(_ClientBase):
    """Blocking client of an xai_serve server.

    Args:
        target: ``host:port`` (any gRPC target, e.g. ``dns:///svc:50051``).
        tls: use TLS (implied by ``root_certificates`` or ``client_cert``).
        root_certificates: PEM roots to trust (bytes, path or PEM text); default: system roots.
        client_cert, client_key: PEM certificate chain and key for mutual TLS.
        token: sent as ``authorization: Bearer <token>`` metadata on every call.
        timeout: default deadline of each call in seconds (None: no deadline). On
            :meth:`explain_many` it bounds the whole stream.
        max_message_bytes: largest message sent or received.
        options: extra gRPC channel options, e.g. ``[("grpc.lb_policy_name", "round_robin")]``.
    """

    def _open_channel(self) -> None:
        if self._credentials is None:
            self._channel = grpc.insecure_channel(self.target, options=self._channel_options)
        else:
            self._channel = grpc.secure_channel(
                self.target, self._credentials, options=self._channel_options
            )
        self._stub = pb_grpc.ExplainerStub(self._channel)

    def explain(
        self,
        image: ImageInput,
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        layer: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        map: bool = True,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ProgressCallback | None = None,
        quality: Sequence[str] | None = None,
        **options: Any,
    ) -> RemoteExplanation:
        """Explain one image.

        Args:
            image: encoded PNG/JPEG/WebP bytes, a path to such a file, or a preprocessed float
                tensor/array ``[C, H, W]`` or ``[1, C, H, W]`` (sent as float32).
            model, method: names from :meth:`list_models`.
            target: the class to explain (default: the model's top-1).
            targets: several classes to explain in this image (distinct; not with
                ``target`` or ``top_labels``): the answer's ``per_target`` holds one
                :class:`RemoteTarget` per class, in this order (its singular fields, the
                first one's).
            top_labels: explain the model's ``k`` most likely classes of this image (most
                likely first, in ``per_target``; not with ``target`` or ``targets``).
            foil: a class to contrast with: each map explains ``score(target) -
                score(foil)`` ("why this class rather than the foil"); not one of the
                targets. The answer's ``foil`` echoes it.
            layer: CAM methods' layer (default: the model's).
            top_k: classes returned in ``top_k`` (server default 5; 0 for none).
            overlay, map: what to return besides the scores (at least one).
            request_id: echoed in the result and in errors (default: a fresh uuid).
            timeout: this call's deadline in seconds (default: the client's; None: none). The
                server plans ``budget_ms`` methods to finish within it.
            progress: called with each partial answer (``partial=True``) of the methods that
                refine in rounds (lime, kernelshap) before the final one is returned; the call
                then goes over ``ExplainStream`` (see :meth:`explain_progressive`).
            **options: method options (:data:`OPTION_NAMES`): ``samples``, ``steps``,
                ``rule``, ``n_segments``, ``segmenter`` ("slic"/"grid"), ``baseline`` (a number or
                "blur"), ``seed``, ``kernel_width``, ``alpha``, ``keep_prob``, ``paired``,
                ``blur_sigma``, ``output`` ("probability"/"logit"), ``noise``, ``base``,
                ``abs``, ``window``, ``stride``, ``top_channels``, ``tolerance`` (lime,
                kernelshap: stop sampling once every segment weight's standard error is at
                most this; ``samples`` is then the most used) and ``budget_ms`` (lime,
                kernelshap, integrated_gradients, smoothgrad: do what fits in this many ms of
                compute and report the standard errors of what came out).
            quality: quality metrics (names from :meth:`list_metrics`) to compute for this
                answer's map on the server, returned in the answer's ``quality``; each costs
                model evaluations of its own.

        Raises:
            InvalidInput: a bad argument, before any call.
            RemoteError: the call failed (a subclass per status code; see the module doc).
                A ``budget_ms`` too small for the least work a method can do is
                :class:`RemoteInvalidInput`; a deadline too short for it, DEADLINE_EXCEEDED.
        """
        self._check_open()
        _check_progress(progress)
        request = self._one_request(
            image, model=model, method=method, target=target, targets=targets,
            top_labels=top_labels, foil=foil, layer=layer, top_k=top_k,
            overlay=overlay, want_map=map, request_id=request_id, options=options,
            progress=progress is not None, quality=quality,
        )  # fmt: skip
        if progress is not None:
            final = None
            # closing(): a callback that raises cancels the call at once, not at collection
            with contextlib.closing(self._run_progressive(request, self._deadline(timeout))) as it:
                for result in it:
                    if result.partial:
                        progress(result)
                    else:
                        final = result
            assert final is not None  # _run_progressive raises without one
            return final
        try:
            response = self._stub.Explain(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, request.request_id) from err
        return _unary_result(response)

    def explain_progressive(
        self,
        image: ImageInput,
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        layer: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        map: bool = True,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        **options: Any,
    ) -> Iterator[RemoteExplanation]:
        """Explain one image, yielding its partial answers as the server refines them, then
        the final one.

        LIME and KernelSHAP sample in rounds; after each round the server sends the map,
        weights and ``segment_stderr`` so far (``partial=True``, ``samples`` so far), so a
        caller can draw the map as it settles, or stop early when it is good enough (leaving
        the loop cancels the call). The last item is the final answer (``partial=False``,
        with the overlay if asked). Other methods yield only the final answer. Arguments are
        those of :meth:`explain`, checked here before the call (InvalidInput); a failure
        raises its :class:`RemoteError` from the iterator.
        """
        self._check_open()
        request = self._one_request(
            image, model=model, method=method, target=target, targets=targets,
            top_labels=top_labels, foil=foil, layer=layer, top_k=top_k,
            overlay=overlay, want_map=map, request_id=request_id, options=options,
            progress=True,
        )  # fmt: skip
        return self._run_progressive(request, self._deadline(timeout))

    def _run_progressive(
        self, request: pb.ExplainRequest, timeout: float | None
    ) -> Iterator[RemoteExplanation]:
        call = self._stub.ExplainStream(iter((request,)), timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                result = _progressive_result(response, request.request_id)
                yield result
                if not result.partial:
                    return
        except grpc.RpcError as err:
            raise error_from_rpc(err, request.request_id) from err
        finally:
            call.cancel()
        raise _no_final_answer(request.request_id)

    def explain_many(
        self,
        images: Iterable[ImageInput],
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        image_targets: Sequence[ImageTarget] | None = None,
        layer: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        map: bool = True,
        request_ids: Sequence[str] | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: bool = False,
        quality: Sequence[str] | None = None,
        **options: Any,
    ) -> Iterator[RemoteExplanation | RemoteError]:
        """Explain many images on one ``ExplainStream``; yields in completion order.

        Request ids are ``"0"``, ``"1"``, ... (the image's position) unless ``request_ids``
        gives them. A request that fails (on the server, or locally such as an unreadable file)
        is yielded as a :class:`RemoteError` with its ``request_id``; the others go on.
        ``target``, ``targets``, ``top_labels`` and ``foil`` apply to every image, as in
        :meth:`explain`; ``image_targets`` instead gives each image its own classes, one
        entry per image: a class, a sequence of classes, or None (the top-1 or
        ``top_labels``). The other arguments are those of :meth:`explain` and apply to
        every image. ``images``
        may be lazy; it is consumed on a gRPC thread while results arrive.

        With ``progress=True`` the partial answers of methods that refine in rounds (lime,
        kernelshap) are yielded too, each marked ``partial=True`` and followed, later, by
        the final answer for its ``request_id`` (see :meth:`explain_progressive`).

        Arguments are checked here, before the stream opens (InvalidInput). A failure of the
        whole stream (deadline, auth, server gone) raises its RemoteError from the iterator.
        Leaving the loop early cancels the stream.
        """
        self._check_open()
        if isinstance(images, AsyncIterable) and not isinstance(images, Iterable):
            raise InvalidInput("the blocking Client takes a (sync) iterable of images")
        stream = self._many_requests(
            images, model=model, method=method, target=target, targets=targets,
            top_labels=top_labels, foil=foil, image_targets=image_targets, layer=layer,
            top_k=top_k, overlay=overlay, want_map=map, request_ids=request_ids,
            options=options, progress=progress, quality=quality,
        )  # fmt: skip
        return self._run_stream(stream, self._deadline(timeout))

    def _run_stream(
        self, stream: _Stream, timeout: float | None
    ) -> Iterator[RemoteExplanation | RemoteError]:
        call = self._stub.ExplainStream(stream.requests(), timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield from stream.local_failures()
                yield stream.answer(response)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            call.cancel()
        yield from stream.finish()

    def list_models(
        self, *, timeout: float | EllipsisType | None = _USE_DEFAULT
    ) -> list[ModelInfo]:
        """The models the server holds."""
        self._check_open()
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return parse_models(response)

    def list_metrics(
        self, *, timeout: float | EllipsisType | None = _USE_DEFAULT
    ) -> list[MetricInfo]:
        """The quality metrics the server offers (for :meth:`evaluate` and ``quality=``)."""
        self._check_open()
        try:
            response = self._stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return parse_metrics(response)

    def evaluate(
        self,
        images: Iterable[ImageInput] | ImageInput,
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        metrics: Sequence[str] | None = None,
        targets: Sequence[int | None] | None = None,
        layer: str | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: EvaluateProgress | None = None,
        **options: Any,
    ) -> RemoteEvaluation:
        """Quality metrics of ``method``'s explanations of ``images`` (the Evaluate RPC).

        Args:
            images: images as :meth:`explain` takes them (one, or an iterable), at most the
                server's ``max_evaluate_inputs``.
            metrics: names from :meth:`list_metrics` (default: every metric the method
                supports).
            targets: one class (or None: the top-1) per image.
            progress: called with ``(fraction done, stage)`` as the server reports progress.
            layer, request_id, timeout, **options: as for :meth:`explain` (``seed`` defaults
                to 0 here, so that re-runs of randomised methods compare like with like).

        Raises:
            InvalidInput: a bad argument, before any call.
            RemoteError: the call failed (e.g. RemoteInvalidInput for a metric the method
                cannot support, RemoteResourceExhausted beyond the server's limits).
        """
        self._check_open()
        _check_evaluate_progress(progress)
        request = build_evaluate_request(
            images, model=model, method=method, metrics=metrics, targets=targets, layer=layer,
            request_id=request_id, options=options,
        )  # fmt: skip
        return self._streamed_call(
            "Evaluate", request, lambda r: parse_evaluation(r, model, method), progress, timeout
        )

    def tcav(
        self,
        inputs: Iterable[ImageInput] | ImageInput,
        *,
        target: int,
        concepts: Sequence[ConceptSpec],
        model: str = DEFAULT_MODEL,
        layer: str | None = None,
        runs: int | None = None,
        random_size: int | None = None,
        concept_size: int | None = None,
        alpha: float | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ConceptProgress | None = None,
    ) -> RemoteTCAV:
        """TCAV (the Tcav RPC): how much class ``target`` of ``model`` depends on each of
        ``concepts`` at ``layer``, with a t-test against random concepts.

        Args:
            inputs: images of the target class, as :meth:`explain` takes them (encoded bytes
                or paths are resized and centre-cropped by the model's transform on the
                server; a preprocessed tensor is taken as it is).
            target: the class whose logit is differentiated.
            concepts: names the server knows (its procedural library, e.g. ``"red"``,
                ``"stripes_0_wide"``) and ``(name, images)`` pairs of the caller's own
                (see :data:`ConceptImages`); names must be distinct.
            layer: a layer of :meth:`list_models` (default: the model's CAM layer).
            runs: CAVs per concept, each against its own random set (server default 10, >= 2).
            random_size, concept_size: images per generated random set / per library concept
                (server default 32 each).
            alpha: the t-test's significance level (default 0.05).
            seed: seeds the random sets, the library concepts and the held-out splits
                (default 0).
            progress: called with ``(fraction done, stage)`` as the server reports progress.
            request_id, timeout: as for :meth:`explain`.

        Raises:
            InvalidInput: a bad argument (or an unreadable image), before any call.
            RemoteError: the call failed (RemoteNotFound for an unknown model, layer or
                concept; RemoteResourceExhausted beyond the server's concept limits).
        """
        self._check_open()
        _check_evaluate_progress(progress)
        request = build_tcav_request(
            inputs, model=model, layer=layer, target=target, concepts=concepts, runs=runs,
            random_size=random_size, concept_size=concept_size, alpha=alpha, seed=seed,
            request_id=request_id,
        )  # fmt: skip
        return self._streamed_call(
            "Tcav", request, lambda r: parse_tcav(r, model), progress, timeout
        )

    def dissect(
        self,
        *,
        model: str = DEFAULT_MODEL,
        layer: str | None = None,
        dataset: str = "",
        per_concept: int | None = None,
        quantile: float | None = None,
        min_iou: float | None = None,
        top: int | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ConceptProgress | None = None,
    ) -> RemoteDissection:
        """Network Dissection (the Dissect RPC): which concept each unit of ``layer`` detects.

        Args:
            layer: default: the model's CAM layer.
            dataset: the probe images: ``""`` or ``"procedural"`` (the bundled procedural
                set) or a dataset the server's config declares.
            per_concept: procedural set: images per concept (server default 16).
            quantile: each unit's top activation quantile, its threshold (default 0.005).
            min_iou: a unit whose best IoU is above this is a detector (default 0.04).
            top: units returned, best IoU first (default: all); the summary covers all.
            seed: the procedural set's seed (default 0).
            progress, request_id, timeout: as for :meth:`tcav`.

        Raises:
            InvalidInput: a bad argument, before any call.
            RemoteError: the call failed.
        """
        self._check_open()
        _check_evaluate_progress(progress)
        request = build_dissect_request(
            model=model, layer=layer, dataset=dataset, per_concept=per_concept,
            quantile=quantile, min_iou=min_iou, top=top, seed=seed, request_id=request_id,
        )  # fmt: skip
        return self._streamed_call(
            "Dissect", request, lambda r: parse_dissection(r, model), progress, timeout
        )

    def visualize(
        self,
        objectives: Sequence[str] | str,
        *,
        model: str = DEFAULT_MODEL,
        steps: int | None = None,
        size: int | None = None,
        lr: float | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ConceptProgress | None = None,
    ) -> RemoteVisualization:
        """Feature visualisation (the Visualize RPC): an image per objective that maximises it.

        Args:
            objectives: ``"channel:<layer>:<c>"``, ``"unit:<layer>:<c>[:<y>:<x>]"`` or
                ``"logit:<k>"`` (one string, or several: optimised as one batch).
            steps: Adam steps (server default 256); size: image side in pixels (128);
                lr: learning rate (0.05); seed: default 0.
            progress, request_id, timeout: as for :meth:`tcav`.

        Raises:
            InvalidInput: a bad argument (e.g. an objective that does not parse), before any
                call.
            RemoteError: the call failed (RemoteNotFound for an unknown layer).
        """
        self._check_open()
        _check_evaluate_progress(progress)
        request = build_visualize_request(
            objectives, model=model, steps=steps, size=size, lr=lr, seed=seed,
            request_id=request_id,
        )  # fmt: skip
        return self._streamed_call(
            "Visualize", request, lambda r: parse_visualization(r, model), progress, timeout
        )

    def _streamed_call(
        self,
        rpc: str,
        request: Any,
        parse: Callable[[Any], Any],
        progress: ConceptProgress | None,
        timeout: float | EllipsisType | None,
    ) -> Any:
        """Call the server-streaming ``rpc`` (Evaluate and the concept RPCs): report progress
        messages, return the parsed final one (``done`` set)."""
        call = getattr(self._stub, rpc)(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        try:
            for response in call:
                if response.done:
                    return parse(response)
                if progress is not None:
                    progress(float(response.fraction), response.stage)
        except grpc.RpcError as err:
            raise error_from_rpc(err, request.request_id) from err
        finally:
            call.cancel()
        raise _no_result(rpc, request.request_id)

    def close(self) -> None:
        """Close the channel (idempotent); later calls raise Unavailable."""
        if not self._closed:
            self._closed = True
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient(_ClientBase):
    """Asyncio client of an xai_serve server (``grpc.aio``); the API of :class:`Client`.

    The channel is opened on first use, on the running event loop, so the client may be
    constructed outside it. Use ``async with AsyncClient(...) as client`` or ``await close()``.
    """

    def _open_channel(self) -> None:  # opened on first use, on the running loop
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.ExplainerStub | None = None

    def _get_stub(self) -> pb_grpc.ExplainerStub:
        self._check_open()
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(
                    self.target, options=self._channel_options
                )
            else:
                self._channel = grpc.aio.secure_channel(
                    self.target, self._credentials, options=self._channel_options
                )
            self._stub = pb_grpc.ExplainerStub(self._channel)
        return self._stub

    async def explain(
        self,
        image: ImageInput,
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        layer: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        map: bool = True,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ProgressCallback | None = None,
        quality: Sequence[str] | None = None,
        **options: Any,
    ) -> RemoteExplanation:
        """Explain one image; see :meth:`Client.explain`. ``progress`` may be a plain
        function or a coroutine function (awaited before the next answer is read)."""
        stub = self._get_stub()
        _check_progress(progress)
        request = self._one_request(
            image, model=model, method=method, target=target, targets=targets,
            top_labels=top_labels, foil=foil, layer=layer, top_k=top_k,
            overlay=overlay, want_map=map, request_id=request_id, options=options,
            progress=progress is not None, quality=quality,
        )  # fmt: skip
        if progress is not None:
            final = None
            answers = self._run_progressive(request, self._deadline(timeout))
            async with contextlib.aclosing(answers):  # a raising callback cancels the call
                async for result in answers:
                    if result.partial:
                        returned = progress(result)
                        if inspect.isawaitable(returned):
                            await returned
                    else:
                        final = result
            assert final is not None  # _run_progressive raises without one
            return final
        try:
            response = await stub.Explain(
                request, timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err, request.request_id) from err
        return _unary_result(response)

    def explain_progressive(
        self,
        image: ImageInput,
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        layer: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        map: bool = True,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        **options: Any,
    ) -> AsyncIterator[RemoteExplanation]:
        """Partial answers, then the final one; see :meth:`Client.explain_progressive`.

        Not a coroutine: it checks the arguments at once and returns an async iterator, so
        ``async for exp in client.explain_progressive(image, method="lime"): ...``.
        """
        self._check_open()
        request = self._one_request(
            image, model=model, method=method, target=target, targets=targets,
            top_labels=top_labels, foil=foil, layer=layer, top_k=top_k,
            overlay=overlay, want_map=map, request_id=request_id, options=options,
            progress=True,
        )  # fmt: skip
        return self._run_progressive(request, self._deadline(timeout))

    async def _run_progressive(
        self, request: pb.ExplainRequest, timeout: float | None
    ) -> AsyncIterator[RemoteExplanation]:
        stub = self._get_stub()
        call = stub.ExplainStream(iter((request,)), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                result = _progressive_result(response, request.request_id)
                yield result
                if not result.partial:
                    return
        except grpc.RpcError as err:
            raise error_from_rpc(err, request.request_id) from err
        finally:
            call.cancel()
        raise _no_final_answer(request.request_id)

    def explain_many(
        self,
        images: Iterable[ImageInput] | AsyncIterable[ImageInput],
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        image_targets: Sequence[ImageTarget] | None = None,
        layer: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        map: bool = True,
        request_ids: Sequence[str] | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: bool = False,
        quality: Sequence[str] | None = None,
        **options: Any,
    ) -> AsyncIterator[RemoteExplanation | RemoteError]:
        """Explain many images on one stream; see :meth:`Client.explain_many`.

        Not a coroutine: it checks the arguments at once and returns an async iterator, so
        ``async for item in client.explain_many(images): ...``. ``images`` may also be an
        async iterable.
        """
        self._check_open()
        stream = self._many_requests(
            images, model=model, method=method, target=target, targets=targets,
            top_labels=top_labels, foil=foil, image_targets=image_targets, layer=layer,
            top_k=top_k, overlay=overlay, want_map=map, request_ids=request_ids,
            options=options, progress=progress, quality=quality,
        )  # fmt: skip
        return self._run_stream(stream, self._deadline(timeout))

    async def _run_stream(
        self, stream: _Stream, timeout: float | None
    ) -> AsyncIterator[RemoteExplanation | RemoteError]:
        stub = self._get_stub()
        call = stub.ExplainStream(stream.arequests(), timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                for failure in stream.local_failures():
                    yield failure
                yield stream.answer(response)
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        finally:
            call.cancel()
        for item in stream.finish():
            yield item

    async def list_models(
        self, *, timeout: float | EllipsisType | None = _USE_DEFAULT
    ) -> list[ModelInfo]:
        """The models the server holds."""
        stub = self._get_stub()
        try:
            response = await stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return parse_models(response)

    async def list_metrics(
        self, *, timeout: float | EllipsisType | None = _USE_DEFAULT
    ) -> list[MetricInfo]:
        """The quality metrics the server offers; see :meth:`Client.list_metrics`."""
        stub = self._get_stub()
        try:
            response = await stub.ListModels(
                pb.ListModelsRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise error_from_rpc(err) from err
        return parse_metrics(response)

    async def evaluate(
        self,
        images: Iterable[ImageInput] | ImageInput,
        *,
        model: str = DEFAULT_MODEL,
        method: str = DEFAULT_METHOD,
        metrics: Sequence[str] | None = None,
        targets: Sequence[int | None] | None = None,
        layer: str | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: EvaluateProgress | None = None,
        **options: Any,
    ) -> RemoteEvaluation:
        """Quality metrics over images; see :meth:`Client.evaluate`. ``progress`` may be a
        plain function or a coroutine function."""
        self._get_stub()  # a closed client raises here, before the request is built
        _check_evaluate_progress(progress)
        request = build_evaluate_request(
            images, model=model, method=method, metrics=metrics, targets=targets, layer=layer,
            request_id=request_id, options=options,
        )  # fmt: skip
        return await self._streamed_call(
            "Evaluate", request, lambda r: parse_evaluation(r, model, method), progress, timeout
        )

    async def tcav(
        self,
        inputs: Iterable[ImageInput] | ImageInput,
        *,
        target: int,
        concepts: Sequence[ConceptSpec],
        model: str = DEFAULT_MODEL,
        layer: str | None = None,
        runs: int | None = None,
        random_size: int | None = None,
        concept_size: int | None = None,
        alpha: float | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ConceptProgress | None = None,
    ) -> RemoteTCAV:
        """TCAV; see :meth:`Client.tcav`. ``progress`` may be a coroutine function."""
        self._get_stub()
        _check_evaluate_progress(progress)
        request = build_tcav_request(
            inputs, model=model, layer=layer, target=target, concepts=concepts, runs=runs,
            random_size=random_size, concept_size=concept_size, alpha=alpha, seed=seed,
            request_id=request_id,
        )  # fmt: skip
        return await self._streamed_call(
            "Tcav", request, lambda r: parse_tcav(r, model), progress, timeout
        )

    async def dissect(
        self,
        *,
        model: str = DEFAULT_MODEL,
        layer: str | None = None,
        dataset: str = "",
        per_concept: int | None = None,
        quantile: float | None = None,
        min_iou: float | None = None,
        top: int | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ConceptProgress | None = None,
    ) -> RemoteDissection:
        """Network Dissection; see :meth:`Client.dissect`."""
        self._get_stub()
        _check_evaluate_progress(progress)
        request = build_dissect_request(
            model=model, layer=layer, dataset=dataset, per_concept=per_concept,
            quantile=quantile, min_iou=min_iou, top=top, seed=seed, request_id=request_id,
        )  # fmt: skip
        return await self._streamed_call(
            "Dissect", request, lambda r: parse_dissection(r, model), progress, timeout
        )

    async def visualize(
        self,
        objectives: Sequence[str] | str,
        *,
        model: str = DEFAULT_MODEL,
        steps: int | None = None,
        size: int | None = None,
        lr: float | None = None,
        seed: int | None = None,
        request_id: str | None = None,
        timeout: float | EllipsisType | None = _USE_DEFAULT,
        progress: ConceptProgress | None = None,
    ) -> RemoteVisualization:
        """Feature visualisation; see :meth:`Client.visualize`."""
        self._get_stub()
        _check_evaluate_progress(progress)
        request = build_visualize_request(
            objectives, model=model, steps=steps, size=size, lr=lr, seed=seed,
            request_id=request_id,
        )  # fmt: skip
        return await self._streamed_call(
            "Visualize", request, lambda r: parse_visualization(r, model), progress, timeout
        )

    async def _streamed_call(
        self,
        rpc: str,
        request: Any,
        parse: Callable[[Any], Any],
        progress: ConceptProgress | None,
        timeout: float | EllipsisType | None,
    ) -> Any:
        """Call the server-streaming ``rpc``; see :meth:`Client._streamed_call`."""
        call = getattr(self._get_stub(), rpc)(
            request, timeout=self._deadline(timeout), metadata=self._metadata
        )
        try:
            async for response in call:
                if response.done:
                    return parse(response)
                if progress is not None:
                    returned = progress(float(response.fraction), response.stage)
                    if inspect.isawaitable(returned):
                        await returned
        except grpc.RpcError as err:
            raise error_from_rpc(err, request.request_id) from err
        finally:
            call.cancel()
        raise _no_result(rpc, request.request_id)

    async def close(self) -> None:
        """Close the channel (idempotent); later calls raise Unavailable."""
        if not self._closed:
            self._closed = True
            if self._channel is not None:
                await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
