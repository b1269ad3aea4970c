"""``xai-serve tcav``, ``dissect`` and ``visualize`` on a tiny model (resnet18 with 10 classes,
seeded weights from a file, 64 x 64 inputs): in this process their tables, JSON and pictures
carry the numbers of the library called directly on the same model and images; through a fake
server (tests/serving/test_concepts_client.py) the numbers it sent; through the real server the
same numbers as in this process; bad input exits 2 and an unreachable server 1, each with one
line."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.serving.test_concepts_client import ACCURACIES, PIXELS, RANDOM, SCORES, FakeServer
from tests.test_viz import _find_all, tcav_bars
from xai_serve import cli
from xai_serve.concepts.dissection import unit_examples
from xai_serve.imaging import decode_image, encode_png
from xai_serve.viz_concepts import BAR_COLOR, PLOT_HEIGHT, RANDOM_COLOR, UNSURE_COLOR

MEAN = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)  # TransformConfig's defaults
STD = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
BATCH = 4  # the config's max_batch_size: the concept methods' batch


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x - MEAN) / STD


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from torchvision.models import resnet18

    from xai_serve.serving.config import load_config

    root = tmp_path_factory.mktemp("concepts")
    torch.manual_seed(0)
    torch.save(resnet18(num_classes=10).state_dict(), root / "tiny.pt")
    config = root / "tiny.toml"
    config.write_text(
        f'warmup = false\ntuning_dir = "{root / "tuning"}"\n'
        f'[[models]]\nname = "tiny"\nsource = "torchvision"\narch = "resnet18"\n'
        f'path = "{root / "tiny.pt"}"\nnum_classes = 10\nmax_batch_size = {BATCH}\n'
        "transform = { resize = 64, crop = [64, 64] }\n"
    )
    gen = torch.Generator().manual_seed(1)
    images = root / "zebras"
    images.mkdir()
    pixels = [(torch.rand(3, 64, 64, generator=gen) * 255).to(torch.uint8) for _ in range(4)]
    for i, p in enumerate(pixels):
        (images / f"{i}.png").write_bytes(encode_png(p))
    mine = root / "mine"
    mine.mkdir()
    for i in range(3):
        (mine / f"{i}.png").write_bytes(encode_png((torch.rand(3, 40, 48, generator=gen) * 255)
                                                   .to(torch.uint8)))  # fmt: skip
    from xai_serve.models import load_model

    model = load_model(load_config(config).models[0])
    return {"root": root, "config": config, "images": images, "pixels": pixels, "mine": mine,
            "model": model}  # fmt: skip


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _table(out: str) -> list[list[str]]:
    """The rows of the first table printed (cells split on two or more spaces)."""
    import re

    lines = out.strip().split("\n\n")[0].splitlines()
    return [re.split(r"\s{2,}", line.strip()) for line in lines[2:]]


def _png(path: Path) -> torch.Tensor:
    return decode_image(path.read_bytes(), max_pixels=1 << 26)


TCAV_ARGS = ["--target", "3", "--layer", "layer3", "--runs", "3", "--random-size", "8",
             "--concept-size", "8"]  # fmt: skip


def _tcav_argv(tiny: dict[str, Any], out: Path) -> list[str]:
    return [
        "tcav",
        "--concepts",
        f"red,stripes_0_wide,{tiny['mine']}",
        "--images",
        str(tiny["images"]),
        *TCAV_ARGS,
        "--out",
        str(out),
        "--json",
        str(out / "t.json"),
    ]


def _check_tcav_outputs(result: Any, out: Path, stdout: str) -> None:
    """The JSON, the table and the picture of a run carry ``result``'s numbers (a
    ``TCAVResult``)."""
    numbers = json.loads((out / "t.json").read_text())
    assert numbers["layer"] == "layer3" and numbers["target"] == 3
    assert [c["concept"] for c in numbers["concepts"]] == ["red", "stripes_0_wide", "mine"]
    for got, want in zip(numbers["concepts"], result.concepts, strict=True):
        assert got["scores"] == want.scores.tolist()
        assert got["cav_accuracies"] == want.accuracies.tolist()
        assert (got["mean"], got["std"], got["p_value"], got["significant"]) == (
            want.mean, want.std, want.p_value, want.significant,
        )  # fmt: skip
    assert numbers["random_scores"] == result.random_scores.tolist()
    rows = _table(stdout)
    for row, want in zip(rows, result.concepts, strict=False):
        accuracy = float(want.accuracies.double().mean())
        assert row[:3] == [want.concept, f"{want.mean:.3f} ± {want.std:.3f}",
                           f"{want.p_value:.3g}"]  # fmt: skip
        assert row[-1] == f"{accuracy:.3f}" and ("*" in row) == want.significant
    random = result.random_scores.double()
    assert rows[-1][:2] == ["(random)", f"{random.mean():.3f} ± {random.std():.3f}"]
    bars = tcav_bars(_png(out / "tcav.png"))
    assert [b[1] for b in bars] == [round(min(1.0, c.mean) * PLOT_HEIGHT)
                                    for c in result.concepts] + [
        round(float(random.mean()) * PLOT_HEIGHT)]  # fmt: skip
    assert [b[0] for b in bars] == [BAR_COLOR if c.significant else UNSURE_COLOR
                                    for c in result.concepts] + [RANDOM_COLOR]  # fmt: skip
    assert [b[4] for b in bars] == [c.significant for c in result.concepts] + [False]


def test_tcav_in_process_equals_the_library(
    tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.concepts.library import concept_from_images, procedural
    from xai_serve.concepts.tcav import tcav

    code, out, err = _run([*_tcav_argv(tiny, tmp_path), "--config", str(tiny["config"]),
                           "--progress"], capsys)  # fmt: skip
    assert code == 0, err
    assert "\r[" in err and "statistics" in err  # the bar moved through the stages
    inputs = torch.stack([p.float() / 255 for p in tiny["pixels"]])
    sets = [procedural("red", 8, size=64), procedural("stripes_0_wide", 8, size=64),
            concept_from_images("mine", tiny["mine"], size=64)]  # fmt: skip
    result = tcav(tiny["model"].module, inputs, sets, 3, "layer3", random_sets=8, runs=3,
                  transform=_normalise, batch_size=BATCH)  # fmt: skip
    _check_tcav_outputs(result, tmp_path, out)
    assert "TCAV of class 3 of tiny at layer layer3 in-process" in err


def test_dissect_in_process_equals_the_library(
    tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.concepts.dissection import dissect
    from xai_serve.concepts.library import probe_dataset

    code, out, err = _run(["dissect", "--config", str(tiny["config"]), "--layer", "layer2",
                           "--per-concept", "2", "--top", "5", "--out", str(tmp_path),
                           "--json", str(tmp_path / "d.json")], capsys)  # fmt: skip
    assert code == 0, err
    data = probe_dataset(per_concept=2, size=64, seed=0)
    local = dissect(tiny["model"].module, "layer2", data, transform=_normalise, batch_size=BATCH)
    numbers = json.loads((tmp_path / "d.json").read_text())
    thresholds = local.threshold.tolist()
    got = [(u["unit"], u["concept"], u["category"], u["iou"], u["threshold"])
           for u in numbers["units"]]  # fmt: skip
    want = [(r.unit, r.concept, r.category, r.iou, thresholds[r.unit]) for r in local.table(5)]
    assert got == want
    assert numbers["total_units"] == local.units == 128
    assert numbers["min_iou"] == float(torch.tensor(local.min_iou, dtype=torch.float32))
    assert {k: (v["units"], v["concepts"]) for k, v in numbers["summary"].items()} == {
        k: (v.units, v.concepts) for k, v in local.summary().items()
    }
    rows = _table(out)
    assert [r[:3] for r in rows] == [[str(r.unit), r.concept, r.category] for r in local.table(5)]
    assert [r[3].split()[0] for r in rows] == [f"{r.iou:.3f}" for r in local.table(5)]
    summary = out.strip().split("\n\n")[1].splitlines()[2:]
    assert [line.split()[:2] for line in summary] == [
        [k, str(v.units)] for k, v in local.summary().items()
    ]
    # the picture: each detected concept's best unit on the probe images where it matches
    # its concept best, its mask outlined, doubled in size (64 px probe images)
    from xai_serve.viz_concepts import mask_overlay

    best: dict[str, Any] = {}
    for r in local.table():
        if r.iou > local.min_iou:
            best.setdefault(r.concept, r)
    assert best  # this layer has detectors
    picture = _png(tmp_path / "dissect.png")
    for r in best.values():
        ((pics, masks),) = unit_examples(
            tiny["model"].module, "layer2", data, _normalise, [r.unit], local.threshold,
            [local.concepts.index(r.concept)],
        )  # fmt: skip
        for pic, mask in zip(pics, masks, strict=True):
            drawn = mask_overlay(pic, mask).repeat_interleave(2, 1).repeat_interleave(2, 2)
            assert len(_find_all(picture, drawn)) >= 1


def test_visualize_in_process_equals_the_library(
    tiny: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.concepts.visualize import visualize

    objectives = ["channel:layer2:3", "logit:4", "unit:layer3:1"]
    code, out, err = _run(["visualize", *objectives, "--config", str(tiny["config"]), "--steps",
                           "4", "--size", "32", "--out", str(tmp_path), "--json",
                           str(tmp_path / "v.json")], capsys)  # fmt: skip
    assert code == 0, err
    local = visualize(tiny["model"].module, objectives, steps=4, size=32, transform=_normalise)
    numbers = json.loads((tmp_path / "v.json").read_text())
    assert [o["objective"] for o in numbers["objectives"]] == objectives
    assert [o["value"] for o in numbers["objectives"]] == local.values.tolist()
    assert [o["trace"] for o in numbers["objectives"]] == local.trace.tolist()
    assert [r[2] for r in _table(out)] == [f"{v:.4g}" for v in local.values.tolist()]
    grid = _png(tmp_path / "visualize.png")
    pixels = local.images.mul(255).round().clamp(0, 255).to(torch.uint8)
    assert all(len(_find_all(grid, p)) == 1 for p in pixels)


def test_unit_examples_pick_the_images_where_the_unit_matches_its_concept() -> None:
    class Red(torch.nn.Module):  # "layer": unit 0 is the red channel, unit 1 the blue one
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layer(x[:, [0, 2]]).mean()

    images = torch.zeros(4, 3, 8, 8)
    masks = torch.zeros(4, 2, 8, 8, dtype=torch.bool)
    for i, cols in enumerate([(0, 2), (0, 8), (2, 6), (6, 8)]):  # red columns per image
        images[i, 0, :, cols[0] : cols[1]] = 1.0
    masks[:, 0, :, 2:6] = True  # the concept: columns 2..5 in every image
    data = type("Probe", (), {"images": images, "masks": masks})()
    ((pics, on),) = unit_examples(Red(), "layer", data, None, [0], torch.tensor([0.5, 0.5]), [0],
                                  per_unit=3)  # fmt: skip
    # per-image IoU with columns 2..5: image 2 (1.0), image 1 (4/8), image 0 (0/6 = 0), image 3 0
    expected = [2, 1, 0]
    assert torch.equal(pics, images[expected].mul(255).to(torch.uint8))
    assert torch.equal(on, images[expected, 0] > 0.5)


# --------------------------------------------------------------------------------------------
# Through a server
# --------------------------------------------------------------------------------------------


def test_through_a_fake_server_the_numbers_are_the_servers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.viz_concepts import CategoryCount, detector_chart

    image = tmp_path / "in.png"
    image.write_bytes(encode_png(PIXELS[0]))
    with FakeServer() as (address, servicer):
        remote = ["--server", address, "--model", "fake", "--out", str(tmp_path)]
        code, out, err = _run(["tcav", "--target", "2", "--concepts", "red,blue", "--images",
                               str(image), "--json", str(tmp_path / "t.json"), *remote],
                              capsys)  # fmt: skip
        assert code == 0, err
        sent = servicer.requests[-1]
        assert [c.name for c in sent.concepts] == ["red", "blue"] and sent.target == 2
        assert sent.inputs[0].image == encode_png(PIXELS[0]) and not sent.HasField("runs")
        numbers = json.loads((tmp_path / "t.json").read_text())
        assert numbers["concepts"][0]["scores"] == list(SCORES["red"])
        assert numbers["concepts"][1]["cav_accuracies"] == list(ACCURACIES["mine"])
        assert numbers["random_scores"] == list(RANDOM)
        bars = tcav_bars(_png(tmp_path / "tcav.png"))
        assert [b[1] for b in bars] == [150, 50, 100] and [b[4] for b in bars] == [
            True,
            False,
            False,
        ]
        assert _table(out)[0][:4] == ["red", "0.750 ± 0.250", "0.01", "*"]

        code, out, err = _run(["dissect", "--top", "2", *remote], capsys)
        assert code == 0, err
        assert servicer.requests[-1].top == 2 and servicer.requests[-1].dataset == ""
        assert _table(out) == [["5", "red", "color", "0.250 *"],
                               ["9", "stripes_0_wide", "texture", "0.125 *"]]  # fmt: skip
        expected = detector_chart(
            [CategoryCount("color", 3, {"red": 2, "blue": 1}),
             CategoryCount("texture", 1, {"stripes_0_wide": 1}), CategoryCount("shape", 0, {})],
            total_units=64, min_iou=0.0625, title="fake layer3: detectors per category",
            lines=["top units (the server sends the table; run in-process for their masks):",
                   "unit 5: red (color) IoU 0.250",
                   "unit 9: stripes_0_wide (texture) IoU 0.125"],
        )  # fmt: skip
        assert torch.equal(_png(tmp_path / "dissect.png"), expected)

        code, out, err = _run(["visualize", "logit:1", "channel:layer2:0", *remote], capsys)
        assert code == 0, err
        grid = _png(tmp_path / "visualize.png")
        assert len(_find_all(grid, PIXELS[0])) == 1 and len(_find_all(grid, PIXELS[1])) == 1
        assert _table(out) == [["logit:1", "0", "0.5"], ["channel:layer2:0", "1", "1.5"]]

        # the server's own refusals: a class it does not have (checked before the call), a
        # layer it does not know (its NOT_FOUND), and a stream without a result
        count = len(servicer.requests)
        code, _, err = _run(["tcav", "--target", "12", "--concepts", "red", "--images",
                             str(image), *remote], capsys)  # fmt: skip
        assert (code, len(servicer.requests)) == (2, count)
        assert err == "xai-serve: error: --target 12 is out of range: fake has 10 classes\n"
        code, _, err = _run(["dissect", "--layer", "missing", *remote], capsys)
        assert code == 2 and err.count("\n") == 1 and "no layer 'missing'" in err
        code, _, err = _run(["visualize", "logit:9", *remote], capsys)
        assert code == 1 and err.count("\n") == 1 and "without a result" in err


@pytest.fixture(scope="module")
def real_server(tiny: dict[str, Any]) -> Iterator[str]:
    from tests.serving.harness import ServerThread

    with ServerThread(models=[tiny["model"]]) as server:
        yield server.address


@pytest.mark.parametrize("command", ["tcav", "dissect", "visualize"])
def test_through_the_real_server_the_numbers_equal_in_process(
    command: str, tiny: dict[str, Any], real_server: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    argv: dict[str, Callable[[Path], list[str]]] = {
        "tcav": lambda out: _tcav_argv(tiny, out),
        "dissect": lambda out: ["dissect", "--layer", "layer2", "--per-concept", "2", "--top",
                                "5", "--out", str(out), "--json", str(out / "t.json")],
        "visualize": lambda out: ["visualize", "channel:layer2:3", "logit:4", "--steps", "3",
                                  "--size", "32", "--out", str(out), "--json",
                                  str(out / "t.json")],
    }  # fmt: skip
    local, remote = tmp_path / "local", tmp_path / "remote"
    code, local_out, err = _run([*argv[command](local), "--config", str(tiny["config"])], capsys)
    assert code == 0, err
    code, remote_out, err = _run([*argv[command](remote), "--server", real_server, "--model",
                                  "tiny"], capsys)  # fmt: skip
    assert code == 0, err
    a, b = (json.loads((d / "t.json").read_text()) for d in (local, remote))
    a.pop("request_id"), b.pop("request_id")
    # the same numbers; floats to a few ulps, as the server's worker threads may sum in
    # another order
    _assert_close(a, b)
    assert _table(local_out) == _table(remote_out)


def _assert_close(a: Any, b: Any) -> None:
    """``a == b``, floats within a relative 1e-5 (nested dicts and lists)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_close(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_close(x, y)
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7)
    else:
        assert a == b


# --------------------------------------------------------------------------------------------
# Errors: one line each
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tcav", "--concepts", "red", "--images", "x.png"],
         "xai-serve tcav: error: the following arguments are required: --target"),
        (["tcav", "--target", "1", "--concepts", "red,plaid", "--images", "{image}"],
         "xai-serve: error: --concepts: no procedural concept 'plaid'"),
        (["tcav", "--target", "1", "--concepts", "./nowhere", "--images", "{image}"],
         "xai-serve: error: --concepts: './nowhere' is not a folder"),
        (["tcav", "--target", "1", "--concepts", "red,red", "--images", "{image}"],
         "xai-serve: error: --concepts names 'red' twice"),
        (["tcav", "--target", "1", "--concepts", "red", "--images", "/no/such.png"],
         "xai-serve: error: --images /no/such.png: no such file or folder"),
        (["tcav", "--target", "x", "--concepts", "red", "--images", "{image}"],
         "xai-serve tcav: error: argument --target: must be a class index"),
        (["tcav", "--target", "1", "--concepts", "red", "--images", "{image}", "--runs", "1"],
         "xai-serve tcav: error: argument --runs: must be an integer >= 2, got 1"),
        (["visualize", "bogus"], "xai-serve: error: cannot parse the objective 'bogus'"),
        (["visualize", "logit:1", "--steps", "0"],
         "xai-serve visualize: error: argument --steps: must be an integer >= 1, got 0"),
        (["dissect", "--quantile", "2"],
         "xai-serve dissect: error: argument --quantile: must be a number in (0, 1), got 2"),
        (["dissect", "--dataset", "broden", "--config", "{config}"],
         "xai-serve: error: --dataset 'broden': in this process use 'procedural' or a "
         "Broden-style folder"),
        (["dissect", "--layer", "layer9", "--config", "{config}"],
         "xai-serve: error: the model has no layer 'layer9'"),
        (["visualize", "channel:layer9:0", "--steps", "1", "--config", "{config}"],
         "xai-serve: error: the model has no layer 'layer9'"),
        (["tcav", "--target", "10", "--concepts", "red", "--images", "{image}", "--config",
          "{config}", "--runs", "2", "--random-size", "2", "--concept-size", "2"],
         "xai-serve: error: "),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(tiny["images"] / "0.png")
    argv = [a.replace("{image}", image).replace("{config}", str(tiny["config"])) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2, err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert out == ""


@pytest.mark.parametrize(
    "argv",
    [["tcav", "--target", "1", "--concepts", "red", "--images", "{image}"],
     ["dissect"], ["visualize", "logit:1"]],
)  # fmt: skip
def test_unreachable_server_exits_1_with_one_line(
    argv: list[str], tiny: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{image}", str(tiny["images"] / "0.png")) for a in argv]
    code, out, err = _run([*argv, "--server", "127.0.0.1:1"], capsys)
    assert code == 1
    assert err.startswith("xai-serve: error: cannot use the server at 127.0.0.1:1: UNAVAILABLE")
    assert err.count("\n") == 1 and out == ""
