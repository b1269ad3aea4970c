"""``make bench``: run the op benchmarks and write ratios to ``benchmarks/results/``.

Writes ``<date>-<device>.json`` (the raw pytest-benchmark data plus the derived table) and
``<date>-<device>.md`` (the table), and prints the table. Every ratio compares timings taken in
the same run on the same machine: ``speedup = reference time / kernel time`` (medians), and on a
GPU the bandwidth a kernel reaches as a share of the device's peak memory bandwidth. For the
write-bound ``superpixel_mask`` a ``limit`` row times allocating and filling an output of the
same size (no computation), and ``time / limit`` says how close each implementation gets.

``--server`` (or ``--server-quick``) also runs :mod:`benchmarks.bench_server` (concurrent gRPC
clients against local servers, a few minutes) and adds its table and data to the results;
``--server-only`` runs just that, into ``<date>-<device>-serving.{json,md}``.

On the CPU, ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's switch for transparent huge pages on large
allocations) is set unless the caller set it: without it a fresh 150 MB output costs ~30 ms of
page faults on this kind of machine, for the reference and the kernels alike.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"


def _device_label() -> tuple[str, dict]:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info = {"kind": "cuda", "name": props.name, "sms": props.multi_processor_count}
        clock, bus = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
        if clock and bus:  # kHz, bits; double data rate
            info["peak_bandwidth_gbs"] = 2 * clock * 1e3 * bus / 8 / 1e9
        return props.name, info
    from xai_serve.machine import cpu_model

    cpu = cpu_model()
    return f"cpu-{os.cpu_count()}core", {
        "kind": "cpu",
        "name": cpu,
        "threads": torch.get_num_threads(),
    }


def _copy_bandwidth_gbs() -> float | None:
    """Measured device-to-device copy bandwidth (read + write) of a 1 GiB buffer."""
    import torch

    if not torch.cuda.is_available():
        return None
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * 4 * 10 / (start.elapsed_time(end) / 1e3) / 1e9


def _table(data: dict, device: dict) -> tuple[list[dict], str]:
    groups: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        per_call = bench["stats"]["median"] / info["calls"]
        groups.setdefault(bench["group"], {})[info["impl"]] = {
            "median_s": per_call,
            "min_s": bench["stats"]["min"] / info["calls"],
            "traffic_bytes": info["traffic_bytes"],
            "target": info["target"],
            "device": info["device"],
            "peak_rss_mb": info.get("peak_rss_mb"),
        }
    rows = []
    peak = device.get("peak_bandwidth_gbs")
    for group, impls in groups.items():
        ref = impls.get("reference")
        limit = impls.get("limit")
        ours = impls.get("xai_serve")
        for impl, r in impls.items():
            row = {
                "case": group,
                "impl": impl,
                "median_ms": r["median_s"] * 1e3,
                "speedup_vs_reference": ref["median_s"] / r["median_s"] if ref else None,
                "bandwidth_gbs": r["traffic_bytes"] / r["median_s"] / 1e9,
                "target": r["target"] if impl not in ("reference", "limit") else "",
                "time_over_limit": r["median_s"] / limit["median_s"] if limit else None,
                # explainer groups: how many times faster xai_serve is than this row
                "xai_serve_speedup": (
                    r["median_s"] / ours["median_s"]
                    if ours and impl not in ("limit", "xai_serve")
                    else None
                ),
            }
            if r["peak_rss_mb"] is not None:
                row["peak_rss_mb"] = r["peak_rss_mb"]
            if peak and r["device"] == "cuda":
                row["share_of_peak_bandwidth"] = row["bandwidth_gbs"] / peak
            rows.append(row)
    lines = [
        "| case | impl | median ms | speedup vs reference | time / limit | xai_serve speedup "
        "| GB/s | % of peak bandwidth | target |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "" if v is None else format(v, spec)

    for r in rows:
        share = r.get("share_of_peak_bandwidth")
        gbs = r["bandwidth_gbs"] if r["bandwidth_gbs"] > 0 else None
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['median_ms']:.3f} | "
            f"{fmt(r['speedup_vs_reference'], '.2f')}{'x' if r['speedup_vs_reference'] else ''} "
            f"| {fmt(r['time_over_limit'], '.2f')} | "
            f"{fmt(r['xai_serve_speedup'], '.2f')}{'x' if r['xai_serve_speedup'] else ''} | "
            f"{fmt(gbs, '.1f')} | {'' if share is None else f'{100 * share:.0f}%'} | "
            f"{r['target']} |"
        )
    memory = [r for r in rows if "peak_rss_mb" in r]
    if memory:
        lines += [
            "",
            "Peak memory: peak resident set size during one call (`getrusage` ru_maxrss) minus "
            "the resident set size just before it, in a fresh subprocess (first call).",
            "",
            "| case | impl | peak RSS over the pre-call RSS, MB |",
            "|---|---|---:|",
        ]
        lines += [f"| {r['case']} | {r['impl']} | {r['peak_rss_mb']:.0f} |" for r in memory]
    return rows, "\n".join(lines)


def _efficiency_table(eff: dict) -> str:
    """The KernelSHAP sample-efficiency measurement (not a timing) as markdown."""
    grid = list(next(iter(eff["errors"].values())))
    lines = [
        "KernelSHAP sample efficiency (not a timing): " + eff["setup"] + "; "
        f"mean |phi_exact| = {eff['mean_abs_exact']:.3g}.",
        "",
        "| impl | " + " | ".join(f"MAE @ {n}" for n in grid) + " | samples needed for MAE "
        f"<= {eff['threshold']:.3g} ({eff['threshold_rule']}) |",
        "|---|" + "---:|" * (len(grid) + 1),
    ]
    for impl, errs in eff["errors"].items():
        need = eff["samples_needed"][impl]
        lines.append(
            f"| {impl} | "
            + " | ".join(f"{errs[n]:.3g}" for n in grid)
            + f" | {need if need is not None else f'> {grid[-1]}'} |"
        )
    return "\n".join(lines)


def _stamp(label: str, device: dict) -> tuple[str, str, dict, str]:
    """``(date, file slug, metadata, heading)`` of a results file."""
    import torch

    from xai_serve import ops

    stamp = dt.date.today().isoformat()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower()
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "date": stamp,
        "device": device,
        "torch": torch.__version__,
        "build": ops.backend_info()["build"],
        "thp_mem_alloc": os.environ.get("THP_MEM_ALLOC_ENABLE"),
        "python": platform.python_version(),
    }
    head = f"Device: {device['name']} ({device['kind']}); torch {torch.__version__}; {stamp}"
    return stamp, slug, meta, head


def _write_serving(label: str, device: dict, quick: bool) -> int:
    """``--server-only``: the serving benchmark alone, in ``<date>-<device>-serving.*``."""
    from benchmarks.bench_server import run as run_server

    serving = run_server(quick=quick)
    stamp, slug, meta, head = _stamp(label, device)
    name = f"{stamp}-{slug}-serving"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, "serving": serving}, indent=1))
    (RESULTS / f"{name}.md").write_text(f"{head}\n\n{serving['table']}\n")
    print(f"\n{head}\n\n{serving['table']}\n\nwritten: benchmarks/results/{name}.{{json,md}}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    argv = list(argv if argv is not None else sys.argv[1:])
    server = None
    for flag in ("--server", "--server-quick"):
        if flag in argv:
            argv.remove(flag)
            server = flag
    server_only = "--server-only" in argv
    if server_only:
        argv.remove("--server-only")
        server = server or "--server"
    import pytest

    label, device = _device_label()
    if server_only:
        return _write_serving(label, device, server == "--server-quick")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        args = [
            str(ROOT / "bench_ops.py"),
            str(ROOT / "bench_explainers.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            f"--benchmark-json={raw}",
            "--benchmark-columns=median,min,rounds",
            *argv,
        ]
        code = pytest.main(args)
        if code != 0 or not raw.exists():
            print(f"benchmarks failed (pytest exit {code})", file=sys.stderr)
            return int(code) or 1
        data = json.loads(raw.read_text())
    device["copy_bandwidth_gbs"] = _copy_bandwidth_gbs()
    rows, table = _table(data, device)
    from benchmarks.bench_explainers import sample_efficiency

    efficiency = sample_efficiency()
    table += "\n\n" + _efficiency_table(efficiency)
    serving = None
    if server is not None:
        from benchmarks.bench_server import run as run_server

        serving = run_server(quick=server == "--server-quick")
        table += "\n\n" + serving["table"]
    stamp, slug, meta, head = _stamp(label, device)
    if device.get("peak_bandwidth_gbs"):
        head += f"; peak memory bandwidth {device['peak_bandwidth_gbs']:.0f} GB/s"
    if device.get("copy_bandwidth_gbs"):
        head += f"; measured copy bandwidth {device['copy_bandwidth_gbs']:.0f} GB/s"
    (RESULTS / f"{stamp}-{slug}.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "rows": rows,
                "sample_efficiency": efficiency,
                "serving": serving,
                "raw": data,
            },
            indent=1,
        )
    )
    (RESULTS / f"{stamp}-{slug}.md").write_text(f"{head}\n\n{table}\n")
    print(f"\n{head}\n\n{table}\n\nwritten: benchmarks/results/{stamp}-{slug}.{{json,md}}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
