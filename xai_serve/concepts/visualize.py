"""Feature visualisation: activation maximisation, the Lucid recipe, many objectives in one batch.

An image is optimised so that a model's channel, unit, class logit or activation direction
responds as strongly as possible (Olah et al., "Feature Visualization", Distill 2017). The image
is parameterised as Lucid does:

- an FFT spectrum per colour channel, scaled by ``1 / max(f, 1/size) ** decay`` so that the
  optimiser moves low frequencies as easily as high ones (``fft=True``), or plain pixels;
- decorrelated colour: the three spectral channels are mixed by the square root of ImageNet's
  colour correlation matrix (``decorrelate=True``);
- a sigmoid to ``[0, 1]``.

Each step the images go through random transformations (``transforms="standard"``): a grey
border of 12 pixels, a jitter of up to 8 pixels, a random scale in ``0.9 .. 1.1``, a random
rotation in ``-10 .. 10`` degrees and a jitter of up to 4 pixels. Jitters are whole pixels,
centred on zero (Lucid's random crops are centred too; torch-lucent's shifts are one-sided).
The composition is one affine map per image, sampled once (bilinear), so the image is
resampled once per step rather than once per transformation. The draws are independent per
objective and per step, made up front from a seeded ``torch.Generator`` on the CPU (the same
seed gives the same draws on any device) and moved to the device once.

All objectives are optimised as ONE batch: one image parameter per objective, stacked on the
batch dimension; one forward per step with hooks on the layers the objectives need; the loss is
minus the sum over the batch of each item's own objective, so each item receives the gradient
of its own objective. Adam's update is element-wise, so a batched run equals one run per
objective with the same seed (``batch=False``), up to floating-point rounding (a batch
changes the order of the sums; in float32 Adam can amplify that to ~1e-2 in the images after
tens of steps, in float64 they agree to ~1e-9).

When no objective needs the model's output (no :class:`ClassLogit`), the forward stops as soon
as every needed layer has run: the rest of the network is not computed.

The model is put in ``eval()`` mode for the call (batch norm in training mode would mix the
batch's items and update its statistics); its parameters get ``requires_grad=False`` for the
call. Both are restored afterwards, also on error. Gradients are taken with
:func:`torch.autograd.grad` with respect to the image parameters only: no parameter ``.grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.errors import InvalidInput, positive_int
from xai_serve.explainers.base import resolve_layer

__all__ = [
    "COLOR_CORRELATION_SQRT",
    "Channel",
    "ClassLogit",
    "Direction",
    "Objective",
    "StandardTransforms",
    "Unit",
    "Visualization",
    "fft_image",
    "parse_objective",
    "visualize",
]

# The square root of ImageNet's RGB colour correlation matrix, as published with Lucid
# (lucid/optvis/param/color.py): columns are the decorrelated colour directions.
COLOR_CORRELATION_SQRT: tuple[tuple[float, float, float], ...] = (
    (0.26, 0.09, 0.02),
    (0.27, 0.00, -0.05),
    (0.27, -0.09, 0.03),
)
_INIT_SD = 0.01  # standard deviation of the initial spectrum / pixels (Lucid's)
_FFT_DIVISOR = 4.0  # Lucid divides the inverse FFT by 4 to start away from saturation


# --------------------------------------------------------------------------------------------
# Objectives


def _check_field(obj: object, name: str, optional: bool = False) -> None:
    value = getattr(obj, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{type(obj).__name__}.{name} must be an int >= 0, got {value!r}")


def _check_layer(obj: object) -> None:
    if not isinstance(obj.layer, str) or not obj.layer:  # type: ignore[attr-defined]
        raise InvalidInput(
            f"{type(obj).__name__}.layer must be a dotted module name such as 'layer4', got "
            f"{obj.layer!r}"  # type: ignore[attr-defined]
        )


@dataclass(frozen=True)
class Channel:
    """The mean over positions of channel ``index`` of ``layer``'s output (``[B, C, ...]``; for
    a ``[B, C]`` output, the channel's value)."""

    layer: str
    index: int

    def __post_init__(self) -> None:
        _check_layer(self)
        _check_field(self, "index")


@dataclass(frozen=True)
class Unit:
    """One unit: channel ``index`` of ``layer``'s ``[B, C, H, W]`` output at row ``y``, column
    ``x`` (the centre, ``H // 2`` and ``W // 2``, by default). On a ``[B, C]`` output, ``y``
    and ``x`` must be None and the unit is the channel."""

    layer: str
    index: int
    y: int | None = None
    x: int | None = None

    def __post_init__(self) -> None:
        _check_layer(self)
        _check_field(self, "index")
        _check_field(self, "y", optional=True)
        _check_field(self, "x", optional=True)


@dataclass(frozen=True)
class ClassLogit:
    """The model's output ``[B, K]`` at class ``index`` (a logit, before any softmax)."""

    index: int

    def __post_init__(self) -> None:
        _check_field(self, "index")


@dataclass(frozen=True, eq=False)
class Direction:
    """The mean over positions of the dot product of ``layer``'s channel vector with ``vector``
    (``Tensor[C]``): Lucid's ``direction`` objective."""

    layer: str
    vector: Tensor = field(repr=False)

    def __post_init__(self) -> None:
        _check_layer(self)
        v = self.vector
        if not isinstance(v, Tensor) or v.dim() != 1 or not torch.is_floating_point(v):
            got = f"{v.dtype} {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
            raise InvalidInput(f"Direction.vector must be a floating Tensor[C], got {got}")


Objective = Channel | Unit | ClassLogit | Direction


def parse_objective(text: str) -> Objective:
    """An objective from a string: ``"channel:<layer>:<c>"`` (or ``"<layer>:<c>"``),
    ``"unit:<layer>:<c>"``, ``"unit:<layer>:<c>:<y>:<x>"``, ``"logit:<k>"`` (or
    ``"class:<k>"``). Layers are dotted module names (``"layer4.1.conv2"``)."""
    if not isinstance(text, str):
        raise InvalidInput(f"an objective string must be a str, got {type(text).__name__}")
    parts = text.strip().split(":")
    usage = "use 'channel:<layer>:<c>', '<layer>:<c>', 'unit:<layer>:<c>[:<y>:<x>]' or 'logit:<k>'"

    def integer(s: str, what: str) -> int:
        try:
            return int(s)
        except ValueError:
            raise InvalidInput(
                f"objective {text!r}: {what} must be an integer, got {s!r}"
            ) from None

    kind = parts[0].lower()
    if kind in ("logit", "class") and len(parts) == 2:
        return ClassLogit(integer(parts[1], "the class"))
    if kind == "channel" and len(parts) == 3 and parts[1]:
        return Channel(parts[1], integer(parts[2], "the channel"))
    if kind == "unit" and len(parts) in (3, 5) and parts[1]:
        yx = [integer(p, n) for p, n in zip(parts[3:], ("y", "x"), strict=False)]
        return Unit(parts[1], integer(parts[2], "the channel"), *yx)
    if len(parts) == 2 and parts[0] and kind not in ("logit", "class", "channel", "unit"):
        return Channel(parts[0], integer(parts[1], "the channel"))
    raise InvalidInput(f"cannot parse the objective {text!r}: {usage}")


# --------------------------------------------------------------------------------------------
# Image parameterisation


def _frequencies(h: int, w: int) -> Tensor:
    """``Tensor[h, w // 2 + 1]``: the spatial frequency (cycles per pixel) of each bin of a
    real 2-D FFT of an ``h x w`` image."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def _spectrum_scale(h: int, w: int, decay: float) -> Tensor:
    return 1.0 / _frequencies(h, w).clamp_min(1.0 / max(h, w)) ** decay


def _color_matrix(device: torch.device, dtype: torch.dtype) -> Tensor:
    m = torch.tensor(COLOR_CORRELATION_SQRT, dtype=torch.float64)
    m = m / m.norm(dim=0).max()  # the largest colour direction has norm 1
    return m.to(device=device, dtype=dtype)


def fft_image(spectrum: Tensor, size: int, scale: Tensor) -> Tensor:
    """``Tensor[B, 3, size, size]``, unbounded: the image of a spectrum parameter
    ``Tensor[B, 3, size, size // 2 + 1, 2]`` (real and imaginary parts) weighted by ``scale``
    (``Tensor[size, size // 2 + 1]``), inverse FFT with orthonormal scaling, divided by 4."""
    z = torch.view_as_complex(spectrum) * scale
    return torch.fft.irfftn(z, s=(size, size), dim=(-2, -1), norm="ortho") / _FFT_DIVISOR


# --------------------------------------------------------------------------------------------
# Transforms


def _default_angles() -> tuple[float, ...]:
    return tuple(float(a) for a in range(-10, 11)) + (0.0,) * 5


def _default_scales() -> tuple[float, ...]:
    return tuple(1.0 + (i - 5) / 50.0 for i in range(11))


@dataclass(frozen=True)
class StandardTransforms:
    """The random transformations applied each step, in this order: a border of ``pad``
    pixels of grey (0.5), a translation by ``jitter`` (integers drawn uniformly in
    ``[-(d // 2), (d - 1) // 2]``), a scale drawn from ``scales`` and a rotation (degrees)
    drawn from ``angles``, both about the centre, and a second translation by ``jitter_after``.
    The model sees ``size + 2 * pad`` pixels square. Lucid's ``standard_transforms``."""

    pad: int = 12
    jitter: int = 8
    scales: tuple[float, ...] = field(default_factory=_default_scales)
    angles: tuple[float, ...] = field(default_factory=_default_angles)
    jitter_after: int = 4

    def __post_init__(self) -> None:
        for name in ("pad", "jitter", "jitter_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise InvalidInput(f"StandardTransforms.{name} must be an int >= 0, got {v!r}")
        if not self.scales or any(not (s > 0) for s in self.scales):
            raise InvalidInput(f"StandardTransforms.scales must be positive, got {self.scales}")
        if not self.angles:
            raise InvalidInput("StandardTransforms.angles must name at least one angle")


def _shift(n: int, generator: torch.Generator, d: int) -> Tensor:
    if d <= 1:
        return torch.zeros(n, dtype=torch.float64)
    return torch.randint(0, d, (n,), generator=generator).double() - d // 2


def _draw_affines(
    t: StandardTransforms, steps: int, count: int, size: int, generator: torch.Generator
) -> Tensor:
    """``Tensor[steps, count, 2, 3]`` (float64, CPU): for each step and image, the
    :func:`torch.nn.functional.affine_grid` matrix that maps the output canvas (``size + 2 *
    pad`` square) to the unpadded image's normalised coordinates."""
    n = steps * count
    canvas = size + 2 * t.pad
    t1 = torch.stack([_shift(n, generator, t.jitter), _shift(n, generator, t.jitter)], 1)
    scales = torch.tensor(t.scales, dtype=torch.float64)
    s = scales[torch.randint(0, len(t.scales), (n,), generator=generator)]
    angles = torch.tensor(t.angles, dtype=torch.float64)
    a = torch.deg2rad(angles[torch.randint(0, len(t.angles), (n,), generator=generator)])
    t2 = torch.stack(
        [_shift(n, generator, t.jitter_after), _shift(n, generator, t.jitter_after)], 1
    )
    # A content point p (pixels from the centre) lands at q = R(a) s (p + t1) + t2; the grid
    # needs the inverse p = R(-a) (q - t2) / s - t1, in normalised units (2 / canvas per
    # pixel), then rescaled from the canvas to the image (canvas / size).
    cos, sin = torch.cos(a), torch.sin(a)
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)
    inv = inv / s[:, None, None]
    t1n, t2n = t1 * (2.0 / canvas), t2 * (2.0 / canvas)
    b = -(inv @ t2n[:, :, None])[:, :, 0] - t1n
    theta = torch.cat([inv, b[:, :, None]], 2) * (canvas / size)
    return theta.reshape(steps, count, 2, 3)


def _apply_affine(images: Tensor, theta: Tensor, canvas: int) -> Tensor:
    """``images`` (``[B, 3, s, s]`` in [0, 1]) sampled onto a ``canvas`` square with the
    ``theta`` maps; outside the image is grey (0.5)."""
    grid = F.affine_grid(theta, [images.shape[0], 3, canvas, canvas], align_corners=False)
    return F.grid_sample(images - 0.5, grid, mode="bilinear", align_corners=False) + 0.5


# --------------------------------------------------------------------------------------------
# The batched objective


class _StopForward(Exception):
    """Raised by the last needed hook when the model's output is not needed."""


@dataclass
class _Group:
    kind: type
    layer: str | None
    rows: list[int]
    objectives: list[Objective]


class _Evaluator:
    """Evaluates every objective of a batch at once: objectives of the same kind on the same
    layer form a group, evaluated with one indexing operation."""

    def __init__(self, model: nn.Module, objectives: Sequence[Objective]) -> None:
        groups: dict[tuple[type, str | None], _Group] = {}
        self.modules: dict[str, nn.Module] = {}
        for row, obj in enumerate(objectives):
            layer = None if isinstance(obj, ClassLogit) else obj.layer
            if layer is not None and layer not in self.modules:
                self.modules[layer] = resolve_layer(model, layer)[0]
            g = groups.setdefault((type(obj), layer), _Group(type(obj), layer, [], []))
            g.rows.append(row)
            g.objectives.append(obj)
        self.groups = list(groups.values())
        self.needs_output = any(g.kind is ClassLogit for g in self.groups)
        order = [row for g in self.groups for row in g.rows]
        self._inverse = [0] * len(order)
        for pos, row in enumerate(order):
            self._inverse[row] = pos
        self._prepared: list[tuple[_Group, dict[str, Tensor]]] | None = None
        self._inverse_t: Tensor | None = None
        self._shapes: tuple[tuple[int, ...], ...] = ()

    def _prepare(self, acts: dict[str, Tensor], out: object, device: torch.device) -> None:
        """Checks every objective against the shapes seen in the first forward (Python ints
        only, no device sync) and builds the index tensors on the device."""
        prepared = []
        for g in self.groups:
            if g.kind is ClassLogit:
                if not isinstance(out, Tensor) or out.dim() != 2:
                    shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                    raise InvalidInput(
                        f"ClassLogit needs the model to return logits Tensor[B, K], got {shape}"
                    )
                k = out.shape[1]
                for o in g.objectives:
                    _check_index(o.index, k, f"ClassLogit({o.index})", "classes")
                idx = torch.tensor([o.index for o in g.objectives], device=device)
                prepared.append((g, {"rows": _rows(g, device), "index": idx}))
                continue
            act = acts.get(g.layer)  # type: ignore[arg-type]
            if act is None:
                raise InvalidInput(
                    f"layer {g.layer!r} did not run in the model's forward; pick a layer that "
                    "the forward calls"
                )
            if not isinstance(act, Tensor) or act.dim() < 2:
                shape = tuple(act.shape) if isinstance(act, Tensor) else type(act).__name__
                raise InvalidInput(
                    f"layer {g.layer!r} must output a Tensor[B, C, ...] to be visualised, got "
                    f"{shape}"
                )
            c = act.shape[1]
            data: dict[str, Tensor] = {"rows": _rows(g, device)}
            if g.kind is Direction:
                vecs = []
                for o in g.objectives:
                    v = o.vector
                    if not isinstance(v, Tensor) or v.dim() != 1 or v.shape[0] != c:
                        got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                        raise InvalidInput(
                            f"Direction on {g.layer!r} needs a vector Tensor[{c}] (the layer's "
                            f"channels), got {got}"
                        )
                    if not torch.is_floating_point(v):
                        raise InvalidInput(
                            f"Direction's vector must be floating point, got {v.dtype}"
                        )
                    vecs.append(v.to(device=device, dtype=act.dtype))
                data["vectors"] = torch.stack(vecs)
                prepared.append((g, data))
                continue
            for o in g.objectives:
                _check_index(o.index, c, f"{type(o).__name__} on {g.layer!r}", "channels")
            data["index"] = torch.tensor([o.index for o in g.objectives], device=device)
            if g.kind is Unit:
                if act.dim() == 2:
                    if any(o.y is not None or o.x is not None for o in g.objectives):
                        raise InvalidInput(
                            f"layer {g.layer!r} outputs Tensor[B, C] (no positions): give Unit "
                            "without y and x"
                        )
                elif act.dim() == 4:
                    h, w = act.shape[2], act.shape[3]
                    ys = [h // 2 if o.y is None else o.y for o in g.objectives]
                    xs = [w // 2 if o.x is None else o.x for o in g.objectives]
                    for y, x in zip(ys, xs, strict=True):
                        _check_index(y, h, f"Unit y on {g.layer!r}", "rows")
                        _check_index(x, w, f"Unit x on {g.layer!r}", "columns")
                    data["y"] = torch.tensor(ys, device=device)
                    data["x"] = torch.tensor(xs, device=device)
                else:
                    raise InvalidInput(
                        f"Unit needs layer {g.layer!r} to output Tensor[B, C, H, W] or "
                        f"Tensor[B, C], got {tuple(act.shape)}"
                    )
            prepared.append((g, data))
        self._prepared = prepared
        self._inverse_t = torch.tensor(self._inverse, device=device)

    def __call__(self, acts: dict[str, Tensor], out: object, device: torch.device) -> Tensor:
        """``Tensor[O]``: each item's own objective."""
        shapes = tuple(tuple(a.shape) for a in acts.values() if isinstance(a, Tensor))
        if self._prepared is None or shapes != self._shapes:
            self._prepare(acts, out, device)
            self._shapes = shapes
        assert self._prepared is not None and self._inverse_t is not None
        parts = []
        for g, d in self._prepared:
            rows = d["rows"]
            if g.kind is ClassLogit:
                assert isinstance(out, Tensor)
                parts.append(out[rows, d["index"]])
                continue
            act = acts[g.layer]  # type: ignore[index]
            if g.kind is Direction:
                a = act[rows].flatten(2) if act.dim() > 2 else act[rows][:, :, None]
                parts.append(torch.einsum("bcp,bc->b", a, d["vectors"]) / a.shape[2])
            elif g.kind is Unit and "y" in d:
                parts.append(act[rows, d["index"], d["y"], d["x"]])
            else:
                parts.append(act[rows, d["index"]].reshape(len(g.rows), -1).mean(1))
        return torch.cat(parts)[self._inverse_t]


def _rows(g: _Group, device: torch.device) -> Tensor:
    return torch.tensor(g.rows, device=device)


def _check_index(value: object, n: int, what: str, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n:
        raise InvalidInput(
            f"{what}: index {value!r} is out of range; it has {n} {unit} (0..{n - 1})"
        )


# --------------------------------------------------------------------------------------------
# The result and the entry point


@dataclass(frozen=True)
class Visualization:
    """What :func:`visualize` returns.

    - ``images``: ``Tensor[O, 3, size, size]`` in ``[0, 1]``, one per objective;
    - ``trace``: ``Tensor[O, T]``, each objective's value at steps ``0, trace_every, ...``
      (``T = ceil(steps / trace_every)``), measured in that step's forward (on the transformed
      image, before the step's update);
    - ``values``: ``Tensor[O]``, each objective at its final image, untransformed (with the
      transforms' grey border of ``pad`` pixels, so that the model sees the geometry it was
      optimised for and a :class:`Unit`'s position means the same);
    - ``objectives``, ``seed``, ``steps``, ``trace_every``: what produced them.
    """

    images: Tensor
    trace: Tensor
    values: Tensor
    objectives: tuple[Objective, ...]
    seed: int
    steps: int
    trace_every: int


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the model's first parameter (or buffer)."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    for t in (*model.parameters(), *model.buffers()):
        return t.device, torch.float32
    return torch.device("cpu"), torch.float32


def _check_objectives(objectives: object) -> tuple[Objective, ...]:
    if isinstance(objectives, (str, Channel, Unit, ClassLogit, Direction)):
        objectives = [objectives]
    if not isinstance(objectives, Sequence) or len(objectives) == 0:
        raise InvalidInput(
            "`objectives` must be a non-empty list of Channel, Unit, ClassLogit, Direction or "
            "objective strings such as 'layer4:12'"
        )
    out: list[Objective] = []
    for o in objectives:
        if isinstance(o, str):
            o = parse_objective(o)
        if not isinstance(o, (Channel, Unit, ClassLogit, Direction)):
            raise InvalidInput(
                f"each objective must be a Channel, Unit, ClassLogit, Direction or a string, got "
                f"{type(o).__name__}"
            )
        out.append(o)
    return tuple(out)


def _forward(
    model: nn.Module, x: Tensor, modules: dict[str, nn.Module], needs_output: bool
) -> tuple[dict[str, Tensor], object]:
    """The needed layers' outputs (each module's first call, as it left the module) and the
    model's output (None when the forward stopped after the last needed layer)."""
    acts: dict[str, Tensor] = {}
    handles = []
    names_of: dict[int, list[str]] = {}
    for name, m in modules.items():
        names_of.setdefault(id(m), []).append(name)

    def hook(module: nn.Module, _inp: object, output: object) -> None:
        names = [n for n in names_of[id(module)] if n not in acts]
        if not names:
            return
        stop = not needs_output and len(acts) + len(names) == len(modules)
        if not stop and isinstance(output, Tensor):
            # the forward goes on: a later in-place op (ReLU(inplace=True)) must not change
            # what this layer output
            output = output.clone()
        for name in names:
            acts[name] = output  # type: ignore[assignment]
        if stop:
            raise _StopForward

    try:
        for m in {id(m): m for m in modules.values()}.values():
            handles.append(m.register_forward_hook(hook))
        try:
            out = model(x)
        except _StopForward:
            out = None
    finally:
        for h in handles:
            h.remove()
    return acts, out


def visualize(
    model: nn.Module,
    objectives: Sequence[Objective | str] | Objective | str,
    *,
    steps: int = 256,
    size: int = 128,
    lr: float = 0.05,
    seed: int = 0,
    transforms: Literal["standard"] | StandardTransforms | None = "standard",
    decorrelate: bool = True,
    fft: bool = True,
    decay: float = 1.0,
    transform: Callable[[Tensor], Tensor] | None = None,
    batch: bool = True,
    progress: Callable[[int, int], None] | None = None,
    trace_every: int = 1,
) -> Visualization:
    """Images that maximise each of ``objectives`` in ``model``, optimised as one batch.

    ``objectives``: :class:`Channel`, :class:`Unit`, :class:`ClassLogit`, :class:`Direction`
    or strings (:func:`parse_objective`); layers are dotted module names and several layers may
    appear in one call. ``steps`` Adam steps at learning rate ``lr`` on images of ``size``
    pixels square. ``transforms``: ``"standard"`` (:class:`StandardTransforms` defaults), a
    :class:`StandardTransforms`, or None (no augmentation: the model sees the image itself).
    ``transform``: the model's input preprocessing, applied to the ``[0, 1]`` images after the
    augmentation (e.g. ImageNet normalisation). ``fft`` / ``decorrelate`` / ``decay``: the
    image parameterisation. ``batch=False`` optimises one objective at a time (less memory, same
    result for the same seed). ``progress(step, steps)`` is called after every step.
    ``trace_every``: keep every n-th step's objective values in the trace.

    The same ``seed`` gives the same initial images and transform draws on any device and
    with ``batch`` True or False; objective ``i``'s draws depend on the seed, on ``i`` and on
    the number of objectives, not on what the other objectives are.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    objs = _check_objectives(objectives)
    steps = positive_int(steps, "`steps`")
    size = positive_int(size, "`size`")
    trace_every = positive_int(trace_every, "`trace_every`")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"`seed` must be an int, got {seed!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or math.isinf(lr):
        raise InvalidInput(f"`lr` must be a positive finite number, got {lr!r}")
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not decay >= 0:
        raise InvalidInput(f"`decay` must be a number >= 0, got {decay!r}")
    if transforms == "standard":
        transforms = StandardTransforms()
    elif transforms is not None and not isinstance(transforms, StandardTransforms):
        raise InvalidInput(
            f"`transforms` must be 'standard', a StandardTransforms or None, got {transforms!r}"
        )
    if transform is not None and not callable(transform):
        raise InvalidInput("`transform` must be a callable on Tensor[B, 3, H, W] or None")
    if progress is not None and not callable(progress):
        raise InvalidInput("`progress` must be a callable(step, steps) or None")

    device, model_dtype = _model_device_dtype(model)
    # the image parameters and the optimiser in float32 (float64 for a float64 model); the
    # model gets its own dtype (e.g. bfloat16)
    dtype = torch.float64 if model_dtype == torch.float64 else torch.float32
    count = len(objs)
    # Every random draw up front, on a seeded CPU generator: same numbers on any device.
    gen = torch.Generator().manual_seed(seed)
    shape = (count, 3, size, size // 2 + 1, 2) if fft else (count, 3, size, size)
    init = (torch.randn(shape, generator=gen, dtype=torch.float64) * _INIT_SD).to(device, dtype)
    theta = None
    if transforms is not None:
        theta = _draw_affines(transforms, steps, count, size, gen).to(device, dtype)

    evaluators = (
        [(_Evaluator(model, objs), slice(None))]
        if batch
        else [(_Evaluator(model, objs[i : i + 1]), slice(i, i + 1)) for i in range(count)]
    )
    training = [(m, m.training) for m in model.modules()]
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in grad_flags:
            p.requires_grad_(False)
        results = [
            _optimise(
                model,
                ev,
                init[rows],
                None if theta is None else theta[:, rows],
                size=size,
                steps=steps,
                lr=float(lr),
                fft=fft,
                decorrelate=decorrelate,
                decay=float(decay),
                pad=0 if transforms is None else transforms.pad,
                transform=transform,
                progress=_offset(progress, 0 if batch else i * steps, count * steps, batch),
                trace_every=trace_every,
                device=device,
                model_dtype=model_dtype,
            )
            for i, (ev, rows) in enumerate(evaluators)
        ]
    finally:
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        for m, flag in training:
            m.training = flag
    images, trace, values = (torch.cat(r) for r in zip(*results, strict=True))
    return Visualization(images, trace, values, objs, seed, steps, trace_every)


def _offset(
    progress: Callable[[int, int], None] | None, done: int, total: int, batch: bool
) -> Callable[[int, int], None] | None:
    """``progress`` as one run's callback: with ``batch=False`` the runs' steps add up."""
    if progress is None or batch:
        return progress
    return lambda step, _steps: progress(done + step, total)


def _optimise(
    model: nn.Module,
    evaluate: _Evaluator,
    init: Tensor,
    theta: Tensor | None,
    *,
    size: int,
    steps: int,
    lr: float,
    fft: bool,
    decorrelate: bool,
    decay: float,
    pad: int,
    transform: Callable[[Tensor], Tensor] | None,
    progress: Callable[[int, int], None] | None,
    trace_every: int,
    device: torch.device,
    model_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    param = init.clone().requires_grad_(True)
    scale = _spectrum_scale(size, size, decay).to(device, init.dtype) if fft else None
    color = _color_matrix(device, init.dtype) if decorrelate else None
    canvas = size + 2 * pad

    def image() -> Tensor:
        x = fft_image(param, size, scale) if scale is not None else param  # type: ignore[arg-type]
        if color is not None:
            x = torch.einsum("ck,bkhw->bchw", color, x)
        return torch.sigmoid(x)

    def objective(x: Tensor) -> Tensor:
        if transform is not None:
            x = transform(x)
        acts, out = _forward(model, x.to(model_dtype), evaluate.modules, evaluate.needs_output)
        return evaluate(acts, out, device).to(init.dtype)

    opt = torch.optim.Adam([param], lr=lr)
    trace = torch.empty(init.shape[0], -(-steps // trace_every), device=device, dtype=init.dtype)
    for step in range(steps):
        x = image()
        if theta is not None:
            x = _apply_affine(x, theta[step], canvas)
        values = objective(x)
        if step % trace_every == 0:
            trace[:, step // trace_every] = values.detach()
        (grad,) = torch.autograd.grad(-values.sum(), param)
        param.grad = grad
        opt.step()
        if progress is not None:
            progress(step + 1, steps)
    with torch.no_grad():
        final = image()
        # untransformed, on the grey canvas the optimisation saw (positions mean the same)
        values = objective(F.pad(final, [pad] * 4, value=0.5) if pad else final)
    return final.detach(), trace, values.detach()
