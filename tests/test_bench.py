"""``xai-serve bench`` measures what it says: against a server whose models have a fixed,
known cost per batch (:class:`Slow` sleeps ``T`` ms in every forward; ``time.sleep`` releases
the interpreter lock, so the cost holds on a loaded machine), the latency at concurrency 1 is
``T`` plus a little, the server's compute time is ``T``, batches merge at concurrency 4 and
throughput rises with them, an open loop above capacity queues, failures are counted by status
code, and the JSON, CSV and PNG carry the rows' numbers. The percentile is checked against its
definition and numpy."""

from __future__ import annotations

import csv
import io
import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tests.serving.certs import have_openssl, make_certs
from tests.serving.harness import ServerThread
from xai_serve import cli
from xai_serve.bench import (
    PLOT_SIZE,
    BenchReport,
    Endpoint,
    Inputs,
    LocalServer,
    Plan,
    Row,
    Sample,
    Setting,
    Workload,
    arrival_offsets,
    percentile,
    plot_png,
    run_bench,
    summarise,
)
from xai_serve.bench.command import concurrency_list, rate_list, warmup
from xai_serve.errors import InvalidInput, NotFound, Unavailable
from xai_serve.models import LoadedModel, ModelConfig, TransformConfig
from xai_serve.serving.config import AuthConfig, ServerConfig, TlsConfig
from xai_serve.serving.process import free_port

T_MS = 40.0  # each forward's cost
# What a loaded 2-core machine adds on top of T: the explanation's own work, the sleep's
# overshoot, gRPC and the interpreter lock the client shares with the in-process server (at a
# load average of 5 on 2 cores the server's compute read 67 ms and the latency 86 ms for T=40).
SLACK_MS = 60.0
SIDE = 8


class _Sleep(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


class Slow(nn.Module):
    """A conv classifier of 3x8x8 inputs whose every forward sleeps ``ms`` milliseconds,
    whatever the batch size: a known cost per batch. Grad-CAM on ``conv`` runs one forward
    per batch."""

    def __init__(self, ms: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.sleep = _Sleep(ms / 1e3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
                p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(self.sleep(x))).mean((2, 3)))


def slow_model(name: str, max_batch: int, max_delay_ms: float) -> LoadedModel:
    config = ModelConfig(
        name=name, source="torchvision", arch="resnet18", num_classes=4,
        transform=TransformConfig(resize=None, crop=(SIDE, SIDE)), max_batch_size=max_batch,
        max_delay_ms=max_delay_ms,
    )  # fmt: skip
    return LoadedModel(
        config=config, module=Slow(T_MS).eval(), device=torch.device("cpu"),
        input_shape=(3, SIDE, SIDE), num_classes=4, class_names=None, layers=("conv",),
        default_layer="conv", methods=("gradcam",), max_batch_size=max_batch,
    )  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """``single``: batches of one, no wait (capacity 1 / T); ``batched``: up to 4 per batch,
    each batch waiting up to 200 ms to fill (at concurrency 4 it fills at once)."""
    models = [slow_model("single", 1, 0.0), slow_model("batched", 4, 200.0)]
    with LocalServer(ServerConfig(warmup=False), models) as s:
        yield s


def _bench(
    server: LocalServer, model: str, settings: list[Setting], plan: Plan, **kw: object
) -> BenchReport:
    workload = Workload(model=model, inputs=Inputs("synthetic", count=4), **kw)  # type: ignore[arg-type]
    return run_bench(Endpoint(server.address), workload, settings, plan)


def _c(*values: int) -> list[Setting]:
    return [Setting("concurrency", v) for v in values]


# --------------------------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------------------------


def test_percentile_is_linear_interpolation_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4; h = 3 q / 100
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)  # h = 1.5
    assert percentile(values, 90) == pytest.approx(3.7)  # h = 2.7
    assert percentile(values, 99) == pytest.approx(3.97)  # h = 2.97
    assert percentile([7.0], 99) == 7.0
    rng = np.random.default_rng(0)
    for n in (2, 3, 10, 101, 1000):
        data = rng.exponential(50.0, n).tolist()
        for q in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(data, q) == pytest.approx(float(np.percentile(data, q)), rel=1e-12)
    with pytest.raises(InvalidInput, match="no values"):
        percentile([], 50)
    with pytest.raises(InvalidInput, match=r"\[0, 100\]"):
        percentile(values, 101)


def test_a_row_is_computed_from_its_samples_as_documented() -> None:
    """Three answers of 100, 200 and 300 ms (one of them cached) and a failure: throughput is
    OK answers over first start to last end; latency over OK answers only; overhead = mean
    latency - mean queue - mean compute."""
    samples = [
        Sample(0.0, 0.1, "OK", queue_ms=10.0, compute_ms=50.0, batch_size=1),
        Sample(0.1, 0.3, "OK", queue_ms=20.0, compute_ms=60.0, batch_size=2),
        Sample(0.2, 0.5, "OK", queue_ms=30.0, compute_ms=70.0, batch_size=3, cache_hit=True),
        Sample(0.3, 0.31, "NOT_FOUND"),
    ]
    row = summarise(Setting("concurrency", 2), samples)
    assert (row.requests, row.ok, row.errors, row.cache_hits) == (4, 3, {"NOT_FOUND": 1}, 1)
    assert row.duration_s == pytest.approx(0.5)
    assert row.throughput == pytest.approx(3 / 0.5)
    assert row.p50_ms == pytest.approx(200.0) and row.max_ms == pytest.approx(300.0)
    assert row.p90_ms == pytest.approx(280.0)  # h = 1.8 between 200 and 300
    assert (row.queue_ms, row.compute_ms, row.batch_size) == pytest.approx((20.0, 60.0, 2.0))
    assert row.overhead_ms == pytest.approx(200.0 - 20.0 - 60.0)
    assert row.concurrency == 2 and row.rate is None
    failed = summarise(Setting("rate", 5.0), [Sample(0.0, 0.01, "UNAVAILABLE")] * 3)
    assert failed.ok == 0 and failed.throughput == 0.0 and failed.p50_ms is None
    assert failed.errors == {"UNAVAILABLE": 3} and failed.rate == 5.0


def test_settings_and_plans_refuse_nonsense() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidInput):
            Setting("concurrency", bad)  # type: ignore[arg-type]
    for bad_rate in (0.0, -2.0, float("inf"), float("nan")):
        with pytest.raises(InvalidInput):
            Setting("rate", bad_rate)
    with pytest.raises(InvalidInput, match="not both"):
        Plan(requests=5, duration_s=1.0)
    assert Plan().duration_s == 5.0
    with pytest.raises(InvalidInput, match="protocol"):
        Workload(protocol="http")
    with pytest.raises(InvalidInput, match="oip only"):
        Workload(method="none")
    with pytest.raises(InvalidInput, match="samples"):
        Workload(options={"samples": "many"})
    assert Workload(options={"samples": 8}).options == (("samples", 8),)


# --------------------------------------------------------------------------------------------
# Against the known cost
# --------------------------------------------------------------------------------------------


def test_concurrency_one_measures_the_known_cost(server: LocalServer) -> None:
    """One request at a time on batches of one: the server computes for T, nothing queues,
    the latency is T plus the slack, and throughput is one over the mean latency."""
    report = _bench(server, "single", _c(1), Plan(requests=15, warmup_requests=2, warmup_s=0))
    (row,) = report.rows
    assert (row.requests, row.ok, row.errors) == (15, 15, {})
    assert T_MS <= row.compute_ms <= T_MS + SLACK_MS, row
    assert row.queue_ms < 20.0 and row.batch_size == 1.0
    assert T_MS <= row.p50_ms <= T_MS + SLACK_MS, row
    assert row.p50_ms <= row.p90_ms <= row.p99_ms <= row.max_ms
    assert row.throughput == pytest.approx(15 / row.duration_s)
    # closed loop, one in flight: requests follow each other back to back
    assert row.throughput * row.latency_mean_ms / 1e3 == pytest.approx(1.0, abs=0.15)
    assert row.overhead_ms == pytest.approx(
        row.latency_mean_ms - row.queue_ms - row.compute_ms, abs=1e-9
    )
    assert report.info["model"] == "single" and report.info["input_shape"] == [3, SIDE, SIDE]


def test_batches_merge_and_throughput_rises_with_concurrency(server: LocalServer) -> None:
    """Four in flight on a model that batches four: every batch is full (mean batch size 4,
    compute still T per batch), so four answers come per T: about four times the throughput
    of one at a time (at least 2.5 times on a loaded machine), and throughput = c / mean
    latency (Little's law) holds for the tool's own figures."""
    one = _bench(server, "single", _c(1), Plan(requests=12, warmup_requests=1, warmup_s=0))
    four = _bench(server, "batched", _c(4), Plan(requests=32, warmup_requests=4, warmup_s=0))
    (r1,), (r4,) = one.rows, four.rows
    assert r4.ok == 32 and r4.batch_size >= 3.5, r4
    assert T_MS <= r4.compute_ms <= T_MS + SLACK_MS, r4
    assert r4.throughput >= 2.5 * r1.throughput, (r1, r4)
    assert r4.throughput * r4.latency_mean_ms / 1e3 == pytest.approx(4.0, rel=0.2)


def test_open_loop_above_capacity_queues(server: LocalServer) -> None:
    """Batches of one at T = 40 ms serve at most 25 requests/s. At 8/s nothing waits; at 50/s
    (one every 20 ms) each request waits about 20 ms longer than the one before, so over 24
    requests the mean queue is some 230 ms and the last ones wait ~460 ms; throughput stays
    at capacity."""
    plan = Plan(requests=12, warmup_s=0)
    (low,) = _bench(server, "single", [Setting("rate", 8.0)], plan).rows
    (high,) = _bench(server, "single", [Setting("rate", 50.0)], Plan(requests=24, warmup_s=0)).rows
    assert low.ok == 12 and low.queue_ms < 20.0 and low.p50_ms <= T_MS + SLACK_MS, low
    assert high.ok == 24
    assert high.queue_ms >= 100.0, high
    assert high.max_ms >= 250.0 and high.max_ms >= 3 * high.compute_ms, high
    assert high.throughput <= 1.15 * 1e3 / T_MS, high
    assert low.throughput == pytest.approx(8.0, rel=0.15)


def test_arrival_schedules() -> None:
    """Fixed: exactly n / r. Poisson: reproducible from its seed, gaps with mean 1 / r and a
    standard deviation equal to the mean (exponential), within sampling error of 4000 gaps."""
    fixed = list(itertools.islice(arrival_offsets(8.0), 5))
    assert fixed == [0.0, 0.125, 0.25, 0.375, 0.5]
    assert list(itertools.islice(arrival_offsets(3.0), 31))[-1] == 10.0  # no drift
    times = list(itertools.islice(arrival_offsets(20.0, "poisson", seed=3), 4001))
    assert times == list(itertools.islice(arrival_offsets(20.0, "poisson", seed=3), 4001))
    assert times != list(itertools.islice(arrival_offsets(20.0, "poisson", seed=4), 4001))
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps > 0).all()
    assert gaps.mean() == pytest.approx(1 / 20, rel=0.05)
    assert gaps.std() == pytest.approx(1 / 20, rel=0.07)


def test_poisson_open_loop_runs_its_count(server: LocalServer) -> None:
    plan = Plan(requests=8, warmup_s=0, arrivals="poisson", seed=3)
    (row,) = _bench(server, "batched", [Setting("rate", 40.0)], plan).rows
    assert (row.requests, row.ok, row.rate) == (8, 8, 40.0)


@pytest.mark.parametrize("protocol", ["stream", "oip"])
def test_stream_and_oip_measure_the_same_cost(server: LocalServer, protocol: str) -> None:
    """ExplainStream answers carry the server's timing; OIP answers carry none (None)."""
    plan = Plan(requests=8, warmup_requests=1, warmup_s=0)
    (row,) = _bench(server, "single", _c(1), plan, protocol=protocol).rows
    assert row.ok == 8 and T_MS <= row.p50_ms <= T_MS + SLACK_MS, row
    if protocol == "stream":
        assert T_MS <= row.compute_ms <= T_MS + SLACK_MS and row.batch_size == 1.0
    else:
        assert row.compute_ms is None and row.queue_ms is None and row.overhead_ms is None
    # several requests in flight on one stream (open loop) are matched by request id
    (wide,) = _bench(server, "batched", [Setting("rate", 40.0)], plan, protocol=protocol).rows
    assert wide.ok == 8 and wide.errors == {}


def test_oip_plain_inference_costs_one_forward(server: LocalServer) -> None:
    """``--method none`` over OIP: the model's logits, one forward (T) per request."""
    plan = Plan(requests=6, warmup_requests=1, warmup_s=0)
    (row,) = _bench(server, "single", _c(1), plan, protocol="oip", method="none").rows
    assert row.ok == 6 and T_MS <= row.p50_ms <= T_MS + SLACK_MS, row


@pytest.mark.parametrize("protocol", ["explain", "stream", "oip"])
def test_failures_are_counted_by_status_code(server: LocalServer, protocol: str) -> None:
    """An unknown method fails every request with NOT_FOUND: the row says so, nothing raises."""
    plan = Plan(requests=6, warmup_s=0)
    (row,) = _bench(server, "single", _c(2), plan, protocol=protocol, method="nope").rows
    assert (row.requests, row.ok, row.errors) == (6, 0, {"NOT_FOUND": 6})
    assert row.throughput == 0.0 and row.p50_ms is None


def test_unknown_model_and_unreachable_server_are_clear_errors(server: LocalServer) -> None:
    with pytest.raises(NotFound, match="no model 'ghost'; it has: single, batched"):
        _bench(server, "ghost", _c(1), Plan(requests=1))
    endpoint = Endpoint(f"127.0.0.1:{free_port()}")
    with pytest.raises(Unavailable, match=r"cannot use the server at 127\.0\.0\.1:\d+: UNAVAIL"):
        run_bench(endpoint, Workload(), _c(1), Plan(requests=1))


@pytest.mark.skipif(not have_openssl(), reason="needs the openssl command")
def test_tls_and_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A TLS server with bearer tokens: measured with the CA and the token; a wrong token
    is refused before any setting runs, with the server's status in the message."""
    certs = make_certs(tmp_path)
    monkeypatch.setenv("BENCH_TEST_TOKENS", "s3cret")
    config = ServerConfig(
        host="127.0.0.1", port=0, warmup=False,
        tls=TlsConfig(cert=str(certs["server_cert"]), key=str(certs["server_key"])),
        auth=AuthConfig(tokens_env="BENCH_TEST_TOKENS"),
    )  # fmt: skip
    workload = Workload(model="single", inputs=Inputs("synthetic", count=2))
    with ServerThread(config, [slow_model("single", 1, 0.0)]) as s:
        address = f"localhost:{s.server.port}"
        good = Endpoint(address, ca=str(certs["ca"]), token="s3cret")
        report = run_bench(good, workload, _c(1), Plan(requests=2, warmup_s=0))
        assert report.rows[0].ok == 2
        with pytest.raises(Unavailable, match="UNAUTHENTICATED"):
            run_bench(Endpoint(address, ca=str(certs["ca"]), token="nope"), workload, _c(1))


def test_image_files_for_explain_and_for_oip(server: LocalServer, tmp_path: Path) -> None:
    """Files go as they are to Explain (the server decodes them) and are decoded and
    preprocessed here for OIP, which takes tensors."""
    from xai_serve.imaging import encode_png

    for i in range(2):
        rgb = torch.randint(0, 256, (3, 12 + i, 16), dtype=torch.uint8)
        (tmp_path / f"{i}.png").write_bytes(encode_png(rgb))
    plan = Plan(requests=4, warmup_s=0)
    for protocol in ("explain", "oip"):
        workload = Workload(model="batched", protocol=protocol,
                            inputs=Inputs("files", paths=(str(tmp_path),)))  # fmt: skip
        report = run_bench(Endpoint(server.address), workload, _c(2), plan)
        assert report.rows[0].ok == 4, report.rows
        assert report.info["inputs"].startswith("2 image files")


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _report() -> BenchReport:
    rows = []
    for c, scale in ((1, 1.0), (4, 1.5), (16, 4.0)):
        samples = [
            Sample(i * 0.01, i * 0.01 + 0.04 * scale + i * 1e-3, "OK", queue_ms=2.0 * c,
                   compute_ms=40.0, batch_size=min(c, 4))
            for i in range(20)
        ]  # fmt: skip
        samples.append(Sample(0.0, 0.001, "RESOURCE_EXHAUSTED"))
        rows.append(summarise(Setting("concurrency", c), samples))
    return BenchReport(tuple(rows), {"model": "m", "method": "gradcam", "protocol": "explain"})


def test_json_and_csv_hold_the_rows_numbers(tmp_path: Path) -> None:
    report = _report()
    data = json.loads(report.to_json(tmp_path / "b.json"))
    assert data == json.loads((tmp_path / "b.json").read_text())
    assert data["info"]["model"] == "m"
    assert data["rows"] == [r.record() for r in report.rows]
    assert data["rows"][1]["concurrency"] == 4 and data["rows"][1]["rate"] is None
    assert data["rows"][1]["errors"] == {"RESOURCE_EXHAUSTED": 1}
    lines = list(csv.DictReader(io.StringIO(report.to_csv(tmp_path / "b.csv"))))
    assert (tmp_path / "b.csv").read_text() == report.to_csv()
    assert len(lines) == 3
    for line, row in zip(lines, report.rows, strict=True):
        assert int(line["concurrency"]) == row.concurrency and line["rate"] == ""
        for key in ("throughput", "p50_ms", "p90_ms", "p99_ms", "max_ms", "queue_ms",
                    "compute_ms", "batch_size", "overhead_ms", "duration_s"):  # fmt: skip
            assert float(line[key]) == getattr(row, key), key  # repr round-trips exactly
        assert line["errors"] == "RESOURCE_EXHAUSTED:1"
    assert list(lines[0]) == list(report.rows[0].record())
    assert set(lines[0]) == {"mode", "concurrency", "rate"} | (
        Row.__dataclass_fields__.keys() - {"setting"}
    )


def test_plot_is_a_png_of_the_fixed_size_with_every_series(tmp_path: Path) -> None:
    data = plot_png(_report(), tmp_path / "b.png")
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == PLOT_SIZE
    assert (tmp_path / "b.png").read_bytes() == data
    colours = {c for _, c in image.convert("RGB").getcolors(PLOT_SIZE[0] * PLOT_SIZE[1])}
    for colour in ((31, 119, 180), (255, 127, 14), (214, 39, 40), (44, 160, 44)):
        assert colour in colours
    with pytest.raises(InvalidInput, match="no rows"):
        plot_png(BenchReport(()))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def test_sweep_lists_and_warmup_parse() -> None:
    assert concurrency_list("1, 4,16") == [1, 4, 16]
    assert rate_list("2.5,10") == [2.5, 10.0]
    assert warmup("20") == (20, 0.0) and warmup("1.5s") == (0, 1.5)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--concurrency", "1,x", "comma-separated integers"),
        ("--concurrency", "0", "must be >= 1"),
        ("--concurrency", "", "comma-separated"),
        ("--concurrency", "1,,2", "comma-separated"),
        ("--concurrency", "2,2", "twice"),
        ("--rate", "0", "finite numbers > 0"),
        ("--rate", "fast", "rates per second"),
        ("--warmup", "x", "number of requests"),
        ("--requests", "0", "number > 0"),
    ],
)
def test_bad_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    assert cli.main(["bench", "--server", "127.0.0.1:1", flag, value]) == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and message in err


def test_unreachable_server_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    code = cli.main(["bench", "--server", f"127.0.0.1:{port}", "--synthetic", "--requests", "1"])
    assert code == 1
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"xai-serve: error: cannot use the server at 127.0.0.1:{port}: UNAVAILABLE"
    )
    assert captured.out == ""


def test_cli_end_to_end(
    server: LocalServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    args = [
        "bench", "--server", server.address, "--model", "batched", "--synthetic", "3",
        "--concurrency", "1,2", "--requests", "6", "--warmup", "1", "--no-progress",
        "--json", str(out / "b.json"), "--csv", str(out / "b.csv"), "--plot", str(out / "b.png"),
    ]  # fmt: skip
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split()[:4] == ["setting", "requests", "errors", "req/s"]
    assert [line.split()[0] for line in table[2:]] == ["c=1", "c=2"]
    assert "batched gradcam via explain" in captured.err
    data = json.loads((out / "b.json").read_text())
    assert [r["requests"] for r in data["rows"]] == [6, 6]
    assert [r["ok"] for r in data["rows"]] == [6, 6]
    assert data["info"]["inputs"] == "3 synthetic tensors 3x8x8"
    for line, row in zip(table[2:], data["rows"], strict=True):  # the table shows the file's
        assert line.split()[3] == f"{row['throughput']:.1f}"
        assert line.split()[4] == f"{row['p50_ms']:.1f}"
    assert Image.open(out / "b.png").size == PLOT_SIZE
    assert (out / "b.csv").read_text().count("\n") == 3


def test_cli_every_request_failing_exits_1_after_the_table(
    server: LocalServer, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench", "--server", server.address, "--model", "single", "--method", "nope",
            "--synthetic", "--concurrency", "2", "--requests", "4", "--warmup", "0"]  # fmt: skip
    assert cli.main(args) == 1
    captured = capsys.readouterr()
    assert "NOT_FOUND 4" in captured.out
    assert "no request succeeded" in captured.err


def test_cli_progress_line_advances_once_per_setting(server: LocalServer) -> None:
    stream = io.StringIO()
    calls: list[str] = []

    class Bar(cli.Progress):
        def advance(self, note: str = "", source: str | None = None) -> None:
            calls.append(note)
            super().advance(note, source)

    def bar(total: int, enabled: bool | None = None) -> cli.Progress:
        return Bar(total, enabled=True, stream=stream)

    from xai_serve.bench.command import run_command

    argv = ["bench", "--server", server.address, "--model", "batched", "--synthetic",
            "--concurrency", "1,3", "--duration", "0.3", "--warmup", "0.1s"]  # fmt: skip
    args = cli.build_parser().parse_args(argv)
    assert run_command(args, table=cli._table, progress_bar=bar, error=cli._error) == 0
    assert [note.split(":")[0] for note in calls] == ["c=1", "c=3"]
    assert "warm-up" in stream.getvalue()


def test_cli_config_starts_a_server_in_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--config: the config's model (a small torchvision network) served in this process."""
    config = tmp_path / "server.toml"
    config.write_text(
        'warmup = false\n\n[[models]]\nname = "tiny"\nsource = "torchvision"\n'
        'arch = "resnet18"\nnum_classes = 10\nmax_batch_size = 4\nmax_delay_ms = 5\n'
        "[models.transform]\nresize = 64\ncrop = [64, 64]\n"
    )
    out = tmp_path / "b.json"
    args = ["bench", "--config", str(config), "--synthetic", "2", "--concurrency", "2",
            "--requests", "4", "--warmup", "1", "--json", str(out)]  # fmt: skip
    assert cli.main(args) == 0, capsys.readouterr().err
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert data["info"]["model"] == "tiny" and row["ok"] == 4
    assert 1.0 <= row["batch_size"] <= 2.0 and row["compute_ms"] > 0
    assert row["max_ms"] >= row["p50_ms"] > 0
