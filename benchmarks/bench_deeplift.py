"""DeepLIFT, DeepSHAP and GradientSHAP (issue 12): ours vs captum vs the limit, in one run.

``python -m benchmarks.bench_deeplift [--quick]`` writes
``benchmarks/results/<date>-<device>-deeplift.{json,md}`` (``--quick``: ``...-deeplift-quick``,
a smoke run of the script on resnet18 at 64 x 64, not a measurement to keep).

Setup: torchvision resnet50 (``--model resnet18`` for a shorter run) with seeded random weights
(speed does not depend on the weights' values), eval mode, fp32, contiguous; a batch of ``B =
8`` random 224 x 224 images, explained for fixed targets; ``M = 8`` references (one ``Tensor[M,
3, 224, 224]`` handed to both libraries); GradientSHAP with ``samples = 16`` and the same draws
(captum's ``np.random`` draws replaced by ours, as in the tests).

Rows, each timed interleaved with its peer and its limit (A, B, C, C, B, A, ...; the machine's
speed drifts), medians of ``--rounds`` rounds after a warm-up call each:

- ``deeplift`` (zero baseline): ours (``xai_serve.explain``) vs ``captum.attr.DeepLift``;
  limit: one forward + one ``autograd.grad`` w.r.t. the input of the ``2B`` rows
  ``cat([x, x0])``, no hooks.
- ``deepshap``: ours (``baselines=refs``) vs ``captum.attr.DeepLiftShap(refs)``; limit: the same
  for the ``2BM`` rows of every (image, reference) pair.
- ``gradientshap``: ours vs ``captum.attr.GradientShap(n_samples=16, stdevs=0)``; limit: the
  same for the ``B * samples`` path points.

Both libraries batch everything here: captum's ``DeepLiftShap`` and ``GradientShap`` expand the
pairs / points into one batch themselves (no per-image or per-reference loop), so the issue's
">= 2x where the peer loops" does not apply and the ratio to expect is ~1. captum cannot run on
torchvision's ResNet (its blocks call one ReLU module two or three times; captum raises), so
captum gets the same network with one ReLU module per call (same function and FLOPs); ours
runs on torchvision's own model.

Each row also records ``max_rel_diff``: max |ours - captum| / max |captum| of the
channel-summed maps (captum's DeepLIFT hooks are wrong where two rescaled modules are back to
back or a max pool's input equals its reference, see tests/explainers/test_deeplift.py: expect
agreement for ``deeplift`` at the zero baseline and for ``gradientshap``, not for ``deepshap``
on ResNet's stem).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import xai_serve
from benchmarks.timing import interleaved_medians, write_results
from xai_serve.explainers.deeplift import reference_draws

RESULTS = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- setup


def _bottleneck_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu2(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    out += identity
    return self.relu3(out)


def _basic_forward(self: nn.Module, x: Tensor) -> Tensor:
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    out += identity
    return self.relu2(out)


def _models(quick: bool, arch: str = "resnet50") -> tuple[str, nn.Module, nn.Module]:
    """``(name, torchvision's model, the same function with one ReLU module per call)``."""
    from torchvision.models import resnet18, resnet50
    from torchvision.models.resnet import BasicBlock, Bottleneck

    name = "resnet18" if quick else arch
    build = {"resnet18": resnet18, "resnet50": resnet50}[name]
    torch.manual_seed(0)
    ours = build(weights=None).eval()
    peer = build(weights=None).eval()
    peer.load_state_dict(ours.state_dict())
    for block in peer.modules():
        if isinstance(block, Bottleneck):
            block.relu2, block.relu3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
            block.forward = _bottleneck_forward.__get__(block)  # type: ignore[method-assign]
        elif isinstance(block, BasicBlock):
            block.relu2 = nn.ReLU(inplace=True)
            block.forward = _basic_forward.__get__(block)  # type: ignore[method-assign]
    return name, ours, peer


def _limit(model: nn.Module, rows: Tensor, targets: Tensor) -> Callable[[], Any]:
    """One forward and one backward w.r.t. the input of ``rows``: the floor of any method
    that differentiates them once."""

    def run() -> Tensor:
        z = rows.detach().requires_grad_(True)
        score = model(z).gather(1, targets[:, None]).sum()
        return torch.autograd.grad(score, z)[0]

    return run


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max() / b.detach().abs().max())


class _CaptumDraws:
    """Hands captum's GradientShap our draws: its reference indices (``np.random.choice``)
    and path points (``np.random.uniform``) for input row ``b * samples + s``."""

    def __init__(self, seeds: list[int], count: int, samples: int) -> None:
        draws = [reference_draws(s, count, samples) for s in seeds]
        self.which = torch.cat([d[1] for d in draws]).numpy()
        self.alphas = torch.cat([d[2] for d in draws]).numpy()

    def __enter__(self) -> None:
        self.saved = np.random.choice, np.random.uniform
        np.random.choice = lambda n, size: self.which  # type: ignore[assignment]
        np.random.uniform = lambda low, high, size: self.alphas  # type: ignore[assignment]

    def __exit__(self, *exc: object) -> None:
        np.random.choice, np.random.uniform = self.saved  # type: ignore[assignment]


# --------------------------------------------------------------------------- rows


def bench(quick: bool, rounds: int, arch: str = "resnet50") -> dict[str, Any]:
    from captum.attr import DeepLift, DeepLiftShap, GradientShap

    name, model, peer = _models(quick, arch)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, peer = model.to(device), peer.to(device)
    b, side, count, samples = (2, 64, 2, 4) if quick else (8, 224, 8, 16)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 3, side, side, generator=gen).to(device)
    refs = (0.5 * torch.randn(count, 3, side, side, generator=gen)).to(device)
    targets = torch.arange(b, device=device) * 7 % 1000
    seeds = list(range(b))
    zero = torch.zeros_like(x)
    leaf = x.clone().requires_grad_(True)
    pairs_x = x.repeat_interleave(count, 0)
    pairs_r = refs.repeat(b, 1, 1, 1)
    draws = _CaptumDraws(seeds, count, samples)
    which = torch.from_numpy(draws.which).to(device)
    alphas = torch.from_numpy(draws.alphas).to(device=device, dtype=x.dtype).view(-1, 1, 1, 1)
    points = alphas * x.repeat_interleave(samples, 0) + (1 - alphas) * refs[which]

    def gradientshap_peer() -> Tensor:
        with draws:
            return GradientShap(peer).attribute(
                leaf, refs, n_samples=samples, stdevs=0.0, target=targets
            )

    rows: dict[str, dict[str, Callable[[], Any]]] = {
        "deeplift": {
            "ours": lambda: xai_serve.explain(model, x, "deeplift", target=targets).maps,
            "captum": lambda: DeepLift(peer).attribute(leaf, zero, target=targets).sum(1),
            "limit": _limit(model, torch.cat([x, zero]), targets.repeat(2)),
        },
        "deepshap": {
            "ours": lambda: (
                xai_serve.explain(model, x, "deepshap", target=targets, baselines=refs).maps
            ),
            "captum": lambda: DeepLiftShap(peer).attribute(leaf, refs, target=targets).sum(1),
            "limit": _limit(
                model,
                torch.cat([pairs_x, pairs_r]),
                targets.repeat_interleave(count).repeat(2),
            ),
        },
        "gradientshap": {
            "ours": lambda: (
                xai_serve.explain(
                    model,
                    x,
                    "gradientshap",
                    target=targets,
                    baselines=refs,
                    samples=samples,
                    seed=seeds,
                ).maps
            ),
            "captum": lambda: gradientshap_peer().sum(1),
            "limit": _limit(model, points, targets.repeat_interleave(samples)),
        },
    }
    out: dict[str, Any] = {
        "model": name,
        "batch": b,
        "side": side,
        "references": count,
        "samples": samples,
        "rows": {},
    }
    for method, impls in rows.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # captum's hook notice
            agree = _rel(impls["ours"](), impls["captum"]())
            medians = interleaved_medians(impls, rounds)
        out["rows"][method] = {
            "median_s": medians,
            "ours_vs_captum": medians["captum"] / medians["ours"],
            "ours_vs_limit": medians["ours"] / medians["limit"],
            "max_rel_diff": agree,
        }
        print(method, out["rows"][method], flush=True)
    return out


# --------------------------------------------------------------------------- report


def _markdown(data: dict[str, Any]) -> str:
    r = data["result"]
    lines = [
        f"# DeepLIFT / DeepSHAP / GradientSHAP, {data['date']}, {data['device']}",
        "",
        f"{r['model']} (random weights), batch {r['batch']}, {r['side']}x{r['side']}, "
        f"{r['references']} references, {r['samples']} GradientSHAP samples; fp32; torch "
        f"{data['torch']}, {data['threads']} threads. Medians of {data['rounds']} interleaved "
        f"rounds. `x faster than captum` = captum's time / ours; `x limit` = ours / one "
        f"forward + input backward of the same rows.",
        "",
        "| method | ours s | captum s | limit s | x faster than captum | x limit | "
        "max rel diff vs captum |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in r["rows"].items():
        m = row["median_s"]
        lines.append(
            f"| {method} | {m['ours']:.3f} | {m['captum']:.3f} | {m['limit']:.3f} | "
            f"{row['ours_vs_captum']:.2f} | {row['ours_vs_limit']:.2f} | "
            f"{row['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="resnet18, 64x64, B=2, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", choices=("resnet18", "resnet50"), default="resnet50")
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
    data["result"] = bench(args.quick, rounds, args.model)
    data["load_average_1min"].append(os.getloadavg()[0])
    RESULTS.mkdir(exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
    stem = RESULTS / f"{data['date']}-{slug}-deeplift{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)
    write_results(stem, data, _markdown(data))
    print(_markdown(data))
    print(f"written to {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
