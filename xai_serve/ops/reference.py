"""Pure-PyTorch references of the ``xai_serve`` ops.

These functions are the specification: every kernel (C++ CPU, CUDA, Triton) is tested against
them, and they are the fallback when no kernel is available. They favour clarity over speed and
may build large intermediates that the kernels never do.

All arguments are assumed to be validated by :mod:`xai_serve.ops` (shapes, dtypes, devices,
segment ids in range); called directly they do no checking of their own.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "attention_residual_reference",
    "bilinear_upsample_reference",
    "cam_fuse_reference",
    "segment_mean_reference",
    "superpixel_mask_reference",
]


def cam_fuse_reference(
    activations: Tensor,
    weights: Tensor,
    size: tuple[int, int],
    relu: bool = True,
    normalize: bool = True,
) -> Tensor:
    """Weighted channel sum, ReLU, bilinear upsample and per-image min-max normalisation.

    Args:
        activations: ``Tensor[B, K, h, w]`` (float32, float16 or bfloat16).
        weights: ``Tensor[B, K]`` (one weight per channel, Grad-CAM style) or
            ``Tensor[B, K, h, w]`` (one weight per activation, HiResCAM/LayerCAM style).
        size: output ``(H, W)``.
        relu: clamp the low-resolution map at zero before upsampling.
        normalize: scale each map to ``[0, 1]``; a constant map becomes all zeros.

    Returns:
        ``Tensor[B, H, W]`` float32. Accumulation is in float32; the upsampling is
        :func:`bilinear_upsample_reference`.
    """
    a = activations.float()
    w = weights.float()
    if w.dim() == 2:
        w = w[:, :, None, None]
    cam = (w * a).sum(dim=1)  # [B, h, w]
    if relu:
        cam = cam.clamp_min(0)
    cam = bilinear_upsample_reference(cam, size)
    if normalize:
        lo = cam.amin(dim=(1, 2), keepdim=True)
        hi = cam.amax(dim=(1, 2), keepdim=True)
        span = hi - lo
        cam = torch.where(span > 0, (cam - lo) / torch.where(span > 0, span, 1.0), 0.0)
    return cam.contiguous()


def _axis(n_in: int, n_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights along one axis, in float32 as PyTorch computes them."""
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(n_out, dtype=torch.float32)
    dst = torch.arange(n_out, dtype=torch.float32)
    src = (scale * (dst + 0.5) - 0.5).clamp_min(0)
    i0 = src.long().clamp_max(n_in - 1)
    i1 = (i0 + 1).clamp_max(n_in - 1)
    lam = (src - i0).clamp(0, 1)
    return i0.to(device), i1.to(device), lam.to(device)


def bilinear_upsample_reference(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of float32 ``Tensor[B, h, w]`` to ``Tensor[B, H, W]``.

    Samples where ``F.interpolate(mode="bilinear", align_corners=False)`` samples, with the same
    weights, but interpolates as ``a + t * (b - a)`` (rows first, then columns): a constant map
    stays exactly constant, so min-max normalisation maps it to zeros instead of amplifying
    rounding noise. Elsewhere it equals ``F.interpolate`` to float32 rounding.
    """
    _, h, w = maps.shape
    y0, y1, ty = _axis(h, size[0], maps.device)
    x0, x1, tx = _axis(w, size[1], maps.device)
    left, right = maps[:, :, x0], maps[:, :, x1]
    rows = left + tx * (right - left)  # [B, h, W]
    top, bottom = rows[:, y0, :], rows[:, y1, :]
    return top + ty[:, None] * (bottom - top)


def superpixel_mask_reference(
    images: Tensor,
    segments: Tensor,
    keep: Tensor,
    baseline: Tensor | None = None,
    fill: float = 0.0,
    mean: Tensor | None = None,
    std: Tensor | None = None,
    channels_last: bool = False,
) -> Tensor:
    """Perturbed images for N coalitions of superpixels per image.

    Args:
        images: ``Tensor[B, C, H, W]``.
        segments: ``Tensor[B, H, W]`` int32/int64, ids in ``[0, S)``.
        keep: ``Tensor[B, N, S]`` bool/uint8; nonzero keeps the segment's pixels.
        baseline: what replaces a dropped pixel: ``Tensor[B, C, H, W]`` (a full image),
            ``Tensor[B, C, S]`` (one colour per segment), or ``None`` for the constant ``fill``.
            Same dtype as ``images``.
        fill: the constant baseline when ``baseline`` is ``None``.
        mean, std: optional ``Tensor[C]`` float32; when given the output is
            ``(value - mean[c]) / std[c]`` (the model's input normalisation, fused).
        channels_last: return the output in ``torch.channels_last`` memory format (same shape
            and values).

    Returns:
        ``Tensor[B * N, C, H, W]`` in the dtype of ``images``; row ``b * N + n`` is image ``b``
        under coalition ``n``. Arithmetic is in float32, rounded once at the end. Contiguous,
        or channels_last-contiguous with ``channels_last``.
    """
    b, c, h, w = images.shape
    n = keep.shape[1]
    seg = segments.reshape(b, 1, h * w).long()
    kept = torch.gather(keep.bool(), 2, seg.expand(b, n, h * w)).view(b, n, 1, h, w)
    if baseline is None:
        base = torch.full((), fill, dtype=torch.float32, device=images.device)
    elif baseline.dim() == 4:
        base = baseline.float()[:, None]
    else:
        base = torch.gather(baseline.float(), 2, seg.expand(b, c, h * w)).view(b, 1, c, h, w)
    out = torch.where(kept, images.float()[:, None], base)
    if mean is not None and std is not None:
        out = (out - mean.float().view(1, 1, c, 1, 1)) / std.float().view(1, 1, c, 1, 1)
    out = out.to(images.dtype).reshape(b * n, c, h, w)
    if not channels_last:
        return out
    # A fresh channels_last tensor, so even C = 1 gets the canonical channels_last strides
    # (`.contiguous(memory_format=...)` keeps a C = 1 tensor's NCHW strides).
    return torch.empty_like(out, memory_format=torch.channels_last).copy_(out)


def segment_mean_reference(images: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """Mean colour of every segment.

    Args:
        images: ``Tensor[B, C, H, W]``.
        segments: ``Tensor[B, H, W]`` int32/int64, ids in ``[0, num_segments)``.
        num_segments: ``S``.

    Returns:
        ``Tensor[B, C, S]`` in the dtype of ``images`` (sums in float32); a segment with no
        pixels has mean 0.
    """
    b, c, h, w = images.shape
    seg = segments.reshape(b, 1, h * w).long()
    sums = torch.zeros(b, c, num_segments, dtype=torch.float32, device=images.device)
    sums.scatter_add_(2, seg.expand(b, c, h * w), images.float().reshape(b, c, h * w))
    counts = torch.zeros(b, 1, num_segments, dtype=torch.float32, device=images.device)
    counts.scatter_add_(2, seg, torch.ones(b, 1, h * w, device=images.device))
    means = torch.where(counts > 0, sums / counts.clamp_min(1), 0.0)
    return means.to(images.dtype)


def attention_residual_reference(attention: Tensor, drop: int) -> Tensor:
    """``rownorm(0.5 * a + 0.5 * I)`` of each matrix ``a`` of ``Tensor[M, N, N]``, after setting
    its ``drop`` smallest entries to zero -- except entry ``[0, 0]``, which counts among them but
    is kept (jacobgil/vit-explain's discard, whose rows are renormalised here; it divides by the
    transposed sums). Which of several equal entries are dropped is left to ``topk``."""
    m, n, _ = attention.shape
    a = attention
    if drop > 0:
        flat = a.reshape(m, n * n)
        if 2 * drop <= n * n:
            low = flat.topk(drop, dim=1, largest=False).indices
            mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, low, True)
        else:  # the same set, from the fewer entries kept (topk's cost grows with k)
            high = flat.topk(n * n - drop, dim=1, largest=True).indices
            mask = torch.ones_like(flat, dtype=torch.bool).scatter_(1, high, False)
        mask[:, 0] = False
        a = flat.masked_fill(mask, 0.0).view(m, n, n)
    eye = torch.eye(n, dtype=a.dtype, device=a.device)
    r = 0.5 * a + 0.5 * eye
    return r / r.sum(dim=-1, keepdim=True)
