"""The hot, memory-bound steps of explanation, as custom ops with four implementations each.

Public ops:

* :func:`cam_fuse` -- CAM weighted channel sum + ReLU + bilinear upsample + min-max
  normalisation, without ever materialising a ``[B, K, H, W]`` tensor.
* :func:`superpixel_mask` -- the ``B * N`` perturbed images of N superpixel coalitions, with
  the model's input normalisation fused into the same write.
* :func:`segment_mean` -- per-superpixel mean colour (the usual LIME fill).
* :func:`attention_residual` -- attention rollout's per-layer matrix: the lowest entries
  dropped, then ``rownorm(0.5 A + 0.5 I)`` (a selection, linear time in C++, where ``topk``
  sorts).

:func:`check_size` is the output-size check of :func:`cam_fuse`, public so that callers that
take a size of their own (the CAM explainers' ``size`` option) check it the same way.

Backends: ``"reference"`` (pure PyTorch, the specification), ``"cpu"`` (C++), ``"cuda"`` and
``"triton"`` (:func:`attention_residual` has no Triton kernel: on a GPU ``torch.topk``
selects at memory speed, and its CUDA registration composes ATen ops). By default a CUDA
tensor runs the CUDA kernel, else Triton, else the reference; a CPU tensor runs the C++
kernel, else the reference.
``backend=`` or the ``XAI_SERVE_BACKEND`` environment variable forces one (an op without that
backend then makes its own default choice); forcing one that cannot run raises
:class:`~xai_serve.Unavailable` with the fix. :func:`backend_info` says what is available and
which backend each op last ran on.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from xai_serve.errors import InvalidInput, Unavailable
from xai_serve.ops import _checks, _ext
from xai_serve.ops._checks import check_size
from xai_serve.ops.reference import (
    attention_residual_reference,
    cam_fuse_reference,
    segment_mean_reference,
    superpixel_mask_reference,
)
from xai_serve.ops.triton_env import triton_interpreting

__all__ = [
    "BACKENDS",
    "attention_residual",
    "attention_residual_reference",
    "backend_info",
    "cam_fuse",
    "cam_fuse_reference",
    "check_size",
    "segment_mean",
    "segment_mean_reference",
    "superpixel_mask",
    "superpixel_mask_reference",
]

BACKENDS = ("reference", "cpu", "cuda", "triton")
_ENV = "XAI_SERVE_BACKEND"
_last_used: dict[str, str] = {}
_OP_BACKENDS: dict[str, tuple[str, ...]] = {"attention_residual": ("reference", "cpu", "cuda")}
"""The ops that lack some of :data:`BACKENDS` (every other op has all four)."""
_triton_module: ModuleType | None = None


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton() -> ModuleType:
    global _triton_module
    if _triton_module is None:
        from xai_serve.ops import triton as module

        _triton_module = module
    return _triton_module


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device``, with the fix; None if it can."""
    rebuild = "run `make setup` (or `pip install --no-build-isolation -e .`)"
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"the 'cpu' backend takes CPU tensors, got {device}"
        if not _ext.has_backend("cpu"):
            return f"the compiled extension is not loaded ({_ext.LOAD_ERROR}); {rebuild}"
        return None
    if name == "cuda":
        if device.type != "cuda":
            return f"the 'cuda' backend takes CUDA tensors, got {device}"
        if not _ext.has_backend("cuda"):
            if _ext.BUILD_INFO is None:
                return f"the compiled extension is not loaded ({_ext.LOAD_ERROR}); {rebuild}"
            return (
                "the extension was built without CUDA kernels; rebuild on a machine with the "
                f"CUDA toolkit and a GPU (or with XAI_SERVE_FORCE_CUDA=1): {rebuild}"
            )
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed: `pip install triton`"
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return (
            f"triton kernels need CUDA tensors, got {device} "
            "(set TRITON_INTERPRET=1 to run them on the CPU through triton's interpreter)"
        )
    raise InvalidInput(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")


def _select(op: str, device: torch.device, backend: str | None) -> str:
    has = _OP_BACKENDS.get(op, BACKENDS)
    requested = backend or os.environ.get(_ENV) or "auto"
    if backend is None and requested in BACKENDS and requested not in has:
        requested = "auto"  # the environment forces a backend this op does not have
    if backend is not None and backend in BACKENDS and backend not in has:
        raise Unavailable(
            f"xai_serve.{op}: backend={backend!r} cannot run: this op has the "
            f"{', '.join(map(repr, has))} backends only"
        )
    if not _ext.has_op(op) and backend in ("cpu", "cuda"):
        raise Unavailable(
            f"xai_serve.{op}: backend={backend!r} cannot run: the loaded extension predates this "
            "op; run `make setup` (or `pip install --no-build-isolation -e .`)"
        )
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
        name = next(
            n
            for n in order
            if n in has
            and (n not in ("cpu", "cuda") or _ext.has_op(op))
            and _unavailable_reason(n, device) is None
        )
    else:
        reason = _unavailable_reason(requested, device)
        if reason is not None:
            source = "backend=" if backend else f"{_ENV}="
            raise Unavailable(f"xai_serve.{op}: {source}{requested!r} cannot run: {reason}")
        name = requested
    _last_used[op] = name
    return name


def cam_fuse(
    activations: Tensor,
    weights: Tensor,
    size: int | Sequence[int],
    relu: bool = True,
    normalize: bool = True,
    *,
    backend: str | None = None,
) -> Tensor:
    """Class-activation maps from activations and weights, upsampled and normalised.

    ``maps[b] = normalize(upsample(relu(sum_k weights[b, k] * activations[b, k])))``.

    Args:
        activations: ``Tensor[B, K, h, w]`` float32, float16 or bfloat16.
        weights: ``Tensor[B, K]`` (per channel: Grad-CAM, Grad-CAM++, XGrad-CAM, Score-CAM) or
            ``Tensor[B, K, h, w]`` (per activation: HiResCAM, LayerCAM). Another float dtype
            than the activations' is promoted.
        size: output ``(H, W)``, or one int for a square. Upsampling is bilinear with
            ``align_corners=False`` (as ``F.interpolate``).
        relu: clamp the low-resolution map at zero before upsampling.
        normalize: scale each map to ``[0, 1]``; a constant map becomes all zeros.
        backend: force one of :data:`BACKENDS` (default: by device, see the module doc).

    Returns:
        ``Tensor[B, H, W]`` float32 on the activations' device (accumulation in float32).
    """
    out_size = _checks.check_cam_fuse(activations, weights, size)
    if weights.dtype != activations.dtype:
        common = torch.promote_types(activations.dtype, weights.dtype)
        activations, weights = activations.to(common), weights.to(common)
    name = _select("cam_fuse", activations.device, backend)
    if name == "reference":
        return cam_fuse_reference(activations, weights, out_size, relu, normalize)
    if name == "triton":
        return _triton().cam_fuse(activations, weights, out_size, relu, normalize)
    return torch.ops.xai_serve.cam_fuse(activations, weights, list(out_size), relu, normalize)


def superpixel_mask(
    images: Tensor,
    segments: Tensor,
    keep: Tensor,
    baseline: float | Tensor = 0.0,
    mean: Tensor | Sequence[float] | None = None,
    std: Tensor | Sequence[float] | None = None,
    *,
    channels_last: bool = False,
    validate: bool = True,
    backend: str | None = None,
) -> Tensor:
    """The perturbed images of N superpixel coalitions per image, in one pass.

    Pixel ``(y, x)`` of image ``b`` under coalition ``n`` keeps its value where
    ``keep[b, n, segments[b, y, x]]`` is set, and takes the baseline's value elsewhere.

    Args:
        images: ``Tensor[B, C, H, W]`` float32, float16 or bfloat16, in the space the baseline
            is given in (usually raw pixels, before the model's normalisation).
        segments: ``Tensor[B, H, W]`` int32 or int64, superpixel ids in ``[0, S)``.
        keep: ``Tensor[B, N, S]`` bool or uint8 (nonzero keeps the segment).
        baseline: a number (constant fill), ``Tensor[B, C, H, W]`` (a full baseline image, e.g.
            a blurred copy) or ``Tensor[B, C, S]`` (a colour per segment, e.g.
            :func:`segment_mean`); batch 1 broadcasts; converted to the images' dtype.
        mean, std: optional per-channel ``Tensor[C]`` or sequences: the output is then
            ``(value - mean[c]) / std[c]``, the model's input normalisation fused into the write.
        channels_last: write the output in ``torch.channels_last`` memory format: the same
            ``Tensor[B * N, C, H, W]`` and values, stored ``[B * N, H, W, C]`` (what a model
            run channels_last reads without a conversion pass). Every backend writes this
            layout directly; the images may be in either layout.
        validate: check that segment ids lie in ``[0, S)`` and ``std`` has no zero (one device
            synchronisation on a GPU). Pass ``False`` only for inputs already checked: then an
            out-of-range id is never a memory fault, but its pixels' values are unspecified.
        backend: force one of :data:`BACKENDS`.

    Returns:
        ``Tensor[B * N, C, H, W]`` in the images' dtype (arithmetic in float32, rounded once);
        row ``b * N + n`` is image ``b`` under coalition ``n``. Contiguous, or
        ``out.is_contiguous(memory_format=torch.channels_last)`` with ``channels_last``.
    """
    base, fill, mu, sd = _checks.check_superpixel_mask(
        images, segments, keep, baseline, mean, std, validate, channels_last
    )
    name = _select("superpixel_mask", images.device, backend)
    args: tuple[Any, ...] = (images, segments, keep, base, fill, mu, sd)
    if name == "reference":
        return superpixel_mask_reference(*args, channels_last=channels_last)
    if name == "triton":
        return _triton().superpixel_mask(*args, channels_last=channels_last)
    return torch.ops.xai_serve.superpixel_mask(*args, False, channels_last)


def segment_mean(
    images: Tensor,
    segments: Tensor,
    num_segments: int,
    *,
    validate: bool = True,
    backend: str | None = None,
) -> Tensor:
    """Mean colour of every superpixel.

    Args:
        images: ``Tensor[B, C, H, W]`` float32, float16 or bfloat16.
        segments: ``Tensor[B, H, W]`` int32 or int64, ids in ``[0, num_segments)``.
        num_segments: ``S``.
        validate: check the ids are in range (one device synchronisation on a GPU).
        backend: force one of :data:`BACKENDS`.

    Returns:
        ``Tensor[B, C, S]`` in the images' dtype (sums in float32); a segment without pixels
        has mean 0.
    """
    s = _checks.check_segment_mean(images, segments, num_segments, validate)
    name = _select("segment_mean", images.device, backend)
    if name == "reference":
        return segment_mean_reference(images, segments, s)
    if name == "triton":
        return _triton().segment_mean(images, segments, s)
    return torch.ops.xai_serve.segment_mean(images, segments, s, False)


def attention_residual(
    attention: Tensor, discard_ratio: float = 0.0, *, backend: str | None = None
) -> Tensor:
    """Attention rollout's per-layer matrices: ``rownorm(0.5 A + 0.5 I)`` of each
    ``A`` of ``attention``, after setting its ``int(N * N * discard_ratio)`` smallest entries
    to zero, except entry ``[0, 0]`` (the class token's attention to itself), which counts
    among them but is kept -- jacobgil/vit-explain's discard.

    Args:
        attention: ``Tensor[M, N, N]`` float32 (head-fused attention probabilities).
        discard_ratio: in ``[0, 1)``.
        backend: force ``"reference"``, ``"cpu"`` or ``"cuda"`` (no ``"triton"``).

    Returns:
        ``Tensor[M, N, N]`` float32, rows summing to 1. Of several entries equal to the
        largest dropped value, the CPU kernel drops the first in row-major order (the
        reference and the CUDA registration leave the choice to ``torch.topk``).
    """
    drop = _checks.check_attention_residual(attention, discard_ratio)
    name = _select("attention_residual", attention.device, backend)
    if name == "reference":
        return attention_residual_reference(attention, drop)
    return torch.ops.xai_serve.attention_residual(attention, drop)


def backend_info() -> dict[str, Any]:
    """What can run here and what did run.

    Returns a dict with ``available`` (backend -> bool, for some device of this machine),
    ``default`` (device type -> the backend an unforced call picks), ``forced`` (the
    ``XAI_SERVE_BACKEND`` value or None), ``build`` (``xai_serve._C.build_info()`` or None),
    ``extension_error`` (why the extension did not load, or None) and ``last_used``
    (op -> the backend of its latest call in this process).
    """
    cuda_ok = torch.cuda.is_available()
    triton_ok = _triton_installed() and (cuda_ok or triton_interpreting())
    default: dict[str, str] = {"cpu": "cpu" if _ext.has_backend("cpu") else "reference"}
    if cuda_ok:
        default["cuda"] = next(
            n
            for n in ("cuda", "triton", "reference")
            if _unavailable_reason(n, torch.device("cuda")) is None
        )
    return {
        "available": {
            "reference": True,
            "cpu": _ext.has_backend("cpu"),
            "cuda": cuda_ok and _ext.has_backend("cuda"),
            "triton": triton_ok,
        },
        "default": default,
        "forced": os.environ.get(_ENV) or None,
        "build": _ext.BUILD_INFO,
        "extension_error": _ext.LOAD_ERROR,
        "last_used": dict(_last_used),
    }
