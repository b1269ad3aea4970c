"""Images as tensors: decode PNG / JPEG / WebP bytes, encode PNG, and pass pictures to and from
PIL.

The one module that turns encoded images into ``uint8 Tensor[3, H, W]`` RGB and back, shared by
the server's request codec (:mod:`xai_serve.serving.codec`), the drawings (:mod:`xai_serve.viz`),
the file runner (:mod:`xai_serve.runner`) and the demo. It sits below all of them and imports
nothing of xai_serve but its errors.

Decoding is strict, since it reads what clients send: sizes are checked *before* pixels are
decoded, and every malformed input becomes :class:`~xai_serve.errors.InvalidInput` (the message
names the field the bytes came from) or, past the pixel limit,
:class:`~xai_serve.errors.ResourceExhausted`. A corrupt image never raises anything else.
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from xai_serve.errors import InvalidInput, ResourceExhausted, XaiServeError

__all__ = [
    "IMAGE_FORMATS",
    "check_rgb",
    "decode_image",
    "encode_png",
    "from_pil",
    "to_pil",
]

#: The image container formats :func:`decode_image` accepts (PIL format names).
IMAGE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP")

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole IEND chunk: length, type, CRC
_JPEG_MAGIC = b"\xff\xd8\xff"

# What PIL and its plugins raise on corrupt or truncated data. UnidentifiedImageError is an
# OSError; the others come from the plugins' header parsers (struct unpacking, EXIF tables...).
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
)


def check_rgb(rgb: object, name: str = "rgb") -> None:
    """Raise InvalidInput unless ``rgb`` is a ``uint8 Tensor[3, H, W]`` with ``H, W >= 1``
    (``name`` is the argument named in the message)."""
    if not isinstance(rgb, torch.Tensor):
        raise InvalidInput(f"{name} must be a torch.Tensor, got {type(rgb).__name__}")
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[0] != 3 or rgb.numel() == 0:
        raise InvalidInput(
            f"{name} must be uint8 [3, H, W] with H, W >= 1, got {rgb.dtype} {list(rgb.shape)}"
        )


def _sniff_format(data: bytes) -> str | None:
    """The PIL format name of ``data`` from its magic bytes, or ``None`` if not accepted."""
    if data.startswith(_PNG_MAGIC):
        return "PNG"
    if data.startswith(_JPEG_MAGIC):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded PIL image as a writable ``uint8`` array ``[H, W, 3]``; alpha is dropped.

    High-bit-depth greyscale (``I;16*``, ``I``) is scaled to 8 bits (PIL's own conversion
    clips it instead, turning most 16-bit images white).
    """
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        wide = np.asarray(im).astype(np.int64)
        grey = (np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode != "RGB":
        im = im.convert("RGB")
    return np.array(im, dtype=np.uint8)


def decode_image(data: bytes, *, max_pixels: int, field: str = "image") -> torch.Tensor:
    """Decode PNG, JPEG or WebP bytes into an RGB image.

    The header is read first; an image with more than ``max_pixels`` pixels is refused before a
    single pixel is decoded (this check does not depend on PIL's global
    ``Image.MAX_IMAGE_PIXELS``, whose warning is silenced and whose error, raised for images
    past twice its value, is reported as the same ``ResourceExhausted``). The EXIF orientation
    is applied; every colour mode (greyscale, palette, RGBA, CMYK, 16-bit...) becomes RGB with
    any alpha channel dropped.

    Args:
        data: the encoded image.
        max_pixels: the most pixels (width * height) an image may have.
        field: the request field the bytes came from, named in error messages.

    Returns:
        ``uint8 Tensor[3, H, W]`` on the CPU, contiguous, owning its memory.

    Raises:
        InvalidInput: empty, not PNG/JPEG/WebP, zero-sized, truncated or corrupt.
        ResourceExhausted: more than ``max_pixels`` pixels.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"{field} must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidInput(f"{field} is empty")
    fmt = _sniff_format(data)
    if fmt is None:
        raise InvalidInput(
            f"{field}: unsupported image format (starts with {data[:8]!r}); "
            f"accepted formats: {', '.join(IMAGE_FORMATS)}"
        )
    if fmt == "PNG" and data.rfind(_PNG_IEND) < 0:
        # PIL decodes a PNG cut inside its last IDAT checksum or IEND chunk without complaint.
        raise InvalidInput(f"{field}: cannot decode: truncated PNG (no IEND chunk)")

    try:
        with warnings.catch_warnings():
            # Our own max_pixels check below replaces PIL's bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
    except Image.DecompressionBombError as exc:
        # PIL refuses past 2 * Image.MAX_IMAGE_PIXELS while opening, before our check can run.
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{found.group(1)} pixels" if found else "too large for the decoder"
        raise ResourceExhausted(
            f"{field}: image is {size}; the limit (max_pixels) is {max_pixels} "
            f"and the decoder's own limit is {2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidInput(f"{field}: cannot decode: {_describe(exc)}") from exc

    with im:
        width, height = im.size
        if width < 1 or height < 1:
            raise InvalidInput(f"{field}: image has zero size ({width}x{height})")
        pixels = width * height
        if pixels > max_pixels:
            raise ResourceExhausted(
                f"{field}: image is {width}x{height} = {pixels} pixels; "
                f"the limit (max_pixels) is {max_pixels}"
            )
        try:
            im.load()
            upright = ImageOps.exif_transpose(im)
            arr = _to_rgb_array(upright)
        except XaiServeError:
            raise
        except _DECODE_ERRORS as exc:
            raise InvalidInput(f"{field}: cannot decode: {_describe(exc)}") from exc
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _describe(exc: BaseException) -> str:
    """``exc`` as one short line for an error message."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, UnidentifiedImageError):
        text = "not a valid image of the format its header claims"
    return text if len(text) <= 200 else text[:197] + "..."


def encode_png(rgb: torch.Tensor) -> bytes:
    """Encode ``uint8 Tensor[3, H, W]`` RGB (any device) as PNG, with fast compression.

    Raises:
        InvalidInput: ``rgb`` is not ``uint8`` with shape ``[3, H, W]``, ``H, W >= 1``.
    """
    buf = io.BytesIO()
    to_pil(rgb).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_pil(rgb: torch.Tensor) -> Any:
    """``uint8 Tensor[3, H, W]`` RGB (any device) as an RGB ``PIL.Image.Image``.

    Raises:
        InvalidInput: ``rgb`` is not ``uint8`` with shape ``[3, H, W]``, ``H, W >= 1``.
    """
    check_rgb(rgb)
    hwc = rgb.detach().permute(1, 2, 0).cpu().contiguous().numpy()
    return Image.fromarray(hwc)


def from_pil(image: Any) -> torch.Tensor:
    """A ``PIL.Image.Image`` (any mode; converted to RGB) as ``uint8 Tensor[3, H, W]`` on the
    CPU, contiguous, owning its memory."""
    if not isinstance(image, Image.Image):
        raise InvalidInput(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    array = np.array(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
