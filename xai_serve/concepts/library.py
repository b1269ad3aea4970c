"""Concept sets: the procedural library (generated from a seed, no downloads), sets read from
image files, random counterexample sets, and the probe dataset of Network Dissection.

Every procedural image is a function of ``(concept name, seed, index)`` alone: its random
numbers come from a counter-based integer hash evaluated in torch, so a whole set is generated
in one batched pass on any device, image ``i`` of a set of 8 equals image ``i`` of a set of 4,
and the CPU and a GPU draw the same numbers.

Images are ``float32 Tensor[N, 3, H, W]`` RGB in ``[0, 1]``, *not* normalised for any model
(a model's normalisation is the ``transform`` of the method that consumes them); masks are
``bool Tensor[N, H, W]`` marking the pixels where the concept is drawn.

Geometry: pixel ``(i, j)`` (row, column) has centre ``y = (i + 0.5) / H``, ``x = (j + 0.5) / W``
with ``y`` pointing down. A stripe orientation of ``a`` degrees is measured counter-clockwise
from the horizontal *as the image is seen*: ``stripes_0_*`` are horizontal stripes (constant
along each row), ``stripes_90_*`` vertical ones (constant along each column), ``stripes_45_*``
run from the bottom-left to the top-right (constant where ``x + y`` is), ``stripes_135_*`` from
the top-left to the bottom-right (constant where ``x - y`` is).
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from xai_serve.errors import InvalidInput, NotFound, positive_int
from xai_serve.imaging import decode_image

__all__ = [
    "COLORS",
    "ConceptSet",
    "ProbeDataset",
    "concept_category",
    "concept_from_images",
    "concept_names",
    "load_probe_folder",
    "probe_dataset",
    "procedural",
    "procedural_library",
    "random_set",
]

#: The named colours of the library (RGB in [0, 1]); each is a concept of category "color".
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 0.8, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "orange": (1.0, 0.55, 0.0),
    "purple": (0.5, 0.0, 0.6),
    "pink": (1.0, 0.5, 0.75),
    "cyan": (0.0, 1.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "grey": (0.5, 0.5, 0.5),
    "brown": (0.55, 0.3, 0.1),
}

#: Largest per-channel deviation of a colour concept's pixels from its palette value.
COLOR_JITTER = 0.06

_STRIPE_ANGLES = (0, 45, 90, 135)
#: Stripe cycles across the image (before a +-10% jitter) per frequency name.
_STRIPE_CYCLES = {"wide": 3.0, "narrow": 8.0}
_TEXTURES: tuple[str, ...] = (
    *(f"stripes_{a}_{f}" for a in _STRIPE_ANGLES for f in _STRIPE_CYCLES),
    "dots",
    "checkerboard",
    "zigzag",
)
_SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
_CATEGORIES: dict[str, str] = {
    **dict.fromkeys(COLORS, "color"),
    **dict.fromkeys(_TEXTURES, "texture"),
    **dict.fromkeys(_SHAPES, "shape"),
}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_MAX_FILE_PIXELS = 1 << 26
DEFAULT_SIZE = 64

# --------------------------------------------------------------------------- data classes


@dataclass(frozen=True)
class ConceptSet:
    """A named set of example images of one concept.

    Attributes:
        name: the concept (``"red"``, ``"stripes_0_wide"``, ``"random_3"``, a user's name...).
        category: ``"color"``, ``"texture"``, ``"shape"``, ``"random"`` or ``"custom"``.
        images: ``float32 Tensor[N, 3, H, W]`` RGB in ``[0, 1]``, not normalised.
        masks: ``bool Tensor[N, H, W]``, where in each image the concept is; ``None`` if unknown.
    """

    name: str
    category: str
    images: Tensor
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass(frozen=True)
class ProbeDataset:
    """Images annotated with pixel masks of several concepts each (Network Dissection's probe).

    Attributes:
        images: ``float32 Tensor[N, 3, H, W]`` RGB in ``[0, 1]``.
        masks: ``bool Tensor[N, K, H, W]``; ``masks[n, k]`` marks concept ``k`` in image ``n``.
        concepts: the ``K`` concept names.
        categories: the ``K`` categories (``"color"``, ``"texture"``, ``"shape"``, ...).
    """

    images: Tensor
    masks: Tensor
    concepts: list[str]
    categories: list[str]


# --------------------------------------------------------------------------- names


def concept_names(category: str | None = None) -> list[str]:
    """The procedural concepts (colours, then textures, then shapes), or those of ``category``."""
    if category is None:
        return list(_CATEGORIES)
    if category not in set(_CATEGORIES.values()):
        raise NotFound(
            f"no procedural concept category {category!r}; the categories are color, texture, shape"
        )
    return [n for n, c in _CATEGORIES.items() if c == category]


def concept_category(name: str) -> str:
    """The category (``"color"``, ``"texture"``, ``"shape"``) of a procedural concept."""
    try:
        return _CATEGORIES[name]
    except (KeyError, TypeError):
        raise NotFound(
            f"no procedural concept {name!r}; concept_names() lists them: {', '.join(_CATEGORIES)}"
        ) from None


# --------------------------------------------------------------------------- random numbers

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32) of int64 values, elementwise; the result is in
    ``[0, 2**32)``. Products may wrap around int64; only their low 32 bits are kept."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _set_key(name: str, seed: int) -> int:
    """One 32-bit key per (set name, seed)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"`seed` must be an int, got {type(seed).__name__}")
    key = torch.tensor([(zlib.crc32(name.encode()) ^ (seed * 0x9E3779B9)) & _MASK32])
    return int(_hash32(_hash32(key) + (seed & _MASK32))[0])


def _uniform(key: int, index: Tensor, count: int, stream: int) -> Tensor:
    """``float32 Tensor[n, count]`` in ``[0, 1)``: the random numbers of images ``index`` of the
    set ``key``; ``stream`` separates independent uses (parameters, background noise...)."""
    image_key = _hash32(index * 0x9E3779B9 + ((key + stream * 0x85EBCA6B) & _MASK32))
    slots = torch.arange(count, device=index.device, dtype=torch.int64) * 0xC2B2AE35
    h = _hash32(_hash32(image_key[:, None] ^ slots[None, :]) + stream)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _device(device: torch.device | str | None) -> torch.device:
    try:
        return torch.device("cpu") if device is None else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInput(f"`device` is not a torch device: {device!r} ({exc})") from None


def _grid(size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(y, x)`` in ``[0, 1]``, each ``Tensor[1, H, W]``."""
    c = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    return c[None, :, None].expand(1, size, size), c[None, None, :].expand(1, size, size)


def _col(u: Tensor, k: int) -> Tensor:
    """Column ``k`` of ``u`` shaped ``[n, 1, 1]`` to broadcast over pixels."""
    return u[:, k, None, None]


# --------------------------------------------------------------------------- patterns

_PARAMS = 8  # uniform numbers per pattern / shape / region


def _stripes(angle: int, cycles: float) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    rad = math.radians(angle)
    s, c = round(math.sin(rad), 12), round(math.cos(rad), 12)

    def pattern(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
        freq = cycles * (0.9 + 0.2 * _col(u, 1))
        # coordinate across the stripes: -x sin(a) + y_up cos(a), with y_up = -y
        t = -x * s - y * c
        return torch.remainder(t * freq + _col(u, 0), 1.0) < 0.5

    return pattern


def _dots(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
    cycles = 5.0 + 2.0 * _col(u, 0)
    radius = 0.22 + 0.1 * _col(u, 1)
    dx = torch.remainder(x * cycles + _col(u, 2), 1.0) - 0.5
    dy = torch.remainder(y * cycles + _col(u, 3), 1.0) - 0.5
    return dx * dx + dy * dy < radius * radius


def _checkerboard(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
    cycles = 3.0 + 3.0 * _col(u, 0)
    cells = torch.floor(x * cycles + _col(u, 1)) + torch.floor(y * cycles + _col(u, 2))
    return torch.remainder(cells, 2.0) < 0.5


def _zigzag(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
    cycles = 5.0 + 2.0 * _col(u, 0)  # stripes down the image
    teeth = 4.0 + 2.0 * _col(u, 1)  # zigzag periods across it
    amplitude = 0.5 + 0.3 * _col(u, 2)  # in stripe periods
    tri = torch.abs(2.0 * torch.remainder(x * teeth + _col(u, 3), 1.0) - 1.0)
    return torch.remainder(y * cycles + amplitude * tri + _col(u, 4), 1.0) < 0.5


_PATTERNS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    **{
        f"stripes_{a}_{f}": _stripes(a, cycles)
        for a in _STRIPE_ANGLES
        for f, cycles in _STRIPE_CYCLES.items()
    },
    "dots": _dots,
    "checkerboard": _checkerboard,
    "zigzag": _zigzag,
}


def _circle(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
    cy, cx = 0.3 + 0.4 * _col(u, 0), 0.3 + 0.4 * _col(u, 1)
    r = 0.15 + 0.12 * _col(u, 2)
    return (x - cx) ** 2 + (y - cy) ** 2 < r * r


def _square(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
    cy, cx = 0.3 + 0.4 * _col(u, 0), 0.3 + 0.4 * _col(u, 1)
    h = 0.13 + 0.1 * _col(u, 2)
    return (torch.abs(x - cx) < h) & (torch.abs(y - cy) < h)


def _triangle(u: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """An upright isosceles triangle: apex at the top, base at the bottom."""
    cy, cx = 0.3 + 0.4 * _col(u, 0), 0.3 + 0.4 * _col(u, 1)
    h = 0.15 + 0.12 * _col(u, 2)
    top = cy - h
    half_width = (y - top) * 0.6
    return (y > top) & (y < cy + h) & (torch.abs(x - cx) < half_width)


_SHAPE_FNS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
}


def _region(u: Tensor, y: Tensor, x: Tensor, smallest: float) -> Tensor:
    """A random axis-aligned rectangle whose sides are ``smallest`` to 0.95 of the image."""
    w = smallest + (0.95 - smallest) * _col(u, 0)
    h = smallest + (0.95 - smallest) * _col(u, 1)
    x0, y0 = (1.0 - w) * _col(u, 2), (1.0 - h) * _col(u, 3)
    return (x >= x0) & (x < x0 + w) & (y >= y0) & (y < y0 + h)


def _smooth_noise(key: int, index: Tensor, size: int, stream: int, cells: int) -> Tensor:
    """Smooth colour noise ``float32 Tensor[n, 3, size, size]`` in ``[0, 1]``: random colours
    on a ``cells x cells`` grid, bicubically upsampled."""
    u = _uniform(key, index, 3 * cells * cells, stream).view(-1, 3, cells, cells)
    up = F.interpolate(u, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp_(0.0, 1.0)


def _background(key: int, index: Tensor, size: int) -> Tensor:
    """The background of the procedural images: two octaves of smooth colour noise."""
    coarse = _smooth_noise(key, index, size, stream=101, cells=4)
    fine = _smooth_noise(key, index, size, stream=102, cells=9)
    return 0.65 * coarse + 0.35 * fine


# --------------------------------------------------------------------------- procedural


def _check_count_size(count: int, size: int, what: str = "`count`") -> tuple[int, int]:
    count = positive_int(count, what)
    size = positive_int(size, "`size`")
    if size < 8:
        raise InvalidInput(f"`size` must be at least 8 pixels, got {size}")
    return count, size


def procedural(
    name: str,
    count: int = 32,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ConceptSet:
    """``count`` images of the procedural concept ``name``, with its masks.

    - colours: a random rectangle (sides 40-95% of the image) of the named colour, each
      channel jittered by at most :data:`COLOR_JITTER`, over smooth colour noise;
    - textures: the pattern in two random colours 0.5 apart in every channel, filling a random
      rectangle (sides 55-95%) over smooth colour noise; the mask is the rectangle;
    - shapes: one filled shape of a random colour at a random place and size over smooth colour
      noise pulled towards the shape's complementary colour; the mask is the shape.

    Phases, frequencies, colours, places and sizes are jittered per image; image ``i`` depends
    only on ``(name, seed, i)``.

    Raises:
        NotFound: ``name`` is not in :func:`concept_names`.
        InvalidInput: ``count`` or ``size`` is not a positive integer, ``size < 8``.
    """
    category = concept_category(name)
    count, size = _check_count_size(count, size)
    dev = _device(device)
    key = _set_key(name, seed)
    index = torch.arange(count, device=dev, dtype=torch.int64)
    y, x = _grid(size, dev)
    u = _uniform(key, index, 4 * _PARAMS, stream=1)
    shape_u, region_u, colour_u = u[:, :_PARAMS], u[:, _PARAMS : 2 * _PARAMS], u[:, 2 * _PARAMS :]
    background = _background(key, index, size)
    if category == "color":
        mask = _region(region_u, y, x, smallest=0.4)
        base = torch.tensor(COLORS[name], device=dev, dtype=torch.float32)
        jitter = (colour_u[:, :3] * 2.0 - 1.0) * COLOR_JITTER
        fill = (base + jitter).clamp(0.0, 1.0)[:, :, None, None]
        images = torch.where(mask[:, None], fill, background)
    elif category == "texture":
        mask = _region(region_u, y, x, smallest=0.55)
        on = _PATTERNS[name](shape_u, y, x)
        c1 = colour_u[:, :3, None, None]
        c2 = torch.remainder(c1 + 0.5, 1.0)
        texture = torch.where(on[:, None], c1, c2)
        images = torch.where(mask[:, None], texture, background)
    else:
        mask = _SHAPE_FNS[name](shape_u, y, x)
        fill = colour_u[:, :3, None, None]
        background = 0.5 * background + 0.5 * torch.remainder(fill + 0.5, 1.0)
        images = torch.where(mask[:, None], fill, background)
    images = images.to(torch.float32).contiguous()
    return ConceptSet(name, category, images, mask.expand(count, size, size).contiguous())


def procedural_library(
    names: Sequence[str] | None = None,
    count: int = 32,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> list[ConceptSet]:
    """:func:`procedural` sets of ``names`` (all of :func:`concept_names` by default)."""
    names = concept_names() if names is None else list(names)
    if not names:
        raise InvalidInput("`names` is empty; pass None for the whole library")
    return [procedural(n, count, size=size, seed=seed, device=device) for n in names]


def random_set(
    count: int = 32,
    *,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    device: torch.device | str | None = None,
    source: str | os.PathLike[str] | None = None,
) -> ConceptSet:
    """A random counterexample set named ``"random_<seed>"`` (category ``"random"``, no masks).

    Without ``source``: smooth colour noise of three octaves with a random contrast and a random
    mixture of colours, image ``i`` a function of ``(seed, i)`` alone. With ``source`` (a
    folder of PNG / JPEG / WebP files): ``count`` of its images drawn without replacement by a
    generator seeded with ``seed``, resized to ``size x size``.

    Raises:
        InvalidInput: a bad ``count``/``size``, or ``source`` is not a folder with at least
            ``count`` images.
    """
    count, size = _check_count_size(count, size)
    dev = _device(device)
    name = f"random_{seed}"
    if source is not None:
        files = _image_files(source, "source")
        if len(files) < count:
            raise InvalidInput(
                f"`source` {str(source)!r} has {len(files)} images, fewer than count={count}"
            )
        generator = torch.Generator().manual_seed(seed)
        chosen = torch.randperm(len(files), generator=generator)[:count].tolist()
        images = _load_images([files[i] for i in chosen], size, "source").to(dev)
        return ConceptSet(name, "random", images, None)
    key = _set_key("random", seed)
    index = torch.arange(count, device=dev, dtype=torch.int64)
    octaves = [
        _smooth_noise(key, index, size, stream=201 + i, cells=c) for i, c in enumerate((3, 7, 16))
    ]
    u = _uniform(key, index, 6, stream=2)
    w1, w2 = 0.2 + 0.5 * _col(u, 0)[:, None], 0.1 + 0.3 * _col(u, 1)[:, None]
    noise = (octaves[0] + w1 * octaves[1] + w2 * octaves[2]) / (1.0 + w1 + w2)
    # random contrast around a random mean colour
    mean = u[:, 2:5, None, None]
    contrast = 0.5 + 1.5 * _col(u, 5)[:, None]
    images = (mean + contrast * (noise - 0.5)).clamp(0.0, 1.0)
    return ConceptSet(name, "random", images.contiguous(), None)


# --------------------------------------------------------------------------- files


def _image_files(folder: str | os.PathLike[str], what: str) -> list[Path]:
    path = Path(folder)
    if not path.is_dir():
        raise InvalidInput(f"{what} {str(folder)!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise InvalidInput(
            f"{what} {str(folder)!r} has no images (files ending {', '.join(_IMAGE_SUFFIXES)})"
        )
    return files


def _read_rgb(path: Path, what: str) -> Tensor:
    """The file as ``uint8 Tensor[3, H, W]``; a missing or undecodable file is InvalidInput."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"{what}: cannot read {str(path)!r} ({exc.strerror or exc})") from None
    return decode_image(data, max_pixels=_MAX_FILE_PIXELS, field=f"{what} {str(path)!r}")


def _resize(images: Tensor, size: int) -> Tensor:
    """``float Tensor[N, C, h, w]`` resized to ``size x size`` (bilinear, antialiased)."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    ).clamp_(0.0, 1.0)


def _resize_masks(masks: Tensor, size: int) -> Tensor:
    """``bool Tensor[N, h, w]`` resized to ``size x size`` (nearest)."""
    if masks.shape[-2:] == (size, size):
        return masks
    up = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest-exact")
    return up[:, 0] > 0.5


def _load_images(files: Sequence[Path], size: int, what: str) -> Tensor:
    out = [_resize(_read_rgb(p, what)[None].float() / 255.0, size) for p in files]
    return torch.cat(out).contiguous()


def _read_mask(path: Path, what: str) -> Tensor:
    """A mask file as ``bool Tensor[H, W]``: pixels brighter than half-grey."""
    return _read_rgb(path, what).float().mean(0) > 127.5


def _as_paths(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], what: str
) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        return _image_files(source, what)
    paths = [Path(p) for p in source]
    if not paths:
        raise InvalidInput(f"{what} is an empty list of files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InvalidInput(f"{what}: no such file {missing[0]!r}")
    return paths


def concept_from_images(
    name: str,
    images: Tensor | str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    masks: Tensor | str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    *,
    category: str = "custom",
    size: int | None = None,
    device: torch.device | str | None = None,
) -> ConceptSet:
    """A concept set from the user's images.

    Args:
        name: the concept's name.
        images: ``Tensor[N, 3, H, W]`` (float in ``[0, 1]`` or ``uint8``), a list of image
            files, or a folder (its PNG / JPEG / WebP files in name order).
        masks: optional, where the concept is: ``Tensor[N, H, W]`` (bool, or numbers where
            nonzero is the concept), a list of mask images, or a folder holding ``<stem>.png``
            for every image (pixels brighter than half-grey are the concept). A mask must have
            its image's size.
        category: the category recorded in the set.
        size: the side of the square images; files are resized to it (default 64), a tensor
            only when it is given.
        device: where the tensors go (default: the CPU, or the device of an ``images`` tensor).

    Raises:
        InvalidInput: a missing / undecodable file, an empty folder or list, images not of shape
            ``[N, 3, H, W]`` or out of ``[0, 1]``, masks whose count or size does not match.
    """
    if not isinstance(name, str) or not name:
        raise InvalidInput("`name` must be a non-empty string")
    if size is not None:
        size = positive_int(size, "`size`")
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
            raise InvalidInput(
                f"`images` must be Tensor[N, 3, H, W] with N >= 1, got {tuple(images.shape)}"
            )
        if images.dtype == torch.uint8:
            tensor = images.float() / 255.0
        elif images.is_floating_point():
            tensor = images.detach().float()
            if bool(torch.isnan(tensor).any()) or tensor.min() < 0.0 or tensor.max() > 1.0:
                raise InvalidInput("`images` must be RGB in [0, 1] (not normalised), or uint8")
        else:
            raise InvalidInput(f"`images` must be float or uint8, got {images.dtype}")
        dev = _device(device) if device is not None else images.device
        raw_sizes = [tuple(tensor.shape[-2:])] * tensor.shape[0]
        if size is not None:
            tensor = _resize(tensor, size)
        paths: list[Path] | None = None
    else:
        paths = _as_paths(images, "`images`")
        dev = _device(device)
        out_size = DEFAULT_SIZE if size is None else size
        raw = [_read_rgb(p, "`images`") for p in paths]
        raw_sizes = [tuple(r.shape[-2:]) for r in raw]
        tensor = torch.cat([_resize(r[None].float() / 255.0, out_size) for r in raw])
    n = tensor.shape[0]
    mask_tensor: Tensor | None = None
    if masks is not None:
        if isinstance(masks, Tensor):
            if masks.dim() != 3 or masks.shape[0] != n:
                raise InvalidInput(
                    f"`masks` must be Tensor[N, H, W] with N = {n} images, got {tuple(masks.shape)}"
                )
            mask_list = list(masks.detach().to(tensor.device) != 0)
        else:
            if isinstance(masks, (str, os.PathLike)) and paths is not None:
                folder = Path(masks)
                if not folder.is_dir():
                    raise InvalidInput(f"`masks` {str(masks)!r} is not a folder")
                mask_paths = [folder / f"{p.stem}.png" for p in paths]
                missing = [str(p) for p in mask_paths if not p.is_file()]
                if missing:
                    raise InvalidInput(f"`masks`: no mask file {missing[0]!r} for its image")
            else:
                mask_paths = _as_paths(masks, "`masks`")
            if len(mask_paths) != n:
                raise InvalidInput(f"`masks` has {len(mask_paths)} files for {n} images")
            mask_list = [_read_mask(p, "`masks`") for p in mask_paths]
        for i, (m, s) in enumerate(zip(mask_list, raw_sizes, strict=True)):
            if tuple(m.shape) != s:
                raise InvalidInput(
                    f"mask {i} is {tuple(m.shape)} (H, W) but its image is {s}; a mask must "
                    "have its image's size"
                )
        target = tensor.shape[-1]
        mask_tensor = torch.stack([_resize_masks(m[None], target)[0] for m in mask_list])
        mask_tensor = mask_tensor.to(dev)
    return ConceptSet(name, category, tensor.to(dev).contiguous(), mask_tensor)


# --------------------------------------------------------------------------- probe dataset


def probe_dataset(
    names: Sequence[str] | None = None,
    *,
    per_concept: int = 16,
    size: int = DEFAULT_SIZE,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> ProbeDataset:
    """A procedural probe dataset: ``per_concept`` images for each of ``names`` (default: every
    procedural concept), every image annotated with the masks of all ``names`` it contains.

    Each image is a texture over the whole image in two palette colours with a filled shape of a
    third palette colour on top; so it carries the masks of three colours, one texture (where
    the shape does not cover it) and one shape. Image ``j`` is built around concept
    ``names[j // per_concept]`` (that colour for its shape, that texture, or that shape) and
    draws its other attributes at random among all procedural concepts; masks are returned for
    ``names`` only. Palette colours are jittered by at most :data:`COLOR_JITTER` per image.

    Raises:
        NotFound: a name is not a procedural concept.
        InvalidInput: ``names`` is empty or repeats a name; a bad ``per_concept`` or ``size``.
    """
    names = concept_names() if names is None else list(names)
    if not names:
        raise InvalidInput("`names` is empty; pass None for the whole library")
    if len(set(names)) != len(names):
        raise InvalidInput("`names` repeats a concept")
    categories = [concept_category(n) for n in names]
    per_concept, size = _check_count_size(per_concept, size, "`per_concept`")
    dev = _device(device)
    colours, textures, shapes = list(COLORS), list(_TEXTURES), list(_SHAPES)
    p, t_count, s_count = len(colours), len(textures), len(shapes)
    n = per_concept * len(names)
    key = _set_key("probe", seed)
    index = torch.arange(n, device=dev, dtype=torch.int64)
    y, x = _grid(size, dev)
    u = _uniform(key, index, 3 * _PARAMS, stream=3)
    pat_u, shape_u, pick = u[:, :_PARAMS], u[:, _PARAMS : 2 * _PARAMS], u[:, 2 * _PARAMS :]

    # the seeding concept of each image, as an index into its category (-1: none)
    def seeded(category: str, pool: list[str]) -> Tensor:
        pairs = zip(names, categories, strict=True)
        table = [pool.index(nm) if c == category else -1 for nm, c in pairs]
        return torch.tensor(table, device=dev, dtype=torch.int64)[index // per_concept]

    def draw(col: int, k: int) -> Tensor:
        return torch.clamp((pick[:, col] * k).long(), max=k - 1)

    seed_colour = seeded("color", colours)
    shape_colour = torch.where(seed_colour >= 0, seed_colour, draw(0, p))
    oa = 1 + draw(1, p - 1)
    ob = 1 + draw(2, p - 2)
    ob = ob + (ob >= oa).long()
    colour_a, colour_b = (shape_colour + oa) % p, (shape_colour + ob) % p
    seed_texture = seeded("texture", textures)
    texture = torch.where(seed_texture >= 0, seed_texture, draw(3, t_count))
    seed_shape = seeded("shape", shapes)
    shape = torch.where(seed_shape >= 0, seed_shape, draw(4, s_count))

    on = torch.zeros(n, size, size, dtype=torch.bool, device=dev)
    for k, tex in enumerate(textures):
        on = torch.where((texture == k)[:, None, None], _PATTERNS[tex](pat_u, y, x), on)
    inside = torch.zeros(n, size, size, dtype=torch.bool, device=dev)
    for k, shp in enumerate(shapes):
        inside = torch.where((shape == k)[:, None, None], _SHAPE_FNS[shp](shape_u, y, x), inside)
    label = torch.where(on, colour_a[:, None, None], colour_b[:, None, None])
    label = torch.where(inside, shape_colour[:, None, None], label)

    palette = torch.tensor([COLORS[c] for c in colours], device=dev, dtype=torch.float32)
    jitter = (pick[:, 5:8] * 2.0 - 1.0) * COLOR_JITTER  # one jitter per image
    images = (palette[label] + jitter[:, None, None, :]).clamp(0.0, 1.0)
    images = images.permute(0, 3, 1, 2).contiguous()

    masks = []
    for nm, cat in zip(names, categories, strict=True):
        if cat == "color":
            masks.append(label == colours.index(nm))
        elif cat == "texture":
            masks.append((texture == textures.index(nm))[:, None, None] & ~inside)
        else:
            masks.append((shape == shapes.index(nm))[:, None, None] & inside)
    return ProbeDataset(images, torch.stack(masks, dim=1), list(names), categories)


def load_probe_folder(
    path: str | os.PathLike[str],
    *,
    size: int = DEFAULT_SIZE,
    device: torch.device | str | None = None,
) -> ProbeDataset:
    """A probe dataset from a Broden-style folder::

        <path>/
            images/<id>.png            the images (PNG, JPEG or WebP; any size), sorted by id
            masks/<concept>/<id>.png   where <concept> is in image <id>: pixels brighter than
                                       half-grey; a missing file means "not in that image"
            concepts.csv               optional: a header ``name,category`` and one row per
                                       concept; it fixes the concepts' order and categories

    Without ``concepts.csv`` the concepts are the folders under ``masks/`` in name order, with
    the category of the procedural concept of that name, else ``"custom"``. Images and masks are
    resized to ``size x size`` (a mask must first have its image's size).

    Raises:
        InvalidInput: a missing ``images/`` or ``masks/`` folder, no images, no concepts, a mask
            whose id has no image or whose size is not its image's, a concept of
            ``concepts.csv`` without a mask folder, a malformed ``concepts.csv``, an
            undecodable file.
    """
    size = positive_int(size, "`size`")
    dev = _device(device)
    root = Path(path)
    if not root.is_dir():
        raise InvalidInput(f"probe folder {str(path)!r} is not a folder")
    image_files = _image_files(root / "images", "probe folder's images/")
    mask_root = root / "masks"
    if not mask_root.is_dir():
        raise InvalidInput(f"probe folder {str(path)!r} has no masks/ folder")
    csv_path = root / "concepts.csv"
    if csv_path.is_file():
        concepts, categories = _read_concepts_csv(csv_path)
        for c in concepts:
            if not (mask_root / c).is_dir():
                raise InvalidInput(f"concepts.csv names {c!r} but there is no folder masks/{c}/")
    else:
        concepts = sorted(p.name for p in mask_root.iterdir() if p.is_dir())
        categories = [_CATEGORIES.get(c, "custom") for c in concepts]
    if not concepts:
        raise InvalidInput(f"probe folder {str(path)!r} has no concept folders under masks/")
    raw = [_read_rgb(p, "probe image") for p in image_files]
    ids = {p.stem: i for i, p in enumerate(image_files)}
    images = torch.cat([_resize(r[None].float() / 255.0, size) for r in raw])
    masks = torch.zeros(len(image_files), len(concepts), size, size, dtype=torch.bool)
    for k, concept in enumerate(concepts):
        for mask_file in _image_files_or_empty(mask_root / concept):
            i = ids.get(mask_file.stem)
            if i is None:
                raise InvalidInput(
                    f"mask {str(mask_file)!r} has no image {mask_file.stem!r} in images/"
                )
            m = _read_mask(mask_file, "probe mask")
            if tuple(m.shape) != tuple(raw[i].shape[-2:]):
                raise InvalidInput(
                    f"mask {str(mask_file)!r} is {tuple(m.shape)} (H, W) but its image is "
                    f"{tuple(raw[i].shape[-2:])}; a mask must have its image's size"
                )
            masks[i, k] = _resize_masks(m[None], size)[0]
    return ProbeDataset(images.to(dev), masks.to(dev), concepts, categories)


def _image_files_or_empty(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)


def _read_concepts_csv(path: Path) -> tuple[list[str], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"cannot read {str(path)!r} ({exc})") from None
    if not rows or any(r.get("name") in (None, "") or r.get("category") is None for r in rows):
        raise InvalidInput(
            f"{str(path)!r} must have a header `name,category` and one row per concept, each "
            "with a name"
        )
    names = [r["name"].strip() for r in rows]
    if len(set(names)) != len(names):
        raise InvalidInput(f"{str(path)!r} repeats a concept name")
    return names, [(r["category"] or "custom").strip() for r in rows]
