"""Image segmentations for perturbation methods: a regular grid and SLIC superpixels.

Both work on a whole batch at once, on the images' device, and return ``Tensor[B, H, W]`` int64
segment ids that start at 0 in every image.

* :func:`grid` -- near-square rectangular cells, the same for every image.
* :func:`slic` -- SLIC superpixels (Achanta et al., 2012) written with tensor ops only: the
  pixel assignment is a loop over the 9 neighbouring grid cells, the centre update a scatter of
  integer sums, and the connectivity step a label propagation. Nothing loops over pixels or
  images, nothing is random, and the result is bit-for-bit the same from run to run, also on a
  GPU (the centre sums are exact integer sums, so their order does not matter).
* :func:`num_segments` -- the number of ids a segmentation uses (one device sync).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import positive_int

__all__ = ["grid", "num_segments", "slic"]

# Colours are rescaled per image so that their range spans this many units: the range of CIELAB
# lightness, the space in which SLIC's usual compactness of 10 was tuned.
_COLOUR_RANGE = 100.0
# Centre sums are accumulated as int64 fixed-point numbers with this many fractional bits:
# integer addition is associative, so the scatter gives the same sums in any order.
_FIXED_BITS = 16
# Connected pieces smaller than this fraction of the mean grid-cell area are merged into a
# neighbour by the connectivity step.
_MIN_SIZE_FACTOR = 0.25


# --------------------------------------------------------------------------- checks


def _check_images(images: object, fn: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise InvalidInput(f"{fn}: `images` must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise InvalidInput(
            f"{fn}: `images` must be Tensor[B, C, H, W], got shape {tuple(images.shape)}"
        )
    if not images.dtype.is_floating_point:
        raise InvalidInput(f"{fn}: `images` must be a float tensor, got {images.dtype}")
    if images.numel() == 0:
        raise InvalidInput(f"{fn}: `images` is empty: shape {tuple(images.shape)}")
    return images


# --------------------------------------------------------------------------- grid


def _grid_shape(height: int, width: int, n_segments: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols`` close to ``n_segments`` and cells close to square.

    ``rows <= height`` and ``cols <= width``, so every cell holds at least one pixel.
    """
    n = min(n_segments, height * width)
    ideal = math.sqrt(n * height / width)  # rows for exactly square cells
    best: tuple[float, float, int, int] | None = None
    for r in (math.floor(ideal), math.ceil(ideal)):
        rows = min(max(r, 1), height, n)
        cols = min(max(round(n / rows), 1), width)
        aspect = abs(math.log((height / rows) / (width / cols)))
        key = (abs(rows * cols - n) / n, aspect, rows, cols)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[2], best[3]


def _cell_index(size: int, cells: int, device: torch.device) -> Tensor:
    """``Tensor[size]``: the cell (0 .. cells-1) of each coordinate; cell sizes differ by <= 1."""
    return torch.arange(size, device=device) * cells // size


def grid(images: Tensor, n_segments: int) -> Tensor:
    """A near-square grid of about ``n_segments`` rectangular cells, the same for every image.

    Args:
        images: ``Tensor[B, C, H, W]``, any float dtype and device (only its shape is used).
        n_segments: the number of cells wanted (>= 1). ``rows x cols`` is chosen so that
            ``rows * cols`` is close to it and the cells are close to square for the image's
            aspect ratio; at most one cell per pixel.

    Returns:
        ``Tensor[B, H, W]`` int64 on the images' device: cell ids, row-major, every id in
        ``[0, rows * cols)`` used. Cell heights (widths) differ by at most one pixel.
    """
    fn = "xai_serve.segmentation.grid"
    images = _check_images(images, fn)
    positive_int(n_segments, f"{fn}: `n_segments`")
    b, _, h, w = images.shape
    rows, cols = _grid_shape(h, w, n_segments)
    device = images.device
    ids = _cell_index(h, rows, device)[:, None] * cols + _cell_index(w, cols, device)[None, :]
    return ids.expand(b, h, w).contiguous()


def num_segments(segments: Tensor) -> int:
    """``int(segments.max()) + 1``: the number of ids a ``[B, H, W]`` segmentation uses.

    This reads one number back from the device (a synchronisation on a GPU).
    """
    if not isinstance(segments, Tensor) or segments.numel() == 0:
        raise InvalidInput(
            "xai_serve.segmentation.num_segments: `segments` must be a non-empty tensor"
        )
    return int(segments.max()) + 1


# --------------------------------------------------------------------------- SLIC


def slic(
    images: Tensor,
    n_segments: int = 100,
    compactness: float = 10.0,
    iterations: int = 10,
) -> Tensor:
    """SLIC superpixels of every image of a batch, computed with tensor ops on its device.

    The steps, for all images at once:

    1. Colours: the image's channels as given (RGB in ``[0, 1]``, normalised, grey, ...),
       computed in float32, each channel shifted to start at 0 and all of them scaled by one
       factor per image so that the widest channel range spans 100 units (as CIELAB lightness
       does). ``compactness`` therefore means the same for an image in ``[0, 1]`` and for its
       normalised copy: exactly so for ``a * image + shift[c]``, and nearly so for ImageNet's
       per-channel normalisation (whose scales differ by 2%).
    2. Centres: one per cell of :func:`grid`'s ``rows x cols`` grid (spacing ``step``), placed
       at the cell's middle and moved to the pixel of lowest colour gradient among the 3x3
       pixels around it, if that is lower than at the middle pixel.
    3. ``iterations`` times: every pixel joins the nearest of the (up to 9) centres of its own
       and the 8 neighbouring grid cells, by ``d_colour^2 + (compactness / step)^2 * d_xy^2``
       (ties go to the first of the 9 in row-major order); then every centre moves to the mean
       colour and position of its pixels (a centre that got none stays where it was).
    4. Connectivity: the 4-connected pieces of every segment are found; pieces smaller than a
       quarter of a grid cell are merged into their largest neighbouring piece, the others become
       segments of their own. Every returned segment is 4-connected.
    5. Ids are renumbered per image to ``0 .. n - 1`` in the raster order of each segment's first
       pixel.

    Args:
        images: ``Tensor[B, C, H, W]``, any float dtype (computed in float32) and device.
        n_segments: the approximate number of superpixels (>= 1).
        compactness: the weight of spatial against colour distance (> 0); large values give
            nearly the grid cells, small ones follow colour edges more closely.
        iterations: assignment / update rounds (>= 1).

    Returns:
        ``Tensor[B, H, W]`` int64 on the images' device with ids in ``[0, S)``, where ``S`` is
        the largest number of segments of any image (an image may use fewer ids, always
        ``0 .. n - 1``).
    """
    fn = "xai_serve.segmentation.slic"
    images = _check_images(images, fn)
    positive_int(n_segments, f"{fn}: `n_segments`")
    positive_int(iterations, f"{fn}: `iterations`")
    if (
        isinstance(compactness, bool)
        or not isinstance(compactness, (int, float))
        or not math.isfinite(compactness)
        or compactness <= 0
    ):
        raise InvalidInput(f"{fn}: `compactness` must be a finite number > 0, got {compactness!r}")

    b, c, h, w = images.shape
    device = images.device
    rows, cols = _grid_shape(h, w, n_segments)
    k = rows * cols
    hw = h * w
    step = math.sqrt(hw / k)

    colour = _rescale_colours(images)  # [B, C, H, W] float32 in [0, 100]
    ys = torch.arange(h, device=device, dtype=torch.float32)
    xs = torch.arange(w, device=device, dtype=torch.float32)
    # Pixel features [B, C + 2, HW]: colour, then y and x.
    feats = torch.cat(
        [
            colour.reshape(b, c, hw),
            ys[:, None].expand(h, w).reshape(1, 1, hw).expand(b, 1, hw),
            xs[None, :].expand(h, w).reshape(1, 1, hw).expand(b, 1, hw),
        ],
        dim=1,
    )
    # The same as fixed-point integers [B * HW, C + 2], for exact (order-free) centre sums.
    fixed = torch.round(feats.transpose(1, 2) * float(1 << _FIXED_BITS)).to(torch.int64)
    fixed = fixed.reshape(b * hw, c + 2)

    # The distance d_colour^2 + (compactness / step)^2 * d_xy^2 is the squared Euclidean
    # distance between features weighted by ``weight``.
    weight = torch.ones(c + 2, device=device)
    weight[c:] = float(compactness) / step
    weight = weight[None, :, None]
    weighted = feats * weight

    centres = _initial_centres(colour, rows, cols)  # [B, C + 2, K]
    candidates = _candidate_cells(h, w, rows, cols, device)  # [9, HW]

    image_offset = (torch.arange(b, device=device) * k)[:, None]  # [B, 1]
    for _ in range(iterations):
        labels = _assign(weighted, centres * weight, candidates)
        flat = (labels + image_offset).reshape(-1)
        sums = torch.zeros(b * k, c + 2, dtype=torch.int64, device=device)
        sums.index_add_(0, flat, fixed)
        counts = torch.bincount(flat, minlength=b * k)
        means = (sums.double() / counts.clamp(min=1)[:, None].double()).div_(
            float(1 << _FIXED_BITS)
        )
        means = means.float().view(b, k, c + 2).transpose(1, 2)
        centres = torch.where((counts > 0).view(b, 1, k), means, centres)

    min_size = max(1, int(_MIN_SIZE_FACTOR * hw / k))
    pieces = _connected_components(labels.view(b, h, w))
    pieces = _merge_small(pieces, min_size)
    return _relabel(pieces)


def _rescale_colours(images: Tensor) -> Tensor:
    """``images`` in float32, each channel shifted to start at 0 and all channels of an image
    scaled by one factor, so that the channel with the widest range spans ``[0, _COLOUR_RANGE]``.

    Distances are then the same for an image and any ``a * image + shift[c]`` (``a > 0``).
    """
    x = images.float()
    flat = x.flatten(2)  # [B, C, HW]
    lo = flat.amin(dim=2)  # [B, C]
    span = (flat.amax(dim=2) - lo).amax(dim=1)  # [B]
    scale = torch.where(span > 0, _COLOUR_RANGE / span, torch.ones_like(span))
    return (x - lo[:, :, None, None]) * scale.view(-1, 1, 1, 1)


def _initial_centres(colour: Tensor, rows: int, cols: int) -> Tensor:
    """``Tensor[B, C + 2, rows * cols]``: grid-cell middles moved to the lowest gradient nearby."""
    b, c, h, w = colour.shape
    device = colour.device
    # Squared colour gradient (central differences, replicated border) [B, H * W].
    padded = torch.nn.functional.pad(colour, (1, 1, 1, 1), mode="replicate")
    dy = padded[:, :, 2:, 1:-1] - padded[:, :, :-2, 1:-1]
    dx = padded[:, :, 1:-1, 2:] - padded[:, :, 1:-1, :-2]
    gradient = (dy.square() + dx.square()).sum(dim=1).reshape(b, h * w)

    # Middle of every cell, as a position (centroid of the cell's pixels) and as a pixel.
    my = (torch.arange(rows, device=device, dtype=torch.float64) + 0.5) * (h / rows) - 0.5
    mx = (torch.arange(cols, device=device, dtype=torch.float64) + 0.5) * (w / cols) - 0.5
    my = my[:, None].expand(rows, cols).reshape(-1)  # [K]
    mx = mx[None, :].expand(rows, cols).reshape(-1)
    py = my.round().long()
    px = mx.round().long()
    # The 3x3 pixels around it, the middle one first so that it wins ties.
    oy = torch.tensor([0, -1, -1, -1, 0, 0, 1, 1, 1], device=device)
    ox = torch.tensor([0, -1, 0, 1, -1, 1, -1, 0, 1], device=device)
    ny = (py[None, :] + oy[:, None]).clamp(0, h - 1)  # [9, K]
    nx = (px[None, :] + ox[:, None]).clamp(0, w - 1)
    near = (ny * w + nx).reshape(-1)  # [9 * K]
    g = gradient[:, near].view(b, 9, -1)  # [B, 9, K]
    choice = g.argmin(dim=1, keepdim=True)  # the first minimum on ties
    pos = near.view(9, -1).expand(b, 9, -1).gather(1, choice).squeeze(1)  # [B, K]
    moved = choice.squeeze(1) != 0
    y = torch.where(moved, (pos // w).float(), my.float())
    x = torch.where(moved, (pos % w).float(), mx.float())

    colours = colour.reshape(b, c, h * w).gather(2, pos[:, None, :].expand(b, c, -1))
    return torch.cat([colours, y[:, None, :], x[:, None, :]], dim=1)


def _candidate_cells(height: int, width: int, rows: int, cols: int, device: torch.device) -> Tensor:
    """``Tensor[9, H * W]``: the 3x3 grid cells around each pixel's own cell, in row-major order.

    A neighbour outside the grid is clamped into it, which repeats a cell that is already a
    candidate of the pixel: the same centre at the same distance, so it changes nothing.
    """
    r = _cell_index(height, rows, device)[:, None].expand(height, width).reshape(-1)
    q = _cell_index(width, cols, device)[None, :].expand(height, width).reshape(-1)
    offsets = torch.tensor([-1, 0, 1], device=device)
    rr = (r[None, :] + offsets.repeat_interleave(3)[:, None]).clamp(0, rows - 1)
    qq = (q[None, :] + offsets.repeat(3)[:, None]).clamp(0, cols - 1)
    return rr * cols + qq


def _assign(feats: Tensor, centres: Tensor, candidates: Tensor) -> Tensor:
    """``Tensor[B, HW]``: the nearest candidate centre of every pixel.

    ``feats`` (``[B, D, HW]``) and ``centres`` (``[B, D, K]``) are already weighted so that the
    distance is the plain squared Euclidean one; ties go to the first candidate.
    """
    b, d, hw = feats.shape
    n = candidates.shape[0]
    dist = torch.empty(n, b, hw, dtype=feats.dtype, device=feats.device)
    for j in range(n):
        index = candidates[j].view(1, 1, hw).expand(b, d, hw)
        diff = feats - torch.gather(centres, 2, index)  # [B, D, HW]
        torch.sum(diff.square_(), dim=1, out=dist[j])
    choice = torch.min(dist, dim=0).indices  # [B, HW], the first minimum on ties
    return torch.gather(candidates, 0, choice)


# --------------------------------------------------------------------------- connectivity


def _run_min(comp: Tensor, same: Tensor) -> Tensor:
    """The minimum of ``comp`` over every horizontal run of equal labels.

    ``comp``: ``Tensor[B, H, W]``; ``same``: ``Tensor[B, H, W - 1]``, whether a pixel has the
    label of its left neighbour.
    """
    starts = torch.ones_like(comp, dtype=torch.bool)
    starts[:, :, 1:] = ~same
    run = starts.reshape(-1).cumsum(0) - 1
    flat = comp.reshape(-1)
    mins = torch.full_like(flat, flat.numel()).scatter_reduce_(0, run, flat, "amin")
    return mins[run].view_as(comp)


def _connected_components(labels: Tensor) -> Tensor:
    """4-connected pieces of every segment of ``labels`` (``Tensor[B, H, W]``).

    Returns ``Tensor[B, H, W]`` int64: for every pixel, the flat index (into ``B * H * W``) of
    the first pixel of its piece. Label propagation: run minima along rows and columns, then
    pointer jumping, until nothing changes (one sync per round; SLIC pieces settle in a few).
    """
    b, h, w = labels.shape
    comp = torch.arange(labels.numel(), device=labels.device).view(b, h, w)
    same_x = labels[:, :, 1:] == labels[:, :, :-1]
    labels_t = labels.transpose(1, 2)
    same_y = labels_t[:, :, 1:] == labels_t[:, :, :-1]
    while True:
        new = _run_min(comp, same_x)
        new = _run_min(new.transpose(1, 2).contiguous(), same_y).transpose(1, 2)
        flat = new.reshape(-1)
        flat = flat[flat]
        flat = flat[flat]
        new = flat.view(b, h, w)
        if torch.equal(new, comp):
            return comp
        comp = new


def _merge_small(comp: Tensor, min_size: int) -> Tensor:
    """Merge every piece smaller than ``min_size`` pixels into a neighbouring piece.

    ``comp``: ``Tensor[B, H, W]`` piece ids as :func:`_connected_components` returns them. A
    small piece joins the neighbour with the largest ``(size, -id)``, provided that key is larger
    than its own: the merges then form a forest (keys grow along every link), resolved by
    pointer jumping. Rounds repeat until no small piece has such a neighbour.
    """
    n = comp.numel()
    device = comp.device
    ids = torch.arange(n, device=device)
    while True:
        flat = comp.reshape(-1)
        size = torch.bincount(flat, minlength=n)
        key = size * n + (n - 1 - ids)
        a = torch.cat([comp[:, :, :-1].reshape(-1), comp[:, :-1, :].reshape(-1)])
        z = torch.cat([comp[:, :, 1:].reshape(-1), comp[:, 1:, :].reshape(-1)])
        src = torch.cat([a, z])
        dst = torch.cat([z, a])
        cand = torch.where(src != dst, key[dst], torch.full_like(dst, -1))
        best = torch.full((n,), -1, dtype=torch.int64, device=device)
        best.scatter_reduce_(0, src, cand, "amax")
        merge = (size > 0) & (size < min_size) & (best > key)
        if not bool(merge.any()):
            return comp
        parent = torch.where(merge, n - 1 - best % n, ids)
        while True:
            jumped = parent[parent]
            if torch.equal(jumped, parent):
                break
            parent = jumped
        comp = parent[comp]


def _relabel(comp: Tensor) -> Tensor:
    """Renumber the segments of every image to ``0 .. n - 1`` in the raster order of their first
    pixels. ``comp``: ``Tensor[B, H, W]``, ids in ``[0, B * H * W)``, each image's in its own
    range ``[b * H * W, (b + 1) * H * W)``."""
    b, h, w = comp.shape
    flat = comp.reshape(-1)
    n = flat.numel()
    first = torch.full_like(flat, n).scatter_reduce_(
        0, flat, torch.arange(n, device=comp.device), "amin"
    )
    flat = first[flat]
    present = torch.zeros(flat.numel(), dtype=torch.int64, device=comp.device)
    present[flat] = 1
    rank = present.view(b, h * w).cumsum(dim=1).reshape(-1) - 1
    return rank[flat].view(b, h, w)
