"""Forward paths and latency (issue 14): the old path, exact fp32 channels_last, the tuned path,
and the peers, in one run on one machine; then a budgeted request through gRPC.

``python -m benchmarks.bench_paths [--quick]`` (also run by ``make bench``) writes
``benchmarks/results/<date>-<device>-paths.{json,md}``.

Per model (the bundled EfficientNet-Lite0 with its ImageNet weights; torchvision resnet50 and a
ViT (12 x 384, patch 16, as DeiT-S) with seeded random weights, its head included: speed does
not depend on the weights' values), one 224 x 224 photo, its SLIC segmentation (the default
``n_segments``) given to every implementation, 256 samples, probabilities, the superpixel-mean
fill:

- ``old path``: what ``explain`` ran before tuning existed: fp32, contiguous (NCHW) model and
  inputs, batch 64;
- ``fp32 channels_last``: the same, channels_last model and inputs (exact same maths);
- ``fp32 exact, tuned``: the exact path :func:`xai_serve.tune` measured best without reduced
  precision: its memory format, its linear layers' kernels (ATen's or oneDNN's, see
  :mod:`xai_serve.explainers.onednn`) and its fp32 batch (the batch matters on CPUs: small
  batches stay in cache);
- ``tuned``: the path :func:`xai_serve.tune` chose on this machine (its report is printed);
- ``lime``: ``lime_image.LimeImageExplainer`` with a classifier that turns lime's NHWC batches
  into tensors the way its users do (``torch.from_numpy(b).permute(0, 3, 1, 2)``: a
  channels_last view), ``batch_size=64``;
- ``captum``: ``captum.attr.Lime`` / ``KernelShap`` with ``feature_mask`` and
  ``perturbations_per_eval=64`` (its default, 1, is many times slower);
- ``shap``: ``shap.KernelExplainer`` over the segment coalitions (one background row of zeros),
  its ``predict`` building the images in NumPy as shap's image examples do, ``nsamples=254``
  (shap adds the full and empty coalitions).

Grad-CAM (batch 8) on the tuned path is compared with the best exact forward of the batch
(the fastest fp32 forward without autograd: either memory format, and the path's oneDNN twin
where it has one): the floor of any exact CAM; at least ``GRADCAM_ROUNDS`` interleaved rounds.

Every implementation of a row is timed in rounds, interleaved (A, B, C, C, B, A, ...): the
machine's speed drifts. Reported: medians and ratios to the old path.

The budget section starts the gRPC server on EfficientNet-Lite0 (warmed and tuned), sends a
default LIME and a default KernelSHAP request with ``budget_ms=2000`` through the client, and
reports the end-to-end time, the samples used, whether standard errors came back, and the
Spearman correlation of the budgeted map's segment weights with the full answer's (same seed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import xai_serve
from benchmarks.bench_explainers import _segment_mean_image as _fill
from benchmarks.bench_explainers import lime_peer
from benchmarks.timing import interleaved_medians, write_results
from xai_serve.explainers.forward import ForwardPath
from xai_serve.models.tuning import TuneSettings, resolve_cache_dir, tune

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES = 256
BATCH = 64
# Grad-CAM and the forward differ by a few per cent: rounds enough for the median of a few
# hundred milliseconds' calls to settle (--gradcam-only takes --rounds as given).
GRADCAM_ROUNDS = 101


# --------------------------------------------------------------------------- setup


def _photo() -> Tensor:
    from xai_serve.demo import load_photos

    return dict(load_photos())["coffee"]


def _models(quick: bool) -> list[tuple[str, nn.Module, Any]]:
    """``(name, module, preprocess)``: preprocess maps a uint8 photo to ``Tensor[3, 224, 224]``."""
    from torchvision.models import resnet50
    from torchvision.models.vision_transformer import VisionTransformer

    from xai_serve.models import load_model, model_config_from_dict

    lite0 = load_model(model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"}))
    models = [("efficientnet_lite0", lite0.module, lambda p: lite0.preprocess(p)[0])]
    if quick:
        return models
    torch.manual_seed(0)
    r50 = resnet50(weights=None).eval()
    torch.manual_seed(0)
    vit = VisionTransformer(
        image_size=224, patch_size=16, num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536
    ).eval()
    # torchvision zero-initialises the classification head: every logit would be 0, every
    # explanation flat and the fidelity guard trivially met. Random weights there too.
    with torch.no_grad():
        vit.heads.head.weight.normal_(0.0, 0.02)
    return [*models, ("resnet50", r50, models[0][2]), ("vit_s16", vit, models[0][2])]


def _set_format(model: nn.Module, channels_last: bool) -> None:
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _spearman(a: Tensor, b: Tensor) -> float:
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


# --------------------------------------------------------------------------- implementations


def _ours(model: nn.Module, x: Tensor, seg: Tensor, method: str, path: ForwardPath) -> Callable:
    def run() -> Tensor:
        _set_format(model, path.channels_last)
        return xai_serve.explain(
            model, x, method, segments=seg, samples=SAMPLES, seed=0, path=path
        ).weights

    return run


def _lime_peer(model: nn.Module, x: Tensor, seg: Tensor) -> Callable:
    peer = lime_peer(model, x, seg, contiguous=False)

    def run() -> Any:
        _set_format(model, False)
        return peer()

    return run


def _captum_peer(model: nn.Module, x: Tensor, seg: Tensor, method: str, t: int) -> Callable:
    from captum.attr import KernelShap, Lime

    cls = Lime if method == "lime" else KernelShap

    def run() -> Tensor:
        _set_format(model, False)
        explainer = cls(lambda inp: torch.softmax(model(inp), dim=1))
        with torch.no_grad():
            return explainer.attribute(
                x,
                target=t,
                feature_mask=seg[:, None],
                baselines=_fill(x, seg),
                n_samples=SAMPLES,
                perturbations_per_eval=BATCH,
            )

    return run


def _shap_peer(model: nn.Module, x: Tensor, seg: Tensor, t: int) -> Callable:
    import shap

    s = int(seg.max()) + 1
    image = x[0].numpy()
    fill = _fill(x, seg)[0].numpy()
    seg_np = seg[0].numpy()

    def predict(z: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, z.shape[0], BATCH):
            keep = z[start : start + BATCH] > 0.5  # [n, S]
            mask = keep[:, seg_np][:, None]  # [n, 1, H, W]
            batch = np.where(mask, image[None], fill[None]).astype(np.float32)
            with torch.inference_mode():
                out.append(torch.softmax(model(torch.from_numpy(batch)), 1)[:, t].numpy())
        return np.concatenate(out)

    def run() -> Any:
        _set_format(model, False)
        np.random.seed(0)
        explainer = shap.KernelExplainer(predict, np.zeros((1, s)))
        return explainer.shap_values(np.ones((1, s)), nsamples=SAMPLES - 2, silent=True)

    return run


# --------------------------------------------------------------------------- timing


def bench_model(name: str, model: nn.Module, prep: Any, rounds: int, cache: Path | None) -> dict:
    photo = _photo()
    x = prep(photo)[None]
    _set_format(model, False)
    seg = xai_serve.explain(model, x, "lime", samples=64, seed=0, path=ForwardPath()).segments
    with torch.no_grad():
        t = int(model(x).argmax(1))
    tuned = tune(model, (3, 224, 224), TuneSettings(), cache_dir=cache)
    report = tuned.report
    print(f"{name}: tuned path {report.summary()}", flush=True)
    old = ForwardPath(batch_size=BATCH)
    cl = ForwardPath(channels_last=True, batch_size=BATCH)
    fp32 = next(c for c in report.candidates if c.precision == "fp32" and not c.compiled)
    exact = ForwardPath(
        channels_last=fp32.channels_last,
        batch_size=fp32.batch_size,
        linear=fp32.linear,
        runner=tuned.runner if fp32.linear == "onednn" else None,
    )
    out: dict[str, Any] = {
        "tuned_path": report.summary(),
        "fp32_exact_path": exact.describe(),
        "tune_seconds": report.seconds,
        # every candidate tune() measured (compiled builds included), with its verdict
        "tune_candidates": [
            {
                "path": c.describe(),
                "images_per_s": c.images_per_s,
                "accepted": c.accepted,
                "note": c.note,
            }
            for c in report.candidates
        ],
        "tune_notes": list(report.notes),
        "target": t,
        "segments": int(seg.max()) + 1,
    }
    for method in ("lime", "kernelshap"):
        impls = {
            "old path": _ours(model, x, seg, method, old),
            "fp32 channels_last": _ours(model, x, seg, method, cl),
            "fp32 exact, tuned": _ours(model, x, seg, method, exact),
            "tuned": _ours(model, x, seg, method, tuned),
            "captum": _captum_peer(model, x, seg, method, t),
        }
        if method == "lime":
            impls["lime"] = _lime_peer(model, x, seg)
        else:
            impls["shap"] = _shap_peer(model, x, seg, t)
        med = interleaved_medians(impls, rounds)
        base = med["old path"]
        out[method] = {k: {"median_s": v, "vs_old_path": v / base} for k, v in med.items()}
        peer = "lime" if method == "lime" else "shap"
        out[method]["tuned_speedup_vs_" + peer] = med[peer] / med["tuned"]
        print(
            f"  {method}: " + ", ".join(f"{k} {v / base:.2f}" for k, v in med.items()), flush=True
        )
    # Grad-CAM vs the best exact forward of the batch.
    out["gradcam"] = bench_gradcam(model, prep, photo, tuned, max(rounds + 2, GRADCAM_ROUNDS))
    _set_format(model, tuned.channels_last)
    return out


def bench_gradcam(
    model: nn.Module, prep: Any, photo: Tensor, tuned: ForwardPath, rounds: int
) -> dict:
    """Grad-CAM (batch 8; the last convolution, or for a ViT its usual layer, ``ln_1`` of the
    last block) on the tuned path vs the best exact forward of the batch (the fastest of the
    model's fp32 forward in either memory format and, where the path has one, its oneDNN
    twin's, under inference_mode), timed in ``rounds`` interleaved rounds: the ratio of
    medians, of minima (the least disturbed call of each), and the median of the per-round
    ratios (the two calls of a round ran side by side: the least moved by a load that comes
    and goes; on a shared machine the medians of two costs this close move by several per
    cent from run to run).

    The candidate forwards are timed first, interleaved (a call in the other memory format
    converts the model's weights); the comparison itself runs with the model in the best
    one's format, so that when it is the tuned path's, neither side's timed calls convert
    weights.
    """
    xb = prep(photo)[None].repeat(8, 1, 1, 1)
    xb = xb + 0.01 * torch.randn(xb.shape, generator=torch.Generator().manual_seed(0))
    layer = _last_conv(model)  # None: the method's default layer

    def forward(channels_last: bool, net: nn.Module) -> Callable:
        def run() -> Tensor:
            _set_format(model, channels_last)  # the twin shares the model's parameters
            inp = xb.contiguous(
                memory_format=torch.channels_last if channels_last else torch.contiguous_format
            )
            with torch.inference_mode():
                return net(inp)

        return run

    def gradcam() -> Tensor:
        _set_format(model, tuned.channels_last)
        return xai_serve.explain(model, xb, "gradcam", layer=layer, path=tuned).maps

    candidates = {
        "forward contiguous": (False, model),
        "forward channels_last": (True, model),
    }
    if tuned.runner is not None:
        candidates["forward onednn twin"] = (tuned.channels_last, tuned.runner)
    formats = interleaved_medians(
        {k: forward(*v) for k, v in candidates.items()}, max(3, rounds // 4)
    )
    best_name = min(formats, key=formats.__getitem__)
    best_cl, _ = candidates[best_name]
    _set_format(model, best_cl)
    used = xai_serve.explain(model, xb[:1], "gradcam", layer=layer, path=tuned).layer
    times: dict[str, list[float]] = {}
    med = interleaved_medians(
        {best_name: forward(*candidates[best_name]), "gradcam tuned": gradcam},
        rounds,
        times=times,
    )
    ratio = med["gradcam tuned"] / med[best_name]
    ratio_min = min(times["gradcam tuned"]) / min(times[best_name])
    # Round by round: the two calls of a round ran next to each other, under the same load.
    ratio_paired = statistics.median(
        g / f for g, f in zip(times["gradcam tuned"], times[best_name], strict=True)
    )
    _set_format(model, tuned.channels_last)
    print(
        f"  gradcam: {ratio:.2f}x the best exact forward (medians; minima {ratio_min:.2f}x, "
        f"median of per-round ratios {ratio_paired:.2f}x, {rounds} rounds)",
        flush=True,
    )
    return {
        **{k: {"median_s": v, "min_s": min(times[k])} for k, v in med.items()},
        "format_medians_s": formats,
        "best_exact_forward": best_name,
        "layer": used,
        "rounds": rounds,
        "vs_best_exact_forward": ratio,
        "vs_best_exact_forward_min": ratio_min,
        "vs_best_exact_forward_per_round_median": ratio_paired,
    }


def _last_conv(model: nn.Module) -> str | None:
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            name = n
    return None if name is None or name.startswith("conv_proj") else name


# --------------------------------------------------------------------------- budget via gRPC


def _budget_in_thread(client_cls: Any, cache: Path | None) -> dict:
    import asyncio
    import threading

    from xai_serve.models import model_config_from_dict
    from xai_serve.serving.config import ServerConfig
    from xai_serve.serving.server import build_server

    cfg = ServerConfig(
        host="127.0.0.1",
        port=0,
        warmup=True,
        tuning_dir="" if cache is None else str(cache),
        models=(model_config_from_dict({"name": "efficientnet_lite0", "source": "bundled"}),),
    )
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        # the gRPC aio server binds to the loop it is built on: build it in the loop's thread
        asyncio.set_event_loop(loop)
        try:
            holder["server"] = build_server(cfg)
            loop.run_until_complete(holder["server"].start_serving())
            loop.run_until_complete(holder["server"].load_models())
        except BaseException as e:
            holder["error"] = e
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    if not ready.wait(1800):
        raise RuntimeError("the server did not get ready")
    if "error" in holder:
        raise RuntimeError(f"the server did not start: {holder['error']!r}")
    server = holder["server"]
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_photo().permute(1, 2, 0).numpy()).save(buf, format="PNG")
    photo = buf.getvalue()
    out: dict[str, Any] = {}
    try:
        with client_cls(f"127.0.0.1:{server.port}") as client:
            for method in ("lime", "kernelshap"):
                full = client.explain(
                    photo, model="efficientnet_lite0", method=method, seed=1, timeout=None
                )
                runs = []
                for _ in range(3):
                    t = time.perf_counter()
                    got = client.explain(
                        photo,
                        model="efficientnet_lite0",
                        method=method,
                        seed=1,
                        budget_ms=2000,
                        timeout=None,
                    )
                    runs.append((time.perf_counter() - t, got))
                elapsed = [r[0] for r in runs]
                got = runs[-1][1]
                n = min(len(got.segment_weights), len(full.segment_weights))
                out[method] = {
                    "end_to_end_s": elapsed,
                    "max_end_to_end_s": max(elapsed),
                    "samples_used": [r[1].samples for r in runs],
                    "full_samples": full.samples,
                    "stderr_returned": got.segment_stderr is not None
                    and len(got.segment_stderr) == n,
                    "spearman_vs_full": _spearman(
                        torch.as_tensor(got.segment_weights[:n]),
                        torch.as_tensor(full.segment_weights[:n]),
                    ),
                }
                print(f"budget {method}: {out[method]}", flush=True)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
    return out


# --------------------------------------------------------------------------- report


def _markdown(data: dict) -> str:
    lines = [
        f"# Forward paths and latency, {data['date']}, {data['device']}",
        "",
        f"CPU flags: {data['cpu_flags']}; torch {data['torch']}, {data['threads']} threads.",
        "Times are medians of interleaved rounds; ratios are to the old path (fp32, NCHW, "
        "batch 64) in the same run. 256 samples, the photo's SLIC segments.",
        "",
    ]
    for name, m in data["models"].items():
        lines += [f"## {name}", "", f"Tuned path: {m['tuned_path']}", ""]
        if "fp32_exact_path" in m:
            lines += [f"fp32 exact, tuned: {m['fp32_exact_path']}", ""]
        if m.get("tune_candidates"):
            lines += [
                "| candidate tune() measured | images/s | chosen | note |",
                "|---|---:|---|---|",
            ]
            lines += [
                f"| {c['path']} | {c['images_per_s']:.1f} | {'yes' if c['accepted'] else ''} "
                f"| {c['note']} |"
                for c in m["tune_candidates"]
            ]
            lines += [""] + [f"Note: {n}" for n in m.get("tune_notes", [])] + [""]
        if "load_average_1min" in m:
            a, b = m["load_average_1min"]
            lines += [f"Load average (1 min) before / after: {a:.1f} / {b:.1f}.", ""]
        for method in [k for k in ("lime", "kernelshap") if k in m]:
            peer = "lime" if method == "lime" else "shap"
            lines += [
                f"| {method} | median s | x old path |",
                "|---|---|---|",
                *[
                    f"| {k} | {v['median_s']:.2f} | {v['vs_old_path']:.2f} |"
                    for k, v in m[method].items()
                    if isinstance(v, dict)
                ],
                "",
                f"Tuned vs {peer}: {m[method]['tuned_speedup_vs_' + peer]:.2f}x faster.",
                "",
            ]
        if "gradcam" in m:
            g = m["gradcam"]
            extra = ""
            if "vs_best_exact_forward_min" in g:
                paired = g.get("vs_best_exact_forward_per_round_median")
                per_round = "" if paired is None else f"; median of per-round ratios {paired:.2f}x"
                extra = (
                    f" (ratio of medians; of minima {g['vs_best_exact_forward_min']:.2f}x"
                    f"{per_round}; {g['rounds']} interleaved rounds)"
                )
            lines += [
                f"Grad-CAM (batch 8, layer {g['layer']}) on the tuned path: "
                f"{g['vs_best_exact_forward']:.2f}x the best exact forward of the batch"
                f" ({g['best_exact_forward']}){extra}.",
                "",
            ]
    if data.get("budget"):
        lines += [
            "## budget_ms=2000 through gRPC (EfficientNet-Lite0, default options)",
            "",
            "| method | end to end s (max of 3) | samples used | stderr | Spearman vs full |",
            "|---|---|---|---|---|",
        ]
        for method, b in data["budget"].items():
            lines.append(
                f"| {method} | {b['max_end_to_end_s']:.2f} | {b['samples_used']} of "
                f"{b['full_samples']} | {'yes' if b['stderr_returned'] else 'no'} | "
                f"{b['spearman_vs_full']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def _cpu_flags() -> str:
    from xai_serve.machine import cpu_flags

    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile")
    return " ".join(f for f in wanted if f in cpu_flags()) or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="EfficientNet-Lite0 only, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-budget", action="store_true", help="skip the gRPC budget section")
    parser.add_argument(
        "--models",
        default=None,
        help="comma-separated subset of efficientnet_lite0,resnet50,vit_s16",
    )
    parser.add_argument(
        "--gradcam-only",
        action="store_true",
        help="only tune (cached) and time Grad-CAM against the best exact forward, --rounds "
        "interleaved rounds (no budget section)",
    )
    parser.add_argument("--out", default=None, help="results stem (default: dated, in results/)")
    args = parser.parse_args()
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    cache = resolve_cache_dir(None)
    rounds = 1 if args.quick else args.rounds
    from benchmarks.run import _device_label

    label, device = _device_label()
    data: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "device": device.get("name", label),
        "cpu_flags": _cpu_flags(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "models": {},
    }
    wanted = None if args.models is None else set(args.models.split(","))
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{data['date']}-{label}-paths{'-quick' if args.quick else ''}"
    if args.out:
        stem = Path(args.out)

    def write() -> None:  # after every part, so that a late failure loses nothing measured
        write_results(stem, data, _markdown(data))

    for name, model, prep in _models(args.quick):
        if wanted is not None and name not in wanted:
            continue
        load_before = os.getloadavg()[0]
        if args.gradcam_only:
            tuned = tune(model, (3, 224, 224), TuneSettings(), cache_dir=cache)
            assert tuned.report is not None
            found = bench_gradcam(model, prep, _photo(), tuned, rounds)
            data["models"][name] = {"tuned_path": tuned.report.summary(), "gradcam": found}
        else:
            data["models"][name] = bench_model(name, model, prep, rounds, cache)
        # other work on the machine shows here (a quiet 2-core machine: ~2 while measuring)
        data["models"][name]["load_average_1min"] = [load_before, os.getloadavg()[0]]
        write()
    if not args.no_budget and not args.gradcam_only:
        from xai_serve.client import Client

        data["budget"] = _budget_in_thread(Client, cache)
        write()
    print(_markdown(data))
    print(f"written to {stem}.{{json,md}}")


if __name__ == "__main__":
    main()
