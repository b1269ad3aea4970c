"""The ``xai-serve tcav``, ``dissect`` and ``visualize`` subcommands: their arguments and runs.

:mod:`xai_serve.cli` registers each (with its model source and remote options) and hands the
parsed arguments here with a :class:`Kit` of its shared helpers (table, progress bar, error
line, model config, client). Each runs in this process on a local model (``--model`` /
``--config``; default the bundled model), or on a server with ``--server``; shows a progress
bar, prints a table, and writes a picture (and with ``--json`` the numbers) into ``--out``.

In this process the images are what a server makes of them: input files resized and
centre-cropped by the model's transform to its input size, in ``[0, 1]``; the model's
normalisation (:func:`normaliser`) runs on every batch the concept methods feed the model.

Exit codes: 0 done; 1 the server cannot be reached, or the run failed; 2 bad arguments, an
unknown model, layer, concept or dataset, or an unreadable input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xai_serve.client import (
    RemoteConceptScore,
    RemoteDissectCategory,
    RemoteDissection,
    RemoteDissectUnit,
    RemoteTCAV,
    RemoteVisualization,
    RemoteVisualizedObjective,
)
from xai_serve.errors import InvalidInput, NotFound, XaiServeError
from xai_serve.models import rgb_normaliser

if TYPE_CHECKING:
    from xai_serve.models import LoadedModel, ModelConfig

__all__ = [
    "DEFAULT_OUT",
    "Kit",
    "add_dissect_arguments",
    "add_tcav_arguments",
    "add_visualize_arguments",
    "run_dissect",
    "run_tcav",
    "run_visualize",
]

EXIT_FAILED = 1
EXIT_USAGE = 2
DEFAULT_OUT = "out"
#: The largest side of a probe image in dissect.png (larger ones are shrunk for the picture).
PICTURE_SIDE = 96
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_EXAMPLES = 4  # probe images per unit in dissect.png
_PICTURE_UNITS = 12  # units in dissect.png, at most


@dataclass(frozen=True)
class Kit:
    """The helpers of :mod:`xai_serve.cli` a command uses: ``table(header, rows)``,
    ``progress_bar(total, enabled=...)`` (a :class:`xai_serve.cli.Progress`), ``error(exc)``
    (one line on stderr), ``model_config(args)`` (the local model's config; None for a remote
    model unknown here), ``client(args)`` (a :class:`xai_serve.client.Client` for
    ``--server``) and ``connect(client, model)`` (the server's models, Unavailable if it cannot
    be reached, NotFound without ``model``)."""

    table: Callable[[Sequence[str], Sequence[Sequence[str]]], str]
    progress_bar: Callable[..., Any]
    error: Callable[[BaseException], None]
    model_config: Callable[[argparse.Namespace], ModelConfig | None]
    client: Callable[[argparse.Namespace], Any]
    connect: Callable[[Any, str | None], list[Any]]


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def _open_unit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1), got {text}")
    return value


def _unit_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _class_index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a class index (an integer >= 0), got {text!r}")
    return value


def _names(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated concepts, e.g. red,stripes_0_wide; got {text!r}"
        )
    return items


def _add_output(p: argparse.ArgumentParser, picture: str) -> None:
    p.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR",
        help=f"folder for {picture} (default {DEFAULT_OUT}/; created if missing, the picture "
        "replaced if there)",
    )  # fmt: skip
    p.add_argument("--json", metavar="FILE", help="also write the numbers as JSON")
    p.add_argument("--device", metavar="DEVICE", help="in-process device, e.g. cpu or cuda")
    p.add_argument(
        "--progress", dest="progress", action="store_const", const=True, default=None,
        help="always show the progress bar (default: on a terminal)",
    )  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)


def _library_help() -> str:
    """The procedural concepts by category, for ``--help``."""
    from xai_serve.concepts.library import concept_names

    return "; ".join(
        f"{category}: {', '.join(concept_names(category))}"
        for category in ("color", "texture", "shape")
    )


def add_tcav_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``xai-serve tcav`` (besides the model source and remote options)."""
    p.add_argument(
        "--target", type=_class_index, required=True, metavar="K",
        help="the class whose sensitivity to the concepts is measured",
    )  # fmt: skip
    p.add_argument(
        "--concepts", type=_names, required=True, metavar="C,C,...",
        help=f"comma-separated concepts: procedural ones ({_library_help()}) or folders of "
        "images of a concept of your own, named by the folder (their images are sent with "
        "--server)",
    )  # fmt: skip
    p.add_argument(
        "--images", nargs="+", required=True, metavar="PATH",
        help="images of the target class: files, folders or globs",
    )  # fmt: skip
    p.add_argument("--layer", metavar="NAME", help="layer (default: the model's CAM layer)")
    p.add_argument(
        "--runs", type=_int_at_least(2), metavar="R",
        help="CAVs per concept, each against its own random set (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--random-size", type=_int_at_least(2), metavar="N",
        help="images per generated random set (default 32)",
    )  # fmt: skip
    p.add_argument(
        "--concept-size", type=_int_at_least(2), metavar="N",
        help="images per procedural concept (default 32)",
    )  # fmt: skip
    p.add_argument(
        "--alpha", type=_open_unit, metavar="A", help="significance level (default 0.05)"
    )
    p.add_argument("--seed", type=int, metavar="S", help="seed of the random sets (default 0)")
    _add_output(p, "tcav.png")


def add_dissect_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``xai-serve dissect`` (besides the model source and remote options)."""
    p.add_argument("--layer", metavar="NAME", help="layer (default: the model's CAM layer)")
    p.add_argument(
        "--dataset", default="", metavar="NAME|DIR",
        help="probe images: 'procedural' (default, the bundled procedural concepts) or, in "
        "this process, a Broden-style folder (images/, masks/<concept>/, concepts.csv); with "
        "--server, a dataset the server's config declares",
    )  # fmt: skip
    p.add_argument(
        "--per-concept", type=_int_at_least(1), metavar="N",
        help="procedural set: images per concept (default 16)",
    )  # fmt: skip
    p.add_argument(
        "--top", type=_int_at_least(1), default=10, metavar="N",
        help="units in the table, best IoU first (default 10)",
    )  # fmt: skip
    p.add_argument(
        "--quantile", type=_open_unit, metavar="Q",
        help="each unit's threshold keeps its top Q of activations (default 0.005)",
    )  # fmt: skip
    p.add_argument(
        "--min-iou", type=_unit_interval, metavar="IOU",
        help="a unit whose best IoU is above this detects its concept (default 0.04)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, metavar="S", help="procedural set's seed (default 0)")
    _add_output(p, "dissect.png")


def add_visualize_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``xai-serve visualize`` (besides the model source and remote options)."""
    p.add_argument(
        "objectives", nargs="+", metavar="OBJECTIVE",
        help="channel:<layer>:<c>, unit:<layer>:<c>[:<y>:<x>] or logit:<k>; all optimised "
        "as one batch",
    )  # fmt: skip
    p.add_argument(
        "--steps", type=_int_at_least(1), metavar="N", help="optimisation steps (default 256)"
    )
    p.add_argument(
        "--size", type=_int_at_least(8), metavar="N", help="image side in pixels (default 128)"
    )
    p.add_argument("--lr", type=_positive_number, metavar="LR", help="learning rate (0.05)")
    p.add_argument("--seed", type=int, metavar="S", help="seed (default 0)")
    p.add_argument(
        "--columns", type=_int_at_least(1), default=4, metavar="N",
        help="images per row of visualize.png (default 4)",
    )  # fmt: skip
    _add_output(p, "visualize.png")


# --------------------------------------------------------------------------------------------
# Shared
# --------------------------------------------------------------------------------------------


def _load(args: argparse.Namespace, kit: Kit) -> LoadedModel:
    from xai_serve.models import load_model

    cfg = kit.model_config(args)
    assert cfg is not None  # a local model always has a config
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    return load_model(cfg)


def _remote_name(args: argparse.Namespace, kit: Kit) -> str:
    cfg = kit.model_config(args)
    return cfg.name if cfg is not None else args.model


def _side(model: LoadedModel) -> int:
    """The side of the square concept and probe images made for ``model`` (as the server
    makes them): the larger side of its input."""
    return max(model.input_shape[1:])


def _batch(model: LoadedModel) -> int:
    """Images per forward of a concept method: the model's batch size, as on the server."""
    return max(1, model.max_batch_size)


def _layer(model: LoadedModel, layer: str | None) -> str:
    if layer:
        return layer
    if model.default_layer is None:
        raise InvalidInput(f"model {model.name!r} has no default layer: name one with --layer")
    return model.default_layer


def _bar(args: argparse.Namespace, kit: Kit) -> tuple[Any, Callable[[float, str], None]]:
    bar = kit.progress_bar(1, enabled=args.progress)

    def report(fraction: float, stage: str) -> None:
        bar.partial("run", fraction, f"{stage} {100 * min(1.0, max(0.0, fraction)):.0f}%")

    return bar, report


def _exit_code(exc: BaseException) -> int:
    return EXIT_USAGE if isinstance(exc, (InvalidInput, NotFound)) else EXIT_FAILED


def _run(
    args: argparse.Namespace, kit: Kit, work: Callable[[Callable[[float, str], None]], Any]
) -> tuple[int, Any]:
    """``work(progress)`` under a progress bar; ``(0, its result)`` or ``(exit code, None)``
    after printing why it failed."""
    bar, report = _bar(args, kit)
    try:
        return 0, work(report)
    except XaiServeError as exc:
        bar.close()
        kit.error(exc)
        return _exit_code(exc), None
    except (RuntimeError, OSError) as exc:  # e.g. out of memory: one line, not a traceback
        bar.close()
        text = str(exc).strip().splitlines()
        kit.error(RuntimeError(f"{type(exc).__name__}: {text[0] if text else ''}"))
        return EXIT_FAILED, None
    except KeyboardInterrupt:
        bar.close()
        return 130, None
    finally:
        bar.close()


def _write(
    args: argparse.Namespace, kit: Kit, name: str, picture: Tensor, numbers: dict[str, Any]
) -> int:
    from xai_serve.viz import save_png

    try:
        path = save_png(picture, Path(args.out) / name)
        written = [str(path)]
        if args.json:
            out = Path(args.json)
            if out.parent != Path(""):
                out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(numbers, indent=2) + "\n")
            written.append(str(out))
    except OSError as exc:
        kit.error(InvalidInput(f"cannot write {exc.filename or args.out}: {exc.strerror or exc}"))
        return EXIT_FAILED
    print("wrote " + ", ".join(written), file=sys.stderr)
    return 0


def _where(args: argparse.Namespace, model: Any) -> str:
    return f"via {args.server}" if args.server else f"in-process on {model.device}"


# --------------------------------------------------------------------------------------------
# tcav
# --------------------------------------------------------------------------------------------


def _concept_specs(items: Sequence[str]) -> list[str | Path]:
    """Each ``--concepts`` item: a library concept's name, or a folder of one's own."""
    specs: list[str | Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            specs.append(path)
        elif os.sep in item or item.startswith((".", "~")) or (os.altsep and os.altsep in item):
            raise InvalidInput(f"--concepts: {item!r} is not a folder")
        else:
            specs.append(item)
    names = [s.name if isinstance(s, Path) else s for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise InvalidInput(f"--concepts names {repeated[0]!r} twice")
    return specs


def _check_library_names(specs: Sequence[str | Path]) -> None:
    from xai_serve.concepts.library import concept_names

    known = concept_names()
    for s in specs:
        if isinstance(s, str) and s not in known:
            raise NotFound(
                f"--concepts: no procedural concept {s!r} (the concepts: {', '.join(known)}); "
                "or give a folder of images"
            )


def _folder_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise InvalidInput(
            f"--concepts: folder {str(folder)!r} has no {'/'.join(_IMAGE_SUFFIXES)} files"
        )
    return files


def _input_files(specs: Sequence[str]) -> list[Path]:
    from xai_serve.runner import collect_images

    files, failures = collect_images(specs)
    if failures:
        raise InvalidInput(f"--images {failures[0].source}: {failures[0].reason}")
    return files


def _input_images(model: LoadedModel, files: Sequence[Path]) -> Tensor:
    """The files as the model's transform resizes and crops them, RGB in ``[0, 1]``
    (``Tensor[N, 3, H, W]``), not normalised."""
    from xai_serve.models.registry import preprocess_image
    from xai_serve.runner import read_image

    plain = dataclasses.replace(model.config.transform, mean=(0.0,), std=(1.0,), grayscale=False)
    out = []
    for f in files:
        try:
            _, rgb = read_image(f)
            out.append(preprocess_image(rgb, plain, model.input_shape[1:])[0])
        except XaiServeError as exc:
            raise type(exc)(f"--images {f}: {exc}") from None
    return torch.stack(out)


def _local_tcav(
    args: argparse.Namespace,
    model: LoadedModel,
    specs: Sequence[str | Path],
    files: Sequence[Path],
    progress: Callable[[float, str], None],
) -> RemoteTCAV:
    from xai_serve.concepts.library import concept_from_images, procedural
    from xai_serve.concepts.tcav import tcav

    layer = _layer(model, args.layer)
    inputs = _input_images(model, files).to(model.device)
    side = _side(model)
    seed = 0 if args.seed is None else args.seed
    sets = [
        concept_from_images(s.name, _folder_files(s), size=side, device=model.device)
        if isinstance(s, Path)
        else procedural(s, args.concept_size or 32, size=side, seed=seed, device=model.device)
        for s in specs
    ]
    result = tcav(
        model.module, inputs, sets, args.target, layer,
        random_sets=args.random_size or 32, runs=args.runs or 10,
        transform=rgb_normaliser(model.config.transform, model.input_shape[1:]),
        batch_size=_batch(model), seed=seed,
        alpha=0.05 if args.alpha is None else args.alpha, progress=progress,
    )  # fmt: skip
    return RemoteTCAV(
        request_id="",
        model=model.name,
        layer=result.layer,
        target=args.target,
        concepts=tuple(
            RemoteConceptScore(
                concept=c.concept,
                scores=tuple(float(v) for v in c.scores.tolist()),
                mean=float(c.mean),
                std=float(c.std),
                p_value=float(c.p_value),
                significant=bool(c.significant),
                cav_accuracies=tuple(float(v) for v in c.accuracies.tolist()),
            )
            for c in result.concepts
        ),
        random_scores=tuple(float(v) for v in result.random_scores.tolist()),
        alpha=float(result.alpha),
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(correction=1)) if len(values) > 1 else 0.0


def tcav_rows(result: RemoteTCAV) -> tuple[list[str], list[list[str]]]:
    """The TCAV table: per concept its mean score ± std, p-value, a ``*`` when significant,
    and the mean held-out accuracy of its CAVs; then the random CAVs' scores."""
    header = ["concept", "TCAV score", "p-value", "significant", "CAV accuracy"]
    rows = []
    for c in result.concepts:
        accuracy, _ = _mean_std(c.cav_accuracies)
        rows.append([c.concept, f"{c.mean:.3f} ± {c.std:.3f}", f"{c.p_value:.3g}",
                     "*" if c.significant else "", f"{accuracy:.3f}"])  # fmt: skip
    mean, std = _mean_std(result.random_scores)
    rows.append(["(random)", f"{mean:.3f} ± {std:.3f}", "-", "", "-"])
    return header, rows


def run_tcav(args: argparse.Namespace, kit: Kit) -> int:
    """Run ``xai-serve tcav`` with parsed ``args``."""
    try:
        specs = _concept_specs(args.concepts)
        files = _input_files(args.images)
        if not args.server:
            _check_library_names(specs)
    except XaiServeError as exc:
        kit.error(exc)
        return EXIT_USAGE
    where = {"model": None}

    def work(progress: Callable[[float, str], None]) -> RemoteTCAV:
        if args.server:
            name = _remote_name(args, kit)
            with kit.client(args) as client:
                served = {m.name: m for m in kit.connect(client, name)}
                if args.target >= served[name].num_classes:
                    raise InvalidInput(
                        f"--target {args.target} is out of range: {name} has "
                        f"{served[name].num_classes} classes"
                    )
                concepts = [(s.name, [str(f) for f in _folder_files(s)]) if isinstance(s, Path)
                            else s for s in specs]  # fmt: skip
                return client.tcav(
                    [str(f) for f in files], model=name, layer=args.layer, target=args.target,
                    concepts=concepts, runs=args.runs, random_size=args.random_size,
                    concept_size=args.concept_size, alpha=args.alpha, seed=args.seed,
                    progress=progress, timeout=None,
                )  # fmt: skip
        model = _load(args, kit)
        where["model"] = model
        return _local_tcav(args, model, specs, files, progress)

    code, result = _run(args, kit, work)
    if result is None:
        return code
    from xai_serve.viz_concepts import tcav_chart

    model = where["model"]
    label = model.label(result.target) if model is not None else ""
    label = f" ({label})" if label else ""
    runs = len(result.random_scores)
    print(
        f"TCAV of class {result.target}{label} of {result.model} at layer {result.layer} "
        f"{_where(args, model)}: {len(files)} input image{'s' if len(files) != 1 else ''}, "
        f"{runs} runs against random sets, alpha {result.alpha:g}",
        file=sys.stderr,
    )
    header, rows = tcav_rows(result)
    print(kit.table(header, rows), flush=True)
    random_mean, random_std = _mean_std(result.random_scores)
    picture = tcav_chart(
        [c.concept for c in result.concepts],
        [c.mean for c in result.concepts],
        [c.std for c in result.concepts],
        [c.significant for c in result.concepts],
        random_mean=random_mean,
        random_std=random_std,
        title=f"TCAV: class {result.target}{label} at {result.layer}",
        lines=[f"{result.model}, {len(files)} inputs, {runs} runs, alpha {result.alpha:g}"],
    )
    numbers = {"command": "tcav", "inputs": [str(f) for f in files], **dataclasses.asdict(result)}
    return _write(args, kit, "tcav.png", picture, numbers)


# --------------------------------------------------------------------------------------------
# dissect
# --------------------------------------------------------------------------------------------


def _probe(args: argparse.Namespace, model: LoadedModel) -> Any:
    from xai_serve.concepts.library import load_probe_folder, probe_dataset

    size = _side(model)
    seed = 0 if args.seed is None else args.seed
    if args.dataset in ("", "procedural"):
        return probe_dataset(per_concept=args.per_concept or 16, size=size, seed=seed)
    if Path(args.dataset).expanduser().is_dir():
        if args.per_concept is not None:
            raise InvalidInput("--per-concept sizes the procedural set, not a folder's")
        return load_probe_folder(Path(args.dataset).expanduser(), size=size)
    raise NotFound(
        f"--dataset {args.dataset!r}: in this process use 'procedural' or a Broden-style folder "
        "(images/, masks/<concept>/)"
    )


def _float32(value: float) -> float:
    """``value`` rounded to float32, as a float field of the wire carries it."""
    return float(torch.tensor(value, dtype=torch.float32))


def _for_picture(images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Probe images (uint8) and their unit masks shrunk to at most :data:`PICTURE_SIDE`."""
    side = max(images.shape[-2:])
    if side <= PICTURE_SIDE or images.shape[0] == 0:
        return images, masks
    size = (
        max(1, round(images.shape[-2] * PICTURE_SIDE / side)),
        max(1, round(images.shape[-1] * PICTURE_SIDE / side)),
    )
    small = F.interpolate(
        images.float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    small = small.round_().clamp_(0, 255).to(torch.uint8)
    shrunk = F.interpolate(masks[:, None].float(), size=size, mode="nearest-exact")[:, 0] > 0.5
    return small, shrunk


def _local_dissect(
    args: argparse.Namespace, model: LoadedModel, progress: Callable[[float, str], None]
) -> tuple[RemoteDissection, Tensor]:
    from xai_serve.concepts.dissection import (
        DEFAULT_MIN_IOU,
        DEFAULT_QUANTILE,
        dissect,
        unit_examples,
    )
    from xai_serve.viz_concepts import CategoryCount, UnitExamples, dissection_figure

    layer = _layer(model, args.layer)
    data = _probe(args, model)
    size = tuple(model.input_shape[1:])
    transform = rgb_normaliser(model.config.transform, size)
    d = dissect(
        model.module, layer, data, transform=transform, progress=progress,
        batch_size=_batch(model),
        quantile=DEFAULT_QUANTILE if args.quantile is None else args.quantile,
        min_iou=DEFAULT_MIN_IOU if args.min_iou is None else args.min_iou,
    )  # fmt: skip
    thresholds = d.threshold.float().cpu().tolist()
    summary = {
        name: RemoteDissectCategory(c.category, c.units, dict(c.concepts))
        for name, c in d.summary().items()
    }
    result = RemoteDissection(
        request_id="",
        model=model.name,
        layer=d.layer,
        total_units=d.units,
        units=tuple(
            RemoteDissectUnit(r.unit, r.concept, r.category, float(r.iou), thresholds[r.unit])
            for r in d.table(args.top)
        ),
        summary=summary,
        min_iou=_float32(d.min_iou),
    )
    # the picture: per concept its best unit (detectors first), best IoU first
    chosen, seen = [], set()
    for r in d.table():
        if r.concept not in seen:
            seen.add(r.concept)
            chosen.append(r)
    detectors = [r for r in chosen if r.iou > d.min_iou]
    chosen = (detectors or chosen)[:_PICTURE_UNITS]
    examples = unit_examples(
        model.module, layer, data, transform, [r.unit for r in chosen], d.threshold,
        [d.concepts.index(r.concept) for r in chosen], per_unit=_EXAMPLES,
        batch_size=_batch(model),
    )  # fmt: skip
    examples = [_for_picture(images, masks) for images, masks in examples]
    scale = max(1, 128 // int(examples[0][0].shape[-1])) if examples else 1
    picture = dissection_figure(
        [
            UnitExamples(r.unit, r.concept, r.category, float(r.iou), imgs, masks)
            for r, (imgs, masks) in zip(chosen, examples, strict=True)
        ],
        [CategoryCount(c.category, c.units, c.concepts) for c in summary.values()],
        total_units=d.units,
        min_iou=d.min_iou,
        title=f"{model.name} {d.layer}: best unit per concept",
        columns=2 if len(chosen) > 4 else 1,
        lines=["outlined: where the unit's activation is above its threshold"],
        scale=scale,
    )
    return result, picture


def dissect_rows(result: RemoteDissection) -> tuple[list[str], list[list[str]]]:
    """The table of units: unit, its best concept, the concept's category, the IoU (a ``*``
    marks a detector: IoU above ``min_iou``)."""
    rows = [
        [str(u.unit), u.concept, u.category, f"{u.iou:.3f}{' *' if u.iou > result.min_iou else ''}"]
        for u in result.units
    ]
    return ["unit", "concept", "category", "IoU"], rows


def summary_rows(result: RemoteDissection) -> tuple[list[str], list[list[str]]]:
    """The per-category table: detectors, distinct concepts, and the concepts detected."""
    rows = [[c.category, str(c.units), str(len(c.concepts)),
             ", ".join(f"{k} {v}" for k, v in c.concepts.items()) or "-"]
            for c in result.summary.values()]  # fmt: skip
    return ["category", "detectors", "concepts", "detected (units)"], rows


def run_dissect(args: argparse.Namespace, kit: Kit) -> int:
    """Run ``xai-serve dissect`` with parsed ``args``."""
    if args.server and args.dataset and Path(args.dataset).expanduser().is_dir():
        kit.error(InvalidInput(
            f"--dataset {args.dataset}: a folder is read in this process; with --server name a "
            "dataset the server's config declares"
        ))  # fmt: skip
        return EXIT_USAGE
    where: dict[str, Any] = {"model": None, "picture": None}

    def work(progress: Callable[[float, str], None]) -> RemoteDissection:
        if args.server:
            name = _remote_name(args, kit)
            with kit.client(args) as client:
                kit.connect(client, name)
                return client.dissect(
                    model=name, layer=args.layer, dataset=args.dataset,
                    per_concept=args.per_concept, quantile=args.quantile, min_iou=args.min_iou,
                    top=args.top, seed=args.seed, progress=progress, timeout=None,
                )  # fmt: skip
        model = _load(args, kit)
        where["model"] = model
        result, where["picture"] = _local_dissect(args, model, progress)
        return result

    code, result = _run(args, kit, work)
    if result is None:
        return code
    print(
        f"Network Dissection of {result.model} layer {result.layer} {_where(args, where['model'])}"
        f": {result.detectors} of {result.total_units} units detect a concept "
        f"(IoU > {result.min_iou:g}, marked *)",
        file=sys.stderr,
    )
    print(kit.table(*dissect_rows(result)), flush=True)
    print()
    print(kit.table(*summary_rows(result)), flush=True)
    picture = where["picture"]
    if picture is None:
        from xai_serve.viz_concepts import CategoryCount, detector_chart

        picture = detector_chart(
            [CategoryCount(c.category, c.units, c.concepts) for c in result.summary.values()],
            total_units=max(1, result.total_units),
            min_iou=result.min_iou,
            title=f"{result.model} {result.layer}: detectors per category",
            lines=[
                "top units (the server sends the table; run in-process for their masks):",
                *(
                    f"unit {u.unit}: {u.concept} ({u.category}) IoU {u.iou:.3f}"
                    for u in result.units
                ),
            ],
        )
    numbers = {"command": "dissect", **dataclasses.asdict(result)}
    return _write(args, kit, "dissect.png", picture, numbers)


# --------------------------------------------------------------------------------------------
# visualize
# --------------------------------------------------------------------------------------------


def _local_visualize(
    args: argparse.Namespace,
    model: LoadedModel,
    objectives: Sequence[str],
    progress: Callable[[float, str], None],
) -> RemoteVisualization:
    from xai_serve.concepts.visualize import visualize
    from xai_serve.imaging import encode_png

    def steps_done(step: int, steps: int) -> None:
        progress(step / steps, f"step {step}/{steps}")

    v = visualize(
        model.module, list(objectives), steps=args.steps or 256, size=args.size or 128,
        lr=0.05 if args.lr is None else args.lr, seed=0 if args.seed is None else args.seed,
        transform=rgb_normaliser(model.config.transform), progress=steps_done,
    )  # fmt: skip
    pixels = v.images.detach().float().cpu().mul(255.0).round_().clamp_(0, 255).to(torch.uint8)
    return RemoteVisualization(
        request_id="",
        model=model.name,
        images=tuple(
            RemoteVisualizedObjective(
                objective=text,
                png=encode_png(pixels[i]),
                trace=tuple(float(t) for t in v.trace[i].tolist()),
                value=float(v.values[i]),
            )
            for i, text in enumerate(objectives)
        ),
    )


def visualize_rows(result: RemoteVisualization) -> tuple[list[str], list[list[str]]]:
    """The table: each objective's value at the first step and at its final image."""
    rows = [[o.objective, f"{o.trace[0]:.4g}" if o.trace else "-", f"{o.value:.4g}"]
            for o in result.images]  # fmt: skip
    return ["objective", "first step", "final"], rows


def run_visualize(args: argparse.Namespace, kit: Kit) -> int:
    """Run ``xai-serve visualize`` with parsed ``args``."""
    from xai_serve.concepts.visualize import parse_objective

    objectives = [o.strip() for o in args.objectives]
    try:
        for o in objectives:
            parse_objective(o)
    except XaiServeError as exc:
        kit.error(exc)
        return EXIT_USAGE
    where: dict[str, Any] = {"model": None}

    def work(progress: Callable[[float, str], None]) -> RemoteVisualization:
        if args.server:
            name = _remote_name(args, kit)
            with kit.client(args) as client:
                kit.connect(client, name)
                return client.visualize(
                    objectives, model=name, steps=args.steps, size=args.size, lr=args.lr,
                    seed=args.seed, progress=progress, timeout=None,
                )  # fmt: skip
        model = _load(args, kit)
        where["model"] = model
        return _local_visualize(args, model, objectives, progress)

    code, result = _run(args, kit, work)
    if result is None:
        return code
    from xai_serve.viz_concepts import objective_grid

    try:
        images = [o.image for o in result.images]
    except XaiServeError as exc:
        kit.error(exc)
        return EXIT_FAILED
    steps = len(result.images[0].trace) if result.images else 0
    print(
        f"feature visualisation on {result.model} {_where(args, where['model'])}: "
        f"{len(images)} objective{'s' if len(images) != 1 else ''}, {steps} steps",
        file=sys.stderr,
    )
    print(kit.table(*visualize_rows(result)), flush=True)
    picture = objective_grid(
        images,
        [[o.objective, f"value {o.value:.4g}"] for o in result.images],
        columns=args.columns,
        title=f"{result.model}: feature visualisation, {steps} steps",
    )
    numbers = {
        "command": "visualize",
        "request_id": result.request_id,
        "model": result.model,
        "objectives": [
            {"objective": o.objective, "value": o.value, "trace": list(o.trace)}
            for o in result.images
        ],
    }
    return _write(args, kit, "visualize.png", picture, numbers)
