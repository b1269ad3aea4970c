"""TCAV: testing with concept activation vectors (Kim et al., ICML 2018).

How :func:`tcav` runs, on the model's device, batched:

1. **Activations.** Every image set (each concept, each random counterexample set) goes through
   ``transform`` and the model in chunks of ``batch_size`` under ``torch.no_grad()`` (sets of
   one image size are streamed back to back, so chunks stay full); a forward hook on ``layer``
   keeps its output, flattened to ``[n, F]``, and stops the forward there (the layers after it
   are not run). Sets whose CAVs are all given (``cavs=``) are not run at all.
2. **CAVs.** For each (concept, random set) pair, an L2-regularised logistic regression
   separates the concept's activations (label 1) from the random set's (label 0): a fixed
   number of full-batch Newton steps, solved for all pairs at once in the span of each pair's
   training activations (``F`` may be far larger than the number of images, and the optimum of
   an L2-regularised linear model lies in that span), on features scaled by the pair's mean
   squared norm, so that ``regularization`` does not depend on the layer's scale. A seeded split
   holds out ``test_fraction`` of each class; the CAV's ``accuracy`` is measured on it. The CAV
   is the unit normal of the decision boundary, pointing towards the concept.
3. **Directional derivatives.** One forward per chunk of ``inputs`` under ``no_grad``: the hook
   replaces the layer's output by a detached leaf and switches autograd on, so only the network
   after the layer builds a graph; ``torch.autograd.grad`` of the sum of the target logits with
   respect to that leaf gives every input's gradient ``g`` (no parameter gradient). The
   directional derivative towards a CAV ``v`` is ``g . v``.
4. **Scores.** The TCAV score of a CAV is the fraction of inputs with ``g . v > 0``; the
   magnitude variant is ``sum(max(g . v, 0)) / sum(|g . v|)`` (also in ``[0, 1]``).
5. **Significance.** A concept is scored against ``runs`` random sets (``runs`` CAVs); the null
   is ``runs`` random-vs-random CAVs (random set ``i`` against random set ``i + 1`` mod
   ``runs``). A two-sided two-sample t-test (Student's by default, Welch's with
   ``equal_var=False``) of the concept's scores against the null's gives the p-value;
   ``significant`` is ``p < alpha`` (``alpha / len(concepts)`` with ``bonferroni=True``).

Inputs, concept images and random images are all RGB in ``[0, 1]`` as the concept library makes
them; ``transform`` (e.g. the model's normalisation) maps a batch of them to what the model
takes, and runs on every batch before the model.

The hook is added to the model for the duration of one call: do not run two calls on the same
model object from two threads at once. A model whose ``forward`` catches every exception would
swallow the signal that stops the activation pass early; such models are not supported.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xai_serve.concepts.library import ConceptSet, procedural, random_set
from xai_serve.errors import InvalidInput, NotFound, positive_int
from xai_serve.explainers.base import (
    check_target_range,
    model_device,
    resolve_layer,
    resolve_targets,
)

__all__ = [
    "CAV",
    "ConceptScore",
    "TCAVResult",
    "fit_cavs",
    "layer_activations",
    "tcav",
    "ttest_ind",
]

Transform = Callable[[Tensor], Tensor]
TCAVProgress = Callable[[float, str], None]
"""``progress(fraction, stage)``: called between stages with the fraction of work done and the
stage that starts (``"activations"``, ``"cavs"``, ``"gradients"``, ``"statistics"``, ``"done"``)."""

_CAV_FORMAT = "xai_serve.cav"
_CAV_VERSION = 1


# --------------------------------------------------------------------------- CAV


@dataclass(frozen=True)
class CAV:
    """A concept activation vector.

    Attributes:
        direction: ``float32 Tensor[F]``, unit length: the normal of the decision boundary
            between the concept's and the random set's activations, pointing towards the
            concept, over the layer's output flattened (``[C, h, w]`` in row-major order).
        bias: ``float32`` 0-dim tensor; the classifier says "concept" where
            ``direction . a + bias > 0``.
        accuracy: ``float32`` 0-dim tensor; the classifier's accuracy on the held-out images.
        concept: the concept set's name.
        random_set: the random counterexample set's name.
        layer: the dotted name of the layer.
    """

    direction: Tensor
    bias: Tensor
    accuracy: Tensor
    concept: str
    random_set: str
    layer: str

    @property
    def key(self) -> tuple[str, str, str]:
        """``(concept, random_set, layer)``, what :func:`tcav` matches given CAVs by."""
        return (self.concept, self.random_set, self.layer)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the CAV with :func:`torch.save` (a dict of CPU tensors and strings)."""
        torch.save(
            {
                "format": _CAV_FORMAT,
                "version": _CAV_VERSION,
                "direction": self.direction.detach().cpu(),
                "bias": self.bias.detach().cpu(),
                "accuracy": self.accuracy.detach().cpu(),
                "concept": self.concept,
                "random_set": self.random_set,
                "layer": self.layer,
            },
            Path(path),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: torch.device | str | None = None) -> CAV:
        """A CAV written by :meth:`save`, on ``device`` (default: the CPU).

        Raises:
            NotFound: no such file.
            InvalidInput: the file is not a CAV written by :meth:`save` (the message says what
                is wrong).
        """
        p = Path(path)
        if not p.is_file():
            raise NotFound(f"no CAV file {str(path)!r}")
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch.load raises many types on a corrupt file
            raise InvalidInput(
                f"{str(path)!r} is not a CAV file written by CAV.save ({type(exc).__name__})"
            ) from None
        if not isinstance(data, dict) or data.get("format") != _CAV_FORMAT:
            raise InvalidInput(f"{str(path)!r} is not a CAV file written by CAV.save")
        if data.get("version") != _CAV_VERSION:
            raise InvalidInput(
                f"{str(path)!r} is CAV format version {data.get('version')!r}; this version "
                f"reads {_CAV_VERSION}"
            )
        for key in ("concept", "random_set", "layer"):
            if not isinstance(data.get(key), str):
                raise InvalidInput(f"{str(path)!r}: `{key}` must be a string")
        direction = data.get("direction")
        if (
            not isinstance(direction, Tensor)
            or direction.dim() != 1
            or direction.numel() == 0
            or not direction.is_floating_point()
            or not bool(torch.isfinite(direction).all())
        ):
            raise InvalidInput(f"{str(path)!r}: `direction` must be a finite float Tensor[F]")
        for key in ("bias", "accuracy"):
            value = data.get(key)
            if not isinstance(value, Tensor) or value.numel() != 1:
                raise InvalidInput(f"{str(path)!r}: `{key}` must be a one-element tensor")
        dev = torch.device("cpu") if device is None else torch.device(device)
        return cls(
            direction=direction.to(dev, torch.float32),
            bias=data["bias"].reshape(()).to(dev, torch.float32),
            accuracy=data["accuracy"].reshape(()).to(dev, torch.float32),
            concept=data["concept"],
            random_set=data["random_set"],
            layer=data["layer"],
        )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class ConceptScore:
    """One concept's TCAV result over ``R`` runs.

    Attributes:
        concept: the concept's name.
        scores: ``Tensor[R]``: the TCAV score (fraction of inputs with a positive directional
            derivative) of the CAV against each random set.
        magnitudes: ``Tensor[R]``: ``sum(max(g . v, 0)) / sum(|g . v|)`` per run.
        accuracies: ``Tensor[R]``: each CAV's held-out accuracy.
        mean: the mean of ``scores``.
        std: their sample standard deviation.
        p_value: two-sided t-test of ``scores`` against the random-vs-random scores.
        significant: ``p_value < alpha`` (Bonferroni-corrected if asked).
        cavs: the ``R`` CAVs.
    """

    concept: str
    scores: Tensor
    magnitudes: Tensor
    accuracies: Tensor
    mean: float
    std: float
    p_value: float
    significant: bool
    cavs: list[CAV]


@dataclass(frozen=True)
class TCAVResult:
    """What :func:`tcav` returns.

    Attributes:
        layer: the layer's dotted name.
        concepts: one :class:`ConceptScore` per concept, in the order given.
        random_scores: ``Tensor[R]``: the null, TCAV scores of the random-vs-random CAVs.
        random_magnitudes: ``Tensor[R]``: their magnitude variant.
        random_accuracies: ``Tensor[R]``: their held-out accuracies.
        random_cavs: the ``R`` random-vs-random CAVs.
        alpha: the significance level each p-value was compared with (after Bonferroni).
    """

    layer: str
    concepts: list[ConceptScore]
    random_scores: Tensor
    random_magnitudes: Tensor
    random_accuracies: Tensor
    random_cavs: list[CAV]
    alpha: float
    _by_name: dict[str, ConceptScore] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {c.concept: c for c in self.concepts})

    def __getitem__(self, concept: str) -> ConceptScore:
        try:
            return self._by_name[concept]
        except KeyError:
            raise NotFound(
                f"no concept {concept!r} in this result; it has {', '.join(self._by_name)}"
            ) from None

    @property
    def cavs(self) -> list[CAV]:
        """Every CAV of the call (the concepts', then the random-vs-random ones): save them and
        pass them back as ``tcav(..., cavs=...)`` to skip fitting."""
        return [cav for c in self.concepts for cav in c.cavs] + list(self.random_cavs)


# --------------------------------------------------------------------------- statistics


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` (continued fraction, Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, 1.0 - x)
    log_front = a * math.log(x) + b * math.log1p(-x) - math.log(a)
    log_front -= math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        # even term, then odd term of the continued fraction
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= c * d
            last = c * d
        if abs(last - 1.0) < 1e-15:
            break
    return math.exp(log_front) * h


def _t_two_sided_p(t: float, df: float) -> float:
    """``P(|T| >= |t|)`` for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t) or math.isnan(df):
        return math.nan
    if math.isinf(t):
        return 0.0
    return min(1.0, _betainc(df / 2.0, 0.5, df / (df + t * t)))


def ttest_ind(a: Tensor, b: Tensor, *, equal_var: bool = True) -> tuple[float, float]:
    """Two-sided two-sample t-test of ``a`` against ``b`` (1-D tensors, >= 2 values each):
    ``(t statistic, p-value)``, as :func:`scipy.stats.ttest_ind` (Student's pooled-variance test,
    or Welch's with ``equal_var=False``). Where both samples have zero variance, ``t`` is
    ``+-inf`` and ``p = 0`` if the means differ, and ``t = 0``, ``p = 1`` if they do not (scipy
    returns NaN for the latter)."""
    if a.dim() != 1 or b.dim() != 1 or a.numel() < 2 or b.numel() < 2:
        raise InvalidInput(
            f"ttest_ind needs two 1-D samples of >= 2 values, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}"
        )
    x, y = a.detach().double().cpu(), b.detach().double().cpu()
    n1, n2 = x.numel(), y.numel()
    m1, m2 = float(x.mean()), float(y.mean())
    v1, v2 = float(x.var(correction=1)), float(y.var(correction=1))
    diff = m1 - m2
    if equal_var:
        df = float(n1 + n2 - 2)
        pooled = ((n1 - 1) * v1 + (n2 - 1) * v2) / df
        se2 = pooled * (1.0 / n1 + 1.0 / n2)
    else:
        s1, s2 = v1 / n1, v2 / n2
        se2 = s1 + s2
        df = se2 * se2 / (s1 * s1 / (n1 - 1) + s2 * s2 / (n2 - 1)) if se2 > 0 else 1.0
    if se2 <= 0.0:
        if diff == 0.0:
            return 0.0, 1.0
        return math.copysign(math.inf, diff), 0.0
    t = diff / math.sqrt(se2)
    return t, _t_two_sided_p(t, df)


# --------------------------------------------------------------------------- activations


class _StopForward(Exception):
    """Raised by the activation hook once the layer has run: the rest is not needed."""


def _check_batch(images: object, what: str) -> Tensor:
    if not isinstance(images, Tensor):
        raise InvalidInput(f"{what} must be a Tensor[N, 3, H, W], got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] == 0 or not images.is_floating_point():
        raise InvalidInput(
            f"{what} must be a float Tensor[N, 3, H, W] with N >= 1, got {images.dtype} "
            f"{tuple(images.shape)}"
        )
    return images


def _apply(transform: Transform | None, x: Tensor) -> Tensor:
    return x if transform is None else transform(x)


def _layer_output(output: Any, layer_name: str) -> Tensor:
    if not isinstance(output, Tensor) or not output.is_floating_point():
        raise InvalidInput(
            f"layer {layer_name!r} returns {type(output).__name__}, not a float tensor; pick a "
            "layer whose output is one tensor"
        )
    return output


def layer_activations(
    model: nn.Module,
    images: Tensor,
    layer: str | nn.Module,
    *,
    transform: Transform | None = None,
    batch_size: int = 64,
) -> Tensor:
    """``float32 Tensor[N, F]``: the output of ``layer`` for ``transform(images)``, flattened,
    in chunks of ``batch_size`` under ``no_grad`` (the forward stops after the layer)."""
    module, name = resolve_layer(model, layer)
    batch_size = positive_int(batch_size, "`batch_size`")
    images = _check_batch(images, "`images`")
    device = model_device(model)
    return _activation_bank(model, module, name, [images], transform, batch_size, device)


def _activation_bank(
    model: nn.Module,
    module: nn.Module,
    name: str,
    sets: Sequence[Tensor],
    transform: Transform | None,
    batch_size: int,
    device: torch.device,
    done: Callable[[float], None] | None = None,
) -> Tensor:
    """The activations of every set, one after the other, as one ``float32 Tensor[M, F]``: a
    hooked forward of ``batch_size`` images at a time, stopped at the layer. Consecutive sets of
    one image size share chunks (a chunk may hold the end of one set and the start of the
    next); ``done(fraction)`` is called after each chunk."""
    captured: list[Tensor] = []

    def hook(mod: nn.Module, args: Any, output: Any) -> None:
        captured.append(_layer_output(output, name).detach().flatten(1).float())
        raise _StopForward

    # runs of consecutive sets with one image shape, each run streamed in chunks
    groups: list[list[Tensor]] = []
    for images in sets:
        if groups and groups[-1][0].shape[1:] == images.shape[1:]:
            groups[-1].append(images)
        else:
            groups.append([images])
    total = sum(images.shape[0] for images in sets)
    seen = 0
    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for group in groups:
                stream = group[0] if len(group) == 1 else torch.cat([g.to(device) for g in group])
                for start in range(0, stream.shape[0], batch_size):
                    chunk = stream[start : start + batch_size].to(device)
                    try:
                        model(_apply(transform, chunk))
                    except _StopForward:
                        seen += chunk.shape[0]
                        if done is not None:
                            done(seen / total)
                        continue
                    raise InvalidInput(
                        f"layer {name!r} did not run during the model's forward; pick a layer "
                        "the forward uses"
                    )
    finally:
        handle.remove()
    return torch.cat(captured)


def _input_gradients(
    model: nn.Module,
    module: nn.Module,
    name: str,
    inputs: Tensor,
    targets: Tensor,
    transform: Transform | None,
    batch_size: int,
) -> Tensor:
    """``float32 Tensor[B, F]``: the gradient of each input's target logit with respect to the
    layer's output (flattened). The forward runs under ``no_grad`` up to the layer; its output
    becomes a detached leaf from which autograd records the rest."""
    state: dict[str, Tensor] = {}

    def hook(mod: nn.Module, args: Any, output: Any) -> Tensor:
        leaf = _layer_output(output, name).detach().requires_grad_(True)
        state["leaf"] = leaf
        torch.set_grad_enabled(True)
        return leaf.clone()  # the next op may be in place; the leaf must stay intact

    grads: list[Tensor] = []
    handle = module.register_forward_hook(hook)
    grad_mode = torch.is_grad_enabled()
    try:
        for start in range(0, inputs.shape[0], batch_size):
            state.clear()
            with torch.no_grad():
                logits = model(_apply(transform, inputs[start : start + batch_size]))
            if "leaf" not in state:
                raise InvalidInput(
                    f"layer {name!r} did not run during the model's forward; pick a layer the "
                    "forward uses"
                )
            if not isinstance(logits, Tensor) or logits.dim() != 2:
                shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits)
                raise InvalidInput(f"the model must return logits [B, classes], got {shape}")
            if start == 0:
                check_target_range(targets, logits)
            score = logits.gather(1, targets[start : start + batch_size, None]).sum()
            grad = None
            if score.requires_grad:
                (grad,) = torch.autograd.grad(score, state["leaf"], allow_unused=True)
            if grad is None:
                raise InvalidInput(
                    f"the target logit does not depend on layer {name!r}; pick a layer before "
                    "the logits"
                )
            grads.append(grad.flatten(1).float())
    finally:
        handle.remove()
        torch.set_grad_enabled(grad_mode)
        state.clear()
    return torch.cat(grads)


# --------------------------------------------------------------------------- CAV fitting


def _pair_seed(seed: int, concept: str, random_name: str) -> int:
    return (zlib.crc32(f"{concept}\0{random_name}".encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def _test_count(n: int, fraction: float) -> int:
    return min(n - 1, max(1, round(n * fraction)))


@dataclass(frozen=True)
class _Pair:
    pos_start: int
    pos_count: int
    neg_start: int
    neg_count: int
    concept: str
    random_set: str


def _fit(
    bank: Tensor,
    pairs: Sequence[_Pair],
    layer: str,
    *,
    seed: int,
    test_fraction: float,
    regularization: float,
    steps: int,
) -> list[CAV]:
    """One CAV per pair of row ranges of ``bank`` (``[M, F]``), all fitted at once."""
    device = bank.device
    rows, features = bank.shape
    count = len(pairs)
    width = max(p.pos_count + p.neg_count for p in pairs)
    idx = torch.full((count, width), rows, dtype=torch.int64)  # row `rows`: zero padding
    label = torch.zeros(count, width, dtype=torch.float64)
    train = torch.zeros(count, width, dtype=torch.bool)
    test = torch.zeros(count, width, dtype=torch.bool)
    for p, pair in enumerate(pairs):
        generator = torch.Generator().manual_seed(_pair_seed(seed, pair.concept, pair.random_set))
        offset = 0
        for start, n, lab in (
            (pair.pos_start, pair.pos_count, 1.0),
            (pair.neg_start, pair.neg_count, 0.0),
        ):
            k = _test_count(n, test_fraction)
            idx[p, offset : offset + n] = start + torch.randperm(n, generator=generator)
            label[p, offset : offset + n] = lab
            test[p, offset : offset + k] = True
            train[p, offset + k : offset + n] = True
            offset += n
    idx, label, train, test = (t.to(device) for t in (idx, label, train, test))
    padded = torch.cat([bank, bank.new_zeros(1, features)])
    gram = (padded @ padded.T).double()
    kernel = gram[idx[:, :, None], idx[:, None, :]]  # [P, N, N]
    trainf = train.double()
    n_train = trainf.sum(1)
    scale = (kernel.diagonal(dim1=1, dim2=2) * trainf).sum(1) / n_train
    scale = scale.clamp_min(1e-30)
    kernel = kernel / scale[:, None, None]
    evals, vecs = torch.linalg.eigh(kernel * trainf[:, :, None] * trainf[:, None, :])
    keep = evals > evals.amax(-1, keepdim=True) * 1e-10
    root = torch.where(keep, evals.clamp_min(0.0).sqrt(), torch.zeros_like(evals))
    z = vecs * root[:, None, :]  # [P, N, N]: each training row in an orthonormal basis
    zt = z.transpose(1, 2)
    weight = trainf / n_train[:, None]
    w = torch.zeros(count, width, dtype=torch.float64, device=device)
    b = torch.zeros(count, dtype=torch.float64, device=device)
    eye = torch.eye(width, dtype=torch.float64, device=device)
    for _ in range(steps):
        s = torch.sigmoid((z @ w[:, :, None])[..., 0] + b[:, None])
        r = (s - label) * weight
        d = s * (1.0 - s) * weight
        grad = torch.cat([(zt @ r[:, :, None])[..., 0] + regularization * w, r.sum(1, True)], 1)
        hww = zt @ (z * d[:, :, None]) + regularization * eye
        hwb = (zt @ d[:, :, None])[..., 0]
        hbb = d.sum(1) + 1e-12
        hessian = torch.cat(
            [
                torch.cat([hww, hwb[:, :, None]], 2),
                torch.cat([hwb, hbb[:, None]], 1)[:, None, :],
            ],
            1,
        )
        step = torch.linalg.solve(hessian, grad)
        w = w - step[:, :width]
        b = b - step[:, width]
    beta = vecs @ torch.where(keep, w / root.clamp_min(1e-300), torch.zeros_like(w))[:, :, None]
    beta = beta[..., 0] * trainf  # coefficients on the (scaled) training rows
    decision = (kernel @ beta[:, :, None])[..., 0] + b[:, None]
    correct = ((decision > 0) == (label > 0.5)) & test
    accuracy = (correct.sum(1).double() / test.sum(1).double()).float()
    coeff = torch.zeros(count, rows + 1, dtype=torch.float64, device=device)
    coeff.scatter_add_(1, idx, beta / scale[:, None])
    normal = (coeff[:, :rows].float() @ bank).double()
    norm = normal.norm(dim=1).clamp_min(1e-30)
    direction = (normal / norm[:, None]).float()
    bias = (b / norm).float()
    return [
        CAV(direction[p], bias[p], accuracy[p], pair.concept, pair.random_set, layer)
        for p, pair in enumerate(pairs)
    ]


def _fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a number in (0, 1), got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise InvalidInput(f"{what} must lie in (0, 1), got {value!r}")
    return float(value)


def _positive(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(f"{what} must be a positive number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise InvalidInput(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _features(acts: Sequence[Tensor]) -> None:
    widths = {a.shape[1] for a in acts}
    if len(widths) > 1:
        raise InvalidInput(f"activations must all have the same width F, got {sorted(widths)}")


def fit_cavs(
    positives: Sequence[Tensor],
    negatives: Sequence[Tensor],
    *,
    concepts: Sequence[str],
    random_sets: Sequence[str],
    layer: str,
    seed: int = 0,
    test_fraction: float = 0.33,
    regularization: float = 0.01,
    steps: int = 20,
) -> list[CAV]:
    """CAVs from activations: pair ``i`` separates ``positives[i]`` (``[n_i, F]``, the concept
    ``concepts[i]``) from ``negatives[i]`` (``[m_i, F]``, the set ``random_sets[i]``), all pairs
    fitted in one batched solve (see the module's docstring); each class needs >= 2 rows. The
    held-out split of a pair depends on ``seed`` and the pair's two names only."""
    count = len(positives)
    if count == 0 or not (len(negatives) == len(concepts) == len(random_sets) == count):
        raise InvalidInput(
            "fit_cavs needs as many (>= 1) positives, negatives, concepts and random_sets"
        )
    test_fraction = _fraction(test_fraction, "`test_fraction`")
    regularization = _positive(regularization, "`regularization`")
    steps = positive_int(steps, "`steps`")
    acts: list[Tensor] = []
    pairs: list[_Pair] = []
    start = 0
    for pos, neg, c, r in zip(positives, negatives, concepts, random_sets, strict=True):
        for a, what in ((pos, c), (neg, r)):
            if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[0] < 2:
                raise InvalidInput(f"the activations of {what!r} must be [n >= 2, F]")
        pairs.append(_Pair(start, pos.shape[0], start + pos.shape[0], neg.shape[0], c, r))
        start += pos.shape[0] + neg.shape[0]
        acts += [pos.detach().float(), neg.detach().float()]
    _features(acts)
    bank = torch.cat([a.to(acts[0].device) for a in acts])
    return _fit(
        bank,
        pairs,
        layer,
        seed=seed,
        test_fraction=test_fraction,
        regularization=regularization,
        steps=steps,
    )


# --------------------------------------------------------------------------- tcav


def _concept_sets(
    concepts: Sequence[ConceptSet | str] | ConceptSet | str,
    size: int,
    seed: int,
    device: torch.device,
) -> list[ConceptSet]:
    if isinstance(concepts, (ConceptSet, str)):
        concepts = [concepts]
    if not isinstance(concepts, Sequence) or len(concepts) == 0:
        raise InvalidInput("`concepts` must be a non-empty list of ConceptSets or concept names")
    sets = []
    for c in concepts:
        if isinstance(c, str):
            c = procedural(c, 32, size=size, seed=seed, device=device)
        elif not isinstance(c, ConceptSet):
            raise InvalidInput(
                f"`concepts` must hold ConceptSets or concept names, got {type(c).__name__}"
            )
        _check_set(c)
        sets.append(c)
    names = [c.name for c in sets]
    if len(set(names)) != len(names):
        raise InvalidInput(f"`concepts` repeats a name: {names}")
    return sets


def _check_set(s: ConceptSet) -> None:
    images = s.images
    if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise InvalidInput(f"the images of concept set {s.name!r} must be float [N, 3, H, W]")
    if images.shape[0] < 2:
        raise InvalidInput(
            f"concept set {s.name!r} has {images.shape[0]} images; a CAV needs at least 2 "
            "(better 20 or more)"
        )


def tcav(
    model: nn.Module,
    inputs: Tensor,
    concepts: Sequence[ConceptSet | str] | ConceptSet | str,
    target: int | Tensor,
    layer: str | nn.Module,
    *,
    random_sets: int | Sequence[ConceptSet] | None = None,
    runs: int = 10,
    transform: Transform | None = None,
    batch_size: int = 64,
    seed: int = 0,
    alpha: float = 0.05,
    bonferroni: bool = False,
    equal_var: bool = True,
    test_fraction: float = 0.33,
    regularization: float = 0.01,
    steps: int = 20,
    cavs: Sequence[CAV] | None = None,
    progress: TCAVProgress | None = None,
) -> TCAVResult:
    """TCAV scores of ``concepts`` for the class ``target`` of ``model`` at ``layer``, with
    their significance against random concepts (see the module's docstring for the method).

    Args:
        model: an image classifier returning logits ``[B, classes]``; used as given (call
            ``model.eval()`` first).
        inputs: ``float Tensor[B, 3, H, W]`` in the same space as the concept images (RGB in
            ``[0, 1]`` for the procedural library): the examples of the class whose
            sensitivity is measured.
        concepts: :class:`ConceptSet` s (from :mod:`xai_serve.concepts.library`), or names of
            procedural concepts (32 images each, of the inputs' size, drawn with ``seed``).
        target: the class, an int or ``Tensor[B]`` of one class per input.
        layer: a dotted module name (``"layer3"``) or the module itself; its output must be one
            tensor.
        random_sets: the counterexample sets: ``None`` (``runs`` generated sets
            ``random_<seed + i>`` as many images as the largest concept set and of its size),
            an int (that many images per generated set), or ``ConceptSet`` s (the first
            ``runs`` are used; names must be distinct).
        runs: how many random sets, so CAVs per concept, and random-vs-random CAVs (>= 2).
        transform: applied to every batch (inputs, concept and random images) before the
            model, e.g. the model's normalisation.
        batch_size: images per forward.
        seed: seeds the generated random sets and the held-out splits.
        alpha: the significance level; ``bonferroni=True`` divides it by ``len(concepts)``.
        equal_var: Student's t-test (True, as Kim et al.) or Welch's (False).
        test_fraction, regularization, steps: the CAV classifier's held-out share, L2 weight
            and Newton steps.
        cavs: CAVs from an earlier call (``result.cavs``, or :meth:`CAV.load`); those matching
            a (concept, random set, layer) of this call are used instead of fitting one, and a
            set whose CAVs are all given is not run through the model.
        progress: ``progress(fraction, stage)``, called between stages.

    Raises:
        NotFound: no layer of that name, or an unknown procedural concept name.
        InvalidInput: a bad argument (the message names it): empty or one-image sets,
            ``runs < 2``, a target out of the model's classes, a layer whose output is not one
            tensor or that the target does not depend on, given CAVs of another width.
    """
    module, layer_name = resolve_layer(model, layer)
    runs = positive_int(runs, "`runs`")
    if runs < 2:
        raise InvalidInput("`runs` must be at least 2: the t-test needs two runs per side")
    batch_size = positive_int(batch_size, "`batch_size`")
    alpha = _fraction(alpha, "`alpha`")
    test_fraction = _fraction(test_fraction, "`test_fraction`")
    regularization = _positive(regularization, "`regularization`")
    steps = positive_int(steps, "`steps`")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"`seed` must be an int, got {type(seed).__name__}")
    device = model_device(model)
    inputs = _check_batch(inputs, "`inputs`").to(device)
    if target is None:
        raise InvalidInput("`target` is required: the class whose logit TCAV differentiates")
    targets = resolve_targets(target, inputs.shape[0], None, device)
    if targets is None or targets.dim() != 1:
        raise InvalidInput("`target` must be an int or a Tensor[B] of one class per input")
    sets = _concept_sets(concepts, inputs.shape[-1], seed, device)

    # random sets: names now, images only if a CAV has to be fitted with them
    given_random: list[ConceptSet] | None = None
    count = max(len(s) for s in sets)
    if isinstance(random_sets, (int, type(None))) and not isinstance(random_sets, bool):
        if random_sets is not None:
            count = positive_int(random_sets, "`random_sets`")
        random_names = [f"random_{seed + i}" for i in range(runs)]
    elif isinstance(random_sets, Sequence) and all(isinstance(r, ConceptSet) for r in random_sets):
        if len(random_sets) < runs:
            raise InvalidInput(f"`random_sets` has {len(random_sets)} sets for runs={runs}")
        given_random = list(random_sets[:runs])
        for r in given_random:
            _check_set(r)
        random_names = [r.name for r in given_random]
        if len(set(random_names)) != runs:
            raise InvalidInput(f"`random_sets` repeats a name: {random_names}")
    else:
        raise InvalidInput("`random_sets` must be None, an int or a list of ConceptSets")
    overlap = set(random_names) & {s.name for s in sets}
    if overlap:
        raise InvalidInput(f"a concept and a random set share the name {sorted(overlap)[0]!r}")

    known: dict[tuple[str, str, str], CAV] = {}
    for cav in cavs or ():
        if not isinstance(cav, CAV):
            raise InvalidInput(f"`cavs` must hold CAV objects, got {type(cav).__name__}")
        known[cav.key] = cav

    def report(fraction: float, stage: str) -> None:
        if progress is not None:
            progress(fraction, stage)

    # the pairs: every concept against every random set, then random i against random i + 1
    wanted = [(s.name, r) for s in sets for r in random_names]
    wanted += [(random_names[i], random_names[(i + 1) % runs]) for i in range(runs)]
    missing = [p for p in wanted if (p[0], p[1], layer_name) not in known]

    report(0.0, "activations")
    fitted: dict[tuple[str, str], CAV] = {}
    if missing:
        needed = {n for p in missing for n in p}
        images: dict[str, Tensor] = {s.name: s.images for s in sets if s.name in needed}
        size = sets[0].images.shape[-1]
        for i, name in enumerate(random_names):
            if name not in needed:
                continue
            if given_random is not None:
                images[name] = given_random[i].images
            else:
                images[name] = random_set(count, size=size, seed=seed + i, device=device).images
        order = list(images)
        bank = _activation_bank(
            model,
            module,
            layer_name,
            [images[n] for n in order],
            transform,
            batch_size,
            device,
            done=lambda f: report(0.4 * f, "activations"),
        )
        starts, start = {}, 0
        for n in order:
            starts[n] = (start, images[n].shape[0])
            start += images[n].shape[0]
        report(0.4, "cavs")
        pairs = [_Pair(*starts[c], *starts[r], c, r) for c, r in missing]
        for cav in _fit(
            bank,
            pairs,
            layer_name,
            seed=seed,
            test_fraction=test_fraction,
            regularization=regularization,
            steps=steps,
        ):
            fitted[(cav.concept, cav.random_set)] = cav
    chosen = [fitted.get(p) or known[(p[0], p[1], layer_name)] for p in wanted]

    report(0.6, "gradients")
    grads = _input_gradients(
        model, module, layer_name, inputs, targets, transform, batch_size
    )  # [B, F]
    width = grads.shape[1]
    for cav in chosen:
        if cav.direction.shape != (width,):
            raise InvalidInput(
                f"the CAV ({cav.concept!r} vs {cav.random_set!r}) has {cav.direction.numel()} "
                f"features but layer {layer_name!r} outputs {width} per image for these inputs"
            )
    directions = torch.stack([c.direction.to(device) for c in chosen])  # [P, F]
    derivative = grads @ directions.T  # [B, P]
    scores = (derivative > 0).float().mean(0)
    magnitudes = derivative.clamp_min(0).sum(0) / derivative.abs().sum(0).clamp_min(1e-30)
    accuracies = torch.stack([c.accuracy.to(device) for c in chosen])

    report(0.9, "statistics")
    n_concepts = len(sets)
    level = alpha / n_concepts if bonferroni else alpha
    scores_cpu = scores.cpu().view(n_concepts + 1, runs)
    null = scores_cpu[n_concepts]
    shaped = [t.view(n_concepts + 1, runs) for t in (scores, magnitudes, accuracies)]
    results = []
    for k, s in enumerate(sets):
        _, p_value = ttest_ind(scores_cpu[k], null, equal_var=equal_var)
        results.append(
            ConceptScore(
                concept=s.name,
                scores=shaped[0][k],
                magnitudes=shaped[1][k],
                accuracies=shaped[2][k],
                mean=float(scores_cpu[k].mean()),
                std=float(scores_cpu[k].std(correction=1)),
                p_value=p_value,
                significant=bool(p_value < level),
                cavs=chosen[k * runs : (k + 1) * runs],
            )
        )
    report(1.0, "done")
    return TCAVResult(
        layer=layer_name,
        concepts=results,
        random_scores=shaped[0][n_concepts],
        random_magnitudes=shaped[1][n_concepts],
        random_accuracies=shaped[2][n_concepts],
        random_cavs=chosen[n_concepts * runs :],
        alpha=level,
    )
