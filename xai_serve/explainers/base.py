"""The explainer base class, the method registry and the shared plumbing of every method.

A method is one file and one registration::

    @register("gradcam")
    class GradCAM(Explainer):
        def explain(self, request: Request) -> Explanation: ...

:func:`xai_serve.explain` validates the request once (images, targets, layer, options), builds a
:class:`Request` of tensors on the model's device, and calls the method.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.errors import BudgetTooSmall, FailedPrecondition, InvalidInput, NotFound
from xai_serve.explainers._options import (
    ARGUMENT_OPTIONS,
    LOCAL_OPTIONS,
    OPTION_SCHEMA,
    OptionSpec,
    positive_int,
)
from xai_serve.explainers.forward import ForwardPath, forward_logits, path_of, to_path_layout

__all__ = [
    "ARGUMENT_OPTIONS",
    "LOCAL_OPTIONS",
    "OPTION_SCHEMA",
    "BlackBoxModel",
    "Explainer",
    "Explanation",
    "OptionSpec",
    "Progress",
    "Request",
    "TimeBudget",
    "black_box_refusal",
    "explain",
    "forward_logits",
    "get_method",
    "list_methods",
    "model_device",
    "positive_int",
    "register",
    "resolve_layer",
    "resolve_seeds",
    "resolve_targets",
    "unperturbed_logits",
]


@dataclass
class Explanation:
    """What an explanation method returns; every tensor stays on the model's device.

    Attributes:
        maps: ``Tensor[B, H, W]`` float32. CAM methods: in ``[0, 1]``. Attribution methods:
            signed, summed over channels. With several targets per image (``target`` as
            ``Tensor[B, T]``, or ``top_labels``): ``Tensor[B, T, H, W]``, one map per target.
        targets: ``Tensor[B]`` int64, the class each map explains (``Tensor[B, T]`` with
            several targets).
        foils: with ``foil``, ``Tensor[B]`` int64: each map explains the target's score minus
            this class's ("why the target rather than the foil"); None otherwise.
        logits: ``Tensor[B, classes]`` from the same forward pass, where the method has one.
        method: the registered method name.
        layer: the dotted name of the layer a CAM method used (found automatically or given).
        segments, weights, intercept, score, samples: extras of perturbation methods
            (``Tensor[B, H, W]`` segment ids, ``Tensor[B, S]`` segment weights, the surrogate's
            ``Tensor[B]`` intercept and fit score, and the number of model evaluations; with
            several targets, ``weights`` and ``stderr`` are ``Tensor[B, T, S]`` and
            ``intercept`` and ``score`` ``Tensor[B, T]``).
        seeds: randomised methods (LIME, KernelSHAP, SmoothGrad): ``Tensor[B]`` int64, the seed
            each image's random draws came from (see :func:`explain`); passing them back as
            ``seed=`` reproduces the explanation. None for deterministic methods.
        stderr: sampling methods that estimate it: ``Tensor[B, S]`` float32, the standard
            error of each entry of ``weights`` (0 for unused ids and for exactly computed
            values).
        sample_counts: sampling methods: ``Tensor[B]`` int64, the model evaluations each image
            actually used (fewer than ``samples`` when it stopped early at its ``tolerance``
            or its ``budget_ms``).
        partial: True for the intermediate answers a ``progress`` callback receives; the
            value :func:`explain` returns is always final.
        budget_limited: True when ``budget_ms`` cut the work short (fewer steps, samples or
            rounds than asked for); False means the answer is the one without a budget.
    """

    maps: Tensor
    targets: Tensor
    logits: Tensor | None
    method: str
    layer: str | None = None
    segments: Tensor | None = None
    weights: Tensor | None = None
    intercept: Tensor | None = None
    score: Tensor | None = None
    samples: int | None = None
    seeds: Tensor | None = None
    stderr: Tensor | None = None
    sample_counts: Tensor | None = None
    partial: bool = False
    budget_limited: bool = False
    foils: Tensor | None = None


class BlackBoxModel(nn.Module):
    """A model that can only be called, never looked into: it runs elsewhere (e.g. on a
    remote inference server, :mod:`xai_serve.models.remote`). Only methods whose class says
    ``black_box`` explain it; :func:`explain` refuses the others with
    :class:`~xai_serve.errors.FailedPrecondition`.

    Subclasses implement :meth:`forward` and :meth:`forward_chunks`, and
    :meth:`describe`. The perturbation methods hand their batches to :meth:`forward_chunks` as
    a lazy iterable, so that an implementation can keep several in flight while the next ones
    are being built (see :meth:`Request.forward_chunks`).
    """

    def forward_chunks(self, chunks: Iterable[Tensor]) -> Iterator[Tensor]:
        """The logits of each chunk, in order; a chunk is taken from ``chunks`` only when the
        implementation is ready to send it (the default: one at a time)."""
        for x in chunks:
            yield self(x)

    def describe(self) -> str:
        """Where the model runs, for messages (e.g. ``'model "m" at host:8001'``)."""
        return type(self).__name__


Progress = Callable[[Explanation], None]
"""A callback that receives partial :class:`Explanation` s while a method refines its answer."""


@dataclass
class Request:
    """A validated explanation request, as every method receives it."""

    model: nn.Module
    images: Tensor  # [B, C, H, W] float, on the model's device
    # [B] int64 on the model's device (one class per image), [B, T] (several: see `multi`),
    # or None for the model's top-1 (or its top `top_labels`)
    target: Tensor | None
    layer: nn.Module | None
    layer_name: str | None
    baseline: Any
    segments: Tensor | None
    batch_size: int | None
    seeds: list[int]  # one per image, resolved by resolve_seeds()
    options: dict[str, Any] = field(default_factory=dict)
    path: ForwardPath = field(default_factory=ForwardPath)
    progress: Progress | None = None
    started: float = field(default_factory=time.perf_counter)  # when explain() was called
    top_labels: int | None = None  # explain each image's top-k classes (target is None then)
    foil: Tensor | None = None  # [B] int64: explain score(target) - score(foil)

    @property
    def multi(self) -> bool:
        """Several targets per image: the answer's maps are ``[B, T, H, W]``."""
        return self.top_labels is not None or (self.target is not None and self.target.dim() == 2)

    @property
    def per_target(self) -> bool:
        """Several targets or a foil: a method that shares the work explains ``[B, T]``
        (image, target) copies (``T`` = 1 with one target and a foil)."""
        return self.multi or self.foil is not None

    def chunk_size(self, default: int, *, grad: bool = False) -> int:
        """Inputs per forward: the request's ``batch_size``, else the path's (its
        ``grad_batch_size`` for differentiated forwards), else ``default``."""
        if self.batch_size is not None:
            return self.batch_size
        tuned = self.path.grad_batch_size if grad else self.path.batch_size
        return tuned if tuned is not None else default

    def forward(
        self, x: Tensor, amp: torch.dtype | None, family: str, *, grad_on_runner: bool = False
    ) -> Tensor:
        """``model(x)`` on the request's forward path (see :func:`forward_logits`)."""
        return forward_logits(self.model, x, amp, family, self.path, grad_on_runner=grad_on_runner)

    def forward_chunks(
        self, chunks: Iterable[Tensor], amp: torch.dtype | None, family: str
    ) -> Iterator[Tensor]:
        """The logits of each chunk of ``chunks`` in order, as :meth:`forward` gives them.

        A local model runs each chunk when it is asked for the next result. A
        :class:`BlackBoxModel` takes the chunks through its own
        :meth:`BlackBoxModel.forward_chunks`, which may draw several chunks ahead and keep
        their calls in flight while the caller scores the earlier ones and ``chunks`` builds
        the next: so ``chunks`` should build each chunk lazily (a generator). ``amp`` and the
        forward path do not apply to such a model (its server decides how it runs)."""
        model = self.model
        if not isinstance(model, BlackBoxModel):
            for x in chunks:
                yield self.forward(x, amp, family)
            return
        sizes: list[int] = []

        def counted() -> Iterator[Tensor]:
            for x in chunks:
                sizes.append(int(x.shape[0]))
                yield x

        for i, out in enumerate(model.forward_chunks(counted())):
            if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != sizes[i]:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise InvalidInput(
                    f"{family} methods need a model that maps Tensor[N, C, H, W] to "
                    f"Tensor[N, classes] logits; for N = {sizes[i]} it returned {got}"
                )
            yield out

    def generators(self) -> list[torch.Generator]:
        """One generator per image on the images' device, image ``i``'s seeded with
        ``seeds[i]``: a randomised method draws image ``i``'s randomness from its own generator
        only, so that it does not depend on the other images of the batch."""
        device = self.images.device
        return [torch.Generator(device=device).manual_seed(s) for s in self.seeds]

    def seeds_tensor(self) -> Tensor:
        """``seeds`` as ``Tensor[B]`` int64 on the images' device (:attr:`Explanation.seeds`)."""
        return torch.tensor(self.seeds, dtype=torch.int64, device=self.images.device)


class Explainer:
    """Base class of every method. Subclasses set ``name`` (via :func:`register`) and implement
    :meth:`explain`; ``options`` lists the method's keyword options and their defaults, so that
    an unknown or mistyped option is an error rather than silently ignored.

    The class attributes below are the method's traits. They are declared here, once, and every
    other layer (the server's job building and answer cache, the CLI, the drawing) reads them
    from the registered class, so a method registered by a user is served like a built-in one:

    ``uses_layer``: explains a layer (takes ``layer``; the server fills in the model's default).
    ``randomised``: its result depends on ``seed`` (the server always passes one per image).
    ``takes_baseline``: takes a ``baseline`` value; ``takes_blur_baseline``: also ``"blur"``.
    ``needs_gradients``: differentiates the model (False: black-box, forwards only).
    ``produces_segments``: answers with superpixel ``segments`` and their ``weights``.
    ``pixel_level``: its map is a per-pixel attribution (drawn smoothed), not a layer's or a
    segment's coarse map.
    ``takes_default_layer``: with ``uses_layer``, the server passes the model's default
    layer when a request names none (False: the method finds its own, as CAM does).
    ``uses_target``: its map depends on the class explained (False: class-agnostic, such as
    EigenCAM and attention rollout; several targets and ``foil`` are refused).
    ``multi_target``: :meth:`explain` handles ``request.multi`` (several targets per image)
    and ``request.foil`` itself, sharing the work between the targets; a method without it
    gets them from :func:`explain` one target at a time (correct, not shared).
    ``black_box``: only calls the model on whole input batches (no gradients, hooks or
    layers), so it can explain a :class:`BlackBoxModel` such as a model served elsewhere.
    """

    name: ClassVar[str] = ""
    uses_layer: ClassVar[bool] = False
    randomised: ClassVar[bool] = False
    takes_baseline: ClassVar[bool] = False
    takes_blur_baseline: ClassVar[bool] = False
    needs_gradients: ClassVar[bool] = True
    produces_segments: ClassVar[bool] = False
    pixel_level: ClassVar[bool] = False
    takes_default_layer: ClassVar[bool] = True
    uses_target: ClassVar[bool] = True
    multi_target: ClassVar[bool] = False
    black_box: ClassVar[bool] = False
    options: ClassVar[dict[str, Any]] = {}

    def explain(self, request: Request) -> Explanation:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        """Why this method cannot explain ``model`` at all (None: it may): a cheap look at the
        model's modules, no forward. A served model does not offer a method that gives a
        reason (the reason is logged at its load); an explanation that fails for a reason only
        a forward reveals is still refused per request."""
        return None


_REGISTRY: dict[str, type[Explainer]] = {}


def register(name: str) -> Callable[[type[Explainer]], type[Explainer]]:
    """Class decorator: makes a method available to :func:`explain` under ``name``."""

    def wrap(cls: type[Explainer]) -> type[Explainer]:
        if name in _REGISTRY:
            raise ValueError(f"explanation method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def list_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(_REGISTRY)


def get_method(name: str) -> type[Explainer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFound(
            f"unknown explanation method {name!r}; available: {', '.join(sorted(_REGISTRY))}"
        ) from None


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a stateless model)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[nn.Module, str]:
    """``(module, dotted name)`` for a dotted name (``"layer4"``, ``"features.8"``) or a module."""
    if isinstance(layer, nn.Module):
        for name, module in model.named_modules():
            if module is layer:
                return module, name
        raise NotFound("`layer` is a module that is not part of the model")
    if not isinstance(layer, str):
        raise InvalidInput(
            f"`layer` must be a dotted module name or a module, got {type(layer).__name__}"
        )
    try:
        return model.get_submodule(layer), layer
    except AttributeError:
        names = [n for n, m in model.named_modules() if n and len(list(m.children())) == 0]
        hint = ", ".join(names[-5:])
        raise NotFound(f"the model has no layer {layer!r} (its last leaf layers: {hint})") from None


def resolve_targets(
    target: int | Tensor | None, batch: int, classes: int | None, device: torch.device
) -> Tensor | None:
    """``target`` as ``Tensor[B]`` (or ``Tensor[B, T]``: several classes per image) int64 on
    ``device``, checked against ``classes`` if known."""
    if target is None:
        return None
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise InvalidInput(
            f"`target` must be None, an int, a Tensor[B] or a Tensor[B, T], got "
            f"{type(target).__name__}"
        )
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.int64, device=device)
    else:
        if target.dim() not in (1, 2) or target.shape[0] != batch:
            raise InvalidInput(
                f"`target` must be Tensor[B] or Tensor[B, T] with B = {batch}, got shape "
                f"{tuple(target.shape)}"
            )
        if target.dim() == 2 and target.shape[1] == 0:
            raise InvalidInput("`target` as Tensor[B, T] needs T >= 1 classes per image, got 0")
        if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
            raise InvalidInput(f"`target` must hold integer class indices, got {target.dtype}")
        t = target.to(device=device, dtype=torch.int64)
        if t.is_inference():  # made under torch.inference_mode(): autograd cannot save it
            t = t.clone()
    _check_classes(t, classes, "`target`")
    if t.dim() == 2 and t.shape[1] > 1:
        ordered = t.sort(dim=1).values
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            raise InvalidInput("`target` names a class twice for one image")
    return t


def _check_classes(t: Tensor, classes: int | None, what: str) -> None:
    if t.numel():
        lo, hi = (int(v) for v in torch.aminmax(t))
        if lo < 0 or (classes is not None and hi >= classes):
            bound = f"[0, {classes})" if classes is not None else ">= 0"
            raise InvalidInput(f"{what} class indices must lie in {bound}, got [{lo}, {hi}]")


def resolve_foil(foil: int | Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    """``foil`` (None, an int or ``Tensor[B]``) as ``Tensor[B]`` int64 on ``device``."""
    if foil is None:
        return None
    if isinstance(foil, bool) or not isinstance(foil, (int, Tensor)):
        raise InvalidInput(f"`foil` must be None, an int or a Tensor[B], got {type(foil).__name__}")
    if isinstance(foil, int):
        f = torch.full((batch,), foil, dtype=torch.int64, device=device)
    else:
        if foil.dim() != 1 or foil.shape[0] != batch:
            raise InvalidInput(
                f"`foil` must be an int or Tensor[B] with B = {batch}, got shape "
                f"{tuple(foil.shape)}"
            )
        if foil.dtype.is_floating_point or foil.dtype == torch.bool or foil.is_complex():
            raise InvalidInput(f"`foil` must hold integer class indices, got {foil.dtype}")
        f = foil.to(device=device, dtype=torch.int64)
    _check_classes(f, None, "`foil`")
    return f


def target_matrix(request: Request, logits: Tensor, start: int = 0) -> Tensor:
    """The classes to explain as ``Tensor[n, T]`` int64, from the unperturbed ``logits`` of
    the request's images ``start .. start + n - 1``: the requested ones (``T`` = 1 for one
    class per image), the top ``top_labels``, or the top-1; checked against the class count
    and the foil (a foil may not be a target)."""
    classes = logits.shape[1]
    rows = slice(start, start + logits.shape[0])
    foil = None if request.foil is None else request.foil[rows]
    if request.top_labels is not None:
        if request.top_labels > classes:
            raise InvalidInput(
                f"`top_labels`={request.top_labels} exceeds the model's {classes} classes"
            )
        targets = logits.topk(request.top_labels, dim=1).indices
    elif request.target is None:
        targets = logits.argmax(1, keepdim=True)
    else:
        targets = request.target[rows]
        targets = targets if targets.dim() == 2 else targets[:, None]
        check_target_range(targets, logits)
    if foil is not None:
        _check_classes(foil, classes, "`foil`")
        same = (targets == foil[:, None]).any(1)
        if bool(same.any()):
            i = int(same.nonzero()[0, 0])
            raise InvalidInput(
                f"`foil` {int(foil[i])} is a class explained for image {start + i}: a foil "
                "must differ from the targets (the map explains target minus foil)"
            )
    return targets


def per_target_maps(request: Request, maps: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """The maps of a method that explained ``B * T`` copies (image-major; ``targets``
    ``[B, T]``, several classes or a foil) as ``[B, T, H, W]`` with ``[B, T]`` targets, or as
    ``[B, H, W]`` and ``[B]`` when the request asked for one class; ``[B]`` targets pass."""
    if targets.dim() == 1:
        return maps, targets
    maps = maps.view(*targets.shape, *maps.shape[1:])
    return (maps, targets) if request.multi else (maps[:, 0], targets[:, 0])


def target_gradients(scores: Tensor, wrt: Tensor) -> Tensor | None:
    """The gradients of each column of ``scores`` (``[n, T]``, one per target) with respect to
    ``wrt`` (``[n, ...]``), as ``[n * T, ...]``, image-major (None if ``scores`` do not depend
    on ``wrt``): one backward for ``T`` = 1; for several, the ``T`` backward passes batched
    (``is_grads_batched``: one vectorised pass), or one after the other over the kept graph
    where an operator of the model has no batching rule."""
    n, t_count = scores.shape
    if t_count == 1:
        (grad,) = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
        return grad
    seeds = torch.eye(t_count, dtype=scores.dtype, device=scores.device)
    seeds = seeds[:, None, :].expand(t_count, n, t_count)
    try:
        (grad,) = torch.autograd.grad(
            scores, wrt, seeds, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an operator without a batching rule: T ordinary backward passes
        grads = []
        for t in range(t_count):
            (g,) = torch.autograd.grad(
                scores[:, t].sum(), wrt, retain_graph=t < t_count - 1, allow_unused=True
            )
            if g is None:
                return None
            grads.append(g)
        grad = torch.stack(grads)
    if grad is None:
        return None
    return grad.transpose(0, 1).reshape(n * t_count, *grad.shape[2:])


def class_scores(z: Tensor, targets: Tensor, foil: Tensor | None = None) -> Tensor:
    """``Tensor[n, T]``: row ``r``'s scores ``z[r, targets[r, t]]``, less ``z[r, foil[r]]``
    with a foil (``z``: ``[n, classes]`` logits or probabilities; ``targets``: ``[n, T]``)."""
    out = z.gather(1, targets)
    if foil is not None:
        out = out - z.gather(1, foil[:, None])
    return out


_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1  # int64, as Explanation.seeds and the proto hold
_NON_INTEGER = (torch.bool, torch.complex64, torch.complex128)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def resolve_seeds(seed: object, batch: int) -> list[int]:
    """One seed per image: ``seed`` None draws a fresh random seed for every image; an int is
    every image's seed; a sequence (or ``Tensor[B]``) of ints gives image ``i`` ``seed[i]``.
    Seeds are int64 (``[-2**63, 2**63)``)."""
    if seed is None:
        return [secrets.randbits(63) for _ in range(batch)]
    if _is_int(seed):
        values = [int(seed)] * batch
    elif isinstance(seed, Tensor):
        if seed.dim() != 1 or seed.dtype.is_floating_point or seed.dtype in _NON_INTEGER:
            raise InvalidInput(
                f"`seed` as a Tensor must be Tensor[B] of integers, got shape "
                f"{tuple(seed.shape)} {seed.dtype}"
            )
        values = [int(v) for v in seed.tolist()]
    elif isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
        bad = [v for v in seed if not _is_int(v)]
        if bad:
            raise InvalidInput(f"`seed` must hold integers, got {bad[0]!r}")
        values = [int(v) for v in seed]
    else:
        raise InvalidInput(
            f"`seed` must be None, an integer or a sequence of integers (one per image), "
            f"got {seed!r}"
        )
    if len(values) != batch:
        raise InvalidInput(
            f"`seed` must give one seed per image: {batch} image(s), got {len(values)} seed(s)"
        )
    out_of_range = [v for v in values if not _SEED_MIN <= v <= _SEED_MAX]
    if out_of_range:
        raise InvalidInput(f"`seed` values must be 64-bit signed integers, got {out_of_range[0]}")
    return values


def _check_images(images: object, device: torch.device) -> Tensor:
    if not isinstance(images, Tensor):
        raise InvalidInput(f"`images` must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InvalidInput(f"`images` must be Tensor[B, C, H, W], got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise InvalidInput(
            f"`images` must be a float tensor (preprocessed for the model), got {images.dtype}"
        )
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise InvalidInput(f"`images` is empty: shape {tuple(images.shape)}")
    images = images.to(device)
    if images.is_inference():  # made under torch.inference_mode(): autograd cannot use it
        images = images.clone()
    # One check (one sync on a GPU) per request: a NaN would otherwise spread through every
    # map and score without a word. The extremes carry every NaN and infinity: one reading
    # pass (isfinite(images).all() makes four, with writes: 3x the time on a CPU), read back
    # together and tested in Python (ops on 0-d tensors cost more than that pass on a CPU).
    lo, hi = torch.stack(torch.aminmax(images)).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise InvalidInput("`images` contain NaN or infinite values")
    return images


def explain(
    model: nn.Module,
    images: Tensor,
    method: str,
    *,
    target: int | Tensor | None = None,
    top_labels: int | None = None,
    foil: int | Tensor | None = None,
    layer: str | nn.Module | None = None,
    baseline: Any = None,
    segments: Tensor | None = None,
    batch_size: int | None = None,
    seed: int | Sequence[int] | Tensor | None = None,
    path: ForwardPath | None = None,
    progress: Progress | None = None,
    **options: Any,
) -> Explanation:
    """Explain ``model``'s decision on every image of a batch.

    Args:
        model: any image classifier ``nn.Module`` mapping ``[B, C, H, W]`` to ``[B, classes]``.
        images: ``Tensor[B, C, H, W]``, already preprocessed for the model; moved to the
            model's device.
        method: one of :func:`list_methods`.
        target: the class to explain: None (the model's top-1), an int, or ``Tensor[B]``; or
            several per image, ``Tensor[B, T]`` (T >= 1 distinct classes each): the answer
            then has one map per target, ``maps`` ``[B, T, H, W]`` and ``targets`` ``[B, T]``
            (see :class:`Explanation`), as T calls with the same seeds would give.
        top_labels: explain each image's ``k`` most likely classes (most likely first), as
            ``target`` ``Tensor[B, k]`` would; not with ``target``.
        foil: a class (an int, or ``Tensor[B]``, one per image) to contrast with: each map
            explains the target's score minus the foil's ("why the target rather than the
            foil"; the logits, or for perturbation methods the ``output`` option's score). A
            foil may not be one of the targets.
        layer: CAM methods: the layer, as a module or a dotted name; default: found
            automatically (the last module with a spatial 4-D output) and reported in
            :attr:`Explanation.layer`.
        baseline, segments, batch_size: see the methods that use them.
        seed: seeds the randomised methods (LIME, KernelSHAP, SmoothGrad), per image: every
            image draws its randomness from its own generator, seeded with its own seed, and
            never from another image's. None: a fresh random seed per image; an int: that seed
            for every image; a sequence (or ``Tensor[B]``) of B ints: image ``i`` gets
            ``seed[i]``. So an image's explanation does not depend on the batch it is in:
            ``explain(images, seed=s)[i]`` equals ``explain(images[i:i+1], seed=s_i)``
            (``s_i`` = ``s`` or ``s[i]``, same options) up to the float rounding of batched
            forwards. The seeds used are reported in :attr:`Explanation.seeds`. What does
            follow the batch: the width ``S`` of perturbation ``weights`` (the batch's largest
            id + 1; the extra ids are unused, weight 0) and KernelSHAP's ``samples`` (the
            batch's largest row count).
        path: how the model's forwards run (memory format, precision that ``amp="auto"``
            resolves to, forward batch, compiled variant); default: the path
            :func:`xai_serve.tune` chose for this model, else fp32 in the model's own memory
            format.
        progress: called with a partial :class:`Explanation` (``partial=True``) after each
            round of the methods that refine their answer in rounds (LIME, KernelSHAP); None
            for no partial answers.
        **options: the method's own options (see ``get_method(method).options``).

    Returns:
        An :class:`Explanation` whose tensors are on the model's device.
    """
    started = time.perf_counter()
    cls = get_method(method)
    if isinstance(model, BlackBoxModel) and not cls.black_box:
        raise FailedPrecondition(black_box_refusal(method, model))
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        known = ", ".join(sorted(cls.options)) or "none"
        raise InvalidInput(
            f"method {method!r} has no option(s) {', '.join(unknown)}; its options: {known}"
        )
    device = model_device(model)
    imgs = _check_images(images, device)
    if path is None:
        path = path_of(model)
    elif not isinstance(path, ForwardPath):
        raise InvalidInput(f"`path` must be a ForwardPath, got {type(path).__name__}")
    if progress is not None and not callable(progress):
        raise InvalidInput(f"`progress` must be callable, got {type(progress).__name__}")
    imgs = to_path_layout(imgs, path)
    if batch_size is not None:
        batch_size = positive_int(batch_size, "`batch_size`")
    seeds = resolve_seeds(seed, imgs.shape[0])
    targets = resolve_targets(target, imgs.shape[0], None, device)
    if top_labels is not None:
        top_labels = positive_int(top_labels, "`top_labels`")
        if targets is not None:
            raise InvalidInput("give `target` or `top_labels`, not both")
    foils = resolve_foil(foil, imgs.shape[0], device)
    several = top_labels is not None or (targets is not None and targets.dim() == 2)
    if (several or foils is not None) and not cls.uses_target:
        raise InvalidInput(
            f"method {method!r} does not depend on the class explained: several targets, "
            "`top_labels` and `foil` do not apply to it"
        )
    layer_module, layer_name = (None, None)
    if layer is not None:
        if not cls.uses_layer:
            raise InvalidInput(f"method {method!r} does not take a `layer`")
        layer_module, layer_name = resolve_layer(model, layer)
    req = Request(
        model=model,
        images=imgs,
        target=targets,
        layer=layer_module,
        layer_name=layer_name,
        baseline=baseline,
        segments=segments,
        batch_size=batch_size,
        seeds=seeds,
        options={**cls.options, **options},
        path=path,
        progress=progress,
        started=started,
        top_labels=top_labels,
        foil=foils,
    )
    if req.per_target and not cls.multi_target:
        return _one_target_at_a_time(cls, req)
    return cls().explain(req)


def black_box_refusal(method: str, model: BlackBoxModel) -> str:
    """Why ``method`` (not a ``black_box`` method) cannot explain ``model``: one sentence with
    the methods that can, and what to do instead."""
    cls = get_method(method)
    need = "gradients" if cls.needs_gradients else "access to its layers"
    able = ", ".join(n for n in list_methods() if get_method(n).black_box)
    return (
        f"method {method!r} needs the model's {need}, but {model.describe()} is served "
        f"elsewhere and can only be called; black-box methods can explain it ({able}), or "
        "load the model locally (a torchvision, timm, TorchScript or torch.export source) "
        f"for {method!r}"
    )


class _Contrast(nn.Module):
    """``model``'s logits less its logit of class ``foil`` (a method that explains a logit then
    explains the contrast); transparent to layer names (see :func:`_one_target_at_a_time`)."""

    def __init__(self, model: nn.Module, foil: int) -> None:
        super().__init__()
        self.model = model
        self.foil = foil

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        return z - z[:, self.foil : self.foil + 1]


def _one_target_at_a_time(cls: type[Explainer], req: Request) -> Explanation:
    """Several targets and foils for a method that does not handle them itself: one call per
    target (the same seeds, so each equals the single-target call), on a model whose logits
    are contrasted with the foil (one group of images per distinct foil). A time budget is
    shared out between the calls; partial answers are not reported."""
    with torch.no_grad():
        chunk = req.chunk_size(16)
        logits = torch.cat(
            [
                req.forward(req.images[s : s + chunk], None, "explanation")
                for s in range(0, req.images.shape[0], chunk)
            ]
        ).float()
    targets = target_matrix(req, logits)
    b, t_count = targets.shape
    groups: list[tuple[int | None, list[int]]] = [(None, list(range(b)))]
    if req.foil is not None:
        values = req.foil.tolist()
        groups = [(f, [i for i in range(b) if values[i] == f]) for f in sorted(set(values))]
    parts: list[tuple[list[int], list[Explanation]]] = []
    budget = req.options.get("budget_ms")
    calls, done = len(groups) * t_count, 0
    for foil, index in groups:
        idx = torch.tensor(index, device=req.images.device)
        model = req.model if foil is None else _Contrast(req.model, foil)
        path = req.path
        if foil is not None:
            runner = None if path.runner is None else _Contrast(path.runner, foil)
            path = path.with_(compiled=None, runner=runner)
        answers = []
        for t in range(t_count):
            options = dict(req.options)
            now = time.perf_counter()
            if budget is not None:
                left_ms = budget - (now - req.started) * 1e3
                options["budget_ms"] = max(1, int(left_ms / (calls - done)))
            sub = dataclasses.replace(
                req,
                model=model,
                images=req.images[idx],
                target=targets[idx, t].contiguous(),
                top_labels=None,
                foil=None,
                seeds=[req.seeds[i] for i in index],
                segments=_rows(req.segments, idx, b),
                baseline=_rows(req.baseline, idx, b),
                options=options,
                path=path,
                progress=None,
                started=now if budget is not None else req.started,
            )
            answers.append(cls().explain(sub))
            done += 1
        parts.append((index, answers))
    return _assemble(req, cls.name, parts, targets, logits)


def _rows(value: Any, idx: Tensor, batch: int) -> Any:
    """The rows ``idx`` of a per-image tensor argument (``[B, ...]``), else ``value``."""
    if isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == batch and batch > 1:
        return value[idx]
    return value


def _assemble(
    req: Request,
    method: str,
    parts: list[tuple[list[int], list[Explanation]]],
    targets: Tensor,
    logits: Tensor,
) -> Explanation:
    """One explanation of the whole batch from per-target answers of groups of its images."""
    b = req.images.shape[0]
    order = [i for index, _ in parts for i in index]
    inverse = torch.empty(b, dtype=torch.int64, device=req.images.device)
    inverse[torch.tensor(order, device=inverse.device)] = torch.arange(b, device=inverse.device)

    def joined(name: str) -> Tensor | None:
        values = [[getattr(e, name) for e in answers] for _, answers in parts]
        if any(v is None for group in values for v in group):
            return None
        stacked = [torch.stack(group, dim=1) for group in values]  # [b_g, T, ...]
        width = max(v.shape[2] for v in stacked) if stacked[0].dim() > 2 else None
        if width is not None:  # segment weights: groups may differ in their id count
            stacked = [F.pad(v, (0, width - v.shape[2])) for v in stacked]
        return torch.cat(stacked)[inverse]

    def first(name: str) -> Tensor | None:
        values = [getattr(answers[0], name) for _, answers in parts]
        if any(v is None for v in values):
            return None
        return torch.cat(values)[inverse]

    counts = [[e.sample_counts for e in answers] for _, answers in parts]
    sample_counts = None
    if all(c is not None for group in counts for c in group):
        sample_counts = torch.cat([torch.stack(g, 1).amax(1) for g in counts])[inverse]
    every = [e for _, answers in parts for e in answers]
    single = not req.multi

    def shaped(t: Tensor | None) -> Tensor | None:
        return t[:, 0] if single and t is not None else t

    return Explanation(
        maps=shaped(joined("maps")),  # type: ignore[arg-type]
        targets=targets[:, 0] if single else targets,
        logits=logits,
        method=method,
        layer=_unwrapped_name(every[0].layer) if req.foil is not None else every[0].layer,
        segments=first("segments"),
        weights=shaped(joined("weights")),
        intercept=shaped(joined("intercept")),
        score=shaped(joined("score")),
        samples=max((e.samples or 0) for e in every) or None,
        seeds=first("seeds"),
        stderr=shaped(joined("stderr")),
        sample_counts=sample_counts,
        budget_limited=any(e.budget_limited for e in every),
        foils=req.foil,
    )


def _unwrapped_name(layer: str | None) -> str | None:
    """A layer name found inside :class:`_Contrast` (``model.<name>``) without its prefix."""
    if layer is not None and layer.startswith("model."):
        return layer[len("model.") :]
    return layer


class TimeBudget:
    """A method's time budget: ``budget_ms`` milliseconds from the start of :func:`explain`
    (validation, segmentation and the plain forward count against it)."""

    def __init__(self, budget_ms: int, started: float) -> None:
        self.budget_ms = budget_ms
        self.deadline = started + budget_ms / 1e3

    @classmethod
    def of(cls, request: Request) -> TimeBudget | None:
        """The request's ``budget_ms`` option (None: no budget), checked."""
        value = request.options.get("budget_ms")
        if value is None:
            return None
        return cls(positive_int(value, "option `budget_ms` (None or an integer)"), request.started)

    def left_s(self) -> float:
        return self.deadline - time.perf_counter()

    def units(self, seconds_each: float, *, minimum: int, maximum: int, what: str) -> int:
        """How many units of work costing ``seconds_each`` fit in the time left, at most
        ``maximum``; :class:`~xai_serve.errors.BudgetTooSmall` if not even ``minimum`` do."""
        left = self.left_s()
        fit = maximum if seconds_each <= 0 else math.floor(left / seconds_each)
        if fit < minimum:
            need_ms = (self.budget_ms / 1e3 - left + minimum * seconds_each) * 1e3
            raise BudgetTooSmall(
                f"budget_ms={self.budget_ms} is too small: at least {minimum} {what} are needed, "
                f"which take about {need_ms:.0f} ms here (estimated); give a budget of at least "
                f"that, or leave budget_ms out"
            )
        return min(fit, maximum)


def check_target_range(targets: Tensor, logits: Tensor) -> None:
    """Raise if a requested target is not a class of ``logits`` (known only after a forward)."""
    if targets.numel() and (top := int(targets.max())) >= logits.shape[1]:
        raise InvalidInput(
            f"`target` class indices must lie in [0, {logits.shape[1]}), got up to {top}"
        )


def unperturbed_logits(
    request: Request, amp: torch.dtype | None, chunk: int, family: str
) -> tuple[Tensor, Tensor]:
    """float32 logits of the request's images (no graph, ``chunk`` images per forward) and the
    targets: the requested ones, checked against the class count, or the top-1."""
    images = request.images
    with torch.no_grad():
        pieces = (images[s : s + chunk] for s in range(0, images.shape[0], chunk))
        logits = torch.cat(list(request.forward_chunks(pieces, amp, family))).float()
    if request.target is None:
        return logits, logits.argmax(1)
    check_target_range(request.target, logits)
    return logits, request.target
