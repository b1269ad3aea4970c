"""The ``xai-serve`` command line: help, version, errors without tracebacks, flags over files;
``explain``'s progress bar, budgets and error bars and ``models``' forward paths on the tiny
test model (tests/serving/harness.py), in-process and through a real server."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

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
    """Replace ``xai_serve.serving.server.serve`` and the logging setup, recording what the CLI
    passes."""
    captured = _Captured()

    def fake_serve(config: ServerConfig) -> int:
        captured.configs.append(config)
        if isinstance(captured.result, BaseException):
            raise captured.result
        return captured.result

    import xai_serve.serving.server as server  # a server that cannot be imported fails here

    monkeypatch.setattr(server, "serve", fake_serve)
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


# --------------------------------------------------------------------------------------------
# explain: progress with samples, budgets, error bars; models: forward paths (tiny model)
# --------------------------------------------------------------------------------------------

# One frame of the bar: "[####....]  0/1  p.png 64/256 samples" (the note is optional).
FRAME = re.compile(r"\[([#.]+)\] +(\d+)/(\d+)  (\S*)(?: (\d+)/(\d+) samples)?")


def frames(err: str) -> list[tuple[int, int, str, int | None]]:
    """``(filled, done, file, samples)`` of every frame the bar drew on ``err``."""
    out = []
    for chunk in err.split("\r"):
        m = FRAME.match(chunk.strip())
        if m:
            samples = int(m[5]) if m[5] else None
            out.append((m[1].count("#"), int(m[2]), m[4], samples))
    return out


def test_progress_bar_fills_with_samples_of_images_in_flight() -> None:
    stream = io.StringIO()
    bar = cli.Progress(2, enabled=True, stream=stream)
    bar.partial("dir/a.png", 0.25, "a.png 64/256 samples")
    bar.partial("dir/b.png", 0.5, "b.png 128/256 samples")
    bar.partial("dir/a.png", 1.0, "a.png 256/256 samples")
    bar.advance("a.png", "dir/a.png")  # done: its share moves from in flight to done
    bar.advance("b.png", "dir/b.png")
    # 28 wide: (0 + .25)/2 -> 3, (.25 + .5)/2 -> 10, (1 + .5)/2 -> 21, then 1.5/2 -> 21 and
    # full only when every file is done (never full early from rounding)
    assert [(f, d) for f, d, _, _ in frames(stream.getvalue())] == [
        (3, 0), (10, 0), (21, 0), (21, 1), (28, 2),
    ]  # fmt: skip
    bar.close()
    assert stream.getvalue().endswith("\r" + " " * 100 + "\r")

    one = io.StringIO()
    single = cli.Progress(1, enabled=True, stream=one)
    single.advance("a.png", "a.png")
    assert one.getvalue() == ""  # one file, no rounds: empty-to-full says nothing
    single = cli.Progress(1, enabled=True, stream=one)
    single.partial("a.png", 0.5, "a.png 128/256 samples")
    assert frames(one.getvalue()) == [(14, 0, "a.png", 128)]

    quiet = io.StringIO()
    off = cli.Progress(3, stream=quiet)  # not a terminal: off by default
    off.partial("a", 0.5)
    off.advance("a", "a")
    assert quiet.getvalue() == ""


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A server config holding the tiny model (random resnet18, 64 x 64 inputs) and an image."""
    import torch

    from xai_serve.serving.codec import encode_png

    root = tmp_path_factory.mktemp("tiny")
    config = root / "tiny.toml"
    config.write_text(
        f'warmup = false\ntuning_dir = "{root / "tuning"}"\n'
        '[[models]]\nname = "tiny"\nsource = "torchvision"\narch = "resnet18"\n'
        "num_classes = 10\nmax_batch_size = 4\n"
        "transform = { resize = 64, crop = [64, 64] }\n"
    )
    pixels = (torch.rand(3, 70, 90, generator=torch.Generator().manual_seed(0)) * 255).byte()
    image = root / "p.png"
    image.write_bytes(encode_png(pixels))
    return {"config": config, "image": image, "root": root}


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[str]:
    from tests.serving.harness import ServerThread, tiny_model

    with ServerThread(models=[tiny_model()]) as server:
        yield server.address


SAMPLING = ["-o", "samples=256", "-o", "n_segments=16", "-o", "segmenter=grid", "-o", "seed=0"]


def _check_sampling_frames(err: str) -> None:
    """The bar moved with the rounds of the one image, before it was done, then filled."""
    drawn = frames(err)
    rounds = [(filled, samples) for filled, done, name, samples in drawn if samples is not None]
    assert len(rounds) >= 2, err
    assert [s for _, s in rounds] == sorted(s for _, s in rounds)
    assert rounds[0][1] < 256 and rounds[-1][1] == 256
    assert 0 < rounds[0][0] < rounds[-1][0] < 28  # it advanced while the image was in flight
    assert {name for _, _, name, _ in drawn} == {"p.png"}
    assert drawn[-1][:2] == (28, 1)


def test_cli_explain_progress_advances_with_samples_in_process(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["explain", str(tiny_files["image"]), "--config", str(tiny_files["config"]),
            "--method", "lime", *SAMPLING, "--out", str(tmp_path)]  # fmt: skip
    assert cli.main([*argv, "--progress"]) == 0
    captured = capsys.readouterr()
    _check_sampling_frames(captured.err)
    # the summary line says how much sampling went in and how settled the weights are
    assert re.search(r"lime target \d+ \(\d+\.\d%\) \[256 samples, weight stderr median "
                     r"[0-9.e-]+, max [0-9.e-]+\] -> ", captured.out), captured.out  # fmt: skip
    # not a terminal and no --progress: no bar at all
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "\r" not in captured.err and "samples" not in captured.err
    assert "[256 samples" in captured.out


def test_cli_explain_progress_advances_with_samples_through_a_server(
    tiny_server: str, tiny_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = cli.main(["explain", str(tiny_files["image"]), "--server", tiny_server, "--model",
                     "tiny", "--method", "kernelshap", *SAMPLING, "--out", str(tmp_path),
                     "--progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    _check_sampling_frames(captured.err)
    assert "kernelshap target" in captured.out and "[256 samples, weight stderr" in captured.out
    assert (tmp_path / "p_kernelshap.png").is_file()


def test_cli_explain_tolerance_and_budget_flags(
    tiny_server: str, tiny_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert cli.main(["explain", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--budget-ms MS" in help_text and "--tolerance SE" in help_text
    assert "same as -o budget_ms=MS" in help_text and "standard error" in help_text

    base = ["explain", str(tiny_files["image"]), "--out", str(tmp_path), "--method", "lime",
            *SAMPLING]  # fmt: skip
    # a loose tolerance stops after the first round, in-process and remotely
    for where in (["--config", str(tiny_files["config"])],
                  ["--server", tiny_server, "--model", "tiny"]):  # fmt: skip
        assert cli.main([*base, *where, "--tolerance", "10"]) == 0
        out = capsys.readouterr().out
        used = int(re.search(r"\[(\d+) samples", out)[1])  # type: ignore[index]
        assert 0 < used < 256, out
    # a budget too small for one round fails the image with the estimate, no traceback
    assert cli.main([*base, "--config", str(tiny_files["config"]), "--budget-ms", "1"]) == 1
    err = capsys.readouterr().err
    assert "budget_ms" in err and "1 of 1 input failed" in err and "Traceback" not in err
    # the flag and -o agree or the command is refused
    assert cli.main([*base, "--config", str(tiny_files["config"]), "--tolerance", "0.5",
                     "-o", "tolerance=0.25"]) == 2  # fmt: skip
    assert "--tolerance 0.5 and -o tolerance=0.25 disagree" in capsys.readouterr().err
    assert cli.main([*base, "--budget-ms", "0"]) == 2
    assert "--budget-ms: must be a positive integer" in capsys.readouterr().err
    # an option the method does not take is refused once, before any image
    assert cli.main(["explain", str(tiny_files["image"]), "--config", str(tiny_files["config"]),
                     "--out", str(tmp_path / "g"), "--budget-ms", "100"]) == 2  # fmt: skip
    assert "option budget_ms does not apply to method 'gradcam'" in capsys.readouterr().err


def test_cli_models_shows_forward_paths(
    tiny_server: str, tiny_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    assert cli.main(["models", "--server", tiny_server]) == 0
    out = capsys.readouterr().out
    assert "tiny  3x64x64  10" in out
    assert out.endswith("forward paths:\n  tiny: contiguous fp32 (not tuned)\n")

    config = ["models", "--config", str(tiny_files["config"])]
    assert cli.main(config) == 0
    assert capsys.readouterr().out.endswith("  tiny: contiguous fp32 (not tuned)\n")

    # --tune measures as the server's warm-up does, into the config's tuning_dir (the real
    # measurement takes a minute on 2 cores; it has tests of its own)
    from xai_serve.explainers.forward import ForwardPath
    from xai_serve.models.registry import LoadedModel

    class Report:
        speedup = 1.75
        fidelity = None

        def summary(self) -> str:
            return "channels_last fp32 batch 32: 1.75x the fp32 contiguous batch-64 forward"

    tuned_into: list[Path | None] = []

    def fake_tune(self: LoadedModel, cache_dir: Path | None = None) -> ForwardPath:
        tuned_into.append(cache_dir)
        self.path = ForwardPath(channels_last=True, batch_size=32, report=Report())
        return self.path

    monkeypatch.setattr(LoadedModel, "tune", fake_tune)
    assert cli.main([*config, "--tune"]) == 0
    assert capsys.readouterr().out.endswith(
        "  tiny: channels_last fp32 batch 32: 1.75x the fp32 contiguous batch-64 forward\n"
    )
    assert tuned_into == [tiny_files["root"] / "tuning"]
    assert cli.main(["models", "--server", tiny_server, "--tune"]) == 2
    assert "a server tunes at warm-up" in capsys.readouterr().err


# ---------------------------------------------------- several targets, top labels, a foil


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--targets", "3,x"], "argument --targets: must be comma-separated class indices, "
                               "e.g. 3,5,7; got '3,x'"),
        (["--targets", ""], "argument --targets: must be comma-separated class indices"),
        (["--targets", "3,-1"], "argument --targets: class indices must be >= 0"),
        (["--targets", "3,5,3"], "argument --targets: names class 3 twice"),
        (["--top-labels", "0"], "argument --top-labels: must be a positive integer, got 0"),
        (["--top-labels", "two"], "argument --top-labels: must be a positive integer, got 'two'"),
        (["--foil", "x"], "argument --foil: must be a class index (an integer >= 0), got 'x'"),
        (["--target", "-2"], "argument --target: must be a class index (an integer >= 0)"),
        (["--target", "1", "--targets", "2,3"],
         "argument --targets: not allowed with argument --target"),
        (["--targets", "2,3", "--top-labels", "2"],
         "argument --top-labels: not allowed with argument --targets"),
        (["--targets", "1,2", "--foil", "2"], "--foil 2 is also a target"),
        (["--targets", "1,10"], r"--targets: class 10 is not in 0..9"),
        (["--foil", "10"], r"--foil: class 10 is not in 0..9"),
        (["--top-labels", "11"], "--top-labels 11: the model has 10 classes"),
        (["--method", "eigencam", "--foil", "1"],
         "method 'eigencam' does not depend on the class explained"),
    ],
)  # fmt: skip
def test_cli_explain_bad_classes_exit_2(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: list[str], message: str,
) -> None:  # fmt: skip
    out = tmp_path / "out"
    code = cli.main(["explain", str(tiny_files["image"]), "--config", str(tiny_files["config"]),
                     "--out", str(out), *argv])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_cli_explain_several_targets_in_process(
    tiny_files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.serving.codec import decode_image

    base = ["explain", str(tiny_files["image"]), "--config", str(tiny_files["config"])]
    assert cli.main([*base, "--targets", "1,3,5", "--foil", "2", "--save-maps", "pt",
                     "--out", str(tmp_path / "many")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    # every class explained, each with its probability, then the foil
    assert re.search(r"gradcam targets 1 \(\d+\.\d%\), 3 \(\d+\.\d%\), 5 \(\d+\.\d%\) vs 2 -> ",
                     out), out  # fmt: skip
    saved = torch.load(tmp_path / "many" / "p_gradcam.pt", weights_only=True)
    assert saved["targets"] == [1, 3, 5] and saved["foil"] == 2
    assert saved["maps"].shape == (3, 64, 64) and torch.equal(saved["maps"][0], saved["map"])
    assert not torch.equal(saved["maps"][0], saved["maps"][1])  # a map per class
    many = decode_image((tmp_path / "many" / "p_gradcam.png").read_bytes(), max_pixels=10**7)

    assert cli.main([*base, "--target", "1", "--foil", "2", "--out", str(tmp_path / "one")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"gradcam target 1 \(\d+\.\d%\) vs 2 -> ", out), out
    one = decode_image((tmp_path / "one" / "p_gradcam.png").read_bytes(), max_pixels=10**7)
    assert many.shape[2] > 2.5 * one.shape[2]  # three panels side by side

    assert cli.main([*base, "--top-labels", "2", "--method", "lime", *SAMPLING, "--save-maps",
                     "npy", "--out", str(tmp_path / "top")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"lime targets \d \(\d+\.\d%\), \d \(\d+\.\d%\) \[256 samples", out), out
    assert np.load(tmp_path / "top" / "p_lime.npy").shape == (2, 64, 64)


def test_cli_explain_several_targets_through_a_server(
    tiny_server: str, tiny_files: dict[str, Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import xai_serve
    from tests.serving.harness import tiny_model
    from xai_serve.serving.codec import decode_image

    code = cli.main(["explain", str(tiny_files["image"]), "--server", tiny_server, "--model",
                     "tiny", "--targets", "1,3", "--foil", "2", "--save-maps", "pt", "--out",
                     str(tmp_path)])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert re.search(r"gradcam targets 1\b.*, 3\b.* vs 2 -> ", captured.out), captured.out
    model = tiny_model()  # the model the server holds
    x = model.preprocess(decode_image(tiny_files["image"].read_bytes(), max_pixels=10**7))[0]
    expected = xai_serve.explain(model.module, x[None], "gradcam",
                                 target=torch.tensor([[1, 3]]), foil=2)  # fmt: skip
    saved = torch.load(tmp_path / "p_gradcam.pt", weights_only=True)
    assert saved["targets"] == [1, 3] and saved["foil"] == 2
    torch.testing.assert_close(saved["maps"], expected.maps[0], atol=1e-5, rtol=0)
    assert (tmp_path / "p_gradcam.png").is_file()
    # the server's class count bounds the classes, before any image is sent
    assert cli.main(["explain", str(tiny_files["image"]), "--server", tiny_server, "--model",
                     "tiny", "--targets", "1,30", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--targets: class 30 is not in 0..9" in capsys.readouterr().err


def test_methods_lists_the_methods_and_the_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    from xai_serve.explainers.evaluation import metric_info

    assert cli.main(["methods"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert listed == xai_serve.list_methods()
    assert cli.main(["methods", "--metrics"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == [
        [name, "higher" if info.higher_is_better else "lower"]
        for name, info in metric_info().items()
    ]
