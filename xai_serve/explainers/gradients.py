"""Gradient attribution methods: saliency, input x gradient, integrated gradients, SmoothGrad.

Every method here differentiates the class score ``logits[b, target[b]]`` with respect to the
*input images only*, through :func:`torch.autograd.grad`: parameters never receive ``.grad``
and nothing calls ``.backward()``. The model's mode (eval/train) is left as the caller set it.

Batching. Methods that evaluate the model at many points per image (integrated gradients'
path steps, SmoothGrad's noisy samples) enumerate every ``(image, point)`` pair and run them
through the model in chunks of ``request.batch_size`` inputs (default
:data:`DEFAULT_BATCH_SIZE`): one forward and one ``autograd.grad`` call per chunk, whatever
the number of images or points. A chunk may hold points of several images; the per-image sum
is an ``index_add_`` into a ``[B, C, H, W]`` float32 accumulator. Saliency and input x gradient
chunk the images the same way, and take the logits and top-1 targets from those same forwards.

Maps. :attr:`Explanation.maps` is ``Tensor[B, H, W]`` float32, the attribution summed over
channels (signed for input x gradient and integrated gradients; for saliency and SmoothGrad
over saliency, the channel sum of absolute gradients, so non-negative).

Mixed precision. ``amp="bf16"`` or ``"fp16"`` runs the model's forwards under
:func:`torch.autocast`; the inputs, their gradients, the accumulation and the maps stay
float32. No loss scaling is applied: with fp16, gradients smaller than fp16's range underflow.

Targets. ``request.target`` or, when it is None, the model's top-1 on the unperturbed images.
"""

from __future__ import annotations

import functools
import math
import numbers
import time
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import amp_option, bool_option, choice_option, int_option
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    TimeBudget,
    check_target_range,
    class_scores,
    per_target_maps,
    register,
    target_gradients,
    target_matrix,
    unperturbed_logits,
)
from xai_serve.explainers.forward import to_path_layout

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "IG_RULES",
    "InputXGradient",
    "IntegratedGradients",
    "Saliency",
    "SmoothGrad",
    "baseline_like",
    "class_score_gradient",
    "noise_option",
    "path_gradients",
    "quadrature",
]

DEFAULT_BATCH_SIZE = 32
"""Inputs per forward pass when the request gives no ``batch_size``."""

IG_RULES = (
    "riemann_left",
    "riemann_right",
    "riemann_middle",
    "riemann_trapezoid",
    "gausslegendre",
)
"""The quadrature rules of :class:`IntegratedGradients` (captum's ``method=`` names). The option
is called ``rule``, not ``method``: ``method`` is :func:`xai_serve.explain`'s own argument."""


# (inputs [n, C, H, W], their gradients [n, C, H, W], point index [n], image index [n])
#   -> float32 [n, C, H, W]
Contribution = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


# --------------------------------------------------------------------------- option checks


def noise_option(options: dict[str, Any]) -> float:
    value = options["noise"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"option `noise` must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidInput(f"option `noise` must be a finite number >= 0, got {value}")
    return value


def _reject_unused(request: Request, method: str) -> None:
    if request.baseline is not None:
        raise InvalidInput(f"method {method!r} does not take a `baseline`")
    if request.segments is not None:
        raise InvalidInput(f"method {method!r} does not take `segments`")


def baseline_like(baseline: Any, images: Tensor) -> Tensor:
    """``baseline`` (None, a number, or a Tensor broadcastable to the images) expanded to
    ``images.shape`` on the images' device and dtype (a broadcast view, not a copy)."""
    if baseline is None:
        return images.new_zeros(()).expand_as(images)
    if isinstance(baseline, bool):
        raise InvalidInput("`baseline` must be None, a number or a Tensor, got a bool")
    if isinstance(baseline, numbers.Real):
        value = float(baseline)
        if not math.isfinite(value):
            raise InvalidInput(f"`baseline` must be finite, got {value}")
        return images.new_full((), value).expand_as(images)
    if not isinstance(baseline, Tensor):
        raise InvalidInput(
            f"`baseline` must be None, a number or a Tensor, got {type(baseline).__name__}"
        )
    if not baseline.dtype.is_floating_point:
        raise InvalidInput(f"`baseline` must be a float tensor, got {baseline.dtype}")
    shape = tuple(images.shape)
    try:
        fits = torch.broadcast_shapes(tuple(baseline.shape), shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise InvalidInput(
            f"`baseline` of shape {tuple(baseline.shape)} does not broadcast to the images' "
            f"shape {shape} (use e.g. [C, 1, 1], [1, C, H, W] or [B, C, H, W])"
        )
    return baseline.detach().to(device=images.device, dtype=images.dtype).expand_as(images)


# --------------------------------------------------------------------------- quadrature


@functools.lru_cache(maxsize=64)
def _quadrature_cpu(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    n = steps
    if rule == "gausslegendre":
        # Golub-Welsch: the nodes of the n-point Gauss-Legendre rule on [-1, 1] are the
        # eigenvalues of the symmetric tridiagonal Jacobi matrix of the Legendre polynomials,
        # the weights are 2 * (first eigenvector component)^2. Mapped to [0, 1].
        k = torch.arange(1, n, dtype=torch.float64)
        off = k / torch.sqrt(4.0 * k * k - 1.0)
        jacobi = torch.diag(off, 1) + torch.diag(off, -1)
        nodes, vectors = torch.linalg.eigh(jacobi)
        return 0.5 * (nodes + 1.0), vectors[0] ** 2
    i = torch.arange(n, dtype=torch.float64)
    weights = torch.full((n,), 1.0 / n, dtype=torch.float64)
    if rule == "riemann_left":
        alphas = i / n
    elif rule == "riemann_right":
        alphas = (i + 1.0) / n
    elif rule == "riemann_middle":
        alphas = (i + 0.5) / n
    else:  # riemann_trapezoid: n nodes 0, 1/(n-1), ..., 1; weights h/2, h, ..., h, h/2
        alphas = i / (n - 1)
        weights = torch.full((n,), 1.0 / (n - 1), dtype=torch.float64)
        weights[0] *= 0.5
        weights[-1] *= 0.5
    return alphas, weights


def quadrature(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """``(alphas, weights)``: ``Tensor[steps]`` float64 (CPU) such that
    ``sum_i weights[i] * g(alphas[i])`` approximates ``integral_0^1 g(a) da``.

    The Riemann left/right/middle and Gauss-Legendre rules are captum's. The trapezoid rule is
    the textbook one (step ``1/(steps-1)``, half weight at both ends; weights sum to 1), so
    that integrated gradients keep completeness; captum's ``riemann_trapezoid`` uses step
    ``1/steps`` instead, and its result is ours times ``(steps - 1) / steps``.
    """
    if rule not in IG_RULES:
        raise InvalidInput(f"option `rule` must be one of {', '.join(IG_RULES)}; got {rule!r}")
    if rule == "riemann_trapezoid" and steps < 2:
        raise InvalidInput(f"option `steps` must be >= 2 for riemann_trapezoid, got {steps}")
    if steps < 1:
        raise InvalidInput(f"option `steps` must be >= 1, got {steps}")
    alphas, weights = _quadrature_cpu(rule, steps)
    return alphas.clone(), weights.clone()  # the cached tables stay unmodified


# --------------------------------------------------------------------------- core


def class_score_gradient(
    request: Request,
    x: Tensor,
    targets: Tensor | Callable[[Tensor], Tensor] | None,
    amp: torch.dtype | None,
    check: Tensor | None = None,
    foil: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(d logits[n, targets[n]] / d x, logits, targets)`` for a batch of inputs ``x``, made a
    fresh leaf here. ``targets`` None: the top-1 of these logits; a callable: made from these
    (detached) logits. ``check``: requested classes to validate against the model's class
    count before they index the logits.

    Several targets (``targets`` ``[n, T]``) and a ``foil`` (``[n]``: each score is then
    ``logit(target) - logit(foil)``): one forward, the ``T`` backward passes batched, and the
    gradient ``[n * T, ...]`` of the copies, image-major (copy ``t`` of input ``i`` for
    ``targets[i, t]``)."""
    with torch.enable_grad():
        x = to_path_layout(x.detach(), request.path).requires_grad_(True)
        # No hooks here: the path's oneDNN twin (if any) runs the forward and the backward.
        logits = request.forward(x, amp, "gradient", grad_on_runner=True)
        if check is not None:
            check_target_range(check, logits)
        if callable(targets):
            targets = targets(logits.detach())
        elif targets is None:
            targets = logits.detach().argmax(1)
        several = targets.dim() == 2
        scores = class_scores(logits.float(), targets if several else targets[:, None], foil)
        if not scores.requires_grad:
            raise InvalidInput(
                "the model's output does not depend differentiably on its input (is its "
                "forward run under torch.no_grad() or on detached tensors?)"
            )
        if several:
            grad = target_gradients(scores, x)
            if grad is None:  # materialise as autograd.grad would
                grad = torch.zeros_like(x).repeat_interleave(targets.shape[1], 0)
        else:
            (grad,) = torch.autograd.grad(scores.sum(), x, materialize_grads=True)
    return grad, logits.detach(), targets


def _chunk_size(request: Request) -> int:
    return request.chunk_size(DEFAULT_BATCH_SIZE, grad=True)


def _image_gradients(
    request: Request,
    amp: torch.dtype | None,
    combine: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """One gradient per image (chunked): ``(combine(x, grad) summed over channels, targets,
    logits)``, the logits and top-1 targets coming from the same forwards."""
    images, chunk = request.images.detach(), _chunk_size(request)
    b = images.shape[0]
    maps, all_logits, all_targets = [], [], []
    for s in range(0, b, chunk):
        x = images[s : s + chunk]
        if request.per_target:  # [n, T] from these logits (the top-k, or checked)
            requested: Any = functools.partial(target_matrix, request, start=s)
            check, foil = None, None if request.foil is None else request.foil[s : s + chunk]
        else:
            requested = None if request.target is None else request.target[s : s + chunk]
            # All requested classes are checked once, against the first chunk's logits (the
            # one host sync of the method), before any of them indexes the logits.
            check, foil = (request.target if s == 0 else None), None
        grad, logits, targets = class_score_gradient(request, x, requested, amp, check, foil)
        copies = targets.shape[1] if targets.dim() == 2 else 1
        xs = x.float() if copies == 1 else x.float().repeat_interleave(copies, 0)
        maps.append(combine(xs, grad.float()).sum(1))
        all_logits.append(logits.float())
        all_targets.append(targets)
    targets = torch.cat(all_targets)
    shaped, targets = per_target_maps(request, torch.cat(maps), targets)
    return shaped, targets, torch.cat(all_logits)


def path_gradients(
    request: Request,
    targets: Tensor,
    points: int,
    make_inputs: Callable[[Tensor, Tensor, range], Tensor],
    contribution: Contribution,
    amp: torch.dtype | None,
    chunk: int | None = None,
) -> Tensor:
    """``acc[b] = sum_j contribution(x_bj, grad_bj, j, b)`` over ``points`` inputs per image.

    The ``B * points`` pairs ``(b, j)`` are enumerated image-major and run in chunks of
    ``chunk`` inputs (default: the request's differentiated batch): per chunk one
    ``make_inputs(b_idx, j_idx, flat)`` (no graph; ``flat`` the chunk's flat indices
    ``b * points + j`` on the host), one forward and one ``autograd.grad``; the chunk's
    contributions are ``index_add_``-ed per image. With ``targets`` ``[B, T]`` (several, or a
    foil: ``request.foil``) the ``T`` gradients of each input come from one backward pass
    batched over the targets, and ``acc`` is ``[B * T, C, H, W]``, image-major.
    """
    images = request.images
    chunk = chunk or _chunk_size(request)
    b = images.shape[0]
    copies = targets.shape[1] if targets.dim() == 2 else 1
    acc = torch.zeros(b * copies, *images.shape[1:], dtype=torch.float32, device=images.device)
    total = b * points
    foil = request.foil
    for s in range(0, total, chunk):
        e = min(s + chunk, total)
        flat = torch.arange(s, e, device=images.device)
        image_idx = torch.div(flat, points, rounding_mode="floor")
        point_idx = flat - image_idx * points
        with torch.no_grad():
            inputs = make_inputs(image_idx, point_idx, range(s, e))
        foils = None if foil is None else foil[image_idx]
        grad, _, _ = class_score_gradient(request, inputs, targets[image_idx], amp, None, foils)
        rows = image_idx
        if copies > 1 or targets.dim() == 2:  # the copies of each input, one per target
            inputs = inputs.repeat_interleave(copies, 0)
            point_idx = point_idx.repeat_interleave(copies)
            image_idx = image_idx.repeat_interleave(copies)
            offsets = torch.arange(copies, device=images.device).repeat(rows.shape[0])
            rows = image_idx * copies + offsets
        acc.index_add_(0, rows, contribution(inputs, grad, point_idx, image_idx))
    return acc


# A forward and its backward w.r.t. the input cost about this many no-grad forwards.
def _timed_logits(
    request: Request, amp: torch.dtype | None, timed: bool
) -> tuple[Tensor, Tensor, float]:
    """``(logits, targets, seconds per point)`` of the plain images, the logits and targets as
    :func:`unperturbed_logits`. With ``timed`` (a time budget to plan), they come from one
    gradient evaluation of every image instead of a plain forward, and the seconds it took are
    the cost of one more point per image: measured on this call's own inputs at this moment,
    so the plan holds when the machine is busier than when the forward path was measured.
    It is measured twice and the shorter time kept: one evaluation of a few milliseconds that
    a pause of the machine (or autograd's lazy initialisation, in a process's first call)
    lengthens would make the plan use a fraction of its budget. Without ``timed`` the seconds
    are 0."""
    if not timed:
        logits, targets = unperturbed_logits(
            request, amp, request.chunk_size(DEFAULT_BATCH_SIZE), "gradient"
        )
        if request.per_target:
            targets = target_matrix(request, logits)
        return logits, targets, 0.0
    device = request.images.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = math.inf
    for _ in range(2):
        t = time.perf_counter()
        _, targets, logits = _image_gradients(request, amp, lambda x, g: g)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = min(seconds, time.perf_counter() - t)
    if request.per_target and targets.dim() == 1:  # one target and a foil
        targets = targets[:, None]
    return logits, targets, seconds


def _noise_seeds(seeds: list[int], samples: int) -> list[list[int]]:
    """``samples`` seeds per image, for its noisy copies: drawn (on the host, no device sync)
    from a CPU generator seeded with the image's seed, so copy ``j`` of an image gets the same
    noise whichever batch or chunk it runs in."""
    return [
        torch.randint(
            0, 2**63 - 1, (samples,), generator=torch.Generator().manual_seed(seed)
        ).tolist()
        for seed in seeds
    ]


# --------------------------------------------------------------------------- methods


@register("saliency")
class Saliency(Explainer):
    """Saliency (Simonyan et al., 2014): the gradient of the class score w.r.t. the input.

    Options:
        abs: ``True`` (default): the map is the channel sum of ``|d score / d x|``, i.e.
            captum's ``Saliency(model).attribute(x, target, abs=True).sum(1)`` (not the
            channel max of the paper's figures). ``False``: the signed gradient, summed.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast dtype of the forwards.

    One forward per chunk of images: the logits and top-1 targets come from it.
    """

    uses_layer = False
    multi_target = True  # one forward per chunk; the targets' backward batched
    pixel_level = True
    options: ClassVar[dict[str, Any]] = {"abs": True, "amp": "auto"}

    def explain(self, request: Request) -> Explanation:
        take_abs = bool_option(request.options, "abs")
        amp = amp_option(request.options, request.path)
        _reject_unused(request, self.name)
        maps, targets, logits = _image_gradients(
            request, amp, (lambda x, g: g.abs()) if take_abs else (lambda x, g: g)
        )
        return Explanation(
            maps=maps, targets=targets, logits=logits, method=self.name, foils=request.foil
        )


@register("input_x_gradient")
class InputXGradient(Explainer):
    """Input x gradient (Shrikumar et al., 2016): ``x * d score / d x``, summed over channels
    (captum's ``InputXGradient(model).attribute(x, target).sum(1)``).

    Options:
        amp: None, ``"bf16"`` or ``"fp16"``: autocast dtype of the forwards.
    """

    uses_layer = False
    multi_target = True  # one forward per chunk; the targets' backward batched
    pixel_level = True
    options: ClassVar[dict[str, Any]] = {"amp": "auto"}

    def explain(self, request: Request) -> Explanation:
        amp = amp_option(request.options, request.path)
        _reject_unused(request, self.name)
        maps, targets, logits = _image_gradients(request, amp, lambda x, g: x * g)
        return Explanation(
            maps=maps, targets=targets, logits=logits, method=self.name, foils=request.foil
        )


@register("integrated_gradients")
class IntegratedGradients(Explainer):
    """Integrated gradients (Sundararajan et al., 2017).

    ``attr = (x - x0) * sum_i w_i * grad f(x0 + a_i (x - x0))`` with the quadrature
    ``(a_i, w_i)`` of :func:`quadrature`; the map is ``attr`` summed over channels. With an
    exact rule ``attr.sum() = f(x) - f(x0)`` (completeness).

    Request fields:
        baseline: ``x0``: None (zeros), a number, or a Tensor broadcastable to the images
            (``[C, 1, 1]`` for a per-channel value, ``[1, C, H, W]``, ``[B, C, H, W]``).
        batch_size: inputs per forward (default 32). The ``B * steps`` path points run in
            ``ceil(B * steps / batch_size)`` forwards, plus forwards of the plain images for
            the logits and top-1 targets.

    Options:
        steps: number of path points per image (>= 1; >= 2 for ``riemann_trapezoid``); with
            ``budget_ms``, the most it may use.
        rule: the quadrature rule (captum's ``method=``; ``method`` itself is the name of
            :func:`xai_serve.explain`'s own argument): ``"gausslegendre"`` (default),
            ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"`` or
            ``"riemann_trapezoid"``. Captum's rules, except that the trapezoid weights sum to
            1 (see :func:`quadrature`).
        amp: ``"auto"`` (the forward path's precision), None / ``"fp32"``, ``"bf16"`` or
            ``"fp16"``: autocast dtype of the forwards.
        budget_ms: None, or a time budget in ms from the call's start: the steps are planned
            up front to fit it (see :func:`_timed_logits` for the estimate), at most
            ``steps``; :class:`~xai_serve.errors.BudgetTooSmall` if not even one fits.

    :attr:`Explanation.samples` is the number of steps used, the gradient evaluations per
    image.
    """

    uses_layer = False
    multi_target = True  # one forward per chunk; the targets' backward batched
    takes_baseline = True
    pixel_level = True
    options: ClassVar[dict[str, Any]] = {
        "steps": 32,
        "rule": "gausslegendre",
        "amp": "auto",
        "budget_ms": None,
    }

    def explain(self, request: Request) -> Explanation:
        opts = request.options
        steps = int_option(opts, "steps", 1)
        rule = choice_option(opts, "rule", IG_RULES)
        amp = amp_option(opts, request.path)
        budget = TimeBudget.of(request)
        if request.segments is not None:
            raise InvalidInput(f"method {self.name!r} does not take `segments`")
        x = request.images.detach()
        x0 = baseline_like(request.baseline, x)
        diff = x - x0
        logits, targets, step_s = _timed_logits(request, amp, budget is not None)
        asked = steps
        if budget is not None:
            least = 2 if rule == "riemann_trapezoid" else 1
            steps = budget.units(step_s, minimum=least, maximum=steps, what="path steps")
        alphas64, weights64 = quadrature(rule, steps)
        alphas = alphas64.to(device=x.device, dtype=x.dtype)
        weights = weights64.to(device=x.device, dtype=torch.float32)

        def make_inputs(image_idx: Tensor, step_idx: Tensor, flat: range) -> Tensor:
            return x0[image_idx] + alphas[step_idx].view(-1, 1, 1, 1) * diff[image_idx]

        def contribution(inputs: Tensor, grad: Tensor, step_idx: Tensor, _: Tensor) -> Tensor:
            return grad.float() * weights[step_idx].view(-1, 1, 1, 1)

        path = path_gradients(request, targets, steps, make_inputs, contribution, amp)
        copies = targets.shape[1] if targets.dim() == 2 else 1
        diff_copies = diff.float() if copies == 1 else diff.float().repeat_interleave(copies, 0)
        maps, targets = per_target_maps(request, (diff_copies * path).sum(1), targets)
        return Explanation(
            maps=maps,
            foils=request.foil,
            targets=targets,
            logits=logits,
            method=self.name,
            samples=steps,
            budget_limited=steps < asked,
        )


@register("smoothgrad")
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al., 2017): the base attribution averaged over noisy copies.

    ``attr = mean_j base(x + e_j)`` with ``e_j ~ N(0, sigma_b^2)`` per pixel and
    ``sigma_b = noise * (max(x_b) - min(x_b))`` (the paper's noise level, relative to each
    image's value range; captum's ``NoiseTunnel(..., stdevs=s)`` takes the absolute ``s``,
    which is ``noise * (max - min)`` here). The base attribution of each noisy copy is taken
    at that copy, as captum's ``NoiseTunnel(nt_type="smoothgrad")`` does: for
    ``"saliency"`` the mean of ``|grad|`` (then summed over channels), for
    ``"input_x_gradient"`` the mean of ``(x + e_j) * grad``.

    Request fields:
        seed: seeds the noise, per image (see :func:`xai_serve.explain`). Noisy copy ``j`` of
            image ``i`` is drawn on the images' device from a generator seeded with the
            ``j``-th of ``samples`` sub-seeds that a CPU generator seeded with image ``i``'s
            seed draws (:func:`_noise_seeds`). So the noise depends on the image's seed and
            ``samples`` only, not on the other images of the batch nor on ``batch_size``: the
            maps then agree up to the float rounding of batched forwards and of the
            accumulation order (bitwise, for the same batch and ``batch_size`` on the CPU; on
            CUDA up to cuDNN's and ``index_add_``'s nondeterminism unless
            ``torch.use_deterministic_algorithms(True)``). Cost: per noisy copy, one
            generator re-seed and one ``normal_`` launch (no host sync).
        batch_size: inputs per forward (default 32), as for integrated gradients.

    Options:
        samples: noisy copies per image (>= 1).
        noise: noise level, a fraction of each image's (max - min) (>= 0; 0 gives the base
            method).
        base: ``"saliency"`` (default) or ``"input_x_gradient"``.
        amp: ``"auto"`` (the forward path's precision), None / ``"fp32"``, ``"bf16"`` or
            ``"fp16"``: autocast dtype of the forwards.
        budget_ms: None, or a time budget in ms from the call's start: the noisy samples are
            planned up front to fit it, at most ``samples`` (as integrated gradients' steps).
            The noise of copy ``j`` depends on the number of samples used, so a budgeted
            answer is reproducible from its seed and :attr:`Explanation.samples`.

    :attr:`Explanation.samples` is ``samples``, the gradient evaluations per image;
    :attr:`Explanation.seeds` the images' seeds.
    """

    uses_layer = False
    multi_target = True  # one forward per chunk; the targets' backward batched
    randomised = True
    pixel_level = True
    options: ClassVar[dict[str, Any]] = {
        "samples": 16,
        "noise": 0.15,
        "base": "saliency",
        "amp": "auto",
        "budget_ms": None,
    }

    def explain(self, request: Request) -> Explanation:
        opts = request.options
        samples = int_option(opts, "samples", 1)
        noise = noise_option(opts)
        base = choice_option(opts, "base", ("saliency", "input_x_gradient"))
        amp = amp_option(opts, request.path)
        budget = TimeBudget.of(request)
        _reject_unused(request, self.name)
        x = request.images.detach()
        sigma = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
        logits, targets, sample_s = _timed_logits(request, amp, budget is not None)
        asked = samples
        if budget is not None:
            samples = budget.units(sample_s, minimum=1, maximum=samples, what="noisy samples")
        noise_seeds = _noise_seeds(request.seeds, samples)
        generator = torch.Generator(device=x.device)
        scale = 1.0 / samples

        def make_inputs(image_idx: Tensor, sample_idx: Tensor, flat: range) -> Tensor:
            clean = x[image_idx]
            eps = torch.empty_like(clean)
            for row, pair in enumerate(flat):  # host ints: no sync
                image, sample = divmod(pair, samples)
                generator.manual_seed(noise_seeds[image][sample])
                eps[row].normal_(generator=generator)
            return clean + eps * sigma[image_idx].view(-1, 1, 1, 1)

        if base == "saliency":

            def contribution(inputs: Tensor, grad: Tensor, sample_idx: Tensor, _: Tensor) -> Tensor:
                return grad.float().abs() * scale

        else:

            def contribution(inputs: Tensor, grad: Tensor, sample_idx: Tensor, _: Tensor) -> Tensor:
                return inputs.float() * grad.float() * scale

        acc = path_gradients(request, targets, samples, make_inputs, contribution, amp)
        maps, targets = per_target_maps(request, acc.sum(1), targets)
        return Explanation(
            maps=maps,
            foils=request.foil,
            targets=targets,
            logits=logits,
            method=self.name,
            samples=samples,
            seeds=request.seeds_tensor(),
            budget_limited=samples < asked,
        )
