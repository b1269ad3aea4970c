"""``xai-serve demo``: a real server process on the bundled model, photos through gRPC,
pictures and a contact sheet out, a clean stop; and a loud failure instead of a hang."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xai_serve
from tests._peers import require
from xai_serve.demo import DEMO_METHODS, DEMO_PHOTOS, DemoMethod, DemoViT, load_photos, run_demo
from xai_serve.errors import InvalidInput, Unavailable
from xai_serve.models import TransformConfig, bundled_model_config, load_model
from xai_serve.serving.codec import decode_image

require("skimage.data")
require("efficientnet_lite_pytorch")

REPO = Path(__file__).resolve().parents[1]


def test_photos_are_the_five_named_ones() -> None:
    photos = load_photos()
    assert [n for n, _ in photos] == list(DEMO_PHOTOS)
    for _, rgb in photos:
        assert rgb.dtype == torch.uint8 and rgb.shape[0] == 3 and min(rgb.shape[1:]) >= 300


def test_demo_end_to_end_small(tmp_path: Path) -> None:
    """Two photos, gradcam and a small LIME: same maps as in-process, every file, exit 0."""
    methods = (
        DemoMethod("gradcam"),
        DemoMethod(
            "lime", (("samples", 16), ("n_segments", 9), ("segmenter", "grid"), ("seed", 0))
        ),
    )
    lines: list[str] = []
    # --no-tune: the maps are compared with fp32 forwards in this process below; a tuned server
    # may run bf16 where the CPU has it (its answers then differ within the fidelity guard).
    report = run_demo(
        tmp_path,
        methods=methods,
        photos=("chelsea", "coffee"),
        server_args=("--no-tune",),
        say=lines.append,
    )
    assert report.server_exit == 0
    assert "forward path of efficientnet_lite0: contiguous fp32 (not tuned)" in lines
    assert sorted(p.name for p in report.pictures) == [
        "chelsea_gradcam.png", "chelsea_lime.png", "coffee_gradcam.png", "coffee_lime.png",
    ]  # fmt: skip
    assert (tmp_path / "photos" / "chelsea.png").is_file() and (tmp_path / "server.log").is_file()
    sheet = decode_image(report.contact_sheet.read_bytes(), max_pixels=10**8)
    assert sheet.shape[1] > 2 * 224 and sheet.shape[2] > 3 * 224  # 2 rows, photo + 2 methods
    assert any("server stopped cleanly (exit 0)" in line for line in lines)

    model = load_model(bundled_model_config())
    photos = dict(load_photos(("chelsea", "coffee")))
    x = torch.stack([model.preprocess(photos[n])[0] for n in ("chelsea", "coffee")])
    cam = xai_serve.explain(model.module, x, "gradcam")
    lime = xai_serve.explain(model.module, x, "lime", samples=16, n_segments=9,
                             segmenter="grid", seed=0)  # fmt: skip
    for i in range(2):
        got = report.results["gradcam"][i]
        torch.testing.assert_close(got.map, cam.maps[i], atol=1e-4, rtol=0)
        assert got.target == int(cam.targets[i]) and got.top_k[0].index == got.target
        torch.testing.assert_close(report.results["lime"][i].map, lime.maps[i], atol=1e-4, rtol=0)
    assert report.results["gradcam"][0].target_label == "tiger cat"

    table = report.table()
    assert table.splitlines()[0].startswith("| method | options | requests |")
    assert "| gradcam | defaults | 2 |" in table
    assert "| lime | samples=16, n_segments=9, segmenter=grid, seed=0 | 2 |" in table
    for st in report.stats:
        assert len(st.latencies_ms) == 2 and all(b in (1, 2) for b in st.batch_sizes)

    # the results files the README's demo table cites
    md, js = report.write_results()
    assert md.read_text().count(table) == 1
    assert "forward path: contiguous fp32 (not tuned)" in md.read_text()
    data = json.loads(js.read_text())
    assert data["forward_path"] == "contiguous fp32 (not tuned)"
    assert [m["method"] for m in data["methods"]] == ["gradcam", "lime"]
    assert data["methods"][1]["options"]["samples"] == 16
    assert data["methods"][0]["latencies_ms"] == report.stats[0].latencies_ms


def test_server_that_cannot_start_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(Unavailable) as info:
        run_demo(
            tmp_path,
            methods=DEMO_METHODS[:1],
            photos=("chelsea",),
            server_args=["--config", str(tmp_path / "missing.toml")],
            say=lambda _: None,
        )
    text = str(info.value)
    assert "the server exited with code 2 before it was ready" in text
    assert "missing.toml" in text  # the log's end says why


def test_server_not_ready_in_time_is_an_error_and_is_stopped(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="not ready after"):
        run_demo(tmp_path, methods=DEMO_METHODS[:1], photos=("chelsea",), startup_timeout=0.0,
                 say=lambda _: None)  # fmt: skip
    assert _server_children() == []  # the server process was ended, not left behind


def _server_children() -> list[int]:
    """Live child processes of this one that run the server (from /proc)."""
    pids = []
    for children in Path("/proc/self/task").glob("*/children"):
        pids += [int(p) for p in children.read_text().split()]
    found = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"xai_serve.serving" in cmdline and "State:\tZ" not in status:
            found.append(pid)
    return found


@pytest.mark.slow
def test_full_demo_command(tmp_path: Path) -> None:
    """What ``make demo`` runs: the five photos, the four methods, the default sample counts."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "xai_serve.cli", "demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for photo in DEMO_PHOTOS:
        for method in DEMO_METHODS:
            assert (tmp_path / f"{photo}_{method.name}.png").is_file()
    assert (tmp_path / "contact_sheet.png").is_file()
    for method in DEMO_METHODS:
        assert f"| {method.name} | {method.describe()} | 5 |" in proc.stdout
    assert (tmp_path / "demo-results.md").is_file() and (tmp_path / "demo-results.json").is_file()


def test_demo_with_a_vision_transformer(tmp_path: Path) -> None:
    """``vit=``: the server serves the ViT too, and each photo's row gains its attention
    rollout and gradient-weighted rollout, equal to the library's on the same input."""
    timm = require("timm")
    torch.manual_seed(0)
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    weights = tmp_path / "weights" / "deit_tiny.pt"
    weights.parent.mkdir()
    torch.save(deit.state_dict(), weights)
    vit = DemoViT("timm", "deit_tiny_patch16_224", weights)
    lines: list[str] = []
    report = run_demo(
        tmp_path / "out",
        methods=(DemoMethod("gradcam"),),
        photos=("chelsea",),
        server_args=("--no-tune",),
        say=lines.append,
        vit=vit,
    )
    assert report.server_exit == 0
    names = sorted(p.name for p in report.pictures)
    assert names == [
        "chelsea_gradcam.png", "chelsea_vit_attention_gradcam.png",
        "chelsea_vit_attention_rollout.png",
    ]  # fmt: skip
    sheet = decode_image(report.contact_sheet.read_bytes(), max_pixels=10**8)
    assert sheet.shape[2] > 4 * 224  # photo, gradcam and the two ViT panels
    table = report.table()
    assert "| attention_rollout (vit) | defaults | 1 |" in table
    assert "| attention_gradcam (vit) | defaults | 1 |" in table

    x = TransformConfig()
    from xai_serve.models.registry import preprocess_image

    photo = dict(load_photos(("chelsea",)))["chelsea"]
    image = preprocess_image(photo, x, x.crop)[0][None]
    for method in ("attention_rollout", "attention_gradcam"):
        want = xai_serve.explain(deit, image, method)
        got = report.results[f"vit:{method}"][0]
        torch.testing.assert_close(got.map, want.maps[0], atol=1e-4, rtol=0)
    with pytest.raises(InvalidInput, match="does not exist"):
        run_demo(tmp_path / "again", vit=DemoViT("timm", "deit_tiny_patch16_224", tmp_path / "no"))


def test_demo_command_with_missing_vit_weights_fails_cleanly(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "xai_serve.cli", "demo", "--out", str(tmp_path),
         "--vit-weights", str(tmp_path / "none.pt"), "--vit-source", "timm",
         "--vit-arch", "deit_tiny_patch16_224"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
