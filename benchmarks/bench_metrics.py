"""Quality metrics (issue 17): ours vs captum's and Quantus' on the same work, in one run.

``python -m benchmarks.bench_metrics [--quick]`` writes
``benchmarks/results/<date>-<device>-metrics.{json,md}`` (``--quick``: ``...-metrics-quick``, a
smoke run of the script at 64 x 64 with 2 images: noisy, not a measurement to keep).

Setup: torchvision resnet18 with seeded random weights (speed does not depend on the weights'
values), eval mode, fp32; ``B = 4`` random 224 x 224 images, their top-1 classes as targets,
and saliency maps from ``xai_serve.explain(..., "saliency")``.

Rows, each timed interleaved with its peers (A, B, C, C, B, A, ...; the machine's speed
drifts), medians of ``--rounds`` rounds after a warm-up call each; ``x faster`` = the peer's
time / ours:

- ``infidelity``: :func:`xai_serve.explainers.metrics.infidelity` vs
  ``captum.metrics.infidelity``, ``S = 10`` perturbations per image, the same draws (one
  ``Tensor[B, S, 1, H, W]`` handed to both), ``normalize=True``, every perturbed image in one
  forward for both (captum's ``max_examples_per_batch=None``). Both batch: expect ~1.
- ``max_sensitivity``: :func:`~xai_serve.explainers.metrics.max_sensitivity` vs
  ``captum.metrics.sensitivity_max`` and ``quantus.MaxSensitivity`` (``normalise`` and ``abs``
  off), ``S = 10`` draws, the same draws and the same explanation function (our saliency).
  captum stacks the draws like ours (expect ~1); Quantus explains one draw at a time through
  NumPy.
- ``road``: :func:`~xai_serve.explainers.metrics.road` (batched conjugate-gradient imputation
  on the device) vs Quantus' ROAD loop (``quantus.ROAD.evaluate_batch``: one scipy sparse
  solve of ``noisy_linear_imputation`` per image and fraction, one forward per fraction),
  fractions 10%..90%, imputation noise 0.01, the same pixel order. ``quantus.ROAD`` itself
  cannot run on 3-channel images (it ranks ``C * H * W`` entries and indexes ``H * W``
  pixels: an IndexError), so the row times its loop with its imputation function.
  ``top1_agreement``: the share of (image, fraction) where both keep / lose the top-1 class
  (the noise draws differ, so 1.0 is not guaranteed).

Each row records ``max_rel_diff`` against the peer where the numbers are comparable.
Quantus' ``Infidelity`` (square-patch baseline perturbations) and ``MPRT`` (every layer,
its own similarity pipeline) define different quantities and are not timed here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import xai_serve
from benchmarks.timing import interleaved_medians, write_results
from xai_serve.explainers import metrics

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = 10


def _setup(quick: bool) -> tuple[torch.nn.Module, Tensor, Tensor, Tensor]:
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    b, side = (2, 64) if quick else (4, 224)
    images = torch.rand(b, 3, side, side, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        targets = model(images).argmax(dim=1)
    maps = xai_serve.explain(model, images, "saliency", target=targets).maps
    return model, images, targets, maps


def _rel(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    a = torch.as_tensor(np.asarray(a, dtype=np.float64))
    b = torch.as_tensor(np.asarray(b, dtype=np.float64))
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def bench(quick: bool, rounds: int) -> dict[str, Any]:
    import quantus
    import quantus.functions.perturb_func
    from captum.metrics import infidelity as captum_infidelity
    from captum.metrics import sensitivity_max

    model, images, targets, maps = _setup(quick)
    b, c, h, w = images.shape
    g = torch.Generator().manual_seed(2)
    pert = 0.1 * torch.randn(b, SAMPLES, 1, h, w, generator=g)
    noise = (torch.rand(b, SAMPLES, c, h, w, generator=g) * 2 - 1) * 0.02
    rows: dict[str, Any] = {}

    # -- infidelity
    def ours_inf() -> Tensor:
        return metrics.infidelity(
            model, images, maps, targets, perturbations=pert, normalize=True, batch_size=b * SAMPLES
        )

    flat = pert.flatten(0, 1).expand(-1, c, -1, -1)
    full = maps[:, None].expand(-1, c, -1, -1) / c  # channel attributions that sum to the map

    def captum_inf() -> Tensor:
        return captum_infidelity(
            model,
            lambda x: (flat, x - flat),
            images,
            full,
            target=targets,
            n_perturb_samples=SAMPLES,
            normalize=True,
        )

    t = interleaved_medians({"ours": ours_inf, "captum": captum_inf}, rounds)
    rows["infidelity"] = {
        "median_s": t,
        "x_faster": {"captum": t["captum"] / t["ours"]},
        "max_rel_diff": {"captum": _rel(ours_inf(), captum_inf())},
    }

    # -- max-sensitivity: the same explanation function for everyone
    def saliency(x: Tensor, t: Tensor) -> Tensor:
        return xai_serve.explain(model, x, "saliency", target=t).maps

    def ours_ms() -> Tensor:
        return metrics.max_sensitivity(
            lambda x, t, rows: saliency(x, t), images, targets, noise=noise
        )

    def captum_explain(inputs: Any, target: Tensor) -> Any:
        if isinstance(inputs, tuple):
            return (saliency(inputs[0], target),)
        return saliency(inputs, target)

    def captum_ms() -> Tensor:
        return sensitivity_max(
            captum_explain,
            images,
            perturb_func=lambda x: x + noise.flatten(0, 1),
            n_perturb_samples=SAMPLES,
            target=targets,
        )

    def quantus_ms() -> Any:
        step = iter(range(SAMPLES))

        def perturb(arr: np.ndarray, **kwargs: Any) -> np.ndarray:
            return arr + noise[:, next(step)].reshape(b, -1).numpy()

        def explain_np(model: Any, inputs: Any, targets: Any, **kwargs: Any) -> np.ndarray:
            x = torch.as_tensor(inputs, dtype=torch.float32)
            return saliency(x, torch.as_tensor(targets)).numpy()

        metric = quantus.MaxSensitivity(
            nr_samples=SAMPLES,
            perturb_func=perturb,
            normalise=False,
            abs=False,
            disable_warnings=True,
            display_progressbar=False,
        )
        return metric(
            model=model,
            x_batch=images.numpy(),
            y_batch=targets.numpy(),
            a_batch=maps.numpy()[:, None],
            explain_func=explain_np,
            device="cpu",
            batch_size=b,
        )

    t = interleaved_medians({"ours": ours_ms, "captum": captum_ms, "quantus": quantus_ms}, rounds)
    ours = ours_ms()
    rows["max_sensitivity"] = {
        "median_s": t,
        "x_faster": {"captum": t["captum"] / t["ours"], "quantus": t["quantus"] / t["ours"]},
        "max_rel_diff": {"captum": _rel(ours, captum_ms()), "quantus": _rel(ours, quantus_ms())},
    }

    # -- ROAD
    percentages = [10, 20, 30, 40, 50, 60, 70, 80, 90]

    def ours_road() -> Any:
        return metrics.road(model, images, maps, targets, fractions=[p / 100 for p in percentages])

    imputation = quantus.functions.perturb_func.noisy_linear_imputation
    ranked = np.argsort(-maps.reshape(b, -1).numpy(), axis=1, kind="stable")
    x_np = images.numpy()

    def quantus_road() -> Any:
        # quantus.ROAD.evaluate_batch's loop (one scipy solve per image and fraction, one
        # forward per fraction), with the map's pixel order: quantus.ROAD itself ranks
        # C * H * W entries and indexes H * W pixels, an IndexError on 3-channel images.
        out = []
        for p in percentages:
            top = ranked[:, : int(h * w * p / 100)]
            batch = np.stack([imputation(x_np[i], top[i], noise=0.01) for i in range(b)])
            with torch.no_grad():
                logits = model(torch.as_tensor(batch, dtype=torch.float32))
            out.append((logits.argmax(dim=1) == targets).numpy())
        return np.stack(out, axis=1)

    t = interleaved_medians({"ours": ours_road, "quantus": quantus_road}, rounds)
    agree = float((ours_road().correct.numpy() == quantus_road()).mean())
    rows["road"] = {
        "median_s": t,
        "x_faster": {"quantus": t["quantus"] / t["ours"]},
        "top1_agreement": {"quantus": agree},
    }
    return {
        "model": "resnet18",
        "batch": b,
        "side": h,
        "samples": SAMPLES,
        "rows": rows,
    }


def _markdown(data: dict[str, Any]) -> str:
    r = data["result"]
    lines = [
        f"# Quality metrics, {data['date']}, {data['device']}",
        "",
        f"{r['model']} (random weights), batch {r['batch']}, {r['side']}x{r['side']}, "
        f"{r['samples']} draws; fp32; torch {data['torch']}, {data['threads']} threads. Medians "
        f"of {data['rounds']} interleaved rounds. `x faster` = the peer's time / ours.",
        "",
        "| metric | ours s | peer | peer s | x faster | max rel diff / top-1 agreement |",
        "|---|---|---|---|---|---|",
    ]
    for metric, row in r["rows"].items():
        m = row["median_s"]
        for peer, ratio in row["x_faster"].items():
            diff = row.get("max_rel_diff", {}).get(peer)
            agree = row.get("top1_agreement", {}).get(peer)
            note = f"{diff:.1e}" if diff is not None else f"{agree:.2f} agree"
            lines.append(
                f"| {metric} | {m['ours']:.3f} | {peer} | {m[peer]:.3f} | {ratio:.2f} | {note} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64x64, B=2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    from benchmarks.run import _device_label

    warnings.filterwarnings("ignore")
    label, device = _device_label()
    rounds = args.rounds
    data: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": device.get("name", label),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "load_average_1min": [os.getloadavg()[0]],
    }
    data["result"] = bench(args.quick, rounds)
    data["load_average_1min"].append(os.getloadavg()[0])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
    stem = RESULTS / f"{data['date']}-{slug}-metrics{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)
    write_results(stem, data, _markdown(data))
    print(_markdown(data))
    print(f"written to {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
