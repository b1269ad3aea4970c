"""``xai-serve bench --quality``: each method's speed row comes from the load generator and
its quality figures equal the library's :func:`evaluate` over the same images; a method that
cannot be scored reports its error in its row while the others go on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.serving.harness import ServerThread, tiny_model
from xai_serve import cli
from xai_serve.bench import (
    Endpoint,
    Inputs,
    Plan,
    Setting,
    Workload,
    quality_cells,
    run_quality,
)
from xai_serve.bench.load import workload_payloads
from xai_serve.errors import InvalidInput
from xai_serve.explainers.evaluation import evaluate
from xai_serve.models import LoadedModel


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model("bq", max_batch_size=4)


@pytest.fixture(scope="module")
def server(model: LoadedModel) -> Iterator[ServerThread]:
    with ServerThread(models=[model]) as s:
        yield s


def test_quality_rows_equal_the_library(server: ServerThread, model: LoadedModel) -> None:
    workload = Workload(model="bq", inputs=Inputs("synthetic", count=3, seed=4))
    report = run_quality(
        Endpoint(server.address), workload, ["saliency", "gradcam"], ["deletion", "insertion"],
        Setting("concurrency", 1), Plan(requests=3, warmup_s=0.0),
    )  # fmt: skip
    payloads, note = workload_payloads(workload, "bq", model.input_shape)
    assert note.startswith("3 synthetic")
    x = torch.stack(payloads)
    assert report.metrics == ("deletion", "insertion")
    for row in report.rows:
        assert row.error is None
        assert row.speed is not None and row.speed.ok == 3 and row.speed.throughput > 0
        want = evaluate(model.module, x, row.method, ["deletion", "insertion"], seed=0)
        for name in ("deletion", "insertion"):
            torch.testing.assert_close(
                torch.tensor(row.metrics[name].values), want.metrics[name], rtol=1e-4, atol=1e-5
            )
    header, cells = quality_cells(report)
    assert header == ("method", "req/s", "p50 ms", "deletion ↓", "insertion ↑")
    assert [c[0] for c in cells] == ["saliency", "gradcam"]
    mean = report.rows[0].metrics["deletion"].mean
    assert cells[0][3].startswith(f"{mean:.3g} ± ")


def test_a_method_that_cannot_be_scored_reports_its_error(server: ServerThread) -> None:
    workload = Workload(
        model="bq", method="lime", options=(("budget_ms", 200), ("samples", 16)),
        inputs=Inputs("synthetic", count=1),
    )  # fmt: skip
    report = run_quality(
        Endpoint(server.address), workload, ["lime"], ["max_sensitivity"],
        Setting("concurrency", 1), Plan(requests=1, warmup_s=0.0),
    )  # fmt: skip
    (row,) = report.rows
    assert row.metrics == {} and row.error is not None
    assert row.error.startswith("INVALID_ARGUMENT") and "budget_ms" in row.error


def test_bad_arguments(server: ServerThread) -> None:
    endpoint = Endpoint(server.address)
    workload = Workload(model="bq", inputs=Inputs("synthetic", count=1))
    one = Setting("concurrency", 1)
    with pytest.raises(InvalidInput, match="unknown metric 'nope'"):
        run_quality(endpoint, workload, ["saliency"], ["nope"], one, Plan(requests=1))
    with pytest.raises(InvalidInput, match="named twice"):
        run_quality(endpoint, workload, ["saliency", "saliency"], None, one, Plan(requests=1))
    with pytest.raises(InvalidInput, match="no model 'x'"):
        run_quality(endpoint, Workload(model="x"), ["saliency"], None, one, Plan(requests=1))


def test_cli_quality_table_and_json(
    server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.json"
    code = cli.main([
        "bench", "--server", server.address, "--model", "bq", "--synthetic", "2",
        "--requests", "2", "--warmup", "0", "--quality", "deletion,road",
        "--methods", "saliency,gradcam", "--json", str(out),
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "deletion ↓" in printed and "road ↓" in printed
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["saliency", "gradcam"]
    for row in data["rows"]:
        assert len(row["metrics"]["road"]["values"]) == 2
        assert row["speed"]["ok"] == 2
        assert f"{row['metrics']['deletion']['mean']:.3g}" in printed


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--methods", "saliency"], "--methods compares methods with --quality"),
        (["--quality", "deletion", "--plot", "x.png"], "--plot and --csv"),
        (["--quality", "deletion", "--protocol", "oip"], "not --protocol oip"),
    ],
)
def test_cli_bad_quality_arguments(
    server: ServerThread, extra: list[str], words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["bench", "--server", server.address, "--synthetic", "1", *extra])
    assert code == 2
    assert words in capsys.readouterr().err
