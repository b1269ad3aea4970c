"""Gradients with modified ReLU rules: guided backpropagation, deconvnet and Guided Grad-CAM.

All three differentiate the target logit with respect to the input, as saliency does, but
change what the backward pass does at each rectifier (``g`` is the gradient arriving at the
rectifier's output, ``y`` its forward output):

=============== ==============================================================================
method          backward at a ReLU
=============== ==============================================================================
guided_backprop ``relu(g) * 1[y > 0]`` (Springenberg et al., 2015)
deconvnet       ``relu(g)``, whatever the forward did (Zeiler & Fergus, 2014)
guided_gradcam  guided backprop times Grad-CAM upsampled (Selvaraju et al., 2017)
=============== ==============================================================================

**What is covered.** During the call's forward a :class:`torch.overrides.TorchFunctionMode`
(thread-local, entered and left around each forward, also on errors) sends every rectifier
call through one autograd function whose forward is the original op and whose backward is the
rule: ``nn.ReLU`` modules (they call ``F.relu``), ``F.relu``, ``torch.relu``, ``torch.relu_``,
``Tensor.relu`` and ``Tensor.relu_``, in place or not, wherever they are called from (so also
the functional ReLUs of torchvision's DenseNet and GoogLeNet, which module hooks such as
captum's miss). ReLU6 (``nn.ReLU6``, ``F.relu6``, and ``F.hardtanh`` with ``min_val=0``,
which is how ``nn.ReLU6`` runs) is a ReLU capped at 6: the rule replaces its lower, rectifying
gate and keeps the cap's ordinary gate, i.e. guided ``relu(g) * 1[0 < y < 6]``, deconvnet
``relu(g) * 1[y < 6]``. It is covered because MobileNetV2 and the bundled EfficientNet-Lite0
rectify with ReLU6 only: without it these methods would return their plain gradient. (Captum
hooks ``nn.ReLU`` modules only.) Not covered, and left with their ordinary gradient: other
activations (LeakyReLU, GELU, SiLU, Hardswish, ...), ``clamp``-style rectifiers, and models
whose ops do not run through Python (TorchScript). A forward that runs no rectifier at all is
an :class:`~xai_serve.errors.InvalidInput` (the answer would be the plain gradient, under a
name that promises otherwise). Nothing is attached to the model: no hooks (Guided Grad-CAM's
one forward hook on its layer is removed before the call returns, also on errors), no patched
modules, no changed parameters.

**Cost.** One forward and one backward per chunk of images (``batch_size``, default the
whole batch), like saliency. Guided Grad-CAM needs Grad-CAM's *ordinary* gradient at its layer
too: when no rectifier runs between the layer and the logits (ResNet, DenseNet, EfficientNet),
one backward gives both gradients; otherwise (VGG's MLP head) a first backward through the
head only (from the logits to the layer, ordinary rules, graph kept) precedes the guided one.
When the request names no layer and the model's default has not been found yet, one no-grad
forward of the first image (under the same ``amp``) finds it (see
:func:`xai_serve.explainers.cam.find_layer`).

Maps: ``Tensor[B, H, W]`` float32, the attribution summed over channels (signed), as captum's
``GuidedBackprop`` / ``Deconvolution`` / ``GuidedGradCam`` output summed over channels. Guided
Grad-CAM's Grad-CAM factor is ``relu(sum_k mean_hw(G_k) A_k)`` upsampled bilinearly
(``align_corners=False``), not normalised, so the map is captum's
``GuidedGradCam(...).attribute(x, target, interpolate_mode="bilinear").sum(1)``; captum's
default ``interpolate_mode`` is ``"nearest"``, the paper's is bilinear.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import amp_option
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    check_target_range,
    register,
)
from xai_serve.explainers.cam import find_layer, gradcam_map
from xai_serve.explainers.forward import autocast, to_path_layout

__all__ = ["Deconvnet", "GuidedBackprop", "GuidedGradCAM", "RectifierRules"]

RULES = ("guided", "deconvnet")


class _RuleState:
    """The rule a call's rectifier nodes apply in backward; ``plain`` switches them to the
    ordinary gradient (Guided Grad-CAM's backward through the head)."""

    __slots__ = ("plain", "rule")

    def __init__(self, rule: str) -> None:
        self.rule = rule
        self.plain = False


class _Rectifier(torch.autograd.Function):
    """``relu(x)`` (``cap`` None) or ``clamp(x, 0, cap)``, in place if asked, whose backward
    applies the state's rule. The forward output alone decides the gates: ``y > 0`` iff
    ``x > 0`` and ``y < cap`` iff ``x < cap``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, state: _RuleState, cap: float | None, inplace: bool) -> Tensor:
        if cap is None:
            out = torch.relu_(x) if inplace else torch.relu(x)
        else:
            out = F.hardtanh(x, 0.0, cap, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(out)
        ctx.state = state
        ctx.cap = cap
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (out,) = ctx.saved_tensors
        state, cap = ctx.state, ctx.cap
        if state.plain:  # the ordinary gradient, as aten's own backward
            if cap is None:
                return torch.ops.aten.threshold_backward(g, out, 0), None, None, None
            return torch.ops.aten.hardtanh_backward(g, out, 0.0, cap), None, None, None
        positive = g.clamp_min(0)
        if state.rule == "guided":
            if cap is None:
                grad = torch.ops.aten.threshold_backward(positive, out, 0)
            else:
                grad = torch.ops.aten.hardtanh_backward(positive, out, 0.0, cap)
        elif cap is None:  # deconvnet
            grad = positive
        else:
            grad = torch.ops.aten.hardtanh_backward(positive, out, float("-inf"), cap)
        return grad, None, None, None


# How each rectifier function's arguments read: (input, cap, inplace), or None to leave the
# call alone (not a float tensor, or a hardtanh that is not a capped ReLU).
_Parsed = tuple[Tensor, float | None, bool] | None


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _relu(inplace: bool | None) -> Callable[[tuple[Any, ...], dict[str, Any]], _Parsed]:
    def parse(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
        x = _arg(args, kwargs, 0, "input", None)
        flag = bool(_arg(args, kwargs, 1, "inplace", False)) if inplace is None else inplace
        return (x, None, flag) if isinstance(x, Tensor) and x.is_floating_point() else None

    return parse


def _relu6(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
    x = _arg(args, kwargs, 0, "input", None)
    inplace = bool(_arg(args, kwargs, 1, "inplace", False))
    return (x, 6.0, inplace) if isinstance(x, Tensor) and x.is_floating_point() else None


def _hardtanh(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Parsed:
    x = _arg(args, kwargs, 0, "input", None)
    low = _arg(args, kwargs, 1, "min_val", -1.0)
    high = _arg(args, kwargs, 2, "max_val", 1.0)
    inplace = bool(_arg(args, kwargs, 3, "inplace", False))
    if not (isinstance(x, Tensor) and x.is_floating_point()) or low != 0 or not high > 0:
        return None
    return x, float(high), inplace


_RECTIFIERS: dict[Callable[..., Any], Callable[[tuple[Any, ...], dict[str, Any]], _Parsed]] = {
    F.relu: _relu(None),
    torch.relu: _relu(False),
    torch.relu_: _relu(True),
    Tensor.relu: _relu(False),
    Tensor.relu_: _relu(True),
    F.relu6: _relu6,
    F.hardtanh: _hardtanh,
}


class RectifierRules(TorchFunctionMode):
    """While entered (in this thread only), every rectifier call (see the module doc) runs
    through an autograd function whose backward applies ``rule`` (``"guided"`` or
    ``"deconvnet"``); ``count`` is the number of rectifier calls seen. Everything else runs
    unchanged. The rule is read at backward time from :attr:`state`, so the graph built under
    the mode keeps it after the mode is left."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.state = _RuleState(rule)
        self.count = 0

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        parse = _RECTIFIERS.get(func)
        if parse is not None:
            parsed = parse(args, kwargs)
            if parsed is not None:
                self.count += 1
                x, cap, inplace = parsed
                return _Rectifier.apply(x, self.state, cap, inplace)
        return func(*args, **kwargs)


class _LayerOutput:
    """Forward hook on Guided Grad-CAM's layer: keeps its latest output (in the graph) and the
    number of rectifier calls so far, and passes a clone on, so that an in-place op after the
    layer (densenet's ReLU) leaves the kept activations as the layer output them."""

    def __init__(self, rules: RectifierRules) -> None:
        self.rules = rules
        self.value: Tensor | None = None
        self.rectifiers_before = 0
        self.other: str | None = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not isinstance(output, Tensor) or not output.is_floating_point():
            self.other = type(output).__name__
            return None
        self.value = output
        self.rectifiers_before = self.rules.count
        return output.clone()


def _check_request(request: Request, method: str) -> torch.dtype | None:
    amp = amp_option(request.options, request.path)
    if request.baseline is not None:
        raise InvalidInput(f"method {method!r} does not take a `baseline`")
    if request.segments is not None:
        raise InvalidInput(f"method {method!r} does not take `segments`")
    if torch.is_inference_mode_enabled():
        raise InvalidInput(
            f"method {method!r} differentiates the model and cannot run under "
            "torch.inference_mode(); call it outside"
        )
    return amp


def _no_rectifier(method: str) -> InvalidInput:
    return InvalidInput(
        f"method {method!r} changes the backward pass at ReLUs, but this model's forward ran "
        "none (nn.ReLU / nn.ReLU6 modules, F.relu, torch.relu, Tensor.relu, F.relu6 or "
        "F.hardtanh(min_val=0)); its answer would be the plain gradient: use 'saliency' "
        "(with abs=False) instead"
    )


class _Guided(Explainer):
    """Shared driver: chunks of images, one forward under :class:`RectifierRules`, one
    backward (two for Guided Grad-CAM when a rectifier follows its layer)."""

    uses_layer = False
    pixel_level = True
    rule: ClassVar[str] = "guided"
    options: ClassVar[dict[str, Any]] = {"amp": "auto"}

    @classmethod
    def unsupported(cls, model: nn.Module) -> str | None:
        if isinstance(model, torch.jit.ScriptModule):
            return "a TorchScript model: its ReLUs cannot be given the method's gradient rule"
        return None

    def explain(self, request: Request) -> Explanation:
        amp = _check_request(request, self.name)
        images = request.images.detach()
        layer, layer_name = None, None
        if self.uses_layer:
            with autocast(images.device, amp):  # its search forward too runs as asked
                layer, layer_name = find_layer(request)
        b, _, h, w = images.shape
        chunk = request.chunk_size(b, grad=True)
        maps = torch.empty(b, h, w, dtype=torch.float32, device=images.device)
        all_logits, all_targets = [], []
        for s in range(0, b, chunk):
            requested = None if request.target is None else request.target[s : s + chunk]
            check = request.target if s == 0 else None  # every class checked once
            maps[s : s + chunk], logits, targets = self._chunk(
                request, images[s : s + chunk], requested, check, amp, layer, layer_name
            )
            all_logits.append(logits)
            all_targets.append(targets)
        return Explanation(
            maps=maps,
            targets=torch.cat(all_targets),
            logits=torch.cat(all_logits),
            method=self.name,
            layer=layer_name,
        )

    def _chunk(
        self,
        request: Request,
        x: Tensor,
        requested: Tensor | None,
        check: Tensor | None,
        amp: torch.dtype | None,
        layer: nn.Module | None,
        layer_name: str | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(map, logits, targets)`` of one chunk."""
        rules = RectifierRules(self.rule)
        capture = _LayerOutput(rules) if layer is not None else None
        with torch.enable_grad():
            x = to_path_layout(x, request.path).requires_grad_(True)
            handle = layer.register_forward_hook(capture) if layer is not None else None
            try:
                with rules:
                    logits = request.forward(x, amp, "guided")
            finally:
                if handle is not None:
                    handle.remove()
            if rules.count == 0:
                raise _no_rectifier(self.name)
            if check is not None:
                check_target_range(check, logits)
            targets = logits.detach().argmax(1) if requested is None else requested
            score = logits.float().gather(1, targets[:, None]).sum()
            if not score.requires_grad:
                raise InvalidInput(
                    "the model's output does not depend differentiably on its input (is its "
                    "forward run under torch.no_grad() or on detached tensors?)"
                )
            if capture is None:
                (grad,) = torch.autograd.grad(score, x)
                return grad.float().sum(1), logits.detach().float(), targets
            assert layer_name is not None
            acts = capture.value
            if acts is None:
                what = capture.other or "nothing"
                raise InvalidInput(
                    f"layer {layer_name!r} must output a float tensor during the forward, but "
                    f"gave {what}"
                )
            if rules.count == capture.rectifiers_before:
                # No rectifier after the layer: its guided gradient is the ordinary one.
                grad, acts_grad = torch.autograd.grad(score, (x, acts), allow_unused=True)
            else:
                rules.state.plain = True
                try:
                    (acts_grad,) = torch.autograd.grad(
                        score, acts, retain_graph=True, allow_unused=True
                    )
                finally:
                    rules.state.plain = False
                (grad,) = torch.autograd.grad(score, x, allow_unused=True)
            if acts_grad is None:
                raise InvalidInput(
                    f"the model's logits do not depend (through autograd) on layer "
                    f"{layer_name!r}; choose a layer on the path to the output"
                )
            if grad is None:
                raise InvalidInput("the model's logits do not depend on its input")
        size = (int(x.shape[2]), int(x.shape[3]))
        cam = gradcam_map(request, layer_name, acts.detach(), acts_grad, size)
        return grad.float().sum(1) * cam, logits.detach().float(), targets


@register("guided_backprop")
class GuidedBackprop(_Guided):
    """Guided backpropagation (Springenberg et al., 2015): the input gradient of the target
    logit where every ReLU passes back only positive gradient, and only where its input was
    positive: ``relu(g) * 1[y > 0]``. The map is the signed gradient summed over channels
    (captum's ``GuidedBackprop(model).attribute(x, target).sum(1)``); see the module doc for
    the rectifiers covered.

    Options: ``amp`` (``"auto"``: the forward path's precision; None / ``"fp32"``,
    ``"bf16"``, ``"fp16"``). ``batch_size``: images per forward and backward (default all).
    """

    rule = "guided"


@register("deconvnet")
class Deconvnet(_Guided):
    """Deconvnet (Zeiler & Fergus, 2014) as a gradient rule: every ReLU passes back the
    positive part of the gradient arriving at its output, whatever its forward input was
    (``relu(g)``); max-pooling keeps its switches. The map is the result summed over channels
    (captum's ``Deconvolution(model).attribute(x, target).sum(1)``).

    Options as ``guided_backprop``.
    """

    rule = "deconvnet"


@register("guided_gradcam")
class GuidedGradCAM(_Guided):
    """Guided Grad-CAM (Selvaraju et al., 2017): guided backpropagation times Grad-CAM of
    ``layer``, upsampled bilinearly to the input size.

    ``map = sum_c GB_c * upsample(relu(sum_k mean_hw(G_k) A_k))``, with ``A`` the layer's
    output and ``G`` the *ordinary* gradient of the target logit with respect to it (Grad-CAM's
    own, not a guided one); Grad-CAM is not normalised, so the map is captum's
    ``GuidedGradCam(model, layer).attribute(x, target, interpolate_mode="bilinear").sum(1)``.
    The layer is the request's ``layer``, else the one Grad-CAM uses (found the same way), and
    is reported in :attr:`Explanation.layer`.

    Options: ``amp`` as ``guided_backprop``; ``reshape`` (the layer's output to
    ``[B, K, h, w]``, as for the CAM methods).
    """

    uses_layer = True
    rule = "guided"
    options: ClassVar[dict[str, Any]] = {"amp": "auto", "reshape": None}
