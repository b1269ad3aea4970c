"""Feature visualisation (issue 13): ours, all objectives in one batch, vs torch-lucent.

``python -m benchmarks.bench_visualize [--quick] [--device cuda]`` writes
``benchmarks/results/<date>-<device>-visualize.{json,md}``.

The same work on both sides: EfficientNet-Lite0 (the bundled ImageNet weights), the first N
channels of one block's output, the Lucid recipe (FFT image with decorrelated colour, standard
transforms: 12-pixel grey border, jitter 8, scale 0.9-1.1, rotation -10..10 degrees, jitter
4), Adam at lr 0.05, the same step count and image size, the model's own normalisation:

- ``xai_serve``: ``visualize(model, [Channel(layer, c) for c in range(N)], ...)``, N = 8 and
  16: one image parameter per channel, one batched forward per step;
- ``xai_serve batch=False``: the same call, one objective at a time: what batching gains
  (both of our rows stop the forward after the block; lucent runs the whole model);
- ``torch-lucent``: ``render_vis`` once per channel, as its users run it (``show_image=False``,
  no progress bar, ``preprocess=False`` with the same normalisation appended to its standard
  transforms, ``fixed_image_size`` = the padded size so that the model sees the same geometry).

Timed in interleaved rounds (ours N=8, lucent N=8, ours N=16, lucent N=16, ...: the machine's
speed drifts), medians reported. Both final images are scored by the same function: the
channel's mean activation on the untransformed image (normalised, no border).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.timing import interleaved_medians, write_results
from xai_serve.concepts.visualize import Channel, visualize

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
LAYER = "_blocks.5"
PAD = 12  # the standard transforms' border: the model sees size + 2 * PAD


def _model(device: torch.device) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    from xai_serve.models import load_model, model_config_from_dict

    lite0 = load_model(model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"}))
    model = lite0.module.eval().to(device)
    t = lite0.config.transform
    mean = torch.tensor(t.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(t.std, device=device).view(1, 3, 1, 1)
    return model, lambda x: (x - mean) / std


def _score(model: nn.Module, norm: Callable[[Tensor], Tensor], images: Tensor) -> Tensor:
    """Channel i's mean activation at ``LAYER`` on image i, untransformed."""
    acts: list[Tensor] = []
    handle = model.get_submodule(LAYER).register_forward_hook(lambda m, i, o: acts.append(o))
    try:
        with torch.no_grad():
            model(norm(images))
    finally:
        handle.remove()
    n = images.shape[0]
    return acts[0][torch.arange(n), torch.arange(n)].mean((1, 2))


def _lucent(
    model: nn.Module, norm: Callable[[Tensor], Tensor], n: int, steps: int, size: int
) -> Callable[[], Tensor]:
    from lucent.optvis import param, render, transform

    transforms = [*transform.standard_transforms, norm]
    name = LAYER.replace(".", "_")

    def run() -> Tensor:
        images = []
        for c in range(n):
            torch.manual_seed(c)
            np.random.seed(c)
            out = render.render_vis(
                model,
                f"{name}:{c}",
                param_f=lambda: param.image(size),
                transforms=transforms,
                preprocess=False,
                fixed_image_size=size + 2 * PAD,
                thresholds=(steps,),
                show_image=False,
                progress=False,
            )
            images.append(torch.from_numpy(out[-1]).permute(0, 3, 1, 2))
        return torch.cat(images)

    return run


def bench(
    steps: int, size: int, counts: tuple[int, ...], rounds: int, device: torch.device
) -> dict:
    model, norm = _model(device)
    last: dict[str, Tensor] = {}

    def ours(n: int, batch: bool = True) -> Callable[[], Tensor]:
        objectives = [Channel(LAYER, c) for c in range(n)]
        key = f"ours_{n}" if batch else f"ours_1by1_{n}"

        def run() -> Tensor:
            last[key] = visualize(
                model, objectives, steps=steps, size=size, transform=norm, seed=0, batch=batch
            ).images
            return last[key]

        return run

    def peer(n: int) -> Callable[[], Tensor]:
        inner = _lucent(model, norm, n, steps, size)

        def run() -> Tensor:
            last[f"lucent_{n}"] = inner().to(device)
            return last[f"lucent_{n}"]

        return run

    impls: dict[str, Callable[[], Tensor]] = {}
    for n in counts:
        impls[f"ours_{n}"] = ours(n)
        impls[f"ours_1by1_{n}"] = ours(n, batch=False)
        impls[f"lucent_{n}"] = peer(n)
    med = interleaved_medians(impls, rounds, device)
    out: dict[str, Any] = {}
    for n in counts:
        mine = _score(model, norm, last[f"ours_{n}"])
        theirs = _score(model, norm, last[f"lucent_{n}"])
        row = {
            "objectives": n,
            "xai_serve_s": med[f"ours_{n}"],
            "lucent_s": med[f"lucent_{n}"],
            "ours_one_at_a_time_s": med[f"ours_1by1_{n}"],
            "batching_speedup": med[f"ours_1by1_{n}"] / med[f"ours_{n}"],
            "speedup_vs_lucent": med[f"lucent_{n}"] / med[f"ours_{n}"],
            "ours_mean_objective": float(mine.mean()),
            "lucent_mean_objective": float(theirs.mean()),
            "ours_wins": int((mine >= theirs).sum()),
        }
        out[str(n)] = row
        print(
            f"N={n:3d} ours {row['xai_serve_s']:8.2f} s  one at a time "
            f"{row['ours_one_at_a_time_s']:8.2f} s  lucent {row['lucent_s']:8.2f} s  "
            f"lucent/ours {row['speedup_vs_lucent']:.2f}  objective ours "
            f"{row['ours_mean_objective']:.3f} lucent {row['lucent_mean_objective']:.3f}  "
            f"ours >= lucent on {row['ours_wins']}/{n}",
            flush=True,
        )
    return out


def _markdown(data: dict) -> str:
    lines = [
        f"# Feature visualisation: {data['model']} {data['layer']}, {data['steps']} steps, "
        f"{data['size']}x{data['size']}",
        "",
        f"{data['date']}, {data['device']}, torch {data['torch']}, {data['threads']} threads, "
        f"{data['rounds']} interleaved rounds (medians). Objective: the channel's mean "
        "activation on the final, untransformed image (mean over the N channels).",
        "",
        "| objectives | ours s (one batch) | ours s (batch=False) | lucent s (render_vis per "
        "channel) | lucent / ours | ours objective | lucent objective | ours >= lucent |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["results"].values():
        lines.append(
            f"| {r['objectives']} | {r['xai_serve_s']:.2f} | {r['ours_one_at_a_time_s']:.2f} | "
            f"{r['lucent_s']:.2f} | "
            f"{r['speedup_vs_lucent']:.2f} | {r['ours_mean_objective']:.3f} | "
            f"{r['lucent_mean_objective']:.3f} | {r['ours_wins']}/{r['objectives']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="plumbing check: 64x64, 16 steps, 1 round"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick:
        steps, size, counts, rounds = 16, 64, (8, 16), 1
    else:
        steps, size, counts, rounds = args.steps, args.size, (8, 16), args.rounds
    torch.set_flush_denormal(True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from benchmarks.run import _device_label

    label, info = _device_label()
    if device.type == "cpu" and info.get("kind") != "cpu":
        label, info = f"cpu-{os.cpu_count()}core", {"name": "cpu"}
    data: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": info.get("name", label),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": "efficientnet_lite0",
        "layer": LAYER,
        "steps": steps,
        "size": size,
        "rounds": rounds,
        "load_average_1min_before": os.getloadavg()[0],
    }
    data["results"] = bench(steps, size, counts, rounds, device)
    data["load_average_1min_after"] = os.getloadavg()[0]
    stem = RESULTS / f"{data['date']}-{label}-visualize{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)
    write_results(stem, data, _markdown(data))
    print(_markdown(data))
    print(f"written to {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
