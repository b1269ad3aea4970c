"""Perturbation methods: LIME, KernelSHAP and occlusion, batched and on the device.

These methods only run the model forward: they perturb the images, read the target's score
on every perturbed copy and explain it by a surrogate (LIME, KernelSHAP) or by score drops
(occlusion). Nothing leaves the device, and no NumPy is used.

Superpixels (LIME, KernelSHAP). ``request.segments`` (``Tensor[B, H, W]`` integer ids in
``[0, S)``, checked once; ids need not all be used) or, when it is None, a segmentation of the
images by the ``segmenter`` option (``"slic"`` or ``"grid"``, ``n_segments`` superpixels, see
:mod:`xai_serve.explainers.segmentation`). A coalition is a ``Tensor[S]`` bool over the
superpixels; a superpixel outside it takes the baseline's value. The perturbed images come from
:func:`xai_serve.ops.superpixel_mask` and are applied to ``request.images`` as given (the
model's preprocessed inputs: no normalisation is fused). An id that no pixel of an image uses
gets weight 0 for that image and takes no part in its surrogate.

Baseline (``request.baseline``), what a removed superpixel becomes:

* None: each superpixel's mean colour (:func:`xai_serve.ops.segment_mean`, LIME's fill);
  occlusion: 0 (captum's default).
* ``"blur"``: a Gaussian-blurred copy of the image (standard deviation ``blur_sigma`` pixels,
  replicated borders).
* a number: that constant.
* ``Tensor[B or 1, C, H, W]``: a baseline image per image (batch 1 broadcasts).

Scores: the softmax probability of the target class (option ``output="probability"``) or its
logit (``output="logit"``). Targets: ``request.target`` or the model's top-1 on the unperturbed
images, from one forward of the unperturbed images (chunked by ``batch_size``) that also gives
:attr:`Explanation.logits`.

Batching. The ``B * N`` perturbed inputs (N coalitions or occlusion windows per image) are
enumerated image-major and run through the model under :func:`torch.no_grad` in chunks of
``request.batch_size`` inputs (default :data:`DEFAULT_BATCH_SIZE`); a chunk may hold inputs of
several images, so a call makes ``ceil(B * N / batch_size)`` forwards plus those of the
unperturbed images. Only one chunk of images exists at a time, except for a model served
elsewhere (:class:`~xai_serve.explainers.base.BlackBoxModel`): the chunks are built lazily
and handed to it through :meth:`Request.forward_chunks`, so that it can keep a few calls in
flight while the next chunks are built and the earlier ones scored. (KernelSHAP's ``N`` is the
largest row count of the batch's images; see :func:`_kernelshap_coalitions`.)

Randomness, per image. The coalitions of LIME and of sampled KernelSHAP are drawn up front on
the images' device, image ``i``'s from its own generator (:meth:`Request.generators`, seeded
with its seed, see :func:`xai_serve.explain`), with shapes that depend only on that image (its
number of used superpixel ids), and scattered into the batch's ``[B, N, S]`` coalition tensor.
So an image's explanation depends on its seed, its own inputs and the options, not on the
other images of the batch nor on ``batch_size`` (up to the float rounding of batched
forwards); :attr:`Explanation.seeds` reports the seeds.

Surrogates are solved on the device in float64, batched over the images, with
:mod:`torch.linalg`.

Mixed precision: ``amp="bf16"`` or ``"fp16"`` runs the model's forwards under
:func:`torch.autocast`; scores, surrogates and maps are float32 (solves float64).
"""

from __future__ import annotations

import bisect
import math
import numbers
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from xai_serve import ops
from xai_serve.errors import BudgetTooSmall, InvalidInput, Unavailable
from xai_serve.explainers import shapley
from xai_serve.explainers._options import amp_option, bool_option, choice_option, int_option
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    class_scores,
    per_target_maps,
    register,
    target_matrix,
    unperturbed_logits,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "OUTPUTS",
    "ROUND_SAMPLES",
    "SEGMENTERS",
    "KernelShap",
    "Lime",
    "Occlusion",
    "gaussian_blur",
    "round_samples",
]

DEFAULT_BATCH_SIZE = 64
"""Perturbed inputs per forward pass when the request gives no ``batch_size``."""

SEGMENTERS = ("slic", "grid")
"""Values of the ``segmenter`` option (used when the request gives no ``segments``)."""

OUTPUTS = ("probability", "logit")
"""Values of the ``output`` option: what score of the target class is explained."""

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- option checks


def _real_option(
    options: dict[str, Any],
    name: str,
    *,
    low: float,
    low_open: bool,
    high: float | None = None,
    high_open: bool = True,
) -> float:
    """A finite real option in the interval given by ``low``/``high`` (open or closed ends)."""
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"option `{name}` must be a number, got {value!r}")
    v = float(value)
    below = v <= low if low_open else v < low
    above = high is not None and (v >= high if high_open else v > high)
    if not math.isfinite(v) or below or above:
        left = "(" if low_open else "["
        right = ")" if high is None or high_open else "]"
        upper = "inf" if high is None else f"{high:g}"
        raise InvalidInput(f"option `{name}` must lie in {left}{low:g}, {upper}{right}, got {v}")
    return v


def _check_image_dtype(images: Tensor, method: str) -> None:
    if images.dtype not in _IMAGE_DTYPES:
        raise InvalidInput(
            f"method {method!r} takes float32, float16 or bfloat16 images, got {images.dtype}"
        )


def _chunk_size(request: Request) -> int:
    return request.chunk_size(DEFAULT_BATCH_SIZE)


# --------------------------------------------------------------------------- segments


def _check_segments(segments: object, images: Tensor) -> tuple[Tensor, int]:
    """``(segments as contiguous int64 on the images' device, S = max id + 1)``."""
    if not isinstance(segments, Tensor):
        raise InvalidInput(
            f"`segments` must be a Tensor[B, H, W] of superpixel ids, got {type(segments).__name__}"
        )
    b, _, h, w = images.shape
    if tuple(segments.shape) != (b, h, w):
        raise InvalidInput(
            f"`segments` must be Tensor[B, H, W] = {(b, h, w)} like the images, "
            f"got shape {tuple(segments.shape)}"
        )
    if segments.dtype.is_floating_point or segments.is_complex() or segments.dtype == torch.bool:
        raise InvalidInput(f"`segments` must hold integer superpixel ids, got {segments.dtype}")
    seg = segments.to(device=images.device, dtype=torch.int64).contiguous()
    lo, hi = (int(v) for v in torch.aminmax(seg))  # the one host sync of the check
    if lo < 0 or hi >= h * w:
        raise InvalidInput(
            f"`segments` ids must lie in [0, S) with S <= H * W = {h * w}, found ids in "
            f"[{lo}, {hi}]"
        )
    return seg, hi + 1


def _compute_segments(images: Tensor, segmenter: str, n_segments: int) -> tuple[Tensor, int]:
    try:
        from xai_serve.explainers import segmentation
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise Unavailable(
            f"computing superpixels needs xai_serve.explainers.segmentation ({exc}); "
            "pass `segments=` instead"
        ) from exc
    if segmenter == "slic":
        seg = segmentation.slic(images, n_segments=n_segments)
    else:
        seg = segmentation.grid(images, n_segments)
    return seg.to(torch.int64).contiguous(), int(segmentation.num_segments(seg))


def _request_segments(request: Request, opts: dict[str, Any]) -> tuple[Tensor, int]:
    segmenter = choice_option(opts, "segmenter", SEGMENTERS)
    n_segments = int_option(opts, "n_segments", 1)
    if request.segments is not None:
        return _check_segments(request.segments, request.images)
    return _compute_segments(request.images, segmenter, n_segments)


def _present(segments: Tensor, s: int) -> Tensor:
    """``Tensor[B, S]`` bool: which ids at least one pixel of each image carries."""
    b = segments.shape[0]
    present = torch.zeros(b, s, dtype=torch.bool, device=segments.device)
    return present.scatter_(1, segments.view(b, -1), True)


def _segment_map(values: Tensor, segments: Tensor) -> Tensor:
    """``maps[b, y, x] = values[b, segments[b, y, x]]`` as float32 ``Tensor[B, H, W]``."""
    b, h, w = segments.shape
    return values.float().gather(1, segments.view(b, -1)).view(b, h, w)


# --------------------------------------------------------------------------- baselines


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur of ``Tensor[B, C, H, W]`` with standard deviation ``sigma`` pixels.

    A separable kernel of radius ``ceil(3 sigma)``, normalised to sum 1, replicated borders;
    computed in float32, returned in the images' dtype.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=images.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    c = images.shape[1]
    out = F.pad(images.float(), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return out.to(images.dtype)


def _baseline(
    baseline: Any, images: Tensor, sigma: float, default: Tensor | float
) -> Tensor | float:
    """The baseline as :func:`xai_serve.ops.superpixel_mask` takes it: a float or a tensor
    ``[B or 1, C, H, W]`` (or ``default``, for None) in the images' dtype and device."""
    if baseline is None:
        return default
    if isinstance(baseline, str):
        if baseline != "blur":
            raise InvalidInput(
                f"`baseline` must be None, 'blur', a number or a Tensor[B, C, H, W]; "
                f"got {baseline!r}"
            )
        return gaussian_blur(images, sigma)
    if isinstance(baseline, bool):
        raise InvalidInput("`baseline` must be None, 'blur', a number or a Tensor, got a bool")
    if isinstance(baseline, numbers.Real):
        value = float(baseline)
        if not math.isfinite(value):
            raise InvalidInput(f"`baseline` must be finite, got {value}")
        return value
    if not isinstance(baseline, Tensor):
        raise InvalidInput(
            "`baseline` must be None, 'blur', a number or a Tensor[B, C, H, W], "
            f"got {type(baseline).__name__}"
        )
    if not baseline.dtype.is_floating_point:
        raise InvalidInput(f"`baseline` must be a float tensor, got {baseline.dtype}")
    b, c, h, w = images.shape
    if baseline.dim() != 4 or baseline.shape[0] not in (1, b) or baseline.shape[1:] != (c, h, w):
        raise InvalidInput(
            f"`baseline` must be Tensor[B, C, H, W] = {(b, c, h, w)} (or batch 1), "
            f"got shape {tuple(baseline.shape)}"
        )
    return baseline.detach().to(device=images.device, dtype=images.dtype).contiguous()


def _batch_slice(baseline: Tensor | float, b0: int, b1: int) -> Tensor | float:
    if isinstance(baseline, Tensor) and baseline.shape[0] != 1:
        return baseline[b0:b1]
    return baseline


# --------------------------------------------------------------------------- model evaluation


def _score(logits: Tensor, targets: Tensor, output: str, foil: Tensor | None = None) -> Tensor:
    """float32 ``Tensor[n, T]``: the targets' probabilities or logits (``targets``:
    ``[n, T]``), less the foil's (``foil``: ``[n]``) when there is one."""
    z = logits.float()
    if output == "probability":
        z = torch.softmax(z, dim=1)
    return class_scores(z, targets, foil)


def _pieces(start: int, stop: int, per_image: int) -> Iterator[tuple[int, int, int, int]]:
    """Splits the flat image-major range ``[start, stop)`` of ``B * per_image`` items into at
    most three rectangles ``(b0, b1, r0, r1)``: images ``b0..b1-1``, rows ``r0..r1-1`` of each."""
    first, last = start // per_image, (stop - 1) // per_image
    r0, r1 = start - first * per_image, stop - last * per_image
    if first == last:
        yield first, first + 1, r0, r1
        return
    whole0, whole1 = first, last + 1
    if r0 > 0:
        yield first, first + 1, r0, per_image
        whole0 = first + 1
    if r1 < per_image:
        whole1 = last
    if whole0 < whole1:
        yield whole0, whole1, 0, per_image
    if r1 < per_image:
        yield last, last + 1, 0, r1


def _chunked_scores(
    request: Request,
    per_image: int,
    make_piece: Any,
    targets: Tensor,
    output: str,
    amp: torch.dtype | None,
) -> Tensor:
    """``Tensor[B, per_image, T]`` float32 scores (of the ``T`` columns of ``targets``) of the
    ``B * per_image`` perturbed inputs that ``make_piece(b0, b1, r0, r1)`` builds
    (image-major), ``batch_size`` inputs per forward."""
    b, t_count = targets.shape
    total, chunk = b * per_image, _chunk_size(request)
    scores = torch.empty(total, t_count, dtype=torch.float32, device=request.images.device)
    foil = request.foil
    rows = torch.arange(total, device=request.images.device)
    spans = [(s, min(s + chunk, total)) for s in range(0, total, chunk)]

    def chunks() -> Iterator[Tensor]:  # built lazily: a remote model draws ahead
        for s, e in spans:
            parts = [make_piece(*p) for p in _pieces(s, e, per_image)]
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    with torch.no_grad():
        outputs = request.forward_chunks(chunks(), amp, "perturbation")
        for (s, e), logits in zip(spans, outputs, strict=True):
            image_idx = torch.div(rows[s:e], per_image, rounding_mode="floor")
            scores[s:e] = _score(
                logits, targets[image_idx], output, None if foil is None else foil[image_idx]
            )
    return scores.view(b, per_image, t_count)


# --------------------------------------------------------------------------- rounds

ROUND_SAMPLES = 64
"""Model evaluations per image per round of LIME and KernelSHAP, at least (see
:func:`round_samples`)."""

MAX_ROUNDS = 8
"""Rounds grow past :data:`ROUND_SAMPLES` evaluations so that ``samples`` take about this many."""

ALLOCATION = "kernel"
"""How KernelSHAP gives its samples to the coalition sizes (see
:data:`xai_serve.explainers.shapley.ALLOCATIONS`)."""


def round_samples(samples: int) -> int:
    """Evaluations per image per round: ``max(ROUND_SAMPLES, ceil(samples / MAX_ROUNDS))``; it
    depends on the options only, never on the batch."""
    return max(ROUND_SAMPLES, -(-samples // MAX_ROUNDS))


def _used_ids(present: Tensor) -> tuple[list[int], Tensor]:
    """``(m, ids)``: ``m[i]`` the number of ids image ``i`` uses (one host sync, at setup) and
    ``Tensor[B, S]`` int64 whose row ``i`` starts with those ids, ascending."""
    counts = present.sum(1).tolist()
    ids = (~present).to(torch.uint8).argsort(dim=1, stable=True)
    return [int(m) for m in counts], ids


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ragged_pieces(start: int, stop: int, sizes: list[int], offsets: list[int]):
    """The flat rows ``[start, stop)`` of images with ``sizes[i]`` rows each (image-major,
    ``offsets`` their starts) as rectangles ``(b0, b1, r0, r1)``: images ``b0..b1-1``, rows
    ``r0..r1-1`` of each; consecutive whole images of equal size share one rectangle."""
    out: list[tuple[int, int, int, int]] = []
    i = bisect.bisect_right(offsets, start) - 1
    while i < len(sizes) and offsets[i] < stop:
        if sizes[i]:
            r0 = max(start - offsets[i], 0)
            r1 = min(stop - offsets[i], sizes[i])
            if (
                out
                and r0 == 0
                and r1 == sizes[i]
                and out[-1][1] == i
                and out[-1][2] == 0
                and out[-1][3] == sizes[i]
                and sizes[out[-1][0]] == sizes[i]
            ):
                out[-1] = (out[-1][0], i + 1, 0, r1)
            else:
                out.append((i, i + 1, r0, r1))
        i += 1
    return out


def _round_scores(
    request: Request, setup: _SuperpixelSetup, rows: list[Tensor | None]
) -> list[Tensor | None]:
    """float32 scores ``Tensor[n_i, T]`` (one column per target) of image ``i`` under each
    coalition of ``rows[i]`` (``Tensor[n_i, S]`` bool, or None for an image that takes no
    part): the rows of all images, image-major, run through the model in chunks of
    ``batch_size`` inputs that images share; the targets share the forwards."""
    images = request.images.detach()
    device = images.device
    sizes = [0 if r is None else r.shape[0] for r in rows]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    total, chunk = offsets[-1], _chunk_size(request)
    scores = torch.empty(total, setup.targets.shape[1], dtype=torch.float32, device=device)
    foil = setup.foil
    owner = torch.repeat_interleave(
        torch.arange(len(rows), device=device), torch.tensor(sizes, device=device)
    )
    spans = [(s, min(s + chunk, total)) for s in range(0, total, chunk)]

    def chunks() -> Iterator[Tensor]:  # built lazily: a remote model draws ahead
        for s, e in spans:
            parts = []
            for b0, b1, r0, r1 in _ragged_pieces(s, e, sizes, offsets[:-1]):
                keep = torch.stack([rows[i][r0:r1] for i in range(b0, b1)])  # type: ignore[index]
                parts.append(
                    ops.superpixel_mask(
                        images[b0:b1],
                        setup.segments[b0:b1],
                        keep,
                        _batch_slice(setup.baseline, b0, b1),
                        channels_last=request.path.channels_last,
                        validate=False,
                    )
                )
            yield parts[0] if len(parts) == 1 else torch.cat(parts)

    with torch.no_grad():
        outputs = request.forward_chunks(chunks(), setup.amp, "perturbation")
        for (s, e), logits in zip(spans, outputs, strict=True):
            mine = owner[s:e]
            scores[s:e] = _score(
                logits, setup.targets[mine], setup.output, None if foil is None else foil[mine]
            )
    return [None if n == 0 else scores[o : o + n] for n, o in zip(sizes, offsets[:-1], strict=True)]


class _Fit:
    """One round's surrogate of every image (float64 ``[B, S]`` / ``[B]`` tensors)."""

    def __init__(self, weights: Tensor, intercept: Tensor, score: Tensor, stderr: Tensor):
        self.weights, self.intercept, self.score, self.stderr = weights, intercept, score, stderr


class _LimeSampler:
    """LIME's draws, scores and fit, round by round (see :class:`Lime`)."""

    granularity = 1

    def __init__(
        self,
        setup: _Copies,
        samples: int,
        keep_prob: float,
        width: float,
        alpha: float,
        generators: list[torch.Generator],
    ) -> None:
        self.present, self.samples = setup.present, samples
        self.keep_prob, self.width, self.alpha = keep_prob, width, alpha
        self.generators = generators
        self.m, self.ids = _used_ids(setup.present)
        b, s = setup.present.shape
        device = setup.present.device
        self.keep = torch.zeros(b, samples, s, dtype=torch.bool, device=device)
        self.y = torch.zeros(b, samples, dtype=torch.float64, device=device)
        self.counts = [0] * b

    def planned(self, i: int, limit: int | None = None) -> int:
        n = min(round_samples(self.samples), self.samples - self.counts[i])
        return n if limit is None else max(min(n, limit), self.least(i))

    def least(self, i: int) -> int:
        """The smallest round worth drawing: the first needs ROUND_SAMPLES rows to fit."""
        return min(ROUND_SAMPLES, self.samples) if self.counts[i] == 0 else 1

    def first_round(self, i: int) -> int:
        return min(round_samples(self.samples), self.samples)

    def done(self, i: int) -> bool:
        return self.counts[i] >= self.samples

    def draw(self, i: int, n: int) -> Tensor:
        """``n`` coalitions of image ``i`` over all ``S`` ids: each used id kept with
        ``keep_prob``, from image ``i``'s generator; its very first row keeps every id."""
        m, device = self.m[i], self.present.device
        draws = torch.rand(n, m, generator=self.generators[i], device=device) < self.keep_prob
        if self.counts[i] == 0:
            draws[0] = True
        rows = torch.zeros(n, self.present.shape[1], dtype=torch.bool, device=device)
        return rows.index_copy_(1, self.ids[i, :m], draws)

    def record(self, i: int, rows: Tensor, scores: Tensor) -> None:
        c, n = self.counts[i], rows.shape[0]
        self.keep[i, c : c + n] = rows
        self.y[i, c : c + n] = scores.to(torch.float64)
        self.counts[i] = c + n

    def fit(self) -> _Fit:
        device = self.present.device
        counts = torch.tensor(self.counts, device=device)
        row = torch.arange(self.samples, device=device)
        valid = row[None, :] < counts[:, None]
        z = self.keep.to(torch.float64)
        w = _lime_kernel(self.keep, self.present, self.width) * valid
        coef, intercept, r2 = shapley.weighted_ridge(z, self.y, w, self.alpha, self.present)
        se = shapley.lime_stderr(
            z, self.y, w, coef, intercept, self.alpha, self.present, valid & (row[None, :] > 0)
        )
        # a sandwich needs more drawn rows than parameters (used ids + intercept)
        m = self.present.sum(1)
        estimable = (counts - 1 > m + 1)[:, None]
        se = torch.where(estimable | ~self.present, se, math.inf)
        return _Fit(coef, intercept, r2, se)


def _lime_kernel(keep: Tensor, present: Tensor, kernel_width: float) -> Tensor:
    """lime's sample weights, float64 ``Tensor[B, N]``: ``sqrt(exp(-d^2 / width^2))`` with
    ``d`` the cosine distance between a coalition and the all-used one (an empty coalition
    has distance 1, as sklearn's ``pairwise_distances(metric="cosine")``)."""
    z = keep.to(torch.float64)
    ones = present.to(torch.float64)
    dot = (z * ones[:, None, :]).sum(2)
    norms = z.sum(2).sqrt() * ones.sum(1, keepdim=True).sqrt()
    cos = torch.where(norms > 0, dot / norms.clamp_min(1e-300), 0.0)
    d = (1.0 - cos).clamp(0.0, 2.0)
    return torch.sqrt(torch.exp(-(d**2) / kernel_width**2))


class _ShapSampler:
    """KernelSHAP's stratified draws, scores and constrained fit, round by round (see
    :class:`KernelShap` and :class:`xai_serve.explainers.shapley.StrataPlan`)."""

    def __init__(
        self,
        setup: _Copies,
        samples: int,
        paired: bool,
        generators: list[torch.Generator],
        allocation: str = ALLOCATION,
    ) -> None:
        self.present, self.samples, self.generators = setup.present, samples, generators
        # the logistic surrogate models a probability in (0, 1), not a difference of two
        self.surrogate = setup.output == "probability" and not setup.contrast
        self._orders: list[Tensor | None] = [None] * len(generators)
        self.m, self.ids = _used_ids(setup.present)
        self.members = 2 if paired else 1
        self.granularity = self.members
        device = setup.present.device
        self.plans = [shapley.StrataPlan(m, paired, allocation) for m in self.m]
        self.max_units = [
            min((samples - 2) // self.members, p.total_units) if samples >= 2 else 0
            for p in self.plans
        ]
        self._binom: dict[int, Tensor] = {}
        b, s = setup.present.shape
        u = max([*self.max_units, 1])
        self.units = torch.zeros(b, u, s, dtype=torch.bool, device=device)
        self.strata = torch.zeros(b, u, dtype=torch.int64, device=device)
        self.y = torch.zeros(b, u, self.members, dtype=torch.float64, device=device)
        self.f = torch.zeros(b, 2, dtype=torch.float64, device=device)  # v(1), v(0)
        self.drawn = [0] * b  # units
        self.counts = [0] * b  # evaluations
        self._pending: list[Tensor | None] = [None] * b

    def _round_units(self, i: int) -> int:
        if self.counts[i] == 0:  # the first round: the full and empty coalitions, and every
            # stratum its minimum units (SEs need them), at least a round's worth
            want = max((round_samples(self.samples) - 2) // self.members, self.plans[i].min_units())
        else:
            want = round_samples(self.samples) // self.members
        return min(want, self.max_units[i] - self.drawn[i])

    def planned(self, i: int, limit: int | None = None) -> int:
        units = self._round_units(i)
        if limit is not None:
            first = self.counts[i] == 0
            units = min(units, (limit - (2 if first else 0)) // self.members)
            if first:  # every stratum its minimum units (SEs need them)
                units = max(units, self._least_units(i))
        return units * self.members + (2 if self.counts[i] == 0 else 0)

    def _least_units(self, i: int) -> int:
        return min(self.plans[i].min_units(), self.max_units[i] - self.drawn[i])

    def least(self, i: int) -> int:
        """The smallest round worth drawing: the first holds the full and empty coalitions
        and every stratum's minimum units."""
        if self.counts[i] == 0:
            return self._least_units(i) * self.members + 2
        return self.members

    def first_round(self, i: int) -> int:
        return self.planned(i)

    def done(self, i: int) -> bool:
        return self.counts[i] > 0 and self.drawn[i] >= self.max_units[i]

    def draw(self, i: int, n: int) -> Tensor:
        """The next ``n`` evaluations of image ``i`` over all ``S`` ids: (the full and empty
        coalitions first,) then units of the strata in the plan's order, each unit's members
        one after the other."""
        device, plan, m = self.present.device, self.plans[i], self.m[i]
        first = self.counts[i] == 0
        units = (n - (2 if first else 0)) // self.members
        if m not in self._binom:
            self._binom[m] = shapley.binomial_table(m, device)
        add, before = plan.allocate(units)
        z, strata = plan.draw(add, before, self.generators[i], self._binom[m])
        self._pending[i] = strata
        if self.members == 2:
            z = torch.stack([z, ~z], dim=1).reshape(-1, m)
        if first:
            ends = torch.tensor([[True], [False]], device=device).expand(2, m)
            z = torch.cat([ends, z])
        rows = torch.zeros(z.shape[0], self.present.shape[1], dtype=torch.bool, device=device)
        return rows.index_copy_(1, self.ids[i, :m], z)

    def record(self, i: int, rows: Tensor, scores: Tensor) -> None:
        y = scores.to(torch.float64)
        if self.counts[i] == 0:
            self.f[i] = y[:2]
            rows, y = rows[2:], y[2:]
        strata = self._pending[i]
        assert strata is not None
        u0, u = self.drawn[i], strata.shape[0]
        self.units[i, u0 : u0 + u] = rows[:: self.members]
        self.strata[i, u0 : u0 + u] = strata
        self.y[i, u0 : u0 + u] = y.view(u, self.members)
        self.drawn[i] = u0 + u
        self.counts[i] += scores.shape[0]

    def fit(self) -> _Fit:
        device = self.present.device
        b, u, s = self.units.shape
        tables = [p.stratum_tables() for p in self.plans]
        j = max([len(t[0]) for t in tables] + [1])
        weight = torch.tensor(
            [w + [0.0] * (j - len(w)) for w, _ in tables], dtype=torch.float64, device=device
        )
        gamma = torch.tensor(
            [g + [0.0] * (j - len(g)) for _, g in tables], dtype=torch.float64, device=device
        )
        valid = (
            torch.arange(u, device=device)[None, :]
            < torch.tensor(self.drawn, device=device)[:, None]
        )
        first = self.units.to(torch.float64)
        p = self.present.to(torch.float64)[:, None, :]
        members = [first] + ([p - first] if self.members == 2 else [])
        z = torch.stack(members, dim=2)  # [B, U, members, S]
        w = (weight.gather(1, self.strata) * valid)[..., None].expand(b, u, self.members)
        f1, f0 = self.f[:, 0], self.f[:, 1]
        zr, wr = z.reshape(b, -1, s), w.reshape(b, -1)
        phi, m, _ = shapley.efficient_wls(zr, self.y.reshape(b, -1), wr, f0, f1, self.present)
        resid = self.y - f0[:, None, None] - (z @ phi[:, None, :, None]).squeeze(-1)
        se = shapley.kernelshap_stderr(z, resid, self.strata, valid, gamma, m)
        if self.surrogate:
            phi, se = self._control_variate(z, w, valid, gamma, m, phi, se)
        estimable = torch.tensor([p.estimable() for p in self.plans], device=device)[:, None]
        se = torch.where(estimable | ~self.present, se, math.inf)
        yr = self.y.reshape(b, -1)
        pred = f0[:, None] + (zr @ phi[:, :, None]).squeeze(2)
        r2 = shapley.weighted_r2(yr, pred, wr)
        return _Fit(phi, f0, r2, se)

    def _control_variate(
        self, z: Tensor, w: Tensor, valid: Tensor, gamma: Tensor, m: Tensor, phi: Tensor, se: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The regression-adjusted estimate: a logistic-additive surrogate ``g`` of the game,
        fitted to the drawn scores, whose Shapley values are computed (exactly, or by many
        cheap permutations), plus the stratified estimate of the residual game ``v - g`` on
        the same design. Taken per image where its estimated variance (the residual game's
        plus the permutations') is below the plain estimate's; an enumerated image keeps the
        plain (exact) values."""
        b, _, _, s = z.shape
        f1, f0 = self.f[:, 0], self.f[:, 1]
        yr, wr, zr = self.y.reshape(b, -1), w.reshape(b, -1), z.reshape(b, -1, s)
        theta = shapley.logistic_surrogate(zr, yr, wr, f0, f1, self.present)
        c, beta = theta[:, :1], theta[:, 1:]
        g = torch.sigmoid(c[:, :, None] + (z @ beta[:, None, :, None]).squeeze(-1))
        g1 = torch.sigmoid(c[:, 0] + beta.sum(1))
        g0 = torch.sigmoid(c[:, 0])
        rest = self.y - g
        r1, r0 = f1 - g1, f0 - g0
        phi_r, _, _ = shapley.efficient_wls(zr, rest.reshape(b, -1), wr, r0, r1, self.present)
        resid = rest - r0[:, None, None] - (z @ phi_r[:, None, :, None]).squeeze(-1)
        se_r = shapley.kernelshap_stderr(z, resid, self.strata, valid, gamma, m)
        device = self.present.device
        for i, mi in enumerate(self.m):
            if mi > shapley.SURROGATE_EXACT_PLAYERS and self._orders[i] is None:
                self._orders[i] = shapley.antithetic_orders(mi, self.generators[i], device)
        phi_g, var_g = shapley.logistic_shapley(theta, self.m, self.ids, self._orders)
        phi_cv = phi_g + phi_r
        se_cv = (se_r**2 + var_g).sqrt()
        exhausted = torch.tensor([p.exhausted for p in self.plans], device=device)
        better = (se_cv**2).sum(1) < (se**2).sum(1)
        use = (better & ~exhausted & torch.isfinite(phi_cv).all(1))[:, None]
        return torch.where(use, phi_cv, phi), torch.where(use, se_cv, se)


def _positive_or_none(options: dict[str, Any], name: str) -> float | None:
    if options[name] is None:
        return None
    return _real_option(options, name, low=0.0, low_open=True)


def _budget_error(
    budget_ms: float, spent: float, first: int, total: int, per_input: float, source: str
) -> BudgetTooSmall:
    need = spent + total * per_input
    return BudgetTooSmall(
        f"`budget_ms`={budget_ms:g} cannot hold the minimum useful work: the segmentation and "
        f"the unperturbed forward took {spent * 1e3:.0f} ms, and the first round "
        f"({first} evaluation(s) per image, {total} model inputs) needs about "
        f"{total * per_input * 1e3:.0f} ms more at {per_input * 1e3:.2f} ms per input "
        f"({source}), ~{need * 1e3:.0f} ms in all; give a budget of at least that, explain "
        f"fewer images per call, use fewer superpixels (`n_segments`) or a faster forward "
        f"path (xai_serve.tune)"
    )


def _run_rounds(
    request: Request,
    setup: _SuperpixelSetup,
    sampler: _LimeSampler | _ShapSampler,
    method: str,
    started: float,
) -> Explanation:
    """Draw, evaluate and fit in rounds until every image is done: it has used its
    ``samples``, its design is exhausted (exact KernelSHAP), every used id's standard error is
    at most ``tolerance``, or the next round does not fit ``budget_ms``."""
    opts = request.options
    tolerance = _positive_or_none(opts, "tolerance")
    budget_ms = _positive_or_none(opts, "budget_ms")
    budget = None if budget_ms is None else budget_ms / 1e3
    b = setup.present.shape[0]
    copies = setup.copies  # sampler index of copy t of image i: i * copies + t
    device = setup.present.device
    stopped = [False] * b
    per_input = None
    if budget is not None:
        if request.path.images_per_s:
            per_input, source = 1.0 / request.path.images_per_s, "the forward path's throughput"
        else:
            per_input, source = setup.forward_s / b, "the unperturbed forward's time"
    spent_rounds, inputs_done = 0.0, 0
    fit = None
    first_round = True
    limited = False  # whether the budget cut a round short or ended the sampling
    while True:
        active = [i for i in range(b) if not (stopped[i] or sampler.done(i * copies))]
        if not active:
            break
        sizes = {i: sampler.planned(i * copies) for i in active}
        if budget is not None and per_input is not None:
            _sync(device)
            spent = time.perf_counter() - started
            left = budget - spent
            total = sum(sizes.values())
            if total * per_input > left:
                limited = True
                fit_rows = int(left / per_input / len(active))
                fit_rows -= fit_rows % sampler.granularity
                if first_round:  # a smaller first round, if the least one fits
                    least = {i: sampler.least(i * copies) for i in active}
                    if fit_rows < max(least.values()):
                        first, need = max(least.values()), sum(least.values())
                        raise _budget_error(budget_ms, spent, first, need, per_input, source)
                elif fit_rows < 2 * sampler.granularity:
                    break
                sizes = {i: sampler.planned(i * copies, fit_rows) for i in active}
        t0 = time.perf_counter()
        drawn: dict[int, list[Tensor]] = {}
        for i in active:
            if sizes[i] > 0:  # every copy draws (alike), to keep its generator and plan
                drawn[i] = [sampler.draw(i * copies + t, sizes[i]) for t in range(copies)]
        rows: list[Tensor | None] = [drawn[i][0] if i in drawn else None for i in range(b)]
        scores = _round_scores(request, setup, rows)
        for i, parts in drawn.items():
            score = scores[i]
            assert score is not None
            for t, part in enumerate(parts):
                sampler.record(i * copies + t, part, score[:, t])
        fit = sampler.fit()
        if tolerance is not None:  # an image stops once every target's errors are small
            ok = ((fit.stderr <= tolerance) | ~sampler.present).all(1)
            ok = ok.view(b, copies).all(1).tolist()
            for i in active:
                stopped[i] = stopped[i] or bool(ok[i])
        _sync(device)
        spent_rounds += time.perf_counter() - t0
        inputs_done += sum(sizes.values())
        per_input = spent_rounds / max(inputs_done, 1)
        first_round = False
        if request.progress is not None:
            request.progress(_explanation(request, setup, sampler, fit, method, partial=True))
    if fit is None:  # nothing to sample: every image is done before a round
        fit = sampler.fit()
    final = _explanation(request, setup, sampler, fit, method, partial=False)
    final.budget_limited = limited
    return final


def _explanation(
    request: Request,
    setup: _SuperpixelSetup,
    sampler: _LimeSampler | _ShapSampler,
    fit: _Fit,
    method: str,
    partial: bool,
) -> Explanation:
    weights = fit.weights.float()
    copies = setup.copies
    counts = torch.tensor(sampler.counts[::copies], dtype=torch.int64, device=setup.present.device)
    segments = setup.segments
    maps = _segment_map(weights, segments.repeat_interleave(copies, 0) if copies > 1 else segments)
    return Explanation(
        maps=_per_target(maps, request, copies),
        targets=setup.targets if request.multi else setup.targets[:, 0],
        logits=setup.logits,
        method=method,
        segments=segments,
        weights=_per_target(weights, request, copies),
        intercept=_per_target(fit.intercept.float(), request, copies),
        score=_per_target(fit.score.float(), request, copies),
        samples=max(sampler.counts),
        seeds=request.seeds_tensor(),
        stderr=_per_target(fit.stderr.float(), request, copies),
        sample_counts=counts,
        partial=partial,
        foils=request.foil,
    )


def _per_target(values: Tensor, request: Request, copies: int) -> Tensor:
    """``values`` of the ``B * T`` copies (image-major) as ``[B, T, ...]`` with several targets
    per image, else as ``[B, ...]`` (``T`` = 1)."""
    shaped = values.view(-1, copies, *values.shape[1:])
    return shaped if request.multi else shaped[:, 0]


# --------------------------------------------------------------------------- methods


_SEGMENT_OPTIONS: dict[str, Any] = {
    "segmenter": "slic",
    "n_segments": 25,
    "blur_sigma": 5.0,
    "output": "probability",
    "amp": "auto",
}

_ROUND_OPTIONS: dict[str, Any] = {"tolerance": None, "budget_ms": None}


class _SuperpixelSetup:
    """What LIME and KernelSHAP share: options, segments, baseline, targets, logits, and the
    time the unperturbed forward took (``forward_s``)."""

    def __init__(self, request: Request, method: str) -> None:
        opts = request.options
        self.output = choice_option(opts, "output", OUTPUTS)
        self.amp = amp_option(opts, request.path)
        sigma = _real_option(opts, "blur_sigma", low=0.0, low_open=True)
        _positive_or_none(opts, "tolerance")
        _positive_or_none(opts, "budget_ms")
        _check_image_dtype(request.images, method)
        images = request.images.detach()
        given = request.baseline  # checked before the (costlier) segmentation
        baseline = None if given is None else _baseline(given, images, sigma, 0.0)
        self.segments, self.num_segments = _request_segments(request, opts)
        self.baseline: Tensor | float = (
            ops.segment_mean(images, self.segments, self.num_segments, validate=False)
            if baseline is None
            else baseline
        )
        self.present = _present(self.segments, self.num_segments)
        _sync(images.device)
        t0 = time.perf_counter()
        self.logits, _ = unperturbed_logits(request, self.amp, _chunk_size(request), "perturbation")
        _sync(images.device)
        self.forward_s = time.perf_counter() - t0
        self.targets = target_matrix(request, self.logits)  # [B, T]
        self.foil = request.foil
        self.copies = self.targets.shape[1]

    def sampler_view(self) -> _Copies:
        """What a sampler sees: ``copies`` (``T``) identical copies of every image, image-major
        (copy ``t`` of image ``i`` is sampler index ``i * T + t``), one per target: they draw
        the same coalitions, which are evaluated once, and each fits its own target's scores."""
        return _Copies(
            self.present.repeat_interleave(self.copies, 0), self.output, self.foil is not None
        )

    def generators(self, request: Request) -> list[torch.Generator]:
        """Every copy's generator, seeded with its image's seed (so copies draw alike)."""
        device = request.images.device
        return [
            torch.Generator(device=device).manual_seed(seed)
            for seed in request.seeds
            for _ in range(self.copies)
        ]


@dataclass
class _Copies:
    present: Tensor
    output: str
    contrast: bool  # the scores are target minus foil


_ROUNDS_DOC = """
    Rounds. The samples are drawn, evaluated and fitted in rounds of
    :func:`round_samples` evaluations per image (``max(64, ceil(samples / 8))``; it depends
    on the options, never on the batch), each image from its own generator; the rounds of all
    images that are still running share the forwards (``batch_size`` inputs each). After each
    round the surrogate is solved and every weight's standard error estimated
    (:attr:`Explanation.stderr`, see :mod:`xai_serve.explainers.shapley`); an image stops when
    it has used ``samples`` evaluations, when every used superpixel's standard error is at
    most ``tolerance``, or when the next round would not fit ``budget_ms``; a stopped image
    takes no further forwards. ``request.progress``, if set, receives a partial
    :class:`Explanation` (``partial=True``, every image's current weights, maps, standard
    errors and sample counts) after every round; the last one holds the values that are
    returned (with ``partial=False``).

    Time budget. ``budget_ms`` counts from the start of the call (segmentation and the
    unperturbed forward included). Before the first round, its time is estimated from the
    forward path's measured throughput (``request.path.images_per_s``) or else from the time
    of the unperturbed forward; a first round that does not fit is shrunk to what fits, down to
    the least round that gives standard errors (LIME: 64 samples; KernelSHAP: the full and
    empty coalitions and every stratum's minimum), and if not even that fits the call raises
    :class:`~xai_serve.errors.BudgetTooSmall` (an ``InvalidInput``) before sampling anything.
    Before every later round, its time is estimated from the time per model input measured so
    far (the device synchronised before the clock is read); a round that does not fit is
    shrunk to what fits (or not run), and the call returns what it has, with its standard
    errors (:attr:`Explanation.budget_limited` is then True).
"""


@register("lime")
class Lime(Explainer):
    """LIME for images (Ribeiro et al., 2016), as ``lime.lime_image``, batched.

    Per image: up to ``samples`` coalitions of its superpixels (row 0 keeps all of them, the
    others keep each with probability ``keep_prob``), the target's score on each perturbed
    image, sample weights ``sqrt(exp(-d^2 / kernel_width^2))`` with ``d`` the cosine distance to
    the all-kept coalition (lime's kernel), and a weighted ridge regression of the scores on
    the coalitions with an unpenalised intercept (``sklearn.linear_model.Ridge(alpha)`` fitted
    with ``sample_weight``; lime's default explanation model, all features). The standard
    errors are the HC3 sandwich of the ridge (the rows are i.i.d.).
    {rounds}
    Request fields:
        segments: ``Tensor[B, H, W]`` superpixel ids, or None to compute them (options
            ``segmenter``, ``n_segments``).
        baseline: None (superpixel mean colour), ``"blur"``, a number or
            ``Tensor[B or 1, C, H, W]``; see the module doc.
        batch_size: perturbed images per forward (default 64).
        seed: seeds each image's coalitions (per image; see :func:`xai_serve.explain`).
        progress: called with a partial :class:`Explanation` after every round.

    Options:
        samples: the most coalitions per image (>= 2), the first being the original image.
            Default 384: over the default 25 superpixels, two seeds then rank them alike
            (mean Spearman correlation of the weights 0.92-0.95 on three photos on
            EfficientNet-Lite0, in a quarter of the time 256 samples over 50 superpixels took
            on the old fp32 path; ``benchmarks/results/2026-12-07-cpu-stability.md``).
        kernel_width: lime's kernel width (> 0; lime_image's default 0.25).
        alpha: ridge penalty (>= 0).
        keep_prob: probability that a sampled coalition keeps a superpixel (in (0, 1)).
        tolerance: None (run all ``samples``) or > 0: an image stops after the first round
            at which the standard error of every superpixel it uses is at most this.
        budget_ms: None or > 0: the call plans its rounds to finish within this many
            milliseconds of wall time (see above).
        segmenter, n_segments: ``"slic"`` (default) or ``"grid"``, and the number of
            superpixels asked for (default 25), when the request has no ``segments``. More
            superpixels need many more samples for a ranking that does not depend on the seed
            (at 50 and 256 samples two seeds agreed at 0.64-0.77, same benchmark).
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline.
        output: ``"probability"`` (default, as lime) or ``"logit"``.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast dtype of the forwards.

    Explanation: ``weights`` ``[B, S]`` (the ridge coefficients), ``stderr`` (their standard
    errors; ``inf`` while an image has no more drawn rows than used ids + 1), ``maps`` (each
    pixel gets its superpixel's weight), ``intercept`` and ``score`` (the surrogate's weighted
    R^2 on its own samples, lime's ``score``), ``segments``, ``sample_counts`` (per image),
    ``samples`` (their largest), ``seeds``.
    """

    uses_layer = False
    multi_target = True
    needs_gradients = False
    black_box = True
    takes_baseline = True
    takes_blur_baseline = True
    randomised = True
    produces_segments = True
    options: ClassVar[dict[str, Any]] = {
        "samples": 384,
        "kernel_width": 0.25,
        "alpha": 1.0,
        "keep_prob": 0.5,
        **_ROUND_OPTIONS,
        **_SEGMENT_OPTIONS,
    }

    def explain(self, request: Request) -> Explanation:
        started = time.perf_counter()
        opts = request.options
        samples = int_option(opts, "samples", 2)
        width = _real_option(opts, "kernel_width", low=0.0, low_open=True)
        alpha = _real_option(opts, "alpha", low=0.0, low_open=False)
        keep_prob = _real_option(opts, "keep_prob", low=0.0, low_open=True, high=1.0)
        setup = _SuperpixelSetup(request, self.name)
        sampler = _LimeSampler(
            setup.sampler_view(), samples, keep_prob, width, alpha, setup.generators(request)
        )
        return _run_rounds(request, setup, sampler, self.name, started)


@register("kernelshap")
class KernelShap(Explainer):
    """KernelSHAP (Lundberg & Lee, 2017) over superpixels, batched, with a stratified design.

    The Shapley values ``phi`` of the game ``v(z) = score(image with the superpixels outside z
    replaced by the baseline)`` are estimated by the Shapley-kernel weighted linear regression
    ``v(z) ~ v(0) + z . phi`` under the efficiency constraint ``sum(phi) = v(1) - v(0)``, held
    exactly (a Lagrange multiplier). ``v(1)`` (the original image) and ``v(0)`` (all
    baseline) are evaluated by the model with the first round.

    The coalitions of an image's ``m`` used superpixels are stratified by size (sizes ``k``
    and ``m - k`` together when ``paired``): every stratum is sampled without replacement,
    its coalitions weighted by the Shapley kernel times the stratum's inverse sampling
    fraction, and the samples are given to the strata in a fixed order that depends on ``m``
    only (:class:`xai_serve.explainers.shapley.StrataPlan`): every stratum gets 2 units first,
    then each the share of its Shapley-kernel mass, so that the strata of the smallest and
    largest coalitions are enumerated completely (as ``shap.KernelExplainer`` does) and a run
    cut short has the allocation of its size. With ``2^m <= samples`` every coalition is
    enumerated and ``phi`` are the exact Shapley values (standard errors 0). Paired units, a
    coalition and its complement, make the estimate exact for games whose interactions are of
    order 2 at most.
    {rounds}
    Request fields: as :class:`Lime` (segments, baseline, batch_size, seed, progress).

    Options:
        samples: the most model evaluations per image, the full and empty coalitions
            included (>= 2). Default 512: over the default 25 superpixels, two seeds then
            rank them alike (mean Spearman 0.95-0.97 on three photos on EfficientNet-Lite0;
            0.76-0.87 over 50; ``benchmarks/results/2026-12-07-cpu-stability.md``).
        paired: antithetic sampling, each coalition with its complement.
        tolerance, budget_ms: as :class:`Lime`.
        segmenter, n_segments, blur_sigma, output, amp: as :class:`Lime`.

    Explanation: ``weights`` = ``phi`` ``[B, S]`` (0 for ids an image does not use),
    ``stderr`` (0 for enumerated images; ``inf`` while a stratum that is not enumerated
    holds fewer than 2 units), ``maps``, ``intercept`` = ``v(0)``, ``score`` = the weighted R^2
    of the fit on the drawn coalitions, ``segments``, ``sample_counts`` (per image),
    ``samples`` (their largest), ``seeds``.
    """

    uses_layer = False
    multi_target = True
    needs_gradients = False
    black_box = True
    takes_baseline = True
    takes_blur_baseline = True
    randomised = True
    produces_segments = True
    options: ClassVar[dict[str, Any]] = {
        "samples": 512,
        "paired": True,
        **_ROUND_OPTIONS,
        **_SEGMENT_OPTIONS,
    }

    def explain(self, request: Request) -> Explanation:
        started = time.perf_counter()
        opts = request.options
        samples = int_option(opts, "samples", 2)
        paired = bool_option(opts, "paired")
        setup = _SuperpixelSetup(request, self.name)
        sampler = _ShapSampler(setup.sampler_view(), samples, paired, setup.generators(request))
        return _run_rounds(request, setup, sampler, self.name, started)


Lime.__doc__ = (Lime.__doc__ or "").replace("{rounds}", _ROUNDS_DOC)
KernelShap.__doc__ = (KernelShap.__doc__ or "").replace("{rounds}", _ROUNDS_DOC)


def _window_starts(size: int, window: int, stride: int, device: torch.device) -> Tensor:
    """``Tensor[n, size]`` bool: the pixels of each window along one axis. As captum:
    ``n = ceil((size - window) / stride) + 1`` windows starting at ``i * stride``, the last
    clipped at the border."""
    n = math.ceil((size - window) / stride) + 1
    start = torch.arange(n, device=device)[:, None] * stride
    pos = torch.arange(size, device=device)[None, :]
    return (pos >= start) & (pos < start + window)


@register("occlusion")
class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus, 2014): slide a square patch of the baseline over the image.

    Windows of ``window x window`` pixels (all channels) start every ``stride`` pixels; as in
    captum, there are ``ceil((H - window) / stride) + 1`` rows of them (the last clipped at the
    border), likewise for columns, so every pixel is covered. A window larger than the image is
    shrunk to it. The map of a pixel is ``C`` times the mean, over the windows that cover it, of
    ``score(x) - score(x with the window occluded)``: captum's
    ``Occlusion(model).attribute(x, sliding_window_shapes=(C, window, window),
    strides=(C, stride, stride), baselines=b, target=t)`` summed over channels.

    Request fields:
        baseline: what an occluded pixel becomes: None (0, captum's default), ``"blur"``, a
            number or ``Tensor[B or 1, C, H, W]``.
        batch_size: occluded images per forward (default 64); windows of several images share
            forwards.

    Options:
        window, stride: in pixels (>= 1).
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline.
        output: ``"probability"`` (default) or ``"logit"``.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast dtype of the forwards.

    :attr:`Explanation.samples` is the number of windows per image.
    """

    uses_layer = False
    multi_target = True
    needs_gradients = False
    black_box = True
    takes_baseline = True
    takes_blur_baseline = True
    options: ClassVar[dict[str, Any]] = {
        "window": 16,
        "stride": 8,
        "blur_sigma": 5.0,
        "output": "probability",
        "amp": "auto",
    }

    def explain(self, request: Request) -> Explanation:
        opts = request.options
        window = int_option(opts, "window", 1)
        stride = int_option(opts, "stride", 1)
        sigma = _real_option(opts, "blur_sigma", low=0.0, low_open=True)
        output = choice_option(opts, "output", OUTPUTS)
        amp = amp_option(opts, request.path)
        if request.segments is not None:
            raise InvalidInput(f"method {self.name!r} does not take `segments`")
        _check_image_dtype(request.images, self.name)
        images = request.images.detach()
        _, c, h, w = images.shape
        baseline = _baseline(request.baseline, images, sigma, 0.0)
        rows = _window_starts(h, min(window, h), stride, images.device)  # [ny, H]
        cols = _window_starts(w, min(window, w), stride, images.device)  # [nx, W]
        ny, nx = rows.shape[0], cols.shape[0]
        logits, _ = unperturbed_logits(request, amp, _chunk_size(request), "perturbation")
        targets = target_matrix(request, logits)  # [B, T]

        def make_piece(b0: int, b1: int, r0: int, r1: int) -> Tensor:
            win = torch.arange(r0, r1, device=images.device)
            iy = torch.div(win, nx, rounding_mode="floor")
            mask = rows[iy][:, None, :, None] & cols[win - iy * nx][:, None, None, :]
            base = _batch_slice(baseline, b0, b1)
            fill = base[:, None] if isinstance(base, Tensor) else base
            out = torch.where(mask[None], fill, images[b0:b1, None])  # [b, windows, C, H, W]
            return out.reshape(-1, c, h, w)

        occluded = _chunked_scores(request, ny * nx, make_piece, targets, output, amp)
        plain = _score(logits, targets, output, request.foil)  # [B, T]
        drop = (plain[:, None, :] - occluded).permute(0, 2, 1).reshape(*targets.shape, ny, nx)
        rows_f, cols_f = rows.float(), cols.float()
        total = torch.einsum("yh,btyx,xw->bthw", rows_f, drop, cols_f)
        cover = rows_f.sum(0)[:, None] * cols_f.sum(0)[None, :]
        maps, targets = per_target_maps(request, (c * total / cover).flatten(0, 1), targets)
        return Explanation(
            maps=maps,
            targets=targets,
            logits=logits,
            method=self.name,
            samples=ny * nx,
            foils=request.foil,
        )
