"""Network Dissection (Bau et al., 2017): which human concept each unit of a layer detects.

For one layer of a model and a probe dataset (images with per-concept pixel masks):

1. **Thresholds** (first pass over the dataset). Unit ``c``'s threshold ``T_c`` is the top
   ``quantile`` of its activations over every image and spatial position of the layer's output
   (``N * h * w`` values per unit). Convention: with ``n = N * h * w`` values and
   ``k = ceil(quantile * n)`` (``quantile`` read as the decimal it is written as, so
   ``0.005 * 2000`` is 10, not 10.000000000000002), ``T_c`` is the ``k``-th largest value. It
   equals ``torch.quantile(values, 1 - quantile, interpolation="higher")`` whenever
   ``quantile * n`` is an integer. It is computed exactly, in bounded memory, by
   :class:`TopQuantile`: a running ``torch.topk`` merge that keeps each unit's ``k`` largest
   values (or its ``n - k + 1`` smallest, whichever is fewer).
2. **IoU** (second pass). Each activation map is upsampled to the masks' resolution (bilinear,
   ``align_corners=False``), thresholded (``> T_c``), and compared with every concept's
   mask. The counts are summed over the dataset: ``I[c, k] = sum_pixels A_c * M_k`` (integer
   counts, read only where a unit is on: maps whose maximum is below the threshold are
   skipped, since a bilinear upsample never exceeds its input's maximum, and the masks are
   gathered at the on pixels of the others), ``|A_c|``, ``|M_k|``, and
   ``IoU[c, k] = I / (|A_c| + |M_k| - I)`` (0 where the union is empty). The second pass reads
   the first pass's activations when they fit ``max_cache_bytes`` (the model runs once), else
   it runs the model again.

Each unit's best concept is the argmax of its IoU row (ties: the concept listed first); a unit
is a *detector* of that concept when its IoU is above ``min_iou`` (0.04, the paper's cut-off).

Every image counts as labelled for every concept: a concept absent from an image has an empty
mask there, so a unit's activations on that image are false positives for it. (NetDissect's
Broden tally counts a unit's area only on the images annotated in the concept's category; a
probe set whose masks are complete for every image, like the procedural one, needs no such
correction.)

Memory. Pass 1 holds, per unit, the kept values and the batches pending a merge: fewer than
``2 * min(k, n - k + 1) + batch_size * h * w`` float32 values, copied once more while a merge
runs; with the default quantile that is about ``0.01 * N * h * w + batch_size * h * w`` per
unit, against ``N * h * w`` for a quantile over every activation kept. Pass 2 holds the
``[C, K]`` counts and the upsampled maps of one batch's live (image, unit) pairs, in chunks
of at most 2**25 values. The cache of activations between the passes, if used, is
``N * C * h * w`` float32 values, at most ``max_cache_bytes``. The dataset itself may stay on
the CPU: each batch is moved to the model's device as it is used.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.concepts.library import ProbeDataset
from xai_serve.errors import InvalidInput, positive_int
from xai_serve.explainers.base import model_device, resolve_layer

__all__ = [
    "CategorySummary",
    "Dissection",
    "DissectionRow",
    "ProbeData",
    "TopQuantile",
    "dissect",
    "top_count",
    "unit_examples",
]

DEFAULT_QUANTILE = 0.005
DEFAULT_MIN_IOU = 0.04  # Bau et al. 2017: a unit detects a concept when its IoU is above 0.04
DEFAULT_MAX_CACHE_BYTES = 256 << 20  # activations kept between the passes, at most

Progress = Callable[[float, str], None]

# Largest upsampled activation block (values) held at once in the second pass.
_CHUNK_VALUES = 1 << 25
# Pixels whose concepts are added at once (a [m, K] int64 block).
_HITS_PER_ADD = 1 << 16


class ProbeData(Protocol):
    """What :func:`dissect` reads from a dataset: the fields of
    :class:`xai_serve.concepts.library.ProbeDataset`."""

    @property
    def images(self) -> Tensor: ...  # [N, 3, H, W] float in [0, 1]

    @property
    def masks(self) -> Tensor: ...  # [N, K, Hm, Wm] bool

    @property
    def concepts(self) -> Sequence[str]: ...  # K names

    @property
    def categories(self) -> Sequence[str]: ...  # K categories


# --------------------------------------------------------------------------- thresholds


def top_count(quantile: float, total: int) -> int:
    """``k = ceil(quantile * total)``, at least 1: how many of ``total`` values lie at or above
    the top-``quantile`` threshold (the ``k``-th largest). ``quantile`` is read as the decimal
    it prints as, so binary rounding cannot push ``k`` up by one."""
    q = _check_quantile(quantile)
    total = positive_int(total, "`total`")
    return min(total, max(1, math.ceil(Fraction(repr(q)) * total)))


class TopQuantile:
    """Exact per-unit top-``quantile`` threshold of a stream of activations, bounded memory.

    ``update(values)`` takes ``Tensor[B, C, ...]`` batches (any trailing dims); after ``total``
    values per unit, :meth:`threshold` gives ``Tensor[C]``: each unit's ``k``-th largest value,
    ``k =`` :func:`top_count` ``(quantile, total)``. The ``k`` largest values of each unit (or the
    ``total - k + 1`` smallest, if fewer) are kept; new values collect until they are as many as
    that, then one ``torch.topk`` merges them in (so each value takes part in O(1) merges).
    Memory per unit: fewer than ``2 * min(k, total - k + 1)`` values plus one batch, and a copy
    of them during a merge.
    """

    def __init__(self, units: int, total: int, quantile: float) -> None:
        self.units = positive_int(units, "`units`")
        self.total = positive_int(total, "`total`")
        self.k = top_count(quantile, self.total)
        smallest = self.total - self.k + 1  # the k-th largest is the (n - k + 1)-th smallest
        self.largest = self.k <= smallest
        self.keep = self.k if self.largest else smallest
        self.seen = 0
        self._kept: Tensor | None = None
        self._pending: list[Tensor] = []
        self._pending_count = 0

    def update(self, values: Tensor) -> None:
        """Add a batch ``Tensor[B, C, ...]`` of every unit's values."""
        if values.dim() < 2 or values.shape[1] != self.units:
            raise InvalidInput(
                f"values must be Tensor[B, {self.units}, ...], got shape {tuple(values.shape)}"
            )
        flat = values.detach().float().transpose(0, 1).reshape(self.units, -1)
        if self.seen + flat.shape[1] > self.total:
            raise InvalidInput(
                f"more values than the {self.total} per unit this threshold was set up for"
            )
        self.seen += flat.shape[1]
        self._pending.append(flat)
        self._pending_count += flat.shape[1]
        if self._pending_count >= self.keep:
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        parts = [self._kept, *self._pending] if self._kept is not None else self._pending
        joined = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        n = min(self.keep, joined.shape[1])
        self._kept = joined.topk(n, dim=1, largest=self.largest, sorted=False).values
        self._pending, self._pending_count = [], 0

    def threshold(self) -> Tensor:
        """``Tensor[C]``: each unit's ``k``-th largest value (all ``total`` values seen)."""
        if self.seen != self.total:
            raise InvalidInput(f"saw {self.seen} values per unit, expected {self.total}")
        self._merge()
        assert self._kept is not None
        return self._kept.amin(dim=1) if self.largest else self._kept.amax(dim=1)


# --------------------------------------------------------------------------- results


class DissectionRow(NamedTuple):
    """One unit of a :class:`Dissection` table: its best concept and that IoU."""

    unit: int
    concept: str
    category: str
    iou: float


@dataclass(frozen=True)
class CategorySummary:
    """The detectors of one concept category: ``units`` is how many units' best concept (with
    IoU above ``min_iou``) is in the category; ``concepts`` maps each concept detected to its
    number of units, most units first (ties: the dataset's order)."""

    category: str
    units: int
    concepts: dict[str, int]

    @property
    def unique(self) -> int:
        """How many distinct concepts of the category some unit detects."""
        return len(self.concepts)


@dataclass(frozen=True)
class Dissection:
    """The result of :func:`dissect` for one layer with ``C`` units and ``K`` concepts.

    ``threshold``: ``Tensor[C]``, each unit's top-``quantile`` activation; ``iou``:
    ``Tensor[C, K]`` float32, every unit against every concept; ``intersection`` and ``union``:
    the ``Tensor[C, K]`` int64 pixel counts it is made of; ``best``: ``Tensor[C]`` int64, the
    index of each unit's best concept; ``best_iou``: ``Tensor[C]``, its IoU. All on the model's
    device.
    """

    layer: str
    quantile: float
    min_iou: float
    concepts: list[str]
    categories: list[str]
    threshold: Tensor
    iou: Tensor
    intersection: Tensor
    union: Tensor
    best: Tensor
    best_iou: Tensor

    @property
    def units(self) -> int:
        """``C``, the number of units (channels) of the layer."""
        return int(self.threshold.shape[0])

    @property
    def best_concept(self) -> list[str]:
        """The name of each unit's best concept."""
        return [self.concepts[i] for i in self.best.tolist()]

    @property
    def detectors(self) -> Tensor:
        """``Tensor[C]`` bool: the units whose best IoU is above ``min_iou``."""
        return self.best_iou > self.min_iou

    def table(self, top: int | None = None, *, detectors_only: bool = False) -> list[DissectionRow]:
        """One row per unit (its best concept, that concept's category and IoU), highest IoU
        first (ties: lower unit first); ``top``: only the first ``top`` rows;
        ``detectors_only``: only the units whose IoU is above ``min_iou``."""
        if top is not None:
            top = positive_int(top, "`top`")
        ious, best = self.best_iou.tolist(), self.best.tolist()
        order = sorted(range(len(ious)), key=lambda u: (-ious[u], u))
        rows = [
            DissectionRow(u, self.concepts[best[u]], self.categories[best[u]], ious[u])
            for u in order
            if not detectors_only or ious[u] > self.min_iou
        ]
        return rows[:top] if top is not None else rows

    def summary(self) -> dict[str, CategorySummary]:
        """Per concept category (every category of the dataset, in its order): how many units
        detect a concept of it (best IoU above ``min_iou``) and which concepts they detect."""
        best, detected = self.best.tolist(), self.detectors.tolist()
        counts: dict[int, int] = {}
        for b, d in zip(best, detected, strict=True):
            if d:
                counts[b] = counts.get(b, 0) + 1
        out: dict[str, CategorySummary] = {}
        for category in dict.fromkeys(self.categories):
            found = sorted(
                (k for k in counts if self.categories[k] == category), key=lambda k: (-counts[k], k)
            )
            out[category] = CategorySummary(
                category,
                sum(counts[k] for k in found),
                {self.concepts[k]: counts[k] for k in found},
            )
        return out


# --------------------------------------------------------------------------- dissect


def dissect(
    model: nn.Module,
    layer: str | nn.Module,
    dataset: ProbeDataset | ProbeData,
    *,
    quantile: float = DEFAULT_QUANTILE,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch_size: int = 64,
    min_iou: float = DEFAULT_MIN_IOU,
    progress: Progress | None = None,
    max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
) -> Dissection:
    """Network Dissection of ``layer`` of ``model`` over a probe ``dataset``.

    Args:
        model: an image model; it runs as given (call ``.eval()`` first) on its own device,
            under ``torch.inference_mode``, and only up to ``layer``.
        layer: a dotted module name (``"layer3"``, ``"features.6"``) or the module; its output
            must be a ``Tensor[B, C, h, w]``. A module the forward calls more than once (a
            ResNet block's shared ``relu``) is read at its first call.
        dataset: a :class:`xai_serve.concepts.library.ProbeDataset` (``probe_dataset()`` or
            ``load_probe_folder(path)``), or anything with its fields: ``images``
            ``Tensor[N, 3, H, W]`` float in [0, 1], ``masks`` ``Tensor[N, K, Hm, Wm]`` bool (any
            resolution: activations are upsampled to it), ``concepts`` and ``categories``
            (``K`` strings each). It may stay on the CPU.
        quantile: the top fraction of each unit's activations that its threshold keeps, in
            (0, 1); see the module docstring for the exact convention.
        transform: maps a batch of [0, 1] images (on the model's device) to the model's input,
            e.g. its normalisation; None: the images as they are.
        batch_size: images per forward pass.
        min_iou: the IoU above which a unit counts as a detector of its best concept, in
            [0, 1) (used by :meth:`Dissection.summary`, ``table(detectors_only=True)``).
        progress: called as ``progress(fraction, stage)`` after every batch, ``fraction`` of the
            whole run done, ``stage`` ``"thresholds"`` (first pass) or ``"iou"`` (second).
        max_cache_bytes: the layer's activations over the whole dataset (``N * C * h * w``
            float32 values) are kept on the device between the passes when they take at most
            this many bytes, so the model runs once; otherwise (or with 0) it runs again for
            the second pass. The default, 256 MiB, holds the procedural set's activations for
            the layers of common CNNs.

    Returns:
        a :class:`Dissection`.

    Raises:
        NotFound: the model has no such layer.
        InvalidInput: a bad dataset (empty, wrong shapes or dtypes, names not matching the
            masks), a quantile outside (0, 1), a layer whose output is not ``Tensor[B, C, h, w]``,
            or a bad option.
    """
    images, masks, concepts, categories = _check_dataset(dataset)
    quantile = _check_quantile(quantile)
    batch_size = positive_int(batch_size, "`batch_size`")
    if isinstance(min_iou, bool) or not isinstance(min_iou, (int, float)):
        raise InvalidInput(f"`min_iou` must be a number in [0, 1), got {min_iou!r}")
    if not 0.0 <= min_iou < 1.0:
        raise InvalidInput(f"`min_iou` must be in [0, 1), got {min_iou!r}")
    if transform is not None and not callable(transform):
        raise InvalidInput(f"`transform` must be callable or None, got {type(transform).__name__}")
    if progress is not None and not callable(progress):
        raise InvalidInput(f"`progress` must be callable or None, got {type(progress).__name__}")
    if isinstance(max_cache_bytes, bool) or not isinstance(max_cache_bytes, int):
        raise InvalidInput(f"`max_cache_bytes` must be an int >= 0, got {max_cache_bytes!r}")
    if max_cache_bytes < 0:
        raise InvalidInput(f"`max_cache_bytes` must be >= 0, got {max_cache_bytes}")
    module, name = resolve_layer(model, layer)
    device = model_device(model)

    n = images.shape[0]
    batches = math.ceil(n / batch_size)
    steps = 2 * batches

    # Pass 1: every unit's threshold (and the activations, if they fit the cache).
    top: TopQuantile | None = None
    cache: list[Tensor] | None = [] if max_cache_bytes > 0 else None
    for i, acts in enumerate(_activations(model, module, name, images, transform, batch_size)):
        if top is None:
            c, h, w = acts.shape[1:]
            top = TopQuantile(c, n * h * w, quantile)
            if n * c * h * w * acts.element_size() > max_cache_bytes:
                cache = None
        top.update(acts)
        if cache is not None:
            cache.append(acts)
        if progress is not None:
            progress((i + 1) / steps, "thresholds")
    assert top is not None
    threshold = top.threshold()
    del top

    # Pass 2: intersections and areas, batched over units, concepts and pixels.
    units, k = threshold.shape[0], masks.shape[1]
    inter = torch.zeros(units, k, dtype=torch.int64, device=device)
    act_area = torch.zeros(units, dtype=torch.int64, device=device)
    mask_area = torch.zeros(k, dtype=torch.int64, device=device)
    second = (
        cache
        if cache is not None
        else _activations(model, module, name, images, transform, batch_size)
    )
    for i, acts in enumerate(second):
        start = i * batch_size
        m = masks[start : start + acts.shape[0]].to(device, non_blocking=True)
        _tally(acts, m, threshold, inter, act_area, mask_area)
        if progress is not None:
            progress((batches + i + 1) / steps, "iou")

    union = act_area[:, None] + mask_area[None, :] - inter
    wide = torch.float32 if device.type == "mps" else torch.float64
    iou = torch.where(union > 0, inter.to(wide) / union.clamp(min=1).to(wide), 0.0).float()
    best_iou, best = iou.max(dim=1)
    return Dissection(
        layer=name,
        quantile=quantile,
        min_iou=float(min_iou),
        concepts=concepts,
        categories=categories,
        threshold=threshold,
        iou=iou,
        intersection=inter,
        union=union,
        best=best,
        best_iou=best_iou,
    )


def unit_examples(
    model: nn.Module,
    layer: str | nn.Module,
    dataset: ProbeData,
    transform: Callable[[Tensor], Tensor] | None,
    units: Sequence[int],
    thresholds: Tensor,
    concepts: Sequence[int],
    *,
    per_unit: int = 4,
    batch_size: int = 64,
) -> list[tuple[Tensor, Tensor]]:
    """For each of ``units`` (with its activation threshold and its best concept's index in
    the dataset), the ``per_unit`` probe images where the unit's thresholded activation best
    matches that concept's mask (highest per-image IoU; ties: the earlier image), as
    ``(uint8 images [E, 3, H, W], bool masks [E, Hm, Wm])``: what a picture of a dissection
    shows. The unit's mask is its map upsampled to the masks' size (bilinear) and compared with
    its threshold, as :func:`dissect` does."""
    module, name = resolve_layer(model, layer)
    device = model_device(model)
    index = torch.tensor(list(units), dtype=torch.long, device=device)
    picks = torch.tensor(list(concepts), dtype=torch.long)
    thr = thresholds.to(device)[index][None, :, None, None]
    masks_on: list[Tensor] = []
    scores: list[Tensor] = []
    images, masks = dataset.images, dataset.masks
    size = tuple(masks.shape[-2:])
    batches = _activations(model, module, name, images, transform, batch_size)
    for start, acts in zip(range(0, images.shape[0], batch_size), batches, strict=True):
        acts = acts[:, index]
        if tuple(acts.shape[-2:]) != size:
            acts = F.interpolate(acts, size=size, mode="bilinear", align_corners=False)
        on = (acts > thr).cpu()  # [B, U, Hm, Wm]
        concept = masks[start : start + batch_size][:, picks].cpu()  # [B, U, Hm, Wm]
        inter = (on & concept).sum(dim=(2, 3)).double()
        union = (on | concept).sum(dim=(2, 3)).double()
        scores.append(torch.where(union > 0, inter / union.clamp(min=1), 0.0))
        masks_on.append(on)
    score = torch.cat(scores)  # [N, U]
    on_all = torch.cat(masks_on)  # [N, U, Hm, Wm]
    out = []
    count = min(per_unit, score.shape[0])
    for u in range(len(units)):
        order = torch.sort(score[:, u], descending=True, stable=True).indices[:count]
        pics = images[order].detach().cpu().float().mul(255.0).round_().clamp_(0, 255)
        out.append((pics.to(torch.uint8), on_all[order, u]))
    return out


class _Stop(Exception):
    """Raised by the capture hook once the layer has run: the rest of the model is not needed."""


def _activations(
    model: nn.Module,
    module: nn.Module,
    name: str,
    images: Tensor,
    transform: Callable[[Tensor], Tensor] | None,
    batch_size: int,
) -> Iterator[Tensor]:
    """The layer's output ``Tensor[B, C, h, w]`` (float32, model's device) batch by batch; the
    forward pass stops at the layer."""
    device = model_device(model)
    captured: list[Tensor] = []

    def hook(_m: nn.Module, _inputs: object, output: object) -> None:
        if not isinstance(output, Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise InvalidInput(
                f"layer {name!r} gives {shape}; Network Dissection needs a spatial map "
                "Tensor[B, C, h, w]: pick a convolutional layer"
            )
        captured.append(output)
        raise _Stop

    expected: tuple[int, ...] | None = None
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device, non_blocking=True)
        handle = module.register_forward_hook(hook)
        try:
            with torch.inference_mode():
                model(transform(x) if transform is not None else x)
        except _Stop:
            pass
        finally:
            handle.remove()
        if not captured:
            raise InvalidInput(f"layer {name!r} did not run in the model's forward pass")
        acts = captured.pop().float()
        if expected is None:
            expected = tuple(acts.shape[1:])
        elif tuple(acts.shape[1:]) != expected:
            raise InvalidInput(
                f"layer {name!r} gave maps of shape {tuple(acts.shape[1:])} after "
                f"{expected}: every image must have the same size"
            )
        yield acts


def _tally(
    acts: Tensor,
    masks: Tensor,
    threshold: Tensor,
    inter: Tensor,
    act_area: Tensor,
    mask_area: Tensor,
) -> None:
    """Add one batch's counts: ``inter[C, K]`` += pixels where unit ``c`` is above its threshold
    and concept ``k``'s mask is set; ``act_area[C]``, ``mask_area[K]`` += the areas.

    Only what can count is computed. A bilinear upsample is a convex combination of its input,
    so a map whose maximum is below its unit's threshold has no pixel above it at any size: only
    the (image, unit) maps whose maximum reaches the threshold (less a relative 1e-5, against
    the rounding of the combination) are upsampled and thresholded, and the concept masks are
    read only at their pixels that are on. With the default quantile a unit is on at 0.5% of
    its pixels, so this is a small share of the dense products. (Their counts agree up to
    pixels whose upsampled value lies within float rounding of the threshold: torch rounds the
    upsample of single maps and of whole batches differently, in the last bit.)
    """
    size = masks.shape[-2:]
    pixels = size[0] * size[1]
    mask_area += masks.sum(dim=(0, 2, 3))
    floor = threshold - threshold.abs() * 1e-5
    live = (acts.amax(dim=(2, 3)) >= floor[None, :]).nonzero()  # [n, 2]: (image, unit)
    per_chunk = max(1, _CHUNK_VALUES // pixels)
    # the maps are compared with thresholds taken in the activations' own precision: a
    # caller's autocast must not change that precision for the upsample
    with torch.autocast(acts.device.type, enabled=False):
        _tally_live(acts, masks, threshold, live, per_chunk, inter, act_area)


def _tally_live(
    acts: Tensor,
    masks: Tensor,
    threshold: Tensor,
    live: Tensor,
    per_chunk: int,
    inter: Tensor,
    act_area: Tensor,
) -> None:
    size = masks.shape[-2:]
    for start in range(0, live.shape[0], per_chunk):
        img, unit = live[start : start + per_chunk].unbind(1)
        a = acts[img, unit]  # [n, h, w]
        if tuple(a.shape[-2:]) != tuple(size):
            a = F.interpolate(a[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        on = a > threshold[unit][:, None, None]  # [n, Hm, Wm]
        act_area.index_add_(0, unit, on.sum(dim=(1, 2)))
        hits = on.nonzero()  # [nnz, 3]: (row, y, x)
        for h0 in range(0, hits.shape[0], _HITS_PER_ADD):
            row, y, x = hits[h0 : h0 + _HITS_PER_ADD].unbind(1)
            seen = masks[img[row], :, y, x].to(torch.int64)  # [m, K]: the concepts there
            inter.index_add_(0, unit[row], seen)


# --------------------------------------------------------------------------- checks


def _check_quantile(quantile: object) -> float:
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)):
        raise InvalidInput(f"`quantile` must be a number in (0, 1), got {quantile!r}")
    q = float(quantile)
    if not 0.0 < q < 1.0:
        raise InvalidInput(
            f"`quantile` must be in (0, 1) (the top fraction of activations a unit's threshold "
            f"keeps, e.g. 0.005), got {quantile!r}"
        )
    return q


def _check_dataset(dataset: object) -> tuple[Tensor, Tensor, list[str], list[str]]:
    fields = ("images", "masks", "concepts", "categories")
    missing = [f for f in fields if not hasattr(dataset, f)]
    if missing:
        raise InvalidInput(
            f"`dataset` must be a ProbeDataset (xai_serve.concepts.library.probe_dataset() or "
            f"load_probe_folder(path)) or have its fields {', '.join(fields)}; "
            f"{type(dataset).__name__} lacks {', '.join(missing)}"
        )
    images, masks = dataset.images, dataset.masks  # type: ignore[attr-defined]
    concepts, categories = dataset.concepts, dataset.categories  # type: ignore[attr-defined]
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InvalidInput(f"dataset images must be Tensor[N, 3, H, W], got {shape}")
    if not images.dtype.is_floating_point:
        raise InvalidInput(f"dataset images must be float in [0, 1], got {images.dtype}")
    if images.shape[0] == 0:
        raise InvalidInput("the dataset is empty: it has no images")
    if not isinstance(masks, Tensor) or masks.dim() != 4:
        shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
        raise InvalidInput(f"dataset masks must be Tensor[N, K, H, W] bool, got {shape}")
    if masks.dtype != torch.bool:
        raise InvalidInput(f"dataset masks must be bool (use masks > 0), got {masks.dtype}")
    if masks.shape[0] != images.shape[0]:
        raise InvalidInput(
            f"dataset masks are for {masks.shape[0]} images but there are {images.shape[0]} "
            "images: masks must be Tensor[N, K, H, W] with the images' N"
        )
    if masks.shape[1] == 0:
        raise InvalidInput("the dataset has no concepts: masks are Tensor[N, 0, H, W]")
    if masks.shape[2] == 0 or masks.shape[3] == 0:
        raise InvalidInput(f"dataset masks have an empty image size: {tuple(masks.shape)}")
    concepts, categories = list(concepts), list(categories)
    k = masks.shape[1]
    if len(concepts) != k or len(categories) != k:
        raise InvalidInput(
            f"dataset masks have K = {k} concepts but there are {len(concepts)} concept names "
            f"and {len(categories)} categories: one name and one category per mask channel"
        )
    if not all(isinstance(s, str) for s in [*concepts, *categories]):
        raise InvalidInput("dataset concepts and categories must be strings")
    return images, masks, concepts, categories
