"""Seed-to-seed stability of LIME and KernelSHAP segment rankings, and what it costs, CPU.

``python -m benchmarks.bench_stability [--quick]`` writes
``benchmarks/results/<date>-cpu-stability.json`` and ``.md``. Everything is measured in one
process, on the bundled EfficientNet-Lite0 (ImageNet weights, ``xai_serve.models.load_model``)
and three ``skimage.data`` photos (chelsea, coffee, astronaut) through ``LoadedModel.preprocess``:

1. **Stability.** A user who asks twice with two seeds should get the same ranking of the
   superpixels. For every configuration (method, ``n_segments``, estimator options, samples)
   and photo, the explainer runs once per seed (seeds ``0 .. 2P-1``, the pairs ``(0, 1)``,
   ``(2, 3)``, ...) and the Spearman rank correlation of the two runs' segment weights (over
   the superpixels the photo has) is taken per pair; reported: its mean and minimum over the
   pairs, per photo.
2. **Time**, as a ratio to *today's default request on the old forward path*: LIME with
   ``samples=256`` / KernelSHAP with ``samples=512``, ``n_segments=50``, on the path every
   forward ran before :func:`xai_serve.tune` existed (fp32, contiguous NCHW, batch 64:
   ``ForwardPath()``). The configurations run on the model's tuned path (``tune`` with the
   cache in ``.benchmarks/tune``; the path it chose is in the results), since that is what a
   request runs on now. Runs are interleaved: for every photo and seed, one baseline request,
   then one request per configuration group; each ratio is the request's time over that
   baseline's, and the table gives the median over photos and seeds.

One request per seed covers several sample counts: a run with ``samples=N`` fits its surrogate
after every round (:func:`xai_serve.explainers.perturbation.round_samples` evaluations) and
reports it through ``progress``; the fit after ``n`` evaluations is distributed exactly as the
answer of a run with ``samples=n`` (LIME's rows are i.i.d.; KernelSHAP's stratified design
gives the first ``T`` units the allocation of ``T`` units), and the time at which it arrives
is the time such a run takes (up to the fits of rounds of another size, ~1% of a run). For
KernelSHAP the counts are those its rounds reach (the first round holds every stratum's
minimum), so a level reads the largest count at or below it, and the table says which.

The baseline requests are themselves seeded runs of today's default on the old path, so their
pairs give today's stability, measured the same way.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.timing import write_results

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TUNE_CACHE = ROOT.parent / ".benchmarks" / "tune"
RAW = ROOT.parent / ".benchmarks" / "stability-runs.pt"

MODEL = "efficientnet_lite0"
PHOTOS = ("chelsea", "coffee", "astronaut")
TARGET = 0.9  # the mean seed-to-seed Spearman a default must reach on every photo

# The estimator options of today's defaults (lime_image's kernel and keep probability; paired
# KernelSHAP). Every request passes its estimator options explicitly, so the measured groups do
# not change meaning when the shipped defaults do.
ESTIMATOR: dict[str, dict[str, Any]] = {
    "lime": {"kernel_width": 0.25, "alpha": 1.0, "keep_prob": 0.5},
    "kernelshap": {"paired": True},
}
# Today's default requests (before this benchmark): what the time ratios divide by.
TODAY: dict[str, dict[str, Any]] = {
    "lime": {"samples": 256, "n_segments": 50, "segmenter": "slic", **ESTIMATOR["lime"]},
    "kernelshap": {
        "samples": 512,
        "n_segments": 50,
        "segmenter": "slic",
        **ESTIMATOR["kernelshap"],
    },
}
# The sample counts the table reports (each group runs up to its own ``samples``): up to today's,
# which a request may use on any path at least as fast as the old one, and for LIME up to twice
# that, which fits today's time on a tuned path at least twice as fast as the old one.
LEVELS: dict[str, tuple[int, ...]] = {
    "lime": (128, 192, 256, 320, 384, 448, 512),
    "kernelshap": (256, 384, 512),
}


def levels(method: str) -> list[int]:
    """:data:`LEVELS` of ``method`` and its shipped default ``samples``."""
    return sorted({*LEVELS[method], _default_group(method).samples})


@dataclass(frozen=True)
class Group:
    """One request per seed: ``method`` with ``n_segments``, the estimator ``options`` that
    differ from :data:`ESTIMATOR` and ``samples``, whose rounds give the table's sample counts
    up to ``samples``."""

    method: str
    n_segments: int
    samples: int
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.options)
        return f"{self.method} n_segments={self.n_segments}{extra}"

    def request_options(self) -> dict[str, Any]:
        return {
            **ESTIMATOR[self.method],
            **dict(self.options),
            "n_segments": self.n_segments,
            "samples": self.samples,
            "segmenter": "slic",
        }


def grid(quick: bool) -> list[Group]:
    """The configurations (today's ``n_segments=50`` is measured by the baseline requests
    themselves): 25 and 35 segments with today's estimators; LIME with a larger keep
    probability (0.7: coalitions nearer the photo) at 25 and 35 segments and with a wider
    kernel (1.0: nearly equal sample weights) at 25; unpaired KernelSHAP at 25; and the shipped
    defaults. LIME at 25 segments runs up to 512 samples, the rest up to today's samples.
    ``quick``: the shipped defaults only."""
    groups = [_default_group("lime"), _default_group("kernelshap")]
    if not quick:
        lime_n, shap_n = max(levels("lime")), max(levels("kernelshap"))
        lime_today = TODAY["lime"]["samples"]
        groups += [
            Group("lime", 25, lime_n),
            Group("lime", 35, lime_today),
            Group("lime", 25, lime_n, (("keep_prob", 0.7),)),
            Group("lime", 35, lime_today, (("keep_prob", 0.7),)),
            Group("lime", 25, lime_n, (("kernel_width", 1.0),)),
            Group("kernelshap", 25, shap_n),
            Group("kernelshap", 35, shap_n),
            Group("kernelshap", 25, shap_n, (("paired", False),)),
        ]
    out: dict[str, Group] = {}
    for g in groups:  # a default group may be a grid group: keep the one with more samples
        if g.request_options() == TODAY[g.method]:
            continue  # today's default: the baseline requests are its runs
        if g.key not in out or g.samples > out[g.key].samples:
            out[g.key] = g
    return list(out.values())


def _default_group(method: str) -> Group:
    """The shipped defaults of ``method`` (its ``options`` ClassVar) as a group."""
    opts = defaults()[method]
    extra = tuple((k, opts[k]) for k, v in ESTIMATOR[method].items() if opts[k] != v)
    return Group(method, int(opts["n_segments"]), int(opts["samples"]), extra)


def defaults() -> dict[str, dict[str, Any]]:
    """The shipped defaults of the options this benchmark varies."""
    from xai_serve.explainers.base import get_method

    out = {}
    for method, estimator in ESTIMATOR.items():
        opts = get_method(method).options
        out[method] = {k: opts[k] for k in ("samples", "n_segments", "segmenter", *estimator)}
    return out


# --------------------------------------------------------------------------- statistics


def _ranks(x: Tensor) -> Tensor:
    """Average ranks (ties share the mean of their positions), float64."""
    x = x.double().flatten()
    order = x.argsort()
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    return (sums / counts)[inverse]


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two weight vectors (ties: average ranks)."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float(ra @ rb) / den if den > 0 else 1.0


# --------------------------------------------------------------------------- runs


def _setup(photos: tuple[str, ...]) -> tuple[Tensor, torch.nn.Module, Any, torch.nn.Module]:
    """``(images [P, 3, 224, 224], old model, tuned path, tuned model)``: the bundled model
    twice, once as loaded (contiguous; the old path) and once tuned, both warmed up."""
    import xai_serve
    from xai_serve.demo import load_photos
    from xai_serve.explainers.forward import ForwardPath, remember
    from xai_serve.models import bundled_model_config, load_model
    from xai_serve.models.tuning import tune

    loaded = load_model(bundled_model_config(MODEL))
    images = torch.stack([loaded.preprocess(rgb)[0] for _, rgb in load_photos(photos)])
    old = loaded.module
    tuned = copy.deepcopy(old)
    remember(old, ForwardPath())
    t0 = time.perf_counter()
    path = tune(tuned, loaded.input_shape, cache_dir=TUNE_CACHE)
    print(f"tuned path: {path.describe()} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for model, p in ((old, ForwardPath()), (tuned, path)):  # first-call set-up of each path
        xai_serve.explain(model, images[:1], "lime", path=p, samples=128, seed=0)
    return images, old, path, tuned


@dataclass
class Run:
    """One seeded request of one photo: the sample count, elapsed time and segment weights
    after every round, and the request's total time."""

    counts: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    weights: list[Tensor] = field(default_factory=list)
    total_s: float = 0.0

    def at(self, level: int) -> int | None:
        """Index of the round with the largest count <= ``level`` (None: none)."""
        best = None
        for i, c in enumerate(self.counts):
            if c <= level:
                best = i
        return best


def _request(
    model: torch.nn.Module, image: Tensor, method: str, seed: int, path: Any, opts: dict
) -> Run:
    import xai_serve

    run = Run()
    t0 = time.perf_counter()

    def progress(e: Any) -> None:
        run.seconds.append(time.perf_counter() - t0)
        run.counts.append(int(e.samples))
        m = int(e.segments.max()) + 1  # SLIC ids are 0 .. m-1
        run.weights.append(e.weights[0, :m].detach().clone())

    xai_serve.explain(model, image, method, seed=seed, path=path, progress=progress, **opts)
    run.total_s = time.perf_counter() - t0
    return run


def measure(
    groups: list[Group], photos: tuple[str, ...], pairs: int, keep: Path | None = None
) -> dict:
    """Every group's runs and the baselines', interleaved (see the module doc). Returns
    ``{"baseline": {method: {photo: [Run per seed]}}, "groups": {key: {photo: [Run]}},
    "tuned_path": str, "tune_speedup": float | None}``, also kept in ``keep`` (if given)
    after every photo."""
    from xai_serve.explainers.forward import ForwardPath

    images, old, path, tuned = _setup(photos)
    old_path = ForwardPath()
    raw: dict[str, Any] = {"baseline": {}, "groups": {}, "tuned_path": path.describe()}
    raw["tune_speedup"] = getattr(path.report, "speedup", None)
    for method in ("lime", "kernelshap"):
        mine = [g for g in groups if g.method == method]
        for p, photo in enumerate(photos):
            image = images[p : p + 1]
            for seed in range(2 * pairs):
                t0 = time.perf_counter()
                base = _request(old, image, method, seed, old_path, TODAY[method])
                raw["baseline"].setdefault(method, {}).setdefault(photo, []).append(base)
                for g in mine:
                    run = _request(tuned, image, method, seed, path, g.request_options())
                    raw["groups"].setdefault(g.key, {}).setdefault(photo, []).append(run)
                print(
                    f"{method} {photo} seed {seed}: baseline {base.total_s:.1f} s, "
                    f"{len(mine)} groups in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
            if keep is not None:
                _save_raw(raw, keep)
    return raw


def _rho(runs: list[Run], index: list[int | None]) -> list[float] | None:
    """Spearman of each seed pair ``(runs[2j], runs[2j+1])`` at the rounds ``index``."""
    out = []
    for j in range(0, len(runs) - 1, 2):
        ia, ib = index[j], index[j + 1]
        if ia is None or ib is None:
            return None
        out.append(spearman(runs[j].weights[ia], runs[j + 1].weights[ib]))
    return out


def _stats(rho: list[float]) -> dict:
    return {"mean": statistics.fmean(rho), "min": min(rho), "pairs": rho}


def _reference_s(baselines: list[Run], j: int) -> float:
    """The baseline time around seed ``j``'s requests: the mean of the baseline run just
    before them and the one just after (the next seed's), where there is one."""
    near = baselines[j : j + 2]
    return statistics.fmean(b.total_s for b in near)


def summarise(groups: list[Group], photos: tuple[str, ...], raw: dict) -> dict:
    """Today's stability, and per group and sample level: per photo mean and min Spearman
    over the pairs, the counts read, and the time ratios to the baseline."""
    today = {}
    for method in ("lime", "kernelshap"):
        base = raw["baseline"][method]
        per = {}
        for photo in photos:
            rho = _rho(base[photo], [len(r.counts) - 1 for r in base[photo]])
            assert rho is not None
            per[photo] = _stats(rho)
        today[method] = {
            **TODAY[method],
            "photos": per,
            "seconds_median": statistics.median(r.total_s for p in photos for r in base[p]),
        }
    rows = []
    for g in groups:
        by_photo = raw["groups"][g.key]
        for level in levels(g.method):
            if level > g.samples:
                continue
            per, ratios, counts = {}, [], set()
            for photo in photos:
                runs = by_photo[photo]
                index = [r.at(level) for r in runs]
                rho = _rho(runs, index)
                if rho is None:
                    break
                per[photo] = _stats(rho)
                baselines = raw["baseline"][g.method][photo]
                for j, (r, i) in enumerate(zip(runs, index, strict=True)):
                    ratios.append(r.seconds[i] / _reference_s(baselines, j))  # type: ignore[index]
                    counts.add(r.counts[i])  # type: ignore[index]
            if len(per) < len(photos):
                continue
            quartiles = statistics.quantiles(ratios, n=4)
            rows.append(
                {
                    "group": g.key,
                    "method": g.method,
                    "n_segments": g.n_segments,
                    "options": dict(g.options),
                    "level": level,
                    "samples": sorted(counts),
                    "photos": per,
                    "time_ratio_median": statistics.median(ratios),
                    "time_ratio_quartiles": [quartiles[0], quartiles[2]],
                    "stable": all(v["mean"] >= TARGET for v in per.values()),
                }
            )
    return {"today": today, "rows": rows}


def _save_raw(raw: dict, path: Path) -> None:
    def plain(run: Run) -> dict:
        return {
            "counts": run.counts,
            "seconds": run.seconds,
            "weights": [w.cpu() for w in run.weights],
            "total_s": run.total_s,
        }

    out = {
        "baseline": {
            m: {p: [plain(r) for r in runs] for p, runs in v.items()}
            for m, v in raw["baseline"].items()
        },
        "groups": {
            k: {p: [plain(r) for r in runs] for p, runs in v.items()}
            for k, v in raw["groups"].items()
        },
        "tuned_path": raw["tuned_path"],
        "tune_speedup": raw["tune_speedup"],
        "minutes": raw.get("minutes", 0.0),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)


def _load_raw(path: Path) -> dict:
    data = torch.load(path)

    def runs(v: dict) -> dict:
        return {p: [Run(**r) for r in rs] for p, rs in v.items()}

    return {
        "baseline": {m: runs(v) for m, v in data["baseline"].items()},
        "groups": {k: runs(v) for k, v in data["groups"].items()},
        "tuned_path": data["tuned_path"],
        "tune_speedup": data["tune_speedup"],
        "minutes": data["minutes"],
    }


# --------------------------------------------------------------------------- report


def _device() -> dict:
    """The CPU as :func:`benchmarks.run._device_label` names it, with its core count."""
    from benchmarks.run import _device_label

    return {**_device_label()[1], "cores": os.cpu_count(), "torch": torch.__version__}


def _cell(v: dict) -> str:
    return f"{v['mean']:.3f} ({v['min']:.3f})"


def _markdown(result: dict) -> str:
    photos = result["photos"]
    d = result["device"]
    lines = [
        "# Seed-to-seed stability of LIME and KernelSHAP (EfficientNet-Lite0, 3 photos)",
        "",
        f"Device: {d['kind']} {d['name']}, {d['cores']} cores, torch {d['torch']} "
        f"({d['threads']} threads), shared with other work; {result['pairs']} seed pairs per "
        f"photo; {result['minutes']:.0f} min.",
        "",
        f"Tuned forward path (what the configurations ran on): `{result['tuned_path']}`; "
        f"today's requests ran on the old path (fp32, contiguous NCHW, batch 64).",
        "",
        "Cells: mean (min) over the seed pairs of the Spearman correlation of the segment "
        "weights of two seeds. Time: median over photos and seeds of the request's time over "
        "the time of today's default request (old path) of the same photo and seed, run just "
        "before it; [quartiles].",
        "",
    ]
    for method in ("lime", "kernelshap"):
        t = result["today"][method]
        dflt = result["defaults"][method]
        lines += [
            f"## {method}",
            "",
            f"Today's default (samples={t['samples']}, n_segments={t['n_segments']}, old path): "
            + ", ".join(f"{p} {_cell(t['photos'][p])}" for p in photos)
            + f"; {t['seconds_median']:.1f} s per request (median, this machine).",
            "",
            f"Shipped defaults: {', '.join(f'{k}={v}' for k, v in dflt.items())}.",
            "",
            "| n_segments | options | samples | "
            + " | ".join(photos)
            + " | forwards / today | time / today | ≥ 0.9 |",
            "|---|---|---|" + "---|" * len(photos) + "---|---|---|",
        ]
        for r in result["rows"]:
            if r["method"] != method:
                continue
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "default"
            n = "/".join(str(c) for c in r["samples"])
            q = r["time_ratio_quartiles"]
            lines.append(
                f"| {r['n_segments']} | {opts} | {n} | "
                + " | ".join(_cell(r["photos"][p]) for p in photos)
                + f" | {max(r['samples']) / t['samples']:.2f}"
                f" | {r['time_ratio_median']:.2f} [{q[0]:.2f}, {q[1]:.2f}] "
                f"| {'yes' if r['stable'] else 'no'} |"
            )
        lines.append("")
    h = result.get("headline")
    if h:
        lines += ["## The shipped defaults", ""]
        for method, v in h.items():
            lines.append(
                f"- {method}: "
                + ", ".join(f"{p} {_cell(v['photos'][p])}" for p in photos)
                + f"; time {v['time_ratio_median']:.2f}x today's default on the old path."
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the shipped defaults only, 2 pairs")
    parser.add_argument("--pairs", type=int, default=None, help="seed pairs per photo (3)")
    parser.add_argument("--photos", default=",".join(PHOTOS))
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: faster than 2 on a shared 2-core machine)",
    )
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    parser.add_argument(
        "--raw",
        default=str(RAW),
        help="where the runs' weights and times are kept (torch.save), for --summarise",
    )
    parser.add_argument(
        "--summarise",
        action="store_true",
        help="no runs: summarise the runs kept in --raw (e.g. after changing the defaults, "
        "when the new defaults are groups that were measured)",
    )
    args = parser.parse_args()
    pairs = args.pairs or (2 if args.quick else 3)
    photos = tuple(args.photos.split(","))
    groups = grid(args.quick)
    began = time.perf_counter()
    if args.summarise:
        raw = _load_raw(Path(args.raw))
        minutes = raw.get("minutes", 0.0)
        missing = [g.key for g in groups if g.key not in raw["groups"]]
        if missing:
            raise SystemExit(f"--raw holds no runs of {missing}; run the benchmark")
        pairs = len(next(iter(raw["baseline"]["lime"].values()))) // 2
    else:
        torch.set_num_threads(args.threads)
        raw = measure(groups, photos, pairs, Path(args.raw))
        minutes = (time.perf_counter() - began) / 60
        raw["minutes"] = minutes
        _save_raw(raw, Path(args.raw))
    summary = summarise(groups, photos, raw)
    headline = {}
    for method in ("lime", "kernelshap"):
        g = _default_group(method)
        for r in summary["rows"]:
            if r["group"] == g.key and r["level"] == g.samples:
                headline[method] = r
    result = {
        "device": _device(),
        "model": MODEL,
        "photos": list(photos),
        "pairs": pairs,
        "quick": args.quick,
        "target": TARGET,
        "tuned_path": raw["tuned_path"],
        "tune_speedup": raw["tune_speedup"],
        "defaults": defaults(),
        "today": summary["today"],
        "rows": summary["rows"],
        "headline": headline,
        "minutes": minutes,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = Path(args.out) if args.out else RESULTS / f"{dt.date.today().isoformat()}-cpu-stability"
    write_results(stem, result, _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
