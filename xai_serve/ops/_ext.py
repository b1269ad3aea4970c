"""Loading of the compiled extension ``xai_serve._C``.

Import never fails: without the extension (not built, or built against another torch) the ops
fall back to the PyTorch reference and :func:`xai_serve.ops.backend_info` says why. When the
extension loads, its ops are registered under ``torch.ops.xai_serve`` and this module adds their
fake (meta) kernels, so they trace under ``torch.compile`` and ``torch.library.opcheck``.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

__all__ = ["BUILD_INFO", "LOAD_ERROR", "has_backend"]

BUILD_INFO: dict[str, Any] | None
LOAD_ERROR: str | None

try:
    from xai_serve import _C  # type: ignore[attr-defined]
except (ImportError, OSError) as exc:  # not built, or an ABI mismatch with this torch
    BUILD_INFO = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
else:
    BUILD_INFO = dict(_C.build_info())
    LOAD_ERROR = None


def has_backend(name: str) -> bool:
    """Whether the extension was built with kernels for ``name`` ("cpu" or "cuda")."""
    return BUILD_INFO is not None and name in BUILD_INFO["backends"]


@functools.cache
def has_op(op: str) -> bool:
    """Whether the loaded extension registers ``op`` (a build older than the op does not)."""
    if BUILD_INFO is None:
        return False
    try:
        getattr(torch.ops.xai_serve, op)
    except (AttributeError, RuntimeError):
        return False
    return True


if BUILD_INFO is not None:

    @torch.library.register_fake("xai_serve::cam_fuse")
    def _cam_fuse_fake(
        activations: Tensor,
        weights: Tensor,
        size: list[int],
        relu: bool = True,
        normalize: bool = True,
    ) -> Tensor:
        return activations.new_empty((activations.shape[0], size[0], size[1]), dtype=torch.float32)

    @torch.library.register_fake("xai_serve::superpixel_mask")
    def _superpixel_mask_fake(
        images: Tensor,
        segments: Tensor,
        keep: Tensor,
        baseline: Tensor | None = None,
        fill: float = 0.0,
        mean: Tensor | None = None,
        std: Tensor | None = None,
        check_segments: bool = True,
        channels_last: bool = False,
    ) -> Tensor:
        b, c, h, w = images.shape
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        shape = (b * keep.shape[1], c, h, w)
        return torch.empty(shape, dtype=images.dtype, device=images.device, memory_format=fmt)

    @torch.library.register_fake("xai_serve::segment_mean")
    def _segment_mean_fake(
        images: Tensor,
        segments: Tensor,
        num_segments: int,
        check_segments: bool = True,
    ) -> Tensor:
        return images.new_empty((images.shape[0], images.shape[1], num_segments))


if has_op("attention_residual"):

    @torch.library.register_fake("xai_serve::attention_residual")
    def _attention_residual_fake(attention: Tensor, drop: int) -> Tensor:
        return torch.empty_like(attention, memory_format=torch.contiguous_format)
