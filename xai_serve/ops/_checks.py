"""Argument checks shared by every backend of the ops.

They run before any kernel, so a bad argument gets the same :class:`~xai_serve.InvalidInput`
whichever backend would have run (the C++ kernels repeat them for direct ``torch.ops`` calls).
They also put convenient forms (a Python size, a list of means) into the one form the kernels
take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from xai_serve.errors import InvalidInput, positive_int

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)
MASK_DTYPES = (torch.bool, torch.uint8)


def _tensor(x: object, op: str, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise InvalidInput(
            f"xai_serve.{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}"
        )
    return x


def _float_tensor(x: object, op: str, name: str, dims: str, ndim: int) -> Tensor:
    t = _tensor(x, op, name)
    if t.dim() != ndim:
        raise InvalidInput(f"xai_serve.{op}: `{name}` must be {dims}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise InvalidInput(
            f"xai_serve.{op}: `{name}` must be float32, float16 or bfloat16, got {t.dtype}"
        )
    return t


def _same_device(a: Tensor, b: Tensor, op: str, name_a: str, name_b: str) -> None:
    if a.device != b.device:
        raise InvalidInput(
            f"xai_serve.{op}: `{name_a}` is on {a.device} but `{name_b}` is on {b.device}; "
            "move both to the same device"
        )


def check_size(size: object, op: str) -> tuple[int, int]:
    """``size`` as ``(H, W)``: two positive ints, or one int for a square.

    Raises:
        InvalidInput: anything else (bools and floats included), naming ``xai_serve.<op>``.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, Sequence)
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)
    ):
        raise InvalidInput(
            f"xai_serve.{op}: `size` must be two positive integers (H, W), got {size!r}"
        )
    return int(size[0]), int(size[1])


def check_cam_fuse(activations: object, weights: object, size: object) -> tuple[int, int]:
    op = "cam_fuse"
    a = _float_tensor(activations, op, "activations", "Tensor[B, K, h, w]", 4)
    w = _tensor(weights, op, "weights")
    if w.dtype not in FLOAT_DTYPES:
        raise InvalidInput(
            f"xai_serve.{op}: `weights` must be float32, float16 or bfloat16, got {w.dtype}"
        )
    _same_device(a, w, op, "activations", "weights")
    b, k, h, wd = a.shape
    if k < 1:
        raise InvalidInput(f"xai_serve.{op}: `activations` has no channels (K = 0)")
    if h < 1 or wd < 1:
        raise InvalidInput(
            f"xai_serve.{op}: `activations` has an empty spatial size {tuple(a.shape)}"
        )
    if w.dim() == 2:
        if tuple(w.shape) != (b, k):
            raise InvalidInput(
                f"xai_serve.{op}: channel `weights` must be Tensor[B, K] = {(b, k)}, "
                f"got {tuple(w.shape)}"
            )
    elif w.dim() != 4 or w.shape != a.shape:
        raise InvalidInput(
            f"xai_serve.{op}: `weights` must be Tensor[B, K] or Tensor[B, K, h, w] = "
            f"{tuple(a.shape)}, got {tuple(w.shape)}"
        )
    return check_size(size, op)


def _segments(images: Tensor, segments: object, op: str) -> Tensor:
    s = _tensor(segments, op, "segments")
    if s.dim() != 3:
        raise InvalidInput(
            f"xai_serve.{op}: `segments` must be Tensor[B, H, W], got shape {tuple(s.shape)}"
        )
    if s.dtype not in INDEX_DTYPES:
        raise InvalidInput(f"xai_serve.{op}: `segments` must be int32 or int64, got {s.dtype}")
    b, _, h, w = images.shape
    if tuple(s.shape) != (b, h, w):
        raise InvalidInput(
            f"xai_serve.{op}: `segments` shape {tuple(s.shape)} does not match images "
            f"[B, C, H, W] = {tuple(images.shape)}"
        )
    _same_device(images, s, op, "images", "segments")
    return s


def check_segment_range(segments: Tensor, num_segments: int, op: str) -> None:
    """Raises unless every id lies in ``[0, num_segments)``. Synchronises once on a GPU."""
    if segments.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(segments))
    if lo < 0 or hi >= num_segments:
        raise InvalidInput(
            f"xai_serve.{op}: segment ids must lie in [0, {num_segments}), "
            f"found ids in [{lo}, {hi}]"
        )


def _channel_vector(x: object, images: Tensor, op: str, name: str) -> Tensor:
    c = images.shape[1]
    if isinstance(x, Tensor):
        if x.device != images.device:
            raise InvalidInput(
                f"xai_serve.{op}: `images` is on {images.device} but `{name}` is on {x.device}; "
                "move both to the same device"
            )
        t = x.to(torch.float32)
    elif isinstance(x, Sequence) and all(isinstance(v, (int, float)) for v in x):
        t = torch.tensor([float(v) for v in x], dtype=torch.float32, device=images.device)
    else:
        raise InvalidInput(
            f"xai_serve.{op}: `{name}` must be a Tensor[C] or a sequence of C numbers"
        )
    if t.dim() != 1 or t.shape[0] != c:
        raise InvalidInput(
            f"xai_serve.{op}: `{name}` must have C = {c} values, got shape {tuple(t.shape)}"
        )
    return t.contiguous()


def check_superpixel_mask(
    images: object,
    segments: object,
    keep: object,
    baseline: object,
    mean: object,
    std: object,
    validate: bool,
    channels_last: object = False,
) -> tuple[Tensor | None, float, Tensor | None, Tensor | None]:
    """Returns ``(baseline tensor or None, fill, mean, std)`` in the kernels' form.

    A full-image baseline comes back in the output's memory format (``channels_last`` or
    contiguous), the layout the kernels read it in. With ``validate`` the data-dependent checks
    run too (segment ids in range, no zero in ``std``); they cost one device synchronisation on
    a GPU.
    """
    op = "superpixel_mask"
    if not isinstance(channels_last, bool):
        raise InvalidInput(
            f"xai_serve.{op}: `channels_last` must be True or False, got {channels_last!r}"
        )
    img = _float_tensor(images, op, "images", "Tensor[B, C, H, W]", 4)
    _segments(img, segments, op)
    k = _tensor(keep, op, "keep")
    if k.dim() != 3:
        raise InvalidInput(
            f"xai_serve.{op}: `keep` must be Tensor[B, N, S], got shape {tuple(k.shape)}"
        )
    if k.dtype not in MASK_DTYPES:
        raise InvalidInput(f"xai_serve.{op}: `keep` must be bool or uint8, got {k.dtype}")
    b, c, h, w = img.shape
    if k.shape[0] != b:
        raise InvalidInput(
            f"xai_serve.{op}: `keep` has batch {k.shape[0]} but `images` has batch {b}"
        )
    s = k.shape[2]
    if s < 1:
        raise InvalidInput(f"xai_serve.{op}: `keep` must cover at least one segment (S >= 1)")
    _same_device(img, k, op, "images", "keep")

    base: Tensor | None = None
    fill = 0.0
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float, Tensor)):
        raise InvalidInput(
            f"xai_serve.{op}: `baseline` must be a number, Tensor[B, C, H, W] or Tensor[B, C, S], "
            f"got {type(baseline).__name__}"
        )
    if isinstance(baseline, Tensor):
        _same_device(img, baseline, op, "images", "baseline")
        if baseline.dtype not in FLOAT_DTYPES:
            raise InvalidInput(
                f"xai_serve.{op}: `baseline` must be a float tensor, got {baseline.dtype}"
            )
        want = {4: (c, h, w), 3: (c, s)}.get(baseline.dim())
        if want is None or baseline.shape[0] not in (1, b) or tuple(baseline.shape[1:]) != want:
            raise InvalidInput(
                f"xai_serve.{op}: `baseline` must be Tensor[B, C, H, W] = {(b, c, h, w)} or "
                f"Tensor[B, C, S] = {(b, c, s)} (batch 1 broadcasts), got {tuple(baseline.shape)}"
            )
        fmt = torch.channels_last if channels_last and len(want) == 3 else torch.contiguous_format
        base = baseline.to(img.dtype).expand(b, *want).contiguous(memory_format=fmt)
    else:
        fill = float(baseline)
    if (mean is None) != (std is None):
        raise InvalidInput(f"xai_serve.{op}: give both `mean` and `std`, or neither")
    mu = sd = None
    if mean is not None:
        mu = _channel_vector(mean, img, op, "mean")
        sd = _channel_vector(std, img, op, "std")
        if validate and bool((sd == 0).any()):
            raise InvalidInput(f"xai_serve.{op}: `std` must not contain zeros")
    if validate:
        check_segment_range(segments, s, op)  # type: ignore[arg-type]
    return base, fill, mu, sd


def check_segment_mean(
    images: object, segments: object, num_segments: object, validate: bool
) -> int:
    op = "segment_mean"
    img = _float_tensor(images, op, "images", "Tensor[B, C, H, W]", 4)
    seg = _segments(img, segments, op)
    num_segments = positive_int(num_segments, f"xai_serve.{op}: `num_segments`")
    if validate:
        check_segment_range(seg, num_segments, op)
    return num_segments


def check_attention_residual(attention: object, discard_ratio: object) -> int:
    """The number of entries of each matrix to drop, ``int(N * N * discard_ratio)``."""
    op = "attention_residual"
    a = _tensor(attention, op, "attention")
    if a.dim() != 3 or a.shape[1] != a.shape[2]:
        raise InvalidInput(
            f"xai_serve.{op}: `attention` must be Tensor[M, N, N], got shape {tuple(a.shape)}"
        )
    if a.dtype != torch.float32:
        raise InvalidInput(f"xai_serve.{op}: `attention` must be float32, got {a.dtype}")
    if (
        isinstance(discard_ratio, bool)
        or not isinstance(discard_ratio, (int, float))
        or not 0.0 <= float(discard_ratio) < 1.0
    ):
        raise InvalidInput(
            f"xai_serve.{op}: `discard_ratio` must be a number in [0, 1), got {discard_ratio!r}"
        )
    n = int(a.shape[1])
    return int(n * n * float(discard_ratio))
