"""Tests of xai_serve.serving.codec: images, xai_serve.v1 tensors, Open Inference tensors."""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from xai_serve.errors import InvalidInput, ResourceExhausted
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.serving import codec
from xai_serve.serving.codec import (
    DTYPES,
    OIP_DTYPES,
    decode_image,
    encode_png,
    oip_input_to_tensor,
    tensor_from_proto,
    tensor_to_oip_output,
    tensor_to_proto,
)

BIG = 10**8


# ---------------------------------------------------------------------------------- helpers


def _random_rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A smooth image that lossy codecs reproduce closely."""
    y, x = np.mgrid[0:h, 0:w]
    r = 255 * x / (w - 1)
    g = 255 * y / (h - 1)
    b = 128 + 100 * np.sin(x / 9.0) * np.cos(y / 7.0)
    return np.stack([r, g, b], axis=-1).round().astype(np.uint8)


def _encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chw(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(arr, dtype=np.uint8)).permute(2, 0, 1)


def _patch_png_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR width and height replaced (chunk CRC recomputed)."""
    assert png[12:16] == b"IHDR"
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    return png[:16] + bytes(ihdr) + crc + png[33:]


def _png_bomb(width: int, height: int) -> bytes:
    return _patch_png_size(_encode(Image.new("L", (8, 8)), "PNG"), width, height)


# ---------------------------------------------------------------------------------- images


def test_png_round_trip_exact() -> None:
    arr = _random_rgb()
    out = decode_image(_encode(Image.fromarray(arr), "PNG"), max_pixels=BIG)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 32) and out.is_contiguous()
    assert torch.equal(out, _chw(arr))


def test_webp_lossless_exact_and_lossy_close() -> None:
    arr = _smooth_rgb()
    lossless = decode_image(_encode(Image.fromarray(arr), "WEBP", lossless=True), max_pixels=BIG)
    assert torch.equal(lossless, _chw(arr))
    lossy = decode_image(_encode(Image.fromarray(arr), "WEBP", quality=95), max_pixels=BIG)
    assert lossy.shape == (3, 48, 64)
    assert (lossy.float() - _chw(arr).float()).abs().mean() < 4.0


def test_jpeg_round_trip_close() -> None:
    arr = _smooth_rgb()
    out = decode_image(_encode(Image.fromarray(arr), "JPEG", quality=95), max_pixels=BIG)
    assert out.shape == (3, 48, 64) and out.dtype == torch.uint8
    assert (out.float() - _chw(arr).float()).abs().mean() < 3.0


def test_result_owns_writable_memory() -> None:
    data = _encode(Image.fromarray(_random_rgb()), "PNG")
    a = decode_image(data, max_pixels=BIG)
    a.zero_()
    assert decode_image(data, max_pixels=BIG).sum() > 0


def test_modes_converted_to_rgb() -> None:
    arr = _random_rgb()
    rgba = np.concatenate([arr, np.full((24, 32, 1), 7, np.uint8)], axis=-1)
    out = decode_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"), max_pixels=BIG)
    assert torch.equal(out, _chw(arr))  # alpha dropped, colour kept

    grey = arr[:, :, 0]
    out = decode_image(_encode(Image.fromarray(grey, "L"), "PNG"), max_pixels=BIG)
    assert torch.equal(out, torch.from_numpy(grey)[None].expand(3, -1, -1))

    la = Image.fromarray(np.stack([grey, grey // 2], axis=-1), "LA")
    out = decode_image(_encode(la, "PNG"), max_pixels=BIG)
    assert torch.equal(out, torch.from_numpy(grey)[None].expand(3, -1, -1))

    palette = Image.fromarray(arr).quantize(colors=16)
    out = decode_image(_encode(palette, "PNG"), max_pixels=BIG)
    assert torch.equal(out, _chw(np.asarray(palette.convert("RGB"))))

    cmyk = Image.fromarray(_smooth_rgb()).convert("CMYK")
    out = decode_image(_encode(cmyk, "JPEG", quality=95), max_pixels=BIG)
    assert out.shape == (3, 48, 64)
    assert (out.float() - _chw(_smooth_rgb()).float()).abs().mean() < 4.0


def test_16_bit_greyscale_scaled_not_clipped() -> None:
    wide = (np.arange(6 * 7, dtype=np.uint16).reshape(6, 7) * 1500).astype(np.uint16)
    im = Image.fromarray(wide)
    assert im.mode == "I;16"
    out = decode_image(_encode(im, "PNG"), max_pixels=BIG)
    expected = torch.from_numpy((wide >> 8).astype(np.uint8))
    assert torch.equal(out, expected[None].expand(3, -1, -1))


def test_exif_orientation_applied() -> None:
    # Four solid quadrants, wider than tall; orientation 6 = rotate 90 degrees clockwise.
    arr = np.zeros((32, 48, 3), np.uint8)
    arr[:16, :24] = (255, 0, 0)
    arr[:16, 24:] = (0, 255, 0)
    arr[16:, :24] = (0, 0, 255)
    arr[16:, 24:] = (255, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(Image.fromarray(arr), "JPEG", quality=95, subsampling=0, exif=exif.tobytes())
    out = decode_image(data, max_pixels=BIG)
    assert out.shape == (3, 48, 32)
    error = (out.float() - _chw(np.rot90(arr, k=-1)).float()).abs().mean()
    wrong_way = (out.float() - _chw(np.rot90(arr, k=1)).float()).abs().mean()
    assert error < 3.0 < 50.0 < wrong_way


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_refused(fmt: str) -> None:
    data = _encode(Image.fromarray(_random_rgb()), fmt)
    with pytest.raises(InvalidInput, match=r"image: unsupported.*PNG, JPEG, WEBP"):
        decode_image(data, max_pixels=BIG)


def test_empty_and_junk_refused() -> None:
    with pytest.raises(InvalidInput, match="image is empty"):
        decode_image(b"", max_pixels=BIG)
    with pytest.raises(InvalidInput, match="photo is empty"):
        decode_image(b"", max_pixels=BIG, field="photo")
    rng = np.random.default_rng(1)
    for n in (1, 3, 10, 100, 5000):
        with pytest.raises(InvalidInput):
            decode_image(rng.bytes(n), max_pixels=BIG)
    # Right magic bytes, garbage after them.
    for magic in (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\x00\x00\x00\x00WEBP"):
        for n in (0, 5, 200):
            with pytest.raises(InvalidInput, match="image: cannot decode"):
                decode_image(magic + rng.bytes(n), max_pixels=BIG)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_every_truncation_refused(fmt: str) -> None:
    data = _encode(Image.fromarray(_random_rgb(16, 20)), fmt)
    decode_image(data, max_pixels=BIG)  # the whole file decodes
    for n in range(len(data)):
        try:
            decode_image(data[:n], max_pixels=BIG)
        except InvalidInput:
            continue
        pytest.fail(f"{fmt} cut to {n} of {len(data)} bytes decoded without an error")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_corrupted_bytes_never_raise_other_errors(fmt: str) -> None:
    data = _encode(Image.fromarray(_random_rgb(16, 20)), fmt)
    rng = np.random.default_rng(2)
    for _ in range(300):
        bad = bytearray(data)
        for pos in rng.integers(0, len(bad), size=int(rng.integers(1, 4))):
            bad[pos] = int(rng.integers(0, 256))
        try:
            out = decode_image(bytes(bad), max_pixels=BIG)
        except InvalidInput:
            continue
        assert out.dtype == torch.uint8 and out.dim() == 3 and out.shape[0] == 3


def test_decompression_bomb_refused_before_decoding() -> None:
    bomb = _png_bomb(100_000, 100_000)
    start = time.perf_counter()
    with pytest.raises(ResourceExhausted, match=r"image is 10000000000 pixels.*is 1000000"):
        decode_image(bomb, max_pixels=1_000_000)
    assert time.perf_counter() - start < 0.5


def test_bomb_refused_without_pil_global_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ResourceExhausted, match=r"100000x100000 = 10000000000 pixels.*is 1000000"):
        decode_image(_png_bomb(100_000, 100_000), max_pixels=1_000_000)


def test_bomb_past_pil_limit_is_resource_exhausted_even_if_max_pixels_allows() -> None:
    start = time.perf_counter()
    with pytest.raises(ResourceExhausted, match="max_pixels"):
        decode_image(_png_bomb(100_000, 100_000), max_pixels=10**12)
    assert time.perf_counter() - start < 0.5


def test_pil_bomb_warning_not_emitted() -> None:
    # 10000 x 10000 is past PIL's warning threshold but under its error threshold.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ResourceExhausted):
            decode_image(_png_bomb(10_000, 10_000), max_pixels=1_000_000)


def test_max_pixels_boundary_exact() -> None:
    data = _encode(Image.fromarray(_random_rgb(6, 8)), "PNG")
    assert decode_image(data, max_pixels=48).shape == (3, 6, 8)
    with pytest.raises(ResourceExhausted, match=r"8x6 = 48 pixels.*max_pixels\) is 47"):
        decode_image(data, max_pixels=47)


def test_zero_size_refused() -> None:
    for w, h in ((0, 8), (8, 0)):
        with pytest.raises(InvalidInput, match="image"):
            decode_image(_png_bomb(w, h), max_pixels=BIG)


def test_encode_png_round_trip() -> None:
    rgb = _chw(_random_rgb())
    data = encode_png(rgb)
    assert data.startswith(b"\x89PNG")
    assert torch.equal(decode_image(data, max_pixels=BIG), rgb)
    # Non-contiguous input is fine.
    flipped = rgb.flip(2)
    assert torch.equal(decode_image(encode_png(flipped), max_pixels=BIG), flipped)


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(1, 4, 4)]
)
def test_encode_png_refuses_bad_input(bad: torch.Tensor) -> None:
    with pytest.raises(InvalidInput, match="rgb"):
        encode_png(bad)


# ---------------------------------------------------------------------------------- tensors


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("code", sorted(DTYPES))
def test_proto_round_trip_all_dtypes(code: int) -> None:
    dtype = DTYPES[code]
    t = _sample(dtype)
    msg = tensor_to_proto(t)
    assert msg.dtype == code and list(msg.shape) == [2, 3, 4]
    assert len(msg.data) == t.numel() * dtype.itemsize
    back = tensor_from_proto(msg, field="tensor", max_elements=1000)
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(back, t)
    back.add_(1)  # writable, owns its memory
    assert torch.equal(tensor_from_proto(msg, field="tensor", max_elements=1000), t)


def test_proto_bytes_are_little_endian_row_major() -> None:
    t = torch.tensor([[1.0, 2.0], [3.0, -0.5]])
    assert tensor_to_proto(t).data == np.array([[1, 2], [3, -0.5]], "<f4").tobytes()
    assert tensor_to_proto(t.T).data == np.array([[1, 3], [2, -0.5]], "<f4").tobytes()
    bf = tensor_to_proto(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    assert bf.dtype == pb.BFLOAT16 and bf.data == b"\x80\x3f\x00\xc0"
    msg = pb.Tensor(shape=[2], dtype=pb.INT32, data=struct.pack("<ii", 7, -3))
    assert tensor_from_proto(msg, field="t", max_elements=10).tolist() == [7, -3]


def test_swap_bytes() -> None:
    t = torch.tensor([1.0, -2.5], dtype=torch.float32)
    swapped = codec._swap_bytes(t)
    assert swapped.view(torch.uint8).numpy().tobytes() == np.array([1.0, -2.5], ">f4").tobytes()
    assert torch.equal(codec._swap_bytes(swapped), t)
    u8 = torch.arange(4, dtype=torch.uint8)
    assert torch.equal(codec._swap_bytes(u8), u8)


def test_proto_byte_length_mismatch() -> None:
    msg = pb.Tensor(shape=[2, 3], dtype=pb.FLOAT32, data=b"\x00" * 20)
    with pytest.raises(InvalidInput, match=r"tensor\.data has 20 bytes.*needs 24"):
        tensor_from_proto(msg, field="tensor", max_elements=100)


@pytest.mark.parametrize("shape, index", [([2, 0, 3], 1), ([-1], 0), ([4, 4, -7], 2)])
def test_proto_bad_dims(shape: list[int], index: int) -> None:
    msg = pb.Tensor(shape=shape, dtype=pb.FLOAT32, data=b"")
    with pytest.raises(InvalidInput, match=rf"tensor\.shape\[{index}\] is {shape[index]}"):
        tensor_from_proto(msg, field="tensor", max_elements=100)


def test_proto_empty_shape_and_too_many_dims() -> None:
    with pytest.raises(InvalidInput, match=r"tensor\.shape is empty"):
        tensor_from_proto(pb.Tensor(dtype=pb.FLOAT32, data=b"\x00" * 4), field="tensor",
                          max_elements=100)  # fmt: skip
    msg = pb.Tensor(shape=[1] * 100, dtype=pb.UINT8, data=b"\x00")
    with pytest.raises(InvalidInput, match="100 dimensions"):
        tensor_from_proto(msg, field="tensor", max_elements=100)


def test_proto_huge_shape_resource_exhausted_fast() -> None:
    msg = pb.Tensor(shape=[2**40, 2**40], dtype=pb.FLOAT32, data=b"")
    start = time.perf_counter()
    with pytest.raises(ResourceExhausted, match=rf"tensor has {2**80} elements.*is 1000000"):
        tensor_from_proto(msg, field="tensor", max_elements=1_000_000)
    big = pb.Tensor(shape=[2**62] * 32, dtype=pb.FLOAT32, data=b"")
    with pytest.raises(ResourceExhausted):
        tensor_from_proto(big, field="tensor", max_elements=1_000_000)
    assert time.perf_counter() - start < 0.1


def test_proto_max_elements_boundary() -> None:
    msg = pb.Tensor(shape=[3, 4], dtype=pb.UINT8, data=bytes(12))
    assert tensor_from_proto(msg, field="tensor", max_elements=12).shape == (3, 4)
    with pytest.raises(ResourceExhausted, match="12 elements"):
        tensor_from_proto(msg, field="tensor", max_elements=11)


def test_proto_dtype_unspecified_or_unknown() -> None:
    with pytest.raises(InvalidInput, match=r"tensor\.dtype is unspecified"):
        tensor_from_proto(pb.Tensor(shape=[1], data=b"\x00" * 4), field="tensor", max_elements=9)
    msg = pb.Tensor(shape=[1], data=b"\x00" * 4)
    msg.dtype = 99  # proto3 enums are open: unknown values arrive as ints
    with pytest.raises(InvalidInput, match=r"tensor\.dtype 99 is unknown"):
        tensor_from_proto(msg, field="tensor", max_elements=9)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int8, torch.bool, torch.int16])
def test_to_proto_unsupported_dtype(dtype: torch.dtype) -> None:
    with pytest.raises(InvalidInput, match="dtype"):
        tensor_to_proto(torch.zeros(2, dtype=dtype))


# ---------------------------------------------------------------------------------- OIP


def _oip_input(datatype: str, shape: list[int]) -> oip.ModelInferRequest.InferInputTensor:
    return oip.ModelInferRequest.InferInputTensor(name="x", datatype=datatype, shape=shape)


@pytest.mark.parametrize("datatype", sorted(OIP_DTYPES))
def test_oip_raw_round_trip(datatype: str) -> None:
    t = _sample(OIP_DTYPES[datatype])
    meta, raw = tensor_to_oip_output("out", t)
    assert meta.name == "out" and meta.datatype == datatype and list(meta.shape) == [2, 3, 4]
    back = oip_input_to_tensor(
        _oip_input(meta.datatype, list(meta.shape)), raw, field="inputs[0]", max_elements=100
    )
    assert back.dtype == t.dtype and torch.equal(back, t)


def test_oip_output_bytes_decode_with_numpy() -> None:
    t = torch.tensor([[1.5, -2.0, 3.25]], dtype=torch.float64)
    meta, raw = tensor_to_oip_output("scores", t)
    assert meta.datatype == "FP64"
    np.testing.assert_array_equal(np.frombuffer(raw, "<f8").reshape(1, 3), t.numpy())
    meta, raw = tensor_to_oip_output("ids", torch.tensor([5, -6], dtype=torch.int64))
    assert meta.datatype == "INT64" and np.frombuffer(raw, "<i8").tolist() == [5, -6]
    with pytest.raises(InvalidInput, match="'z'"):
        tensor_to_oip_output("z", torch.zeros(2, dtype=torch.complex64))


def test_oip_raw_fp32_matches_numpy() -> None:
    arr = np.random.default_rng(3).standard_normal((1, 3, 4, 5)).astype("<f4")
    out = oip_input_to_tensor(
        _oip_input("FP32", [1, 3, 4, 5]), arr.tobytes(), field="inputs[0]", max_elements=1000
    )
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), arr)


@pytest.mark.parametrize(
    "datatype, field, values, dtype",
    [
        ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 8.0, 0.0, 1e-3], torch.float32),
        ("FP64", "fp64_contents", [0.5, -1.25, 3.0, 8.0, 0.0, 1e-300], torch.float64),
        ("INT32", "int_contents", [1, -2, 3, 2**31 - 1, -(2**31), 0], torch.int32),
        ("INT16", "int_contents", [1, -2, 3, 32767, -32768, 0], torch.int16),
        ("INT8", "int_contents", [1, -2, 3, 127, -128, 0], torch.int8),
        ("INT64", "int64_contents", [1, -2, 3, 2**62, -(2**63), 0], torch.int64),
        ("UINT8", "uint_contents", [1, 2, 3, 255, 0, 9], torch.uint8),
        ("BOOL", "bool_contents", [True, False, True, True, False, False], torch.bool),
    ],
)
def test_oip_typed_contents(
    datatype: str, field: str, values: list[object], dtype: torch.dtype
) -> None:
    inp = _oip_input(datatype, [2, 3])
    getattr(inp.contents, field).extend(values)
    out = oip_input_to_tensor(inp, None, field="inputs[0]", max_elements=100)
    assert out.dtype == dtype and out.shape == (2, 3)
    expected = torch.tensor(values, dtype=torch.float64 if dtype.is_floating_point else None)
    assert torch.equal(out, expected.to(dtype).reshape(2, 3))


def test_oip_typed_count_mismatch() -> None:
    inp = _oip_input("FP32", [2, 3])
    inp.contents.fp32_contents.extend([1.0] * 5)
    with pytest.raises(InvalidInput, match=r"inputs\[0\]: contents.fp32_contents has 5.*needs 6"):
        oip_input_to_tensor(inp, None, field="inputs[0]", max_elements=100)


def test_oip_raw_byte_mismatch() -> None:
    with pytest.raises(InvalidInput, match=r"raw_input_contents has 10 bytes.*needs 12"):
        oip_input_to_tensor(_oip_input("FP32", [3]), bytes(10), field="inputs[0]", max_elements=9)


@pytest.mark.parametrize("datatype", ["BYTES", "UINT64", "FP8", ""])
def test_oip_unsupported_datatypes(datatype: str) -> None:
    match = "BYTES is not supported" if datatype == "BYTES" else "is not supported"
    with pytest.raises(InvalidInput, match=match):
        oip_input_to_tensor(_oip_input(datatype, [1]), b"x", field="inputs[0]", max_elements=9)


def test_oip_fp16_needs_raw() -> None:
    inp = _oip_input("FP16", [2])
    inp.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match="raw_input_contents"):
        oip_input_to_tensor(inp, None, field="inputs[0]", max_elements=9)


def test_oip_contents_in_wrong_field_or_twice() -> None:
    inp = _oip_input("FP32", [2])
    inp.contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidInput, match=r"takes contents\.fp32_contents"):
        oip_input_to_tensor(inp, None, field="inputs[0]", max_elements=9)
    inp = _oip_input("FP32", [2])
    inp.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(InvalidInput, match="both raw_input_contents and contents"):
        oip_input_to_tensor(inp, bytes(8), field="inputs[0]", max_elements=9)


def test_oip_out_of_range_values() -> None:
    inp = _oip_input("INT8", [2])
    inp.contents.int_contents.extend([1, 128])
    with pytest.raises(InvalidInput, match=r"outside the INT8 range \[-128, 127\]"):
        oip_input_to_tensor(inp, None, field="inputs[0]", max_elements=9)
    inp = _oip_input("UINT8", [1])
    inp.contents.uint_contents.append(256)
    with pytest.raises(InvalidInput, match="UINT8 range"):
        oip_input_to_tensor(inp, None, field="inputs[0]", max_elements=9)
    with pytest.raises(InvalidInput, match="BOOL byte"):
        oip_input_to_tensor(_oip_input("BOOL", [2]), b"\x01\x02", field="inputs[0]", max_elements=9)


def test_oip_limits_and_shape() -> None:
    with pytest.raises(ResourceExhausted, match="max_elements"):
        oip_input_to_tensor(
            _oip_input("FP32", [2**40, 2**40]), b"", field="inputs[0]", max_elements=10**6
        )
    with pytest.raises(InvalidInput, match=r"inputs\[1\]\.shape\[0\] is 0"):
        oip_input_to_tensor(_oip_input("FP32", [0, 3]), b"", field="inputs[1]", max_elements=9)
