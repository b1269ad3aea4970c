"""How a model's forwards run: memory format, precision, forward batch and a compiled variant.

A :class:`ForwardPath` is chosen per model (measured by :func:`xai_serve.tune`, or the plain
default) and every explainer runs its model forwards through :func:`forward_logits` with it:

* ``channels_last``: the model's weights are channels_last and every 4-D input is made
  channels_last before the forward (exact same maths; on CPUs and GPUs most CNNs run faster).
* ``precision``: ``"fp32"``, ``"bf16"`` or ``"fp16"``, the autocast dtype that a method's
  ``amp="auto"`` (the default) resolves to.
* ``batch_size``: inputs per no-grad forward when the request gives no ``batch_size``;
  ``grad_batch_size`` the same for forwards that are differentiated.
* ``compiled``: a ``torch.compile``-d version of the model for no-grad forwards of exactly
  ``batch_size`` inputs at this precision (used for full chunks; other sizes run eagerly).
* ``linear``: ``"aten"`` or ``"onednn"``: the latter runs no-grad forwards on ``runner``, the
  model's twin whose linear layers compute on oneDNN's packed weights (exact fp32 maths; see
  :mod:`xai_serve.explainers.onednn`), and the differentiated forwards of the methods that put
  no hooks on the model (saliency, integrated gradients, SmoothGrad; the CAM and attention
  methods put theirs on the twin's modules).

:func:`remember` ties a path to a model object (weakly), so that :func:`xai_serve.explain`
finds the path that :func:`xai_serve.tune` chose; :func:`path_of` returns it, or the default
path of an untuned model (channels_last exactly when the model's weights already are).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from xai_serve.errors import InvalidInput

__all__ = [
    "PRECISIONS",
    "ForwardPath",
    "autocast",
    "forward_logits",
    "is_channels_last_model",
    "path_of",
    "precision_dtype",
    "remember",
]

PRECISIONS: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
"""Precision names and their autocast dtype (None: no autocast, float32)."""


def precision_dtype(name: str) -> torch.dtype | None:
    try:
        return PRECISIONS[name]
    except KeyError:
        raise InvalidInput(
            f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}"
        ) from None


@dataclass(frozen=True)
class ForwardPath:
    """How forwards of one model run (see the module doc).

    Attributes:
        channels_last: inputs (and the model's weights) in ``torch.channels_last``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``: what ``amp="auto"`` resolves to.
        batch_size: inputs per no-grad forward when the request gives none (None: the
            method's own default).
        grad_batch_size: inputs per differentiated forward when the request gives none.
        images_per_s: measured throughput of no-grad forwards on this path at ``batch_size``
            (None: not measured). Methods with a time budget plan their first round with it.
        grad_images_per_s: the same for forward + backward at ``grad_batch_size``.
        compiled: a compiled callable for no-grad forwards of exactly ``batch_size`` inputs at
            ``precision`` (None: eager only).
        linear: ``"aten"`` (the model's own linear layers) or ``"onednn"`` (no-grad forwards,
            the attention and CAM methods, saliency, integrated gradients and SmoothGrad run
            on ``runner``).
        runner: the model's oneDNN twin when ``linear == "onednn"``, else None.
        report: what the tuning measured (a :class:`xai_serve.models.tuning.TuneReport`), or
            None.
    """

    channels_last: bool = False
    precision: str = "fp32"
    batch_size: int | None = None
    grad_batch_size: int | None = None
    images_per_s: float | None = None
    grad_images_per_s: float | None = None
    compiled: Callable[[Tensor], Tensor] | None = field(default=None, compare=False, repr=False)
    linear: str = "aten"
    runner: nn.Module | None = field(default=None, compare=False, repr=False)
    report: Any = field(default=None, compare=False, repr=False)

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of :attr:`precision` (None for fp32)."""
        return PRECISIONS[self.precision]

    def with_(self, **changes: Any) -> ForwardPath:
        return replace(self, **changes)

    def describe(self) -> str:
        """One line: ``channels_last fp32 onednn-linear batch 16 compiled``."""
        parts = ["channels_last" if self.channels_last else "contiguous", self.precision]
        if self.linear != "aten":
            parts.append(f"{self.linear}-linear")
        if self.batch_size is not None:
            parts.append(f"batch {self.batch_size}")
        if self.compiled is not None:
            parts.append("compiled")
        return " ".join(parts)


_PATHS: weakref.WeakKeyDictionary[nn.Module, ForwardPath] = weakref.WeakKeyDictionary()


def is_channels_last_model(model: nn.Module) -> bool:
    """Whether the model's first 4-D parameter (its first convolution) is channels_last."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def remember(model: nn.Module, path: ForwardPath) -> None:
    """Make ``path`` the path :func:`xai_serve.explain` uses for ``model`` (held weakly)."""
    _PATHS[model] = path


def path_of(model: nn.Module) -> ForwardPath:
    """The remembered path of ``model``, else the default: fp32, the methods' own batch sizes,
    channels_last exactly when the model's weights are."""
    try:
        found = _PATHS.get(model)
    except TypeError:  # a module that cannot be weakly referenced
        found = None
    if found is not None:
        return found
    return ForwardPath(channels_last=is_channels_last_model(model))


def autocast(device: torch.device, amp: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` to ``amp`` on ``device``'s type, or a no-op for None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def to_path_layout(x: Tensor, path: ForwardPath) -> Tensor:
    """``x`` in the path's memory format (a no-op when it already is)."""
    if path.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def forward_logits(
    model: nn.Module,
    x: Tensor,
    amp: torch.dtype | None,
    family: str,
    path: ForwardPath | None = None,
    *,
    grad_on_runner: bool = False,
) -> Tensor:
    """``model(x)`` on ``path`` (layout, autocast to ``amp``, the compiled variant for a full
    no-grad chunk, else the oneDNN twin for a no-grad forward, or for any forward with
    ``grad_on_runner``: a caller that differentiates through the forward without hooks on the
    model's modules), checked to be ``[N, classes]`` logits; ``family`` names the methods in
    the error message."""
    if path is not None:
        x = to_path_layout(x, path)
    compiled = (
        path is not None
        and path.compiled is not None
        and not torch.is_grad_enabled()
        and amp == path.amp
        and x.shape[0] == path.batch_size
    )
    run: Callable[[Tensor], Any] = model
    if compiled:
        run = path.compiled  # type: ignore[union-attr,assignment]
    elif (
        path is not None
        and path.runner is not None
        and (grad_on_runner or not torch.is_grad_enabled())
    ):
        run = path.runner
    with autocast(x.device, amp):
        out = run(x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InvalidInput(
            f"{family} methods need a model that maps Tensor[N, C, H, W] to "
            f"Tensor[N, classes] logits; for N = {x.shape[0]} it returned {got}"
        )
    return out
