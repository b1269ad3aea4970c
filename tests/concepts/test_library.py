"""The procedural concept library, concept sets from files, and the probe dataset: checked
against the closed forms they are drawn from (colours within their jitter, stripe orientations,
shape geometry), for determinism, batch independence and the folder layouts' errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xai_serve.concepts.library import (
    COLOR_JITTER,
    COLORS,
    ConceptSet,
    ProbeDataset,
    concept_category,
    concept_from_images,
    concept_names,
    load_probe_folder,
    probe_dataset,
    procedural,
    procedural_library,
    random_set,
)
from xai_serve.errors import InvalidInput, NotFound
from xai_serve.imaging import encode_png

SIZE = 32


def _png(path: Path, rgb: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(rgb))


def _mask_png(path: Path, mask: torch.Tensor) -> None:
    _png(path, (mask.to(torch.uint8) * 255)[None].expand(3, -1, -1).contiguous())


# ------------------------------------------------------------------ names


def test_names_and_categories() -> None:
    names = concept_names()
    assert len(names) == len(set(names))
    assert set(COLORS) <= set(names)
    for angle in (0, 45, 90, 135):
        assert f"stripes_{angle}_wide" in names and f"stripes_{angle}_narrow" in names
    assert {"dots", "checkerboard", "zigzag", "circle", "square", "triangle"} <= set(names)
    assert concept_category("red") == "color"
    assert concept_category("stripes_45_narrow") == "texture"
    assert concept_category("triangle") == "shape"
    assert concept_names("shape") == ["circle", "square", "triangle"]
    with pytest.raises(NotFound, match="concept_names"):
        concept_category("plaid")
    with pytest.raises(NotFound):
        concept_names("smell")


# ------------------------------------------------------------------ procedural sets


@pytest.mark.parametrize("name", concept_names())
def test_every_concept_shapes_ranges_masks(name: str) -> None:
    s = procedural(name, 6, size=SIZE, seed=3)
    assert isinstance(s, ConceptSet) and s.name == name and len(s) == 6
    assert s.category == concept_category(name)
    assert s.images.shape == (6, 3, SIZE, SIZE) and s.images.dtype == torch.float32
    assert s.masks is not None and s.masks.shape == (6, SIZE, SIZE)
    assert s.masks.dtype == torch.bool
    assert float(s.images.min()) >= 0.0 and float(s.images.max()) <= 1.0
    area = s.masks.float().mean((1, 2))
    assert bool((area > 0.02).all()) and bool((area < 0.95).all()), area
    # the images vary from one index to the next
    assert not torch.equal(s.images[0], s.images[1])


def test_determinism_and_seeds() -> None:
    a = procedural("stripes_45_narrow", 5, size=SIZE, seed=7)
    b = procedural("stripes_45_narrow", 5, size=SIZE, seed=7)
    c = procedural("stripes_45_narrow", 5, size=SIZE, seed=8)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)
    # different concepts with one seed draw different numbers too
    assert not torch.equal(
        procedural("red", 3, size=SIZE).masks, procedural("blue", 3, size=SIZE).masks
    )
    r1, r2 = random_set(4, size=SIZE, seed=1), random_set(4, size=SIZE, seed=1)
    assert torch.equal(r1.images, r2.images)
    assert not torch.equal(r1.images, random_set(4, size=SIZE, seed=2).images)


@pytest.mark.parametrize("name", ["orange", "zigzag", "triangle"])
def test_batch_independence(name: str) -> None:
    big, small = procedural(name, 8, size=SIZE, seed=2), procedural(name, 4, size=SIZE, seed=2)
    assert torch.equal(big.images[:4], small.images)
    assert torch.equal(big.masks[:4], small.masks)
    rb, rs = random_set(8, size=SIZE, seed=5), random_set(4, size=SIZE, seed=5)
    assert torch.equal(rb.images[:4], rs.images)


@pytest.mark.parametrize("colour", list(COLORS))
def test_colour_pixels_inside_mask(colour: str) -> None:
    s = procedural(colour, 8, size=SIZE, seed=1)
    base = torch.tensor(COLORS[colour])[None, :, None]
    inside = s.images.permute(0, 2, 3, 1)[s.masks]  # [P, 3]
    assert inside.shape[0] > 0
    assert float((inside - base[0, :, 0]).abs().max()) <= COLOR_JITTER + 1e-6
    # the region is one colour per image: the jitter is per image, not per pixel
    for img, m in zip(s.images, s.masks, strict=True):
        px = img.permute(1, 2, 0)[m]
        assert float((px - px[0]).abs().max()) == 0.0
    # the mask is a rectangle: its rows are equal wherever they are non-empty
    m = s.masks[0]
    rows = m[m.any(1)]
    assert bool((rows == rows[0]).all())


def test_stripe_orientations_closed_form() -> None:
    n = 6
    s0 = procedural("stripes_0_narrow", n, size=SIZE, seed=4)
    s90 = procedural("stripes_90_narrow", n, size=SIZE, seed=4)
    s45 = procedural("stripes_45_narrow", n, size=SIZE, seed=4)
    s135 = procedural("stripes_135_narrow", n, size=SIZE, seed=4)
    for i in range(n):
        # 0 degrees: constant along each row inside the mask
        img, m = s0.images[i], s0.masks[i]
        for r in range(SIZE):
            cols = m[r].nonzero()[:, 0]
            if len(cols):
                row = img[:, r, cols]
                assert float((row - row[:, :1]).abs().max()) == 0.0
        # the stripes alternate down a column: two colours, both present
        col = img[:, m.any(1), m.any(0).nonzero()[0, 0]]
        assert torch.unique(col, dim=1).shape[1] == 2
        # 90 degrees: constant along each column
        img, m = s90.images[i], s90.masks[i]
        for c in range(SIZE):
            rows = m[:, c].nonzero()[:, 0]
            if len(rows):
                column = img[:, rows, c]
                assert float((column - column[:, :1]).abs().max()) == 0.0
    # 45 degrees: constant where x + y is; 135 degrees: where x - y is. The boundaries fall on
    # float roundings of the diagonals, so count agreement between diagonal neighbours.
    for s, step in ((s45, (1, -1)), (s135, (1, 1))):
        img, m = s.images, s.masks
        a = img[:, :, 1:, :-1] if step[1] == -1 else img[:, :, 1:, 1:]
        b = img[:, :, :-1, 1:] if step[1] == -1 else img[:, :, :-1, :-1]
        both = (m[:, 1:, :-1] & m[:, :-1, 1:]) if step[1] == -1 else (m[:, 1:, 1:] & m[:, :-1, :-1])
        same = (a == b).all(1)[both].float().mean()
        assert float(same) > 0.97, (s.name, float(same))
        # while across the other diagonal the colour changes often
        a2 = img[:, :, 1:, 1:] if step[1] == -1 else img[:, :, 1:, :-1]
        b2 = img[:, :, :-1, :-1] if step[1] == -1 else img[:, :, :-1, 1:]
        both2 = (
            (m[:, 1:, 1:] & m[:, :-1, :-1]) if step[1] == -1 else (m[:, 1:, :-1] & m[:, :-1, 1:])
        )
        assert float((a2 == b2).all(1)[both2].float().mean()) < 0.8


def test_texture_two_colours_half_apart() -> None:
    s = procedural("checkerboard", 4, size=SIZE, seed=9)
    for img, m in zip(s.images, s.masks, strict=True):
        px = torch.unique(img.permute(1, 2, 0)[m], dim=0)
        assert px.shape[0] == 2
        diff = (px[0] - px[1]).abs()
        assert torch.allclose(diff, torch.full((3,), 0.5), atol=1e-6)


def test_shape_geometry() -> None:
    circle = procedural("circle", 8, size=SIZE, seed=0).masks
    square = procedural("square", 8, size=SIZE, seed=0).masks
    tri = procedural("triangle", 8, size=SIZE, seed=0).masks
    # a square's non-empty rows are identical and as many as its non-empty columns (+-1 px)
    for m in square:
        rows = m[m.any(1)]
        assert bool((rows == rows[0]).all())
        assert abs(int(m.any(1).sum()) - int(m.any(0).sum())) <= 1
    # a circle: its area is pi r^2 with r from its extent (within the pixel discretisation)
    for m in circle:
        r = m.any(0).sum().float() / 2
        assert abs(float(m.sum()) / float(torch.pi * r * r) - 1.0) < 0.2
    # a triangle with its apex up: the row widths never shrink going down
    for m in tri:
        widths = m.sum(1)[m.any(1)]
        assert bool((widths[1:] >= widths[:-1]).all())
        assert int(widths[-1]) > int(widths[0])


def test_device_and_library() -> None:
    sets = procedural_library(["red", "dots"], 3, size=SIZE, seed=0, device="cpu")
    assert [s.name for s in sets] == ["red", "dots"]
    assert torch.equal(sets[1].images, procedural("dots", 3, size=SIZE).images)


def test_bad_arguments() -> None:
    with pytest.raises(NotFound):
        procedural("plaid")
    with pytest.raises(InvalidInput, match="count"):
        procedural("red", 0)
    with pytest.raises(InvalidInput, match="size"):
        procedural("red", 2, size=4)
    with pytest.raises(InvalidInput, match="seed"):
        procedural("red", 2, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="empty"):
        procedural_library([])


# ------------------------------------------------------------------ random sets


def test_random_set_generated() -> None:
    r = random_set(6, size=SIZE, seed=3)
    assert r.name == "random_3" and r.category == "random" and r.masks is None
    assert r.images.shape == (6, 3, SIZE, SIZE)
    assert float(r.images.min()) >= 0.0 and float(r.images.max()) <= 1.0
    # smooth: neighbouring pixels differ far less than random pixels do
    neighbour = (r.images[..., 1:] - r.images[..., :-1]).abs().mean()
    shuffled = r.images.flatten(2)[..., torch.randperm(SIZE * SIZE)]
    assert float(neighbour) < 0.3 * float((shuffled[..., 1:] - shuffled[..., :-1]).abs().mean())


def test_random_set_from_folder(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / f"im{i}.png", torch.full((3, 10, 12), i * 40, dtype=torch.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    r = random_set(3, size=8, seed=1, source=tmp_path)
    assert r.images.shape == (3, 3, 8, 8)
    # each drawn image is one of the constant files: values i*40/255 for distinct i
    values = r.images.flatten(1)
    assert torch.allclose(values, values[:, :1].expand_as(values), atol=1e-5)
    levels = (values[:, 0] * 255 / 40).round()
    assert len(set(levels.tolist())) == 3
    assert torch.equal(r.images, random_set(3, size=8, seed=1, source=tmp_path).images)
    with pytest.raises(InvalidInput, match="fewer"):
        random_set(9, size=8, source=tmp_path)
    with pytest.raises(InvalidInput, match="not a folder"):
        random_set(2, source=tmp_path / "nowhere")


# ------------------------------------------------------------------ from files


def test_concept_from_tensor() -> None:
    imgs = torch.rand(3, 3, 16, 16)
    masks = torch.zeros(3, 16, 16, dtype=torch.bool)
    masks[:, 4:8] = True
    s = concept_from_images("mine", imgs, masks, category="custom")
    assert torch.equal(s.images, imgs) and torch.equal(s.masks, masks)
    u8 = concept_from_images("mine", (imgs * 255).round().to(torch.uint8), size=8)
    assert u8.images.shape == (3, 3, 8, 8)
    with pytest.raises(InvalidInput, match=r"\[0, 1\]"):
        concept_from_images("x", imgs * 3)
    with pytest.raises(InvalidInput, match="N, 3, H, W"):
        concept_from_images("x", torch.rand(3, 16, 16))
    with pytest.raises(InvalidInput, match="N = 3"):
        concept_from_images("x", imgs, masks[:2])
    with pytest.raises(InvalidInput, match="its image's size"):
        concept_from_images("x", imgs, masks[:, :8])


def test_concept_from_files(tmp_path: Path) -> None:
    img_dir, mask_dir = tmp_path / "img", tmp_path / "mask"
    truth = []
    for i in range(3):
        rgb = torch.zeros(3, 20, 20, dtype=torch.uint8)
        rgb[0, :, : 5 + 5 * i] = 255
        _png(img_dir / f"a{i}.png", rgb)
        m = rgb[0] > 0
        truth.append(m)
        _mask_png(mask_dir / f"a{i}.png", m)
    s = concept_from_images("red", img_dir, mask_dir, category="color", size=20)
    assert s.images.shape == (3, 3, 20, 20) and s.category == "color"
    assert torch.equal(s.masks, torch.stack(truth))
    # the mask marks exactly the red pixels
    assert torch.equal(s.images[:, 0] == 1.0, s.masks)
    # a list of files, resized
    files = sorted(img_dir.iterdir())
    small = concept_from_images("red", files, sorted(mask_dir.iterdir()), size=10)
    assert small.images.shape == (3, 3, 10, 10) and small.masks.shape == (3, 10, 10)
    # errors
    with pytest.raises(InvalidInput, match="not a folder"):
        concept_from_images("x", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInput, match="no images"):
        concept_from_images("x", tmp_path / "empty")
    with pytest.raises(InvalidInput, match="no such file"):
        concept_from_images("x", [tmp_path / "nope.png"])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InvalidInput):
        concept_from_images("x", tmp_path / "bad")
    _mask_png(tmp_path / "m2" / "a0.png", torch.ones(8, 8, dtype=torch.bool))
    with pytest.raises(InvalidInput, match="no mask file"):
        concept_from_images("x", img_dir, tmp_path / "m2")
    with pytest.raises(InvalidInput, match="2 files for 3 images"):
        concept_from_images("x", img_dir, sorted(mask_dir.iterdir())[:2])


# ------------------------------------------------------------------ probe dataset


def test_probe_dataset_masks_match_pixels() -> None:
    names = ["red", "blue", "white", "stripes_0_wide", "checkerboard", "circle", "square"]
    p = probe_dataset(names, per_concept=4, size=SIZE, seed=0)
    assert isinstance(p, ProbeDataset)
    assert p.images.shape == (28, 3, SIZE, SIZE) and p.masks.shape == (28, 7, SIZE, SIZE)
    assert p.concepts == names
    assert p.categories == ["color"] * 3 + ["texture"] * 2 + ["shape"] * 2
    # every image contains the concept it was built around
    for k in range(7):
        assert bool(p.masks[4 * k : 4 * k + 4, k].any((1, 2)).all())
    # colour masks: the pixels are that colour within the jitter, and outside are not
    for k, c in enumerate(names[:3]):
        base = torch.tensor(COLORS[c])
        px = p.images.permute(0, 2, 3, 1)
        assert float((px[p.masks[:, k]] - base).abs().max()) <= COLOR_JITTER + 1e-6
        assert bool(((px[~p.masks[:, k]] - base).abs().max(-1).values > 2 * COLOR_JITTER).all())
    # shape masks are disjoint from texture masks; each image carries one shape
    shapes, textures = p.masks[:, 5:], p.masks[:, 3:5]
    assert not bool((shapes.any(1) & textures.any(1)).any())
    assert bool((shapes.sum(1) <= 1).all())
    # a stripes_0 image: constant along rows wherever the texture is visible
    img, m = p.images[12], p.masks[12, 3]
    for r in range(SIZE):
        cols = m[r].nonzero()[:, 0]
        if len(cols):
            assert float((img[:, r, cols] - img[:, r, cols[:1]]).abs().max()) == 0.0
    # deterministic
    q = probe_dataset(names, per_concept=4, size=SIZE, seed=0)
    assert torch.equal(p.images, q.images) and torch.equal(p.masks, q.masks)
    assert not torch.equal(p.images, probe_dataset(names, per_concept=4, size=SIZE, seed=1).images)


def test_probe_dataset_errors() -> None:
    with pytest.raises(NotFound):
        probe_dataset(["red", "plaid"])
    with pytest.raises(InvalidInput, match="repeats"):
        probe_dataset(["red", "red"])
    with pytest.raises(InvalidInput, match="empty"):
        probe_dataset([])
    with pytest.raises(InvalidInput, match="per_concept"):
        probe_dataset(["red"], per_concept=0)


def _write_probe_folder(root: Path, csv_text: str | None = None) -> torch.Tensor:
    images = torch.zeros(2, 3, 12, 12, dtype=torch.uint8)
    images[0, 0, :6] = 255  # image a: red top half
    images[1, 2, :, 6:] = 255  # image b: blue right half
    _png(root / "images" / "a.png", images[0])
    _png(root / "images" / "b.png", images[1])
    _mask_png(root / "masks" / "red" / "a.png", images[0, 0] > 0)
    _mask_png(root / "masks" / "blue" / "b.png", images[1, 2] > 0)
    _mask_png(root / "masks" / "lamp" / "b.png", torch.zeros(12, 12, dtype=torch.bool))
    if csv_text is not None:
        (root / "concepts.csv").write_text(csv_text)
    return images


def test_load_probe_folder(tmp_path: Path) -> None:
    images = _write_probe_folder(tmp_path)
    p = load_probe_folder(tmp_path, size=12)
    assert p.concepts == ["blue", "lamp", "red"]
    assert p.categories == ["color", "custom", "color"]
    assert torch.equal(p.images, images.float() / 255)
    assert p.masks.shape == (2, 3, 12, 12)
    assert torch.equal(p.masks[0, 2], images[0, 0] > 0) and not bool(p.masks[1, 2].any())
    assert torch.equal(p.masks[1, 0], images[1, 2] > 0) and not bool(p.masks[0, 0].any())
    assert not bool(p.masks[:, 1].any())
    # resized: a half stays a half
    half = load_probe_folder(tmp_path, size=6)
    assert half.masks.shape == (2, 3, 6, 6)
    assert int(half.masks[0, 2].sum()) == 18
    # concepts.csv fixes order and categories
    (tmp_path / "concepts.csv").write_text("name,category\nred,color\nlamp,object\n")
    p2 = load_probe_folder(tmp_path, size=12)
    assert p2.concepts == ["red", "lamp"] and p2.categories == ["color", "object"]
    assert torch.equal(p2.masks[:, 0], p.masks[:, 2])


@pytest.mark.parametrize(
    "breakage, message",
    [
        ("no_images", "images"),
        ("no_masks", "no masks/ folder"),
        ("orphan_mask", "has no image"),
        ("mask_size", "its image's size"),
        ("csv_unknown", "no folder masks/sky"),
        ("csv_bad", "header"),
        ("not_folder", "not a folder"),
    ],
)
def test_load_probe_folder_errors(tmp_path: Path, breakage: str, message: str) -> None:
    _write_probe_folder(tmp_path)
    root = tmp_path
    if breakage == "no_images":
        for f in (tmp_path / "images").iterdir():
            f.unlink()
    elif breakage == "no_masks":
        for f in (tmp_path / "masks").rglob("*.png"):
            f.unlink()
        for d in sorted((tmp_path / "masks").iterdir()):
            d.rmdir()
        (tmp_path / "masks").rmdir()
    elif breakage == "orphan_mask":
        _mask_png(tmp_path / "masks" / "red" / "zz.png", torch.ones(12, 12, dtype=torch.bool))
    elif breakage == "mask_size":
        _mask_png(tmp_path / "masks" / "red" / "a.png", torch.ones(6, 12, dtype=torch.bool))
    elif breakage == "csv_unknown":
        (tmp_path / "concepts.csv").write_text("name,category\nsky,scene\n")
    elif breakage == "csv_bad":
        (tmp_path / "concepts.csv").write_text("concept;kind\nred;color\n")
    else:
        root = tmp_path / "images" / "a.png"
    with pytest.raises(InvalidInput, match=message):
        load_probe_folder(root, size=12)
