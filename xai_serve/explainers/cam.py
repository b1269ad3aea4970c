"""Class-activation-map (CAM) methods: Grad-CAM and its family, batched and on the device.

Every method looks at one layer's activations ``A`` (``Tensor[B, K, h, w]``), derives channel
(or per-activation) weights, and hands both to :func:`xai_serve.ops.cam_fuse`, which does the
weighted sum, ReLU, upsampling to the output size and per-image min-max normalisation.

========== =================================================================================
method     weights (``G`` = gradient of the target's logit with respect to ``A``)
========== =================================================================================
gradcam    ``mean_hw(G)``
gradcam++  ``sum_hw(relu(G) * a)``, ``a = G^2 / (2 G^2 + sum_hw(A) G^3 + 1e-6)`` (0 where G = 0)
xgradcam   ``sum_hw(G * A) / (sum_hw(A) + 1e-7)``
hirescam   ``G`` elementwise
layercam   ``relu(G)`` elementwise
eigencam   first principal direction of the centred activations (no gradient, no target)
scorecam   softmax over channels of the target's logit on the input masked by each channel
========== =================================================================================

The formulas (constants included) are those of pytorch-grad-cam 1.5.7, and the tests hold the
maps to it.

How a gradient method runs, for the whole batch at once:

1. One forward under ``torch.no_grad()``. A forward hook on the target layer replaces the
   layer's output by a detached leaf ``A`` (it returns a clone of ``A``, so that an in-place
   op right after the layer, such as densenet's ReLU, does not touch the leaf; the clone is in
   NCHW order, the layout the gradients of global pooling come back in) and switches
   autograd on for the rest of the forward: only the tail of the network, from the layer to
   the logits, builds a graph. The caller's grad mode is restored afterwards, also on errors.
2. One ``torch.autograd.grad(scores.sum(), A)``, where ``scores[b]`` is image ``b``'s target
   logit: the images do not interact, so this gives every image's own gradient. No parameter
   gradient is computed or stored. When the logits are the untouched output of a final
   ``nn.Linear`` (one target per image, no autocast), the backward starts at that layer's
   input instead, from the rows ``W[target]`` that its backward would compute (see
   ``_HeadTap``). On torchvision's ``VisionTransformer`` at the last block's ``ln_1`` (the
   default layer), the forward runs without a graph and the gradient comes from the class
   token's path alone, recomputed from the layer's output (see ``_ClassTokenTail``).

The forward runs on the request path's oneDNN twin when it has one (the same weights; the
layer is the twin's module of the same name).

Layer: the request's ``layer`` if given. Otherwise torchvision's ``VisionTransformer``
(``encoder.layers[-1].ln_1``) and ``SwinTransformer`` (``features[-1]``) get their usual layer,
and any other model the last module, in the order forward hooks fire (completion order), whose
output is a 4-D tensor with more than one spatial position. That search happens during the
explanation's own forward (a hook on every module; each candidate becomes the leaf in turn, so
the one that fires last is the one differentiated) and its result is remembered per model and
input shape, so later calls hook the one layer only.

Layouts: a layer output must become ``[B, K, h, w]``. ``[B, 1 + h*w, D]`` token outputs (ViT:
the class token is dropped) and Swin's channels-last ``[B, h, w, D]`` are reshaped
automatically; the ``reshape`` option (a callable from the layer's output to ``[B, K, h, w]``)
covers other models. Gradients are taken with respect to the output in its own layout and then
reshaped the same way.

Hooks are added to the model for the duration of one call: do not explain with the same model
object from two threads at once.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve import ops
from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import positive_int
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    check_target_range,
    class_scores,
    per_target_maps,
    register,
    target_gradients,
    target_matrix,
)
from xai_serve.explainers.onednn import (
    PackedLinear,
    first_query_attention,
    is_plain_linear,
    keep_projections,
)
from xai_serve.ops import check_size

__all__ = [
    "ClassActivationMap",
    "EigenCAM",
    "GradCAM",
    "GradCAMPlusPlus",
    "HiResCAM",
    "LayerCAM",
    "ScoreCAM",
    "XGradCAM",
    "find_layer",
    "gradcam_map",
]

Reshape = Callable[[Tensor], Tensor]

# Options every CAM method takes.
_COMMON_OPTIONS: dict[str, Any] = {"size": None, "reshape": None}

# The automatically found layer, per model (weakly held) and input signature (C, H, W, dtype).
_FOUND_LAYERS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], str]] = (
    weakref.WeakKeyDictionary()
)

# The model's final nn.Linear (the one whose output is the logits), per model (weakly held):
# its name, or None when the model has none (see _HeadTap).
_HEADS: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()

_SCORECAM_BATCH = 32


# --------------------------------------------------------------------------------------------
# Layer choice and layouts
# --------------------------------------------------------------------------------------------


def _torchvision_family(model: nn.Module) -> str | None:
    """``"vit"`` / ``"swin"`` for torchvision's transformer classifiers, else None.

    torchvision is not imported for this: a model can only be a torchvision model if the
    caller has imported torchvision already.
    """
    tv = sys.modules.get("torchvision.models")
    if tv is None:
        return None
    vit = getattr(tv, "VisionTransformer", None)
    swin = getattr(tv, "SwinTransformer", None)
    if vit is not None and isinstance(model, vit):
        return "vit"
    if swin is not None and isinstance(model, swin):
        return "swin"
    return None


def _module_name(model: nn.Module, module: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise InvalidInput("the default layer is not part of the model")  # pragma: no cover


def _family_default_layer(model: nn.Module, family: str | None) -> nn.Module | None:
    if family == "vit":
        return model.encoder.layers[-1].ln_1  # type: ignore[union-attr,index]
    if family == "swin":
        return model.features[-1]  # type: ignore[index]
    return None


def is_spatial(t: object) -> bool:
    """A floating-point ``[B, K, h, w]`` tensor with more than one spatial position."""
    return (
        isinstance(t, Tensor)
        and t.is_floating_point()
        and t.dim() == 4
        and t.shape[2] * t.shape[3] > 1
    )


def _to_channels_first(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


def _tokens_to_grid(prefix: int, h: int, w: int) -> Reshape:
    """``[B, prefix + h*w, D]`` tokens (row-major grid after ``prefix`` extra tokens) to
    ``[B, D, h, w]``."""

    def reshape(x: Tensor) -> Tensor:
        grid = x[:, prefix:, :].reshape(x.shape[0], h, w, x.shape[2])
        return grid.permute(0, 3, 1, 2).contiguous()

    return reshape


def _layout(
    model: nn.Module, family: str | None, name: str, out: Tensor, images: Tensor
) -> Reshape | None:
    """How to bring the output of layer ``name`` to ``[B, K, h, w]`` (None: it already is)."""
    if out.dim() == 4:
        # Inside torchvision's Swin everything after the patch-embedding conv is channels-last.
        channels_last = family == "swin" and (
            (name.startswith("features.") and name != "features.0.0") or name == "norm"
        )
        return _to_channels_first if channels_last else None
    if out.dim() == 3 and out.shape[1] >= 1:
        n = out.shape[1]
        if family == "vit":
            p = model.patch_size  # type: ignore[union-attr]
            h, w = images.shape[2] // p, images.shape[3] // p
        else:
            side = math.isqrt(n)
            side = side if side * side == n else math.isqrt(n - 1)
            h = w = side
        if n == h * w + 1:  # a class token first
            return _tokens_to_grid(1, h, w)
        if n == h * w and h * w > 0:
            return _tokens_to_grid(0, h, w)
    raise InvalidInput(
        f"layer {name!r} outputs shape {tuple(out.shape)}, which is not [B, K, h, w] nor "
        "[B, (1 +) h*w, D] tokens; pass the option `reshape` (a callable mapping the layer's "
        "output to [B, K, h, w]) or choose another `layer`"
    )


def _reshape_for(request: Request, family: str | None, name: str, raw: Tensor) -> Reshape | None:
    """The request's ``reshape`` option (checked), else the recognised layout of layer
    ``name``'s output ``raw`` (None: already ``[B, K, h, w]``)."""
    reshape = request.options.get("reshape")
    if reshape is None:
        return _layout(request.model, family, name, raw, request.images)
    if not callable(reshape):
        raise InvalidInput(f"the option `reshape` must be a callable, got {type(reshape).__name__}")
    return reshape


def _apply_reshape(reshape: Reshape | None, x: Tensor, batch: int, what: str) -> Tensor:
    if reshape is None:
        return x
    y = reshape(x)
    if not isinstance(y, Tensor) or y.dim() != 4 or y.shape[0] != batch or y.shape[1] < 1:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise InvalidInput(
            f"`reshape` must map the layer's {what} to Tensor[B, K, h, w] with B = {batch}, "
            f"got {shape}"
        )
    return y


# --------------------------------------------------------------------------------------------
# The one forward (and backward)
# --------------------------------------------------------------------------------------------


class _Probe:
    """Forward hooks that capture a layer's output during a no-grad forward.

    With ``leaf=True`` the captured output is a detached leaf that requires grad, and autograd is
    switched on from there to the end of the forward. With ``spatial_only=True`` (the automatic
    search) only 4-D spatial outputs count and every later one replaces the earlier: the last
    one wins.
    """

    def __init__(self, leaf: bool, spatial_only: bool) -> None:
        self.leaf = leaf
        self.spatial_only = spatial_only
        self.name: str | None = None
        self.input: Any = None  # the captured layer's first argument
        self.value: Tensor | None = None
        self.other_output: str | None = None

    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], Tensor | None]:
        def capture(module: nn.Module, args: Any, output: Any) -> Tensor | None:
            if self.spatial_only:
                if not is_spatial(output):
                    return None
            elif not isinstance(output, Tensor) or not output.is_floating_point():
                self.other_output = type(output).__name__
                return None
            self.name = name
            self.input = args[0] if args else None
            if self.leaf:
                a = output.detach().requires_grad_(True)
                torch.set_grad_enabled(True)
                self.value = a
                # A clone, not the leaf: the next op may be in place (densenet's ReLU). In
                # NCHW order: global pooling's backward hands back NCHW gradients whatever the
                # forward's layout, and a tail run channels_last (a channels_last model's last
                # convolution) would then meet them in mixed layouts, which are slow paths of
                # the CPU kernels (BatchNorm's backward several times slower at EfficientNet-
                # Lite0's last layer); a convolution later in the tail goes back to the weights'
                # layout by itself.
                return a.clone(memory_format=torch.contiguous_format)
            self.value = output
            return output.clone()  # keeps the captured value safe from in-place ops

        return capture


@dataclass
class _Capture:
    """What one explanation forward (and backward) produced."""

    logits: Tensor  # [B, classes]; carries the tail's graph until detached
    # [B] int64; [B, T] with several targets or a foil: activations and gradients are then
    # those of the B * T copies, image-major (copy t of image i explains targets[i, t])
    targets: Tensor
    layer_name: str
    activations: Tensor  # [B, K, h, w] (or [B * T, ...]), detached
    gradients: Tensor | None  # d(target logit)/d(activations), as activations; None if not asked


def _plain_linear(module: object) -> bool:
    """A plain linear layer (:func:`is_plain_linear`) or a oneDNN twin's :class:`PackedLinear`
    (the same product on a packed copy of ``W``)."""
    return type(module) is PackedLinear or is_plain_linear(module)


class _HeadTap:
    """Finds the model's final ``nn.Linear`` ``y = z W^T + b``, so that a target logit's
    gradient needs no backward through it: ``d y[i, c] / d z[i] = W[c]``, the row the
    autograd product of a one-hot gradient with ``W`` would give, bit for bit, without reading
    all of ``W`` (at EfficientNet-Lite0's head that read was a quarter of the backward).

    Hooks every plain ``nn.Linear`` on a model's first gradient forward (one only afterwards,
    remembered in ``_HEADS``) and records its input and output. The shortcut holds only when
    that output *is* the logits the model returned, unchanged since (its version counter), and
    no dtype cast happened in between (autocast): :meth:`input_and_weight` checks all three."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.seen: dict[str, tuple[Tensor, Tensor, int]] = {}

    def candidates(self) -> dict[str, nn.Module]:
        if self.model in _HEADS:
            name = _HEADS[self.model]
            if name is None:
                return {}
            try:
                module = self.model.get_submodule(name)
            except AttributeError:
                module = None
            if _plain_linear(module):
                return {name: module}
            del _HEADS[self.model]  # the model was changed since: search again
        return {n: m for n, m in self.model.named_modules() if _plain_linear(m)}

    def hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if args and isinstance(args[0], Tensor) and isinstance(output, Tensor):
                self.seen[name] = (args[0], output, output._version)

        return record

    def input_and_weight(self, out: Any) -> tuple[Tensor, Tensor] | None:
        """``(z, W)`` of the linear layer whose output is ``out``, else None (remembered)."""
        found = [n for n, (_, y, _) in self.seen.items() if y is out]
        if not found:
            if self.model not in _HEADS:  # every candidate was hooked: the model has none
                _HEADS[self.model] = None
            elif _HEADS[self.model] is not None:  # the remembered one no longer is: search again
                del _HEADS[self.model]
            return None
        name = found[-1]
        _HEADS[self.model] = name
        z, y, version = self.seen[name]
        weight = self.model.get_submodule(name).weight
        if (
            y._version != version
            or z.dim() != 2
            or not z.requires_grad
            or not (z.dtype == y.dtype == weight.dtype)
        ):
            return None
        return z, weight


class _ClassTokenTail:
    """The logits of a torchvision ``VisionTransformer`` computed from its last block's ``ln_1``
    output ``a`` along the class token's path only.

    The head reads the class token alone, and after the last block's attention nothing mixes
    tokens: so ``d logits / d a`` needs the attention of the class token's query over every
    token's keys and values, then that one token through the residual, the MLP, the final
    norm and the head; not the whole block for every token, which is what autograd runs from
    the model's own tail (about a block's forward again: 1.11x the forward on ViT-S/16).

    Used only for the stock forwards (the classes' own ``forward``), without hooks on the
    modules it re-runs, and checked on every call: the logits it computes must equal the
    forward's to float rounding, else the caller takes the model's own tail."""

    def __init__(self, vit: nn.Module, block: nn.Module) -> None:
        self.vit = vit
        self.block = block

    @staticmethod
    def find(net: nn.Module, layer: nn.Module | None) -> _ClassTokenTail | None:
        tv = sys.modules.get("torchvision.models.vision_transformer")
        if tv is None or layer is None or not isinstance(net, tv.VisionTransformer):
            return None
        encoder = net.encoder
        blocks = list(encoder.layers.children())  # type: ignore[union-attr]
        if not blocks or layer is not getattr(blocks[-1], "ln_1", None):
            return None
        block = blocks[-1]
        stock = (
            type(net).forward is tv.VisionTransformer.forward
            and type(encoder).forward is tv.Encoder.forward
            and type(block).forward is tv.EncoderBlock.forward
            and isinstance(block.self_attention, nn.MultiheadAttention)
            and block.self_attention.batch_first
        )
        if not stock:
            return None
        rerun = [net, encoder, encoder.ln, *block.modules(), *net.heads.modules()]
        hooked = (
            any(m._forward_hooks or m._forward_pre_hooks for m in rerun if m is not layer)
            or _global_module_hooks()
        )
        return None if hooked else _ClassTokenTail(net, block)

    def logits(self, block_input: Tensor, a: Tensor, kept: list[Tensor] | None = None) -> Tensor:
        block = self.block
        attended = first_query_attention(block.self_attention, a, kept)
        x = block.dropout(attended) + block_input[:, :1]
        x = x + block.mlp(block.ln_2(x))
        return self.vit.heads(self.vit.encoder.ln(x)[:, 0])


def _global_module_hooks() -> bool:
    """Whether forward hooks are registered for every module (``register_module_forward_hook``)."""
    from torch.nn.modules import module as torch_module

    return bool(
        getattr(torch_module, "_global_forward_hooks", None)
        or getattr(torch_module, "_global_forward_pre_hooks", None)
    )


def _on_runner(request: Request, layer: nn.Module | None) -> tuple[nn.Module, nn.Module | None]:
    """The module the forward runs and its module for ``layer``: the path's oneDNN twin when
    it has one (the same weights and maths, faster linear layers; its modules sit where the
    model's do), else the model."""
    model, runner = request.model, request.path.runner
    if runner is None:
        return model, layer
    if layer is None:
        return runner, None
    for name, m in model.named_modules():
        if m is layer:
            try:
                return runner, runner.get_submodule(name)
            except AttributeError:
                break
    return model, layer  # not found in the twin (the model changed since it was built)


def _forward(
    model: nn.Module,
    images: Tensor,
    layer: nn.Module | None,
    leaf: bool,
    head: _HeadTap | None = None,
) -> tuple[Any, _Probe]:
    """One forward under no_grad with a probe on ``layer`` (or on every module if None), and
    ``head``'s hooks."""
    probe = _Probe(leaf=leaf, spatial_only=layer is None)
    if layer is not None:
        handles = [layer.register_forward_hook(probe.hook(""))]
    else:
        handles = [m.register_forward_hook(probe.hook(n)) for n, m in model.named_modules() if n]
    grad_mode = torch.is_grad_enabled()
    try:
        if head is not None:
            for n, m in head.candidates().items():
                handles.append(m.register_forward_hook(head.hook(n)))
        with torch.no_grad():
            out = model(images)
    finally:
        for h in handles:
            h.remove()
        torch.set_grad_enabled(grad_mode)
    return out, probe


def _run(request: Request, with_gradients: bool) -> _Capture:
    """The explanation's forward, the targets and (if asked) the gradient at the layer."""
    model, images = request.model, request.images
    if with_gradients and torch.is_inference_mode_enabled():
        raise InvalidInput(
            "gradient CAM methods cannot run under torch.inference_mode(); "
            "call them outside it (they build no graph for the body of the network anyway)"
        )
    family = _torchvision_family(model)
    layer, name = request.layer, request.layer_name
    if layer is None:
        layer = _family_default_layer(model, family)
        if layer is not None:
            name = _module_name(model, layer)
    cache_key = (tuple(images.shape[1:]), images.dtype)
    remembered = False
    if layer is None:
        found = _FOUND_LAYERS.get(model, {}).get(cache_key)
        if found is not None:
            try:
                layer, name, remembered = model.get_submodule(found), found, True
            except AttributeError:  # the model was changed since
                _FOUND_LAYERS.get(model, {}).pop(cache_key, None)

    net, layer = _on_runner(request, layer)
    tail = _ClassTokenTail.find(net, layer) if with_gradients else None
    if tail is not None:
        with keep_projections(tail.block.self_attention) as kept:
            out, probe = _forward(net, images, layer, leaf=False)
        graph = _class_token_graph(tail, out, probe, kept)
        if graph is not None:
            assert name is not None
            return _capture(request, family, name, out, *graph, None)
    head = _HeadTap(net) if with_gradients and not request.per_target else None
    out, probe = _forward(net, images, layer, with_gradients, head)
    if probe.value is None and remembered:
        # A remembered layer that no longer runs: search again.
        _FOUND_LAYERS.get(model, {}).pop(cache_key, None)
        layer = None
        head = _HeadTap(net) if with_gradients and not request.per_target else None
        out, probe = _forward(net, images, None, with_gradients, head)
    if probe.value is None:
        if layer is None:
            raise InvalidInput(
                "found no layer with a 4-D [B, K, h, w] output with h*w > 1 in this model; "
                "pass `layer` (and the option `reshape` for token outputs)"
            )
        what = probe.other_output or "nothing"
        raise InvalidInput(
            f"layer {name!r} must output a float tensor during the forward, but gave {what}"
        )
    if layer is None:
        name = probe.name
        assert name is not None
        _FOUND_LAYERS.setdefault(model, {})[cache_key] = name
    assert name is not None
    graph_logits = out if with_gradients else None
    return _capture(request, family, name, out, probe.value, graph_logits, head)


def _class_token_graph(
    tail: _ClassTokenTail, out: Any, probe: _Probe, kept: list[Tensor]
) -> tuple[Tensor, Tensor] | None:
    """``(a, logits)``: the captured ``ln_1`` output as a leaf and the logits that ``tail``
    computes from it with autograd on (reusing the keys and values the forward projected, in
    ``kept``, where a oneDNN twin kept them), when they equal the forward's ``out`` to float
    rounding (else None: the caller runs the model's own tail)."""
    a, block_input = probe.value, probe.input
    if not isinstance(out, Tensor) or a is None or not isinstance(block_input, Tensor):
        return None
    a = a.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = tail.logits(block_input.detach(), a, kept)
    if logits.shape != out.shape or logits.dtype != out.dtype:
        return None
    scale = float(out.detach().abs().amax()) if out.numel() else 0.0
    if not torch.allclose(logits.detach(), out, rtol=1e-4, atol=1e-4 * scale + 1e-6):
        return None
    return a, logits


def _capture(
    request: Request,
    family: str | None,
    name: str,
    out: Any,
    raw: Tensor,
    graph_logits: Tensor | None,
    head: _HeadTap | None,
) -> _Capture:
    """Targets, activations and (when ``graph_logits``, the logits carrying the graph back to
    ``raw``, are given) gradients of the layer output ``raw``, from the forward's ``out``."""
    images = request.images
    batch = images.shape[0]
    _check_logits(out, batch)
    with_gradients = graph_logits is not None
    copies = 1
    if with_gradients and request.per_target:
        targets = target_matrix(request, out.detach())  # [B, T]
        copies = targets.shape[1]
    elif request.target is None:
        targets = out.detach().argmax(dim=1)
    else:
        targets = request.target
        check_target_range(targets, out)

    reshape = _reshape_for(request, family, name, raw)
    activations = _apply_reshape(reshape, raw.detach(), batch, "output")
    if targets.dim() == 2:
        activations = activations.repeat_interleave(copies, 0)

    gradients = None
    if graph_logits is not None:
        grad = None
        shortcut = None
        if head is not None and targets.dim() == 1:
            shortcut = head.input_and_weight(out)
        with torch.enable_grad():  # the caller may be in no_grad: the tail's graph is ours
            if shortcut is not None:  # d logit[i, t_i] / d z[i] = W[t_i]: backward from z
                z, weight = shortcut
                (grad,) = torch.autograd.grad(z, raw, weight.detach()[targets], allow_unused=True)
            else:
                if targets.dim() == 2:
                    scores = class_scores(graph_logits, targets, request.foil)
                else:
                    scores = graph_logits.gather(1, targets[:, None])
                if scores.requires_grad:
                    grad = target_gradients(scores, raw)
        if grad is None:
            raise InvalidInput(
                f"the model's logits do not depend (through autograd) on layer {name!r}; "
                "choose a layer on the path to the output"
            )
        gradients = _apply_reshape(reshape, grad, batch * copies, "gradient")
    return _Capture(
        logits=out.detach(),
        targets=targets,
        layer_name=name,
        activations=activations,
        gradients=gradients,
    )


def _check_logits(out: Any, batch: int) -> None:
    """Raise unless ``out`` is the logits ``Tensor[batch, classes]`` of one forward."""
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != batch:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InvalidInput(
            f"the model must return logits Tensor[B, classes] with B = {batch}, got {shape}"
        )


def find_layer(request: Request) -> tuple[nn.Module, str]:
    """``(module, dotted name)`` of the layer the Grad-CAM family explains for ``request``,
    for a method that runs its own forward (Guided Grad-CAM): the request's ``layer``, else the
    family default (ViT, Swin), else the layer remembered for this model and input signature,
    else the last spatial layer of one no-grad forward of the first image (then remembered, as
    the CAM methods' own search does)."""
    model, images = request.model, request.images
    if request.layer is not None:
        assert request.layer_name is not None
        return request.layer, request.layer_name
    layer = _family_default_layer(model, _torchvision_family(model))
    if layer is not None:
        return layer, _module_name(model, layer)
    key = (tuple(images.shape[1:]), images.dtype)
    found = _FOUND_LAYERS.get(model, {}).get(key)
    if found is not None:
        try:
            return model.get_submodule(found), found
        except AttributeError:  # the model was changed since
            _FOUND_LAYERS.get(model, {}).pop(key, None)
    _, probe = _forward(model, images[:1], None, leaf=False)
    if probe.name is None:
        raise InvalidInput(
            "found no layer with a 4-D [B, K, h, w] output with h*w > 1 in this model; "
            "pass `layer` (and the option `reshape` for token outputs)"
        )
    _FOUND_LAYERS.setdefault(model, {})[key] = probe.name
    return model.get_submodule(probe.name), probe.name


def gradcam_map(
    request: Request, layer_name: str, output: Tensor, gradient: Tensor, size: tuple[int, int]
) -> Tensor:
    """Grad-CAM of one layer *before* normalisation: ``upsample(relu(sum_k w_k A_k))`` with
    ``w_k = mean_hw(G_k)``, bilinear (``align_corners=False``) to ``size``, float32
    ``Tensor[B, H, W]``: the factor that Guided Grad-CAM multiplies into guided backprop.

    ``output`` and ``gradient`` are the layer's output and the target logit's gradient with
    respect to it, in the layer's own layout: they are brought to ``[B, K, h, w]`` as the CAM
    methods do (the ``reshape`` option, or the recognised token / channels-last layouts)."""
    batch = output.shape[0]
    reshape = _reshape_for(request, _torchvision_family(request.model), layer_name, output)
    a = _apply_reshape(reshape, output.detach(), batch, "output")
    g = _apply_reshape(reshape, gradient, batch, "gradient")
    w = GradCAM.weights(a.float(), g.float()).to(a.dtype)
    return ops.cam_fuse(a, w, size, relu=True, normalize=False)


# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


class _CAM(Explainer):
    """Shared driver: checks the options, runs :func:`_run`, builds the :class:`Explanation`."""

    uses_layer = True
    options: ClassVar[dict[str, Any]] = dict(_COMMON_OPTIONS)

    def explain(self, request: Request) -> Explanation:
        option = request.options.get("size")
        if option is None:
            size = (int(request.images.shape[2]), int(request.images.shape[3]))
        else:
            size = check_size(option, self.name)
        self.check_options(request)
        cap = _run(request, with_gradients=self.needs_gradients)
        maps = self.maps(cap, request, size)
        maps, targets = per_target_maps(request, maps, cap.targets)
        return Explanation(
            maps=maps,
            targets=targets,
            logits=cap.logits,
            method=self.name,
            layer=cap.layer_name,
            foils=request.foil,
        )

    def check_options(self, request: Request) -> None:
        """Validate method-specific options before the forward (default: none)."""

    def maps(self, cap: _Capture, request: Request, size: tuple[int, int]) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract


class _GradientCAM(_CAM):
    """A CAM whose weights are a function of the activations and their gradients."""

    multi_target = True  # one forward; the targets' backward passes batched

    def maps(self, cap: _Capture, request: Request, size: tuple[int, int]) -> Tensor:
        a, g = cap.activations, cap.gradients
        assert g is not None
        # Weights in float32 (the gradient powers of Grad-CAM++ underflow in half precision),
        # then in the activations' dtype, which cam_fuse accumulates in float32.
        w = self.weights(a.float(), g.float()).to(a.dtype)
        return ops.cam_fuse(a, w, size)

    @staticmethod
    def weights(a: Tensor, g: Tensor) -> Tensor:
        """``Tensor[B, K]`` or ``Tensor[B, K, h, w]`` weights from ``A`` and ``G`` (float32)."""
        raise NotImplementedError  # pragma: no cover - abstract


@register("gradcam")
class GradCAM(_GradientCAM):
    """Grad-CAM (Selvaraju et al., 2017): channel weights are the spatially averaged gradients.

    Options: ``size`` (output ``(H, W)``, default the input's), ``reshape`` (layer output to
    ``[B, K, h, w]``, for models whose layout is not recognised).
    """

    @staticmethod
    def weights(a: Tensor, g: Tensor) -> Tensor:
        return g.mean(dim=(2, 3))


@register("gradcam++")
class GradCAMPlusPlus(_GradientCAM):
    """Grad-CAM++ (Chattopadhyay et al., 2018), Eq. 19 with the exponential-free closed form.

    ``alpha = G^2 / (2 G^2 + sum_hw(A) G^3 + 1e-6)`` where ``G != 0`` (else 0), and
    ``w = sum_hw(relu(G) * alpha)``, as pytorch-grad-cam computes it. Options as ``gradcam``.
    """

    @staticmethod
    def weights(a: Tensor, g: Tensor) -> Tensor:
        g2 = g * g
        g3 = g2 * g
        sum_a = a.sum(dim=(2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, 0.0)
        return (g.clamp_min(0) * alpha).sum(dim=(2, 3))


@register("xgradcam")
class XGradCAM(_GradientCAM):
    """XGrad-CAM (Fu et al., 2020): ``w = sum_hw(G * A) / (sum_hw(A) + 1e-7)``.

    Options as ``gradcam``.
    """

    @staticmethod
    def weights(a: Tensor, g: Tensor) -> Tensor:
        return (g * a).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + 1e-7)


@register("hirescam")
class HiResCAM(_GradientCAM):
    """HiResCAM (Draelos & Carin, 2020): the gradient itself weighs each activation.

    At a layer whose output goes straight into a LayerNorm over channels (Swin's
    ``features[-1]``), ``sum_k G * A`` is zero at every position in exact arithmetic (LayerNorm
    is scale invariant), so the map is float32 rounding noise there: prefer ``gradcam`` or an
    earlier layer. Options as ``gradcam``.
    """

    @staticmethod
    def weights(a: Tensor, g: Tensor) -> Tensor:
        return g


@register("layercam")
class LayerCAM(_GradientCAM):
    """LayerCAM (Jiang et al., 2021): the positive part of the gradient weighs each activation.

    Options as ``gradcam``.
    """

    @staticmethod
    def weights(a: Tensor, g: Tensor) -> Tensor:
        return g.clamp_min(0)


@register("eigencam")
class EigenCAM(_CAM):
    """Eigen-CAM (Muhammad & Yeasin, 2020): the activations' first principal component.

    Per image, the ``h*w x K`` matrix of activations is centred (each channel minus its mean
    over positions) and decomposed with one batched ``torch.linalg.svd``; the map is the
    projection of the centred activations on the first right-singular vector ``v``, i.e.
    ``cam_fuse(centred A, v)``. No gradient and no target are involved (``targets`` is still
    reported: the given one or the model's top-1).

    Sign: a singular vector is only defined up to sign, and pytorch-grad-cam's ``EigenCAM``
    keeps whatever sign LAPACK returns. Here the sign is fixed so that the projection's
    largest-magnitude value is positive (flip when ``|min| > |max|``; no flip on a tie), which
    is Seg-Eigen-CAM's correction (pytorch-grad-cam's
    ``get_2d_projection_with_sign_correction``): the peak survives the ReLU. (Making the
    projection's sum positive cannot work: the projection of centred data sums to zero.)

    Options: ``size``, ``reshape`` (as ``gradcam``).
    """

    uses_target = False  # class-agnostic: the same map whatever the class
    needs_gradients = False

    def maps(self, cap: _Capture, request: Request, size: tuple[int, int]) -> Tensor:
        a = cap.activations
        b, k, h, w = a.shape
        x = a.float()  # SVD needs float32 or float64
        x = torch.where(torch.isnan(x), 0.0, x)
        x = x - x.mean(dim=(2, 3), keepdim=True)
        u, s, vh = torch.linalg.svd(x.reshape(b, k, h * w).transpose(1, 2), full_matrices=False)
        v = vh[:, 0, :]  # [B, K]
        projection = u[:, :, 0] * s[:, :1]  # [B, h*w] = centred rows @ v
        flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
        v = torch.where(flip[:, None], -v, v)
        return ops.cam_fuse(x, v, size)


@register("scorecam")
class ScoreCAM(_CAM):
    """Score-CAM (Wang et al., 2020): channels weighed by the score of the input they mask.

    Each channel's map is upsampled to the input size (bilinear, ``align_corners=True`` as in
    pytorch-grad-cam), min-max normalised per channel (``(m - min) / (max - min + 1e-8)``),
    multiplied into the input, and the masked inputs run through the model in chunks of the
    request's ``batch_size`` (default 32) under ``no_grad``; a channel's score is the target's
    logit, and the weights are the softmax over channels of those scores.

    Options: ``size``, ``reshape`` (as ``gradcam``); ``top_channels`` (int or None): keep only
    the ``k`` channels of each image with the largest spatial variance of their activation
    (the others get weight 0 and are never run), so ``B * k`` instead of ``B * K`` model
    evaluations; the softmax is then over the kept channels.
    """

    needs_gradients = False
    options: ClassVar[dict[str, Any]] = {**_COMMON_OPTIONS, "top_channels": None}

    def check_options(self, request: Request) -> None:
        top = request.options.get("top_channels")
        if top is not None:
            positive_int(top, "option `top_channels`")

    def maps(self, cap: _Capture, request: Request, size: tuple[int, int]) -> Tensor:
        images = request.images
        a = cap.activations
        b, k, h, w = a.shape
        top = request.options.get("top_channels")
        chunk = request.batch_size or _SCORECAM_BATCH

        keep = None
        selected = a
        if top is not None and top < k:
            keep = a.float().flatten(2).var(dim=2, correction=0).topk(top, dim=1).indices
            selected = a.gather(1, keep[:, :, None, None].expand(-1, -1, h, w))
        n = selected.shape[1]
        channel_maps = selected.reshape(b * n, 1, h, w)
        image_of = torch.arange(b, device=images.device).repeat_interleave(n)
        target_of = cap.targets.repeat_interleave(n)
        scores = torch.empty(b * n, dtype=torch.float32, device=images.device)
        with torch.no_grad():
            for start in range(0, b * n, chunk):
                stop = min(start + chunk, b * n)
                m = F.interpolate(
                    channel_maps[start:stop],
                    size=images.shape[2:],
                    mode="bilinear",
                    align_corners=True,
                )
                lo = m.amin(dim=(2, 3), keepdim=True)
                hi = m.amax(dim=(2, 3), keepdim=True)
                m = (m - lo) / (hi - lo + 1e-8)
                logits = request.forward(images[image_of[start:stop]] * m, None, "CAM")
                picked = logits.gather(1, target_of[start:stop, None]).squeeze(1)
                scores[start:stop] = picked.float()
        weights = torch.softmax(scores.view(b, n), dim=1)
        if keep is not None:
            weights = torch.zeros(b, k, dtype=weights.dtype, device=weights.device).scatter(
                1, keep, weights
            )
        return ops.cam_fuse(a, weights.to(a.dtype), size)


# --------------------------------------------------------------------------------------------
# CAM (Zhou et al.): the classifier's own weights on the globally pooled feature map
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Head:
    """Where a model's CAM structure is: the final ``nn.Linear`` and the module whose output is
    the feature map that global average pooling feeds into it."""

    linear: str
    layer: str


# The head found per model (weakly held) and per (input signature, cam_linear, given layer).
_CAM_HEADS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], _Head]] = (
    weakref.WeakKeyDictionary()
)


class _HeadProbe:
    """Hooks of one CAM forward (no graph, nothing cloned).

    Every hooked module's latest spatial output (``[B, K, h, w]``, ``h*w > 1``: not the
    pooled ``[B, K, 1, 1]`` itself) with ``channels`` channels is kept *by reference*:
    an in-place op applied to it later in the forward (densenet's ``F.relu(features,
    inplace=True)`` before its functional pooling) is what gets pooled, and the kept tensor
    sees it too. Each hooked linear layer's pre-hook records its input and a snapshot of those
    outputs at that moment; its hook records its output object.
    """

    def __init__(self, channels: set[int]) -> None:
        self.channels = channels
        self.clock = 0
        self.outputs: dict[str, tuple[int, Tensor]] = {}
        self.linear_inputs: dict[str, tuple[Any, dict[str, tuple[int, Tensor]]]] = {}
        self.linear_outputs: dict[str, Any] = {}

    def output_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if is_spatial(output) and output.shape[1] in self.channels:
                self.outputs[name] = (self.clock, output)
                self.clock += 1

        return record

    def linear_pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        def record(module: nn.Module, args: Any) -> None:
            self.linear_inputs[name] = (args[0] if args else None, dict(self.outputs))

        return record

    def linear_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            self.linear_outputs[name] = output

        return record


def _averages_to(feature: Tensor, pooled: Tensor) -> bool:
    """Whether ``pooled`` (``[B, K]``) is the spatial mean of ``feature`` (``[B, K, h, w]``),
    up to the rounding of the model's own pooling (relative to the largest pooled value)."""
    if feature.shape[0] != pooled.shape[0] or feature.shape[1] != pooled.shape[1]:
        return False
    mean = feature.float().mean(dim=(2, 3))
    target = pooled.float()
    rel = 1e-3 if feature.dtype in (torch.float32, torch.float64) else 2e-2
    tol = rel * float(target.abs().amax()) + 1e-6
    return bool(((mean - target).abs() <= tol).all())


def _cam_linear(model: nn.Module, option: object) -> tuple[str, nn.Linear] | None:
    """The ``cam_linear`` option resolved to ``(name, module)`` (None when not given)."""
    if option is None:
        return None
    if not isinstance(option, str) or not option:
        raise InvalidInput(
            f"option `cam_linear` must be the dotted name of the model's final nn.Linear "
            f"layer, got {option!r}"
        )
    try:
        module = model.get_submodule(option)
    except AttributeError:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        hint = f"its nn.Linear layers: {', '.join(linears[-5:])}" if linears else "it has none"
        raise InvalidInput(
            f"option `cam_linear`: the model has no module {option!r} ({hint})"
        ) from None
    if not isinstance(module, nn.Linear):
        raise InvalidInput(
            f"option `cam_linear`: {option!r} is a {type(module).__name__}, not an nn.Linear"
        )
    return option, module


def _cam_forward(
    model: nn.Module, images: Tensor, linears: dict[str, nn.Module], others: dict[str, nn.Module]
) -> tuple[Any, _HeadProbe]:
    """One no-grad forward with a :class:`_HeadProbe` on ``linears`` and ``others``."""
    channels = {int(m.in_features) for m in linears.values()}  # type: ignore[arg-type]
    probe = _HeadProbe(channels)
    handles = []
    try:
        for name, m in {**others, **linears}.items():
            handles.append(m.register_forward_hook(probe.output_hook(name)))
        for name, m in linears.items():
            handles.append(m.register_forward_pre_hook(probe.linear_pre_hook(name)))
            handles.append(m.register_forward_hook(probe.linear_hook(name)))
        with torch.no_grad():
            out = model(images)
    finally:
        for h in handles:
            h.remove()
    return out, probe


def _find_head(
    model: nn.Module,
    out: Any,
    probe: _HeadProbe,
    declared: tuple[str, nn.Linear] | None,
    given: str | None,
) -> _Head:
    """The head, from a forward with every module hooked (see :class:`ClassActivationMap`)."""
    if declared is not None:
        linear = declared[0]
        if linear not in probe.linear_inputs:
            raise InvalidInput(f"option `cam_linear`: layer {linear!r} did not run in the forward")
    else:
        finals = [n for n, o in probe.linear_outputs.items() if o is out]
        if not finals:
            names = list(probe.linear_outputs)
            what = (
                f"none of its nn.Linear layers ({', '.join(names[-5:])}) outputs the logits "
                "themselves (something is applied after the last one)"
                if names
                else "it has no nn.Linear layer that runs in the forward"
            )
            raise InvalidInput(
                "cam needs a final nn.Linear layer whose output is the model's logits, fed by "
                f"global average pooling of a spatial feature map; {what}. Name the final "
                "linear layer with the option `cam_linear`"
            )
        linear = finals[-1]
    z, seen = probe.linear_inputs[linear]
    if not isinstance(z, Tensor) or z.dim() != 2:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise InvalidInput(
            f"cam needs the input of the final linear layer {linear!r} to be pooled features "
            f"[B, K]; it is {shape}"
        )
    k = z.shape[1]
    candidates = sorted(
        ((clock, name, t) for name, (clock, t) in seen.items() if t.shape[1] == k),
        reverse=True,
    )
    found = next((name for _, name, t in candidates if _averages_to(t, z)), None)
    if given is not None:
        if given in seen and _averages_to(seen[given][1], z):
            return _Head(linear, given)
        right = (
            f"cam explains {found!r} (or a module with the same output)"
            if found
            else ("and no module's output is")
        )
        raise InvalidInput(
            f"layer {given!r} is not the feature map that global average pooling feeds into "
            f"the final linear layer {linear!r}: {right}; leave `layer` out"
        )
    if found is None:
        if candidates:
            names = ", ".join(name for _, name, _ in candidates[:3])
            why = (
                f"the [B, {k}, h, w] outputs of {names} do not average to it: there is more "
                "than a global average pooling between them (a hidden layer, an activation, "
                "or a pooling that is not global)"
            )
        else:
            why = f"no module outputs a [B, {k}, h, w] feature map"
        raise InvalidInput(
            f"cam needs global average pooling of a spatial feature map right before the "
            f"final linear layer {linear!r} (its input is [B, {k}]); {why}"
        )
    return _Head(linear, found)


@register("cam")
class ClassActivationMap(Explainer):
    """CAM (Zhou et al., 2016): the final linear layer's weights of the target class on the
    feature map that global average pooling feeds into it.

    For a model ending in ``F`` (``[B, K, h, w]``) -> global average pooling -> ``nn.Linear``
    (weights ``W``, ``[classes, K]``), the map is ``cam_fuse(F, W[target])``: ``sum_k
    W[c, k] F_k``, ReLU, bilinear upsampling to ``size`` and per-image min-max normalisation,
    as the Grad-CAM family (the bias is a constant and is left out, as in the paper). It is
    Grad-CAM's map at that layer without the gradient: one no-grad forward, no backward.

    The structure is found from one forward with hooks (its result is remembered per model,
    input signature, ``cam_linear`` and ``layer``, so later calls hook the two modules only):
    the final linear layer is the ``nn.Linear`` whose output *is* the model's output (or the
    ``cam_linear`` option), and the feature map is the latest module output before it, in the
    order the modules finish, whose spatial mean is that layer's input (to float rounding). So
    torchvision's ResNet, DenseNet, EfficientNet, MobileNetV2, RegNet and the bundled
    EfficientNet-Lite0 work as they are, also with functional pooling or an in-place ReLU
    before it (DenseNet). A model without this structure is an InvalidInput naming what is
    missing: no final linear (the option ``cam_linear`` names it when something follows it,
    e.g. a temperature), a hidden layer between the pooling and the final linear
    (MobileNetV3, VGG's MLP head), or no global pooling.

    Layer: CAM explains that feature map and no other; :attr:`Explanation.layer` names its
    module. A given ``layer`` must be that module or one with the same output (``layer4.1``
    for ``layer4`` in resnet18); any other is an InvalidInput naming the right one.

    Options: ``size`` (output ``(H, W)``, default the input's), ``cam_linear`` (dotted name of
    the final ``nn.Linear``; default: found as above). Targets: given, else the top-1 of the
    same forward.
    """

    takes_default_layer = False  # the layer is the one before the pooling: found
    uses_layer = True
    needs_gradients = False
    options: ClassVar[dict[str, Any]] = {"size": None, "cam_linear": None}

    def explain(self, request: Request) -> Explanation:
        option = request.options.get("size")
        images = request.images
        if option is None:
            size = (int(images.shape[2]), int(images.shape[3]))
        else:
            size = check_size(option, self.name)
        model = request.model
        declared = _cam_linear(model, request.options.get("cam_linear"))
        given = request.layer_name
        key = (tuple(images.shape[1:]), images.dtype, declared and declared[0], given)
        head = _CAM_HEADS.get(model, {}).get(key)
        feature = None
        if head is not None:
            try:
                linear = model.get_submodule(head.linear)
                layer = model.get_submodule(head.layer)
            except AttributeError:  # the model was changed since
                head = None
            else:
                out, probe = _cam_forward(model, images, {head.linear: linear}, {head.layer: layer})
                seen = probe.linear_inputs.get(head.linear, (None, {}))[1]
                feature = seen.get(head.layer, (0, None))[1]
                if feature is None:  # the remembered structure no longer runs
                    head = None
        if head is None:
            _CAM_HEADS.get(model, {}).pop(key, None)
            linears = (
                dict([declared])
                if declared is not None
                else {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            )
            others = {n: m for n, m in model.named_modules() if n and n not in linears}
            out, probe = _cam_forward(model, images, linears, others)
            head = _find_head(model, out, probe, declared, given)
            feature = probe.linear_inputs[head.linear][1][head.layer][1]
            _CAM_HEADS.setdefault(model, {})[key] = head
        assert feature is not None

        batch = images.shape[0]
        _check_logits(out, batch)
        weight = model.get_submodule(head.linear).weight.detach()
        if weight.shape[0] != out.shape[1]:
            raise InvalidInput(
                f"option `cam_linear`: {head.linear!r} has {weight.shape[0]} outputs but the "
                f"model has {out.shape[1]} classes"
            )
        if request.target is None:
            targets = out.argmax(dim=1)
        else:
            targets = request.target
            check_target_range(targets, out)
        maps = ops.cam_fuse(feature, weight[targets], size)
        return Explanation(
            maps=maps,
            targets=targets,
            logits=out.detach(),
            method=self.name,
            layer=head.layer,
        )
