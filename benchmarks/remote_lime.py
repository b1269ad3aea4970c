"""LIME on a model served elsewhere vs the same model loaded here, on loopback, CPU.

``python -m benchmarks.remote_lime [--quick]`` writes
``benchmarks/results/<date>-cpu-2core-remote-lime.json`` and ``.md``.

The model: torchvision's resnet18 (seeded random weights, 10 classes) at 3 x 64 x 64, saved as
TorchScript. The same file is

* loaded here (``source = "torchscript"``, fp32, untuned): the **local** baseline;
* served by the KServe SDK's ``ModelServer`` (Open Inference Protocol gRPC v2, its own
  process, ``tests/serving/kserve_cnn.py``) and called as ``source = "oip"`` with
  ``in_flight`` 4 (the default) and 1 (one call at a time: no pipelining);
* served by a second ``xai-serve`` process (its ``ModelInfer``), ``in_flight`` 4.

Every process (this one and the servers) runs ``--threads`` torch threads (default 1): on 2
cores the client (masking, scoring, the surrogate) and the servers (the forwards) share the
same cores, and OpenMP teams of several threads in three processes would spin against each
other; with one thread each, local and remote forwards run alike.

Measured, interleaved (every implementation once per round, medians; see
:mod:`benchmarks.timing`):

1. **LIME** of one image (``samples`` 256, quick 128; ``n_segments`` 16, grid; chunks of 32
   perturbed images = one remote call each): the time of each remote variant over the
   local one.
2. **One forward batch** of 32 images: the remote call's time less the local forward's, the
   overhead per batch (serialisation, loopback gRPC, the server's own decoding and batching).
   Measured on resnet18 and, where the forward itself costs almost nothing and the overhead
   shows alone, on the 3 x 32 x 32 two-convolution CNN of the tests
   (``tests/serving/remote_servers.py``).

Both remote answers are checked to equal the local one (maps and logits), so the timing is of
the same work.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch
import torchvision

import xai_serve
from benchmarks.timing import interleaved_medians, write_results
from tests.serving.remote_servers import (
    INPUT,
    KServeProcess,
    local_config,
    remote_config,
    start_xai_serve,
    write_scripted,
)
from xai_serve.models import LoadedModel, load_model

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
SHAPE = (3, 64, 64)
CHUNK = 32


def _scripted(path: Path) -> Path:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    torch.jit.script(model).save(str(path))
    return path


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    samples = 128 if args.quick else 256
    rounds = 5 if args.quick else 11
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    d = Path(tempfile.mkdtemp(prefix="remote-lime-"))
    scripted = _scripted(d / "resnet18.pt")
    size = SHAPE[1:]
    tiny = write_scripted(d / "tiny.pt")
    kserve = KServeProcess(d, scripted, name="resnet18", input_shape=SHAPE, threads=threads)
    xai = start_xai_serve(d, scripted, name="resnet18", size=size, threads=threads)
    tiny_kserve = KServeProcess(d, tiny, name="tiny", threads=threads)
    tiny_xai = start_xai_serve(d, tiny, name="tiny", threads=threads)
    try:
        local = load_model(local_config("local", scripted, size=size))
        remote = {
            "kserve_in_flight_4": load_model(
                remote_config("k4", kserve.address, model="resnet18", size=size, max_batch=CHUNK)
            ),
            "kserve_in_flight_1": load_model(
                remote_config(
                    "k1", kserve.address, model="resnet18", size=size, max_batch=CHUNK, in_flight=1
                )
            ),
            "xai_serve_in_flight_4": load_model(
                remote_config("x4", xai.address, model="resnet18", size=size, max_batch=CHUNK)
            ),
        }
        x = torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(1))
        opts: dict[str, Any] = {
            "samples": samples,
            "n_segments": 16,
            "segmenter": "grid",
            "seed": 3,
            "batch_size": CHUNK,
        }

        def lime(m: LoadedModel) -> xai_serve.Explanation:
            return xai_serve.explain(m.module, x, "lime", path=m.path, **opts)

        want = lime(local)
        checks = {}
        for name, m in remote.items():
            got = lime(m)
            checks[name] = {
                "max_abs_map_diff": float((got.maps - want.maps).abs().max()),
                "max_abs_map": float(want.maps.abs().max()),
                "max_abs_logit_diff": float((got.logits - want.logits).abs().max()),  # type: ignore[operator]
            }
            assert checks[name]["max_abs_map_diff"] <= 1e-4 * max(1.0, checks[name]["max_abs_map"])
        calls_before = {n: m.remote.calls for n, m in remote.items()}  # type: ignore[union-attr]
        impls = {"local": lambda: lime(local)}
        impls.update({n: (lambda m=m: lime(m)) for n, m in remote.items()})
        lime_s = interleaved_medians(impls, rounds)
        calls = {
            n: (m.remote.calls - calls_before[n]) // (rounds + 1)  # type: ignore[union-attr]
            for n, m in remote.items()
        }

        batch = torch.randn((CHUNK, *SHAPE), generator=torch.Generator().manual_seed(2))

        def forward(m: LoadedModel) -> torch.Tensor:
            with torch.no_grad():
                return m.module(batch)

        fwd = {"local": lambda: forward(local)}
        fwd.update({n: (lambda m=m: forward(m)) for n, m in remote.items() if "in_flight_4" in n})
        forward_s = interleaved_medians(fwd, rounds * 4)

        tiny_models = {
            "local": load_model(local_config("tiny_local", tiny)),
            "kserve": load_model(remote_config("tk", tiny_kserve.address, model="tiny")),
            "xai_serve": load_model(remote_config("tx", tiny_xai.address, model="tiny")),
        }
        tiny_batch = torch.randn((CHUNK, *INPUT), generator=torch.Generator().manual_seed(4))

        def tiny_forward(m: LoadedModel) -> torch.Tensor:
            with torch.no_grad():
                return m.module(tiny_batch)

        tiny_s = interleaved_medians(
            {n: (lambda m=m: tiny_forward(m)) for n, m in tiny_models.items()}, rounds * 10
        )
        for m in (*remote.values(), *tiny_models.values()):
            if m.remote is not None:
                m.remote.close()
    finally:
        kserve.close()
        tiny_kserve.close()
        xai.kill()
        tiny_xai.kill()
    load_after = os.getloadavg()

    data: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads_per_process": threads,
        "load_average_before_after": [load_before[0], load_after[0]],
        "quick": args.quick,
        "model": "torchvision resnet18 (random seeded weights, 10 classes), 3x64x64, TorchScript",
        "lime": {"images": 1, **{k: v for k, v in opts.items() if k != "seed"}},
        "rounds": rounds,
        "lime_median_s": lime_s,
        "lime_ratio_to_local": {n: lime_s[n] / lime_s["local"] for n in lime_s},
        "remote_calls_per_lime": calls,
        "forward_batch": CHUNK,
        "forward_median_s": forward_s,
        "forward_overhead_ms_per_batch": {
            n: (forward_s[n] - forward_s["local"]) * 1e3 for n in forward_s if n != "local"
        },
        "tiny_cnn_forward_median_s": tiny_s,
        "tiny_cnn_overhead_ms_per_batch": {
            n: (tiny_s[n] - tiny_s["local"]) * 1e3 for n in tiny_s if n != "local"
        },
        "equal_to_local": checks,
    }
    per_call = {n: (lime_s[n] - lime_s["local"]) * 1e3 / max(1, calls[n]) for n in remote}
    data["lime_extra_ms_per_call"] = per_call
    rows = "\n".join(
        f"| {n} | {lime_s[n] * 1e3:.0f} | {lime_s[n] / lime_s['local']:.2f} | "
        f"{calls.get(n, '-')} | {per_call[n]:.1f} |" if n != "local" else
        f"| local | {lime_s[n] * 1e3:.0f} | 1.00 | - | - |"
        for n in lime_s
    )  # fmt: skip
    fwd_rows = "\n".join(
        f"| {n} | {forward_s[n] * 1e3:.1f} | "
        + ("-" if n == "local" else f"{(forward_s[n] - forward_s['local']) * 1e3:+.1f}")
        + " |"
        for n in forward_s
    )
    tiny_rows = "\n".join(
        f"| {n} | {tiny_s[n] * 1e3:.2f} | "
        + ("-" if n == "local" else f"{(tiny_s[n] - tiny_s['local']) * 1e3:+.2f}")
        + " |"
        for n in tiny_s
    )
    worst_map = max(c["max_abs_map_diff"] for c in checks.values())
    worst_logit = max(c["max_abs_logit_diff"] for c in checks.values())
    md = f"""# Remote vs local LIME ({data["date"]}, {data["cpu"]}, {data["cores"]} cores)

`python -m benchmarks.remote_lime{" --quick" if args.quick else ""}`. Model: {data["model"]}.
LIME of one image, {samples} samples, 16 grid superpixels, chunks of {CHUNK} perturbed images
(one remote call each); {rounds} interleaved rounds, medians. Each process
{threads} torch thread(s); the client and the servers share the cores (loopback). Load
average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (a shared machine: other
people's jobs ran meanwhile, so read the ratios, not the times).

| LIME via | median ms | ratio to local | calls | extra ms per call |
|---|---|---|---|---|
{rows}

One forward of {CHUNK} images of resnet18 (3 x 64 x 64):

| forward via | median ms | overhead ms per batch |
|---|---|---|
{fwd_rows}

One forward of {CHUNK} images of the tiny test CNN (3 x 32 x 32; the forward costs almost
nothing, so this is the protocol's overhead: encoding, loopback gRPC, the server's decoding
and batching; {rounds * 10} rounds):

| forward via | median ms | overhead ms per batch |
|---|---|---|
{tiny_rows}

Every remote LIME answer equals the local one (largest map difference {worst_map:.1e},
logits {worst_logit:.1e}).
"""
    stem = RESULTS / f"{data['date']}-cpu-{os.cpu_count()}core-remote-lime"
    write_results(stem, data, md)
    print(md)
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
