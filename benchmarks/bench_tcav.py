"""TCAV (issue 13): ours vs captum's ``captum.concept.TCAV`` on the same work, in one run.

``python -m benchmarks.bench_tcav [--quick]`` writes
``benchmarks/results/<date>-<device>-tcav.{json,md}`` (``--quick``: ``...-tcav-quick``, a smoke
run of the script on small sets, not a measurement to keep).

Setup: torchvision resnet18 with seeded random weights (speed does not depend on the weights'
values), eval mode, fp32; layer ``layer3``; ``B`` random inputs (``random_set``, seed 1000);
``C`` procedural concepts of ``N`` images each and ``R`` generated random sets of ``N`` images,
all ``S x S``; the model's ImageNet normalisation as the transform (ours) or as the first module
of the model (captum). The work of both: the activations of every set at the layer, the ``C *
R`` concept-vs-random CAVs and the ``R`` random-vs-random CAVs of the null, the layer gradient of
the target logit for the inputs, and the sign-count scores of every CAV. Ours also runs its
t-tests (captum has none; they take microseconds).

captum fits each CAV with its default classifier (scikit-learn's SGD linear model, one
experimental set after the other) and caches activations and CAVs on disk under ``save_path``:
every timed captum call gets a fresh folder, so that it recomputes them as ours does.

Rows timed interleaved (ours, captum, ours, captum, ...: the machine's speed drifts), medians
of ``--rounds`` rounds after one warm-up call each. ``x faster than captum`` = captum's time /
ours. The two libraries' CAVs differ (different classifiers), so their scores are not compared
here; tests/concepts/test_tcav.py shows the scores agree exactly given the same CAVs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.timing import interleaved_medians, write_results
from xai_serve.concepts.library import procedural, random_set
from xai_serve.concepts.tcav import tcav

RESULTS = Path(__file__).resolve().parent / "results"
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class _Normalise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(_MEAN)[:, None, None])
        self.register_buffer("std", torch.tensor(_STD)[:, None, None])

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


def bench(quick: bool, rounds: int) -> dict[str, Any]:
    from captum.concept import TCAV, Concept
    from torchvision.models import resnet18

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b, side, n, runs = (4, 32, 8, 2) if quick else (32, 64, 32, 10)
    names = ["red", "stripes_0_wide"] if quick else ["red", "stripes_0_wide", "circle", "dots"]
    torch.manual_seed(0)
    model = resnet18(weights=None).eval().to(device)
    normalise = _Normalise().to(device)
    peer = nn.Sequential(normalise, model).eval()  # captum's layer: "1.layer3"
    inputs = random_set(b, size=side, seed=1000, device=device).images
    concept_sets = [procedural(c, n, size=side, device=device) for c in names]
    random_sets = [random_set(n, size=side, seed=i, device=device) for i in range(runs)]
    target = 3

    def ours() -> Any:
        return tcav(
            model,
            inputs,
            concept_sets,
            target,
            "layer3",
            random_sets=random_sets,
            runs=runs,
            transform=normalise,
            batch_size=64,
        )

    def captum() -> Any:
        folder = tempfile.mkdtemp(prefix="bench-tcav-captum-")
        try:
            objects = [
                Concept(i, s.name, torch.utils.data.DataLoader(s.images, batch_size=64))
                for i, s in enumerate(concept_sets + random_sets)
            ]
            concepts, randoms = objects[: len(names)], objects[len(names) :]
            experiments = [[c, r] for c in concepts for r in randoms]
            experiments += [[randoms[i], randoms[(i + 1) % runs]] for i in range(runs)]
            peer_tcav = TCAV(peer, ["1.layer3"], save_path=folder + "/")
            return peer_tcav.interpret(inputs, experiments, target=target)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # captum's default-classifier and hook notices
        result = ours()
        medians = interleaved_medians({"ours": ours, "captum": captum}, rounds, device)
    out = {
        "model": "resnet18",
        "layer": "layer3",
        "inputs": b,
        "side": side,
        "concepts": names,
        "images_per_set": n,
        "runs": runs,
        "median_s": medians,
        "ours_vs_captum": medians["captum"] / medians["ours"],
        "ours_mean_cav_accuracy": {c.concept: float(c.accuracies.mean()) for c in result.concepts},
    }
    print(out, flush=True)
    return out


def _markdown(data: dict[str, Any]) -> str:
    r = data["result"]
    m = r["median_s"]
    return (
        f"# TCAV, {data['date']}, {data['device']}\n\n"
        f"{r['model']} (random weights), layer {r['layer']}, {r['inputs']} inputs, "
        f"{len(r['concepts'])} concepts x {r['runs']} random sets (+ {r['runs']} random-vs-random "
        f"CAVs), {r['images_per_set']} images of {r['side']}x{r['side']} per set; fp32; torch "
        f"{data['torch']}, {data['threads']} threads. Medians of {data['rounds']} interleaved "
        "rounds; `x faster than captum` = captum's time / ours.\n\n"
        "| ours s | captum s | x faster than captum |\n|---|---|---|\n"
        f"| {m['ours']:.3f} | {m['captum']:.3f} | {r['ours_vs_captum']:.2f} |\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 concepts, 2 runs, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    from benchmarks.run import _device_label

    label, device = _device_label()
    rounds = 1 if args.quick else args.rounds
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
    stem = RESULTS / f"{data['date']}-{slug}-tcav{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)
    write_results(stem, data, _markdown(data))
    print(_markdown(data))
    print(f"written to {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
