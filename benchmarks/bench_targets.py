"""Several targets per request: what T classes cost against one, and against T separate calls.

``python -m benchmarks.bench_targets [--quick] [--rounds N] [--device cuda]`` writes
``benchmarks/results/<date>-<device>-targets.{json,md}``.

torchvision resnet18 (``weights=None``, seed 0, eval; speed does not depend on the weights'
values) on random 224 x 224 images. For each method, timed in interleaved rounds (the
machine's speed drifts), medians reported:

- ``T=1``: ``explain(model, x, method, target=t)``, one class per image;
- ``T=5 shared``: ``explain(model, x, method, target=Tensor[B, 5])`` in one call;
- ``T=5 separately``: five single-target calls, one per class.

Perturbation methods (LIME, KernelSHAP at 128 samples over an 8 x 8 grid, one image;
occlusion with 32-pixel windows at stride 32, one image) evaluate each perturbed image once
for all T classes, so T=5 should cost little more than T=1 (goal: <= 1.15x). The Grad-CAM and
gradient families (Grad-CAM, saliency, integrated gradients with 8 steps; batch 8) run one
forward and batch the T backward passes, measured against the T separate calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import torch

import xai_serve
from benchmarks.timing import interleaved_medians, write_results

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
T = 5

CASES: dict[str, tuple[int, dict[str, Any]]] = {
    # method: (images, options)
    "lime": (1, {"samples": 128, "segmenter": "grid", "n_segments": 64, "seed": 0}),
    "kernelshap": (1, {"samples": 128, "segmenter": "grid", "n_segments": 64, "seed": 0}),
    "occlusion": (1, {"window": 32, "stride": 32}),
    "gradcam": (8, {}),
    "saliency": (8, {}),
    "integrated_gradients": (8, {"steps": 8}),
}
QUICK: dict[str, tuple[int, dict[str, Any]]] = {
    "lime": (1, {"samples": 32, "segmenter": "grid", "n_segments": 16, "seed": 0}),
    "gradcam": (2, {}),
}


def bench(device: torch.device, quick: bool, rounds: int) -> dict[str, Any]:
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None).eval().to(device)
    rows = {}
    for method, (b, opts) in (QUICK if quick else CASES).items():
        size = 64 if quick else 224
        x = torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
        targets = torch.arange(T, device=device).repeat(b, 1) * 7 + 3  # [B, 5], distinct

        def one(t: int = 0, x: torch.Tensor = x, m: str = method, o: dict = opts,
                ts: torch.Tensor = targets) -> Any:  # fmt: skip
            return xai_serve.explain(model, x, m, target=ts[:, t], **o)

        def shared(x: torch.Tensor = x, m: str = method, o: dict = opts,
                   ts: torch.Tensor = targets) -> Any:  # fmt: skip
            return xai_serve.explain(model, x, m, target=ts, **o)

        def separately() -> None:
            for t in range(T):
                one(t)

        med = interleaved_medians(
            {"T=1": one, f"T={T} shared": shared, f"T={T} separately": separately}, rounds
        )
        rows[method] = {
            "images": b,
            "options": {k: v for k, v in opts.items()},
            "seconds": med,
            "shared_vs_one": med[f"T={T} shared"] / med["T=1"],
            "shared_vs_separately": med[f"T={T} shared"] / med[f"T={T} separately"],
        }
        print(
            f"{method}: T={T} shared {rows[method]['shared_vs_one']:.2f}x T=1, "
            f"{rows[method]['shared_vs_separately']:.2f}x {T} separate calls",
            flush=True,
        )
    return rows


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        f"# Several targets per request, {data['date']}, {data['device']}",
        "",
        f"torch {data['torch']}, {data['threads']} threads; resnet18 (random weights), "
        f"224 x 224; medians of {data['rounds']} interleaved rounds. T = {T} classes per "
        "image, in one call (shared) or in T single-target calls.",
        "",
        f"| method | images | T=1 s | T={T} shared s | T={T} separately s | shared / T=1 "
        f"| shared / separately |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, r in data["rows"].items():
        s = r["seconds"]
        lines.append(
            f"| {method} | {r['images']} | {s['T=1']:.3f} | {s[f'T={T} shared']:.3f} | "
            f"{s[f'T={T} separately']:.3f} | {r['shared_vs_one']:.2f} | "
            f"{r['shared_vs_separately']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from benchmarks.run import _device_label

    label, info = _device_label()
    rows = bench(device, args.quick, 1 if args.quick else args.rounds)
    date = dt.date.today().isoformat()
    data = {
        "date": date,
        "device": info.get("name", label),
        "device_info": info,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "quick": args.quick,
        "rows": rows,
    }
    stem = Path(args.out) if args.out else RESULTS / f"{date}-{label}-targets"
    if args.quick and not args.out:
        stem = Path("/tmp") / f"{date}-{label}-targets-quick"
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_results(stem, data, _markdown(data))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
