"""The concept methods on the bundled EfficientNet-Lite0 (ImageNet weights): what the README
shows, reproducible with one command.

    python -m benchmarks.concepts_lite0 [--out DIR]

Writes into ``DIR`` (default ``benchmarks/results/<date>-<device>-concepts``):

- ``dissect-mid/`` and ``dissect-late/``: Network Dissection of a middle block
  (``_blocks.10``, 14 x 14 maps) and a late one (``_blocks.15``, 7 x 7) over the bundled
  procedural probe set (8 images per concept): ``dissect.json`` and ``dissect.png``;
- ``tcav/``: TCAV of class 281 ("tabby") at ``_blocks.15`` for striped and other procedural
  concepts against random sets, over 12 random crops and flips of one photo of a tabby cat
  (``skimage.data.chelsea``; the crops are drawn from a fixed seed and written to
  ``tcav/inputs/``, which git ignores): ``tcav.json`` and ``tcav.png``;
- ``visualize/``: feature visualisation of eight channels of ``_blocks.15`` and the class
  logit 281, one batch: ``visualize.json`` and ``visualize.png``.

Each step is the ``xai-serve`` command a user would run (in this process).
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import time
from pathlib import Path

import torch
from PIL import Image

from xai_serve import cli

RESULTS = Path(__file__).parent / "results"

TCAV_CONCEPTS = (
    "stripes_0_wide,stripes_90_wide,stripes_45_narrow,zigzag,dots,checkerboard,orange,circle"
)


def chelsea_crops(folder: Path, count: int = 12, seed: int = 0) -> Path:
    """``count`` random square crops (55-100% of the short side) of skimage's chelsea, half of
    them mirrored, as PNG files in ``folder``."""
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(skimage.data.chelsea())
    g = torch.Generator().manual_seed(seed)
    w, h = img.size
    for i in range(count):
        side = int(min(w, h) * float(torch.empty(1).uniform_(0.55, 1.0, generator=g)))
        x = int(torch.randint(0, w - side + 1, (1,), generator=g))
        y = int(torch.randint(0, h - side + 1, (1,), generator=g))
        crop = img.crop((x, y, x + side, y + side))
        if float(torch.rand(1, generator=g)) < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.save(folder / f"chelsea-crop{i:02d}.png")
    return folder


def _run(argv: list[str]) -> float:
    print("xai-serve " + " ".join(argv), flush=True)
    start = time.perf_counter()
    code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"xai-serve {argv[0]} failed with exit code {code}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="results folder (default: dated)")
    args = parser.parse_args()
    if args.out:
        out = Path(args.out)
    else:
        from benchmarks.run import _device_label

        slug = re.sub(r"[^A-Za-z0-9]+", "-", _device_label()[0]).strip("-").lower()
        out = RESULTS / f"{dt.date.today().isoformat()}-{slug}-concepts"
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}
    for name, layer in (("dissect-mid", "_blocks.10"), ("dissect-late", "_blocks.15")):
        d = out / name
        seconds[name] = _run([
            "dissect", "--layer", layer, "--per-concept", "8", "--top", "12", "--no-progress",
            "--out", str(d), "--json", str(d / "dissect.json"),
        ])  # fmt: skip
    crops = chelsea_crops(out / "tcav" / "inputs")
    seconds["tcav"] = _run([
        "tcav", "--target", "281", "--concepts", TCAV_CONCEPTS, "--images", str(crops),
        "--layer", "_blocks.15", "--runs", "10", "--no-progress", "--out", str(out / "tcav"),
        "--json", str(out / "tcav" / "tcav.json"),
    ])  # fmt: skip
    objectives = [f"channel:_blocks.15:{c}" for c in range(0, 320, 40)] + ["logit:281"]
    seconds["visualize"] = _run([
        "visualize", *objectives, "--steps", "256", "--size", "128", "--no-progress",
        "--out", str(out / "visualize"), "--json", str(out / "visualize" / "visualize.json"),
    ])  # fmt: skip
    lines = [f"{k}: {v:.0f} s" for k, v in seconds.items()]
    (out / "seconds.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
