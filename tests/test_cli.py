"""The ``xai-serve`` command line: help, version, errors without tracebacks, flags over files."""

from __future__ import annotations

import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest

import xai_serve
from xai_serve import cli
from xai_serve.errors import NotFound
from xai_serve.models import bundled_model_config
from xai_serve.serving.config import (
    AuthConfig,
    LimitsConfig,
    ServerConfig,
    TlsConfig,
    load_config,
)

REPO = Path(__file__).resolve().parents[1]


class _Captured:
    def __init__(self) -> None:
        self.configs: list[ServerConfig] = []
        self.levels: list[str] = []
        self.result: int | BaseException = 0


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> _Captured:
    """Replace ``xai_serve.serving.server.serve`` (a stub module if it cannot be imported) and
    the logging setup, recording what the CLI passes."""
    captured = _Captured()

    def fake_serve(config: ServerConfig) -> int:
        captured.configs.append(config)
        if isinstance(captured.result, BaseException):
            raise captured.result
        return captured.result

    try:
        import xai_serve.serving.server as server
    except Exception:  # not written yet, or broken by a parallel edit: use a stub module
        server = types.ModuleType("xai_serve.serving.server")
        monkeypatch.setitem(sys.modules, "xai_serve.serving.server", server)
    monkeypatch.setattr(server, "serve", fake_serve, raising=False)
    monkeypatch.setattr(cli, "_configure_logging", captured.levels.append)
    monkeypatch.delenv(cli.CONFIG_ENV, raising=False)
    return captured


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: xai-serve" in out and "serve" in out
    assert cli.main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--config", "--host", "--port", "--metrics-port", "--metrics-host", "--device",
        "--max-batch-size", "--max-delay-ms", "--max-queue", "--tls-cert", "--tls-key",
        "--tls-client-ca", "--auth-tokens-file", "--auth-tokens-env", "--grace", "--no-warmup",
        "--log-level", "--model-dir", "--max-connection-age",
    ):  # fmt: skip
        assert flag in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"xai-serve {xai_serve.__version__}"


def test_no_command_prints_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: xai-serve" in capsys.readouterr().err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], served: _Captured) -> None:
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "--port: must be a port in 0..65535" in capsys.readouterr().err
    assert cli.main(["serve", "--max-batch-size", "0"]) == 2
    for bad in ("0", "-1", "inf", "nan"):
        assert cli.main(["serve", "--max-connection-age", bad]) == 2
        assert "--max-connection-age: must be a finite number > 0" in capsys.readouterr().err
    assert cli.main(["serve", "--bogus"]) == 2
    assert served.configs == []


def test_bad_config_exits_2_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: _Captured
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[limits]\nmax_queue = "x"\n')
    assert cli.main(["serve", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"xai-serve: error: {bad}: limits.max_queue must be a positive integer, got 'x'\n"
    )
    assert cli.main(["serve", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("xai-serve: error: config file") and "does not exist" in err
    # A flag that makes the config invalid is reported the same way.
    assert cli.main(["serve", "--tls-cert", "c.pem"]) == 2
    assert "--tls-key" in capsys.readouterr().err
    assert served.configs == []


def test_flags_override_the_file(tmp_path: Path, served: _Captured) -> None:
    cfg_file = tmp_path / "s.yaml"
    cfg_file.write_text(
        "port: 6000\nhost: 10.0.0.1\nlog_level: warning\n"
        "limits: {max_queue: 10, max_samples: 99}\n"
        "models:\n"
        "  - {name: a, source: bundled, max_batch_size: 4, max_delay_ms: 7}\n"
        "  - {name: b, source: torchvision, arch: resnet18, max_batch_size: 2}\n"
    )
    argv = [
        "serve", "--config", str(cfg_file), "--port", "0", "--max-batch-size", "32",
        "--max-queue", "5", "--device", "cpu", "--no-warmup", "--grace", "1.5",
        "--max-connection-age", "300",
        "--metrics-port", "0", "--metrics-host", "0.0.0.0", "--tls-cert", "c.pem",
        "--tls-key", "k.pem", "--tls-client-ca", "ca.pem", "--auth-tokens-env", "TOK",
        "--auth-tokens-file", "t.txt", "--log-level", "debug",
        "--model-dir", "/m1", "--model-dir", "/m2",
    ]  # fmt: skip
    served.result = 0
    assert cli.main(argv) == 0
    (got,) = served.configs
    base = load_config(cfg_file)
    assert got.port == 0 and base.port == 6000
    assert got.host == "10.0.0.1"  # not overridden: from the file
    assert [(m.name, m.max_batch_size, m.max_delay_ms, m.device) for m in got.models] == [
        ("a", 32, 7.0, "cpu"),
        ("b", 32, 5.0, "cpu"),
    ]
    assert got.limits == LimitsConfig(max_queue=5, max_samples=99)
    assert got.tls == TlsConfig("c.pem", "k.pem", "ca.pem")
    assert got.auth == AuthConfig(tokens_file="t.txt", tokens_env="TOK")
    assert (got.warmup, got.grace_s, got.metrics_port, got.metrics_host) == (
        False, 1.5, 0, "0.0.0.0",
    )  # fmt: skip
    assert got.model_dirs == ("/m1", "/m2")
    assert got.max_connection_age_s == 300.0 and base.max_connection_age_s is None
    assert got.log_level == "DEBUG"
    assert served.levels == ["DEBUG"]


def test_cache_bytes_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], served: _Captured
) -> None:
    assert cli.main(["serve", "--help"]) == 0
    assert "--cache-bytes" in capsys.readouterr().out
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("[cache]\nmax_bytes = 1000\n")
    assert cli.main(["serve", "--config", str(cfg_file)]) == 0
    assert cli.main(["serve", "--config", str(cfg_file), "--cache-bytes", "268435456"]) == 0
    assert cli.main(["serve", "--config", str(cfg_file), "--cache-bytes", "0"]) == 0
    assert [c.cache.max_bytes for c in served.configs] == [1000, 268435456, 0]
    assert cli.main(["serve", "--cache-bytes", "-1"]) == 2
    assert "--cache-bytes: must be an integer >= 0, got -1" in capsys.readouterr().err
    assert len(served.configs) == 3


def test_no_config_serves_the_bundled_model(served: _Captured) -> None:
    assert cli.main(["serve", "--port", "0"]) == 0
    (got,) = served.configs
    assert got == ServerConfig(port=0)
    assert got.models == (bundled_model_config(),)
    assert served.levels == ["INFO"]


def test_config_from_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, served: _Captured
) -> None:
    cfg_file = tmp_path / "env.toml"
    cfg_file.write_text("port = 7007\n")
    monkeypatch.setenv(cli.CONFIG_ENV, str(cfg_file))
    assert cli.main(["serve"]) == 0
    assert served.configs[-1].port == 7007
    assert cli.main(["serve", "--port", "1"]) == 0  # flags still win
    assert served.configs[-1].port == 1


def test_serve_result_and_errors(capsys: pytest.CaptureFixture[str], served: _Captured) -> None:
    served.result = 3
    assert cli.main(["serve"]) == 3
    served.result = NotFound("models[x].path: no such file 'x.pt'")
    assert cli.main(["serve"]) == 1
    assert capsys.readouterr().err == "xai-serve: error: models[x].path: no such file 'x.pt'\n"
    served.result = KeyboardInterrupt()
    assert cli.main(["serve"]) == 130


def test_configure_logging_format(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, list(root.handlers)
    try:
        cli._configure_logging("WARNING")
        cli._configure_logging("WARNING")  # idempotent: one handler
        ours = [h for h in root.handlers if isinstance(h, cli._StderrHandler)]
        assert len(ours) == 1 and root.level == logging.WARNING
        ours[0].setStream(sys.stderr)  # capsys replaced sys.stderr after the handler was made
        logging.getLogger("xai_serve.test").warning("hello %d", 42)
        logging.getLogger("xai_serve.test").info("not shown")
        err = capsys.readouterr().err
        assert err.endswith(" WARNING xai_serve.test: hello 42\n")
        assert err[:4].isdigit()  # starts with the time
        assert "not shown" not in err
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        logging.captureWarnings(False)


def test_python_m_serving_reports_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("port: [1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "xai_serve.serving", "--config", str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"xai-serve: error: {bad}: invalid YAML at line 2")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
