"""Requests in domain terms, shared by both servicers (``Explainer`` and the Open Inference
Protocol's ``ModelInfer``): the checks of a request's fields against the model and the server's
limits, the options read through the one option schema, the job the batcher computes, and the
deadline arithmetic. Every error names its field.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import grpc
import torch
from torch import Tensor

from xai_serve.errors import InvalidInput, NotFound, ResourceExhausted
from xai_serve.explainers.base import (
    ARGUMENT_OPTIONS,
    OPTION_SCHEMA,
    Explainer,
    get_method,
    positive_int,
)
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.serving.engine import ExplainJob
from xai_serve.serving.state import ServerState

__all__ = [
    "DEFAULT_TOP_K",
    "MAX_REQUEST_ID",
    "MAX_SEGMENTS",
    "build_job",
    "call_deadline",
    "check_tensor_input",
    "gather_or_cancel",
    "parse_options",
    "shorten_deadline",
]

T = TypeVar("T")

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
    for name in ("samples", "baselines"):
        value = parsed.get(name)
        if value is not None and value > limits.max_samples:
            raise ResourceExhausted(
                f"options.{name}={value} exceeds this server's max_samples ({limits.max_samples})"
            )
    steps = parsed.get("steps")
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
    targets: Sequence[int] = (),
    top_labels: int | None = None,
    foil: int | None = None,
) -> ExplainJob:
    """Validate the request's fields against ``model`` and the limits; build the job."""
    if len(request_id.encode()) > MAX_REQUEST_ID:
        raise InvalidInput(f"request_id must be at most {MAX_REQUEST_ID} bytes (UTF-8)")
    if not method:
        raise InvalidInput(
            f"`method` is required; model {model.name!r} supports: " + ", ".join(model.methods)
        )
    if method not in model.methods:
        raise model.not_offered(method)
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
    elif cls.uses_layer and cls.takes_default_layer:
        layer = model.default_layer or ""
    for value, what in ((target, "target"), *((t, "targets") for t in targets), (foil, "foil")):
        if value is not None and not 0 <= value < model.num_classes:
            raise InvalidInput(
                f"{what} {value} is out of range: model {model.name!r} has "
                f"{model.num_classes} classes [0, {model.num_classes})"
            )
    _check_classes(state, model, cls, target, tuple(targets), top_labels, foil)
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
        targets=tuple(int(t) for t in targets) or None,
        top_labels=top_labels,
        foil=foil,
    )


def _check_classes(
    state: ServerState,
    model: LoadedModel,
    cls: type[Explainer],
    target: int | None,
    targets: tuple[int, ...],
    top_labels: int | None,
    foil: int | None,
) -> None:
    """Several classes (``targets``, ``top_labels``) and a ``foil``: one way at a time, within
    the server's ``max_targets``, for a method whose map depends on the class."""
    given = [n for n, v in (("target", target), ("targets", targets), ("top_labels", top_labels))
             if v not in (None, ())]  # fmt: skip
    if len(given) > 1:
        raise InvalidInput(f"give one of `target`, `targets` and `top_labels`, not {given}")
    if (targets or top_labels is not None or foil is not None) and not cls.uses_target:
        raise InvalidInput(
            f"method {cls.name!r} does not depend on the class explained: `targets`, "
            "`top_labels` and `foil` do not apply to it"
        )
    cap = state.limits.max_targets
    if len(targets) > cap:
        raise InvalidInput(f"targets has {len(targets)} classes; this server takes at most {cap}")
    if len(set(targets)) != len(targets):
        raise InvalidInput(f"targets names a class twice: {list(targets)}")
    if top_labels is not None and not 1 <= top_labels <= min(cap, model.num_classes):
        raise InvalidInput(
            f"top_labels must lie in [1, {min(cap, model.num_classes)}] (this server's "
            f"max_targets, and model {model.name!r}'s classes), got {top_labels}"
        )
    if foil is not None and (foil == target or foil in targets):
        raise InvalidInput(
            f"foil {foil} is also a class to explain: a foil must differ from the targets "
            "(each map explains target minus foil)"
        )


def call_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def shorten_deadline(deadline: float | None, seconds: float) -> float:
    """The earlier of ``deadline`` and ``seconds`` from now (a request's own timeout)."""
    mine = time.monotonic() + seconds
    return mine if deadline is None else min(deadline, mine)


async def gather_or_cancel(coros: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all of ``coros`` (one request's jobs, e.g. the images of one ModelInfer); the first
    failure cancels the others, so that their queue slots and compute are released, and is
    raised."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        # let the cancelled ones take their jobs out of the queue
        await asyncio.gather(*tasks, return_exceptions=True)
