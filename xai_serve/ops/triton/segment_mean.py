"""Triton ``segment_mean``: mean colour of every segment, ``Tensor[B, C, S]``.

Layers: :func:`_segment_sum_kernel` + :func:`_segment_div_kernel` (device),
:func:`_launch_segment_mean` (checks the layout, allocates, launches) and :func:`segment_mean`.

Kernel design. Launch 1 accumulates per-segment sums and pixel counts in float32 with
``tl.atomic_add`` into one zeroed workspace (``sums[B, C, S]`` followed by ``counts[B, S]``).
One program owns ``BLOCK_P`` consecutive pixels of one image. Neighbouring pixels mostly share a
segment, so adding every pixel atomically would serialise many atomics on a few addresses.
Instead, when the block's segment ids span fewer than ``BLOCK_S`` values (the usual case:
superpixel labels are spatially coherent), the program first reduces the block in registers
with a ``[BLOCK_S, BLOCK_P]`` one-hot mask and issues one atomic per touched segment and channel;
otherwise it falls back to one atomic per pixel and channel. Launch 2 is a small elementwise
division ``sums / counts`` (0 for an empty segment) cast to the images' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .superpixel_mask import cast_rne, pixel_strides

__all__ = ["segment_mean"]

# 256 pixels x 64 segment ids = a 16K-element one-hot tile; with 8 warps that is 64 elements per
# thread, which still fits in registers. 256 pixels is about one row of a 224-wide image, which
# typically touches well under 64 consecutive superpixel labels, so the register reduction path
# is the common one even for S in the hundreds.
_BLOCK_P = 256
_BLOCK_S = 64
_SUM_WARPS = 8
# The division launch is elementwise over B * C * S values: 1024 per program, 8 per thread.
_BLOCK_DIV = 1024
_DIV_WARPS = 4


@triton.jit
def _segment_sum_kernel(
    img_ptr,
    seg_ptr,
    sums_ptr,
    counts_ptr,
    C,
    HW,
    S,
    n_pblocks,
    i_sb,
    i_sc,
    i_sp,  # images [B, C, HW]
    g_sb,
    g_sp,  # segments [B, HW]
    BLOCK_P: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    b64 = (pid // n_pblocks).to(tl.int64)

    offs = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < HW
    seg = tl.load(seg_ptr + b64 * g_sb + offs * g_sp, mask=pmask, other=-1)
    # Ids outside [0, S) (never produced by the validated public API) are skipped.
    valid = pmask & (seg >= 0) & (seg < S)
    seg = tl.where(valid, seg, 0).to(tl.int32)
    lo = tl.min(tl.where(valid, seg, S), axis=0)
    hi = tl.max(tl.where(valid, seg, -1), axis=0)

    img_base = img_ptr + b64 * i_sb + offs * i_sp
    sums_base = sums_ptr + b64 * C * S
    counts_base = counts_ptr + b64 * S
    if hi - lo < BLOCK_S:
        # Reduce in registers over the window of ids [lo, lo + BLOCK_S). With no valid pixel
        # (lo = S > hi = -1) every count is 0 and nothing is written.
        ids = lo + tl.arange(0, BLOCK_S)
        onehot = (seg[None, :] == ids[:, None]) & valid[None, :]
        cnt = tl.sum(onehot.to(tl.float32), axis=1)
        touched = cnt > 0
        tl.atomic_add(counts_base + ids, cnt, mask=touched, sem="relaxed")
        for c in range(0, C):
            x = tl.load(img_base + c * i_sc, mask=valid, other=0.0).to(tl.float32)
            part = tl.sum(tl.where(onehot, x[None, :], 0.0), axis=1)
            tl.atomic_add(sums_base + c * S + ids, part, mask=touched, sem="relaxed")
    else:
        ones = tl.full([BLOCK_P], 1.0, tl.float32)
        tl.atomic_add(counts_base + seg, ones, mask=valid, sem="relaxed")
        for c in range(0, C):
            x = tl.load(img_base + c * i_sc, mask=valid, other=0.0).to(tl.float32)
            tl.atomic_add(sums_base + c * S + seg, x, mask=valid, sem="relaxed")


@triton.jit
def _segment_div_kernel(
    sums_ptr,
    counts_ptr,
    out_ptr,
    total,
    C,
    S,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    s = offs % S
    b = offs // S // C
    total_sum = tl.load(sums_ptr + offs, mask=mask, other=0.0)
    cnt = tl.load(counts_ptr + b * S + s, mask=mask, other=0.0)
    mean = tl.where(cnt > 0, tl.math.div_rn(total_sum, tl.maximum(cnt, 1.0)), 0.0)
    tl.store(out_ptr + offs, cast_rne(mean, out_ptr.dtype.element_ty), mask=mask)


def _launch_segment_mean(
    images: Tensor,
    segments: Tensor,
    num_segments: int,
    *,
    block_p: int = _BLOCK_P,
    block_s: int = _BLOCK_S,
    block_div: int = _BLOCK_DIV,
) -> Tensor:
    """Zero the workspace, accumulate, divide.

    ``block_p`` (pixels per program), ``block_s`` (width of the id window reduced in registers)
    and ``block_div`` (values per program of the division), all powers of two, are the tuned
    constants unless a test lowers them, so that a small input still runs several pixel blocks,
    both accumulation paths and several division programs.
    """
    for name, block in (("block_p", block_p), ("block_s", block_s), ("block_div", block_div)):
        if block < 1 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two, got {block}")
    bsz, c, h, w = images.shape
    s = int(num_segments)
    out = torch.empty((bsz, c, s), dtype=images.dtype, device=images.device)
    if out.numel() == 0:
        return out
    hw = h * w
    if hw == 0:
        return out.zero_()

    images, (i_sb, i_sc, i_sp) = pixel_strides(images)
    segments, (g_sb, g_sp) = pixel_strides(segments)
    workspace = torch.zeros(bsz * c * s + bsz * s, dtype=torch.float32, device=images.device)
    sums, counts = workspace[: bsz * c * s], workspace[bsz * c * s :]

    n_pblocks = triton.cdiv(hw, block_p)
    _segment_sum_kernel[(n_pblocks * bsz,)](
        images,
        segments,
        sums,
        counts,
        c,
        hw,
        s,
        n_pblocks,
        i_sb,
        i_sc,
        i_sp,
        g_sb,
        g_sp,
        BLOCK_P=block_p,
        BLOCK_S=block_s,
        num_warps=_SUM_WARPS,
    )
    total = bsz * c * s
    _segment_div_kernel[(triton.cdiv(total, block_div),)](
        sums,
        counts,
        out,
        total,
        c,
        s,
        BLOCK=block_div,
        num_warps=_DIV_WARPS,
    )
    return out


def segment_mean(images: Tensor, segments: Tensor, num_segments: int) -> Tensor:
    """``Tensor[B, C, S]``: mean colour of every segment (0 for an empty one).

    Arguments are validated by :mod:`xai_serve.ops`; see
    :func:`xai_serve.ops.reference.segment_mean_reference` for the exact semantics.
    """
    return _launch_segment_mean(images, segments, num_segments)
