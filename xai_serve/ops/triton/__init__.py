"""Triton kernels of the ``xai_serve`` ops.

Each op has three layers: a private ``@triton.jit`` kernel, a host launcher (layout checks,
allocation, block sizes, launch) and the public function exported here. Arguments reach these
functions already validated by :mod:`xai_serve.ops` (shapes, dtypes, devices, segment ids in
range); the kernels still never index memory with an out-of-range segment id.

Set ``TRITON_INTERPRET=1`` before importing this module to run the kernels on CPU tensors.
"""

from __future__ import annotations

from .cam_fuse import cam_fuse
from .segment_mean import segment_mean
from .superpixel_mask import superpixel_mask

__all__ = ["cam_fuse", "segment_mean", "superpixel_mask"]
