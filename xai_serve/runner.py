"""Explain image files, in this process or through a server, and write what comes back.

What ``xai-serve explain`` and ``xai-serve demo`` are made of:

- :func:`collect_images` turns files, folders and globs into a list of image files (and a
  :class:`Failure` for each argument that names none);
- :class:`LocalRunner` explains them with :func:`xai_serve.explain` in batches on a loaded
  model; :class:`RemoteRunner` sends them to a server over one ``ExplainStream`` per chunk.
  Both yield one :class:`FileResult` or :class:`Failure` per file, so one unreadable image
  never stops the rest, and report a :class:`Partial` after each sampling round of the
  methods that refine in rounds (lime, kernelshap), so that a progress bar moves with the
  samples, not only with finished files;
- :func:`write_result` draws a result (:func:`xai_serve.viz.method_panel`; with several
  classes one panel per class, :func:`xai_serve.viz.panel_grid`) and saves the picture and,
  if asked, the map(s).

Both runners explain one class per image (``target``, default the top-1) or several
(``targets``: the same classes in every image; ``top_labels``: each image's k most likely),
optionally against a ``foil`` class (each map explains ``score(target) - score(foil)``).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xai_serve.errors import InvalidInput, XaiServeError
from xai_serve.imaging import decode_image

__all__ = [
    "IMAGE_SUFFIXES",
    "MAP_FORMATS",
    "Failure",
    "FileResult",
    "LocalRunner",
    "Partial",
    "RemoteRunner",
    "Score",
    "TargetResult",
    "check_classes",
    "collect_images",
    "explain_options",
    "format_seconds",
    "output_names",
    "parse_option",
    "planned_samples",
    "read_image",
    "render",
    "sampling_note",
    "targets_note",
    "write_result",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAP_FORMATS = ("npy", "pt")
MAX_IMAGE_PIXELS = 40_000_000  # the server's default limit, applied to local files too
_GLOB_CHARS = frozenset("*?[")


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Failure:
    """An input that produced no explanation, and why."""

    source: str
    reason: str


def collect_images(specs: Iterable[str]) -> tuple[list[Path], list[Failure]]:
    """The image files named by ``specs``, in order, without duplicates.

    A spec is a file (taken whatever its suffix: decoding says whether it is an image), a folder
    (its files with an :data:`IMAGE_SUFFIXES` suffix, recursively, sorted) or a glob pattern
    (``**`` recurses; quoted so that the shell leaves it alone). A spec that names nothing
    becomes a :class:`Failure`.
    """
    files: list[Path] = []
    failures: list[Failure] = []
    seen: set[Path] = set()

    def add(path: Path) -> None:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            files.append(path)

    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not found:
                failures.append(Failure(spec, f"folder holds no {'/'.join(IMAGE_SUFFIXES)} files"))
            for p in found:
                add(p)
        elif path.is_file():
            add(path)
        elif _GLOB_CHARS & set(spec):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True))
            matches = [p for p in matches if p.is_file()]
            if not matches:
                failures.append(Failure(spec, "no file matches this pattern"))
            for p in matches:
                add(p)
        elif path.exists():
            failures.append(Failure(spec, "not a regular file or folder"))
        else:
            failures.append(Failure(spec, "no such file or folder"))
    return files, failures


def output_names(files: Sequence[Path]) -> list[str]:
    """A distinct output name per file: its stem, with ``-2``, ``-3``, ... for repeats."""
    used: dict[str, int] = {}
    names = []
    for f in files:
        stem = f.stem or "image"
        count = used.get(stem, 0) + 1
        used[stem] = count
        names.append(stem if count == 1 else f"{stem}-{count}")
    return names


def read_image(path: Path) -> tuple[bytes, Tensor]:
    """``(encoded bytes, uint8 RGB [3, H, W])`` of an image file (InvalidInput if unreadable)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidInput(f"cannot read: {exc.strerror or exc}") from None
    return data, decode_image(data, max_pixels=MAX_IMAGE_PIXELS, field="file")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


def parse_option(text: str) -> tuple[str, Any]:
    """``"samples=128"`` -> ``("samples", 128)``: a ``KEY=VALUE`` method option, typed as the
    option is (see :data:`xai_serve.client.OPTION_NAMES`)."""
    from xai_serve.client import option_from_text

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InvalidInput(f"option {text!r} must look like KEY=VALUE, e.g. samples=128")
    key = key.strip()
    return key, option_from_text(key, value.strip())


def planned_samples(method: str, options: Mapping[str, Any]) -> int | None:
    """The samples an image of ``method`` is asked to use: the ``samples`` option, else the
    method's default (None for a method without samples). What a progress bar counts to; an
    image may stop before it (``tolerance``, ``budget_ms``)."""
    from xai_serve.explainers.base import get_method

    value = options.get("samples")
    if value is None:
        try:
            value = get_method(method).options.get("samples")
        except XaiServeError:  # a method only the server knows
            return None
    return int(value) if isinstance(value, int) and value > 0 else None


def check_classes(
    num_classes: int | None,
    *,
    target: int | None = None,
    targets: Sequence[int] | None = None,
    top_labels: int | None = None,
    foil: int | None = None,
) -> None:
    """Check the classes a run explains once, before any image (InvalidInput, naming the
    flag): at most one of ``target``, ``targets`` and ``top_labels``; distinct ``targets``;
    a ``foil`` that is not a target; every class index in ``[0, num_classes)`` and
    ``top_labels`` at most ``num_classes`` (when ``num_classes`` is known)."""
    given = [n for n, v in (("--target", target), ("--targets", targets),
                            ("--top-labels", top_labels)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise InvalidInput(f"{' and '.join(given)} do not go together: give one")
    if targets is not None:
        if not targets:
            raise InvalidInput("--targets needs at least one class")
        repeated = sorted({t for t in targets if list(targets).count(t) > 1})
        if repeated:
            raise InvalidInput(f"--targets names class {repeated[0]} twice")
    if top_labels is not None and top_labels < 1:
        raise InvalidInput(f"--top-labels must be >= 1, got {top_labels}")
    chosen = [target] if target is not None else list(targets or [])
    if foil is not None and foil in chosen:
        raise InvalidInput(f"--foil {foil} is also a target: a class cannot be its own foil")
    for flag, values in (("--target", [target]), ("--targets", targets or []), ("--foil", [foil])):
        for v in values:
            if v is not None and (v < 0 or (num_classes is not None and v >= num_classes)):
                bound = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
                raise InvalidInput(f"{flag}: class {v} is not in {bound}")
    if top_labels is not None and num_classes is not None and top_labels > num_classes:
        raise InvalidInput(f"--top-labels {top_labels}: the model has {num_classes} classes")


def explain_options(options: Mapping[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """``(explain() options, baseline, seed)`` from client-style options: the names are the
    same (one option schema), but ``baseline`` and ``seed`` are explain() arguments of their
    own."""
    rest = dict(options)
    baseline = rest.pop("baseline", None)
    seed = rest.pop("seed", None)
    return rest, baseline, seed


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One of the top classes of the forward pass that was explained."""

    index: int
    label: str
    probability: float


@dataclass(frozen=True, eq=False)
class TargetResult:
    """One explained class of a :class:`FileResult` with several: its map (float32
    ``[H, W]``), segment ``weights`` and their ``stderr`` (lime, kernelshap), and the server's
    ``overlay_png`` when only the server could draw it."""

    target: int
    label: str = ""
    map: Tensor | None = None
    weights: Tensor | None = None
    stderr: Tensor | None = None
    overlay_png: bytes | None = None

    @property
    def text(self) -> str:
        """``"282 tiger cat"`` (or just the index without class names)."""
        return f"{self.target} {self.label}".strip()


@dataclass
class FileResult:
    """The explanation of one file.

    ``view`` is the uint8 RGB ``[3, H, W]`` model input the map explains (None when only the
    server knows the model's transform; then ``overlay_png`` is the server's drawing).
    ``samples``: the model evaluations the image used (sampling methods; fewer than asked when
    it stopped at its ``tolerance`` or ``budget_ms``); ``stderr``: the standard error of each
    of ``weights`` (lime, kernelshap).

    With several classes (``targets``, ``top_labels``), ``per_target`` holds one
    :class:`TargetResult` per class, in order, and ``target``, ``map``, ``weights``,
    ``stderr`` and ``overlay_png`` are the first one's; it is empty for one class.
    ``foil``: the class every map is contrasted with, if any. ``probabilities``: the
    probabilities of classes known besides ``top_k`` (in-process: every explained class).
    """

    source: str
    name: str
    method: str
    model: str
    map: Tensor | None
    target: int
    top_k: list[Score]
    view: Tensor | None = None
    target_label: str = ""
    segments: Tensor | None = None
    weights: Tensor | None = None
    overlay_png: bytes | None = None
    seed: int | None = None
    samples: int | None = None
    stderr: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    per_target: list[TargetResult] = field(default_factory=list)
    foil: int | None = None
    foil_label: str = ""
    probabilities: dict[int, float] = field(default_factory=dict)

    @property
    def target_text(self) -> str:
        """``"282 tiger cat"`` (or just the index without class names)."""
        return f"{self.target} {self.target_label}".strip()

    @property
    def target_probability(self) -> float | None:
        """The probability of the explained class, when it is among ``top_k``."""
        return self.probability(self.target)

    def probability(self, index: int) -> float | None:
        """The probability of class ``index``, when it is among ``top_k`` or
        ``probabilities``."""
        for s in self.top_k:
            if s.index == index:
                return s.probability
        return self.probabilities.get(index)

    @property
    def explained(self) -> list[TargetResult]:
        """Every explained class: ``per_target``, or the one class as a :class:`TargetResult`."""
        if self.per_target:
            return list(self.per_target)
        return [
            TargetResult(self.target, self.target_label, self.map, self.weights, self.stderr,
                         self.overlay_png)
        ]  # fmt: skip

    @property
    def foil_text(self) -> str:
        """``"281 tabby"``, or "" without a foil."""
        return "" if self.foil is None else f"{self.foil} {self.foil_label}".strip()

    def class_text(self, entry: TargetResult) -> str:
        """``"282 tiger cat (45.0%)"``: a class with its probability when it is known."""
        prob = self.probability(entry.target)
        return entry.text + (f" ({prob:.1%})" if prob is not None else "")


@dataclass(frozen=True)
class Partial:
    """How far the sampling of one file has got: ``samples`` used of ``planned`` (None when
    the method's sample count is unknown here)."""

    source: str
    samples: int
    planned: int | None

    @property
    def fraction(self) -> float:
        """Share of the planned samples used, in [0, 1] (0 when the plan is unknown)."""
        return min(1.0, self.samples / self.planned) if self.planned else 0.0


PartialCallback = Callable[[Partial], None]


def sampling_note(result: FileResult) -> str:
    """``"256 samples, weight stderr median 0.0012, max 0.0031"``: how much sampling went into
    a result and how settled its segment weights are ("" for methods without samples)."""
    if not result.samples:
        return ""
    note = f"{result.samples} sample{'s' if result.samples != 1 else ''}"
    if result.stderr is not None and result.stderr.numel():
        se = result.stderr.detach().double().cpu()
        note += f", weight stderr median {float(se.median()):.2g}, max {float(se.max()):.2g}"
    return note


def targets_note(result: FileResult) -> str:
    """``"target 282 tiger cat (45.0%)"`` or ``"targets 282 tiger cat (45.0%), 281 tabby
    (30.1%)"``, followed by ``" vs 285 Egyptian cat"`` with a foil: what a result explains,
    as the command prints it."""
    from xai_serve.viz import contrast

    entries = result.explained
    word = "targets" if len(entries) > 1 else "target"
    return f"{word} " + contrast(", ".join(result.class_text(e) for e in entries), result.foil_text)


def _top_k(logits: Tensor, k: int, label: Callable[[int], str]) -> list[Score]:
    probs = torch.softmax(logits.detach().double().cpu(), dim=0)
    values, index = probs.topk(min(k, probs.numel()))
    return [
        Score(int(i), label(int(i)), float(p))
        for p, i in zip(values.tolist(), index.tolist(), strict=True)
    ]


def render(result: FileResult) -> Tensor:
    """The picture of a result: :func:`xai_serve.viz.method_panel` on the model's view of the
    image, with the explained class and its probability (``"<class> vs <foil>"`` with a
    foil); the server's overlay, labelled, when the view is unknown. With several classes,
    one such panel per class, titled with the class, in rows of four under the method's name
    (:func:`xai_serve.viz.panel_grid`)."""
    from xai_serve import viz

    entries = result.explained
    several = len(entries) > 1
    panels = []
    for entry in entries:
        target = result.class_text(entry)
        title = viz.contrast(target, result.foil_text) if several else result.method
        if result.view is not None and entry.map is not None:
            panels.append(
                viz.method_panel(
                    result.view,
                    result.method,
                    entry.map,
                    title=title,
                    target="" if several else target,
                    foil=result.foil_text,
                    segments=result.segments,
                    weights=entry.weights,
                )
            )
        elif entry.overlay_png is not None:
            drawn = decode_image(entry.overlay_png, max_pixels=MAX_IMAGE_PIXELS, field="overlay")
            lines = [] if several else [f"target {viz.contrast(target, result.foil_text)}"]
            panels.append(viz.panel(drawn, title=title, lines=lines))
        else:
            raise InvalidInput(
                f"{result.source}: nothing to draw for class {entry.target} "
                "(no view and no overlay)"
            )
    return viz.panel_grid(panels, title=result.method if several else "")


def write_result(
    result: FileResult, out_dir: Path, *, save_map: str | None = None, picture: bool = True
) -> list[Path]:
    """Write ``<name>_<method>.png`` (the :func:`render` picture) and, with ``save_map``,
    ``<name>_<method>.npy`` (the float32 map; ``[T, H, W]`` in class order with several
    classes) or ``.pt`` (a dict: map, target, top_k, segments, weights, stderr, samples,
    method, model, source, and ``targets``, ``maps`` ``[T, H, W]``, ``target_weights`` and
    ``target_stderr`` ``[T, S]`` (or None) and ``foil`` for every class, one class included).
    Returns the paths written."""
    from xai_serve import viz

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result.name}_{_safe(result.method)}"
    written = []
    if picture:
        written.append(viz.save_png(render(result), out_dir / f"{stem}.png"))
    if save_map is not None:
        if save_map not in MAP_FORMATS:
            raise InvalidInput(f"save_map must be one of {MAP_FORMATS}, got {save_map!r}")
        entries = result.explained
        tensors = [e.map for e in entries if e.map is not None]
        if len(tensors) < len(entries):
            raise InvalidInput(f"{result.source}: the map was not returned")
        maps = torch.stack([m.detach().float().cpu() for m in tensors])
        path = out_dir / f"{stem}.{save_map}"
        if save_map == "npy":
            np.save(path, (maps if len(entries) > 1 else maps[0]).numpy())
        else:
            torch.save(
                {
                    "map": result.map.detach().float().cpu(),
                    "target": result.target,
                    "top_k": [(s.index, s.label, s.probability) for s in result.top_k],
                    "segments": result.segments,
                    "weights": result.weights,
                    "stderr": result.stderr,
                    "samples": result.samples,
                    "method": result.method,
                    "model": result.model,
                    "source": result.source,
                    "targets": [e.target for e in entries],
                    "maps": maps,
                    "target_weights": _stack([e.weights for e in entries]),
                    "target_stderr": _stack([e.stderr for e in entries]),
                    "foil": result.foil,
                },
                path,
            )
        written.append(path)
    return written


def _stack(values: list[Tensor | None]) -> Tensor | None:
    """``[T, ...]`` float32 CPU of per-class tensors, None when any is missing."""
    if any(v is None for v in values):
        return None
    return torch.stack([v.detach().float().cpu() for v in values])  # type: ignore[union-attr]


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).replace("--", "-")


# --------------------------------------------------------------------------------------------
# Runners
# --------------------------------------------------------------------------------------------

Outcome = FileResult | Failure


@dataclass(frozen=True)
class _Job:
    index: int
    path: Path
    name: str


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, XaiServeError) else f"{type(exc).__name__}: {exc}"


class LocalRunner:
    """Explain files with :func:`xai_serve.explain` on a loaded model, ``batch_size`` images
    per call (default: the model's ``max_batch_size``). A failed batch is retried image by
    image, so only the images at fault fail. ``run(..., on_partial=f)`` calls ``f`` with a
    :class:`Partial` per image of the batch after each sampling round (lime, kernelshap).
    ``target`` / ``targets`` / ``top_labels`` / ``foil``: the classes explained (see the
    module doc), checked against the model once (:func:`check_classes`)."""

    def __init__(
        self,
        model: Any,  # LoadedModel
        method: str,
        *,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        layer: str | None = None,
        options: Mapping[str, Any] | None = None,
        batch_size: int | None = None,
        top_k: int = 3,
    ) -> None:
        from xai_serve.explainers.base import get_method

        cls = get_method(method)  # NotFound for an unknown method, before any file is read
        if method not in model.methods:
            from xai_serve.errors import NotFound

            raise NotFound(
                f"model {model.name!r} does not support {method!r}; it supports: "
                + ", ".join(model.methods)
            )
        check_classes(
            model.num_classes, target=target, targets=targets, top_labels=top_labels, foil=foil
        )
        if not cls.uses_target and (targets is not None or top_labels or foil is not None):
            raise InvalidInput(
                f"method {method!r} does not depend on the class explained: --targets, "
                "--top-labels and --foil do not apply to it"
            )
        self.model = model
        self.method = method
        self.target = target
        self.targets = list(targets) if targets is not None else None
        self.top_labels = top_labels
        self.foil = foil
        self.layer = layer
        self.options, self.baseline, self.seed = explain_options(options or {})
        # checked here, once, rather than as the same failure of every file
        unknown = sorted(set(self.options) - set(cls.options))
        if unknown:
            names = ", ".join(unknown)
            raise InvalidInput(
                f"option{'s' if len(unknown) > 1 else ''} {names} "
                f"{'do' if len(unknown) > 1 else 'does'} not apply to method {method!r} "
                "('xai-serve methods' lists each method's options)"
            )
        self.planned = planned_samples(method, options or {})
        self.batch_size = batch_size or model.max_batch_size
        self.top_k = top_k

    def run(
        self,
        files: Sequence[Path],
        names: Sequence[str] | None = None,
        *,
        on_partial: PartialCallback | None = None,
    ) -> Iterator[Outcome]:
        names = list(names) if names is not None else output_names(files)
        jobs = [_Job(i, p, n) for i, (p, n) in enumerate(zip(files, names, strict=True))]
        for chunk in _chunks(jobs, self.batch_size):
            ready: list[tuple[_Job, Tensor, Tensor]] = []
            for job in chunk:
                try:
                    _, rgb = read_image(job.path)
                    x, view = self.model.preprocess(rgb)
                except XaiServeError as exc:
                    yield Failure(str(job.path), str(exc))
                    continue
                ready.append((job, x, view))
            if ready:
                yield from self._explain(ready, on_partial)

    def _explain(
        self, ready: list[tuple[_Job, Tensor, Tensor]], on_partial: PartialCallback | None
    ) -> Iterator[Outcome]:
        try:
            results = self._batch(ready, on_partial)
        except Exception as exc:
            if len(ready) == 1:
                yield Failure(str(ready[0][0].path), _describe(exc))
                return
            for item in ready:  # find the image at fault; the others still get their answer
                yield from self._explain([item], on_partial)
            return
        yield from results

    def _batch(
        self, ready: list[tuple[_Job, Tensor, Tensor]], on_partial: PartialCallback | None
    ) -> list[FileResult]:
        from xai_serve.explainers.base import Explanation, explain

        model = self.model
        images = torch.stack([x for _, x, _ in ready]).to(model.device)
        progress: Callable[[Explanation], None] | None = None
        if on_partial is not None:
            sources = [str(job.path) for job, _, _ in ready]

            def report(partial: Explanation) -> None:
                if partial.sample_counts is None:
                    return
                for source, count in zip(sources, partial.sample_counts.tolist(), strict=True):
                    on_partial(Partial(source, int(count), self.planned))

            progress = report

        target: int | Tensor | None = self.target
        if self.targets is not None:  # the same classes for every image: Tensor[B, T]
            target = torch.tensor([self.targets] * len(ready), dtype=torch.int64)
        expl = explain(
            model.module,
            images,
            self.method,
            target=target,
            top_labels=self.top_labels,
            foil=self.foil,
            layer=self.layer,
            baseline=self.baseline,
            seed=self.seed,
            progress=progress,
            **self.options,
        )
        out = []
        seeds = expl.seeds.tolist() if expl.seeds is not None else None
        counts = expl.sample_counts.tolist() if expl.sample_counts is not None else None
        several = expl.maps.dim() == 4  # [B, T, H, W]: targets or top_labels
        foils = expl.foils.tolist() if expl.foils is not None else None
        probs = torch.softmax(expl.logits.detach().double().cpu(), dim=1)
        for i, (job, _, view) in enumerate(ready):
            segments = expl.segments[i].cpu() if expl.segments is not None else None
            used = int(segments.max()) + 1 if segments is not None else 0
            entries = [
                TargetResult(
                    target=int(expl.targets[i, j]),
                    label=model.label(int(expl.targets[i, j])),
                    map=expl.maps[i, j].detach().float().cpu(),
                    weights=_used(expl.weights, (i, j), used),
                    stderr=_used(expl.stderr, (i, j), used),
                )
                for j in range(expl.maps.shape[1] if several else 0)
            ] or [
                TargetResult(
                    target=int(expl.targets[i]),
                    label=model.label(int(expl.targets[i])),
                    map=expl.maps[i].detach().float().cpu(),
                    weights=_used(expl.weights, (i,), used),
                    stderr=_used(expl.stderr, (i,), used),
                )
            ]
            first = entries[0]
            foil = int(foils[i]) if foils is not None else None
            samples = int(counts[i]) if counts is not None else int(expl.samples or 0)
            out.append(
                FileResult(
                    source=str(job.path),
                    name=job.name,
                    method=self.method,
                    model=model.name,
                    map=first.map,
                    target=first.target,
                    target_label=first.label,
                    top_k=_top_k(expl.logits[i], self.top_k, model.label),
                    view=view,
                    segments=segments,
                    weights=first.weights,
                    seed=int(seeds[i]) if seeds is not None else None,
                    samples=samples or None,
                    stderr=first.stderr,
                    per_target=entries if several else [],
                    foil=foil,
                    foil_label=model.label(foil) if foil is not None else "",
                    probabilities={e.target: float(probs[i, e.target]) for e in entries},
                )
            )
        return out


def _used(values: Tensor | None, index: tuple[int, ...], used: int) -> Tensor | None:
    """``values[index]``'s first ``used`` segment entries as float32 on the CPU (the batch's
    weights are as wide as its largest id), or None without values or segments."""
    if values is None or used == 0:
        return None
    return values[index][:used].detach().float().cpu()


class RemoteRunner:
    """Explain files through a server: ``chunk`` files per ``ExplainStream`` (the server batches
    them). ``view`` (the model's transform and input size, when this side knows them) draws
    the map on the image as the model saw it; without it the server's overlay is asked for.
    ``run(..., on_partial=f)`` asks the server for partial answers (lime, kernelshap) and
    calls ``f`` with a :class:`Partial` for each. ``target`` / ``targets`` / ``top_labels`` /
    ``foil``: the classes explained (see the module doc; the server checks them); class
    names come from the answer's top-k, which covers ``top_labels``."""

    def __init__(
        self,
        client: Any,  # xai_serve.Client
        model: str,
        method: str,
        *,
        target: int | None = None,
        targets: Sequence[int] | None = None,
        top_labels: int | None = None,
        foil: int | None = None,
        layer: str | None = None,
        options: Mapping[str, Any] | None = None,
        view: Callable[[Tensor], Tensor] | None = None,
        chunk: int = 32,
        top_k: int = 3,
    ) -> None:
        check_classes(None, target=target, targets=targets, top_labels=top_labels, foil=foil)
        self.client = client
        self.model = model
        self.method = method
        self.target = target
        self.targets = list(targets) if targets is not None else None
        self.top_labels = top_labels
        self.foil = foil
        self.layer = layer
        self.options = dict(options or {})
        self.planned = planned_samples(method, self.options)
        self.view = view
        self.chunk = max(1, chunk)
        self.top_k = max(top_k, top_labels or 0)  # the top labels' names and probabilities

    def run(
        self,
        files: Sequence[Path],
        names: Sequence[str] | None = None,
        *,
        on_partial: PartialCallback | None = None,
    ) -> Iterator[Outcome]:
        from xai_serve.client import RemoteError

        names = list(names) if names is not None else output_names(files)
        jobs = [_Job(i, p, n) for i, (p, n) in enumerate(zip(files, names, strict=True))]
        for chunk in _chunks(jobs, self.chunk):
            sent: dict[str, tuple[_Job, Tensor | None]] = {}
            payloads = []
            for job in chunk:
                try:
                    data, rgb = read_image(job.path)
                    view = self.view(rgb) if self.view is not None else None
                except XaiServeError as exc:
                    yield Failure(str(job.path), str(exc))
                    continue
                sent[str(job.index)] = (job, view)
                payloads.append(data)
            if not payloads:
                continue
            stream = self.client.explain_many(
                payloads,
                model=self.model,
                method=self.method,
                target=self.target,
                targets=self.targets,
                top_labels=self.top_labels,
                foil=self.foil,
                layer=self.layer,
                top_k=self.top_k,
                overlay=self.view is None,
                request_ids=list(sent),
                progress=on_partial is not None,
                **self.options,
            )
            for answer in stream:
                job, view = sent[answer.request_id]
                if isinstance(answer, RemoteError):
                    yield Failure(str(job.path), f"{answer.code.name}: {answer.details}")
                    continue
                if answer.partial:
                    if on_partial is not None:
                        on_partial(Partial(str(job.path), answer.samples, self.planned))
                    continue
                labels = {s.index: s.label for s in answer.top_k}
                yield FileResult(
                    source=str(job.path),
                    name=job.name,
                    method=self.method,
                    model=self.model,
                    map=answer.map,
                    target=answer.target,
                    target_label=labels.get(answer.target, ""),
                    top_k=[Score(s.index, s.label, s.probability) for s in answer.top_k],
                    view=view,
                    segments=answer.segments,
                    weights=answer.segment_weights,
                    overlay_png=answer.overlay_png,
                    seed=answer.seed,
                    samples=answer.samples or None,
                    stderr=answer.segment_stderr,
                    extras={"timing": answer.timing},
                    per_target=[
                        TargetResult(
                            target=t.target,
                            label=labels.get(t.target, ""),
                            map=t.map,
                            weights=t.segment_weights,
                            stderr=t.segment_stderr,
                            overlay_png=t.overlay_png,
                        )
                        for t in answer.per_target
                    ],
                    foil=answer.foil,
                    foil_label=labels.get(answer.foil, "") if answer.foil is not None else "",
                )


def format_seconds(seconds: float) -> str:
    """``"850 ms"``, ``"12.3 s"``, ``"2 min 05 s"``."""
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = math.floor(seconds / 60)
    return f"{minutes} min {seconds - 60 * minutes:02.0f} s"
