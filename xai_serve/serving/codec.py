"""Strict conversions between wire formats and torch tensors.

Everything a client sends passes through here before it reaches a model, so every function
checks sizes *before* it allocates and turns every malformed input into
:class:`~xai_serve.errors.InvalidInput` (the message names the request field) or, when a
configured limit is exceeded, :class:`~xai_serve.errors.ResourceExhausted` (the message says the
limit and the value). A corrupt image or tensor never raises anything else.

* Images: PNG, JPEG and WebP bytes -> ``uint8 Tensor[3, H, W]`` RGB, and ``encode_png`` back
  (:mod:`xai_serve.imaging`, re-exported here).
* ``xai_serve.v1.Tensor`` <-> ``Tensor`` (:func:`tensor_from_proto`, :func:`tensor_to_proto`).
* Open Inference Protocol tensors <-> ``Tensor`` (:func:`oip_input_to_tensor`,
  :func:`tensor_to_oip_output`).

Wire tensors are row-major and little-endian. On a big-endian host the bytes are swapped on the
way in and out (:func:`_swap_bytes`), so results do not depend on the host.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from xai_serve.errors import InvalidInput, ResourceExhausted
from xai_serve.imaging import IMAGE_FORMATS, decode_image, encode_png
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.wire import DTYPES, TORCH_TO_PB

__all__ = [
    "DTYPES",
    "IMAGE_FORMATS",
    "MAX_NDIM",
    "OIP_DTYPES",
    "TORCH_TO_OIP",
    "TORCH_TO_PB",
    "decode_image",
    "encode_png",
    "infer_parameter",
    "oip_input_to_tensor",
    "tensor_from_proto",
    "tensor_to_oip_output",
    "tensor_to_proto",
]

# --------------------------------------------------------------------------------------------
# Dense tensors
# --------------------------------------------------------------------------------------------

#: The most dimensions a wire tensor may have.
MAX_NDIM = 32


#: Open Inference Protocol datatype string -> torch dtype (the numeric types explain takes).
OIP_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "FP32": torch.float32,
        "FP16": torch.float16,
        "BF16": torch.bfloat16,
        "FP64": torch.float64,
        "UINT8": torch.uint8,
        "INT8": torch.int8,
        "INT16": torch.int16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "BOOL": torch.bool,
    }
)
#: torch dtype -> Open Inference Protocol datatype string (the inverse of :data:`OIP_DTYPES`).
TORCH_TO_OIP: Mapping[torch.dtype, str] = MappingProxyType({v: k for k, v in OIP_DTYPES.items()})

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"


def _shape_text(shape: Sequence[int]) -> str:
    """``shape`` for an error message, abbreviated when long."""
    dims = list(shape)
    if len(dims) <= 8:
        return str(dims)
    return f"[{', '.join(map(str, dims[:8]))}, ...] ({len(dims)} dims)"


def _check_shape(shape: Sequence[int], *, field: str, max_elements: int) -> int:
    """Validate ``shape`` and return its element count, without allocating anything.

    The count is a Python int (no overflow); the product stops as soon as it passes
    ``max_elements`` so that a shape such as ``[2**62] * 30`` costs nothing.
    """
    if len(shape) == 0:
        raise InvalidInput(f"{field}.shape is empty; give at least one dimension")
    if len(shape) > MAX_NDIM:
        raise InvalidInput(f"{field}.shape has {len(shape)} dimensions; at most {MAX_NDIM}")
    for i, d in enumerate(shape):
        if d < 1:
            raise InvalidInput(f"{field}.shape[{i}] is {d}; every dimension must be >= 1")
    count = 1
    for d in shape:
        count *= d
        if count > max_elements:
            total = math.prod(shape)  # at most MAX_NDIM int64 factors: cheap
            raise ResourceExhausted(
                f"{field} has {total} elements (shape {_shape_text(shape)}); "
                f"the limit (max_elements) is {max_elements}"
            )
    return count


def _swap_bytes(t: torch.Tensor) -> torch.Tensor:
    """Reverse the byte order of every element of contiguous ``t`` (big <-> little endian)."""
    size = t.element_size()
    if size == 1:
        return t
    u8 = t.reshape(-1).view(torch.uint8).view(-1, size).flip(1).contiguous()
    return u8.view(t.dtype).view(t.shape)


def _from_le_bytes(
    data: bytes, dtype: torch.dtype, shape: Sequence[int], count: int, *, field: str, what: str
) -> torch.Tensor:
    """A tensor owning a copy of ``data`` (little-endian, row-major, ``count`` elements)."""
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{field}: {what} has {len(data)} bytes; shape {_shape_text(shape)} of {dtype} "
            f"needs {expected}"
        )
    if dtype == torch.bool:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if bool((raw > 1).any()):
            raise InvalidInput(f"{field}: {what} holds a BOOL byte other than 0 or 1")
        return raw.view(torch.bool).reshape(tuple(shape))
    # bytearray: one copy that the tensor owns (frombuffer on immutable bytes would warn and
    # alias the request's memory).
    out = torch.frombuffer(bytearray(data), dtype=dtype).reshape(tuple(shape))
    return out if _LITTLE_ENDIAN_HOST else _swap_bytes(out)


def _to_le_bytes(t: torch.Tensor) -> bytes:
    """The little-endian, row-major bytes of ``t``."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if not _LITTLE_ENDIAN_HOST:
        flat = _swap_bytes(flat)
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_proto(t: pb.Tensor, *, field: str, max_elements: int) -> torch.Tensor:
    """Decode an ``xai_serve.v1.Tensor``.

    Args:
        t: the message.
        field: the request field it came from (e.g. ``"tensor"``), named in error messages.
        max_elements: the most elements the tensor may have.

    Returns:
        A CPU tensor of ``t.shape`` and the dtype of ``t.dtype`` that owns its memory.

    Raises:
        InvalidInput: dtype unset or unknown, shape empty or with a dimension < 1, or ``data``
            not exactly ``prod(shape) * itemsize`` bytes.
        ResourceExhausted: more than ``max_elements`` elements (checked before allocating).
    """
    dtype = DTYPES.get(t.dtype)
    if dtype is None:
        if t.dtype == pb.DATA_TYPE_UNSPECIFIED:
            raise InvalidInput(f"{field}.dtype is unspecified; set one of {_pb_dtype_names()}")
        raise InvalidInput(f"{field}.dtype {t.dtype} is unknown; use one of {_pb_dtype_names()}")
    shape = list(t.shape)
    count = _check_shape(shape, field=field, max_elements=max_elements)
    return _from_le_bytes(t.data, dtype, shape, count, field=field, what=f"{field}.data")


def _pb_dtype_names() -> str:
    return ", ".join(pb.DataType.Name(k) for k in DTYPES)


def tensor_to_proto(t: torch.Tensor) -> pb.Tensor:
    """Encode a tensor (any device, any strides) as an ``xai_serve.v1.Tensor``.

    Raises:
        InvalidInput: the dtype has no ``DataType`` (see :data:`DTYPES`).
    """
    code = TORCH_TO_PB.get(t.dtype)
    if code is None:
        raise InvalidInput(
            f"tensor dtype {t.dtype} cannot be sent; supported: "
            f"{', '.join(str(d) for d in TORCH_TO_PB)}"
        )
    return pb.Tensor(shape=list(t.shape), dtype=code, data=_to_le_bytes(t))


# --------------------------------------------------------------------------------------------
# Open Inference Protocol
# --------------------------------------------------------------------------------------------

# datatype -> (InferTensorContents field, numpy dtype read as, (min, max) value range or None).
_OIP_TYPED: Mapping[str, tuple[str, type[np.generic], tuple[int, int] | None]] = MappingProxyType(
    {
        "FP32": ("fp32_contents", np.float32, None),
        "FP64": ("fp64_contents", np.float64, None),
        "INT8": ("int_contents", np.int64, (-(2**7), 2**7 - 1)),
        "INT16": ("int_contents", np.int64, (-(2**15), 2**15 - 1)),
        "INT32": ("int_contents", np.int32, None),
        "INT64": ("int64_contents", np.int64, None),
        "UINT8": ("uint_contents", np.int64, (0, 2**8 - 1)),
        "BOOL": ("bool_contents", np.bool_, None),
    }
)
_OIP_CONTENT_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


def _oip_dtype(datatype: str, field: str) -> torch.dtype:
    dtype = OIP_DTYPES.get(datatype)
    if dtype is not None:
        return dtype
    supported = ", ".join(OIP_DTYPES)
    if datatype == "BYTES":
        raise InvalidInput(
            f"{field}.datatype BYTES is not supported: explain takes numeric tensors ({supported})"
        )
    raise InvalidInput(f"{field}.datatype {datatype!r} is not supported; use one of {supported}")


def oip_input_to_tensor(
    inp: oip.ModelInferRequest.InferInputTensor,
    raw: bytes | None,
    *,
    field: str,
    max_elements: int,
) -> torch.Tensor:
    """Decode one Open Inference Protocol input tensor.

    Args:
        inp: the input's metadata, and its typed ``contents`` when ``raw`` is ``None``.
        raw: this input's entry of ``raw_input_contents`` (little-endian, row-major), or
            ``None`` when the request carries typed contents.
        field: the request field (e.g. ``"inputs[0]"``), named in error messages.
        max_elements: the most elements the tensor may have.

    Typed contents follow the protocol: FP32 -> ``fp32_contents``, FP64 -> ``fp64_contents``,
    INT8/INT16/INT32 -> ``int_contents``, INT64 -> ``int64_contents``, UINT8 ->
    ``uint_contents``, BOOL -> ``bool_contents``; FP16 and BF16 only travel as raw bytes.

    Returns:
        A CPU tensor of ``inp.shape`` that owns its memory.

    Raises:
        InvalidInput: unsupported datatype (BYTES included), bad shape, a byte or element count
            that does not match the shape, contents in the wrong field, values out of range.
        ResourceExhausted: more than ``max_elements`` elements (checked before allocating).
    """
    dtype = _oip_dtype(inp.datatype, field)
    shape = list(inp.shape)
    count = _check_shape(shape, field=field, max_elements=max_elements)
    filled = [name for name in _OIP_CONTENT_FIELDS if len(getattr(inp.contents, name)) > 0]
    if raw is not None:
        if filled:
            raise InvalidInput(
                f"{field}: both raw_input_contents and contents.{filled[0]} are set; "
                "send the data once"
            )
        return _from_le_bytes(raw, dtype, shape, count, field=field, what="raw_input_contents")

    typed = _OIP_TYPED.get(inp.datatype)
    if typed is None:
        raise InvalidInput(
            f"{field}: datatype {inp.datatype} has no typed contents field; "
            "send it in raw_input_contents"
        )
    name, np_dtype, value_range = typed
    stray = [f for f in filled if f != name]
    if stray:
        raise InvalidInput(
            f"{field}: datatype {inp.datatype} takes contents.{name}, "
            f"but contents.{stray[0]} is set"
        )
    values = getattr(inp.contents, name)
    if len(values) != count:
        raise InvalidInput(
            f"{field}: contents.{name} has {len(values)} elements; "
            f"shape {_shape_text(shape)} needs {count}"
        )
    arr = np.array(values, dtype=np_dtype)
    if value_range is not None:
        lo, hi = value_range
        if arr.size and (arr.min() < lo or arr.max() > hi):
            raise InvalidInput(
                f"{field}: contents.{name} holds a value outside the {inp.datatype} range "
                f"[{lo}, {hi}]"
            )
    return torch.from_numpy(arr).to(dtype).reshape(tuple(shape))


def tensor_to_oip_output(
    name: str, t: torch.Tensor
) -> tuple[oip.ModelInferResponse.InferOutputTensor, bytes]:
    """One Open Inference Protocol output: its metadata and its raw little-endian bytes.

    The bytes go into ``raw_output_contents``, in the same order as ``outputs``.

    Raises:
        InvalidInput: the dtype has no OIP datatype here (see :data:`OIP_DTYPES`).
    """
    datatype = TORCH_TO_OIP.get(t.dtype)
    if datatype is None:
        raise InvalidInput(
            f"output {name!r}: dtype {t.dtype} cannot be sent; supported: {', '.join(OIP_DTYPES)}"
        )
    meta = oip.ModelInferResponse.InferOutputTensor(
        name=name, datatype=datatype, shape=list(t.shape)
    )
    return meta, _to_le_bytes(t)


def infer_parameter(value: Any, field: str) -> oip.InferParameter:
    """A plain value (bool, int, float or str, as JSON or a command line gives it) as an Open
    Inference Protocol parameter; InvalidInput naming ``field`` for anything else."""
    p = oip.InferParameter()
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise InvalidInput(f"{field} is out of the int64 range: {value}")
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise InvalidInput(f"{field} must be a bool, number or string, got {value!r}")
    return p
