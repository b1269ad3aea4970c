"""Network Dissection: ``xai_serve.concepts.dissect`` against a NetDissect-style loop.

``python -m benchmarks.bench_dissection [--quick] [--rounds N] [--device cuda]`` writes
``benchmarks/results/<date>-<device>-dissection.{json,md}`` (``--quick``: under ``/tmp``).

The work: torchvision resnet18 (``weights=None``, seed 0, eval; the speed of either path does
not depend on the weights' values), one layer, ImageNet normalisation as the transform, over
the bundled procedural probe set (``probe_dataset``: every procedural concept,
``per_concept`` images each). Both paths give the ``[C, K]`` IoU of every unit and concept at
the top-0.005 threshold; timed in interleaved rounds (this machine's speed drifts), medians
reported, and their answers compared (the ratio is only quoted when they agree).

- ``ours``: :func:`dissect` - two batched passes on the device: exact top-k thresholds, then
  upsample + threshold + one matrix product per batch for all intersections.
- ``netdissect-style``: what the reference implementation does on the CPU. One batched
  forward on the device, the features copied to host memory (NumPy); each unit's threshold by
  ``np.partition`` over its values (exact; the reference uses a streaming quantile sketch);
  then, per image and per unit, the map upsampled (bilinear; torch on the CPU, so both paths
  upsample identically), skipped if its maximum is not above the threshold, thresholded, and
  its per-concept intersections counted with NumPy (concept masks indexed at the unit's
  pixels, summed per concept - the reference's per-image label bincount), with the unit's and
  the concepts' areas.
"""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.timing import interleaved_medians, write_results
from xai_serve.concepts.dissection import dissect, top_count
from xai_serve.concepts.library import ProbeDataset, probe_dataset

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
QUANTILE = 0.005
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# (layer, images per concept, image size)
FULL = {"layer": "layer2", "per_concept": 16, "size": 64}
QUICK = {"layer": "layer1", "per_concept": 2, "size": 32}


def netdissect_style(
    model: nn.Module, layer: nn.Module, data: ProbeDataset, transform: Any, batch_size: int
) -> np.ndarray:
    """IoU ``[C, K]`` the reference implementation's way (see the module docstring)."""
    device = next(model.parameters()).device
    feats: list[np.ndarray] = []
    out: list[Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _i, o: out.append(o))
    try:
        with torch.inference_mode():
            for s in range(0, data.images.shape[0], batch_size):
                model(transform(data.images[s : s + batch_size].to(device)))
                feats.append(out.pop().float().cpu().numpy())
    finally:
        handle.remove()
    features = np.concatenate(feats)  # [N, C, h, w]
    n, c = features.shape[:2]
    flat = features.transpose(1, 0, 2, 3).reshape(c, -1)
    k = top_count(QUANTILE, flat.shape[1])
    thresholds = np.partition(flat, flat.shape[1] - k, axis=1)[:, flat.shape[1] - k]
    masks = data.masks.cpu().numpy()  # [N, K, H, W] bool
    size = masks.shape[-2:]
    concepts = masks.shape[1]
    inter = np.zeros((c, concepts), dtype=np.int64)
    unit_area = np.zeros(c, dtype=np.int64)
    concept_area = masks.sum(axis=(0, 2, 3)).astype(np.int64)
    for i in range(n):
        maps = torch.from_numpy(features[i : i + 1])
        up = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)[0].numpy()
        labels = masks[i].reshape(concepts, -1)
        for u in range(c):
            if features[i, u].max() <= thresholds[u]:
                continue  # no pixel of this unit can pass (bilinear never overshoots)
            on = (up[u] > thresholds[u]).ravel()
            unit_area[u] += int(on.sum())
            inter[u] += labels[:, on].sum(axis=1)
    union = unit_area[:, None] + concept_area[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def bench(device: torch.device, quick: bool, rounds: int, batch_size: int) -> dict[str, Any]:
    from torchvision.models import resnet18

    cfg = QUICK if quick else FULL
    torch.manual_seed(0)
    model = resnet18(weights=None).eval().to(device)
    data = probe_dataset(per_concept=cfg["per_concept"], size=cfg["size"], device=device)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def transform(x: Tensor) -> Tensor:
        return (x - mean) / std

    layer = model.get_submodule(cfg["layer"])

    def ours() -> Tensor:
        return dissect(
            model, cfg["layer"], data, transform=transform, batch_size=batch_size, quantile=QUANTILE
        ).iou

    def reference() -> np.ndarray:
        return netdissect_style(model, layer, data, transform, batch_size)

    a, b = ours().double().cpu().numpy(), reference()
    max_diff = float(np.abs(a - b).max())
    med = interleaved_medians({"ours": ours, "netdissect-style": reference}, rounds, device)
    n, k = data.masks.shape[:2]
    units = a.shape[0]
    row = {
        "layer": cfg["layer"],
        "images": n,
        "size": cfg["size"],
        "concepts": k,
        "units": units,
        "batch_size": batch_size,
        "seconds": med,
        "reference_over_ours": med["netdissect-style"] / med["ours"],
        "max_abs_iou_difference": max_diff,
    }
    print(
        f"{cfg['layer']} ({units} units) x {k} concepts, {n} images of {cfg['size']} px: "
        f"ours {med['ours']:.3f} s, netdissect-style {med['netdissect-style']:.3f} s, "
        f"ratio {row['reference_over_ours']:.1f}x; max |IoU difference| {max_diff:.2g}",
        flush=True,
    )
    return row


def _markdown(data: dict[str, Any]) -> str:
    r = data["row"]
    s = r["seconds"]
    return (
        "\n".join(
            [
                f"# Network Dissection, {data['date']}, {data['device']}",
                "",
                f"torch {data['torch']}, {data['threads']} threads; resnet18 (random weights) "
                f"{r['layer']} ({r['units']} units), {r['images']} procedural probe images of "
                f"{r['size']} px, {r['concepts']} concepts, quantile {QUANTILE}, batch "
                f"{r['batch_size']}; medians of {data['rounds']} interleaved rounds.",
                "",
                "| ours s | netdissect-style s | netdissect-style / ours | max abs IoU diff |",
                "|---:|---:|---:|---:|",
                f"| {s['ours']:.3f} | {s['netdissect-style']:.3f} | "
                f"{r['reference_over_ours']:.1f} | {r['max_abs_iou_difference']:.2g} |",
            ]
        )
        + "\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the plumbing")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from benchmarks.run import _device_label

    label, info = _device_label()
    rounds = 1 if args.quick else args.rounds
    row = bench(device, args.quick, rounds, args.batch_size)
    date = dt.date.today().isoformat()
    data = {
        "date": date,
        "device": info.get("name", label),
        "device_info": info,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "quick": args.quick,
        "row": row,
    }
    stem = Path(args.out) if args.out else RESULTS / f"{date}-{label}-dissection"
    if args.quick and not args.out:
        stem = Path("/tmp") / f"{date}-{label}-dissection-quick"
    write_results(stem, data, _markdown(data))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
