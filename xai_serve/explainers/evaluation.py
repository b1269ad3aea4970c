"""Evaluate an explanation method on a batch: one call that explains the images and scores the
maps with the quality metrics of :mod:`xai_serve.explainers.metrics`.

The metric registry below is the one place that says what each metric is called, whether
higher or lower is better, what it measures, which settings it takes, and which methods it
cannot score (and why); the server and the command line list it through :func:`metric_names`
and :func:`metric_info`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from xai_serve.errors import InvalidInput, positive_int
from xai_serve.explainers import metrics as _m
from xai_serve.explainers.base import Explainer, Explanation, explain, get_method, model_device

__all__ = [
    "DEFAULT_METRICS",
    "Evaluation",
    "MetricInfo",
    "evaluate",
    "metric_info",
    "metric_names",
]

ProgressFn = Callable[[float, str], None]


def _budget(cls: type[Explainer], settings: Mapping[str, Any], options: Mapping[str, Any]) -> str:
    """Why a metric that re-runs the method cannot score it ('' when it can)."""
    if options.get("budget_ms") is not None:
        return (
            "`budget_ms` makes every run of the method stop after a time, so the re-runs on "
            "perturbed images or a randomised model do different amounts of work; drop the "
            "budget (give `samples` or `steps` instead)"
        )
    return ""


def _infidelity_scale(
    cls: type[Explainer], settings: Mapping[str, Any], options: Mapping[str, Any]
) -> str:
    if settings.get("normalize", True) or cls.pixel_level:
        return ""
    return (
        "its maps are not per-pixel attributions in the model output's units (they are "
        "min-max scaled, layer-resolution or superpixel maps), so `normalize=False` compares "
        "numbers of different units; use `normalize=True`"
    )


def _class_agnostic_top(
    cls: type[Explainer], settings: Mapping[str, Any], options: Mapping[str, Any]
) -> str:
    if cls.uses_target or settings.get("layers", "top") not in ("top", 1):
        return ""
    return (
        "its map does not depend on the class, so it never reads the top layer (the "
        "classifier head): re-initialising only that layer cannot change it; give `layers` as "
        "a count or names that reach the layers the method reads"
    )


@dataclass(frozen=True)
class MetricInfo:
    """One quality metric.

    Attributes:
        name: the name :func:`evaluate` takes.
        higher_is_better: the direction of a better explanation.
        description: one line for a listing.
        settings: the settings :func:`evaluate`'s ``metric_options`` may give it, with the
            values :func:`evaluate` uses by default.
        reruns_method: it explains again (perturbed images, a randomised model).
    """

    name: str
    higher_is_better: bool
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    reruns_method: bool = False
    rules: tuple[Callable[[type[Explainer], Mapping[str, Any], Mapping[str, Any]], str], ...] = ()

    def unsupported(
        self, method: str, settings: Mapping[str, Any], options: Mapping[str, Any]
    ) -> str | None:
        """Why this metric cannot score ``method`` with these settings and method options (a
        sentence), or None."""
        cls = get_method(method)
        for rule in self.rules:
            reason = rule(cls, settings, options)
            if reason:
                return reason
        return None


_REGISTRY: dict[str, MetricInfo] = {
    info.name: info
    for info in (
        MetricInfo(
            "deletion",
            False,
            "Area under the target's probability as the top-ranked pixels are set to the "
            "baseline (Petsiuk et al., 2018).",
            {"steps": 20, "baseline": 0.0},
        ),
        MetricInfo(
            "insertion",
            True,
            "Area under the target's probability as the top-ranked pixels are revealed on "
            "the baseline (Petsiuk et al., 2018).",
            {"steps": 20, "baseline": 0.0},
        ),
        MetricInfo(
            "road",
            False,
            "Mean target probability with the top-ranked pixels removed and imputed by noisy "
            "linear imputation, over 10%..90% (ROAD MoRF, Rong et al., 2022).",
            {"fractions": _m.ROAD_FRACTIONS, "noise": 0.01, "order": "morf"},
        ),
        MetricInfo(
            "road_lerf",
            True,
            "As road, removing the lowest-ranked pixels first (ROAD LeRF).",
            {"fractions": _m.ROAD_FRACTIONS, "noise": 0.01, "order": "lerf"},
        ),
        MetricInfo(
            "infidelity",
            False,
            "Mean squared error of the map's dot product with Gaussian perturbations against "
            "the change of the target logit (Yeh et al., 2019; captum's definition).",
            {"samples": 10, "noise_std": 0.1, "normalize": True, "output": "logit"},
            rules=(_infidelity_scale,),
        ),
        MetricInfo(
            "max_sensitivity",
            False,
            "Largest relative change of the map under uniform input noise of radius 0.02 "
            "(Yeh et al., 2019; captum's sensitivity_max).",
            {"radius": 0.02, "samples": 10, "norm": "fro"},
            reruns_method=True,
            rules=(_budget,),
        ),
        MetricInfo(
            "randomisation",
            False,
            "Spearman correlation of the map with the map of a model whose top layer is "
            "re-initialised (Adebayo et al., 2018).",
            {"layers": "top", "absolute": False},
            reruns_method=True,
            rules=(_budget, _class_agnostic_top),
        ),
    )
}

DEFAULT_METRICS: tuple[str, ...] = (
    "deletion",
    "insertion",
    "road",
    "infidelity",
    "max_sensitivity",
    "randomisation",
)


def metric_names() -> list[str]:
    """The metric names :func:`evaluate` knows, sorted."""
    return sorted(_REGISTRY)


def metric_info(name: str | None = None) -> MetricInfo | dict[str, MetricInfo]:
    """One metric's :class:`MetricInfo` (InvalidInput for an unknown name), or all of them
    by name when ``name`` is None."""
    if name is None:
        return dict(sorted(_REGISTRY.items()))
    return _lookup(name)


def _lookup(name: object) -> MetricInfo:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InvalidInput(f"unknown metric {name!r}; known metrics: {', '.join(metric_names())}")
    return _REGISTRY[name]


@dataclass
class Evaluation:
    """What :func:`evaluate` returns; tensors are on the model's device.

    Attributes:
        method: the method evaluated.
        metrics: ``{name: Tensor[B]}`` float32, one value per image, in the order asked.
        maps: ``Tensor[B, H, W]``, the maps scored (the method's :attr:`Explanation.maps`).
        targets: ``Tensor[B]`` int64, the classes explained and scored.
        details: per metric: ``higher_is_better``, the ``settings`` used and, where the
            metric has them, its curves (``road``: ``curve`` ``[B, F]``, ``correct`` and
            ``fractions``; ``randomisation``: ``correlations`` ``[B, K]`` and ``layers``).
        explanation: the :class:`Explanation` the maps come from (None when ``maps`` were
            given).
    """

    method: str
    metrics: dict[str, Tensor]
    maps: Tensor
    targets: Tensor
    details: dict[str, dict[str, Any]]
    explanation: Explanation | None


def evaluate(
    model: nn.Module,
    images: Tensor,
    method: str,
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    target: int | Tensor | None = None,
    layer: str | nn.Module | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    options: Mapping[str, Any] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    progress: ProgressFn | None = None,
    maps: Tensor | None = None,
) -> Evaluation:
    """Explain ``images`` with ``method`` and score the maps with every metric of ``metrics``.

    The method runs through :func:`xai_serve.explain` with ``seed`` (and the seeds it reports
    per image) for the first run and every re-run (max-sensitivity's perturbed images, the
    randomised model), so randomised methods (LIME, KernelSHAP, SmoothGrad, ...) compare like
    with like. The metrics score the target each map explains (``target``, or the model's
    top-1 when None).

    Args:
        model: the classifier (put it in ``eval()`` mode yourself); never changed.
        images: ``Tensor[B, C, H, W]`` float, preprocessed for the model.
        method: one of :func:`xai_serve.list_methods`.
        metrics: names from :func:`metric_names` (default: deletion, insertion, road,
            infidelity, max_sensitivity, randomisation).
        target: None (top-1), an int or ``Tensor[B]``: one class per image.
        layer: the method's layer, as for :func:`xai_serve.explain`.
        seed: the seed of the method's and the metrics' random draws (an int).
        batch_size: the method's and the metrics' forward batch (default: the method's own,
            and 64 for the metrics).
        options: the method's options, as ``**options`` of :func:`xai_serve.explain`.
        metric_options: per metric name, settings that replace the defaults in
            :func:`metric_info` (e.g. ``{"road": {"fractions": (0.2, 0.5)}}``).
        maps: ``Tensor[B, H, W]``, maps that ``method`` already made of these images for
            ``target`` (e.g. the answer a server sent, with the ``seed`` it reported): they are
            scored as they are, and the method runs only for the metrics that re-run it.
            ``target`` is then required.
        progress: called as ``progress(fraction, stage)`` with ``fraction`` rising (never
            falling) from 0 to 1.0: before the explanation (``"explain"``), after every chunk
            of every metric's work (the metric's name), and at the end (``"done"``, 1.0).

    Returns:
        An :class:`Evaluation`.

    Raises:
        InvalidInput: an unknown metric (the message lists the known ones), a metric that
            cannot score this method (the message names metric, method and reason), several
            targets per image, bad images or settings.
        NotFound: an unknown method.
    """
    names = _metric_list(metrics)
    get_method(method)  # NotFound for an unknown method, before any work
    options = dict(options or {})
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInput(f"`seed` must be an int, got {seed!r}")
    if progress is not None and not callable(progress):
        raise InvalidInput(f"`progress` must be callable, got {type(progress).__name__}")
    if isinstance(target, Tensor) and target.dim() == 2:
        raise InvalidInput(
            f"metric {names[0]!r} cannot score method {method!r} with several targets per "
            f"image (`target` of shape {tuple(target.shape)}): the metrics give one value per "
            "image; evaluate one target at a time"
        )
    settings = _settings(names, metric_options)
    for name in names:
        reason = _REGISTRY[name].unsupported(method, settings[name], options)
        if reason:
            raise InvalidInput(f"metric {name!r} cannot score method {method!r}: {reason}")
    if batch_size is not None:
        positive_int(batch_size, "`batch_size`")
    forward_batch = batch_size or 64

    def report(done: float, stage: str) -> None:
        if progress is not None:
            progress(min(1.0, done), stage)

    # Stage weights: re-running metrics cost about as much as the first explanation per rerun.
    weights = {"explain": 1.0} | {n: 3.0 if _REGISTRY[n].reruns_method else 1.0 for n in names}
    total = sum(weights.values())
    done = 0.0
    report(0.0, "explain")

    def run(m: nn.Module, x: Tensor, t: Tensor, seeds: int | Tensor) -> Explanation:
        return explain(
            m, x, method, target=t, layer=layer, seed=seeds, batch_size=batch_size, **options
        )

    device = model_device(model)
    exp: Explanation | None = None
    if maps is None:
        exp = run(model, images, target, seed)  # type: ignore[arg-type]
        maps, targets = exp.maps, exp.targets
    else:
        maps, targets = _given(maps, images, target, device)
    if maps.dim() != 3:
        raise InvalidInput(
            f"metric {names[0]!r} cannot score method {method!r}: it returned maps of shape "
            f"{tuple(maps.shape)}, not one [H, W] map per image"
        )
    imgs = images.to(device)
    seeds = (
        exp.seeds
        if exp is not None and exp.seeds is not None
        else torch.full((imgs.shape[0],), seed, dtype=torch.int64, device=device)
    )
    h, w = imgs.shape[-2:]
    if tuple(maps.shape[-2:]) != (h, w):
        raise InvalidInput(
            f"metric {names[0]!r} cannot score method {method!r}: its maps are "
            f"{tuple(maps.shape[-2:])}, not the images' {(h, w)} (set its `size` option)"
        )
    done += weights["explain"]
    values: dict[str, Tensor] = {}
    details: dict[str, dict[str, Any]] = {}
    for name in names:
        report(done / total, name)
        info = _REGISTRY[name]
        s = settings[name] | {"progress": _within(report, done, weights[name], total, name)}
        extra: dict[str, Any] = {}
        if name in ("deletion", "insertion"):
            fn = _m.deletion_auc if name == "deletion" else _m.insertion_auc
            value = fn(model, imgs, maps, targets, batch_size=forward_batch, **s)
        elif name in ("road", "road_lerf"):
            res = _m.road(model, imgs, maps, targets, seed=seed, batch_size=forward_batch, **s)
            value = res.scores
            extra = {"curve": res.curve, "correct": res.correct, "fractions": res.fractions}
        elif name == "infidelity":
            value = _m.infidelity(
                model, imgs, maps, targets, seed=seed, batch_size=forward_batch, **s
            )
        elif name == "max_sensitivity":

            def again(x: Tensor, t: Tensor, rows: Tensor) -> Tensor:
                return run(model, x, t, seeds[rows]).maps

            value = _m.max_sensitivity(again, imgs, targets, seed=seed, reference=maps, **s)
        else:  # randomisation

            def again_model(m: nn.Module, x: Tensor, t: Tensor) -> Tensor:
                return run(m, x, t, seeds).maps

            res_r = _m.randomisation(
                model, imgs, targets, again_model, seed=seed, reference=maps, **s
            )
            value = res_r.scores
            extra = {"correlations": res_r.correlations, "layers": res_r.layers}
        values[name] = value.float()
        details[name] = {"higher_is_better": info.higher_is_better, "settings": settings[name]}
        details[name] |= extra
        done += weights[name]
    report(1.0, "done")
    return Evaluation(
        method=method,
        metrics=values,
        maps=maps,
        targets=targets,
        details=details,
        explanation=exp,
    )


def _given(
    maps: object, images: Tensor, target: int | Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor]:
    """``evaluate``'s given ``maps`` and their ``target`` on ``device``, checked."""
    if not isinstance(maps, Tensor) or not maps.is_floating_point():
        raise InvalidInput(f"`maps` must be a float Tensor[B, H, W], got {type(maps).__name__}")
    batch = images.shape[0] if isinstance(images, Tensor) else -1
    if maps.dim() != 3 or maps.shape[0] != batch:
        raise InvalidInput(
            f"`maps` must be one [H, W] map per image, Tensor[{batch}, H, W]; got "
            f"{tuple(maps.shape)}"
        )
    if target is None:
        raise InvalidInput("`maps` scores given maps: give the `target` they explain")
    targets = torch.as_tensor(target, device=device).to(torch.int64)
    if targets.dim() == 0:
        targets = targets.expand(batch)
    if tuple(targets.shape) != (batch,):
        raise InvalidInput(
            f"`target` must be an int or Tensor[{batch}], got shape {tuple(targets.shape)}"
        )
    return maps.to(device=device, dtype=torch.float32), targets


def _within(
    report: Callable[[float, str], None], done: float, weight: float, total: float, stage: str
) -> Callable[[float], None]:
    """A metric's own progress (0..1 of its work) as a part of the whole evaluation's."""

    def tick(fraction: float) -> None:
        report((done + weight * fraction) / total, stage)

    return tick


def _metric_list(metrics: object) -> list[str]:
    if isinstance(metrics, str):
        metrics = [metrics]
    if not isinstance(metrics, Sequence) or not metrics:
        raise InvalidInput(
            f"`metrics` must be a non-empty list of metric names; known metrics: "
            f"{', '.join(metric_names())}"
        )
    names: list[str] = []
    for name in metrics:
        _lookup(name)
        if name not in names:
            names.append(name)
    return names


def _settings(
    names: list[str], metric_options: Mapping[str, Mapping[str, Any]] | None
) -> dict[str, dict[str, Any]]:
    given = dict(metric_options or {})
    stray = sorted(set(given) - set(names))
    if stray:
        raise InvalidInput(
            f"`metric_options` names metric(s) not evaluated: {', '.join(map(str, stray))} "
            f"(evaluated: {', '.join(names)})"
        )
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        info = _REGISTRY[name]
        extra = dict(given.get(name) or {})
        unknown = sorted(set(extra) - set(info.settings))
        if unknown:
            raise InvalidInput(
                f"metric {name!r} has no setting(s) {', '.join(unknown)}; its settings: "
                f"{', '.join(sorted(info.settings))}"
            )
        out[name] = {**info.settings, **extra}
    return out
