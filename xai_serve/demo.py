"""``xai-serve demo``: the product end to end, on a real model and real photos.

Starts the gRPC server (``python -m xai_serve.serving``) on the bundled EfficientNet-Lite0 with
its ImageNet weights, sends five photos from ``skimage.data`` through gRPC with each of four
methods (the photos of one method as concurrent requests, which the server batches), writes
one picture per photo and method plus a contact sheet into the output folder, prints the
latency of each method (also written to ``demo-results.{md,json}`` there, with the model's
forward path and the machine) and stops the server with SIGTERM (it must exit 0).

It fails loudly instead of hanging: the server must be ready within ``startup_timeout``
seconds and every request answered within ``request_timeout``; a server that exits early is
reported with the end of its log.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xai_serve.errors import InvalidInput, Unavailable
from xai_serve.imaging import encode_png
from xai_serve.serving.process import ServerProcess, free_port, log_tail

__all__ = [
    "DEMO_METHODS",
    "DEMO_PHOTOS",
    "VIT_METHODS",
    "DemoMethod",
    "DemoReport",
    "DemoViT",
    "main_cli",
    "run_demo",
]

#: The photos of ``skimage.data`` the demo explains.
DEMO_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")


@dataclass(frozen=True)
class DemoMethod:
    """A method and the options the demo sends with it."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options) or "defaults"


#: One method of each kind, at the methods' defaults (the sampling methods seeded, so a rerun
#: draws the same pictures) but for integrated gradients' 32 Gauss-Legendre steps: the CAM
#: family (Grad-CAM, CAM), gradients (integrated gradients), the guided line (guided
#: backpropagation, Guided Grad-CAM), DeepLIFT and DeepSHAP, and the perturbation methods
#: (LIME and KernelSHAP over 25 SLIC superpixels).
DEMO_METHODS = (
    DemoMethod("gradcam"),
    DemoMethod("cam"),
    DemoMethod("integrated_gradients", (("steps", 32),)),
    DemoMethod("guided_backprop"),
    DemoMethod("guided_gradcam"),
    DemoMethod("deeplift"),
    DemoMethod("deepshap", (("seed", 0),)),
    DemoMethod("lime", (("seed", 0),)),
    DemoMethod("kernelshap", (("seed", 0),)),
)

#: What the demo shows of a vision transformer, when it is given one (:class:`DemoViT`).
VIT_METHODS = (DemoMethod("attention_rollout"), DemoMethod("attention_gradcam"))

MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class DemoViT:
    """A vision transformer the demo explains as well, with :data:`VIT_METHODS`: a
    ``torchvision`` or ``timm`` architecture (``arch``, e.g. ``vit_b_16`` or
    ``deit_small_patch16_224``) and its ImageNet weights (a state-dict file; nothing is
    downloaded), preprocessed with the ImageNet transform (resize 256, crop 224)."""

    source: str
    arch: str
    path: Path
    name: str = "vit"

    def config_toml(self) -> str:
        """The server config of the demo's two models (the ViT's folder allowed)."""
        folder = self.path.resolve().parent
        return (
            f"model_dirs = [{json.dumps(str(folder))}]\n\n"
            f'[[models]]\nname = "{MODEL}"\nsource = "bundled"\n\n'
            f"[[models]]\nname = {json.dumps(self.name)}\nsource = {json.dumps(self.source)}\n"
            f"arch = {json.dumps(self.arch)}\npath = {json.dumps(str(self.path.resolve()))}\n"
            f'class_names = "imagenet"\n'
        )


@dataclass
class MethodStats:
    """What one method's requests measured."""

    method: DemoMethod
    model: str = MODEL
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    compute_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0


@dataclass
class DemoReport:
    """The outcome of :func:`run_demo`: files written, per-method statistics, server start-up
    time and exit code, and the results (:class:`xai_serve.runner.FileResult`) themselves."""

    out_dir: Path
    pictures: list[Path]
    contact_sheet: Path
    stats: list[MethodStats]
    startup_s: float
    server_exit: int
    results: dict[str, list[Any]] = field(default_factory=dict)  # method -> FileResult per photo
    forward_path: str = ""  # the server's ListModels summary of the model's forward path

    def write_results(self) -> tuple[Path, Path]:
        """``demo-results.md`` and ``demo-results.json`` in the output folder: the table, the
        model's forward path, the machine and the date (what the README's demo table cites)."""
        import datetime

        import torch

        from xai_serve.machine import cpu_model

        cpu = cpu_model()
        machine = {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        }
        date = datetime.date.today().isoformat()
        data = {
            "date": date,
            "machine": machine,
            "model": MODEL,
            "forward_path": self.forward_path,
            "startup_s": self.startup_s,
            "methods": [
                {
                    "method": s.method.name,
                    "model": s.model,
                    "options": dict(s.method.options),
                    "latencies_ms": s.latencies_ms,
                    "batch_sizes": s.batch_sizes,
                    "compute_ms": s.compute_ms,
                    "wall_s": s.wall_s,
                }
                for s in self.stats
            ],
        }
        json_path = self.out_dir / "demo-results.json"
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        where = machine["cuda"] or f"{cpu}, {machine['cores']} cores"
        md = (
            f"# xai-serve demo, {date}, {where}\n\n"
            f"torch {machine['torch']}; model {MODEL}; server ready in {self.startup_s:.1f} s; "
            f"forward path: {self.forward_path or 'not reported'}\n\n{self.table()}\n"
        )
        md_path = self.out_dir / "demo-results.md"
        md_path.write_text(md)
        return md_path, json_path

    def table(self) -> str:
        """The per-method latency table (markdown)."""
        lines = [
            "| method | options | requests | batch sizes | latency p50 ms | latency max ms "
            "| server compute ms per batch | wall s |",
            "|---|---|---:|---|---:|---:|---:|---:|",
        ]
        for s in self.stats:
            sizes = ", ".join(str(b) for b in sorted(set(s.batch_sizes)))
            name = s.method.name if s.model == MODEL else f"{s.method.name} ({s.model})"
            lines.append(
                f"| {name} | {s.method.describe()} | {len(s.latencies_ms)} | {sizes} "
                f"| {statistics.median(s.latencies_ms):.0f} | {max(s.latencies_ms):.0f} "
                f"| {statistics.mean(s.compute_ms):.0f} | {s.wall_s:.1f} |"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------------


def load_photos(names: Sequence[str] = DEMO_PHOTOS) -> list[tuple[str, Any]]:
    """``(name, uint8 RGB Tensor[3, H, W])`` of ``skimage.data`` photos (``motorcycle_left``:
    the left view of ``stereo_motorcycle``)."""
    try:
        from skimage import data
    except ImportError:
        raise Unavailable(
            "the demo's photos come from scikit-image: pip install scikit-image "
            "(`make setup` installs it)"
        ) from None
    import torch

    special = {"motorcycle_left": lambda: data.stereo_motorcycle()[0]}
    photos = []
    for name in names:
        loader = special.get(name) or getattr(data, name, None)
        if loader is None:
            raise InvalidInput(f"skimage.data has no photo {name!r}")
        array = loader()
        if array.ndim == 2:
            array = array[:, :, None].repeat(3, axis=2)
        photos.append((name, torch.from_numpy(array[:, :, :3].copy()).permute(2, 0, 1)))
    return photos


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


async def _explain_all(
    address: str,
    photos: Sequence[tuple[str, bytes]],
    method: DemoMethod,
    request_timeout: float,
    model: str = MODEL,
) -> tuple[list[Any], MethodStats]:
    """Every photo with ``method``, as concurrent requests; the answers in photo order."""
    from xai_serve.client import AsyncClient

    stats = MethodStats(method, model)
    async with AsyncClient(address, timeout=request_timeout) as client:

        async def one(name: str, data: bytes) -> Any:
            start = time.perf_counter()
            answer = await client.explain(
                data, model=model, method=method.name, top_k=3, request_id=name,
                **dict(method.options),
            )  # fmt: skip
            stats.latencies_ms.append((time.perf_counter() - start) * 1e3)
            stats.batch_sizes.append(answer.timing.batch_size)
            stats.compute_ms.append(answer.timing.compute_ms)
            return answer

        start = time.perf_counter()
        answers = await asyncio.gather(*(one(n, d) for n, d in photos))
        stats.wall_s = time.perf_counter() - start
    return list(answers), stats


def run_demo(
    out_dir: str | os.PathLike[str] = "out",
    *,
    methods: Sequence[DemoMethod] = DEMO_METHODS,
    photos: Sequence[str] = DEMO_PHOTOS,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 300.0,
    request_timeout: float = 600.0,
    server_args: Sequence[str] = (),
    say: Any = print,
    vit: DemoViT | None = None,
) -> DemoReport:
    """Run the demo (see the module doc); ``say`` prints its progress lines. With ``vit``, the
    server also serves that vision transformer, and every photo's row gains its
    :data:`VIT_METHODS` panels."""
    from xai_serve import runner, viz
    from xai_serve.models import TransformConfig, bundled_model_config
    from xai_serve.models.registry import imagenet_classes, preprocess_image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = load_photos(photos)
    cfg = bundled_model_config(MODEL)
    size = cfg.resolved_input_size
    views = {name: preprocess_image(rgb, cfg.transform, size)[1] for name, rgb in images}
    encoded = [(name, encode_png(rgb)) for name, rgb in images]
    for name, data in encoded:  # the inputs, for `xai-serve explain out/photos ...`
        (out / "photos").mkdir(exist_ok=True)
        (out / "photos" / f"{name}.png").write_bytes(data)

    port = port or free_port(host)
    config: list[str] = []
    if vit is not None:
        if not vit.path.is_file():
            raise InvalidInput(f"the ViT weights file {str(vit.path)!r} does not exist")
        (out / "demo-server.toml").write_text(vit.config_toml())
        config = ["--config", str(out / "demo-server.toml")]
        imagenet = TransformConfig()  # resize 256, centre crop 224, ImageNet mean and std
        vit_views = {
            name: preprocess_image(rgb, imagenet, imagenet.crop)[1] for name, rgb in images
        }
    server = ServerProcess(
        [*config, "--host", host, "--port", str(port), "--grace", "10", *server_args],
        port=port,
        host=host,
        log=out / "server.log",
    )
    say(
        f"starting the server on {server.address} ({MODEL}, ImageNet weights); "
        f"log: {server.log_path}"
    )
    pictures: list[Path] = []
    stats: list[MethodStats] = []
    results: dict[str, list[Any]] = {}
    classes = imagenet_classes()
    with server:
        startup = server.wait_ready(startup_timeout)
        say(f"server ready in {startup:.1f} s")
        from xai_serve.client import Client

        forward_path = ""
        with Client(server.address) as client:
            for info in client.list_models(timeout=request_timeout):
                if info.forward_path is not None:
                    say(f"forward path of {info.name}: {info.forward_path.summary}")
                    if info.name == MODEL:
                        forward_path = info.forward_path.summary
        plan = [(MODEL, method, views) for method in methods]
        if vit is not None:
            plan += [(vit.name, method, vit_views) for method in VIT_METHODS]
        for model, method, seen in plan:
            on = "" if model == MODEL else f" on {model}"
            say(f"{method.name}{on} ({method.describe()}): {len(encoded)} photos ...")
            answers, st = asyncio.run(
                _explain_all(server.address, encoded, method, request_timeout, model)
            )
            stats.append(st)
            say(
                f"  done in {st.wall_s:.1f} s, batch sizes "
                f"{sorted(set(st.batch_sizes))}, median latency "
                f"{statistics.median(st.latencies_ms):.0f} ms"
            )
            row = []
            for (name, _), answer in zip(encoded, answers, strict=True):
                target = int(answer.target)
                result = runner.FileResult(
                    source=name,
                    name=name if model == MODEL else f"{name}_{model}",
                    method=method.name,
                    model=model,
                    map=answer.map,
                    target=target,
                    target_label=classes[target] if 0 <= target < len(classes) else "",
                    top_k=[runner.Score(s.index, s.label, s.probability) for s in answer.top_k],
                    view=seen[name],
                    segments=answer.segments,
                    weights=answer.segment_weights,
                )
                pictures += runner.write_result(result, out)
                row.append(result)
            results[method.name if model == MODEL else f"{model}:{method.name}"] = row
        code = server.stop()
    if code != 0:
        raise Unavailable(
            f"the server exited with code {code} after SIGTERM (expected 0); the end of "
            f"{server.log_path}:\n{log_tail(server.log_path)}"
        )
    say("server stopped cleanly (exit 0)")

    cells = []
    for i, (name, _) in enumerate(encoded):
        top = results[methods[0].name][i].top_k
        photo = viz.panel(
            views[name],
            title=name,
            lines=[f"{k + 1}. {s.label} {s.probability:.1%}" for k, s in enumerate(top)],
        )
        row = [photo, *(runner.render(results[m.name][i]) for m in methods)]
        if vit is not None:
            row += [runner.render(results[f"{vit.name}:{m.name}"][i]) for m in VIT_METHODS]
        cells.append(row)
    also = f" and {vit.arch} ({vit.name}, last columns)" if vit is not None else ""
    sheet = viz.contact_sheet(
        cells,
        title=f"{MODEL}{also} (ImageNet) explained through the xai_serve gRPC server",
    )
    sheet_path = viz.save_png(sheet, out / "contact_sheet.png")
    return DemoReport(out, pictures, sheet_path, stats, startup, code, results, forward_path)


def main_cli(args: Any) -> int:
    """``xai-serve demo`` (registered by :mod:`xai_serve.cli`)."""
    from xai_serve.errors import XaiServeError

    vit = None
    if getattr(args, "vit_weights", None):
        vit = DemoViT(args.vit_source, args.vit_arch, Path(args.vit_weights))
    else:
        print("no --vit-weights: the contact sheet has no vision transformer columns")
    try:
        report = run_demo(
            args.out,
            port=args.port,
            startup_timeout=args.startup_timeout,
            request_timeout=args.request_timeout,
            vit=vit,
        )
    except (XaiServeError, OSError) as exc:
        print(f"xai-serve demo: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(report.table())
    print()
    md, js = report.write_results()
    print(f"wrote {len(report.pictures)} pictures, {report.contact_sheet}, {md} and {js}")
    return 0
