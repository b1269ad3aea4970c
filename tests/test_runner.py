"""xai_serve.runner and ``xai-serve explain`` / ``models`` / ``methods``: files in, pictures and
maps out, in-process and through a real server, with every failure listed and the rest done."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import xai_serve
from tests._peers import require
from xai_serve import cli, runner
from xai_serve.errors import InvalidInput
from xai_serve.models import LoadedModel, bundled_model_config, load_model
from xai_serve.serving.codec import decode_image, encode_png

skimage_data = require("skimage.data")
require("efficientnet_lite_pytorch")


@pytest.fixture(scope="module")
def lite0() -> LoadedModel:
    """The bundled EfficientNet-Lite0 with its ImageNet weights."""
    return load_model(bundled_model_config())


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real photos as PNG/JPEG files, one corrupt "image" and a text file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    (root / "sub").mkdir()
    chelsea = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).contiguous()
    (root / "chelsea.png").write_bytes(encode_png(chelsea))
    Image.fromarray(skimage_data.coffee()).save(root / "coffee.jpg", quality=92)
    rocket = torch.from_numpy(skimage_data.rocket()).permute(2, 0, 1).contiguous()
    (root / "sub" / "rocket.png").write_bytes(encode_png(rocket))
    (root / "broken.png").write_bytes(encode_png(chelsea)[:300])
    (root / "notes.txt").write_text("not an image")
    return {
        "root": root,
        "chelsea": root / "chelsea.png",
        "coffee": root / "coffee.jpg",
        "rocket": root / "sub" / "rocket.png",
        "broken": root / "broken.png",
    }


def _in_process(model: LoadedModel, files: list[Path], method: str, **kw: object) -> object:
    xs = [model.preprocess(decode_image(f.read_bytes(), max_pixels=10**8))[0] for f in files]
    return xai_serve.explain(model.module, torch.stack(xs), method, **kw)


# ---------------------------------------------------------------------------------- inputs


def test_collect_images_files_folders_globs(photos: dict[str, Path]) -> None:
    root = photos["root"]
    files, failures = runner.collect_images(
        [str(photos["coffee"]), str(root), str(root / "*.jpg"), str(root / "missing.png"),
         str(root / "*.gif")]
    )  # fmt: skip
    # The file first, then the folder's images sorted and recursive, without repeats; the
    # text file is not an image suffix, so the folder does not take it.
    assert files == [photos["coffee"], photos["broken"], photos["chelsea"], photos["rocket"]]
    assert [(f.source, f.reason) for f in failures] == [
        (str(root / "missing.png"), "no such file or folder"),
        (str(root / "*.gif"), "no file matches this pattern"),
    ]
    empty = root / "sub"
    _, fails = runner.collect_images([str(empty / "*.webp")])
    assert len(fails) == 1


def test_output_names_are_distinct() -> None:
    names = runner.output_names([Path("a/x.png"), Path("b/x.jpg"), Path("y.png"), Path("c/x.png")])
    assert names == ["x", "x-2", "y", "x-3"]


def test_parse_option_types_and_errors() -> None:
    assert runner.parse_option("samples=128") == ("samples", 128)
    assert runner.parse_option("kernel_width = 0.5") == ("kernel_width", 0.5)
    assert runner.parse_option("paired=false") == ("paired", False)
    assert runner.parse_option("baseline=blur") == ("baseline", "blur")
    assert runner.parse_option("baseline=0.25") == ("baseline", 0.25)
    assert runner.parse_option("segmenter=grid") == ("segmenter", "grid")
    with pytest.raises(InvalidInput, match="KEY=VALUE"):
        runner.parse_option("samples")
    with pytest.raises(InvalidInput, match="takes an int"):
        runner.parse_option("samples=many")
    with pytest.raises(InvalidInput, match="did you mean 'samples'"):
        runner.parse_option("sample=3")
    with pytest.raises(InvalidInput, match="true or false"):
        runner.parse_option("paired=maybe")
    assert runner.parse_option("tolerance=0.005") == ("tolerance", 0.005)
    assert runner.parse_option("budget_ms=750") == ("budget_ms", 750)
    with pytest.raises(InvalidInput, match="budget_ms takes an int"):
        runner.parse_option("budget_ms=0.5")


def test_planned_samples() -> None:
    # what a progress bar counts to: the option, else the method's own default
    assert (
        runner.planned_samples("lime", {})
        == xai_serve.explainers.get_method("lime").options["samples"]
    )
    assert runner.planned_samples("kernelshap", {"samples": 96}) == 96
    assert runner.planned_samples("gradcam", {}) is None
    assert runner.planned_samples("only_the_server_knows", {}) is None


def test_sampling_note() -> None:
    r = runner.FileResult("a.png", "a", "lime", "m", None, 1, [])
    assert runner.sampling_note(r) == ""  # no samples: nothing to say
    r.samples = 192
    assert runner.sampling_note(r) == "192 samples"
    r.stderr = torch.tensor([0.001, 0.004, 0.002, float("inf")])
    assert runner.sampling_note(r) == "192 samples, weight stderr median 0.002, max inf"


def test_explain_options_split() -> None:
    opts, baseline, seed = runner.explain_options({"n_segments": 40, "seed": 3, "baseline": 0.0,
                                                   "samples": 64})  # fmt: skip
    assert opts == {"n_segments": 40, "samples": 64} and baseline == 0.0 and seed == 3


# ---------------------------------------------------------------------------------- runners


def test_local_runner_equals_explain_and_isolates_bad_files(
    lite0: LoadedModel, photos: dict[str, Path]
) -> None:
    files = [photos["chelsea"], photos["broken"], photos["coffee"], photos["rocket"]]
    out = list(runner.LocalRunner(lite0, "gradcam", batch_size=2).run(files))
    failures = [o for o in out if isinstance(o, runner.Failure)]
    results = [o for o in out if isinstance(o, runner.FileResult)]
    assert [f.source for f in failures] == [str(photos["broken"])]
    assert "truncated PNG" in failures[0].reason
    good = [photos["chelsea"], photos["coffee"], photos["rocket"]]
    assert [r.source for r in results] == [str(p) for p in good]
    expected = _in_process(lite0, good, "gradcam")
    for i, r in enumerate(results):
        torch.testing.assert_close(r.map, expected.maps[i], atol=1e-5, rtol=0)
        assert r.target == int(expected.targets[i])
        assert r.top_k[0].index == r.target  # top-1 explained by default
        probs = torch.softmax(expected.logits[i].double(), 0)
        assert r.top_k[0].probability == pytest.approx(float(probs.max()), rel=1e-6)
        assert r.view is not None and r.view.shape == (3, 224, 224)
    assert results[0].target_label == "tiger cat" and results[1].target_label == "espresso"


def test_local_runner_lime_options_and_seed(lite0: LoadedModel, photos: dict[str, Path]) -> None:
    opts = {"samples": 24, "n_segments": 12, "segmenter": "grid", "seed": 5}
    (r,) = runner.LocalRunner(lite0, "lime", target=281, options=opts).run([photos["chelsea"]])
    assert isinstance(r, runner.FileResult)
    expected = _in_process(lite0, [photos["chelsea"]], "lime", target=281, seed=5, samples=24,
                           n_segments=12, segmenter="grid")  # fmt: skip
    torch.testing.assert_close(r.map, expected.maps[0], atol=1e-6, rtol=0)
    assert r.target == 281 and r.seed == 5
    assert r.weights is not None and r.segments is not None
    assert r.weights.numel() == int(r.segments.max()) + 1


def test_write_result_picture_and_maps(
    lite0: LoadedModel, photos: dict[str, Path], tmp_path: Path
) -> None:
    (r,) = runner.LocalRunner(lite0, "gradcam").run([photos["chelsea"]], ["cat"])
    assert isinstance(r, runner.FileResult)
    written = runner.write_result(r, tmp_path, save_map="npy")
    assert [p.name for p in written] == ["cat_gradcam.png", "cat_gradcam.npy"]
    np.testing.assert_array_equal(np.load(written[1]), r.map.numpy())
    picture = decode_image(written[0].read_bytes(), max_pixels=10**7)
    assert picture.shape[1] > 224 and picture.shape[2] > 224  # the panel: map + labels + bar
    (pt,) = runner.write_result(r, tmp_path, save_map="pt", picture=False)
    saved = torch.load(pt, weights_only=True)
    assert torch.equal(saved["map"], r.map) and saved["target"] == r.target
    assert saved["top_k"][0][1] == "tiger cat" and saved["method"] == "gradcam"


# ---------------------------------------------------------------------------------- the CLI


def test_cli_explain_in_process_lists_failures_and_writes_the_rest(
    lite0: LoadedModel,
    photos: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "out"
    code = cli.main(["explain", str(photos["root"]), str(photos["root"] / "nope.png"),
                     "--out", str(out), "--save-maps", "npy", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert "2 of 5 inputs failed" in captured.err
    assert f"{photos['broken']}: file: cannot decode" in captured.err
    assert f"{photos['root'] / 'nope.png'}: no such file or folder" in captured.err
    assert "Traceback" not in captured.err
    assert sorted(p.name for p in out.iterdir()) == [
        "chelsea_gradcam.npy", "chelsea_gradcam.png", "coffee_gradcam.npy", "coffee_gradcam.png",
        "rocket_gradcam.npy", "rocket_gradcam.png",
    ]  # fmt: skip
    expected = _in_process(lite0, [photos["chelsea"]], "gradcam")
    np.testing.assert_allclose(np.load(out / "chelsea_gradcam.npy"), expected.maps[0], atol=1e-5)
    assert "target 282 tiger cat" in captured.out


def test_cli_explain_all_good_exits_0_with_progress(
    photos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["explain", str(photos["chelsea"]), str(photos["coffee"]), "--method",
                     "integrated_gradients", "-o", "steps=4", "--target", "281", "--out",
                     str(tmp_path), "--progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "2/2" in captured.err and "[####" in captured.err  # the bar reached the end
    assert "explained 2 of 2 images with integrated_gradients" in captured.err
    assert (tmp_path / "coffee_integrated_gradients.png").is_file()
    assert captured.out.count("target 281 tabby") == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "nosuch"], "unknown explanation method 'nosuch'"),
        (["-o", "samples=x"], "samples takes an int"),
        (["--model", "resnet"], "no bundled model 'resnet'"),
        (["--no-overlays"], "--no-overlays writes nothing without --save-maps"),
    ],
)
def test_cli_explain_usage_errors_exit_2(
    photos: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    code = cli.main(["explain", str(photos["chelsea"]), "--out", str(tmp_path), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_explain_through_the_server_equals_in_process(
    lite0: LoadedModel,
    photos: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.serving.harness import ServerThread

    with ServerThread(models=[lite0]) as server:
        code = cli.main(["explain", str(photos["chelsea"]), str(photos["broken"]),
                         str(photos["coffee"]), "--server", server.address, "--out",
                         str(tmp_path), "--save-maps", "pt", "--method", "kernelshap", "-o",
                         "samples=32", "-o", "n_segments=9", "-o", "segmenter=grid", "-o",
                         "seed=1"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 1
    assert f"{photos['broken']}: file: cannot decode" in captured.err
    expected = _in_process(lite0, [photos["chelsea"], photos["coffee"]], "kernelshap",
                           samples=32, n_segments=9, segmenter="grid", seed=1)  # fmt: skip
    for i, name in enumerate(("chelsea", "coffee")):
        saved = torch.load(tmp_path / f"{name}_kernelshap.pt", weights_only=True)
        torch.testing.assert_close(saved["map"], expected.maps[i], atol=1e-5, rtol=0)
        assert saved["target"] == int(expected.targets[i])
        assert (tmp_path / f"{name}_kernelshap.png").is_file()
    assert "via 127.0.0.1:" in captured.err


def test_cli_explain_unreachable_server_fails_fast(
    photos: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.serving.process import free_port

    port = free_port()
    code = cli.main(["explain", str(photos["chelsea"]), "--server", f"127.0.0.1:{port}",
                     "--out", str(tmp_path)])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert f"cannot use the server at 127.0.0.1:{port}: UNAVAILABLE" in err


def test_cli_models_and_methods(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in xai_serve.list_methods():
        assert f"\n{name} " in out
    # the shipped defaults, as the explainers declare them
    from xai_serve.explainers.base import get_method

    lime_samples = get_method("lime").options["samples"]
    ig_steps = get_method("integrated_gradients").options["steps"]
    assert f"samples={lime_samples}" in out and f"steps={ig_steps}" in out
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0  3x224x224  1000" in out


def test_cli_models_of_a_server(lite0: LoadedModel, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.serving.harness import ServerThread

    with ServerThread(models=[lite0]) as server:
        assert cli.main(["models", "--server", server.address]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0  3x224x224  1000" in out and "gradcam" in out


# ------------------------------------------------------------- sampling rounds (tiny model)


@pytest.fixture(scope="module")
def tiny_photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two small random PNGs for the tiny 64 x 64 model."""
    root = tmp_path_factory.mktemp("tiny")
    gen = torch.Generator().manual_seed(1)
    files = []
    for name in ("p", "q"):
        pixels = (torch.rand(3, 72, 80, generator=gen) * 255).to(torch.uint8)
        (root / f"{name}.png").write_bytes(encode_png(pixels))
        files.append(root / f"{name}.png")
    return files


LIME_OPTS = {"samples": 256, "n_segments": 16, "segmenter": "grid", "seed": 2}


def _check_partials(partials: list[runner.Partial], files: list[Path]) -> None:
    """Every file reported rounds of growing sample counts toward the plan of 256."""
    for f in files:
        counts = [p.samples for p in partials if p.source == str(f)]
        assert len(counts) >= 2 and counts == sorted(counts), counts
        assert 0 < counts[0] < 256 and counts[-1] == 256
        fractions = [p.fraction for p in partials if p.source == str(f)]
        assert fractions[0] == counts[0] / 256 and fractions[-1] == 1.0
    assert {p.planned for p in partials} == {256}


def test_local_runner_reports_sampling_rounds(tiny_photos: list[Path]) -> None:
    from tests.serving.harness import tiny_model

    model = tiny_model()
    partials: list[runner.Partial] = []
    job = runner.LocalRunner(model, "lime", options=LIME_OPTS, batch_size=2)
    results = list(job.run(tiny_photos, on_partial=partials.append))
    _check_partials(partials, tiny_photos)
    expected = _in_process(model, tiny_photos, "lime", seed=2, samples=256, n_segments=16,
                           segmenter="grid")  # fmt: skip
    for i, r in enumerate(results):
        assert isinstance(r, runner.FileResult)
        assert r.samples == 256
        assert r.stderr is not None and r.weights is not None
        assert r.stderr.shape == r.weights.shape == (16,)
        torch.testing.assert_close(r.stderr, expected.stderr[i, :16].float())
        torch.testing.assert_close(r.map, expected.maps[i], atol=1e-6, rtol=0)
    # without a callback no partial answers are made, and the results are the same
    again = list(job.run(tiny_photos))
    torch.testing.assert_close(again[0].map, results[0].map, atol=1e-6, rtol=0)


def test_local_runner_tolerance_stops_early(tiny_photos: list[Path]) -> None:
    from tests.serving.harness import tiny_model

    opts = {**LIME_OPTS, "tolerance": 10.0}  # every stderr is below this after one round
    (r,) = runner.LocalRunner(tiny_model(), "lime", options=opts).run(tiny_photos[:1])
    assert isinstance(r, runner.FileResult)
    assert r.samples is not None and 0 < r.samples < 256


def test_local_runner_refuses_options_the_method_does_not_take() -> None:
    from tests.serving.harness import tiny_model

    with pytest.raises(InvalidInput, match="option budget_ms does not apply to method 'gradcam'"):
        runner.LocalRunner(tiny_model(), "gradcam", options={"budget_ms": 100})
    with pytest.raises(InvalidInput, match="options n_segments, samples do not apply"):
        runner.LocalRunner(tiny_model(), "saliency", options={"n_segments": 4, "samples": 3})


def test_remote_runner_reports_sampling_rounds(tiny_photos: list[Path]) -> None:
    from tests.serving.harness import ServerThread, tiny_model
    from xai_serve.client import Client

    with ServerThread(models=[tiny_model()]) as server, Client(server.address) as client:
        job = runner.RemoteRunner(client, "tiny", "kernelshap", options=LIME_OPTS)
        partials: list[runner.Partial] = []
        results = list(job.run(tiny_photos, on_partial=partials.append))
        _check_partials(partials, tiny_photos)
        for r in results:
            assert isinstance(r, runner.FileResult)
            assert r.samples == 256 and r.overlay_png is not None
            assert r.stderr is not None and r.stderr.shape == (16,)
        assert not any(isinstance(r, runner.Failure) for r in job.run(tiny_photos))


# ------------------------------------------- several targets, top_labels and a foil (tiny)


def _views(model: LoadedModel, files: list[Path]) -> list[torch.Tensor]:
    return [model.preprocess(decode_image(f.read_bytes(), max_pixels=10**8))[1] for f in files]


def test_local_runner_several_targets_and_a_foil_equal_explain(tiny_photos: list[Path]) -> None:
    from tests.serving.harness import tiny_model

    model = tiny_model()
    job = runner.LocalRunner(model, "gradcam", targets=[1, 3, 5], foil=2, batch_size=2)
    results = list(job.run(tiny_photos))
    expected = _in_process(model, tiny_photos, "gradcam",
                           target=torch.tensor([[1, 3, 5]] * 2), foil=2)  # fmt: skip
    for i, r in enumerate(results):
        assert isinstance(r, runner.FileResult)
        assert [e.target for e in r.per_target] == [1, 3, 5] and r.foil == 2
        probs = torch.softmax(expected.logits[i].double(), 0)
        for j, e in enumerate(r.per_target):
            torch.testing.assert_close(e.map, expected.maps[i, j], atol=1e-6, rtol=0)
            assert r.probability(e.target) == pytest.approx(float(probs[e.target]), rel=1e-9)
        # the singular fields are the first class's
        assert r.target == 1 and r.map is not None and torch.equal(r.map, r.per_target[0].map)
        note = runner.targets_note(r)
        assert note.startswith("targets 1 (") and note.endswith(") vs 2") and note.count("%") == 3


def test_local_runner_top_labels_lime_weights_per_class(tiny_photos: list[Path]) -> None:
    from tests.serving.harness import tiny_model

    model = tiny_model()
    opts = {"samples": 32, "n_segments": 9, "segmenter": "grid", "seed": 4}
    results = list(runner.LocalRunner(model, "lime", top_labels=2, options=opts).run(tiny_photos))
    expected = _in_process(model, tiny_photos, "lime", top_labels=2, seed=4, samples=32,
                           n_segments=9, segmenter="grid")  # fmt: skip
    for i, r in enumerate(results):
        assert isinstance(r, runner.FileResult) and r.foil is None
        assert [e.target for e in r.per_target] == expected.targets[i].tolist()
        assert [e.target for e in r.per_target] == [s.index for s in r.top_k[:2]]  # top two
        for j, e in enumerate(r.per_target):
            assert e.weights is not None and e.stderr is not None
            torch.testing.assert_close(e.weights, expected.weights[i, j, :9].float())
            torch.testing.assert_close(e.stderr, expected.stderr[i, j, :9].float())
            torch.testing.assert_close(e.map, expected.maps[i, j], atol=1e-6, rtol=0)
        assert r.weights is not None and torch.equal(r.weights, r.per_target[0].weights)


def test_render_and_write_several_targets(tiny_photos: list[Path], tmp_path: Path) -> None:
    from tests.serving.harness import tiny_model
    from xai_serve import viz

    model = tiny_model()
    (r,) = runner.LocalRunner(model, "gradcam", targets=[4, 0], foil=7).run(tiny_photos[:1])
    assert isinstance(r, runner.FileResult) and r.view is not None
    foil = r.foil_text
    assert foil == "7"  # the tiny model has no class names
    # one panel per class, titled "<class> (p%) vs <foil>", in a grid under the method
    panels = [
        viz.method_panel(r.view, "gradcam", e.map, title=f"{r.class_text(e)} vs 7", foil=foil)
        for e in r.per_target
    ]
    picture = runner.render(r)
    assert torch.equal(picture, viz.panel_grid(panels, title="gradcam"))
    assert r.class_text(r.per_target[0]).startswith("4 (")
    written = runner.write_result(r, tmp_path, save_map="npy")
    maps = np.load(written[1])
    assert maps.shape == (2, 64, 64)
    for j, e in enumerate(r.per_target):
        np.testing.assert_array_equal(maps[j], e.map.numpy())
    (pt,) = runner.write_result(r, tmp_path, save_map="pt", picture=False)
    saved = torch.load(pt, weights_only=True)
    assert saved["targets"] == [4, 0] and saved["foil"] == 7 and saved["target"] == 4
    assert torch.equal(saved["maps"], torch.stack([e.map for e in r.per_target]))
    assert saved["target_weights"] is None  # gradcam has no segment weights

    # one class with a foil: the single panel, its target line "<class> vs <foil>"
    (one,) = runner.LocalRunner(model, "gradcam", target=4, foil=7).run(tiny_photos[:1])
    assert isinstance(one, runner.FileResult) and one.per_target == [] and one.foil == 7
    text = one.class_text(one.explained[0])
    single = viz.method_panel(one.view, "gradcam", one.map, target=text, foil="7")
    assert torch.equal(runner.render(one), single)
    assert runner.targets_note(one) == f"target {text} vs 7"
    (pt1,) = runner.write_result(one, tmp_path / "one", save_map="pt", picture=False)
    saved = torch.load(pt1, weights_only=True)
    assert saved["targets"] == [4] and saved["maps"].shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 1, "targets": [2]}, "--target and --targets do not go together"),
        ({"targets": [2], "top_labels": 2}, "--targets and --top-labels do not go together"),
        ({"targets": []}, "--targets needs at least one class"),
        ({"targets": [1, 2, 1]}, "--targets names class 1 twice"),
        ({"top_labels": 0}, "--top-labels must be >= 1"),
        ({"targets": [1, 2], "foil": 2}, "--foil 2 is also a target"),
        ({"target": 3, "foil": 3}, "--foil 3 is also a target"),
        ({"targets": [1, 10]}, r"--targets: class 10 is not in 0\.\.9"),
        ({"target": -1}, r"--target: class -1 is not in 0\.\.9"),
        ({"foil": 12}, r"--foil: class 12 is not in 0\.\.9"),
        ({"top_labels": 11}, "--top-labels 11: the model has 10 classes"),
    ],
)
def test_check_classes(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        runner.check_classes(10, **kwargs)  # type: ignore[arg-type]
    runner.check_classes(10, targets=[0, 9], foil=5)  # fine
    runner.check_classes(None, targets=[0, 1000])  # no class count: only the index sign


def test_remote_runner_several_targets_equal_in_process(tiny_photos: list[Path]) -> None:
    from tests.serving.harness import ServerThread, tiny_model
    from xai_serve.client import Client

    model = tiny_model()
    views = _views(model, tiny_photos)
    expected = _in_process(model, tiny_photos, "gradcam",
                           target=torch.tensor([[1, 3]] * 2), foil=2)  # fmt: skip
    with ServerThread(models=[model]) as server, Client(server.address) as client:
        job = runner.RemoteRunner(client, "tiny", "gradcam", targets=[1, 3], foil=2,
                                  view=lambda rgb: model.preprocess(rgb)[1])  # fmt: skip
        results = sorted(job.run(tiny_photos), key=lambda r: r.source)
        top = runner.RemoteRunner(client, "tiny", "gradcam", top_labels=5, top_k=3)
        ranked = list(top.run(tiny_photos[:1]))
    for i, r in enumerate(results):
        assert isinstance(r, runner.FileResult) and r.foil == 2
        assert [e.target for e in r.per_target] == [1, 3]
        for j, e in enumerate(r.per_target):
            torch.testing.assert_close(e.map, expected.maps[i, j], atol=1e-5, rtol=0)
        assert r.view is not None and torch.equal(r.view, views[i])
        assert runner.render(r).shape[2] > 2 * 64  # two panels side by side
    (r,) = ranked
    assert isinstance(r, runner.FileResult)
    assert len(r.top_k) == 5  # asked for as many scores as top labels, so each is named
    assert [e.target for e in r.per_target] == [s.index for s in r.top_k]
    assert all(r.class_text(e).endswith("%)") for e in r.per_target)
    # no view on this side: each class's panel is the server's own overlay
    assert all(e.overlay_png is not None for e in r.per_target)
    assert runner.render(r).shape[2] > 4 * 64  # four panels to a row
