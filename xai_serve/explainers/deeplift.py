"""DeepLIFT (rescale rule), DeepSHAP and GradientSHAP: reference-based attributions.

All three explain the class score ``f(x) = logits[b, target[b]]`` relative to references
(baselines) ``r``, and their maps are ``Tensor[B, H, W]`` float32: the per-channel attribution
``(x - r) * multiplier`` summed over channels, as the other gradient methods'
(:mod:`xai_serve.explainers.gradients`).

DeepLIFT's rescale rule (Shrikumar et al., 2017; the gradient form of Ancona et al., 2018).
The model runs forward once on ``cat([x, r])`` (each image and its reference in one batch) and
is differentiated w.r.t. ``x`` by :func:`torch.autograd.grad`, with every non-linear *module*
of the model replaced, for that call only, by its secant: the gradient through an element-wise
non-linearity ``y = g(u)`` becomes ``(g(u) - g(u_ref)) / (u - u_ref)`` (the plain gradient
where ``|u - u_ref| < 1e-10``), and through a ``nn.MaxPool2d`` captum's max-pool rule. Then
``sum(attr) = f(x) - f(r)`` exactly (summation-to-delta), up to float rounding: every other
op of a CNN (convolution, linear, eval-mode batch norm, pooling by averages, residual sums) is
affine, and an affine map passes differences through unchanged.

* Rescaled modules (:data:`RESCALED_MODULES`): captum's element-wise ones (``ReLU``, ``ELU``,
  ``LeakyReLU``, ``Sigmoid``, ``Tanh``, ``Softplus``) and ``nn.MaxPool2d``, plus the element-wise
  activations captum leaves to plain gradients (``ReLU6``, ``PReLU``, ``SELU``, ``CELU``,
  ``GELU``, ``SiLU``, ``Mish``, ``Hardtanh``, ``Hardsigmoid``, ``Hardswish``, ``Softsign``,
  ``LogSigmoid``). The rescale rule needs no monotonicity: for any element-wise ``g`` the secant
  slope times ``u - u_ref`` is ``g(u) - g(u_ref)`` exactly, which is all that summation-to-delta
  needs; for non-monotone ``g`` (GELU, SiLU, Mish) the multiplier may be negative. On models with
  those modules our maps therefore differ from captum's (which then break summation-to-delta).
  Modules are matched by exact type, as captum does (a subclass may compute something else).
* Non-linearities that are not modules (``F.relu``, ``torch.sigmoid``, ``x.clamp(min=0)`` in a
  ``forward``), ``nn.Softmax`` and other unlisted modules get plain gradients, as in captum.
  Then summation-to-delta fails, and fp32 DeepLIFT and DeepSHAP warn (:class:`RuntimeWarning`,
  once per call site) when the attributions of some image miss ``f(x) - f(r)`` by more than
  :data:`COMPLETENESS_RTOL` of ``|f(x)| + |f(r)|``: that check costs no forward (both scores
  come from the same pass) and one host sync at the end of the call. Under ``amp`` (bf16/fp16) it is
  skipped (rounding alone misses by more).
* The rules are forward hooks on those modules (:func:`rescale_rule`), installed for one call
  and removed when it ends, also when it raises; they keep their state in the call, not on the
  modules, so a module used several times (torchvision's ResNet blocks call one ``ReLU`` twice,
  which captum refuses) and in-place modules (``ReLU(inplace=True)``: the hook hands the module
  a copy of its input) are handled; and they act only on the thread that installed them, so a
  forward of the same model on another thread meanwhile is not changed.

References (``deepshap`` and ``gradientshap``). ``baselines`` is either ``M``, a count (the
wire's ``Options.baselines``), of references drawn per image around a base reference::

    r_bj = base_b + noise * (max(x_b) - min(x_b)) * e_bj,    e_bj ~ N(0, 1) per pixel

with ``base_b`` from the ``baseline`` argument: None (default) zeros, a number that constant,
``"blur"`` a Gaussian blur of the image (``blur_sigma`` pixels, as LIME's blur baseline); and
``noise`` the noise level relative to each image's value range, as SmoothGrad's. Or, in the
Python API only, ``baselines`` is a ``Tensor[M, C, H, W]``: the same ``M`` references for every
image, used as given (then ``baseline`` must be None; ``noise`` and ``blur_sigma`` play no part).

Randomness, per image (as SmoothGrad's, see :func:`xai_serve.explain`): a CPU generator seeded
with the image's seed draws (:func:`reference_draws`) ``M`` sub-seeds, one per reference, whose
noise is drawn on the images' device from a generator seeded with it; then, for
``gradientshap``, ``samples`` reference indices and ``samples`` path points ``alpha`` in
``[0, 1)``. So an image's references and points depend on its seed, ``M`` and ``samples`` only,
not on the batch; ``deepshap`` and ``gradientshap`` with the same seed and ``M`` use the same
references.

Batching. DeepLIFT: the ``B`` pairs ``(x_b, r_b)``; DeepSHAP: the ``B * M`` pairs
``(x_b, r_bj)``, image-major; a forward takes ``k`` pairs as ``cat([x rows, r rows])`` (2k
inputs), and by default all pairs go in one forward (``batch_size`` or the forward path's
``grad_batch_size``, counted in model inputs, caps it: ``k = max(1, batch_size // 2)``).
GradientSHAP: the ``B * samples`` path points, all in one forward by default, likewise capped.
Per chunk one forward and one ``autograd.grad``; the per-pair attributions are
``index_add_``-ed per image into a ``[B, C, H, W]`` float32 accumulator. DeepLIFT and DeepSHAP
take the logits and top-1 targets from the pairs' forward itself (image ``b``'s from the ``x``
row of its first pair, for all its pairs); GradientSHAP, whose points are not the images, from
one no-grad forward of the images. Memory: a differentiated forward of all the rows at once
(``2 B M`` for DeepSHAP); give ``batch_size`` (or tune the model) for large ``B * M``. The model
should be in eval mode, as for captum: a train-mode batch norm mixes the inputs' and the
references' rows.

Mixed precision: ``amp`` as in :mod:`~xai_serve.explainers.gradients` (forwards under
:func:`torch.autocast`; the multipliers are computed in float32 from the half-precision
activations; accumulation and maps float32).
"""

from __future__ import annotations

import contextlib
import math
import numbers
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.errors import InvalidInput
from xai_serve.explainers._options import amp_option, int_option
from xai_serve.explainers.base import (
    Explainer,
    Explanation,
    Request,
    check_target_range,
    per_target_maps,
    register,
    target_matrix,
    unperturbed_logits,
)
from xai_serve.explainers.forward import to_path_layout
from xai_serve.explainers.gradients import (
    baseline_like,
    noise_option,
    path_gradients,
)
from xai_serve.explainers.perturbation import gaussian_blur

__all__ = [
    "COMPLETENESS_RTOL",
    "EPS",
    "RESCALED_MODULES",
    "DeepLift",
    "DeepShap",
    "GradientShap",
    "reference_draws",
    "rescale_rule",
]

EPS = 1e-10
"""Below this ``|u - u_ref|`` a rescaled module passes the plain gradient (captum's ``eps``)."""

COMPLETENESS_RTOL = 1e-2
"""The fp32 methods warn when ``|sum(attr_b) - (f(x_b) - f(r_b))|`` exceeds this share of
``|f(x_b)| + |f(r_b)|`` for some image (see the module doc). In fp32 the sums agree to ~1e-6
of that; a ReLU network whose ReLUs are all functional misses by ~0.1 (ResNet-18, baseline
0.3); the margin leaves room for TF32 convolutions on GPUs."""

_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    # captum's element-wise rules
    nn.ReLU,
    nn.ELU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    # element-wise activations captum leaves to plain gradients
    nn.ReLU6,
    nn.PReLU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softsign,
    nn.LogSigmoid,
)

RESCALED_MODULES: tuple[type[nn.Module], ...] = (*_ELEMENTWISE, nn.MaxPool2d)
"""The module types whose gradient DeepLIFT replaces (matched by exact type)."""

DEFAULT_REFERENCES = 8
"""``baselines``: references drawn per image when the request gives no count."""


# --------------------------------------------------------------------------- the rules


def _halves(t: Tensor) -> tuple[Tensor, Tensor]:
    """The input rows and the reference rows of a ``cat([x, r])`` batch (float32, no graph)."""
    a, b = t.detach().chunk(2)
    return a.float(), b.float()


class _Secant(torch.autograd.Function):
    """``y = g(x)`` on ``cat([x, r])`` rows, differentiated by the secant ``slope`` (the same
    for an input row and its reference row); where ``small``, the gradient goes on through
    ``y``, i.e. through the module's own backward (its plain gradient)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, y: Tensor, slope: Tensor, small: Tensor
    ) -> Tensor:
        ctx.save_for_backward(slope, small)
        ctx.x_dtype = x.dtype
        return y.detach().clone()  # a view could not be modified in place downstream

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        slope, small = ctx.saved_tensors
        g = grad.reshape(2, *slope.shape)
        through_slope = torch.where(small, 0.0, g * slope).reshape(grad.shape)
        through_y = g.masked_fill(~small, 0.0).reshape(grad.shape)
        return through_slope.to(ctx.x_dtype), through_y, None, None


def _elementwise_rule(x: Tensor, y: Tensor) -> Tensor:
    """``y = g(x)`` with the secant ``(g(x) - g(x_ref)) / (x - x_ref)`` as its gradient (the
    module's own gradient where ``|x - x_ref| < EPS``); the value is ``y``."""
    with torch.no_grad():
        xi, xr = _halves(x)
        yi, yr = _halves(y)
        d_in = xi - xr
        small = d_in.abs() < EPS
        slope = (yi - yr).div_(d_in).masked_fill_(small, 0.0)
    return _Secant.apply(x, y, slope, small)


class _MaxPoolRescale(torch.autograd.Function):
    """The max-pool rule, captum's: per output window, the change ``out - out_ref`` of its
    max is split through ``top = max(out, out_ref)``: ``top - out_ref`` is credited to the
    input's argmax, ``out - top`` to the reference's; a position's credits, times the
    gradient of the window's output, are summed and divided by ``x - x_ref`` (the plain
    max-pool gradient where that is below EPS). Credits of overlapping windows that share an
    argmax add up (captum's ``max_unpool2d`` keeps one of them)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, out: Tensor, indices: Tensor, d_out: Tensor, d_in: Tensor
    ) -> Tensor:
        ctx.save_for_backward(indices, d_out, d_in)
        ctx.shape = x.shape
        return out.detach().clone()  # a view could not be modified in place downstream

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        indices, d_out, d_in = ctx.saved_tensors
        _, c, h, w = ctx.shape

        def unpool(values: Tensor) -> Tensor:  # the max-pool backward: credits summed
            flat = values.new_zeros(values.shape[0], c, h * w)
            flat.scatter_add_(2, indices.flatten(2), values.flatten(2))
            return flat.view(values.shape[0], c, h, w)

        g = grad.float()
        credited = unpool(g * d_out)
        mine, theirs = credited.chunk(2)
        small = d_in.abs() < EPS
        rescaled = (mine + theirs).repeat(2, 1, 1, 1) / torch.where(
            small, torch.ones_like(d_in), d_in
        )
        new = torch.where(small, unpool(g), rescaled)
        return new.to(grad.dtype), None, None, None, None


def _maxpool_rule(module: nn.MaxPool2d, x: Tensor, y: Tensor) -> Tensor:
    if x.dim() != 4:
        return y  # an unbatched [C, H, W] input: not the image batch of our passes
    with torch.no_grad():
        _, indices = F.max_pool2d(
            x.detach(),
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.ceil_mode,
            return_indices=True,
        )
        oi, orf = _halves(y)
        xi, xr = _halves(x)
        top = torch.maximum(oi, orf)
        d_out = torch.cat([top - orf, oi - top])
        d_in = (xi - xr).repeat(2, 1, 1, 1)
    return _MaxPoolRescale.apply(x, y, indices, d_out, d_in)


@contextlib.contextmanager
def rescale_rule(model: nn.Module) -> Iterator[None]:
    """Within the block, the forwards of ``model`` on this thread take batches
    ``cat([inputs, references])`` and their non-linear modules (:data:`RESCALED_MODULES`)
    differentiate by DeepLIFT's rescale rule (see the module doc). The hooks are removed on
    exit, also on an exception; nothing is stored on the modules."""
    owner = threading.get_ident()
    inputs: dict[int, list[Tensor]] = {}  # id(module) -> inputs of its calls in progress
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if threading.get_ident() != owner or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        inputs.setdefault(id(module), []).append(x)
        if getattr(module, "inplace", False):
            return (x.clone(), *args[1:])  # the module overwrites its copy, not x
        return None

    def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> Any:
        if threading.get_ident() != owner or not args or not isinstance(args[0], Tensor):
            return None
        x = inputs[id(module)].pop()
        if not isinstance(out, Tensor) or x.shape[0] % 2:
            return None  # not a cat([inputs, references]) batch: left as it is
        if type(module) is nn.MaxPool2d:
            return _maxpool_rule(module, x, out)  # type: ignore[arg-type]
        if out.shape != x.shape:
            return None
        return _elementwise_rule(x, out)

    try:
        for module in model.modules():
            if type(module) in RESCALED_MODULES:
                handles.append(module.register_forward_pre_hook(pre_hook))
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()
        inputs.clear()


# --------------------------------------------------------------------------- references


def reference_draws(seed: int, count: int, samples: int) -> tuple[list[int], Tensor, Tensor]:
    """One image's draws, from a CPU generator seeded with ``seed``: ``count`` sub-seeds (the
    noise of reference ``j`` is drawn from a generator seeded with the ``j``-th), then
    ``samples`` reference indices (``Tensor[samples]`` int64 in ``[0, count)``) and
    ``samples`` path points (``Tensor[samples]`` float64 in ``[0, 1)``)."""
    g = torch.Generator().manual_seed(seed)
    sub_seeds = torch.randint(0, 2**63 - 1, (count,), generator=g).tolist()
    which = torch.randint(0, count, (samples,), generator=g)
    alphas = torch.rand(samples, dtype=torch.float64, generator=g)
    return sub_seeds, which, alphas


def _blur_sigma(options: dict[str, Any]) -> float:
    value = options["blur_sigma"]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidInput(f"option `blur_sigma` must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise InvalidInput(f"option `blur_sigma` must be a finite number > 0, got {value}")
    return float(value)


def _reference_count(request: Request) -> tuple[int, Tensor | None]:
    """``(M, references)``: the ``baselines`` option, checked: a count (references None: they
    are drawn) or a ``Tensor[M, C, H, W]`` (moved to the images' device and dtype)."""
    value = request.options["baselines"]
    if not isinstance(value, Tensor):
        return int_option(request.options, "baselines", 1), None
    images = request.images
    if request.baseline is not None:
        raise InvalidInput(
            "give either `baseline` (the centre of drawn references) or `baselines` as a "
            "Tensor of references, not both"
        )
    if not value.dtype.is_floating_point:
        raise InvalidInput(f"`baselines` as a Tensor must be floating point, got {value.dtype}")
    shape = (images.shape[1], images.shape[2], images.shape[3])
    if value.dim() != 4 or tuple(value.shape[1:]) != shape or value.shape[0] < 1:
        raise InvalidInput(
            f"`baselines` as a Tensor must be Tensor[M, C, H, W] with M >= 1 and "
            f"(C, H, W) = {shape}, got shape {tuple(value.shape)}"
        )
    refs = value.detach().to(device=images.device, dtype=images.dtype)
    if not bool(torch.isfinite(refs).all()):
        raise InvalidInput("`baselines` contain NaN or infinite values")
    return refs.shape[0], refs


def _references(
    request: Request, given: Tensor | None, draws: list[tuple[list[int], Tensor, Tensor]]
) -> Tensor:
    """``Tensor[B, M, C, H, W]``: each image's references, ``given`` or drawn (see the module
    doc)."""
    x = request.images.detach()
    b = x.shape[0]
    if given is not None:
        return given.unsqueeze(0).expand(b, *given.shape)
    opts = request.options
    noise = noise_option(opts)
    count = len(draws[0][0])
    if isinstance(request.baseline, str):
        if request.baseline != "blur":
            raise InvalidInput(
                f"`baseline` must be None, a number or 'blur', got {request.baseline!r}"
            )
        base = gaussian_blur(x, _blur_sigma(opts))
    elif request.baseline is None or isinstance(request.baseline, numbers.Real):
        base = baseline_like(request.baseline, x)
    else:
        raise InvalidInput(
            f"`baseline` must be None, a number or 'blur' (references are drawn around it; "
            f"give a Tensor of references as `baselines`), got {type(request.baseline).__name__}"
        )
    refs = base.unsqueeze(1).expand(b, count, *x.shape[1:])
    if noise == 0:
        return refs
    scale = noise * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
    eps = torch.empty(refs.shape, dtype=x.dtype, device=x.device)
    generator = torch.Generator(device=x.device)
    for i, (sub_seeds, _, _) in enumerate(draws):  # host ints: no sync
        for j, s in enumerate(sub_seeds):
            generator.manual_seed(s)
            eps[i, j].normal_(generator=generator)
    return refs + eps * scale.view(b, 1, 1, 1, 1)


# --------------------------------------------------------------------------- the passes


def _pairs_per_forward(request: Request, pairs: int) -> int:
    """Pairs per forward: all of them, or ``batch_size // 2`` (model inputs per forward)."""
    return max(1, request.chunk_size(2 * pairs, grad=True) // 2)


def _rescaled_gradient(
    request: Request,
    x: Tensor,
    refs: Tensor,
    pick_targets: Callable[[Tensor], Tensor],
    amp: torch.dtype | None,
    check: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """One forward of ``cat([x, refs])`` (``k`` pairs) under the rescale rule, and the
    gradient of the summed target scores of all ``2k`` rows w.r.t. it (as captum's):
    ``(multipliers of x [k, C, H, W] float32, f(x) - f(refs) [k])``. ``pick_targets`` maps
    the logits of the ``x`` rows to the rows' targets, before the backward."""
    k = x.shape[0]
    with torch.enable_grad(), rescale_rule(request.model):
        z = to_path_layout(torch.cat([x, refs]).detach(), request.path).requires_grad_(True)
        logits = request.forward(z, amp, "gradient")
        if check is not None:
            check_target_range(check, logits)
        targets = pick_targets(logits[:k].detach().float())
        scores = logits.float().gather(1, targets.repeat(2)[:, None]).squeeze(1)
        if not scores.requires_grad:
            raise InvalidInput(
                "the model's output does not depend differentiably on its input (is its "
                "forward run under torch.no_grad() or on detached tensors?)"
            )
        (grad,) = torch.autograd.grad(scores.sum(), z, materialize_grads=True)
    scores = scores.detach()
    return grad[:k].float(), scores[:k] - scores[k:]


def _rescaled_attributions(
    request: Request, refs: Tensor, amp: torch.dtype | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """DeepLIFT of every pair ``(x_b, refs[b, j])``, averaged over ``j``:
    ``(attr [B, C, H, W] float32, mean of f(x_b) - f(refs[b, j]) [B], logits [B, classes],
    targets [B])``. The logits of image ``b`` are those of its first pair's ``x`` row, and
    its target (when the request gives none) their top-1, for all its pairs: no forward
    besides the pairs' own."""
    x = request.images.detach()
    b, m = refs.shape[0], refs.shape[1]
    pairs = b * m
    chunk = _pairs_per_forward(request, pairs)
    acc = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    delta = torch.zeros(b, dtype=torch.float32, device=x.device)
    flat_refs = refs.reshape(pairs, *x.shape[1:])
    logits: Tensor | None = None
    targets = (
        torch.zeros(b, dtype=torch.int64, device=x.device)
        if request.target is None
        else request.target
    )
    for s in range(0, pairs, chunk):
        e = min(s + chunk, pairs)
        flat = torch.arange(s, e, device=x.device)
        image_idx = torch.div(flat, m, rounding_mode="floor")
        # the chunk's rows that are their image's first pair, and those images (host ints)
        firsts = [p - s for p in range(s, e) if p % m == 0]
        owners = [p // m for p in range(s, e) if p % m == 0]

        def pick(
            row_logits: Tensor,
            firsts: list[int] = firsts,
            owners: list[int] = owners,
            image_idx: Tensor = image_idx,
        ) -> Tensor:
            nonlocal logits
            if logits is None:
                logits = row_logits.new_zeros(b, row_logits.shape[1])
            if firsts:
                rows = torch.tensor(firsts, device=x.device)
                images = torch.tensor(owners, device=x.device)
                logits[images] = row_logits[rows]
                if request.target is None:
                    targets[images] = row_logits[rows].argmax(1)
            return targets[image_idx]

        xs, rs = x[image_idx], flat_refs[s:e]
        check = request.target if s == 0 else None
        grad, diff = _rescaled_gradient(request, xs, rs, pick, amp, check)
        acc.index_add_(0, image_idx, (xs.float() - rs.float()) * grad)
        delta.index_add_(0, image_idx, diff)
    assert logits is not None
    return acc / m, delta / m, logits, targets


def _warn_if_incomplete(method: str, maps: Tensor, delta: Tensor, scale: Tensor) -> None:
    """The summation-to-delta check of the module doc (one host sync)."""
    gap = (maps.sum(dim=(1, 2)) - delta).abs()
    if bool((gap > COMPLETENESS_RTOL * scale).any()):
        warnings.warn(
            f"{method}: the attributions do not sum to f(x) - f(baseline); the model has "
            f"non-linearities that DeepLIFT's rescale rule does not reach (functional calls "
            f"such as F.relu or torch.sigmoid in forward(), or module types it does not "
            f"rescale, see xai_serve.explainers.deeplift.RESCALED_MODULES), and those took "
            f"plain gradients, as in captum",
            RuntimeWarning,
            stacklevel=4,
        )


def _reject_segments(request: Request, method: str) -> None:
    if request.segments is not None:
        raise InvalidInput(f"method {method!r} does not take `segments`")


# --------------------------------------------------------------------------- methods


@register("deeplift")
class DeepLift(Explainer):
    """DeepLIFT, rescale rule (Shrikumar et al., 2017): ``attr = (x - x0) * m`` with ``m``
    the gradient of the class score under the rescale rule (see the module doc); captum's
    ``DeepLift(model).attribute(x, x0, target).sum(1)`` on models whose non-linearities are
    captum's modules. ``sum(attr) = f(x) - f(x0)``.

    Request fields:
        baseline: ``x0``, as integrated gradients': None (zeros), a number, or a Tensor
            broadcastable to the images (``[C, 1, 1]``, ``[1, C, H, W]``, ``[B, C, H, W]``).
        batch_size: model inputs per forward (a pair is 2); default: the whole batch, ``2B``
            inputs, in one forward. The logits and top-1 targets come from that forward.

    Options:
        amp: ``"auto"`` (the forward path's precision), None / ``"fp32"``, ``"bf16"`` or
            ``"fp16"``: autocast dtype of the forwards.
    """

    takes_baseline = True
    pixel_level = True
    options: ClassVar[dict[str, Any]] = {"amp": "auto"}

    def explain(self, request: Request) -> Explanation:
        amp = amp_option(request.options, request.path)
        _reject_segments(request, self.name)
        x = request.images.detach()
        refs = baseline_like(request.baseline, x).unsqueeze(1)
        attr, delta, logits, targets = _rescaled_attributions(request, refs, amp)
        maps = attr.sum(1)
        if amp is None:
            f_x = logits.gather(1, targets[:, None]).squeeze(1)
            _warn_if_incomplete(self.name, maps, delta, f_x.abs() + (f_x - delta).abs())
        return Explanation(maps=maps, targets=targets, logits=logits, method=self.name)


_REFERENCE_OPTIONS: dict[str, Any] = {
    "baselines": DEFAULT_REFERENCES,
    "noise": 0.15,
    "blur_sigma": 5.0,
    "amp": "auto",
}


@register("deepshap")
class DeepShap(Explainer):
    """DeepSHAP (Lundberg and Lee, 2017): DeepLIFT averaged over a distribution of
    references, ``attr = mean_j (x - r_j) * m_j``; captum's
    ``DeepLiftShap(model).attribute(x, refs, target).sum(1)`` with the same references.
    ``sum(attr) = f(x) - mean_j f(r_j)``.

    Request fields:
        baseline: the centre of the drawn references: None (zeros), a number, or ``"blur"``.
        seed: seeds the references' noise, per image (see the module doc).
        batch_size: model inputs per forward (a pair is 2); default: all ``2 B M`` in one.

    Options:
        baselines: ``M``, references drawn per image (default 8), or (Python API only) a
            ``Tensor[M, C, H, W]`` of references shared by every image, used as given.
        noise: the references' noise level, a fraction of each image's (max - min) (>= 0,
            default 0.15; 0 makes all ``M`` references the base one, i.e. DeepLIFT).
        blur_sigma: standard deviation in pixels of the ``"blur"`` base (default 5).
        amp: as :class:`DeepLift`.

    The logits and top-1 targets come from the pairs' forward: image ``b``'s from the ``x``
    row of its first pair (no forward of the images alone). :attr:`Explanation.samples` is
    ``M``; :attr:`Explanation.seeds` the images' seeds (they seed nothing when ``baselines``
    is a Tensor).
    """

    randomised = True
    takes_baseline = True
    takes_blur_baseline = True
    pixel_level = True
    options: ClassVar[dict[str, Any]] = dict(_REFERENCE_OPTIONS)

    def explain(self, request: Request) -> Explanation:
        amp = amp_option(request.options, request.path)
        _reject_segments(request, self.name)
        count, given = _reference_count(request)
        draws = [reference_draws(seed, count, 0) for seed in request.seeds]
        refs = _references(request, given, draws)
        attr, delta, logits, targets = _rescaled_attributions(request, refs, amp)
        maps = attr.sum(1)
        if amp is None:
            f_x = logits.gather(1, targets[:, None]).squeeze(1)
            _warn_if_incomplete(self.name, maps, delta, f_x.abs() + (f_x - delta).abs())
        return Explanation(
            maps=maps,
            targets=targets,
            logits=logits,
            method=self.name,
            samples=count,
            seeds=request.seeds_tensor(),
        )


@register("gradientshap")
class GradientShap(Explainer):
    """GradientSHAP / expected gradients (Lundberg and Lee, 2017; Erion et al., 2021):
    ``attr = mean_s (x - r_s) * grad f(r_s + alpha_s (x - r_s))``, with ``r_s`` drawn from the
    image's references and ``alpha_s`` uniform in ``[0, 1)``: integrated gradients averaged
    over the references, by Monte Carlo. Captum's ``GradientShap(model).attribute(x, refs,
    n_samples, stdevs=0.0, target).sum(1)`` with the same draws (captum draws from NumPy's
    global state; its ``stdevs`` input noise is not offered: our ``noise`` makes the
    references, as for :class:`DeepShap`). ``sum(attr)`` approximates
    ``f(x) - mean_j f(r_j)`` (exact only in expectation). Plain gradients: no hooks.

    Request fields:
        baseline, seed: as :class:`DeepShap` (the same seed and ``baselines`` give the same
            references).
        batch_size: model inputs per forward; default: all ``B * samples`` points in one.

    Options:
        samples: path points per image (>= 1, default 16).
        baselines, noise, blur_sigma, amp: as :class:`DeepShap`.

    :attr:`Explanation.samples` is ``samples``; the logits and top-1 targets come from one
    no-grad forward of the images.
    """

    multi_target = True  # each path point: one forward, the targets' backward batched
    randomised = True
    takes_baseline = True
    takes_blur_baseline = True
    pixel_level = True
    options: ClassVar[dict[str, Any]] = {"samples": 16, **_REFERENCE_OPTIONS}

    def explain(self, request: Request) -> Explanation:
        opts = request.options
        amp = amp_option(opts, request.path)
        samples = int_option(opts, "samples", 1)
        _reject_segments(request, self.name)
        count, given = _reference_count(request)
        draws = [reference_draws(seed, count, samples) for seed in request.seeds]
        refs = _references(request, given, draws)
        x = request.images.detach()
        b = x.shape[0]
        which = torch.stack([d[1] for d in draws]).to(x.device)  # [B, S]
        alphas = torch.stack([d[2] for d in draws]).to(device=x.device, dtype=x.dtype)
        logits, targets = unperturbed_logits(request, amp, request.chunk_size(b), "gradient")
        if request.per_target:
            targets = target_matrix(request, logits)

        def make_inputs(image_idx: Tensor, sample_idx: Tensor, flat: range) -> Tensor:
            rs = refs[image_idx, which[image_idx, sample_idx]]
            a = alphas[image_idx, sample_idx].view(-1, 1, 1, 1)
            return a * x[image_idx] + (1 - a) * rs

        def contribution(
            points: Tensor, grad: Tensor, sample_idx: Tensor, image_idx: Tensor
        ) -> Tensor:
            rs = refs[image_idx, which[image_idx, sample_idx]]
            return (x[image_idx].float() - rs.float()) * grad.float()

        acc = path_gradients(
            request, targets, samples, make_inputs, contribution, amp,
            chunk=request.chunk_size(b * samples, grad=True),
        )  # fmt: skip
        maps, targets = per_target_maps(request, (acc / samples).sum(1), targets)
        return Explanation(
            maps=maps,
            targets=targets,
            logits=logits,
            method=self.name,
            samples=samples,
            foils=request.foil,
            seeds=request.seeds_tensor(),
        )
