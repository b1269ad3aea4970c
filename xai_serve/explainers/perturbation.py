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
unperturbed images. Only one chunk of images exists at a time. (KernelSHAP's ``N`` is the
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

import math
import numbers
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from xai_serve import ops
from xai_serve.errors import InvalidInput, Unavailable
from xai_serve.explainers._options import amp_option, bool_option, choice_option, int_option
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    register,
    unperturbed_logits,
)

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "OUTPUTS",
    "SEGMENTERS",
    "KernelShap",
    "Lime",
    "Occlusion",
    "gaussian_blur",
]

DEFAULT_BATCH_SIZE = 64
"""Perturbed inputs per forward pass when the request gives no ``batch_size``."""

SEGMENTERS = ("slic", "grid")
"""Values of the ``segmenter`` option (used when the request gives no ``segments``)."""

OUTPUTS = ("probability", "logit")
"""Values of the ``output`` option: what score of the target class is explained."""

_IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SOLVE_JITTER = 1e-10  # relative ridge that keeps underdetermined normal equations solvable


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


def _score(logits: Tensor, targets: Tensor, output: str) -> Tensor:
    """float32 ``Tensor[n]``: the target's probability or logit."""
    z = logits.float()
    if output == "probability":
        z = torch.softmax(z, dim=1)
    return z.gather(1, targets[:, None]).squeeze(1)


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
    """``Tensor[B, per_image]`` float32 scores of the ``B * per_image`` perturbed inputs that
    ``make_piece(b0, b1, r0, r1)`` builds (image-major), ``batch_size`` inputs per forward."""
    b = request.images.shape[0]
    total, chunk = b * per_image, _chunk_size(request)
    scores = torch.empty(total, dtype=torch.float32, device=request.images.device)
    rows = torch.arange(total, device=request.images.device)
    with torch.no_grad():
        for s in range(0, total, chunk):
            e = min(s + chunk, total)
            parts = [make_piece(*p) for p in _pieces(s, e, per_image)]
            x = parts[0] if len(parts) == 1 else torch.cat(parts)
            logits = request.forward(x, amp, "perturbation")
            image_idx = torch.div(rows[s:e], per_image, rounding_mode="floor")
            scores[s:e] = _score(logits, targets[image_idx], output)
    return scores.view(b, per_image)


def _coalition_scores(
    request: Request,
    segments: Tensor,
    keep: Tensor,
    baseline: Tensor | float,
    targets: Tensor,
    output: str,
    amp: torch.dtype | None,
) -> Tensor:
    """``Tensor[B, N]`` float32: the target's score on image ``b`` under coalition
    ``keep[b, n]`` (``Tensor[B, N, S]`` bool), masked by :func:`ops.superpixel_mask`."""
    images = request.images.detach()

    def make_piece(b0: int, b1: int, r0: int, r1: int) -> Tensor:
        return ops.superpixel_mask(
            images[b0:b1],
            segments[b0:b1],
            keep[b0:b1, r0:r1],
            _batch_slice(baseline, b0, b1),
            validate=False,
        )

    return _chunked_scores(request, keep.shape[1], make_piece, targets, output, amp)


# --------------------------------------------------------------------------- surrogates


def _weighted_r2(y: Tensor, pred: Tensor, w: Tensor) -> Tensor:
    """Weighted coefficient of determination per row, as sklearn's ``r2_score`` with
    ``sample_weight`` (a constant target gives 1 if predicted exactly, else 0)."""
    sw = w.sum(1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
    ybar = (w * y).sum(1, keepdim=True) / sw
    num = (w * (y - pred) ** 2).sum(1)
    den = (w * (y - ybar) ** 2).sum(1)
    safe = torch.where(den > 0, den, 1.0)
    return torch.where(den > 0, 1.0 - num / safe, torch.where(num > 0, 0.0, 1.0))


def _mask_absent(a: Tensor, r: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
    """Replace the rows and columns of unused ids by the identity (their solution is 0)."""
    absent = ~present
    a = a.masked_fill(absent[:, :, None] | absent[:, None, :], 0.0)
    a = a + torch.diag_embed(absent.to(a.dtype))
    return a, r.masked_fill(absent, 0.0)


def _jitter(a: Tensor, present: Tensor) -> Tensor:
    """A ridge of ``_SOLVE_JITTER`` times the mean diagonal on the used ids, which keeps a
    normal matrix of too few (or collinear) samples invertible and moves a well-posed solution
    by a relative ~1e-10."""
    p = present.to(a.dtype)
    diag = torch.diagonal(a, dim1=1, dim2=2)
    scale = (diag * p).sum(1) / p.sum(1).clamp_min(1.0)
    scale = torch.where(scale > 0, scale, 1.0)
    return a + torch.diag_embed(_SOLVE_JITTER * scale[:, None] * p)


def _weighted_ridge(
    z: Tensor, y: Tensor, w: Tensor, alpha: float, present: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted ridge regression with an unpenalised intercept, batched over images.

    ``z``: ``Tensor[B, N, S]``, ``y``, ``w``: ``Tensor[B, N]`` (float64); ``present``:
    ``Tensor[B, S]`` bool (unused ids get coefficient 0). As sklearn's
    ``Ridge(alpha).fit(z, y, sample_weight=w)``: centre ``z`` and ``y`` by their weighted means,
    solve ``(Zc^T W Zc + alpha I) b = Zc^T W yc``, intercept ``ybar - zbar . b``.

    Returns ``(coef [B, S], intercept [B], weighted R^2 on the same data [B])``, float64.
    """
    z = z * present[:, None, :].to(z.dtype)
    sw = w.sum(1, keepdim=True)
    zbar = (w[:, :, None] * z).sum(1) / sw  # [B, S]
    ybar = (w * y).sum(1, keepdim=True) / sw  # [B, 1]
    zc, yc = z - zbar[:, None, :], y - ybar
    zw = zc * w[:, :, None]
    a = zw.transpose(1, 2) @ zc
    r = (zw.transpose(1, 2) @ yc[:, :, None]).squeeze(2)
    a = a + alpha * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    a, r = _mask_absent(a, r, present)
    if alpha == 0:
        a = _jitter(a, present)
    coef = torch.linalg.solve(a, r)
    intercept = ybar.squeeze(1) - (zbar * coef).sum(1)
    pred = intercept[:, None] + (z @ coef[:, :, None]).squeeze(2)
    return coef, intercept, _weighted_r2(y, pred, w)


def _efficient_least_squares(
    z: Tensor, y: Tensor, w: Tensor, f0: Tensor, f1: Tensor, present: Tensor
) -> tuple[Tensor, Tensor]:
    """KernelSHAP's constrained weighted least squares, batched over images.

    Minimises ``sum_n w[n] (y[n] - f0 - z[n] . phi)^2`` subject to
    ``sum(phi over used ids) = f1 - f0`` through the KKT system
    ``[[Z^T W Z, 1], [1^T, 0]] [phi; lam] = [Z^T W (y - f0); f1 - f0]`` (a Lagrange multiplier),
    so efficiency holds to the solver's precision. Unused ids get ``phi = 0``.

    ``z``: ``Tensor[B, N, S]``; ``y``, ``w``: ``Tensor[B, N]``; ``f0``, ``f1``: ``Tensor[B]``
    (float64). Returns ``(phi [B, S], weighted R^2 of f0 + z . phi on the weighted rows [B])``.
    """
    b, _, s = z.shape
    p = present.to(z.dtype)
    z = z * p[:, None, :]
    yp = y - f0[:, None]
    zw = z * w[:, :, None]
    a = zw.transpose(1, 2) @ z
    r = (zw.transpose(1, 2) @ yp[:, :, None]).squeeze(2)
    a, r = _mask_absent(a, r, present)
    a = _jitter(a, present)
    kkt = torch.zeros(b, s + 1, s + 1, dtype=z.dtype, device=z.device)
    kkt[:, :s, :s] = a
    kkt[:, :s, s] = p
    kkt[:, s, :s] = p
    rhs = torch.cat([r, (f1 - f0)[:, None]], dim=1)
    phi = torch.linalg.solve(kkt, rhs)[:, :s]
    pred = f0[:, None] + (z @ phi[:, :, None]).squeeze(2)
    return phi, _weighted_r2(y, pred, w)


# --------------------------------------------------------------------------- coalitions


def _used_ids(present: Tensor) -> tuple[list[int], Tensor]:
    """``(m, ids)``: ``m[i]`` the number of ids image ``i`` uses (one host sync, at setup) and
    ``Tensor[B, S]`` int64 whose row ``i`` starts with those ids, ascending."""
    counts = present.sum(1).tolist()
    ids = (~present).to(torch.uint8).argsort(dim=1, stable=True)
    return [int(m) for m in counts], ids


def _lime_coalitions(
    present: Tensor, samples: int, keep_prob: float, generators: list[torch.Generator]
) -> Tensor:
    """``Tensor[B, samples, S]`` bool: row 0 keeps every used superpixel (the original image,
    as lime's first sample), the others keep each used superpixel with ``keep_prob``.

    Image ``i`` draws ``rand(samples, m_i)`` over its ``m_i`` used ids (ascending) from
    ``generators[i]`` alone, so its coalitions do not depend on the other images."""
    b, s = present.shape
    counts, ids = _used_ids(present)
    keep = torch.zeros(b, samples, s, dtype=torch.bool, device=present.device)
    for i, (m, g) in enumerate(zip(counts, generators, strict=True)):
        draws = torch.rand(samples, m, generator=g, device=present.device) < keep_prob
        draws[0] = True
        keep[i].index_copy_(1, ids[i, :m], draws)
    return keep


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


def _shapley_kernel(m: int) -> Tensor:
    """float64 ``Tensor[m + 1]``: ``pi(k) = (m - 1) / (C(m, k) k (m - k))``, 0 for k in {0, m}."""
    pi = [0.0] * (m + 1)
    for k in range(1, m):
        pi[k] = (m - 1) / (math.comb(m, k) * k * (m - k))
    return torch.tensor(pi, dtype=torch.float64)


def _exact_coalitions(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """All ``2^m`` coalitions of ``m`` players, ``Tensor[2^m, m]`` bool, and their Shapley-kernel
    weights ``Tensor[2^m]`` float64. Row 0 is the full coalition, row 1 the empty one (both of
    weight 0), then ``n = 1 .. 2^m - 2`` (keeping the players whose bit is set in ``n``)."""
    n = 1 << m
    codes = torch.cat(
        [torch.tensor([n - 1, 0], device=device), torch.arange(1, n - 1, device=device)]
    )
    keep = (codes[:, None] & (1 << torch.arange(m, device=device))) != 0
    return keep, _shapley_kernel(m).to(device)[keep.sum(1)]


def _sampled_coalitions(
    m: int, samples: int, paired: bool, generator: torch.Generator, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``samples`` coalitions of ``m >= 2`` players, ``Tensor[samples, m]`` bool, and their
    regression weights ``Tensor[samples]`` float64: row 0 full, row 1 empty (weight 0), then
    ``samples - 2`` draws of equal weight, each a size ``k`` from
    ``P(k) ~ (m - 1) / (k (m - k))``, ``0 < k < m``, then ``k`` players uniformly (each
    followed by its complement when ``paired``), all from ``generator``."""
    draws = samples - 2
    pairs = (draws + 1) // 2 if paired else draws
    keep = torch.ones(samples, m, dtype=torch.bool, device=device)
    keep[1] = False
    if pairs > 0:
        k = torch.arange(1, m, device=device, dtype=torch.float64)
        probs = (m - 1.0) / (k * (m - k))
        sizes = torch.multinomial(probs, pairs, replacement=True, generator=generator) + 1
        noise = torch.rand(pairs, m, generator=generator, device=device, dtype=torch.float64)
        kth = noise.sort(dim=1).values.gather(1, (sizes - 1)[:, None])
        drawn = noise <= kth
        if paired:
            drawn = torch.stack([drawn, ~drawn], dim=1).reshape(2 * pairs, m)[:draws]
        keep[2:] = drawn
    weights = torch.full((samples,), 1.0 / max(draws, 1), dtype=torch.float64, device=device)
    weights[:2] = 0.0
    return keep, weights


def _kernelshap_coalitions(
    present: Tensor, samples: int, paired: bool, generators: list[torch.Generator]
) -> tuple[Tensor, Tensor, list[bool]]:
    """Coalitions and regression weights of KernelSHAP, chosen and drawn per image.

    Image ``i`` uses ``m_i`` ids (the others are left out of every coalition and get
    ``phi = 0``). Exact (``2^m_i <= samples``): all ``2^m_i`` coalitions of its used ids,
    weighted by the Shapley kernel of ``m_i`` players, so the solution is the exact Shapley
    values of its superpixels (:func:`_exact_coalitions`). Sampled: ``samples`` rows of
    :func:`_sampled_coalitions` over its used ids, drawn from ``generators[i]``; a size ``k``
    is drawn with probability proportional to its Shapley-kernel mass, so each coalition is
    drawn with probability proportional to its Shapley-kernel weight and all get the same
    regression weight. Nothing depends on the other images of the batch.

    For every image row 0 is the full coalition and row 1 the empty one (weight 0: they enter
    as the constraint). The batch has ``N = max_i N_i`` rows (``N_i`` = ``2^m_i`` or
    ``samples``); an image with fewer is padded with copies of its full coalition of weight 0,
    which leave its solution and fit score unchanged (but still cost forwards). No padding
    when every image has the same ``N_i``.

    Returns ``(keep [B, N, S] bool, weights [B, N] float64, exact [B])``.
    """
    b, s = present.shape
    device = present.device
    counts, ids = _used_ids(present)
    rows, exact = [], []
    for m, g in zip(counts, generators, strict=True):
        exact.append((1 << m) <= samples)  # always so for m = 1: samples >= 2
        if exact[-1]:
            rows.append(_exact_coalitions(m, device))
        else:
            rows.append(_sampled_coalitions(m, samples, paired, g, device))
    n = max(k.shape[0] for k, _ in rows)
    keep = torch.zeros(b, n, s, dtype=torch.bool, device=device)
    weights = torch.zeros(b, n, dtype=torch.float64, device=device)
    for i, ((k, w), m) in enumerate(zip(rows, counts, strict=True)):
        if k.shape[0] < n:
            k = torch.cat([k, k.new_ones(n - k.shape[0], m)])
        keep[i].index_copy_(1, ids[i, :m], k)
        weights[i, : w.shape[0]] = w
    return keep, weights, exact


# --------------------------------------------------------------------------- methods


_SEGMENT_OPTIONS: dict[str, Any] = {
    "segmenter": "slic",
    "n_segments": 50,
    "blur_sigma": 5.0,
    "output": "probability",
    "amp": "auto",
}


class _SuperpixelSetup:
    """What LIME and KernelSHAP share: options, segments, baseline, targets, logits."""

    def __init__(self, request: Request, method: str) -> None:
        opts = request.options
        self.output = choice_option(opts, "output", OUTPUTS)
        self.amp = amp_option(opts, request.path)
        sigma = _real_option(opts, "blur_sigma", low=0.0, low_open=True)
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
        self.logits, self.targets = unperturbed_logits(
            request, self.amp, _chunk_size(request), "perturbation"
        )


@register("lime")
class Lime(Explainer):
    """LIME for images (Ribeiro et al., 2016), as ``lime.lime_image``, batched.

    Per image: ``samples`` coalitions of its superpixels (row 0 keeps all of them, the others
    keep each with probability ``keep_prob``), the target's score on each perturbed image,
    sample weights ``sqrt(exp(-d^2 / kernel_width^2))`` with ``d`` the cosine distance to the
    all-kept coalition (lime's kernel), and a weighted ridge regression of the scores on the
    coalitions with an unpenalised intercept (``sklearn.linear_model.Ridge(alpha)`` fitted with
    ``sample_weight``; lime's default explanation model, all features).

    Request fields:
        segments: ``Tensor[B, H, W]`` superpixel ids, or None to compute them (options
            ``segmenter``, ``n_segments``).
        baseline: None (superpixel mean colour), ``"blur"``, a number or
            ``Tensor[B or 1, C, H, W]``; see the module doc.
        batch_size: perturbed images per forward (default 64).
        seed: seeds each image's coalitions (per image; see :func:`xai_serve.explain`).

    Options:
        samples: coalitions per image (>= 2), the first being the original image.
        kernel_width: lime's kernel width (> 0; lime_image's default 0.25).
        alpha: ridge penalty (>= 0).
        keep_prob: probability that a sampled coalition keeps a superpixel (in (0, 1)).
        segmenter, n_segments: ``"slic"`` (default) or ``"grid"``, and the number of
            superpixels asked for, when the request has no ``segments``.
        blur_sigma: standard deviation in pixels of the ``"blur"`` baseline.
        output: ``"probability"`` (default, as lime) or ``"logit"``.
        amp: None, ``"bf16"`` or ``"fp16"``: autocast dtype of the forwards.

    Explanation: ``weights`` ``[B, S]`` (the ridge coefficients), ``maps`` (each pixel gets its
    superpixel's weight), ``intercept`` and ``score`` (the surrogate's weighted R^2 on its own
    samples, lime's ``score``), ``segments``, ``samples``, ``seeds``.
    """

    uses_layer = False
    options: ClassVar[dict[str, Any]] = {
        "samples": 256,
        "kernel_width": 0.25,
        "alpha": 1.0,
        "keep_prob": 0.5,
        **_SEGMENT_OPTIONS,
    }

    def explain(self, request: Request) -> Explanation:
        opts = request.options
        samples = int_option(opts, "samples", 2)
        width = _real_option(opts, "kernel_width", low=0.0, low_open=True)
        alpha = _real_option(opts, "alpha", low=0.0, low_open=False)
        keep_prob = _real_option(opts, "keep_prob", low=0.0, low_open=True, high=1.0)
        setup = _SuperpixelSetup(request, self.name)
        keep = _lime_coalitions(setup.present, samples, keep_prob, request.generators())
        y = _coalition_scores(
            request,
            setup.segments,
            keep,
            setup.baseline,
            setup.targets,
            setup.output,
            setup.amp,
        )
        w = _lime_kernel(keep, setup.present, width)
        coef, intercept, r2 = _weighted_ridge(
            keep.to(torch.float64), y.to(torch.float64), w, alpha, setup.present
        )
        weights = coef.float()
        return Explanation(
            maps=_segment_map(weights, setup.segments),
            targets=setup.targets,
            logits=setup.logits,
            method=self.name,
            segments=setup.segments,
            weights=weights,
            intercept=intercept.float(),
            score=r2.float(),
            samples=samples,
            seeds=request.seeds_tensor(),
        )


@register("kernelshap")
class KernelShap(Explainer):
    """KernelSHAP (Lundberg & Lee, 2017) over superpixels, batched.

    The Shapley values ``phi`` of the game ``v(z) = score(image with the superpixels outside z
    replaced by the baseline)`` are estimated by the Shapley-kernel weighted linear regression
    ``v(z) ~ v(0) + z . phi`` under the efficiency constraint ``sum(phi) = v(1) - v(0)``, held
    exactly (a Lagrange multiplier). ``v(1)`` (the original image) and ``v(0)`` (all
    baseline) are evaluated by the model with the other coalitions.

    Decided per image, from the number ``m`` of superpixel ids the image uses: with
    ``2^m <= samples`` every coalition of its superpixels is enumerated and ``phi`` are their
    exact Shapley values (``2^m`` model evaluations); otherwise ``samples - 2`` coalitions are
    drawn from the Shapley kernel's distribution, from the image's own generator, with their
    complements when ``paired`` (see :func:`_kernelshap_coalitions`). A batch runs
    ``N = max`` of its images' row counts per image (:attr:`Explanation.samples`): an image
    with fewer (an enumerated one beside a sampled one) is padded with weight-0 copies of its
    original image, which cost forwards but do not change its result.

    Request fields: as :class:`Lime` (segments, baseline, batch_size, seed).

    Options:
        samples: model evaluations per image, the full and empty coalitions included (>= 2).
        paired: antithetic sampling, each coalition followed by its complement.
        segmenter, n_segments, blur_sigma, output, amp: as :class:`Lime`.

    Explanation: ``weights`` = ``phi`` ``[B, S]`` (0 for ids an image does not use), ``maps``,
    ``intercept`` = ``v(0)``, ``score`` = the weighted R^2 of the fit on the sampled (or
    enumerated) coalitions, ``segments``, ``samples`` (``N``, padding included), ``seeds``.
    """

    uses_layer = False
    options: ClassVar[dict[str, Any]] = {"samples": 512, "paired": True, **_SEGMENT_OPTIONS}

    def explain(self, request: Request) -> Explanation:
        opts = request.options
        samples = int_option(opts, "samples", 2)
        paired = bool_option(opts, "paired")
        setup = _SuperpixelSetup(request, self.name)
        keep, w, _ = _kernelshap_coalitions(setup.present, samples, paired, request.generators())
        y = _coalition_scores(
            request,
            setup.segments,
            keep,
            setup.baseline,
            setup.targets,
            setup.output,
            setup.amp,
        ).to(torch.float64)
        f1, f0 = y[:, 0], y[:, 1]  # every image's full and empty coalitions
        phi, r2 = _efficient_least_squares(keep.to(torch.float64), y, w, f0, f1, setup.present)
        weights = phi.float()
        return Explanation(
            maps=_segment_map(weights, setup.segments),
            targets=setup.targets,
            logits=setup.logits,
            method=self.name,
            segments=setup.segments,
            weights=weights,
            intercept=f0.float(),
            score=r2.float(),
            samples=keep.shape[1],
            seeds=request.seeds_tensor(),
        )


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
        logits, targets = unperturbed_logits(request, amp, _chunk_size(request), "perturbation")

        def make_piece(b0: int, b1: int, r0: int, r1: int) -> Tensor:
            win = torch.arange(r0, r1, device=images.device)
            iy = torch.div(win, nx, rounding_mode="floor")
            mask = rows[iy][:, None, :, None] & cols[win - iy * nx][:, None, None, :]
            base = _batch_slice(baseline, b0, b1)
            fill = base[:, None] if isinstance(base, Tensor) else base
            out = torch.where(mask[None], fill, images[b0:b1, None])  # [b, windows, C, H, W]
            return out.reshape(-1, c, h, w)

        occluded = _chunked_scores(request, ny * nx, make_piece, targets, output, amp)
        drop = (_score(logits, targets, output)[:, None] - occluded).view(-1, ny, nx)
        rows_f, cols_f = rows.float(), cols.float()
        total = torch.einsum("yh,byx,xw->bhw", rows_f, drop, cols_f)
        cover = rows_f.sum(0)[:, None] * cols_f.sum(0)[None, :]
        maps = c * total / cover
        return Explanation(
            maps=maps, targets=targets, logits=logits, method=self.name, samples=ny * nx
        )
