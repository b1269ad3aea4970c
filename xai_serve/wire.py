"""The ``xai_serve.v1.Tensor`` element types, shared by the server's codec and the client.

Kept apart from :mod:`xai_serve.serving.codec` because the client must not import the Open
Inference Protocol stubs that the codec needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import torch

from xai_serve.proto import explainer_pb2 as pb

__all__ = ["DTYPES", "TORCH_TO_PB"]

#: ``xai_serve.v1.DataType`` value -> torch dtype.
DTYPES: Mapping[int, torch.dtype] = MappingProxyType(
    {
        pb.FLOAT32: torch.float32,
        pb.FLOAT16: torch.float16,
        pb.BFLOAT16: torch.bfloat16,
        pb.FLOAT64: torch.float64,
        pb.UINT8: torch.uint8,
        pb.INT32: torch.int32,
        pb.INT64: torch.int64,
    }
)

#: torch dtype -> ``xai_serve.v1.DataType`` value (the inverse of :data:`DTYPES`).
TORCH_TO_PB: Mapping[torch.dtype, int] = MappingProxyType({v: k for k, v in DTYPES.items()})
