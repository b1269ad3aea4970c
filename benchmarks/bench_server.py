"""Serving benchmark: N concurrent asyncio clients against a local gRPC server.

``python -m benchmarks.bench_server [--quick]`` prints a markdown table; :func:`run` returns it
with the raw numbers as a dict (``benchmarks/run.py --server`` adds both to its results).

Process layout. Each server is a separate process (``python -m xai_serve.serving``, the bundled
EfficientNet-Lite0 at 224 x 224 with its real weights, torch intra-op threads = 2, the same
count as this process), so the server's event loop, batcher and device worker are not slowed by
this process's GIL. Two servers run side by side for the whole benchmark: one with the default
cross-request batching (``max_batch_size=16``) and one with batching off
(``max_batch_size=1``); only the one being measured receives requests, the other sits idle. The
load generator is this process: one asyncio loop, one :class:`~xai_serve.client.AsyncClient`
(own channel) per simulated client, each sending its requests back to back (closed loop). The
clients and the server share the machine's cores, as they would on any single host; a client's
share is small (serialising a 600 KB tensor per request).

Inputs are preprocessed float tensors ``[3, 224, 224]`` sent as raw tensor input (no image
decoding on the server), a different seeded random tensor per client.

Measurements (convention 9: ratios within one run; the three measurements of a case run one
after the other, and the order rotates from case to case so that drift does not favour one):

- server throughput = timed requests / wall time of the closed-loop phase (after a warm-up),
  p50 / p99 of the per-request latency seen by the clients, and the mean ``timing.batch_size``
  the server reports (the batch each request ran in);
- in-process throughput: ``xai_serve.explain`` on the same images with the same options, in
  batches of ``min(clients, max_batch_size)``, in this process (torch threads = 2);
- efficiency = server throughput / in-process throughput (the aim: >= 0.8 at 16 clients);
- speedup = batching server throughput / unbatched server throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xai_serve.bench import percentile
from xai_serve.serving.process import ServerProcess, free_port

THREADS = 2
MAX_BATCH = 16
MAX_DELAY_MS = 5.0
MODEL = "efficientnet_lite0"


@dataclass(frozen=True)
class Case:
    method: str
    clients: int
    requests: int  # per client, timed
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.method} x{self.clients}"


def cases(quick: bool) -> list[Case]:
    """The benchmark's cases; ``quick`` keeps the same shape with fewer requests and samples."""
    lime = (("samples", 32 if quick else 64), ("segmenter", "grid"), ("n_segments", 16))
    per = (4, 2, 2, 1, 1) if quick else (16, 8, 8, 2, 1)
    return [
        Case("gradcam", 1, per[0]),
        Case("gradcam", 4, per[1]),
        Case("gradcam", 16, per[2]),
        Case("lime", 1, per[3], lime),
        Case("lime", 16, per[4], lime),
    ]


# ------------------------------------------------------------------------------------ server


def _server(max_batch_size: int, log_dir: Path, device: str | None = None) -> ServerProcess:
    """A server in a child process on a loopback port (torch threads = THREADS); ``device``
    (e.g. ``"cuda"``) is where its model runs, the config's default when None."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    args = [
        "--host", "127.0.0.1", "--port", str(port),
        "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(MAX_DELAY_MS),
    ]  # fmt: skip
    if device is not None:
        args += ["--device", device]
    return ServerProcess(args, port=port, log=log_dir / f"server-{max_batch_size}.log", env=env)


# ------------------------------------------------------------------------------------ load


async def _closed_loop(
    address: str, case: Case, images: list[Any], warmup: int, rounds: int = 1
) -> dict:
    """``case.clients`` clients, each sending ``case.requests`` timed requests back to back,
    after ``warmup`` of them sent ``rounds`` untimed ones (so that the batch sizes load brings
    have been seen once: a new batch shape costs oneDNN its kernel set-up). All clients finish
    the warm-up before the timed phase starts."""
    from xai_serve.client import AsyncClient

    options = dict(case.options)
    clients = [AsyncClient(address, timeout=600.0) for _ in range(case.clients)]
    latencies: list[float] = []
    batches: list[int] = []
    compute_ms: list[float] = []
    queue_ms: list[float] = []

    async def one(i: int, timed: bool, seed: int) -> None:
        kw = dict(options)
        if case.method == "lime":
            kw["seed"] = seed
        t0 = time.perf_counter()
        exp = await clients[i].explain(images[i], model=MODEL, method=case.method, **kw)
        if timed:
            latencies.append(time.perf_counter() - t0)
            batches.append(exp.timing.batch_size)
            compute_ms.append(exp.timing.compute_ms)
            queue_ms.append(exp.timing.queue_ms)

    async def client_loop(i: int, n: int, timed: bool) -> None:
        for k in range(n):
            await one(i, timed, seed=1000 * i + k)

    try:
        if warmup:
            await asyncio.gather(*(client_loop(i, rounds, False) for i in range(warmup)))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, case.requests, True) for i in range(case.clients)))
        wall = time.perf_counter() - start
    finally:
        for c in clients:
            await c.close()
    n = len(latencies)
    return {
        "requests": n,
        "wall_s": wall,
        "throughput": n / wall,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "mean_batch": statistics.fmean(batches),
        "batch_sizes": sorted(set(batches)),
        "mean_compute_ms": statistics.fmean(compute_ms),
        "mean_queue_ms": statistics.fmean(queue_ms),
    }


def _in_process(module: Any, case: Case, images: list[Any]) -> dict:
    """``xai_serve.explain`` on the case's images in batches of min(clients, MAX_BATCH)."""
    import torch

    import xai_serve

    batch = min(case.clients, MAX_BATCH)
    options = dict(case.options)  # the wire's option names are explain()'s
    total = case.clients * case.requests
    stack = torch.stack(images[: case.clients])
    # the same images as the clients send, in client order, `requests` rounds
    order = [i for _ in range(case.requests) for i in range(case.clients)]

    def call(idx: list[int]) -> None:
        kw = dict(options)
        if case.method == "lime":
            kw["seed"] = [1000 * i for i in idx]
        xai_serve.explain(module, stack[idx], case.method, **kw)

    warm = order[:batch] if case.method == "gradcam" else order[:1]
    call(warm)
    call(warm)
    start = time.perf_counter()
    for k in range(0, total, batch):
        call(order[k : k + batch])
    if stack.is_cuda or any(p.is_cuda for p in module.parameters()):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return {"images": total, "batch": batch, "wall_s": wall, "throughput": total / wall}


def _baseline_worker(conn: Any, device: str | None = None) -> None:
    """Child process of the in-process baseline: loads the model, then runs the cases it is
    sent (``None`` ends it). Kept out of the load generator's process, whose gRPC threads would
    otherwise compete with torch's intra-op threads (on 2 cores that slowed it ~10x)."""
    import dataclasses

    import torch

    from xai_serve.models import bundled_model_config, load_model

    torch.set_num_threads(THREADS)
    config = bundled_model_config(MODEL)
    if device is not None:
        config = dataclasses.replace(config, device=device)
    model = load_model(config)
    conn.send("ready")
    while (msg := conn.recv()) is not None:
        case, images = msg
        conn.send(_in_process(model.module, case, images))


class Baseline:
    """The in-process baseline in a spawned child process (a clean interpreter, no gRPC)."""

    def __init__(self, device: str | None = None) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_baseline_worker, args=(child, device), daemon=True)
        self.proc.start()

    async def ready(self) -> None:
        msg = await asyncio.to_thread(self.conn.recv)
        assert msg == "ready", msg

    def run(self, case: Case, images: list[Any]) -> dict:
        self.conn.send((case, images))
        return self.conn.recv()

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(30)


# ------------------------------------------------------------------------------------ driver


async def _run(quick: bool, device: str | None = None) -> dict:
    import torch

    logs = Path(tempfile.mkdtemp(prefix="xai-serve-bench-"))
    servers = {"batched": _server(MAX_BATCH, logs, device), "unbatched": _server(1, logs, device)}
    for s in servers.values():
        s.start()
    baseline = Baseline(device)
    try:
        await asyncio.gather(
            baseline.ready(), *(asyncio.to_thread(s.wait_ready, 180.0) for s in servers.values())
        )
        gen = torch.Generator().manual_seed(0)
        images = [torch.randn(3, 224, 224, generator=gen) for _ in range(MAX_BATCH)]
        rows = []
        for n, case in enumerate(cases(quick)):
            warmup = case.clients if case.method == "gradcam" else 1
            rounds = 4 if case.method == "gradcam" else 1
            steps = ["batched", "unbatched", "in_process"]
            steps = steps[n % 3 :] + steps[: n % 3]  # rotate the order from case to case
            res: dict[str, dict] = {}
            for step in steps:
                if step == "in_process":
                    res[step] = baseline.run(case, images)
                else:
                    addr = servers[step].address
                    res[step] = await _closed_loop(addr, case, images, warmup, rounds)
            b, u, p = res["batched"], res["unbatched"], res["in_process"]
            rows.append(
                {
                    "case": case.name,
                    "method": case.method,
                    "clients": case.clients,
                    "requests": case.clients * case.requests,
                    "options": dict(case.options),
                    "order": steps,
                    "server": b,
                    "server_unbatched": u,
                    "in_process": p,
                    "efficiency": b["throughput"] / p["throughput"],
                    "speedup_vs_unbatched": b["throughput"] / u["throughput"],
                }
            )
            print(f"  {case.name}: done", file=sys.stderr, flush=True)
    finally:
        baseline.stop()
        for s in servers.values():
            s.stop()
    return {
        "setup": {
            "model": f"{MODEL} (bundled, real ImageNet weights), 224 x 224",
            "input": "preprocessed float tensors [3, 224, 224] sent as raw tensor input",
            "layout": "server in a child process per config; clients in this process "
            "(asyncio, one channel each); in-process baseline in its own child process",
            "torch_threads": THREADS,
            "max_batch_size": MAX_BATCH,
            "max_delay_ms": MAX_DELAY_MS,
            "quick": quick,
            "device": device or "the config's default (cpu)",
        },
        "rows": rows,
    }


def table(result: dict) -> str:
    """The result of :func:`run` as markdown."""
    s = result["setup"]
    lines = [
        f"Serving: {s['model']}; {s['input']}; {s['layout']}; torch threads {s['torch_threads']}; "
        f"max_batch_size {s['max_batch_size']}, max_delay_ms {s['max_delay_ms']:g}. "
        "efficiency = server img/s / in-process batched img/s; speedup = server img/s / "
        "same server with max_batch_size=1.",
        "",
        "| case | requests | server img/s | p50 ms | p99 ms | mean batch (sizes) "
        "| in-process img/s (batch) | efficiency | unbatched img/s | unbatched p50 ms "
        "| speedup vs unbatched |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        b, u, p = r["server"], r["server_unbatched"], r["in_process"]
        sizes = ",".join(map(str, b["batch_sizes"]))
        lines.append(
            f"| {r['case']} | {r['requests']} | {b['throughput']:.2f} | {b['p50_ms']:.0f} | "
            f"{b['p99_ms']:.0f} | {b['mean_batch']:.1f} ({sizes}) | "
            f"{p['throughput']:.2f} ({p['batch']}) | {r['efficiency']:.2f} | "
            f"{u['throughput']:.2f} | {u['p50_ms']:.0f} | "
            f"{r['speedup_vs_unbatched']:.2f}x |"
        )
    opts = {r["method"]: r["options"] for r in result["rows"] if r["options"]}
    if opts:
        lines += ["", "Options: " + "; ".join(f"{m} {o}" for m, o in opts.items())]
    return "\n".join(lines)


def run(quick: bool = False, device: str | None = None) -> dict:
    """Run the serving benchmark; returns ``{"setup", "rows", "table"}``. ``device`` (e.g.
    ``"cuda"``, used by ``benchmarks/gpu_check.py``) runs the servers' model and the in-process
    baseline there; None keeps the config's default."""
    result = asyncio.run(_run(quick, device))
    result["table"] = table(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_server")
    parser.add_argument("--quick", action="store_true", help="fewer requests and lime samples")
    args = parser.parse_args(argv)
    result = run(args.quick)
    print(result["table"])
    return result


if __name__ == "__main__":
    main()
