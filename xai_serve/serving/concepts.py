"""Concept-level explanations on the server: the work of the ``Tcav``, ``Dissect`` and
``Visualize`` RPCs (the methods themselves are :mod:`xai_serve.concepts`').

How concept jobs share the device with the pixel-map requests
----------------------------------------------------------------

The library's concept methods are single long calls that add hooks to the model for their whole
duration, so they cannot be cut into short tasks on the model's device worker the way Evaluate
is. Instead each job runs on its own **copy of the model** (``copy.deepcopy`` of the module,
eval mode, parameters without grad), made once on the model's device worker (between two
batches, so no explanation's hooks are copied) and kept for later jobs: a copy serves one job
at a time, so a model has at most ``[concepts] max_jobs`` copies. The job runs in a **concept
worker thread** (``ServerState.concept_pool``, ``max_jobs`` threads), never on the device
worker: the explanation batches keep their thread and are never queued behind concept work;
on one device the two share its compute (on the CPU the concept workers get fewer intra-op
threads, ``[concepts] threads``, so that a batch still finds cores; on a GPU their kernels
interleave on the device's stream).

At most ``max_jobs`` jobs run at once per server; a further one waits in line (its progress
says stage ``"queued"``, fraction 0) if fewer than ``max_waiting`` are waiting already, else
it is refused with RESOURCE_EXHAUSTED.

Cancellation and deadlines: when the call ends early (the client cancels, the deadline passes,
the server stops), the job's ``cancelled`` flag is set; a forward pre-hook on the copy and the
library's progress callback check it (and the deadline) before every batch / step and raise,
so the job stops at its next batch and its worker is free again.

Images: the library takes RGB images in ``[0, 1]`` and a ``transform`` that maps a batch of
them to the model's input. The server gives it the model's own normalisation (and luma for a
grayscale model, and a resize to the model's input size where a square concept image differs
from it); bundled concept sets and the procedural probe set are generated at the model's input
size; images a request sends are decoded, resized (concept images) or resized and cropped like
the model's transform (TCAV inputs) but not normalised; preprocessed tensor inputs are
un-normalised (``x * std + mean``).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from xai_serve.concepts.dissection import DEFAULT_MIN_IOU, DEFAULT_QUANTILE, dissect
from xai_serve.concepts.library import (
    ConceptSet,
    ProbeDataset,
    concept_from_images,
    concept_names,
    load_probe_folder,
    probe_dataset,
    procedural,
)
from xai_serve.concepts.tcav import tcav
from xai_serve.concepts.visualize import ClassLogit, Objective, parse_objective, visualize
from xai_serve.errors import (
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    XaiServeError,
)
from xai_serve.imaging import decode_image, encode_png
from xai_serve.models import LoadedModel, rgb_normaliser
from xai_serve.models.registry import preprocess_image
from xai_serve.serving.config import PROCEDURAL_DATASET_NAMES
from xai_serve.serving.engine import DeadlineExceeded
from xai_serve.serving.jobs import MAX_REQUEST_ID, check_tensor_input
from xai_serve.serving.quality import Cancelled
from xai_serve.serving.state import ServerState

__all__ = [
    "ConceptRunner",
    "DissectOutcome",
    "DissectWork",
    "Progress",
    "TcavOutcome",
    "TcavWork",
    "VisualizeOutcome",
    "VisualizeWork",
    "model_transform",
    "unnormalise",
]

# Defaults of the request fields (as the proto documents them).
DEFAULT_RUNS = 10
DEFAULT_RANDOM_SIZE = 32
DEFAULT_CONCEPT_SIZE = 32
DEFAULT_ALPHA = 0.05
DEFAULT_PER_CONCEPT = 16
DEFAULT_STEPS = 256
DEFAULT_SIZE = 128
DEFAULT_LR = 0.05


ImageInput = bytes | Tensor
"""A TCAV input as the request sent it: encoded image bytes, or a preprocessed tensor."""


@dataclass(frozen=True)
class Progress:
    """A progress message: ``fraction`` of the job done, in [0, 1], and the current stage."""

    fraction: float
    stage: str


# --------------------------------------------------------------------------------------------
# Work: one validated request each
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ConceptWork:
    """What every concept job has: the request id, the model, the deadline (a
    ``time.monotonic()`` instant or None) and the flag that stops the job."""

    request_id: str
    model: LoadedModel
    deadline: float | None = None
    cancelled: bool = False

    def check(self) -> None:
        """Raise if the job must stop: its call ended or its deadline passed."""
        if self.cancelled:
            raise Cancelled(f"request {self.request_id!r} was cancelled")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise DeadlineExceeded(f"request {self.request_id!r}: the deadline passed")

    def compute(self, module: nn.Module, report: Callable[[float, str], None]) -> Any:
        raise NotImplementedError


@dataclass(kw_only=True)
class TcavWork(ConceptWork):
    """A TCAV request: ``inputs`` ``[B, 3, H, W]`` RGB in [0, 1] (not normalised);
    ``concepts``: one set per requested concept, each ``ConceptSet`` ready (sent or configured
    images, on the CPU) or a bundled name to generate."""

    layer: str
    target: int
    inputs: Tensor
    concepts: list[ConceptSet | str]
    runs: int = DEFAULT_RUNS
    random_size: int = DEFAULT_RANDOM_SIZE
    concept_size: int = DEFAULT_CONCEPT_SIZE
    alpha: float = DEFAULT_ALPHA
    seed: int = 0

    def compute(self, module: nn.Module, report: Callable[[float, str], None]) -> TcavOutcome:
        model = self.model
        report(0.0, "concepts")
        sets = [
            ConceptSet(c.name, c.category, c.images.to(model.device))
            if isinstance(c, ConceptSet)
            else procedural(
                c, self.concept_size, size=_side(model), seed=self.seed, device=model.device
            )
            for c in self.concepts
        ]
        result = tcav(
            module,
            self.inputs.to(model.device),
            sets,
            self.target,
            self.layer,
            random_sets=self.random_size,
            runs=self.runs,
            transform=model_transform(model),
            batch_size=_batch(model),
            seed=self.seed,
            alpha=self.alpha,
            progress=report,
        )
        return TcavOutcome(
            layer=result.layer,
            target=self.target,
            alpha=result.alpha,
            concepts=[
                TcavConceptOutcome(
                    concept=c.concept,
                    scores=c.scores.tolist(),
                    mean=c.mean,
                    std=c.std,
                    p_value=c.p_value,
                    significant=c.significant,
                    cav_accuracies=c.accuracies.tolist(),
                )
                for c in result.concepts
            ],
            random_scores=result.random_scores.tolist(),
        )


@dataclass(kw_only=True)
class DissectWork(ConceptWork):
    """A dissection request: ``dataset`` is a configured probe set (loaded, on the CPU) or None
    for the procedural one (``per_concept`` images per concept, drawn with ``seed``)."""

    layer: str
    dataset: ProbeDataset | None
    max_units: int
    per_concept: int = DEFAULT_PER_CONCEPT
    quantile: float = DEFAULT_QUANTILE
    min_iou: float = DEFAULT_MIN_IOU
    top: int | None = None
    seed: int = 0

    def compute(self, module: nn.Module, report: Callable[[float, str], None]) -> DissectOutcome:
        model = self.model
        transform = model_transform(model)
        dataset = self.dataset
        report(0.0, "dataset")
        if dataset is None:
            dataset = probe_dataset(
                per_concept=self.per_concept, size=_side(model), seed=self.seed, device=model.device
            )
        units = layer_units(module, self.layer, transform(dataset.images[:1].to(model.device)))
        if units > self.max_units:
            raise ResourceExhausted(
                f"layer {self.layer!r} has {units} units, more than this server's "
                f"concepts.max_units ({self.max_units})"
            )
        result = dissect(
            module,
            self.layer,
            dataset,
            quantile=self.quantile,
            transform=transform,
            batch_size=_batch(model),
            min_iou=self.min_iou,
            progress=report,
        )
        thresholds = result.threshold.tolist()
        return DissectOutcome(
            layer=result.layer,
            total_units=result.units,
            units=[
                DissectUnitOutcome(r.unit, r.concept, r.category, r.iou, thresholds[r.unit])
                for r in result.table(self.top)
            ],
            summary=[(s.category, s.units, dict(s.concepts)) for s in result.summary().values()],
            min_iou=result.min_iou,
        )


@dataclass(kw_only=True)
class VisualizeWork(ConceptWork):
    """A feature visualisation request: ``objectives`` as sent and as parsed."""

    texts: list[str]
    objectives: list[Objective]
    steps: int = DEFAULT_STEPS
    size: int = DEFAULT_SIZE
    lr: float = DEFAULT_LR
    seed: int = 0

    def compute(self, module: nn.Module, report: Callable[[float, str], None]) -> VisualizeOutcome:
        model = self.model
        try:
            vis = visualize(
                module,
                self.objectives,
                steps=self.steps,
                size=self.size,
                lr=self.lr,
                seed=self.seed,
                transform=model_transform(model, resize=False),
                progress=lambda step, steps: report(step / steps, "optimise"),
            )
        except XaiServeError:
            raise
        except RuntimeError as exc:
            if self.size in model.input_shape[1:] or isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            # the model takes only its own input size (a fixed-size head, a ViT's patches)
            raise InvalidInput(
                f"size={self.size}: model {model.name!r} does not run on {self.size}x"
                f"{self.size} images ({type(exc).__name__}); its input is "
                f"{model.input_shape[1]}x{model.input_shape[2]}"
            ) from None
        pixels = vis.images.detach().float().mul(255.0).round_().clamp_(0.0, 255.0)
        pixels = pixels.to(torch.uint8).cpu()
        traces, values = vis.trace.tolist(), vis.values.tolist()
        return VisualizeOutcome(
            [
                VisualizedImage(text, encode_png(pixels[i]), traces[i], values[i])
                for i, text in enumerate(self.texts)
            ]
        )


# --------------------------------------------------------------------------------------------
# Outcomes: the results in plain Python values (the servicer turns them into messages)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TcavConceptOutcome:
    concept: str
    scores: list[float]
    mean: float
    std: float
    p_value: float
    significant: bool
    cav_accuracies: list[float]


@dataclass(frozen=True)
class TcavOutcome:
    layer: str
    target: int
    alpha: float
    concepts: list[TcavConceptOutcome]
    random_scores: list[float]


@dataclass(frozen=True)
class DissectUnitOutcome:
    unit: int
    concept: str
    category: str
    iou: float
    threshold: float


@dataclass(frozen=True)
class DissectOutcome:
    """``units``: best IoU first (``top`` of them); ``summary``: per category ``(category,
    detectors, {concept: detectors})``."""

    layer: str
    total_units: int
    units: list[DissectUnitOutcome]
    summary: list[tuple[str, int, dict[str, int]]]
    min_iou: float


@dataclass(frozen=True)
class VisualizedImage:
    objective: str
    png: bytes
    trace: list[float]
    value: float


@dataclass(frozen=True)
class VisualizeOutcome:
    images: list[VisualizedImage]


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def model_transform(model: LoadedModel, *, resize: bool = True) -> Callable[[Tensor], Tensor]:
    """The map from a batch of RGB images in [0, 1] to ``model``'s input (its
    :func:`~xai_serve.models.rgb_normaliser`): with ``resize``, images of another size are
    resized to its input size first."""
    return rgb_normaliser(model.config.transform, model.input_shape[1:] if resize else None)


def unnormalise(x: Tensor, model: LoadedModel) -> Tensor:
    """A preprocessed input ``[C, H, W]`` back in the space of the [0, 1] images:
    ``x * std + mean`` (a one-channel input of a grayscale model repeated to RGB, whose luma is
    the channel again)."""
    t = model.config.transform
    mean = torch.tensor(t.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(t.std, dtype=x.dtype).view(-1, 1, 1)
    x = x * std + mean
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def _side(model: LoadedModel) -> int:
    """The side of the square concept and probe images made for ``model``."""
    return max(model.input_shape[1:])


def _batch(model: LoadedModel) -> int:
    """Images per forward of a concept job: the model's batch size (a job's batch is also the
    granularity at which it can be cancelled)."""
    return max(1, model.max_batch_size)


def _input_image(data: bytes, model: LoadedModel, max_pixels: int, field: str) -> Tensor:
    """An encoded TCAV input as the model's transform resizes and crops it, in [0, 1]."""
    rgb = decode_image(data, max_pixels=max_pixels, field=field)
    plain = dataclasses.replace(model.config.transform, mean=(0.0,), std=(1.0,), grayscale=False)
    try:
        x, _ = preprocess_image(rgb, plain, model.input_shape[1:])
    except InvalidInput as exc:
        raise InvalidInput(f"{field}: {exc}") from None
    return x


def _concept_image(data: bytes, side: int, max_pixels: int, field: str) -> Tensor:
    """An encoded concept image as ``[3, side, side]`` in [0, 1] (bilinear, antialiased)."""
    rgb = decode_image(data, max_pixels=max_pixels, field=field)
    return concept_from_images("sent", rgb[None], size=side).images[0]


def layer_units(module: nn.Module, layer: str, x: Tensor) -> int:
    """The number of channels of ``layer``'s output for the input batch ``x`` (a forward that
    stops at the layer)."""
    target = dict(module.named_modules())[layer]
    seen: list[int] = []

    class _Seen(Exception):
        pass

    def hook(_m: nn.Module, _args: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() >= 2:
            seen.append(int(output.shape[1]))
        raise _Seen

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            module(x)
    except _Seen:
        pass
    finally:
        handle.remove()
    if not seen:
        raise InvalidInput(f"layer {layer!r} does not output a [B, C, h, w] tensor")
    return seen[0]


# --------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------


def _request_id(request_id: str) -> str:
    if len(request_id.encode()) > MAX_REQUEST_ID:
        raise InvalidInput(f"request_id must be at most {MAX_REQUEST_ID} bytes (UTF-8)")
    return request_id


def _layer(model: LoadedModel, layer: str) -> str:
    """``layer`` (default: the model's CAM layer) checked against the model's layers."""
    if not model.layers:
        raise InvalidInput(
            f"model {model.name!r} has no layers that can be hooked (a TorchScript or exported "
            "model): concept methods need one"
        )
    if not layer:
        return model.default_layer or model.layers[-1]
    if layer not in model.layers:
        hint = ", ".join(model.layers[-5:])
        raise NotFound(
            f"unknown layer {layer!r} for model {model.name!r} "
            f"(its last layers: {hint}; ListModels lists all)"
        )
    return layer


def _count(value: int | None, default: int, name: str, minimum: int = 1) -> int:
    if value is None:
        return default
    if value < minimum:
        raise InvalidInput(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _seed(value: int | None) -> int:
    if value is None:
        return 0
    if value < 0:
        raise InvalidInput(f"seed must be >= 0, got {value}")
    return int(value)


def _open_unit(value: float | None, default: float, name: str, *, closed_low: bool) -> float:
    """``value`` in (0, 1) (or [0, 1) with ``closed_low``), default when unset."""
    if value is None:
        return default
    low_ok = value >= 0.0 if closed_low else value > 0.0
    if not (math.isfinite(value) and low_ok and value < 1.0):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise InvalidInput(f"{name} must lie in {interval}, got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------
# The runner
# --------------------------------------------------------------------------------------------


class ConceptRunner:
    """Validates concept requests into work and runs it (see the module doc): admission
    (``max_jobs`` running, ``max_waiting`` waiting), the model copies, the configured concept
    sets and probe datasets (loaded once, kept), progress and cancellation."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._slots: asyncio.Semaphore | None = None
        self._waiting = 0
        self._copies: dict[str, list[tuple[nn.Module, int]]] = {}  # with their hook counts
        self._sets: dict[tuple[str, int], ConceptSet] = {}
        self._datasets: dict[tuple[str, int], ProbeDataset] = {}

    # ---------------------------------------------------------------- requests -> work

    async def tcav_work(
        self,
        *,
        request_id: str,
        model: str,
        layer: str,
        target: int,
        concepts: Sequence[tuple[str, Sequence[bytes]]],
        inputs: Sequence[ImageInput],
        runs: int | None = None,
        random_size: int | None = None,
        concept_size: int | None = None,
        alpha: float | None = None,
        seed: int | None = None,
        deadline: float | None = None,
    ) -> TcavWork:
        """A validated TCAV request (every error names its field); images decoded off the
        event loop, configured sets loaded (once)."""
        state, config = self.state, self.state.concepts
        _request_id(request_id)
        loaded = state.model(model)
        layer = _layer(loaded, layer)
        if not 0 <= target < loaded.num_classes:
            raise InvalidInput(
                f"target {target} is out of range: model {loaded.name!r} has "
                f"{loaded.num_classes} classes [0, {loaded.num_classes})"
            )
        runs = _count(runs, DEFAULT_RUNS, "runs", minimum=2)
        random_size = _count(random_size, DEFAULT_RANDOM_SIZE, "random_size", minimum=2)
        concept_size = _count(concept_size, DEFAULT_CONCEPT_SIZE, "concept_size", minimum=2)
        alpha = _open_unit(alpha, DEFAULT_ALPHA, "alpha", closed_low=False)
        seed_value = _seed(seed)
        if not inputs:
            raise InvalidInput("`inputs` is empty: send at least one image of the target class")
        if not concepts:
            raise InvalidInput("`concepts` is empty: name or send at least one concept set")
        bundled = set(concept_names())
        kinds: list[str] = []
        seen: set[str] = set()
        for i, (name, images) in enumerate(concepts):
            if not name:
                raise InvalidInput(f"concepts[{i}].name is required")
            if name in seen:
                raise InvalidInput(f"concepts[{i}]: the concept {name!r} is named twice")
            seen.add(name)
            if name.startswith("random_"):
                raise InvalidInput(
                    f"concepts[{i}]: names starting with 'random_' are TCAV's random sets"
                )
            if images:
                if len(images) < 2:
                    raise InvalidInput(
                        f"concepts[{i}] ({name!r}) has 1 image; a concept needs at least 2"
                    )
                kinds.append("sent")
            elif name in bundled:
                kinds.append("bundled")
            elif name in config.sets:
                kinds.append("configured")
            else:
                known = [*concept_names(), *config.sets]
                raise NotFound(
                    f"concepts[{i}]: unknown concept {name!r} (send its images, or name one of: "
                    f"{', '.join(known)})"
                )
        side = _side(loaded)
        configured = {
            name: await self._concept_set(name, side)
            for (name, _), kind in zip(concepts, kinds, strict=True)
            if kind == "configured"
        }
        total = len(inputs) + runs * random_size
        for (name, images), kind in zip(concepts, kinds, strict=True):
            total += {
                "sent": len(images),
                "bundled": concept_size,
                "configured": len(configured.get(name, ())),
            }[kind]
        if total > config.max_images:
            raise ResourceExhausted(
                f"this TCAV request needs {total} images (inputs, concept images, "
                f"runs * random_size random images), more than this server's "
                f"concepts.max_images ({config.max_images})"
            )
        max_pixels = state.limits.max_image_pixels
        sets: list[ConceptSet | str] = []
        for i, ((name, images), kind) in enumerate(zip(concepts, kinds, strict=True)):
            if kind == "sent":
                pictures = [
                    await state.off_loop(
                        _concept_image, data, side, max_pixels, f"concepts[{i}].images[{j}]"
                    )
                    for j, data in enumerate(images)
                ]
                sets.append(ConceptSet(name, "custom", torch.stack(pictures)))
            elif kind == "configured":
                sets.append(configured[name])
            else:
                sets.append(name)
        xs = []
        for i, item in enumerate(inputs):
            if isinstance(item, Tensor):
                x, _ = check_tensor_input(item, loaded, f"inputs[{i}].tensor")
                xs.append(unnormalise(x, loaded))
            else:
                xs.append(
                    await state.off_loop(
                        _input_image, item, loaded, max_pixels, f"inputs[{i}].image"
                    )
                )
        return TcavWork(
            request_id=request_id,
            model=loaded,
            deadline=deadline,
            layer=layer,
            target=int(target),
            inputs=torch.stack(xs),
            concepts=sets,
            runs=runs,
            random_size=random_size,
            concept_size=concept_size,
            alpha=alpha,
            seed=seed_value,
        )

    async def dissect_work(
        self,
        *,
        request_id: str,
        model: str,
        layer: str,
        dataset: str,
        per_concept: int | None = None,
        quantile: float | None = None,
        min_iou: float | None = None,
        top: int | None = None,
        seed: int | None = None,
        deadline: float | None = None,
    ) -> DissectWork:
        """A validated dissection request; a configured dataset is loaded (once)."""
        config = self.state.concepts
        _request_id(request_id)
        loaded = self.state.model(model)
        layer = _layer(loaded, layer)
        per_concept = _count(per_concept, DEFAULT_PER_CONCEPT, "per_concept")
        quantile = _open_unit(quantile, DEFAULT_QUANTILE, "quantile", closed_low=False)
        min_iou = _open_unit(min_iou, DEFAULT_MIN_IOU, "min_iou", closed_low=True)
        if top is not None:
            top = _count(top, 0, "top")
        seed_value = _seed(seed)
        probe: ProbeDataset | None = None
        if dataset in PROCEDURAL_DATASET_NAMES:
            images = per_concept * len(concept_names())
            if images > config.max_images:
                raise ResourceExhausted(
                    f"per_concept={per_concept} makes a procedural probe set of {images} images "
                    f"({len(concept_names())} concepts), more than this server's "
                    f"concepts.max_images ({config.max_images})"
                )
        elif dataset in config.datasets:
            probe = await self._dataset(dataset, _side(loaded))
        else:
            known = ["procedural", *config.datasets]
            raise NotFound(f"unknown dataset {dataset!r}; this server has: {', '.join(known)}")
        return DissectWork(
            request_id=request_id,
            model=loaded,
            deadline=deadline,
            layer=layer,
            dataset=probe,
            max_units=config.max_units,
            per_concept=per_concept,
            quantile=quantile,
            min_iou=min_iou,
            top=top,
            seed=seed_value,
        )

    async def visualize_work(
        self,
        *,
        request_id: str,
        model: str,
        objectives: Sequence[str],
        steps: int | None = None,
        size: int | None = None,
        lr: float | None = None,
        seed: int | None = None,
        deadline: float | None = None,
    ) -> VisualizeWork:
        """A validated feature visualisation request."""
        config = self.state.concepts
        _request_id(request_id)
        loaded = self.state.model(model)
        if not objectives:
            raise InvalidInput(
                "`objectives` is empty: name at least one, e.g. 'channel:<layer>:<c>' or "
                "'logit:<k>'"
            )
        if len(objectives) > config.max_objectives:
            raise ResourceExhausted(
                f"{len(objectives)} objectives exceed this server's concepts.max_objectives "
                f"({config.max_objectives})"
            )
        modules = {name for name, _ in loaded.module.named_modules() if name}
        parsed: list[Objective] = []
        for i, text in enumerate(objectives):
            try:
                objective = parse_objective(text)
            except InvalidInput as exc:
                raise InvalidInput(f"objectives[{i}]: {exc}") from None
            if isinstance(objective, ClassLogit):
                if not 0 <= objective.index < loaded.num_classes:
                    raise InvalidInput(
                        f"objectives[{i}]: class {objective.index} is out of range: model "
                        f"{loaded.name!r} has {loaded.num_classes} classes"
                    )
            elif objective.layer not in modules:
                hint = ", ".join(loaded.layers[-5:])
                raise NotFound(
                    f"objectives[{i}]: model {loaded.name!r} has no layer {objective.layer!r} "
                    f"(its last layers: {hint}; ListModels lists all)"
                )
            parsed.append(objective)
        steps = _count(steps, min(DEFAULT_STEPS, config.max_steps), "steps")
        if steps > config.max_steps:
            raise ResourceExhausted(
                f"steps={steps} exceeds this server's concepts.max_steps ({config.max_steps})"
            )
        size = _count(size, min(DEFAULT_SIZE, config.max_size), "size", minimum=8)
        if size > config.max_size:
            raise ResourceExhausted(
                f"size={size} exceeds this server's concepts.max_size ({config.max_size})"
            )
        if lr is None:
            lr = DEFAULT_LR
        elif not (math.isfinite(lr) and lr > 0):
            raise InvalidInput(f"lr must be a positive finite number, got {lr}")
        return VisualizeWork(
            request_id=request_id,
            model=loaded,
            deadline=deadline,
            texts=list(objectives),
            objectives=parsed,
            steps=steps,
            size=size,
            lr=float(lr),
            seed=_seed(seed),
        )

    async def _concept_set(self, name: str, side: int) -> ConceptSet:
        key = (name, side)
        if key not in self._sets:
            folder = self.state.concepts.sets[name]
            try:
                self._sets[key] = await self.state.off_loop(
                    concept_from_images, name, folder, size=side
                )
            except InvalidInput as exc:  # the server's folder, not the request, is wrong
                raise Unavailable(
                    f"configured concept set {name!r} cannot be loaded: {exc}"
                ) from None
        return self._sets[key]

    async def _dataset(self, name: str, side: int) -> ProbeDataset:
        key = (name, side)
        if key not in self._datasets:
            folder = self.state.concepts.datasets[name]
            try:
                self._datasets[key] = await self.state.off_loop(
                    load_probe_folder, folder, size=side
                )
            except InvalidInput as exc:
                raise Unavailable(f"configured dataset {name!r} cannot be loaded: {exc}") from None
        return self._datasets[key]

    # ---------------------------------------------------------------- running

    async def run(self, work: ConceptWork) -> AsyncIterator[Progress | Any]:
        """Run ``work`` (waiting for a free concept worker first), yielding :class:`Progress`
        (rising fractions, at most one per whole percent or new stage) and at last the
        outcome. However the caller stops iterating, the job is flagged cancelled and stops at
        its next batch."""
        config = self.state.concepts
        if self._slots is None:
            self._slots = asyncio.Semaphore(config.max_jobs)
        slots = self._slots
        queued = slots.locked()
        if queued and self._waiting >= config.max_waiting:
            raise ResourceExhausted(
                f"{config.max_jobs} concept job(s) are running and {self._waiting} waiting "
                f"(this server's concepts.max_jobs and max_waiting); retry later"
            )
        self._waiting += 1
        try:
            if queued:
                yield Progress(0.0, "queued")
            await slots.acquire()
        finally:
            self._waiting -= 1
        started = False
        module: nn.Module | None = None
        hooks = 0
        getter: asyncio.Future[Progress] | None = None
        try:
            yield Progress(0.0, "start")  # a slot is taken: released below if it ends here
            module, hooks = await self._take_copy(work.model)
            loop = asyncio.get_running_loop()
            updates: asyncio.Queue[Progress] = asyncio.Queue()

            def report(fraction: float, stage: str) -> None:  # on the concept worker
                work.check()
                loop.call_soon_threadsafe(updates.put_nowait, Progress(fraction, stage))

            job = loop.run_in_executor(self.state.concept_pool, _call, work, module, report)
            started = True
            taken = module

            def finished(f: asyncio.Future[Any]) -> None:
                # the worker thread is done (also after a cancelled call): free its slot and
                # keep the copy for later jobs, unless the job failed unexpectedly or left a
                # hook behind (then its state is unknown)
                error = None if f.cancelled() else f.exception()
                expected = error is None or isinstance(error, XaiServeError)
                if expected and _hook_count(taken) == hooks:
                    self._copies.setdefault(work.model.name, []).append((taken, hooks))
                slots.release()

            job.add_done_callback(finished)
            last, stage = 0.0, "start"
            while not job.done() or not updates.empty():
                getter = asyncio.ensure_future(updates.get())
                await asyncio.wait({getter, job}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                item = getter.result()
                fraction = min(max(item.fraction, last, 0.0), 1.0)
                if fraction >= last + 0.01 or item.stage != stage:
                    last, stage = fraction, item.stage
                    yield Progress(fraction, item.stage)
            outcome = job.result()
        finally:
            work.cancelled = True  # a call that ends early stops the job at its next batch
            if getter is not None and not getter.done():
                getter.cancel()
            if not started:
                if module is not None:
                    self._copies.setdefault(work.model.name, []).append((module, hooks))
                slots.release()
        yield outcome

    async def _take_copy(self, model: LoadedModel) -> tuple[nn.Module, int]:
        """A free copy of ``model``'s module and its number of hooks, or a new one made on
        its device worker (between two batches: no explanation's hooks are on the module
        then)."""
        free = self._copies.setdefault(model.name, [])
        if free:
            return free.pop()
        executor = self.state.workers.get(model.worker)
        return await asyncio.get_running_loop().run_in_executor(executor, _clone, model.module)


def _clone(module: nn.Module) -> tuple[nn.Module, int]:
    clone = copy.deepcopy(module)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone, _hook_count(clone)


def _hook_count(module: nn.Module) -> int:
    """The forward hooks and pre-hooks on ``module`` and its submodules (a job must leave as
    many as it found)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _call(work: ConceptWork, module: nn.Module, report: Callable[[float, str], None]) -> Any:
    """Run ``work`` on ``module`` (on a concept worker thread), checking before every forward
    whether it must stop."""
    work.check()
    handle = module.register_forward_pre_hook(lambda _m, _args: work.check())
    try:
        return work.compute(module, report)
    except torch.cuda.OutOfMemoryError:
        raise ResourceExhausted(
            f"request {work.request_id!r}: the device ran out of memory; ask for less work "
            "(fewer images, objectives or a smaller size)"
        ) from None
    finally:
        handle.remove()
