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
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import positive_int
from xai_serve.explainers.base import check_target_range, model_device, resolve_targets

__all__ = ["deletion_auc", "insertion_auc"]


def deletion_auc(
    model: nn.Module,
    images: Tensor,
    maps: Tensor,
    target: int | Tensor,
    *,
    steps: int = 20,
    baseline: float | Tensor = 0.0,
    batch_size: int = 64,
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

    Returns:
        ``Tensor[B]`` float32 on the model's device.
    """
    curve = _curve(model, images, maps, target, steps, baseline, batch_size, insert=False)
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
) -> Tensor:
    """Area under the insertion curve of every image's map (higher is more faithful).

    The input starts as the baseline (commonly a blurred copy of the images; default 0) and at
    step ``k`` shows the image's own values at the ``floor(k * H * W / steps)`` pixels the map
    ranks highest. Arguments and result as in :func:`deletion_auc`.
    """
    curve = _curve(model, images, maps, target, steps, baseline, batch_size, insert=True)
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
    return probs.view(b, steps + 1)


def _check(
    fn: str, images: object, maps: object, baseline: object, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """``(images, maps, baseline)`` on ``device``; the baseline as a 4-D tensor that broadcasts
    to the images (batch size 1 or B)."""
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
