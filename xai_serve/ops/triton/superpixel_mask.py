"""Triton ``superpixel_mask``: perturbed images for N coalitions of superpixels per image.

Layers: :func:`_superpixel_mask_kernel` and :func:`_superpixel_mask_nhwc_kernel` (device),
:func:`_launch_superpixel_mask` (checks the layout, allocates, picks block sizes, launches) and
:func:`superpixel_mask` (public entry point).

This module also holds the small helpers shared by the other Triton ops (:func:`pixel_strides`,
:func:`num_sms`, :func:`cast_rne`).

Kernel design. The op is memory-bound: it writes ``B * N * C * H * W`` values and reads only
``B * C * H * W`` image values (plus segment ids, a tiny ``keep`` table and the baseline). One
program owns ``BLOCK_P`` consecutive pixels of one image ``b`` and a chunk of consecutive
coalitions ``[n0, n1)``. It

1. loads the block's segment ids once and gathers ``keep[b, n, seg]`` for every ``n`` of its
   chunk into a per-pixel bitmask (``N_CHUNK <= 16`` bits), so ``keep`` is read once per ``n``;
2. loops over the ``C`` channels: loads the image values (and baseline values) of the block once,
   applies the optional ``(v - mean[c]) / std[c]`` to both (the select commutes with the affine
   map, so this is exact and costs one division per pixel and channel instead of one per output);
3. for every ``n`` of its chunk stores ``where(bit n, image, baseline)`` into row ``b * N + n``.

So every input byte is read once per ``N_CHUNK`` output rows, and all global stores are long
contiguous runs of ``BLOCK_P`` elements of the NCHW output.

With ``channels_last=True`` the output is ``[B * N, H, W, C]`` in memory, where one image under
one coalition is a single contiguous run of ``H * W * C`` values. The channels_last kernel
therefore tiles that run instead of a channel plane: a program owns ``BLOCK_E`` consecutive
values of image ``b`` (value ``e`` is channel ``e % C`` of pixel ``e // C``, with ``C`` a
compile-time constant so both are multiply-shifts), computes the keep bits, the kept and the
baseline values of each once, and stores one contiguous ``BLOCK_E`` run per coalition: the
output is written in its final layout, never NCHW first.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from xai_serve.ops.triton_env import triton_interpreting

__all__ = ["superpixel_mask"]

# 1024 pixels per program with 4 warps = 8 consecutive pixels per thread: two 128-bit stores per
# thread for float32 output, one for float16/bfloat16. Large enough that a 224x224 image needs
# only 49 pixel blocks (few programs under the interpreter), small enough that the handful of
# live [BLOCK_P] tensors (segment ids, keep bits, image and baseline values) stays in registers.
_BLOCK_P = 1024
_NUM_WARPS = 4
# At most 16 coalitions per program: the per-pixel keep bits fit in an int32, and re-reading the
# inputs (mostly from L2) costs at most 1/16 of the output traffic.
_MAX_N_CHUNK = 16
# Values of the [H * W * C] run per channels_last program: the same 8 stores' worth per thread as
# the NCHW kernel's BLOCK_P pixels, and a power of two.
_BLOCK_E = 2048

_BASE_CONST, _BASE_SEGMENT, _BASE_IMAGE = 0, 1, 2


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; 0 when unknown (CPU tensors / interpreter)."""
    if device.type != "cuda" or triton_interpreting():
        return 0
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def pixel_strides(t: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Strides of ``t[..., H, W]`` with ``(H, W)`` flattened into one pixel axis.

    Returns ``(t, (*leading_strides, pixel_stride))``. NCHW-contiguous, channels_last and
    broadcast (stride-0) layouts flatten without a copy; any other layout is first made
    contiguous. The kernels index ``t`` as ``lead_0 * s_0 + ... + pixel * s_pixel``.
    """
    h, w = t.shape[-2], t.shape[-1]
    sh, sw = t.stride(-2), t.stride(-1)
    if h == 1 or w == 1:
        sp = sw if w > 1 else (sh if h > 1 else 1)
    elif sh == w * sw:
        sp = sw
    else:
        t = t.contiguous()
        sp = 1
    return t, (*t.stride()[:-2], sp)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """Round float32 ``x`` to ``dtype`` to nearest-even, as ``Tensor.to`` does.

    float32 -> bfloat16 is done with integer arithmetic: on a GPU it is as exact as the native
    conversion (and costs a few integer ops in a memory-bound kernel), and it is also exact
    under ``TRITON_INTERPRET=1``, whose own float32 -> bfloat16 cast truncates.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _keep_bits(keep_row, seg, valid, count, S, BLOCK: tl.constexpr):
    """Bit ``j`` (``j < count <= 16``) of the result is ``keep_row[j * S + seg]`` != 0."""
    bits = tl.zeros([BLOCK], dtype=tl.int32)
    for j in range(0, count):
        k = tl.load(keep_row + j * S + seg, mask=valid, other=0)
        bits = bits | ((k != 0).to(tl.int32) << j)
    return bits


@triton.jit
def _superpixel_mask_kernel(
    img_ptr,
    seg_ptr,
    keep_ptr,
    base_ptr,
    mean_ptr,
    std_ptr,
    out_ptr,
    fill,
    N,
    C,
    HW,
    S,
    n_pblocks,
    n_chunks,
    n_chunk,
    i_sb,
    i_sc,
    i_sp,  # images [B, C, HW]
    g_sb,
    g_sp,  # segments [B, HW]
    b_sb,
    b_sc,
    b_sp,  # baseline [B, C, HW] or [B, C, S] (then b_sp is the segment stride)
    BASE_MODE: tl.constexpr,  # 0: constant fill, 1: per segment, 2: image
    NORMALIZE: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    rest = pid // n_pblocks
    chunk = rest % n_chunks
    b = rest // n_chunks
    b64 = b.to(tl.int64)
    n0 = chunk * n_chunk
    n1 = tl.minimum(n0 + n_chunk, N)

    offs = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = offs < HW
    seg = tl.load(seg_ptr + b64 * g_sb + offs * g_sp, mask=pmask, other=-1)
    # Ids outside [0, S) (never produced by the validated public API) are never used as an index:
    # such a pixel is "not kept" and, with a per-segment baseline, gets the constant `fill`.
    valid = pmask & (seg >= 0) & (seg < S)
    seg = tl.where(valid, seg, 0).to(tl.int32)

    bits = _keep_bits(keep_ptr + (b64 * N + n0) * S, seg, valid, n1 - n0, S, BLOCK_P)

    out_row0 = (b64 * N + n0) * C  # first output plane of this program: [(b*N + n0), c=0]
    for c in range(0, C):
        x = tl.load(img_ptr + b64 * i_sb + c * i_sc + offs * i_sp, mask=pmask, other=0.0)
        x = x.to(tl.float32)
        if BASE_MODE == 0:
            base = tl.full([BLOCK_P], fill, tl.float32)
        elif BASE_MODE == 1:
            base = tl.load(base_ptr + b64 * b_sb + c * b_sc + seg * b_sp, mask=valid, other=fill)
            base = base.to(tl.float32)
        else:
            base = tl.load(base_ptr + b64 * b_sb + c * b_sc + offs * b_sp, mask=pmask, other=0.0)
            base = base.to(tl.float32)
        if NORMALIZE:
            m = tl.load(mean_ptr + c)
            s = tl.load(std_ptr + c)
            x = tl.math.div_rn(x - m, s)
            base = tl.math.div_rn(base - m, s)
        x = cast_rne(x, out_ptr.dtype.element_ty)
        base = cast_rne(base, out_ptr.dtype.element_ty)
        for j in range(0, n1 - n0):
            kept = ((bits >> j) & 1) != 0
            plane = (out_row0 + j * C + c) * HW
            tl.store(out_ptr + plane + offs, tl.where(kept, x, base), mask=pmask)


@triton.jit
def _superpixel_mask_nhwc_kernel(
    img_ptr,
    seg_ptr,
    keep_ptr,
    base_ptr,
    mean_ptr,
    std_ptr,
    out_ptr,
    fill,
    N,
    HW,
    S,
    n_eblocks,
    n_chunks,
    n_chunk,
    i_sb,
    i_sc,
    i_sp,  # images [B, C, HW]
    g_sb,
    g_sp,  # segments [B, HW]
    b_sb,
    b_sc,
    b_sp,  # baseline [B, C, HW] or [B, C, S] (then b_sp is the segment stride)
    C: tl.constexpr,
    BASE_MODE: tl.constexpr,  # 0: constant fill, 1: per segment, 2: image
    NORMALIZE: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    eb = pid % n_eblocks
    rest = pid // n_eblocks
    chunk = rest % n_chunks
    b = rest // n_chunks
    b64 = b.to(tl.int64)
    n0 = chunk * n_chunk
    n1 = tl.minimum(n0 + n_chunk, N)
    hwc = HW * C

    # Value e of the image's [HW, C] run: channel e % C of pixel e // C.
    offs = eb * BLOCK_E + tl.arange(0, BLOCK_E)
    emask = offs < hwc
    pix = offs // C
    ch = offs - pix * C
    seg = tl.load(seg_ptr + b64 * g_sb + pix * g_sp, mask=emask, other=-1)
    valid = emask & (seg >= 0) & (seg < S)  # bad ids: never kept, never an index
    seg = tl.where(valid, seg, 0).to(tl.int32)
    bits = _keep_bits(keep_ptr + (b64 * N + n0) * S, seg, valid, n1 - n0, S, BLOCK_E)

    x = tl.load(img_ptr + b64 * i_sb + ch * i_sc + pix * i_sp, mask=emask, other=0.0)
    x = x.to(tl.float32)
    if BASE_MODE == 0:
        base = tl.full([BLOCK_E], fill, tl.float32)
    elif BASE_MODE == 1:
        base = tl.load(base_ptr + b64 * b_sb + ch * b_sc + seg * b_sp, mask=valid, other=fill)
        base = base.to(tl.float32)
    else:
        base = tl.load(base_ptr + b64 * b_sb + ch * b_sc + pix * b_sp, mask=emask, other=0.0)
        base = base.to(tl.float32)
    if NORMALIZE:
        m = tl.load(mean_ptr + ch, mask=emask, other=0.0)
        s = tl.load(std_ptr + ch, mask=emask, other=1.0)
        x = tl.math.div_rn(x - m, s)
        base = tl.math.div_rn(base - m, s)
    x = cast_rne(x, out_ptr.dtype.element_ty)
    base = cast_rne(base, out_ptr.dtype.element_ty)
    for j in range(0, n1 - n0):
        kept = ((bits >> j) & 1) != 0
        run = (b64 * N + n0 + j) * hwc  # output run of image b under coalition n0 + j
        tl.store(out_ptr + run + offs, tl.where(kept, x, base), mask=emask)


def _n_chunk(
    n: int, blocks_per_chunk_row: int, device: torch.device, max_chunk: int = _MAX_N_CHUNK
) -> int:
    """Coalitions per program.

    Start from the largest chunk (<= ``max_chunk``, most input reuse); on a GPU halve it while
    the grid would leave SMs idle (fewer than 4 programs per SM). Then even the chunks out, so
    that e.g. N = 20 runs as 2 x 10 rather than 16 + 4.
    """
    chunk = min(n, max_chunk)
    sms = num_sms(device)
    if sms:
        while chunk > 1 and blocks_per_chunk_row * triton.cdiv(n, chunk) < 4 * sms:
            chunk //= 2
    return triton.cdiv(n, triton.cdiv(n, chunk))


def _launch_superpixel_mask(
    images: Tensor,
    segments: Tensor,
    keep: Tensor,
    baseline: Tensor | None,
    fill: float,
    mean: Tensor | None,
    std: Tensor | None,
    channels_last: bool,
    *,
    block_p: int = _BLOCK_P,
    block_e: int = _BLOCK_E,
    max_n_chunk: int = _MAX_N_CHUNK,
) -> Tensor:
    """Allocate the output and launch the NCHW or the channels_last kernel.

    ``block_p`` / ``block_e`` (pixels / values per program, powers of two) and ``max_n_chunk``
    (coalitions per program at most, <= 16) are the tuned constants unless a test lowers them,
    so that a small input still runs several pixel blocks and coalition chunks.
    """
    for name, block in (("block_p", block_p), ("block_e", block_e)):
        if block < 1 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two, got {block}")
    if not 1 <= max_n_chunk <= _MAX_N_CHUNK:
        raise ValueError(f"max_n_chunk must lie in [1, {_MAX_N_CHUNK}], got {max_n_chunk}")
    bsz, c, h, w = images.shape
    n, s = keep.shape[1], keep.shape[2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(
        (bsz * n, c, h, w), dtype=images.dtype, device=images.device, memory_format=fmt
    )
    hw = h * w
    if out.numel() == 0:
        return out

    images, (i_sb, i_sc, i_sp) = pixel_strides(images)
    segments, (g_sb, g_sp) = pixel_strides(segments)
    keep = keep.contiguous()
    if keep.dtype == torch.bool:
        keep = keep.view(torch.uint8)

    if baseline is None:
        mode, base, (b_sb, b_sc, b_sp) = _BASE_CONST, images, (0, 0, 0)
    elif baseline.dim() == 4:
        mode = _BASE_IMAGE
        base, (b_sb, b_sc, b_sp) = pixel_strides(baseline)
    else:
        mode, base = _BASE_SEGMENT, baseline
        b_sb, b_sc, b_sp = baseline.stride()

    normalize = mean is not None and std is not None
    if normalize:
        mean = mean.to(torch.float32).contiguous()
        std = std.to(torch.float32).contiguous()
    else:
        mean = std = images  # never read

    if channels_last:
        n_eblocks = triton.cdiv(hw * c, block_e)
        n_chunk = _n_chunk(n, n_eblocks * bsz, images.device, max_n_chunk)
        n_chunks = triton.cdiv(n, n_chunk)
        _superpixel_mask_nhwc_kernel[(n_eblocks * n_chunks * bsz,)](
            images,
            segments,
            keep,
            base,
            mean,
            std,
            out,
            float(fill),
            n,
            hw,
            s,
            n_eblocks,
            n_chunks,
            n_chunk,
            i_sb,
            i_sc,
            i_sp,
            g_sb,
            g_sp,
            b_sb,
            b_sc,
            b_sp,
            C=c,
            BASE_MODE=mode,
            NORMALIZE=normalize,
            BLOCK_E=block_e,
            num_warps=_NUM_WARPS,
        )
        return out

    n_pblocks = triton.cdiv(hw, block_p)
    n_chunk = _n_chunk(n, n_pblocks * bsz, images.device, max_n_chunk)
    n_chunks = triton.cdiv(n, n_chunk)
    grid = (n_pblocks * n_chunks * bsz,)
    _superpixel_mask_kernel[grid](
        images,
        segments,
        keep,
        base,
        mean,
        std,
        out,
        float(fill),
        n,
        c,
        hw,
        s,
        n_pblocks,
        n_chunks,
        n_chunk,
        i_sb,
        i_sc,
        i_sp,
        g_sb,
        g_sp,
        b_sb,
        b_sc,
        b_sp,
        BASE_MODE=mode,
        NORMALIZE=normalize,
        BLOCK_P=block_p,
        num_warps=_NUM_WARPS,
    )
    return out


def superpixel_mask(
    images: Tensor,
    segments: Tensor,
    keep: Tensor,
    baseline: Tensor | None,
    fill: float,
    mean: Tensor | None,
    std: Tensor | None,
    *,
    channels_last: bool = False,
) -> Tensor:
    """``Tensor[B * N, C, H, W]``: image ``b`` under coalition ``n`` in row ``b * N + n``.

    With ``channels_last`` the output is written in ``torch.channels_last`` memory format.
    Arguments are validated by :mod:`xai_serve.ops`; see
    :func:`xai_serve.ops.reference.superpixel_mask_reference` for the exact semantics.
    """
    return _launch_superpixel_mask(images, segments, keep, baseline, fill, mean, std, channels_last)
