"""An exact fp32 forward path whose linear layers run on oneDNN with prepacked weights.

ATen runs an fp32 ``nn.Linear`` on the CPU through its BLAS (MKL in the PyTorch wheels). On some
CPUs that BLAS is far from the machine's limit while oneDNN, which PyTorch also ships (it runs
the convolutions), is not: on the AMD EPYC this project benchmarks on, a ViT-S/16 forward of 8
images ran 1.85x faster on the twin below
(``benchmarks/results/2026-12-07-cpu-2core-attention-onednn.md``). The maths is the same
(fp32 products and sums, in another order), so this is an exact path like ``channels_last``;
:func:`xai_serve.tune` measures it per model and keeps it only where it is faster.

:func:`onednn_twin` builds a *twin* of a model: a copy of its modules that shares every
parameter and buffer with it (no weights are copied, the model itself is never changed), in
which

* each ``nn.Linear`` is a :class:`PackedLinear`: the same weight and bias, plus the weight
  packed in oneDNN's layout (and, once a gradient is asked for, the transposed weight too, for
  the input gradient). The packing is redone when the weight changes (its storage or version
  counter), so a twin never computes with stale weights;
* each torchvision ``nn.MultiheadAttention`` computes self-attention with its projections
  packed the same way and ``scaled_dot_product_attention`` (the module's own fast path calls a
  fused kernel that runs its projections on the BLAS).

Where the packed kernel does not apply -- an input that is not an fp32 CPU tensor, autocast to a
reduced precision -- a layer computes exactly what the original layer computes. Gradients flow
to the *inputs* of packed layers (their backward is a packed product too), never to the
weights, whatever their ``requires_grad``: the twin serves explanations, which differentiate
with respect to inputs and intermediate values only. The twin's forward hooks are the model's
at the time it was built; hooks registered on the model later do not run in it.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "PackedLinear",
    "first_query_attention",
    "is_plain_linear",
    "keep_projections",
    "onednn_available",
    "onednn_twin",
    "self_attention_heads",
]


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's packed fp32 linear (a CPU build with mkldnn)."""
    try:
        ops = torch.ops.mkldnn
        return bool(
            torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")
        )
    except (AttributeError, RuntimeError):
        return False


def _pack(weight: Tensor) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def _packed_product(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _Packs:
    """A weight's packed copies (``weight`` and ``weight.T``), redone when the weight changes."""

    def __init__(self, weight: Tensor) -> None:
        self.weight = weight
        self._key: tuple[int, int] | None = None
        self._forward: Tensor | None = None
        self._backward: Tensor | None = None

    def _fresh(self) -> None:
        w = self.weight
        key = (w.data_ptr(), w._version)
        if key != self._key:
            self._key, self._forward, self._backward = key, None, None

    def forward(self) -> Tensor:
        self._fresh()
        if self._forward is None:
            self._forward = _pack(self.weight)
        return self._forward

    def backward(self) -> Tensor:
        self._fresh()
        if self._backward is None:
            self._backward = _pack(self.weight.detach().t().contiguous())
        return self._backward


class _RowPacks(_Packs):
    """The packed copies of rows ``[start, stop)`` of an attention module's ``in_proj_weight``
    (its key and value projections, say), read from the module at every call."""

    def __init__(self, mha: nn.MultiheadAttention, start: int, stop: int) -> None:
        self.mha, self.start, self.stop = mha, start, stop
        self._key = None
        self._forward = None
        self._backward = None

    @property  # type: ignore[override]
    def weight(self) -> Tensor:
        return self.mha.in_proj_weight[self.start : self.stop]


class _PackedFunction(torch.autograd.Function):
    """``x @ W.T + b`` on packed weights; the gradient of ``x`` only (``x @ W`` packed too)."""

    @staticmethod
    def forward(x: Tensor, packs: _Packs, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        bias = None if bias is None else bias.detach()
        return _packed_product(x.contiguous(), packs.forward(), bias)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.packs = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return _packed_product(grad.contiguous(), ctx.packs.backward(), None), None, None


def _packed_applies(x: Tensor, weight: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    if x.dim() < 2 or x.shape[-1] != weight.shape[1] or x.numel() == 0:
        return False
    # under autocast to a reduced precision, the original layer's computation
    return not torch.is_autocast_enabled("cpu")


def linear(x: Tensor, packs: _Packs, bias: Tensor | None) -> Tensor:
    """``F.linear(x, packs.weight, bias)``, on the packed weight where that applies."""
    if not _packed_applies(x, packs.weight):
        return F.linear(x, packs.weight, bias)
    return _PackedFunction.apply(x, packs, bias)


class PackedLinear(nn.Module):
    """An ``nn.Linear`` (its very weight and bias Parameters) computed on oneDNN's packed
    weight (see the module doc)."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.weight = source.weight
        self.bias = source.bias
        self._packs = _Packs(source.weight)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self._packs, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, onednn"


class _PackedSelfAttention(nn.MultiheadAttention):
    """A torchvision ``nn.MultiheadAttention`` whose unmasked, batch-first self-attention
    without returned weights (what a ViT block asks for) runs on packed projections and
    ``scaled_dot_product_attention``; every other call is the original module's."""

    _in_packs: _Packs

    def forward(  # type: ignore[override]
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        plain = (
            query is key
            and key is value
            and self.batch_first
            and query.dim() == 3
            and key_padding_mask is None
            and attn_mask is None
            and not is_causal
            and not need_weights
            and (not self.training or self.dropout == 0.0)
            and self._qkv_same_embed_dim
            and self.bias_k is None
            and not self.add_zero_attn
        )
        if not plain:
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        b, n, d = query.shape
        qkv = _in_projection(self, query)
        tap = getattr(self, "_qkv_tap", None)
        if tap is not None:  # see keep_projections
            tap.append(qkv)
        out = F.scaled_dot_product_attention(*_split_heads(qkv, self.num_heads))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


def _in_projection(mha: nn.MultiheadAttention, x: Tensor) -> Tensor:
    """``[B, N, 3 D]``: the query, key and value projections of batch-first ``x`` ``[B, N, D]``,
    packed when ``mha`` is a twin's."""
    if isinstance(mha, _PackedSelfAttention):
        return linear(x, mha._in_packs, mha.in_proj_bias)
    return F.linear(x, mha.in_proj_weight, mha.in_proj_bias)


def _split_heads(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    b, n, d3 = qkv.shape
    d = d3 // 3
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def self_attention_heads(mha: nn.MultiheadAttention, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The query, key and value heads ``[B, heads, N, D / heads]`` of a torchvision
    ``nn.MultiheadAttention`` for self-attention over batch-first ``x`` ``[B, N, D]``: its
    input projection, packed when ``mha`` is a twin's."""
    return _split_heads(_in_projection(mha, x), mha.num_heads)


@contextlib.contextmanager
def keep_projections(mha: nn.MultiheadAttention) -> Iterator[list[Tensor]]:
    """While open, a twin's attention module (else nothing) appends to the list it yields the
    packed input projection ``[B, N, 3 D]`` of each self-attention it computes, which
    :func:`first_query_attention` can then reuse."""
    kept: list[Tensor] = []
    if not isinstance(mha, _PackedSelfAttention):
        yield kept
        return
    mha._qkv_tap = kept  # type: ignore[attr-defined]
    try:
        yield kept
    finally:
        del mha._qkv_tap  # type: ignore[attr-defined]


class _Projected(_PackedFunction):
    """Keys and values the forward projected already, as a function of the input ``x`` they
    were projected from: no product forward; the backward is the projection's (that of
    :class:`_PackedFunction`)."""

    @staticmethod
    def forward(x: Tensor, packs: _Packs, kv: Tensor) -> Tensor:  # type: ignore[override]
        return kv.clone()


def first_query_attention(
    mha: nn.MultiheadAttention, x: Tensor, kept: list[Tensor] | None = None
) -> Tensor:
    """Row 0 of a torchvision ``nn.MultiheadAttention``'s self-attention output over
    batch-first ``x`` ``[B, N, D]`` (``mha(x, x, x)[0][:, :1]``), as ``[B, 1, D]``: the first
    token's query against every key and value: the keys and values projected for every
    token (on packed weights when ``mha`` is a twin's), the query for the first only."""
    plain = (
        mha.batch_first
        and mha._qkv_same_embed_dim
        and mha.in_proj_weight is not None
        and mha.bias_k is None
        and not mha.add_zero_attn
        and (not mha.training or mha.dropout == 0.0)
        and x.dim() == 3
    )
    if not plain:
        return mha(x[:, :1], x, x, need_weights=False)[0]
    b, n, d = x.shape
    heads = mha.num_heads
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    q = F.linear(x[:, :1], w[:d], None if bias is None else bias[:d])
    kv_bias = None if bias is None else bias[d:]
    if isinstance(mha, _PackedSelfAttention):
        packs = getattr(mha, "_kv_packs", None)
        if packs is None:
            packs = mha._kv_packs = _RowPacks(mha, d, 3 * d)  # type: ignore[attr-defined]
        qkv = _kept_projection(kept, x)
        if qkv is not None and _packed_applies(x, packs.weight):
            kv = _Projected.apply(x, packs, qkv[..., d:])
        else:
            kv = linear(x, packs, kv_bias)
    else:
        kv = F.linear(x, w[d:], kv_bias)
    q = q.view(b, 1, heads, d // heads).transpose(1, 2)
    k, v = kv.view(b, n, 2, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, 1, D / heads]
    return mha.out_proj(out.transpose(1, 2).reshape(b, 1, d))


def _kept_projection(kept: list[Tensor] | None, x: Tensor) -> Tensor | None:
    """The one ``[B, N, 3 D]`` input projection kept by :func:`keep_projections`, when it is
    of ``x``'s shape and dtype (None otherwise)."""
    if not kept or len(kept) != 1:
        return None
    qkv = kept[0]
    b, n, d = x.shape
    return qkv if qkv.shape == (b, n, 3 * d) and qkv.dtype == x.dtype else None


def is_plain_linear(m: object) -> bool:
    """``nn.Linear`` itself or torchvision's ``NonDynamicallyQuantizableLinear``: ``x W^T + b``
    with ``W`` its weight Parameter (not other subclasses, whose forward or weight may
    differ)."""
    return type(m) is nn.Linear or type(m).__name__ == "NonDynamicallyQuantizableLinear"


def onednn_twin(model: nn.Module) -> nn.Module | None:
    """A twin of ``model`` (see the module doc) whose linear layers run on oneDNN, or None when
    there is nothing to pack (no plain ``nn.Linear`` on the CPU in fp32), the model cannot be
    copied (a TorchScript module, say), or this PyTorch lacks oneDNN."""
    if not onednn_available() or isinstance(model, torch.jit.ScriptModule):
        return None
    if not any(
        is_plain_linear(m) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
        for m in model.modules()
    ):
        return None
    shared: dict[int, Any] = {id(t): t for t in model.parameters()}
    shared.update({id(t): t for t in model.buffers()})
    try:
        twin = copy.deepcopy(model, shared)
    except Exception:  # modules holding things that do not copy
        return None
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if is_plain_linear(child) and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))  # type: ignore[arg-type]
    for m in twin.modules():
        if type(m) is nn.MultiheadAttention and m.in_proj_weight is not None:
            m.__class__ = _PackedSelfAttention
            m._in_packs = _Packs(m.in_proj_weight)  # type: ignore[attr-defined]
    return twin.train(model.training)
