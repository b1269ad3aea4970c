"""Attention explanations of vision transformers: rollout, flow and gradient-weighted rollout.

Every method reads the attention probabilities ``A_l`` (``Tensor[B, heads, N, N]``, ``N`` tokens:
the class token first, then any distillation / register tokens, then the patches in row-major
order) of every encoder block ``l = 1..L`` during one forward of the whole batch, and explains
the class token of the last layer by the patch tokens of the input:

=================== ==========================================================================
method              relevance of the patches (``row_0`` = the class token's row over the patches)
=================== ==========================================================================
attention_rollout   ``row_0(Â_L ... Â_1)``, ``Â_l = rownorm(0.5 fuse(A_l) + 0.5 I)``
                    (Abnar & Zuidema, 2020); ``fuse`` = mean, max or min over heads
                    (``head_fusion``), after dropping each image's lowest ``discard_ratio`` of
                    the fused entries (but never the class token's own entry ``[0, 0]``), as
                    jacobgil/vit-explain does
attention_flow      the maximum flow from each input patch token to the last layer's class token
                    through the layered graph whose edge ``(l-1, i) -> (l, j)`` has capacity
                    ``Â_l[j, i]`` (Abnar & Zuidema, 2020)
attention_gradcam   ``row_0((I + Ā_L) ... (I + Ā_1))``, ``Ā_l = mean_heads(relu(dy/dA_l ⊙ A_l))``,
                    ``y`` the target's logit: ``R = I; R += Ā_l R`` per layer (Chefer, Gur &
                    Wolf, 2021, "Generic attention-model explainability")
=================== ==========================================================================

The relevance (``Tensor[B, h, w]`` on the patch grid) is upsampled to the output size with
:func:`xai_serve.ops.cam_fuse` (bilinear, then per-image min-max normalisation to ``[0, 1]``),
as the CAM methods' maps are.

Rollout and attention-Grad-CAM need only the class token's row of the product, so they compute
``e_0^T M_L ... M_1`` as a chain of batched vector-matrix products from the last layer down
(``O(L N^2)`` per image, not the ``O(L N^3)`` of multiplying the full matrices); every layer's
matrix of every image of the batch stays on the model's device. Attention flow is a sequence of
maximum-flow problems solved on the CPU by :func:`scipy.sparse.csgraph.maximum_flow`: one per
patch for up to 8 images at once (the images' graphs are disjoint parts of one graph with a
common source and sink, and a maximum flow of the whole is a maximum flow of each part), with
capacities scaled by :data:`FLOW_SCALE` ``= 2**26`` and rounded to integers (scipy takes int32
capacities). Each capacity is then off by at most ``2**-27``, so a flow value by at most
``2**-27`` per edge of a minimum cut (e.g. ``N * 2**-27`` when the cut is the patch's own
in-edges). It is slow by nature: :data:`FLOW_LIMIT` (or the option
``flow_limit``) caps ``tokens x layers``.

Models: torchvision ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ...) and timm
``VisionTransformer`` and its subclasses (ViT, DeiT, DeiT distilled, register tokens: the first
``num_prefix_tokens`` tokens are not patches), the model itself or one submodule of it (a
wrapper that, say, normalises its input). Windowed attention (Swin) and other attention
modules are refused with :class:`~xai_serve.InvalidInput`, as are models without attention.

How the probabilities are read, for the duration of one call only (restored on return and on
errors; the model's outputs stay those of the untouched model up to float rounding):

* torchvision: each block's ``nn.MultiheadAttention`` is called with ``need_weights=False``,
  and its fused kernel never forms ``A``. Its ``forward`` is replaced (an instance attribute,
  deleted afterwards) by the same computation written out: ``softmax(Q K^T / sqrt(d)) V`` with
  the module's own projections.
* timm: each block's ``Attention`` has ``fused_attn`` (scaled-dot-product attention, which never
  forms ``A``) and an ``attn_drop`` module applied to the probabilities right after the softmax.
  ``fused_attn`` is switched off and a forward pre-hook on ``attn_drop`` reads its input.

For ``attention_gradcam`` the forward runs with autograd on, and the first layer's ``A`` becomes
a leaf that requires grad when nothing before it does (the weights never do), so that the graph
starts there; one ``torch.autograd.grad`` of the summed target logits gives every layer's
``dy/dA_l`` for every image (the images do not interact), and no parameter gradient.

Hooks and attributes are changed on the model for the duration of one call: do not explain with
the same model object from two threads at once.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve import ops
from xai_serve.errors import InvalidInput, Unavailable
from xai_serve.explainers._options import choice_option, positive_int
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    check_target_range,
    register,
)
from xai_serve.explainers.onednn import self_attention_heads
from xai_serve.ops import check_size

__all__ = [
    "FLOW_LIMIT",
    "FLOW_SCALE",
    "HEAD_FUSIONS",
    "AttentionFlow",
    "AttentionGradCAM",
    "AttentionRollout",
    "flow_values",
    "fuse_heads",
    "gradcam_row",
    "residual_attention",
    "rollout_row",
]

HEAD_FUSIONS = ("mean", "max", "min")
"""Values of the option ``head_fusion``."""

FLOW_LIMIT = 2400
"""The largest ``tokens x layers`` (class and other prefix tokens included) that
``attention_flow`` takes by default (the option ``flow_limit`` overrides it per call): ViT-S/16
and ViT-B/16 at 224 x 224 (197 tokens x 12 layers = 2364, about 4 s per image on a 2-core
CPU), not ViT-L/16 (197 x 24). The cost grows about as ``layers x tokens^3`` per image (one
maximum-flow problem of ``layers x tokens^2`` edges per patch)."""

FLOW_SCALE = 2**26
"""Capacities of ``attention_flow`` are ``round(Â * FLOW_SCALE)``: scipy's maximum flow takes
int32 capacities and flows, and an image's flow is at most about ``FLOW_SCALE``."""

# Image graphs per scipy call of attention_flow: their flows add up to at most about
# 8 * 2**26 = 2**29, within int32.
_FLOW_IMAGES_PER_CALL = 8


# --------------------------------------------------------------------------------------------
# Finding the transformer and its attention modules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ViT:
    """A supported vision transformer inside the model."""

    module: nn.Module  # the ViT (the model or one of its submodules)
    kind: str  # "torchvision" | "timm"
    attentions: tuple[nn.Module, ...]  # one per encoder block, in forward order
    prefix: int  # tokens before the patches (the class token is token 0)
    grid: tuple[int, int]  # the patch grid (rows, columns)


_SUPPORTED = (
    "the attention methods support torchvision VisionTransformer (vit_b_16, vit_b_32, "
    "vit_l_16, ...) and timm VisionTransformer / DeiT models with a class token"
)


def _classes(module_name: str, *names: str) -> tuple[type, ...]:
    """The classes ``names`` of an already imported module (none if it is not imported: a model
    can only be one of them if the caller imported that library)."""
    mod = sys.modules.get(module_name)
    return tuple(c for n in names if isinstance(c := getattr(mod, n, None), type))


def _windowed(model: nn.Module) -> str | None:
    """The class name of a windowed-attention (Swin-like) module of the model, if any."""
    swin = _classes("torchvision.models", "SwinTransformer")
    if swin and isinstance(model, swin):
        return type(model).__name__
    for m in model.modules():
        name = type(m).__name__
        if "WindowAttention" in name or name.startswith("Swin"):
            return name
    return None


def _attention_like(model: nn.Module) -> str | None:
    """The class name of some attention module of the model, if any."""
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) or hasattr(m, "fused_attn"):
            return type(m).__name__
    for name, m in model.named_modules():
        if name and "attention" in type(m).__name__.lower():
            return type(m).__name__
    return None


def _size_pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _torchvision_vit(vit: nn.Module, images: Tensor, top: bool, method: str) -> _ViT:
    blocks = list(vit.encoder.layers)  # type: ignore[union-attr]
    attns = []
    for i, block in enumerate(blocks):
        mha = getattr(block, "self_attention", None)
        if not isinstance(mha, nn.MultiheadAttention):
            raise InvalidInput(
                f"{method}: block {i} of the torchvision VisionTransformer has no "
                "nn.MultiheadAttention `self_attention`"
            )
        if (
            not mha._qkv_same_embed_dim
            or mha.bias_k is not None
            or mha.add_zero_attn
            or mha.in_proj_weight is None
        ):
            raise InvalidInput(
                f"{method}: block {i}'s nn.MultiheadAttention uses separate q/k/v projections, "
                "key/value biases or zero attention, which the attention methods do not support"
            )
        attns.append(mha)
    size, p = int(vit.image_size), int(vit.patch_size)  # type: ignore[arg-type]
    if top and tuple(images.shape[2:]) != (size, size):
        raise InvalidInput(
            f"`images` must be {size} x {size} for this torchvision VisionTransformer, got "
            f"{images.shape[2]} x {images.shape[3]}"
        )
    return _ViT(vit, "torchvision", tuple(attns), 1, (size // p, size // p))


def _timm_vit(vit: nn.Module, images: Tensor, top: bool, method: str) -> _ViT:
    if not getattr(vit, "cls_token", None) is not None:
        raise InvalidInput(
            f"{method} explains the class token, and this timm {type(vit).__name__} has none "
            "(class_token=False)"
        )
    attns = []
    for i, block in enumerate(vit.blocks):  # type: ignore[union-attr]
        attn = getattr(block, "attn", None)
        if not (
            isinstance(attn, nn.Module)
            and isinstance(getattr(attn, "fused_attn", None), bool)
            and isinstance(getattr(attn, "attn_drop", None), nn.Module)
        ):
            got = type(attn).__name__ if attn is not None else "none"
            raise InvalidInput(
                f"{method}: block {i} of the timm {type(vit).__name__} has an attention module "
                f"({got}) without timm's `fused_attn` switch and `attn_drop`, which the "
                "attention methods do not support"
            )
        attns.append(attn)
    pe = vit.patch_embed  # type: ignore[union-attr]
    h, w = int(images.shape[2]), int(images.shape[3])
    if getattr(vit, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        grid = _size_pair(pe.dynamic_feat_size((h, w)))
    else:
        grid = _size_pair(pe.grid_size)
        img = getattr(pe, "img_size", None)
        strict = top and img is not None and getattr(pe, "strict_img_size", True)
        if strict and _size_pair(img) != (h, w):
            ih, iw = _size_pair(img)
            raise InvalidInput(
                f"`images` must be {ih} x {iw} for this timm {type(vit).__name__}, got {h} x {w}"
            )
    return _ViT(vit, "timm", tuple(attns), int(vit.num_prefix_tokens), grid)  # type: ignore[arg-type]


def find_vit(model: nn.Module, images: Tensor, method: str) -> _ViT:
    """The model's vision transformer (the model or its first ViT submodule), or InvalidInput
    naming what the model has instead."""
    tv = _classes("torchvision.models", "VisionTransformer")
    tm = _classes("timm.models.vision_transformer", "VisionTransformer")
    for name, m in model.named_modules():
        if tv and isinstance(m, tv):
            return _torchvision_vit(m, images, name == "", method)
        if tm and isinstance(m, tm):
            return _timm_vit(m, images, name == "", method)
    windowed = _windowed(model)
    if windowed is not None:
        raise InvalidInput(
            f"{method} needs global self-attention over a class token; this model has windowed "
            f"attention ({windowed}, Swin-like), which is not supported; {_SUPPORTED}"
        )
    other = _attention_like(model)
    if other is not None:
        raise InvalidInput(
            f"{method}: this model's attention ({other}) is not supported; {_SUPPORTED}"
        )
    raise InvalidInput(
        f"{method} needs a vision transformer, and this model ({type(model).__name__}) has no "
        f"attention layers (a CNN?); {_SUPPORTED}"
    )


# --------------------------------------------------------------------------------------------
# Reading the attention probabilities during one forward
# --------------------------------------------------------------------------------------------


class _Tap:
    """What the patched attention modules hand their probabilities to during one forward."""

    def __init__(self, keep: Callable[[Tensor], Tensor], leaf: bool, method: str) -> None:
        self.keep = keep
        self.leaf = leaf
        self.method = method
        self.values: list[Tensor] = []
        self.order: list[int] = []

    def take(self, index: int, a: Tensor) -> Tensor:
        if a.dim() != 4 or a.shape[-1] != a.shape[-2]:
            raise InvalidInput(
                f"{self.method}: attention {index} gave probabilities of shape "
                f"{tuple(a.shape)}, not [B, heads, N, N]; this attention is not supported"
            )
        if self.leaf and not a.requires_grad:  # the graph starts at the first layer's A
            a = a.detach().requires_grad_(True)
        self.values.append(self.keep(a))
        self.order.append(index)
        return a


def _mha_forward(mha: nn.MultiheadAttention, tap: _Tap, index: int) -> Callable[..., Any]:
    """``nn.MultiheadAttention.forward`` for self-attention, written out so that ``A`` exists."""

    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not (query is key and key is value) or key_padding_mask is not None:
            raise InvalidInput(
                f"{tap.method}: attention {index} is not plain self-attention (query, key and "
                "value differ, or a key padding mask is given); not supported"
            )
        if attn_mask is not None or is_causal:
            raise InvalidInput(f"{tap.method}: attention {index} is masked; not supported")
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, d = x.shape
        q, k, v = self_attention_heads(mha, x)  # packed on the oneDNN twin
        a = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1)
        a = tap.take(index, a)
        out = F.dropout(a, mha.dropout, mha.training) @ v  # [B, heads, N, hd]
        out = mha.out_proj(out.transpose(1, 2).reshape(b, n, d))
        if not mha.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = a.mean(dim=1) if average_attn_weights else a
        return out, weights

    return forward


@contextlib.contextmanager
def _tapped(vit: _ViT, tap: _Tap) -> Iterator[None]:
    """The ViT's attention modules hand ``A`` to ``tap`` inside the block; restored after."""
    undo: list[Callable[[], None]] = []
    try:
        for i, m in enumerate(vit.attentions):
            if vit.kind == "torchvision":
                had = "forward" in m.__dict__
                old = m.__dict__.get("forward")
                m.forward = _mha_forward(m, tap, i)  # type: ignore[method-assign]

                def restore(m: nn.Module = m, had: bool = had, old: Any = old) -> None:
                    if had:
                        m.forward = old  # type: ignore[method-assign]
                    else:
                        del m.forward

                undo.append(restore)
            else:
                own = "fused_attn" in m.__dict__  # timm sets it per instance
                fused = m.fused_attn
                m.fused_attn = False
                if own:
                    undo.append(functools.partial(setattr, m, "fused_attn", fused))
                else:
                    undo.append(functools.partial(delattr, m, "fused_attn"))

                def pre(_m: nn.Module, args: tuple[Any, ...], i: int = i) -> tuple[Any, ...]:
                    return (tap.take(i, args[0]), *args[1:])

                handle = m.attn_drop.register_forward_pre_hook(pre)
                undo.append(handle.remove)
        yield
    finally:
        for step in reversed(undo):
            step()


def _running_model(request: Request) -> nn.Module:
    """The model the forward runs: the path's oneDNN twin when it has one (the same weights and
    maths, faster linear layers), else the model; the taps go on its modules."""
    runner = request.path.runner
    return request.model if runner is None else runner


@dataclass
class _Pass:
    """What one explanation forward read."""

    logits: Tensor  # [B, classes]; carries the graph for attention_gradcam
    targets: Tensor  # [B] int64
    values: list[Tensor]  # one per layer, what the tap kept


def _forward(
    request: Request,
    images: Tensor,
    target: Tensor | None,
    vit: _ViT,
    keep: Callable[[Tensor], Tensor],
    grad: bool,
    method: str,
) -> _Pass:
    tap = _Tap(keep, leaf=grad, method=method)
    with _tapped(vit, tap), torch.set_grad_enabled(grad):
        out = _running_model(request)(images)
    batch = images.shape[0]
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InvalidInput(
            f"{method} needs a model that returns logits Tensor[B, classes] with B = {batch}, "
            f"got {shape}"
        )
    if tap.order != list(range(len(vit.attentions))):
        raise InvalidInput(
            f"{method}: the model ran its {len(vit.attentions)} attention layers in the order "
            f"{tap.order} during one forward, not once each in order; not supported"
        )
    tokens = tap.values[0].shape[-1]
    gh, gw = vit.grid
    if tokens != vit.prefix + gh * gw:
        raise InvalidInput(
            f"{method}: the attention has {tokens} tokens, but {vit.prefix} prefix token(s) and "
            f"a {gh} x {gw} patch grid make {vit.prefix + gh * gw}; not supported"
        )
    if target is None:
        targets = out.detach().argmax(dim=1)
    else:
        check_target_range(target, out)
        targets = target
    return _Pass(out, targets, tap.values)


# --------------------------------------------------------------------------------------------
# The maths (public: the tests and benchmarks use them on given attentions)
# --------------------------------------------------------------------------------------------


def fuse_heads(a: Tensor, how: str) -> Tensor:
    """``Tensor[..., heads, N, N]`` to ``Tensor[..., N, N]`` float32: the mean, max or min over
    the heads."""
    a = a.float()
    if how == "mean":
        return a.mean(dim=-3)
    if how == "max":
        return a.amax(dim=-3)
    if how == "min":
        return a.amin(dim=-3)
    raise InvalidInput(
        f"option `head_fusion` must be one of {', '.join(HEAD_FUSIONS)}; got {how!r}"
    )


def residual_attention(a: Tensor, discard_ratio: float = 0.0) -> Tensor:
    """``rownorm(0.5 a + 0.5 I)`` of fused attentions ``Tensor[..., N, N]``, after setting each
    matrix's ``int(N * N * discard_ratio)`` smallest entries to zero, except entry ``[0, 0]``
    (the class token's attention to itself), as jacobgil/vit-explain does (its rows are then
    renormalised here, where vit-explain divides by the transposed sums)."""
    n = a.shape[-1]
    flat = a.float().reshape(-1, n, n)
    return ops.attention_residual(flat, discard_ratio).view(a.shape)


def rollout_row(mats: list[Tensor]) -> Tensor:
    """Row 0 of ``mats[-1] @ ... @ mats[0]`` (each ``Tensor[B, N, N]``): ``Tensor[B, N]``,
    computed as vector-matrix products from the last matrix down."""
    row = mats[-1][:, 0, :]
    for m in reversed(mats[:-1]):
        row = torch.bmm(row[:, None, :], m)[:, 0, :]
    return row


def gradcam_row(mats: list[Tensor]) -> Tensor:
    """Row 0 of ``(I + mats[-1]) ... (I + mats[0])``, i.e. of ``R`` after ``R = I;
    R += m @ R`` for ``m`` in ``mats`` order: ``Tensor[B, N]``."""
    row = mats[-1][:, 0, :].clone()
    row[:, 0] += 1.0
    for m in reversed(mats[:-1]):
        row = row + torch.bmm(row[:, None, :], m)[:, 0, :]
    return row


@functools.cache
def _maximum_flow() -> Callable[..., Any]:
    try:
        from scipy.sparse.csgraph import maximum_flow
    except ImportError:
        raise Unavailable("attention_flow needs scipy: pip install scipy") from None
    return maximum_flow


def flow_values(mats: Tensor, prefix: int) -> Tensor:
    """Maximum flows of the attention graphs ``mats`` (``Tensor[L, B, N, N]``, residual-adjusted
    attentions, ``mats[l][b, j, i]`` the capacity of the edge from token ``i`` of layer ``l`` to
    token ``j`` of layer ``l + 1``): ``Tensor[B, N - prefix]`` float64 on the CPU, the maximum
    flow from each input patch token (tokens ``prefix..N-1`` of layer 0) to the class token
    (token 0) of layer ``L``. Capacities are ``round(mats * FLOW_SCALE)``.

    The capacities must lie in ``[0, 1]`` and the last layer's class-token row must sum to at
    most 1 (as rows of residual-adjusted attentions do): that row bounds every flow, which
    keeps the integer flows of a call within int32."""
    import scipy.sparse as sp

    maximum_flow = _maximum_flow()
    layers, batch, n, _ = mats.shape
    top_sums = mats[-1, :, 0, :].sum(dim=-1)
    if bool(mats.min() < 0) or bool(mats.max() > 1) or bool(top_sums.max() > 1 + 1e-6):
        raise InvalidInput(
            "attention_flow: capacities must lie in [0, 1] and the last layer's class-token "
            "row must sum to at most 1 (residual-adjusted attentions)"
        )
    patches = n - prefix
    cap = torch.round(mats.detach().to("cpu", torch.float64) * FLOW_SCALE).to(torch.int32).numpy()
    out = np.zeros((batch, patches), dtype=np.float64)
    # Nodes of one image: layer l token i = l * n + i (l = 0..L). The flow runs downwards (from
    # the class token at the top to a patch at the bottom) along edges (l+1, j) -> (l, i) of
    # capacity mats[l][j, i]: the same maximum as upwards on the reversed graph. At the top
    # only the class token's edges are reachable from the source: the other rows are left out.
    per = (layers + 1) * n
    big = np.int32(2 * FLOW_SCALE)  # more than any image's flow: never a bottleneck
    for start in range(0, batch, _FLOW_IMAGES_PER_CALL):
        imgs = np.arange(start, min(start + _FLOW_IMAGES_PER_CALL, batch))
        k = len(imgs)
        source, sink = k * per, k * per + 1
        rows, cols, data = [], [], []
        for slot, b in enumerate(imgs):
            base = slot * per
            for layer in range(layers):
                c = cap[layer, b]
                top = 1 if layer == layers - 1 else n  # upper tokens whose edges are kept
                j, i = np.nonzero(c[:top])
                rows.append(base + (layer + 1) * n + j)
                cols.append(base + layer * n + i)
                data.append(c[:top][j, i])
        # The source feeds every image's top class token; every input patch token of every
        # image has an edge to the sink, of capacity 0 except for the patch being solved.
        tops = np.arange(k) * per + layers * n
        patch_nodes = (np.arange(k) * per + prefix)[:, None] + np.arange(patches)[None, :]
        rows += [np.full(k, source), patch_nodes.ravel()]
        cols += [tops, np.full(k * patches, sink)]
        data += [np.full(k, big), np.zeros(k * patches, dtype=np.int32)]
        graph = sp.csr_array(
            (np.concatenate(data), (np.concatenate(rows), np.concatenate(cols))),
            shape=(k * per + 2, k * per + 2),
        )
        graph.sort_indices()
        # A layer-0 patch node's only out-edge is its sink edge: at indptr[node] in the data.
        sink_edges = graph.indptr[patch_nodes]  # [k, patches]
        for p in range(patches):
            if p:
                graph.data[sink_edges[:, p - 1]] = 0
            graph.data[sink_edges[:, p]] = big
            flow = maximum_flow(graph, source, sink).flow
            lo, hi = flow.indptr[source], flow.indptr[source + 1]
            slots = (flow.indices[lo:hi] - layers * n) // per
            sent = np.zeros(k, dtype=np.float64)
            sent[slots] = flow.data[lo:hi]
            out[imgs, p] = sent
    return torch.from_numpy(out / FLOW_SCALE)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


def _discard_ratio(options: dict[str, Any]) -> float:
    value = options["discard_ratio"]
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not 0.0 <= value < 1.0
    ):
        raise InvalidInput(f"option `discard_ratio` must be a number in [0, 1), got {value!r}")
    return float(value)


class _Attention(Explainer):
    """Shared driver: checks, finds the ViT, runs the batch in chunks, upsamples the rows."""

    uses_layer = False
    needs_gradients = False
    options: ClassVar[dict[str, Any]] = {"size": None}

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        tv = _classes("torchvision.models", "VisionTransformer")
        tm = _classes("timm.models.vision_transformer", "VisionTransformer")
        if any((tv and isinstance(m, tv)) or (tm and isinstance(m, tm)) for m in model.modules()):
            return None
        return "no torchvision or timm vision transformer in the model"

    def explain(self, request: Request) -> Explanation:
        images = request.images
        option = request.options.get("size")
        size = (
            (int(images.shape[2]), int(images.shape[3]))
            if option is None
            else check_size(option, self.name)
        )
        self.check_options(request)
        vit = find_vit(_running_model(request), images, self.name)
        if self.needs_gradients and torch.is_inference_mode_enabled():
            raise InvalidInput(
                f"{self.name} differentiates the model and cannot run under "
                "torch.inference_mode(); call it outside it"
            )
        self.check_size(request, vit)
        batch = images.shape[0]
        chunk = request.batch_size or batch
        rows, logits, targets = [], [], []
        for s in range(0, batch, chunk):
            target = None if request.target is None else request.target[s : s + chunk]
            row, out, t = self.relevance(request, images[s : s + chunk], target, vit)
            rows.append(row[:, vit.prefix :].float())
            logits.append(out.detach().float())
            targets.append(t)
        relevance = torch.cat(rows).to(images.device)
        gh, gw = vit.grid
        grid = relevance.reshape(batch, 1, gh, gw).contiguous()
        ones = torch.ones(batch, 1, dtype=grid.dtype, device=grid.device)
        maps = ops.cam_fuse(grid, ones, size)
        return Explanation(
            maps=maps, targets=torch.cat(targets), logits=torch.cat(logits), method=self.name
        )

    def check_options(self, request: Request) -> None:
        """Validate the method's options before the forward (default: none)."""

    def check_size(self, request: Request, vit: _ViT) -> None:
        """Refuse a problem too large for the method (default: none)."""

    def relevance(
        self, request: Request, images: Tensor, target: Tensor | None, vit: _ViT
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(class token's relevance row Tensor[b, N], logits, targets)`` of a chunk."""
        raise NotImplementedError  # pragma: no cover - abstract


@register("attention_rollout")
class AttentionRollout(_Attention):
    """Attention rollout (Abnar & Zuidema, 2020): the class token's row of the product of the
    layers' residual-adjusted, head-fused attentions (see the module doc).

    Options: ``head_fusion`` (``"mean"``, ``"max"`` or ``"min"`` over the heads),
    ``discard_ratio`` (in ``[0, 1)``: share of each image's and layer's lowest fused attentions
    set to zero before the residual, never the class token's own entry), ``size`` (output
    ``(H, W)``, default the input's).
    """

    uses_target = False  # class-agnostic: the same map whatever the class
    options: ClassVar[dict[str, Any]] = {"head_fusion": "mean", "discard_ratio": 0.0, "size": None}

    def check_options(self, request: Request) -> None:
        choice_option(request.options, "head_fusion", HEAD_FUSIONS)
        _discard_ratio(request.options)

    def relevance(
        self, request: Request, images: Tensor, target: Tensor | None, vit: _ViT
    ) -> tuple[Tensor, Tensor, Tensor]:
        how = request.options["head_fusion"]
        ratio = _discard_ratio(request.options)
        run = _forward(request, images, target, vit, lambda a: fuse_heads(a, how), False, self.name)
        mats = residual_attention(torch.stack(run.values), ratio)
        return rollout_row(list(mats.unbind(0))), run.logits, run.targets


@register("attention_flow")
class AttentionFlow(_Attention):
    """Attention flow (Abnar & Zuidema, 2020): the maximum flow from each input patch token to
    the last layer's class token through the layers' residual-adjusted, head-fused attentions
    (see the module doc). Solved on the CPU with scipy, one maximum-flow problem per patch for
    all images of the batch; slow by nature.

    Options: ``head_fusion`` (as ``attention_rollout``), ``flow_limit`` (None: the module's
    :data:`FLOW_LIMIT`; the largest ``tokens x layers`` taken, larger problems are refused),
    ``size``.
    """

    uses_target = False  # class-agnostic: the same map whatever the class

    options: ClassVar[dict[str, Any]] = {"head_fusion": "mean", "flow_limit": None, "size": None}

    def check_options(self, request: Request) -> None:
        choice_option(request.options, "head_fusion", HEAD_FUSIONS)
        limit = request.options["flow_limit"]
        if limit is not None:
            positive_int(limit, "option `flow_limit` (None or an integer)")
        _maximum_flow()

    def check_size(self, request: Request, vit: _ViT) -> None:
        limit = request.options["flow_limit"]
        limit = FLOW_LIMIT if limit is None else int(limit)
        gh, gw = vit.grid
        tokens, layers = vit.prefix + gh * gw, len(vit.attentions)
        if tokens * layers > limit:
            raise InvalidInput(
                f"attention_flow on {tokens} tokens x {layers} layers = {tokens * layers} is "
                f"over the limit of {limit} (tokens x layers): it would solve {gh * gw} "
                f"maximum-flow problems of {tokens * tokens * (layers - 1) + tokens} edges per "
                "image, which takes too long; use attention_rollout, smaller images, or raise "
                "the option `flow_limit`"
            )

    def relevance(
        self, request: Request, images: Tensor, target: Tensor | None, vit: _ViT
    ) -> tuple[Tensor, Tensor, Tensor]:
        how = request.options["head_fusion"]
        run = _forward(request, images, target, vit, lambda a: fuse_heads(a, how), False, self.name)
        mats = residual_attention(torch.stack(run.values))
        flows = flow_values(mats, vit.prefix)  # [b, patches] on the CPU
        row = torch.cat([flows.new_zeros(flows.shape[0], vit.prefix), flows], dim=1)
        return row.to(images.device), run.logits, run.targets


@register("attention_gradcam")
class AttentionGradCAM(_Attention):
    """Gradient-weighted attention rollout (Chefer, Gur & Wolf, 2021): ``R = I``, then
    ``R += mean_heads(relu(dy/dA_l ⊙ A_l)) @ R`` for every layer, ``y`` the target's logit; the
    class token's row over the patches (see the module doc).

    Options: ``size``.
    """

    needs_gradients = True

    def relevance(
        self, request: Request, images: Tensor, target: Tensor | None, vit: _ViT
    ) -> tuple[Tensor, Tensor, Tensor]:
        run = _forward(request, images, target, vit, lambda a: a, True, self.name)
        with torch.enable_grad():
            scores = run.logits.gather(1, run.targets[:, None]).sum()
            grads = torch.autograd.grad(scores, run.values, allow_unused=True)
        mats = [
            torch.zeros_like(a, dtype=torch.float32).mean(dim=1)
            if g is None
            else (g.float() * a.detach().float()).clamp_min(0).mean(dim=1)
            for a, g in zip(run.values, grads, strict=True)
        ]
        return gradcam_row(mats), run.logits.detach(), run.targets
