"""Triton ``cam_fuse``: weighted channel sum -> ReLU -> bilinear upsample -> min-max normalise.

Layers: three ``@triton.jit`` kernels (one per phase), :func:`_launch_cam_fuse` (checks the
layout, allocates, picks block sizes, launches) and :func:`cam_fuse` (public entry point).

Kernel design; no ``[B, K, H, W]`` (or ``[B, K, h, w]`` product) intermediate exists:

1. :func:`_cam_lowres_kernel`, grid ``B * cdiv(h*w, BLOCK_P)``: a program owns ``BLOCK_P``
   low-resolution positions of one image and loops over the ``K`` channels in blocks of
   ``BLOCK_K``, accumulating ``w * A`` into a float32 ``[BLOCK_K, BLOCK_P]`` register tile that is
   reduced over ``K`` once at the end; optional ReLU; writes ``low[B, h*w]`` (float32, tiny).
2. :func:`_cam_upsample_kernel`, grid ``B * nprog``: a program owns ``tiles_per_prog`` tiles of
   ``BLOCK_O`` output pixels of one image, gathers the 4 neighbours from ``low`` (cache resident)
   with the index and weight arithmetic of ``F.interpolate(mode="bilinear",
   align_corners=False)`` (the blend written as lerps, see the kernel), writes the float32
   output and, when normalising, its own min/max into ``[B, nprog]`` partials.
3. :func:`_cam_normalize_kernel` (only when normalising), same grid: every program reduces the
   ``nprog`` partials of its image (at most ``_MAX_PARTIALS`` values) and rescales its tiles in
   place; a constant map (``hi == lo``) becomes zeros, never NaN.
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl
from torch import Tensor

from .superpixel_mask import pixel_strides

__all__ = ["cam_fuse"]

# Phase 1. Activations are small ([B, K, h, w] with h*w ~ 49..784 and K ~ 256..2048), so the
# work is a streaming dot product over K. A [BLOCK_K, BLOCK_P] tile of _TILE_1 = 4096 fp32
# accumulators is 32 registers per thread with 4 warps; BLOCK_P covers up to 64 positions
# (a whole 7x7 map in one program) and BLOCK_K gets the rest of the tile, so each loop
# iteration streams 8-16 KiB of activations. BLOCK_P >= 16 keeps layouts simple for h*w = 1.
_TILE_1 = 4096
_MAX_BLOCK_P = 64
_MIN_BLOCK_P = 16
_WARPS_1 = 4
# Phase 2/3. 1024 output pixels per tile, 4 warps -> 8 consecutive fp32 per thread (two 128-bit
# stores). A program loops over several tiles when an image needs more than _MAX_PARTIALS
# tiles, which bounds the partial buffers and the per-program reduction in phase 3 (<= 256
# values) while still giving >= 256 programs per image for large outputs.
_BLOCK_O = 1024
_MAX_PARTIALS = 256
_WARPS_O = 4


@triton.jit
def _cam_lowres_kernel(
    a_ptr,
    w_ptr,
    low_ptr,
    K,
    P,
    n_pblocks,
    a_sb,
    a_sk,
    a_sp,  # activations [B, K, P]
    w_sb,
    w_sk,
    w_sp,  # weights [B, K] (w_sp unused) or [B, K, P]
    PER_POSITION: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    b64 = (pid // n_pblocks).to(tl.int64)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs_p < P
    a_base = a_ptr + b64 * a_sb + offs_p[None, :] * a_sp
    w_base = w_ptr + b64 * w_sb
    acc = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < K
        mask = kmask[:, None] & pmask[None, :]
        a = tl.load(a_base + offs_k[:, None] * a_sk, mask=mask, other=0.0).to(tl.float32)
        if PER_POSITION:
            wt = tl.load(
                w_base + offs_k[:, None] * w_sk + offs_p[None, :] * w_sp, mask=mask, other=0.0
            ).to(tl.float32)
        else:
            wt = tl.load(w_base + offs_k * w_sk, mask=kmask, other=0.0).to(tl.float32)[:, None]
        acc += wt * a
    cam = tl.sum(acc, axis=0)
    if RELU:
        cam = tl.maximum(cam, 0.0)
    tl.store(low_ptr + b64 * P + offs_p, cam, mask=pmask)


@triton.jit
def _cam_upsample_kernel(
    low_ptr,
    out_ptr,
    pmin_ptr,
    pmax_ptr,
    h,
    w,
    H,
    W,
    scale_h,
    scale_w,
    nprog,
    tiles_per_prog,
    NORMALIZE: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    pid = tl.program_id(0)
    prog = pid % nprog
    b64 = (pid // nprog).to(tl.int64)
    HW = H * W
    low_base = low_ptr + b64 * (h * w)
    out_base = out_ptr + b64 * HW
    run_min = tl.full([BLOCK_O], float("inf"), tl.float32)
    run_max = tl.full([BLOCK_O], float("-inf"), tl.float32)
    for t in range(0, tiles_per_prog):
        offs = (prog * tiles_per_prog + t) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask = offs < HW
        oy = offs // W
        ox = offs % W
        # Source coordinates, as in ATen's area_pixel_compute_source_index (align_corners=False).
        sy = tl.maximum(scale_h * (oy.to(tl.float32) + 0.5) - 0.5, 0.0)
        sx = tl.maximum(scale_w * (ox.to(tl.float32) + 0.5) - 0.5, 0.0)
        y0 = tl.minimum(sy.to(tl.int32), h - 1)  # sy >= 0, so truncation is floor
        x0 = tl.minimum(sx.to(tl.int32), w - 1)
        y1 = tl.minimum(y0 + 1, h - 1)
        x1 = tl.minimum(x0 + 1, w - 1)
        ly1 = sy - y0.to(tl.float32)
        lx1 = sx - x0.to(tl.float32)
        v00 = tl.load(low_base + y0 * w + x0, mask=mask, other=0.0)
        v01 = tl.load(low_base + y0 * w + x1, mask=mask, other=0.0)
        v10 = tl.load(low_base + y1 * w + x0, mask=mask, other=0.0)
        v11 = tl.load(low_base + y1 * w + x1, mask=mask, other=0.0)
        # ATen's l0y * (l0x * v00 + l1x * v01) + l1y * (l0x * v10 + l1x * v11) with l0 = 1 - l1,
        # written as nested lerps a + l1 * (b - a): equal up to float rounding, and equal
        # neighbours give back exactly that value, so a constant low-resolution map (e.g. 1x1)
        # stays exactly constant and normalises to zeros instead of to amplified rounding noise.
        top = v00 + lx1 * (v01 - v00)
        bottom = v10 + lx1 * (v11 - v10)
        val = top + ly1 * (bottom - top)
        tl.store(out_base + offs, val, mask=mask)
        if NORMALIZE:
            run_min = tl.minimum(run_min, tl.where(mask, val, float("inf")))
            run_max = tl.maximum(run_max, tl.where(mask, val, float("-inf")))
    if NORMALIZE:
        tl.store(pmin_ptr + b64 * nprog + prog, tl.min(run_min, axis=0))
        tl.store(pmax_ptr + b64 * nprog + prog, tl.max(run_max, axis=0))


@triton.jit
def _cam_normalize_kernel(
    out_ptr,
    pmin_ptr,
    pmax_ptr,
    HW,
    nprog,
    tiles_per_prog,
    BLOCK_O: tl.constexpr,
    BLOCK_PART: tl.constexpr,
):
    pid = tl.program_id(0)
    prog = pid % nprog
    b64 = (pid // nprog).to(tl.int64)
    offs_part = tl.arange(0, BLOCK_PART)
    part_mask = offs_part < nprog
    lo = tl.min(
        tl.load(pmin_ptr + b64 * nprog + offs_part, mask=part_mask, other=float("inf")), axis=0
    )
    hi = tl.max(
        tl.load(pmax_ptr + b64 * nprog + offs_part, mask=part_mask, other=float("-inf")), axis=0
    )
    span = hi - lo
    positive = span > 0
    safe_span = tl.where(positive, span, 1.0)
    out_base = out_ptr + b64 * HW
    for t in range(0, tiles_per_prog):
        offs = (prog * tiles_per_prog + t) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask = offs < HW
        v = tl.load(out_base + offs, mask=mask, other=0.0)
        v = tl.where(positive, tl.math.div_rn(v - lo, safe_span), 0.0)
        tl.store(out_base + offs, v, mask=mask)


def _fp32_ratio(num: int, den: int) -> float:
    """``float32(num) / float32(den)``, the interpolation scale as ATen computes it.

    The float64 quotient rounded to float32 equals the correctly rounded float32 quotient
    (double rounding is innocuous for division since 53 >= 2 * 24 + 2), and the kernel
    receives Python floats as float32, so no host tensor is needed.
    """
    return struct.unpack("f", struct.pack("f", num / den))[0]


def _launch_cam_fuse(
    activations: Tensor,
    weights: Tensor,
    size: tuple[int, int],
    relu: bool,
    normalize: bool,
    *,
    block_o: int = _BLOCK_O,
    max_partials: int = _MAX_PARTIALS,
) -> Tensor:
    """Launch the three phases.

    ``block_o`` (output pixels per tile, a power of two) and ``max_partials`` (programs per
    image in phases 2 and 3 at most) are the tuned constants unless a test lowers them, so that
    a small output still runs several programs per image and several tiles per program.
    """
    if block_o < 1 or block_o & (block_o - 1) or max_partials < 1:
        raise ValueError(
            f"block_o must be a power of two and max_partials >= 1, got "
            f"{block_o} and {max_partials}"
        )
    bsz, k, h, w = activations.shape
    out_h, out_w = int(size[0]), int(size[1])
    device = activations.device
    out = torch.empty((bsz, out_h, out_w), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out

    # Phase 1: low-resolution map [B, h*w] in float32.
    p = h * w
    activations, (a_sb, a_sk, a_sp) = pixel_strides(activations)
    per_position = weights.dim() == 4
    if per_position:
        weights, (w_sb, w_sk, w_sp) = pixel_strides(weights)
    else:
        (w_sb, w_sk), w_sp = weights.stride(), 0
    low = torch.empty((bsz, p), dtype=torch.float32, device=device)
    block_p = max(_MIN_BLOCK_P, min(_MAX_BLOCK_P, triton.next_power_of_2(p)))
    block_k = min(_TILE_1 // block_p, triton.next_power_of_2(k))
    n_pblocks = triton.cdiv(p, block_p)
    _cam_lowres_kernel[(n_pblocks * bsz,)](
        activations,
        weights,
        low,
        k,
        p,
        n_pblocks,
        a_sb,
        a_sk,
        a_sp,
        w_sb,
        w_sk,
        w_sp,
        PER_POSITION=per_position,
        RELU=bool(relu),
        BLOCK_K=block_k,
        BLOCK_P=block_p,
        num_warps=_WARPS_1,
    )

    # Phase 2: bilinear upsample (+ per-program min/max partials).
    hw_out = out_h * out_w
    tiles = triton.cdiv(hw_out, block_o)
    tiles_per_prog = triton.cdiv(tiles, max_partials)
    nprog = triton.cdiv(tiles, tiles_per_prog)
    if normalize:
        partials = torch.empty((2, bsz, nprog), dtype=torch.float32, device=device)
        pmin, pmax = partials[0], partials[1]
    else:
        pmin = pmax = out  # never touched
    grid = (nprog * bsz,)
    _cam_upsample_kernel[grid](
        low,
        out,
        pmin,
        pmax,
        h,
        w,
        out_h,
        out_w,
        _fp32_ratio(h, out_h),
        _fp32_ratio(w, out_w),
        nprog,
        tiles_per_prog,
        NORMALIZE=bool(normalize),
        BLOCK_O=block_o,
        num_warps=_WARPS_O,
    )

    # Phase 3: per-image min-max rescale, in place.
    if normalize:
        _cam_normalize_kernel[grid](
            out,
            pmin,
            pmax,
            hw_out,
            nprog,
            tiles_per_prog,
            BLOCK_O=block_o,
            BLOCK_PART=triton.next_power_of_2(nprog),
            num_warps=_WARPS_O,
        )
    return out


def cam_fuse(
    activations: Tensor,
    weights: Tensor,
    size: tuple[int, int],
    relu: bool,
    normalize: bool,
) -> Tensor:
    """``Tensor[B, H, W]`` float32 class-activation maps.

    Arguments are validated by :mod:`xai_serve.ops`; see
    :func:`xai_serve.ops.reference.cam_fuse_reference` for the exact semantics.
    """
    return _launch_cam_fuse(activations, weights, size, relu, normalize)
