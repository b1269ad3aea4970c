"""Faithfulness metrics of saliency maps: the deletion and insertion curves and their areas.

Deletion (Petsiuk et al., 2018, "RISE"): remove the pixels a map ranks highest first, a fraction
``k / steps`` at step ``k``, and follow the model's probability of the target class; a faithful
map makes it fall fast, so a *lower* area is better. Insertion starts from the baseline and
reveals the pixels in the same order; a *higher* area is better.

Both are computed for a whole batch on the model's device:

* one ``rank`` tensor per image (the position of every pixel in the map's descending order,
  ties broken by the lower flat index ``y * W + x``) and one pixel count per step, so the
  perturbed input of (image ``b``, step ``k``) is ``where(rank[b] < count[k], ...)``;
* the ``B * (steps + 1)`` perturbed inputs are built and run ``batch_size`` at a time under
  ``torch.no_grad()``: the chunks cut across images, so a batch of small images still fills the
  model's batches;
* the area is the trapezoid rule over ``x = k / steps`` in ``[0, 1]``.

Beyond those: ROAD (:func:`road`, with its batched noisy linear imputer :func:`road_impute`),
infidelity (:func:`infidelity`) and max-sensitivity (:func:`max_sensitivity`) as captum's
``captum.metrics`` define them, and cascading model-parameter randomisation
(:func:`randomisation`). Random draws come from one generator per image, seeded per image, so an
image's value does not depend on its batch-mates. :mod:`xai_serve.explainers.evaluation` runs
them all for one explanation method.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import positive_int
from xai_serve.explainers.base import (
    check_target_range,
    model_device,
    resolve_seeds,
    resolve_targets,
)

__all__ = [
    "ROAD_FRACTIONS",
    "ExplainFn",
    "RandomisationFn",
    "RandomisationResult",
    "RoadResult",
    "Tick",
    "deletion_auc",
    "infidelity",
    "insertion_auc",
    "max_sensitivity",
    "randomisable_layers",
    "randomisation",
    "randomised_models",
    "road",
    "road_impute",
    "spearman",
]


Tick = Callable[[float], None]
"""``progress(fraction)``: called after every chunk of a metric's work with the fraction done,
rising to 1.0 (for a long run's progress report); None: no calls."""


def _tick(progress: Tick | None, done: int, total: int) -> None:
    if progress is not None:
        progress(min(1.0, done / total))


def deletion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: int | Tensor,
    *,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    progress: Tick | None = None,
) -> Tensor:
    """Area under the deletion curve of every image's map (lower is more faithful).

    At step ``k = 0 .. steps`` the ``floor(k * H * W / steps)`` pixels the map ranks highest
    (descending; ties go to the lower flat index) are set to the baseline in every channel, and
    the curve is the model's softmax probability of ``target`` on that input.

    Args:
        model: an image classifier, ``[N, C, H, W] -> [N, classes]``; run as it is (put it in
            ``eval()`` mode yourself).
        images: ``Tensor[B, C, H, W]`` float, as the model takes them; moved to the model's
            device.
        maps: ``Tensor[B, H, W]``, the saliency of every pixel (only the order matters; NaN and
            infinite values are rejected, which costs one device sync).
        target: the class whose probability is followed: an int or ``Tensor[B]``.
        steps: the number of steps (>= 1); the curve has ``steps + 1`` points.
        baseline: the value of a removed pixel: a number, or a tensor that broadcasts to
            ``[B, C, H, W]`` (e.g. ``[C, 1, 1]`` per channel, or a blurred copy of the images).
        batch_size: how many perturbed images go through the model at once (>= 1).
        progress: see :data:`Tick`.

    Returns:
        ``Tensor[B]`` float32 on the model's device.
    """
    curve = _curve(
        model, images, maps, target, steps, baseline, batch_size, insert=False, progress=progress
    )
    return _trapezoid(curve)


def insertion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: int | Tensor,
    *,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
    progress: Tick | None = None,
) -> Tensor:
    """Area under the insertion curve of every image's map (higher is more faithful).

    The input starts as the baseline (commonly a blurred copy of the images; default 0) and at
    step ``k`` shows the image's own values at the ``floor(k * H * W / steps)`` pixels the map
    ranks highest. Arguments and result as in :func:`deletion_auc`.
    """
    curve = _curve(
        model, images, maps, target, steps, baseline, batch_size, insert=True, progress=progress
    )
    return _trapezoid(curve)


def _trapezoid(curve: Tensor) -> Tensor:
    """The trapezoid rule over ``steps + 1`` equally spaced points of ``[0, 1]``: ``[B]``."""
    steps = curve.shape[1] - 1
    return ((curve.sum(dim=1) - 0.5 * (curve[:, 0] + curve[:, -1])) / steps).float()


def _curve(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: int | Tensor,
    steps: int,
    baseline: float | Tensor,
    batch_size: int,
    *,
    insert: bool,
    progress: Tick | None = None,
) -> Tensor:
    """``Tensor[B, steps + 1]`` float32: the target probability at every step."""
    fn = "xai_serve.metrics." + ("insertion_auc" if insert else "deletion_auc")
    device = model_device(model)
    images, maps, base = _check(fn, images, maps, baseline, device)
    positive_int(steps, f"{fn}: `steps`")
    positive_int(batch_size, f"{fn}: `batch_size`")
    b, _, h, w = images.shape
    targets = resolve_targets(target, b, None, device)
    if targets is None:
        raise InvalidInput(f"{fn}: `target` is required: an int or a Tensor[B] of class indices")

    hw = h * w
    # rank[b, p]: the position of pixel p in image b's descending order (ties: lower p first).
    order = torch.sort(maps.reshape(b, hw), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(hw, device=device).expand(b, hw).contiguous()
    )
    # counts[k]: how many pixels are removed (inserted) at step k.
    counts = torch.arange(steps + 1, device=device) * hw // steps

    total = b * (steps + 1)
    probs = torch.empty(total, dtype=torch.float32, device=device)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total), device=device)
            img = j // (steps + 1)
            step = j % (steps + 1)
            chosen = (rank[img] < counts[step, None]).view(-1, 1, h, w)  # [n, 1, H, W]
            fill = base[img] if base.shape[0] > 1 else base  # one shared baseline broadcasts
            if insert:
                x = torch.where(chosen, images[img], fill)
            else:
                x = torch.where(chosen, fill, images[img])
            logits = model(x)
            if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != len(j):
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                raise InvalidInput(f"{fn}: `model` must return Tensor[N, classes], got {shape}")
            if start == 0:
                check_target_range(targets, logits)
            p = logits.float().softmax(dim=1)
            probs[start : start + len(j)] = p.gather(1, targets[img, None]).squeeze(1)
            _tick(progress, start + len(j), total)
    return probs.view(b, steps + 1)


def _check(
    fn: str,
    images: object,
    maps: object,
    baseline: object,
    device: torch.device | None,
    *,
    need_maps: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, maps, baseline)`` on ``device`` (None: where the images are); the baseline
    as a 4-D tensor that broadcasts to the images (batch size 1 or B). Without ``need_maps``
    the maps are not checked and come back as the images (a placeholder)."""
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        got = (
            f"{images.dtype} tensor of shape {tuple(images.shape)}"
            if isinstance(images, Tensor)
            else type(images).__name__
        )
        raise InvalidInput(f"{fn}: `images` must be a float Tensor[B, C, H, W], got {got}")
    b, _, h, w = images.shape
    if images.numel() == 0:
        raise InvalidInput(f"{fn}: `images` is empty: shape {tuple(images.shape)}")
    if device is None:
        device = images.device
    if not need_maps:
        images = images.to(device)
        if not bool(torch.isfinite(images).all()):
            raise InvalidInput(f"{fn}: `images` contain NaN or infinite values")
        return images, images, images
    if not isinstance(maps, Tensor) or tuple(maps.shape) != (b, h, w):
        got = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise InvalidInput(
            f"{fn}: `maps` must be Tensor[B, H, W] = {(b, h, w)} like the images, got {got}"
        )
    if maps.is_complex():
        raise InvalidInput(f"{fn}: `maps` must be real, got {maps.dtype}")
    images = images.to(device)
    maps = maps.to(device)
    if maps.dtype.is_floating_point and not bool(torch.isfinite(maps).all()):
        raise InvalidInput(f"{fn}: `maps` holds NaN or infinite values")

    if isinstance(baseline, Tensor):
        try:
            shape = torch.broadcast_shapes(baseline.shape, images.shape)
        except RuntimeError:
            shape = None
        if shape != images.shape:
            raise InvalidInput(
                f"{fn}: `baseline` of shape {tuple(baseline.shape)} does not broadcast to the "
                f"images' shape {tuple(images.shape)}"
            )
        base = baseline.to(device=device, dtype=images.dtype)
        base = base.reshape((1,) * (4 - base.dim()) + tuple(base.shape))
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        if not math.isfinite(baseline):
            raise InvalidInput(f"{fn}: `baseline` must be finite, got {baseline!r}")
        base = torch.full((1, 1, 1, 1), float(baseline), dtype=images.dtype, device=device)
    else:
        raise InvalidInput(
            f"{fn}: `baseline` must be a number or a Tensor, got {type(baseline).__name__}"
        )
    return images, maps, base


# =========================================================================== ROAD


@dataclass
class RoadResult:
    """What :func:`road` returns; every tensor is on the model's device.

    Attributes:
        scores: ``Tensor[B]`` float32, the mean of ``curve`` over the fractions (MoRF: lower
            is more faithful; LeRF: higher is).
        curve: ``Tensor[B, F]`` float32, the model's probability of the target with the
            fraction ``fractions[k]`` of the pixels removed and imputed.
        correct: ``Tensor[B, F]`` bool, whether the model's top-1 class is still the target
            (the quantity Quantus' ``ROAD`` averages over images).
        fractions: the fractions, as given.
        order: ``"morf"`` or ``"lerf"``.
    """

    scores: Tensor
    curve: Tensor
    correct: Tensor
    fractions: tuple[float, ...]
    order: str


# The neighbour weights of the noisy linear imputer (Rong et al., 2022): 1/6 for the four direct
# neighbours, 1/12 for the four diagonal ones (they sum to 1).
_STENCIL = (
    (1.0 / 12.0, 1.0 / 6.0, 1.0 / 12.0),
    (1.0 / 6.0, 0.0, 1.0 / 6.0),
    (1.0 / 12.0, 1.0 / 6.0, 1.0 / 12.0),
)
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def road_impute(
    images: Tensor,
    removed: Tensor,
    *,
    noise: float = 0.01,
    seed: int | Sequence[int] | Tensor | None = 0,
    tol: float = 1e-6,
    max_iter: int | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels of every image, batched.

    Every removed pixel ``i`` takes the weighted mean of its (up to 8) neighbours inside the
    image, ``x_i = sum_j w_ij x_j / sum_j w_ij`` with ``w = 1/6`` for direct and ``1/12`` for
    diagonal neighbours, removed neighbours included: a sparse linear system per image and
    channel, ``(D - W_uu) x_u = W_uk x_k`` (``D_i = sum_j w_ij``). That matrix is symmetric
    positive definite whenever some pixel of the image is kept, so all systems of the batch
    are solved at once on the device by Jacobi-preconditioned conjugate gradients in float64
    (the neighbour sums as a 3x3 stencil), starting from the same problem solved at half the
    resolution (recursively, down to 16 pixels a side), until every system's residual is
    below ``tol`` times its right-hand side (checked every 16 iterations, one sync each) or
    ``max_iter`` iterations per level. At ``tol=1e-6`` the values are within ~2e-5 of a
    direct sparse solve even for a 224x224 image with 80% removed in one hole, far below the
    paper's imputation noise (0.01). Then ``noise`` times a
    standard normal draw is added to every imputed value, image ``i`` drawing from its own
    generator seeded with its seed (an int: every image's; a sequence or ``Tensor[N]``: one
    per image; None: fresh seeds).

    Args:
        images: ``Tensor[N, C, H, W]`` float.
        removed: ``Tensor[N, H, W]`` (or ``[N, 1, H, W]``) bool, the pixels to impute in
            every channel; at least one pixel of each image must be kept.
        noise: the standard deviation of the noise added to the imputed values (the paper's
            0.01; 0 for the bare linear imputation).
        seed: the per-image seeds of the noise.
        tol: the relative residual at which the solver stops.
        max_iter: an upper bound on the iterations at each resolution; default
            ``4 * (H + W) + 64`` there.

    Returns:
        ``Tensor[N, C, H, W]``: the images with the removed pixels imputed (kept pixels are
        unchanged), in the dtype of ``images``.
    """
    fn = "xai_serve.metrics.road_impute"
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.dtype.is_floating_point:
        raise InvalidInput(f"{fn}: `images` must be a float Tensor[N, C, H, W]")
    n, c, h, w = images.shape
    if not isinstance(removed, Tensor) or removed.dtype != torch.bool:
        raise InvalidInput(f"{fn}: `removed` must be a bool Tensor[N, H, W]")
    if removed.dim() == 4 and removed.shape[1] == 1:
        removed = removed[:, 0]
    if tuple(removed.shape) != (n, h, w):
        raise InvalidInput(
            f"{fn}: `removed` must be Tensor[N, H, W] = {(n, h, w)}, got {tuple(removed.shape)}"
        )
    if not math.isfinite(noise) or noise < 0:
        raise InvalidInput(f"{fn}: `noise` must be a finite number >= 0, got {noise!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise InvalidInput(f"{fn}: `tol` must be a number in (0, 1), got {tol!r}")
    seeds = resolve_seeds(seed, n)
    removed = removed.to(images.device)
    if bool(removed.flatten(1).all(dim=1).any()):
        raise InvalidInput(f"{fn}: an image has every pixel removed; keep at least one")
    out = _impute(images, removed, tol=tol, max_iter=max_iter)
    if noise > 0:
        draws = _per_image_normal(seeds, (c, h, w), images.device, out.dtype)
        out = torch.where(removed[:, None], out + noise * draws, out)
    return out


def _per_image_normal(
    seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> Tensor:
    """``Tensor[N, *shape]`` standard normal, row ``i`` from a generator seeded ``seeds[i]``
    (so a row does not depend on the other rows)."""
    rows = [
        torch.randn(shape, generator=torch.Generator(device=device).manual_seed(s), device=device)
        for s in seeds
    ]
    return torch.stack(rows).to(dtype)


def _impute(images: Tensor, removed: Tensor, *, tol: float, max_iter: int | None) -> Tensor:
    """The linear imputation (no noise): ``images`` with the ``removed`` pixels solved for."""
    n, c, h, w = images.shape
    # float64: float32 conjugate gradients stall near 3e-4 on large holes (the recursive
    # residual drifts from the true one); the stencil is memory-bound, so this costs ~2x.
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    x = images.to(dtype).reshape(n * c, 1, h, w)
    unknown = removed.repeat_interleave(c, dim=0)[:, None].to(dtype)  # [NC, 1, H, W]
    filled = _solve(x, unknown, tol, max_iter)
    return filled.view(n, c, h, w).to(images.dtype)


def _neighbours(v: Tensor) -> Tensor:
    """``sum_j w_ij v_j`` over every pixel's neighbours inside the image (``_STENCIL`` as
    shifted slices of the zero-padded ``v``: on CPUs faster than a one-channel convolution)."""
    h, w = v.shape[-2:]
    p = F.pad(v, (1, 1, 1, 1))
    direct = (
        p[..., 1 : h + 1, 0:w]
        + p[..., 1 : h + 1, 2 : w + 2]
        + p[..., 0:h, 1 : w + 1]
        + p[..., 2 : h + 2, 1 : w + 1]
    )
    diagonal = (
        p[..., 0:h, 0:w]
        + p[..., 0:h, 2 : w + 2]
        + p[..., 2 : h + 2, 0:w]
        + p[..., 2 : h + 2, 2 : w + 2]
    )
    return direct * _STENCIL[0][1] + diagonal * _STENCIL[0][0]


def _solve(x: Tensor, unknown: Tensor, tol: float, max_iter: int | None) -> Tensor:
    """``x`` ``[M, 1, H, W]`` with its ``unknown`` pixels (``[M, 1, H, W]``, 1.0 = unknown)
    solved by Jacobi-preconditioned conjugate gradients. The first guess comes from the same
    problem at half the resolution (a cell is known if any of its 2x2 pixels is; its value
    their mean), solved the same way and upsampled, down to 16 pixels a side: the coarse
    levels carry the smooth part of the solution, which plain CG would need many iterations
    for, so the fine level needs few."""
    h, w = x.shape[-2:]
    dtype = x.dtype
    known = 1 - unknown
    neighbours = _neighbours
    if min(h, w) > 16:
        weight = F.avg_pool2d(known, 2, ceil_mode=True)
        coarse = F.avg_pool2d(x * known, 2, ceil_mode=True) / weight.clamp_min(1e-12)
        coarse_unknown = (weight == 0).to(dtype)
        coarse = _solve(coarse * (1 - coarse_unknown), coarse_unknown, tol, max_iter)
        u = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) * unknown
    else:  # the mean of the kept pixels
        total = known.sum(dim=(2, 3), keepdim=True).clamp_min(1)
        u = (x * known).sum(dim=(2, 3), keepdim=True) / total * unknown

    # D_i: the summed weight of pixel i's neighbours inside the image.
    diag = neighbours(torch.ones(1, 1, h, w, dtype=dtype, device=x.device))
    rhs = neighbours(x * known) * unknown

    def apply(v: Tensor) -> Tensor:  # (D - W_uu) v on the unknowns, v = 0 elsewhere
        return (diag * v - neighbours(v)) * unknown

    r = rhs - apply(u)
    z = r / diag
    p = z
    rz = (r * z).sum(dim=(2, 3), keepdim=True)
    bound = tol * rhs.flatten(1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
    limit = 4 * (h + w) + 64 if max_iter is None else positive_int(max_iter, "`max_iter`")
    for it in range(limit):
        if it % 16 == 0 and bool((r.flatten(1).norm(dim=1) <= bound).all()):
            break
        ap = apply(p)
        pap = (p * ap).sum(dim=(2, 3), keepdim=True)
        alpha = torch.where(pap > 0, rz / torch.where(pap > 0, pap, 1), 0)
        u = u + alpha * p
        r = r - alpha * ap
        z = r / diag
        rz_new = (r * z).sum(dim=(2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1), 0)
        p = z + beta * p
        rz = rz_new
    return x * known + u * unknown


def road(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: int | Tensor,
    *,
    fractions: Sequence[float] = ROAD_FRACTIONS,
    order: str = "morf",
    noise: float = 0.01,
    seed: int | Sequence[int] | Tensor | None = 0,
    batch_size: int = 64,
    progress: Tick | None = None,
) -> RoadResult:
    """ROAD, "remove and debias" (Rong et al., 2022): the target's probability after the
    pixels a map ranks highest (``order="morf"``, most relevant first) or lowest (``"lerf"``)
    are removed and imputed by :func:`road_impute` (noisy linear imputation), per fraction.

    For fraction ``f`` the ``floor(f * H * W)`` top (MoRF) or bottom (LeRF) pixels of the map
    (ties: the lower flat index ranks higher, as in :func:`deletion_auc`) are removed in every
    channel. The ``B * F`` perturbed images are imputed and run through the model
    ``batch_size`` at a time (chunks cut across images) under ``torch.no_grad()``. Image ``b``
    draws the imputation noise of every fraction from its own generator (seed ``seed`` or
    ``seed[b]``), so its value does not depend on its batch-mates. A faithful map makes the
    MoRF curve fall fast (lower ``scores`` is better) and keeps the LeRF curve high.

    Args:
        model, images, maps, target: as in :func:`deletion_auc`.
        fractions: the fractions of pixels removed, each in ``[0, 1)``.
        order: ``"morf"`` or ``"lerf"``.
        noise: the imputation noise's standard deviation (the paper's 0.01).
        seed: per-image seeds of the noise (see :func:`road_impute`).
        batch_size: how many perturbed images are imputed and run at once (>= 1).
        progress: see :data:`Tick`.

    Returns:
        A :class:`RoadResult`: ``scores`` ``Tensor[B]`` (the mean of the curve), the curve
        ``Tensor[B, F]`` and whether the top-1 class stayed the target.
    """
    fn = "xai_serve.metrics.road"
    device = model_device(model)
    images, maps, _ = _check(fn, images, maps, 0.0, device)
    positive_int(batch_size, f"{fn}: `batch_size`")
    if order not in ("morf", "lerf"):
        raise InvalidInput(f"{fn}: `order` must be 'morf' or 'lerf', got {order!r}")
    fracs = _fractions(fn, fractions)
    if not math.isfinite(noise) or noise < 0:
        raise InvalidInput(f"{fn}: `noise` must be a finite number >= 0, got {noise!r}")
    b, c, h, w = images.shape
    seeds = resolve_seeds(seed, b)
    targets = _one_target(fn, target, b, device)
    hw = h * w
    rank = _ranks_desc(maps.reshape(b, hw))
    counts = torch.tensor([math.floor(f * hw) for f in fracs], device=device)
    nf = len(fracs)
    # One generator per image draws all of its fractions' noise: [B, F, C, H, W].
    draws = _per_image_normal(seeds, (nf, c, h, w), device, images.dtype)

    total = b * nf
    probs = torch.empty(total, dtype=torch.float32, device=device)
    correct = torch.empty(total, dtype=torch.bool, device=device)
    with torch.no_grad():
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total), device=device)
            img, k = j // nf, j % nf
            if order == "morf":
                gone = rank[img] < counts[k, None]
            else:
                gone = rank[img] >= hw - counts[k, None]
            gone = gone.view(-1, h, w)
            x = _impute(images[img], gone, tol=1e-6, max_iter=None)
            if noise > 0:
                x = torch.where(gone[:, None], x + noise * draws[img, k], x)
            logits = _logits(fn, model, x, len(j))
            if start == 0:
                check_target_range(targets, logits)
            p = logits.float().softmax(dim=1)
            probs[start : start + len(j)] = p.gather(1, targets[img, None]).squeeze(1)
            correct[start : start + len(j)] = logits.argmax(dim=1) == targets[img]
            _tick(progress, start + len(j), total)
    curve = probs.view(b, nf)
    return RoadResult(
        scores=curve.mean(dim=1),
        curve=curve,
        correct=correct.view(b, nf),
        fractions=fracs,
        order=order,
    )


def _fractions(fn: str, fractions: object) -> tuple[float, ...]:
    if not isinstance(fractions, Sequence) or isinstance(fractions, str) or not fractions:
        raise InvalidInput(f"{fn}: `fractions` must be a non-empty sequence of numbers in [0, 1)")
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 <= f < 1:
            raise InvalidInput(f"{fn}: `fractions` must be numbers in [0, 1), got {f!r}")
        out.append(float(f))
    return tuple(out)


def _ranks_desc(values: Tensor) -> Tensor:
    """``rank[b, p]``: the position of entry ``p`` in row ``b``'s descending order (ties: the
    lower index first)."""
    b, n = values.shape
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=values.device).expand(b, n).contiguous()
    )


def _one_target(fn: str, target: object, batch: int, device: torch.device) -> Tensor:
    """``target`` as ``Tensor[B]`` int64 (one class per image) or InvalidInput."""
    targets = resolve_targets(target, batch, None, device)  # type: ignore[arg-type]
    if targets is None:
        raise InvalidInput(f"{fn}: `target` is required: an int or a Tensor[B] of class indices")
    if targets.dim() != 1:
        raise InvalidInput(
            f"{fn}: `target` must be one class per image (an int or a Tensor[B]), got shape "
            f"{tuple(targets.shape)}"
        )
    return targets


def _logits(fn: str, model: nn.Module, x: Tensor, rows: int) -> Tensor:
    logits = model(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != rows:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
        raise InvalidInput(f"{fn}: `model` must return Tensor[N, classes], got {shape}")
    return logits


# =========================================================================== infidelity


def infidelity(
    model: nn.Module,
    images: Tensor,
    attributions: Tensor,
    target: int | Tensor,
    *,
    perturbations: Tensor | None = None,
    samples: int = 10,
    noise_std: float = 0.1,
    normalize: bool = False,
    output: str = "logit",
    seed: int | Sequence[int] | Tensor | None = 0,
    batch_size: int = 64,
    progress: Tick | None = None,
) -> Tensor:
    """Explanation infidelity (Yeh et al., 2019) as ``captum.metrics.infidelity`` defines it:
    ``E_I[(I^T a - (f(x) - f(x - I)))^2]`` per image, the mean over ``samples`` draws of the
    perturbation ``I``, where ``f`` is the model's output for the target (lower is better).

    With ``normalize`` the attribution is first scaled by
    ``beta = E[I^T a (f(x) - f(x - I))] / E[(I^T a)^2]`` (0/0 -> the denominator taken as 1, as
    captum's ``safe_div``), which makes the value invariant to the map's scale: use it for maps
    that are not in the output's units (CAM, min-max scaled maps, superpixel weights).

    Attributions ``Tensor[B, C, H, W]`` enter ``I^T a`` element by element. A channel-summed
    map ``Tensor[B, H, W]`` is broadcast over the channels (the same value in every channel of
    a pixel). The default perturbation is Gaussian noise ``N(0, noise_std^2)`` drawn per pixel
    and shared by the pixel's channels (``Tensor[B, S, 1, H, W]``): then ``I^T a`` of a map
    equals ``I^T a`` of the per-channel attributions it sums, so a map and its attributions
    have the same infidelity. Image ``b``'s draws come from its own generator (seed ``seed`` or
    ``seed[b]``), so its value does not depend on its batch-mates.

    Args:
        model: the classifier, run as it is, ``batch_size`` perturbed images at a time.
        images: ``Tensor[B, C, H, W]`` float.
        attributions: ``Tensor[B, C, H, W]`` or ``Tensor[B, H, W]`` (finite).
        target: an int or ``Tensor[B]``.
        perturbations: explicit draws ``I``, ``Tensor[B, S, C, H, W]`` or
            ``Tensor[B, S, 1, H, W]`` (shared by the channels); they override ``samples``,
            ``noise_std`` and ``seed``. The perturbed inputs are ``x - I``.
        samples: the number of draws per image (>= 1).
        noise_std: the default perturbation's standard deviation, in the images' units.
        normalize: scale the attributions by ``beta`` first (captum's ``normalize``).
        output: ``"logit"`` (the model's output as it is, like captum with the model as
            ``forward_func``) or ``"probability"`` (its softmax).
        seed: per-image seeds of the default perturbation.
        batch_size: the perturbed images per forward (>= 1).
        progress: see :data:`Tick`.

    Returns:
        ``Tensor[B]`` float32 on the model's device.
    """
    fn = "xai_serve.metrics.infidelity"
    device = model_device(model)
    images, attr = _check_attributions(fn, images, attributions, device)
    positive_int(batch_size, f"{fn}: `batch_size`")
    if output not in ("logit", "probability"):
        raise InvalidInput(f"{fn}: `output` must be 'logit' or 'probability', got {output!r}")
    b, c, h, w = images.shape
    targets = _one_target(fn, target, b, device)
    if perturbations is None:
        samples = positive_int(samples, f"{fn}: `samples`")
        if not math.isfinite(noise_std) or noise_std <= 0:
            raise InvalidInput(f"{fn}: `noise_std` must be a finite number > 0, got {noise_std!r}")
        seeds = resolve_seeds(seed, b)
        pert = noise_std * _per_image_normal(seeds, (samples, 1, h, w), device, images.dtype)
    else:
        ok = isinstance(perturbations, Tensor) and perturbations.dim() == 5
        if not ok or perturbations.shape[0] != b or perturbations.shape[2] not in (1, c):
            got = tuple(perturbations.shape) if isinstance(perturbations, Tensor) else None
            raise InvalidInput(
                f"{fn}: `perturbations` must be Tensor[B, S, C, H, W] or Tensor[B, S, 1, H, W] "
                f"with B, C, H, W = {(b, c, h, w)}, got {got or type(perturbations).__name__}"
            )
        if tuple(perturbations.shape[3:]) != (h, w) or perturbations.shape[1] == 0:
            raise InvalidInput(
                f"{fn}: `perturbations` must be Tensor[B, S, C, H, W] with S >= 1 and "
                f"H, W = {(h, w)}, got {tuple(perturbations.shape)}"
            )
        pert = perturbations.to(device=device, dtype=images.dtype)
        samples = pert.shape[1]

    def score(x: Tensor, t: Tensor) -> Tensor:
        logits = _logits(fn, model, x, x.shape[0])
        if output == "probability":
            logits = logits.float().softmax(dim=1)
        return logits.gather(1, t[:, None]).squeeze(1)

    total = b * samples
    diffs = torch.empty(total, dtype=torch.float64, device=device)
    with torch.no_grad():
        logits0 = _logits(fn, model, images, b)
        check_target_range(targets, logits0)
        if output == "probability":
            logits0 = logits0.float().softmax(dim=1)
        f0 = logits0.gather(1, targets[:, None]).squeeze(1)
        for start in range(0, total, batch_size):
            j = torch.arange(start, min(start + batch_size, total), device=device)
            img, s = j // samples, j % samples
            x = images[img] - pert[img, s]
            diffs[start : start + len(j)] = (f0[img] - score(x, targets[img])).double()
            _tick(progress, start + len(j), total)
        # I^T a for every draw: [B, S]; a map broadcasts over the channels of I (or I's one
        # channel broadcasts over the attributions' channels).
        dot = (pert.double() * attr.double()[:, None]).flatten(2).sum(dim=2)
    diff = diffs.view(b, samples)
    if normalize:
        a2 = dot.pow(2).sum(dim=1)
        ab = (dot * diff).sum(dim=1)
        b2 = diff.pow(2).sum(dim=1)
        beta = ab / torch.where(a2 == 0, 1.0, a2)
        value = beta * beta * a2 - 2 * beta * ab + b2
    else:
        value = (dot - diff).pow(2).sum(dim=1)
    return (value / samples).float()


def _check_attributions(
    fn: str, images: object, attributions: object, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``(images, attributions)`` on ``device``; attributions as ``[B, C, H, W]`` or
    ``[B, 1, H, W]`` (a map)."""
    images, _, _ = _check(fn, images, None, 0.0, device, need_maps=False)
    b, c, h, w = images.shape
    if not isinstance(attributions, Tensor) or tuple(attributions.shape) not in (
        (b, c, h, w),
        (b, h, w),
    ):
        got = tuple(attributions.shape) if isinstance(attributions, Tensor) else None
        raise InvalidInput(
            f"{fn}: `attributions` must be Tensor[B, C, H, W] = {(b, c, h, w)} or a map "
            f"Tensor[B, H, W] = {(b, h, w)}, got {got or type(attributions).__name__}"
        )
    if not attributions.dtype.is_floating_point:
        attributions = attributions.float()
    attributions = attributions.to(device)
    if not bool(torch.isfinite(attributions).all()):
        raise InvalidInput(f"{fn}: `attributions` holds NaN or infinite values")
    if attributions.dim() == 3:
        attributions = attributions[:, None]
    return images, attributions


# =========================================================================== max-sensitivity

ExplainFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``explain_fn(images, targets, rows) -> attributions``: ``images`` ``Tensor[N, C, H, W]``,
``targets`` ``Tensor[N]`` int64, ``rows`` ``Tensor[N]`` int64 (the index of the original
image each row comes from: seed a randomised method with that image's seed); returns a
``Tensor[N, ...]`` (maps ``[N, H, W]`` or attributions ``[N, C, H, W]``)."""


def max_sensitivity(
    explain_fn: ExplainFn,
    images: Tensor,
    target: int | Tensor,
    *,
    radius: float = 0.02,
    samples: int = 10,
    norm: str = "fro",
    noise: Tensor | None = None,
    seed: int | Sequence[int] | Tensor | None = 0,
    batch_size: int | None = None,
    reference: Tensor | None = None,
    progress: Tick | None = None,
) -> Tensor:
    """Max-sensitivity (Yeh et al., 2019) as ``captum.metrics.sensitivity_max`` defines it:
    ``max_s ||a(x + d_s) - a(x)|| / ||a(x)||`` per image over ``samples`` draws ``d_s``
    uniform in the L-infinity ball of ``radius`` (lower is better).

    The norms are over each explanation flattened: ``"fro"`` the Euclidean norm, ``"inf"`` the
    largest absolute value (captum's ``norm_ord="fro"`` / ``float("inf")``); an all-zero
    ``a(x)`` divides by 1, as captum does. All ``B * samples`` perturbed images are stacked
    and explained in ``ceil(B * samples / batch_size)`` calls of ``explain_fn`` (one call when
    ``batch_size`` is None), plus one call for ``a(x)`` unless ``reference`` gives it. Image
    ``b``'s draws come from its own generator (seed ``seed`` or ``seed[b]``).

    Args:
        explain_fn: see :data:`ExplainFn`; it must return the same shape for every row.
        images: ``Tensor[B, C, H, W]`` float, on the device ``explain_fn`` wants.
        target: an int or ``Tensor[B]``, passed to ``explain_fn`` row by row.
        radius: the L-infinity radius of the noise (> 0).
        samples: the draws per image (>= 1).
        norm: ``"fro"`` or ``"inf"``.
        noise: explicit draws ``d``, ``Tensor[B, S, C, H, W]``; they override ``radius``,
            ``samples`` and ``seed``.
        seed: per-image seeds of the draws.
        batch_size: the most perturbed images per ``explain_fn`` call.
        reference: ``a(x)``, if already computed (``Tensor[B, ...]`` as ``explain_fn`` gives).
        progress: see :data:`Tick` (one call per ``explain_fn`` call on perturbed images).

    Returns:
        ``Tensor[B]`` float32 on the images' device.
    """
    fn = "xai_serve.metrics.max_sensitivity"
    if not callable(explain_fn):
        raise InvalidInput(f"{fn}: `explain_fn` must be callable, got {type(explain_fn).__name__}")
    images, _, _ = _check(fn, images, None, 0.0, None, need_maps=False)
    device = images.device
    b, c, h, w = images.shape
    targets = _one_target(fn, target, b, device)
    if norm not in ("fro", "inf"):
        raise InvalidInput(f"{fn}: `norm` must be 'fro' or 'inf', got {norm!r}")
    if batch_size is not None:
        positive_int(batch_size, f"{fn}: `batch_size`")
    if noise is None:
        samples = positive_int(samples, f"{fn}: `samples`")
        if not math.isfinite(radius) or radius <= 0:
            raise InvalidInput(f"{fn}: `radius` must be a finite number > 0, got {radius!r}")
        seeds = resolve_seeds(seed, b)
        rows = [
            torch.rand(
                (samples, c, h, w),
                generator=torch.Generator(device=device).manual_seed(s),
                device=device,
            )
            for s in seeds
        ]
        delta = (torch.stack(rows).to(images.dtype) * 2 - 1) * radius
    else:
        if (
            not isinstance(noise, Tensor)
            or noise.dim() != 5
            or noise.shape[0] != b
            or tuple(noise.shape[2:]) != (c, h, w)
            or noise.shape[1] == 0
        ):
            got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
            raise InvalidInput(
                f"{fn}: `noise` must be Tensor[B, S, C, H, W] with S >= 1 and "
                f"B, C, H, W = {(b, c, h, w)}, got {got}"
            )
        delta = noise.to(device=device, dtype=images.dtype)
        samples = delta.shape[1]

    index = torch.arange(b, device=device)
    if reference is None:
        reference = explain_fn(images, targets, index)
    ref = _explanation(fn, reference, b).flatten(1).double()
    ref_norm = _norm(ref, norm)
    ref_norm = torch.where(ref_norm == 0, 1.0, ref_norm)

    total = b * samples
    chunk = total if batch_size is None else batch_size
    sens = torch.empty(total, dtype=torch.float64, device=device)
    for start in range(0, total, chunk):
        j = torch.arange(start, min(start + chunk, total), device=device)
        img, s = j // samples, j % samples
        out = _explanation(fn, explain_fn(images[img] + delta[img, s], targets[img], img), len(j))
        out = out.detach().flatten(1).double()
        if out.shape[1] != ref.shape[1]:
            raise InvalidInput(
                f"{fn}: `explain_fn` returned {out.shape[1]} values per image for a perturbed "
                f"image and {ref.shape[1]} for the original"
            )
        sens[start : start + len(j)] = _norm(out - ref[img], norm) / ref_norm[img]
        _tick(progress, start + len(j), total)
    return sens.view(b, samples).amax(dim=1).float()


def _explanation(fn: str, value: object, rows: int) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[0] != rows:
        got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise InvalidInput(
            f"{fn}: `explain_fn` must return Tensor[N, ...] with N = {rows}, got {got}"
        )
    return value.detach()


def _norm(v: Tensor, norm: str) -> Tensor:
    return v.norm(dim=1) if norm == "fro" else v.abs().amax(dim=1)


# =========================================================================== randomisation


@dataclass
class RandomisationResult:
    """What :func:`randomisation` returns.

    Attributes:
        scores: ``Tensor[B]`` float32, the correlation after the last cascade step (all the
            chosen layers re-initialised). Lower is better (the map follows the weights).
        correlations: ``Tensor[B, K]`` float32, the Spearman rank correlation of every image's
            map with its original map after each of the ``K`` cascade steps. Where the
            randomised map is constant (e.g. a Grad-CAM map that ReLU zeroes) it keeps none of
            the ranking: 0; where the original map is constant there is nothing to rank: NaN.
        layers: the layer re-initialised at each step, top layer first (step ``k`` has the
            layers ``layers[:k + 1]`` re-initialised).
    """

    scores: Tensor
    correlations: Tensor
    layers: list[str]


RandomisationFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
"""``explain_fn(model, images, targets) -> maps``: the explanation of ``images`` (``Tensor[B,
C, H, W]``) for ``targets`` (``Tensor[B]``) under ``model``, ``Tensor[B, ...]``."""


def randomisable_layers(model: nn.Module) -> list[str]:
    """The dotted names of the model's layers that model-parameter randomisation can
    re-initialise, bottom to top: modules with parameters of their own and a
    ``reset_parameters()`` method (convolutions, linear and normalisation layers, ...), in
    ``named_modules()`` order."""
    return [
        name
        for name, m in model.named_modules()
        if callable(getattr(m, "reset_parameters", None))
        and any(True for _ in m.parameters(recurse=False))
    ]


def randomised_models(
    model: nn.Module, layers: Sequence[str], seed: int = 0
) -> Iterator[tuple[str, nn.Module]]:
    """Cascading randomisation on a deep copy of ``model``: for each name of ``layers`` in
    turn, that layer's ``reset_parameters()`` runs with torch's random number generators seeded
    with ``seed`` (forked: the caller's generator state is untouched), and ``(name, copy)`` is
    yielded with every layer so far re-initialised. ``model`` itself is never changed."""
    copy = deepcopy(model)
    # torch.manual_seed seeds every CUDA device: fork (and so restore) them all.
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    for name in layers:
        module = copy.get_submodule(name)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            module.reset_parameters()  # type: ignore[operator]
        yield name, copy


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """The Spearman rank correlation of every row of ``a`` with the same row of ``b``
    (``Tensor[B, ...]``, flattened per row), ties given their average rank as
    ``scipy.stats.spearmanr`` does: ``Tensor[B]`` float64; NaN where a row is constant."""
    ra = _average_ranks(a.flatten(1))
    rb = _average_ranks(b.flatten(1))
    ra = ra - ra.mean(dim=1, keepdim=True)
    rb = rb - rb.mean(dim=1, keepdim=True)
    return (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1))


def _average_ranks(v: Tensor) -> Tensor:
    """Ranks ``0 .. N-1`` of every row, ties given the mean of their positions: float64."""
    b, n = v.shape
    values, order = torch.sort(v, dim=1, stable=True)
    pos = torch.arange(n, device=v.device).expand(b, n)
    starts = torch.ones(b, n, dtype=torch.int64, device=v.device)
    starts[:, 1:] = (values[:, 1:] != values[:, :-1]).long()
    group = starts.cumsum(dim=1) - 1  # the tie group of every sorted entry
    first = torch.full((b, n), n, dtype=torch.int64, device=v.device)
    first = first.scatter_reduce(1, group, pos, "amin")
    last = torch.zeros((b, n), dtype=torch.int64, device=v.device).scatter_reduce(
        1, group, pos, "amax"
    )
    mean = (first.gather(1, group) + last.gather(1, group)).double() / 2
    return torch.empty_like(mean).scatter_(1, order, mean)


def randomisation(
    model: nn.Module,
    images: Tensor,
    target: int | Tensor,
    explain_fn: RandomisationFn,
    *,
    layers: str | int | Sequence[str] = "top",
    seed: int = 0,
    absolute: bool = False,
    reference: Tensor | None = None,
    progress: Tick | None = None,
) -> RandomisationResult:
    """Model-parameter randomisation (Adebayo et al., 2018, "Sanity checks for saliency
    maps"), cascading from the top: re-initialise the model's top layers one by one (on a
    deep copy, see :func:`randomised_models`), explain the images again after each step and
    report the Spearman rank correlation of every image's new map with its original map. A
    map that depends on what the model learned decorrelates: lower is better.

    Args:
        model: the classifier; never changed (the copy is re-initialised), also on error.
        images: ``Tensor[B, C, H, W]`` float.
        target: an int or ``Tensor[B]``: the classes explained every time.
        explain_fn: see :data:`RandomisationFn`; called once with ``model`` (unless
            ``reference`` is given) and once per cascade step with the copy.
        layers: ``"top"`` (the top layer of :func:`randomisable_layers`), ``k`` (the top
            ``k`` layers, one cascade step each, top first), or dotted layer names, re-
            initialised cumulatively in the given order.
        seed: the seed of the re-initialisation (see :func:`randomised_models`).
        absolute: correlate the maps' absolute values (Adebayo et al. report both).
        reference: the original maps, if already computed.
        progress: see :data:`Tick` (one call per cascade step).

    Returns:
        A :class:`RandomisationResult`.
    """
    fn = "xai_serve.metrics.randomisation"
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"{fn}: `model` must be an nn.Module, got {type(model).__name__}")
    if not callable(explain_fn):
        raise InvalidInput(f"{fn}: `explain_fn` must be callable, got {type(explain_fn).__name__}")
    device = model_device(model)
    images, _, _ = _check(fn, images, None, 0.0, device, need_maps=False)
    b = images.shape[0]
    targets = _one_target(fn, target, b, device)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"{fn}: `seed` must be an int, got {seed!r}")
    names = _cascade_layers(fn, model, layers)
    if reference is None:
        reference = explain_fn(model, images, targets)
    ref = _explanation(fn, reference, b).flatten(1)
    if absolute:
        ref = ref.abs()
    steps = []
    for _, randomised in randomised_models(model, names, seed):
        out = _explanation(fn, explain_fn(randomised, images, targets), b).flatten(1)
        if out.shape != ref.shape:
            raise InvalidInput(
                f"{fn}: `explain_fn` returned {tuple(out.shape)} values for the randomised "
                f"model and {tuple(ref.shape)} for the original"
            )
        rho = spearman(ref, out.abs() if absolute else out)
        # A constant randomised map keeps none of the original ranking: 0, not NaN (NaN stays
        # where the original map itself is constant: there is no ranking to keep).
        lost = torch.isnan(rho) & ~_constant(ref) & _constant(out)
        steps.append(torch.where(lost, 0.0, rho))
        _tick(progress, len(steps), len(names))
    corr = torch.stack(steps, dim=1).float()
    return RandomisationResult(scores=corr[:, -1], correlations=corr, layers=names)


def _constant(v: Tensor) -> Tensor:
    """``Tensor[B]`` bool: every entry of the row is the same."""
    return (v == v[:, :1]).all(dim=1)


def _cascade_layers(fn: str, model: nn.Module, layers: object) -> list[str]:
    available = randomisable_layers(model)
    if not available:
        raise InvalidInput(
            f"{fn}: the model has no layer with parameters and reset_parameters() to re-initialise"
        )
    if layers == "top":
        return [available[-1]]
    if isinstance(layers, int) and not isinstance(layers, bool):
        if not 1 <= layers <= len(available):
            raise InvalidInput(
                f"{fn}: `layers` as a count must be in 1..{len(available)} (the model's "
                f"re-initialisable layers), got {layers}"
            )
        return available[::-1][:layers]
    if isinstance(layers, Sequence) and not isinstance(layers, str) and layers:
        unknown = [n for n in layers if n not in available]
        if unknown:
            raise InvalidInput(
                f"{fn}: `layers` names {unknown[0]!r}, which is not a re-initialisable layer "
                f"of the model (the top ones: {', '.join(available[::-1][:5])})"
            )
        return list(layers)
    raise InvalidInput(
        f"{fn}: `layers` must be 'top', a positive count or a list of layer names, got {layers!r}"
    )
