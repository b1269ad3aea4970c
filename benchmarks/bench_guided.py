"""Guided backprop, deconvnet, Guided Grad-CAM and CAM (issue 12): ours vs the peer vs the limit.

``python -m benchmarks.bench_guided [--quick] [--device cuda]`` writes
``benchmarks/results/<date>-<device>-guided.{json,md}``.

torchvision resnet50 (``weights=None``, seed 0, eval: speed does not depend on the weights'
values), a batch of 8 random 224 x 224 images, the model's top-1 classes as targets given to
every implementation. Per method, timed in interleaved rounds (A, B, C, C, B, A, ...: the
machine's speed drifts), medians reported:

- ``xai_serve``: ``xai_serve.explain(model, x, method, target=t)`` (maps ``[8, 224, 224]``;
  CAM's upsampled to the input size, which torchcam does not do);
- the peer, built as its documentation shows, on the same inputs and targets:
  captum 0.9 ``GuidedBackprop`` / ``Deconvolution`` / ``GuidedGradCam(model, model.layer4)``
  (``interpolate_mode="bilinear"``, the setting whose maps ours equal) ``.attribute(x,
  target=t)``; torchcam 0.5 ``CAM(model, "layer4", "fc")`` entered per call, the forward
  under ``torch.no_grad()``, then ``extractor(class_idx=t)``;
- ``limit``: what the method cannot avoid: one forward and one backward to the input (a plain
  gradient) for the three gradient methods; one forward under ``torch.inference_mode()`` for
  CAM.

Captum's and torchcam's implementations are batched (no per-image loop), so the issue's
">= 2x where the peer loops per image" does not apply to them; the ratios are what they are.
For the gradient methods the maps are also compared with the peer's (summed over channels):
``max |ours - peer| / max |peer|``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import xai_serve
from benchmarks.timing import interleaved_medians, write_results

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"

METHODS = ("guided_backprop", "deconvnet", "guided_gradcam", "cam")
PEER = {
    "guided_backprop": "captum GuidedBackprop",
    "deconvnet": "captum Deconvolution",
    "guided_gradcam": "captum GuidedGradCam (bilinear)",
    "cam": "torchcam CAM",
}
LIMIT = {
    "guided_backprop": "1 forward + 1 backward",
    "deconvnet": "1 forward + 1 backward",
    "guided_gradcam": "1 forward + 1 backward",
    "cam": "1 forward (inference_mode)",
}


def _gradient_limit(model: nn.Module, x: Tensor, t: Tensor) -> Callable[[], Tensor]:
    def limit() -> Tensor:
        xg = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(model(xg).gather(1, t[:, None]).sum(), xg)
        return g

    return limit


def _forward_limit(model: nn.Module, x: Tensor) -> Callable[[], Tensor]:
    def limit() -> Tensor:
        with torch.inference_mode():
            return model(x)

    return limit


def _peer(method: str, model: nn.Module, x: Tensor, t: Tensor) -> Callable[[], Tensor]:
    if method == "cam":
        from torchcam.methods import CAM

        classes = t.tolist()

        def torchcam() -> Tensor:
            with CAM(model, "layer4", "fc", input_shape=tuple(x.shape[1:])) as extractor:
                with torch.no_grad():
                    model(x)
                return extractor(class_idx=classes)[0]

        return torchcam
    from captum import attr

    if method == "guided_backprop":
        gb = attr.GuidedBackprop(model)
        return lambda: gb.attribute(x, target=t)
    if method == "deconvnet":
        dc = attr.Deconvolution(model)
        return lambda: dc.attribute(x, target=t)
    ggc = attr.GuidedGradCam(model, model.layer4)
    return lambda: ggc.attribute(x, target=t, interpolate_mode="bilinear")


def bench(arch: str, batch: int, size: int, rounds: int, device: torch.device) -> dict:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval().to(device)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        t = model(x).argmax(1)
    out: dict[str, Any] = {}
    for method in METHODS:
        ours = lambda m=method: xai_serve.explain(model, x, m, target=t).maps  # noqa: E731
        peer = _peer(method, model, x, t)
        limit = _forward_limit(model, x) if method == "cam" else _gradient_limit(model, x, t)
        row: dict[str, Any] = {"peer": PEER[method], "limit": LIMIT[method]}
        if method != "cam":
            a, b = ours(), peer().sum(1)
            row["max_rel_diff_vs_peer"] = float((a - b).abs().max() / b.abs().max())
        med = interleaved_medians({"xai_serve": ours, "peer": peer, "limit": limit}, rounds, device)
        row.update({f"{k}_ms": v * 1e3 for k, v in med.items()})
        row["ours_over_peer"] = med["xai_serve"] / med["peer"]
        row["ours_over_limit"] = med["xai_serve"] / med["limit"]
        row["speedup_vs_peer"] = med["peer"] / med["xai_serve"]
        out[method] = row
        print(
            f"{method:16s} ours {row['xai_serve_ms']:9.1f} ms  peer {row['peer_ms']:9.1f} ms  "
            f"limit {row['limit_ms']:9.1f} ms  ours/limit {row['ours_over_limit']:.2f}  "
            f"peer/ours {row['speedup_vs_peer']:.2f}",
            flush=True,
        )
    return out


def _markdown(data: dict) -> str:
    lines = [
        f"# Guided backprop, deconvnet, Guided Grad-CAM, CAM: {data['model']} "
        f"B={data['batch']} {data['size']}x{data['size']}",
        "",
        f"{data['date']}, {data['device']}, torch {data['torch']}, {data['threads']} threads, "
        f"{data['rounds']} interleaved rounds (medians).",
        "",
        "| method | ours ms | peer | peer ms | limit | limit ms | ours / limit | "
        "peer / ours | max rel diff vs peer |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for method, r in data["methods"].items():
        diff = r.get("max_rel_diff_vs_peer")
        lines.append(
            f"| {method} | {r['xai_serve_ms']:.1f} | {r['peer']} | {r['peer_ms']:.1f} | "
            f"{r['limit']} | {r['limit_ms']:.1f} | {r['ours_over_limit']:.2f} | "
            f"{r['speedup_vs_peer']:.2f} | {'-' if diff is None else f'{diff:.1e}'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="plumbing check: resnet50 B=2 64x64, 1 round"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    batch, size, rounds = (2, 64, 1) if args.quick else (8, 224, args.rounds)
    torch.set_flush_denormal(True)  # random deep nets drift into subnormals (slow on x86 CPUs)
    warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU")
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require")
    from benchmarks.run import _device_label

    label, info = _device_label()  # names the GPU when there is one
    if device.type == "cpu" and info.get("kind") != "cpu":
        label, info = f"cpu-{os.cpu_count()}core", {"name": "cpu"}
    data: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": info.get("name", label),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": "resnet50",
        "batch": batch,
        "size": size,
        "rounds": rounds,
        "load_average_1min_before": os.getloadavg()[0],
    }
    data["methods"] = bench("resnet50", batch, size, rounds, device)
    data["load_average_1min_after"] = os.getloadavg()[0]
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{data['date']}-{label}-guided{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)
    write_results(stem, data, _markdown(data))
    print(_markdown(data))
    print(f"written to {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
