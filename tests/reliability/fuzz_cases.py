"""A seeded generator of hostile requests over the server's whole request surface.

Each :class:`Case` is one call: the RPC, the request bytes (already serialised, so that a case
can also be bytes that are not a message at all), the token it sends, the status codes it may
get and words its error message must contain (one of them, case-insensitive) to be useful —
the field, limit or thing at fault. A few families can legitimately succeed (a JPEG with a few
flipped bytes often still decodes); they add ``OK`` to their codes, and the run counts them.

Families (``Case.family``): ``explain.<field>`` mutates one field of a valid ``Explain``
request (model, method, layer, target, top_k, returns, request_id, options.*, tensor shape,
dtype, byte length, NaN/Inf and extreme values, images: truncated, corrupt, junk, other formats,
decompression bombs, huge headers, extreme aspect ratios); ``oip.<field>`` does the same for
``ModelInfer`` and the metadata RPCs; ``raw.*`` sends bytes that are not a message, or a valid
message cut short or with junk appended, to every RPC; ``auth.*`` sends a missing, wrong or
malformed bearer token; ``oversized`` sends a message over ``max_message_bytes``; ``stream``
sends several mutated requests on one ``ExplainStream``.
"""

from __future__ import annotations

import io
import math
import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import grpc
import numpy as np
from PIL import Image

from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import open_inference_pb2 as oip

__all__ = ["LIMITS", "MODELS", "TOKEN", "Case", "generate"]

Code = grpc.StatusCode
TOKEN = "fuzz-token-0123456789"
REFUSED = frozenset({Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED})
LIMITS = {
    "max_message_bytes": 1 << 20,
    "max_image_pixels": 256 * 256,
    "max_tensor_elements": 3 * 128 * 128,
    "max_samples": 64,
    "max_steps": 16,
    "max_queue": 64,
    "max_top_k": 10,
}
# name -> (input shape, classes, cheap methods, has layers)
MODELS: dict[str, tuple[tuple[int, int, int], int, tuple[str, ...], bool]] = {
    "tiny": ((3, 64, 64), 10, ("gradcam", "saliency", "input_x_gradient"), True),
    "tinyts": ((3, 48, 48), 6, ("saliency", "input_x_gradient"), False),
}
EXPLAIN = "/xai_serve.v1.Explainer/Explain"
STREAM = "/xai_serve.v1.Explainer/ExplainStream"
LIST = "/xai_serve.v1.Explainer/ListModels"
INFER = "/inference.GRPCInferenceService/ModelInfer"
OIP_PREFIX = "/inference.GRPCInferenceService/"
EVERY_RPC = (
    EXPLAIN,
    STREAM,
    LIST,
    *(
        OIP_PREFIX + m
        for m in (
            "ServerLive",
            "ServerReady",
            "ModelReady",
            "ServerMetadata",
            "ModelMetadata",
            "ModelInfer",
        )
    ),
)
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
HEALTH = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/List")
STREAMING = frozenset({STREAM, REFLECTION})
RIGHT = object()  # the case sends the right token


@dataclass
class Case:
    family: str
    rpc: str
    payload: bytes | list[bytes]  # a list: the messages of a stream
    codes: frozenset[Code] = REFUSED
    words: tuple[str, ...] = ()
    token: object = RIGHT  # RIGHT, None (no metadata) or the authorization value to send
    items: list[Case] = field(default_factory=list)  # stream: what each message expects

    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        if self.token is RIGHT:
            return (("authorization", f"Bearer {TOKEN}"),)
        if self.token is None:
            return None
        assert isinstance(self.token, str)
        return (("authorization", self.token),)


# --------------------------------------------------------------------------------------------
# Valid material
# --------------------------------------------------------------------------------------------


def _tensor(rng: random.Random, shape: tuple[int, ...]) -> pb.Tensor:
    x = np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype("<f4")
    return pb.Tensor(shape=list(shape), dtype=pb.FLOAT32, data=x.tobytes())


def _valid(rng: random.Random, model: str | None = None) -> pb.ExplainRequest:
    """A valid, cheap Explain request (as a starting point for one mutation)."""
    model = model or rng.choice(list(MODELS))
    shape, classes, methods, _ = MODELS[model]
    req = pb.ExplainRequest(
        model=model,
        method=rng.choice(methods),
        request_id=f"f{rng.randrange(10**9)}",
        tensor=_tensor(rng, shape),
    )
    if rng.random() < 0.5:
        req.target = rng.randrange(classes)
    if rng.random() < 0.5:
        req.top_k = rng.randrange(LIMITS["max_top_k"] + 1)
    return req


@cache
def _image(fmt: str, h: int = 40, w: int = 56) -> bytes:
    g = np.random.default_rng(0)
    rgb = g.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def _png_bomb(w: int, h: int, with_data: bool = True) -> bytes:
    """A PNG of ``w`` x ``h`` black RGB pixels: its compressed size is a few KiB per megapixel
    (a decompression bomb); without data, only the header that claims the size."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    if with_data:
        comp = zlib.compressobj(9)
        row = b"\0" * (1 + 3 * w)
        body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
        out += _png_chunk(b"IDAT", body)
    return out + _png_chunk(b"IEND", b"")


@cache
def _jpeg_huge_header(w: int, h: int) -> bytes:
    """A small JPEG whose frame header (SOF0) is rewritten to claim ``w`` x ``h`` pixels."""
    data = bytearray(_image("JPEG", 16, 16))
    i = data.find(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def _text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz_.-0123456789 /\\\u00e9\u4e2d\U0001f600\t"
    return "".join(rng.choice(alphabet) for _ in range(n))


# --------------------------------------------------------------------------------------------
# Explain field mutations: each returns (family, request, codes, words)
# --------------------------------------------------------------------------------------------

Mutation = tuple[str, pb.ExplainRequest, frozenset[Code], tuple[str, ...]]


def m_model(rng: random.Random) -> Mutation:
    req = _valid(rng)
    names = ["", "TINY", "tiny ", " tiny", "tiny\x00", _text(rng, rng.randrange(1, 40)), "m" * 5000]
    # quoted in the error message, these would not fit in a status trailer (16 KiB)
    req.model = rng.choice([*names, "\u00e9" * 9000, "m" * 20_000])
    return "explain.model", req, frozenset({Code.NOT_FOUND}), ("model",)


def m_method(rng: random.Random) -> Mutation:
    req = _valid(rng)
    choice = rng.randrange(3)
    if choice == 0:
        req.method = rng.choice(
            ["", "GRADCAM", "gradcam ", "grad-cam", "x" * 5000, "lime\x00", "x" * 30_000]
        )
    elif choice == 1:
        req.method = _text(rng, rng.randrange(1, 30))
    else:  # a CAM method on the model without hookable layers
        req.model = "tinyts"
        req.tensor.CopyFrom(_tensor(rng, MODELS["tinyts"][0]))
        req.ClearField("target")
        req.method = rng.choice(["gradcam", "gradcam++", "scorecam", "eigencam"])
    return "explain.method", req, frozenset({Code.NOT_FOUND, Code.INVALID_ARGUMENT}), ("method",)


def m_layer(rng: random.Random) -> Mutation:
    req = _valid(rng, "tiny")
    layers = ["fc", "layer4.0.conv1.weight", ".", "..", "layer4.", "layer9", "avgpool.x", "*"]
    req.layer = rng.choice([*layers, _text(rng, rng.randrange(1, 30)), "l" * 3000, "l" * 20_000])
    if rng.random() < 0.3:
        req.method = "saliency"  # a layer on a method that takes none
        return "explain.layer", req, frozenset({Code.INVALID_ARGUMENT}), ("layer",)
    req.method = rng.choice(["gradcam", "gradcam++", "layercam"])
    return "explain.layer", req, frozenset({Code.NOT_FOUND, Code.INVALID_ARGUMENT}), ("layer",)


def m_target(rng: random.Random) -> Mutation:
    req = _valid(rng)
    classes = MODELS[req.model][1]
    req.target = rng.choice(
        [
            -1,
            -(2**63),
            rng.randrange(-(2**40), 0),
            classes,
            classes + rng.randrange(1000),
            2**63 - 1,
        ]
    )
    return "explain.target", req, frozenset({Code.INVALID_ARGUMENT}), ("target",)


def m_top_k(rng: random.Random) -> Mutation:
    req = _valid(rng)
    req.top_k = rng.choice([-1, -(2**31), LIMITS["max_top_k"] + 1, 2**31 - 1])
    return "explain.top_k", req, frozenset({Code.INVALID_ARGUMENT}), ("top_k",)


def m_returns(rng: random.Random) -> Mutation:
    req = _valid(rng)
    req.returns = rng.choice([4, 5, 99, 2**31 - 1, -1])  # type: ignore[assignment]
    return "explain.returns", req, frozenset({Code.INVALID_ARGUMENT}), ("returns",)


def m_request_id(rng: random.Random) -> Mutation:
    req = _valid(rng)
    req.request_id = rng.choice(
        ["r" * rng.randrange(257, 5000), "\u00e9" * rng.randrange(129, 900)]
    )
    return "explain.request_id", req, frozenset({Code.INVALID_ARGUMENT}), ("request_id",)


# option field -> (methods it applies to, absurd values, the refusal codes)
_INT_ABSURD = [0, -1, -(2**31), 2**31 - 1]
_FLOAT_ABSURD = [math.nan, math.inf, -math.inf, -1.0, -1e30]
_OPTIONS: dict[str, tuple[tuple[str, ...], list[object]]] = {
    "samples": (("lime", "kernelshap", "smoothgrad"), [*_INT_ABSURD, LIMITS["max_samples"] + 1]),
    "steps": (("integrated_gradients",), [*_INT_ABSURD, LIMITS["max_steps"] + 1]),
    "n_segments": (("lime", "kernelshap"), [*_INT_ABSURD, 4097]),
    "window": (("occlusion",), _INT_ABSURD[:3]),
    "stride": (("occlusion",), _INT_ABSURD[:3]),
    "top_channels": (("scorecam",), _INT_ABSURD[:3]),
    "kernel_width": (("lime",), _FLOAT_ABSURD),
    "alpha": (("lime",), _FLOAT_ABSURD),
    "keep_prob": (("lime",), [*_FLOAT_ABSURD, 0.0, 1.5, 1e30]),
    "blur_sigma": (("lime", "kernelshap", "occlusion"), _FLOAT_ABSURD),
    "noise": (("smoothgrad",), _FLOAT_ABSURD),
    "rule": (("integrated_gradients",), ["", "bogus", "GAUSSLEGENDRE", "riemann", "x" * 20_000]),
    "base": (("smoothgrad",), ["", "bogus", "gradcam", "x" * 20_000]),
    "seed": (("lime", "kernelshap", "smoothgrad"), [-1, -(2**63)]),
}


def m_options(rng: random.Random) -> Mutation:
    req = _valid(rng, "tiny")
    name = rng.choice([*_OPTIONS, "not-applicable", "enum", "baseline"])
    opts = pb.Options()
    words: tuple[str, ...] = (f"options.{name}", name)
    if name == "not-applicable":  # an option the method does not take
        req.method = rng.choice(["gradcam", "saliency"])
        field_name = rng.choice(["samples", "steps", "n_segments", "kernel_width", "rule", "seed"])
        setattr(opts, field_name, {"rule": "riemann_left"}.get(field_name, 3))
        words = (f"options.{field_name}", field_name)
    elif name == "enum":
        req.method = "lime"
        opts.samples = 8
        field_name = rng.choice(["segmenter", "output"])
        setattr(opts, field_name, rng.choice([3, 99, 2**31 - 1, -5]))
        words = (f"options.{field_name}", field_name)
    elif name == "baseline":
        req.method = rng.choice(["integrated_gradients", "gradcam", "saliency"])
        if req.method == "integrated_gradients":
            opts.steps = 2
            if rng.random() < 0.5:
                opts.baseline.blur = True
            else:
                opts.baseline.value = rng.choice([math.nan, math.inf, -math.inf])
        else:
            opts.baseline.value = 0.0
        words = ("baseline",)
    else:
        methods, values = _OPTIONS[name]
        req.method = rng.choice(methods)
        if req.method in ("lime", "kernelshap", "smoothgrad") and name != "samples":
            opts.samples = 4  # keep any work that does happen small
        if req.method in ("lime", "kernelshap") and name != "n_segments":
            opts.segmenter = pb.GRID
        if req.method == "integrated_gradients" and name != "steps":
            opts.steps = 2
        setattr(opts, name, rng.choice(values))
        if name in ("rule", "base"):
            words = (name, "options", "one of")
    req.options.CopyFrom(opts)
    req.ClearField("layer")
    return (
        f"explain.options.{name}",
        req,
        frozenset({Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED}),
        (*words, "option"),
    )


_DTYPES = {pb.FLOAT32: 4, pb.FLOAT16: 2, pb.BFLOAT16: 2, pb.FLOAT64: 8}


def m_tensor(rng: random.Random) -> Mutation:
    req = _valid(rng)
    shape = list(MODELS[req.model][0])
    kind = rng.choice(
        ["shape", "huge", "dims", "wrong-shape", "dtype", "int", "bytes", "nonfinite"]
    )
    t = req.tensor
    codes = frozenset({Code.INVALID_ARGUMENT})
    if kind == "shape":
        bad = list(shape)
        bad[rng.randrange(3)] = rng.choice([0, -1, -(2**62)])
        t.ClearField("shape")
        t.shape.extend(bad if rng.random() < 0.8 else [])
    elif kind == "huge":
        t.ClearField("shape")
        t.shape.extend(
            rng.choice([[2**31] * 3, [3, 2**40, 2**40], [2**62, 2**62], [3, 4096, 4096]])
        )
        codes = frozenset({Code.RESOURCE_EXHAUSTED})
    elif kind == "dims":
        t.ClearField("shape")
        t.shape.extend([1] * rng.randrange(33, 200))
    elif kind == "wrong-shape":
        n = 3 * 64 * 64 if req.model == "tiny" else 3 * 48 * 48
        other = rng.choice([[n], [1, n], [3, 32, 4 * n // 96], [2, *shape], [1, 1, *shape]])
        t.ClearField("shape")
        t.shape.extend(other)
        t.data = t.data[: 4 * math.prod(other)] if math.prod(other) * 4 <= len(t.data) else t.data
    elif kind == "dtype":
        t.dtype = rng.choice([0, 8, 99, 2**31 - 1, -1])  # type: ignore[assignment]
    elif kind == "int":
        code = rng.choice([pb.UINT8, pb.INT32, pb.INT64])
        size = {pb.UINT8: 1, pb.INT32: 4, pb.INT64: 8}[code]
        t.dtype = code
        t.data = bytes(math.prod(shape) * size)
    elif kind == "bytes":
        cut = rng.choice([-1, -3, 1, 7, -len(t.data), 4096])
        t.data = t.data[:cut] if cut < 0 else t.data + bytes(cut)
    else:  # NaN / Inf in any float dtype
        code = rng.choice(list(_DTYPES))
        np_dtype = {pb.FLOAT32: "<f4", pb.FLOAT16: "<f2", pb.FLOAT64: "<f8"}.get(code)
        x = np.zeros(math.prod(shape), dtype=np_dtype or "<f4")
        x[rng.randrange(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
        data = x.tobytes()
        if code == pb.BFLOAT16:  # bfloat16 = the high half of float32
            data = x.astype("<f4").view("<u4").__rshift__(16).astype("<u2").tobytes()
        t.dtype = code
        t.data = data
        return "explain.tensor.nonfinite", req, codes, ("nan", "inf")
    return f"explain.tensor.{kind}", req, codes, ("tensor",)


def m_tensor_extreme(rng: random.Random) -> Mutation:
    """Finite but extreme values (the model's activations may overflow): refused or answered,
    never INTERNAL."""
    req = _valid(rng)
    shape = MODELS[req.model][0]
    value = rng.choice([3e38, -3e38, 1e30, 1e-45, 65504.0])
    x = np.full(math.prod(shape), value, dtype="<f4")
    x[:: rng.randrange(1, 7)] *= -1
    req.tensor.data = x.tobytes()
    return (
        "explain.tensor.extreme",
        req,
        frozenset({Code.OK, Code.INVALID_ARGUMENT}),
        ("logits", "finite", "nan", "inf", "tensor", "model"),
    )


def m_image(rng: random.Random) -> Mutation:
    req = _valid(rng)
    fmt = rng.choice(["PNG", "JPEG", "WEBP"])
    good = _image(fmt)
    kind = rng.choice(
        ["truncated", "corrupt", "junk", "format", "bomb", "header", "aspect", "empty", "tiny"]
    )
    codes = frozenset({Code.INVALID_ARGUMENT})
    if kind == "truncated":
        data = good[: rng.randrange(1, len(good) - 1)]
    elif kind == "corrupt":  # may still decode (JPEG and WebP are forgiving)
        buf = bytearray(good)
        for _ in range(rng.randrange(1, 12)):
            buf[rng.randrange(16, len(buf))] = rng.randrange(256)
        data = bytes(buf)  # a flipped size field can also claim too many pixels
        codes = frozenset({Code.OK, Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED})
    elif kind == "junk":
        prefix = rng.choice([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF\0\0\0\0WEBP"])
        data = prefix + rng.randbytes(rng.randrange(0, 2048))
    elif kind == "format":
        data = _image(rng.choice(["GIF", "BMP", "TIFF", "PPM", "ICO"]))
    elif kind == "bomb":
        w, h = rng.choice([(4096, 4096), (2048, 8192), (300, 300), (20000, 20000)])
        data = _png_bomb(w, h, with_data=w * h <= 4096 * 4096)
        codes = frozenset({Code.RESOURCE_EXHAUSTED})
    elif kind == "header":
        data = (
            _jpeg_huge_header(65535, 65535)
            if rng.random() < 0.5
            else _png_bomb(rng.choice([2**31 - 1, 100_000]), 100_000, with_data=False)
        )
        codes = frozenset({Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT})
    elif kind == "aspect":  # within max_image_pixels, but no model input can be cropped from it
        data = _png_bomb(*rng.choice([(65536, 1), (1, 65536), (32768, 2), (4096, 16)]))
        codes = frozenset({Code.INVALID_ARGUMENT, Code.OK})
    elif kind == "empty":
        data = b""
    else:  # 1 x 1 .. 3 x 3: valid, tiny
        data = _image("PNG", rng.randrange(1, 4), rng.randrange(1, 4))
        codes = frozenset({Code.OK})
    req.image = data
    return f"explain.image.{kind}", req, codes, ("image",)


def m_no_input(rng: random.Random) -> Mutation:
    req = _valid(rng)
    req.ClearField("tensor")
    return "explain.no_input", req, frozenset({Code.INVALID_ARGUMENT}), ("image", "tensor")


EXPLAIN_MUTATIONS: list[tuple[Callable[[random.Random], Mutation], int]] = [
    (m_model, 3),
    (m_method, 3),
    (m_layer, 3),
    (m_target, 3),
    (m_top_k, 2),
    (m_returns, 1),
    (m_request_id, 1),
    (m_options, 10),
    (m_tensor, 10),
    (m_tensor_extreme, 1),
    (m_image, 10),
    (m_no_input, 1),
]


# --------------------------------------------------------------------------------------------
# Open Inference Protocol
# --------------------------------------------------------------------------------------------


def _oip_valid(rng: random.Random, model: str = "tiny", batch: int = 1) -> oip.ModelInferRequest:
    shape = (batch, *MODELS[model][0])
    x = np.random.default_rng(rng.randrange(2**32)).standard_normal(shape).astype("<f4")
    return oip.ModelInferRequest(
        model_name=model,
        id=f"o{rng.randrange(10**9)}",
        inputs=[oip.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=shape)],
        raw_input_contents=[x.tobytes()],
    )


def _set_param(p: oip.InferParameter, value: object) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def oip_case(rng: random.Random) -> Case:
    kind = rng.choice(
        [
            "datatype",
            "shape",
            "raw",
            "contents",
            "params",
            "outputs",
            "inputs",
            "model",
            "nan",
            "batch",
            "meta",
        ]
    )
    req = _oip_valid(rng, rng.choice(list(MODELS)))
    inp = req.inputs[0]
    codes = frozenset({Code.INVALID_ARGUMENT})
    words: tuple[str, ...] = ("inputs[0]",)
    if kind == "datatype":
        inp.datatype = rng.choice(["BYTES", "FP8", "", "fp32", "UINT64", _text(rng, 8)])
        words = ("datatype",)
    elif kind == "shape":
        bad = list(inp.shape)
        choice = rng.randrange(3)
        if choice == 0:
            bad[rng.randrange(4)] = rng.choice([0, -1, -(2**40)])
        elif choice == 1:
            bad = rng.choice([[2**31] * 4, [1, 3, 2**40, 2**40]])
            codes = frozenset({Code.RESOURCE_EXHAUSTED})
        else:
            bad = rng.choice([[1, 3, 32, 32], [3 * 64 * 64], [1, 1, 1, 3, 64, 64]])
            codes = frozenset({Code.INVALID_ARGUMENT})
        inp.ClearField("shape")
        inp.shape.extend(bad)
    elif kind == "raw":
        if rng.random() < 0.5:
            req.raw_input_contents[0] = req.raw_input_contents[0][: -rng.randrange(1, 64)]
        else:
            req.raw_input_contents.append(b"\0" * 16)
        words = ("raw_input_contents", "inputs[0]")
    elif kind == "contents":
        req.ClearField("raw_input_contents")
        if rng.random() < 0.5:
            inp.contents.int_contents.extend([1, 2, 3])  # FP32 takes fp32_contents
        else:
            inp.contents.fp32_contents.extend([0.5] * rng.randrange(0, 100))  # wrong count
        words = ("contents",)
    elif kind == "params":
        name, value, codes, words = rng.choice(
            [
                ("bogus", 1, codes, ("parameter",)),
                ("explainer", 3, codes, ("explainer",)),
                ("explainer", "nope", frozenset({Code.NOT_FOUND}), ("method",)),
                ("target", "three", codes, ("target",)),
                ("target", 2**40, codes, ("target",)),
                ("timeout", -5, codes, ("timeout",)),
                (
                    "samples",
                    10**6,
                    frozenset({Code.RESOURCE_EXHAUSTED, Code.INVALID_ARGUMENT}),
                    ("samples",),
                ),
                ("steps", 1.5, codes, ("steps",)),
                ("layer", "nope", codes, ("layer", "explainer", "method")),
            ]
        )
        _set_param(req.parameters[name], value)
        if name not in ("explainer", "bogus", "timeout") and rng.random() < 0.7:
            req.parameters["explainer"].string_param = "integrated_gradients"
            if name == "layer":
                req.parameters["explainer"].string_param = "gradcam"
                codes = frozenset({Code.NOT_FOUND, Code.INVALID_ARGUMENT})
    elif kind == "outputs":
        out = req.outputs.add(name=rng.choice(["probabilities", "", "explanation", "LOGITS"]))
        if rng.random() < 0.3:
            out.parameters["classification"].int64_param = 3
        words = ("output",)
    elif kind == "inputs":
        if rng.random() < 0.5:
            req.ClearField("inputs")
            req.ClearField("raw_input_contents")
        else:
            req.inputs.append(req.inputs[0])
            req.raw_input_contents.append(req.raw_input_contents[0])
        words = ("input",)
    elif kind == "model":
        if rng.random() < 0.5:
            req.model_name = rng.choice(["", "nope", "tiny/1", _text(rng, 20)])
        else:
            req.model_version = rng.choice(["2", "0", "latest", "-1"])
        codes, words = frozenset({Code.NOT_FOUND}), ("model", "version")
    elif kind == "nan":
        x = np.frombuffer(req.raw_input_contents[0], dtype="<f4").copy()
        x[rng.randrange(x.size)] = rng.choice([np.nan, np.inf])
        req.raw_input_contents[0] = x.tobytes()
        words = ("nan",)
    elif kind == "batch":
        req = _oip_valid(rng, "tinyts", LIMITS["max_queue"] + 1)
        req.parameters["explainer"].string_param = "saliency"
        codes = frozenset({Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED})
        words = ("images", "at most", "elements", "larger than max")
    else:  # metadata RPCs
        rpc = OIP_PREFIX + rng.choice(["ModelMetadata", "ModelReady"])
        meta = oip.ModelMetadataRequest(
            name=rng.choice(["", "nope", "TINY", _text(rng, 30)]), version=""
        )
        if rng.random() < 0.4:
            meta = oip.ModelMetadataRequest(name="tiny", version=rng.choice(["2", "x", "01"]))
        return Case(
            "oip.meta",
            rpc,
            meta.SerializeToString(),
            frozenset({Code.NOT_FOUND}),
            ("model", "name"),
        )
    return Case(f"oip.{kind}", INFER, req.SerializeToString(), codes, words)


# --------------------------------------------------------------------------------------------
# Raw bytes, auth, oversized, streams
# --------------------------------------------------------------------------------------------

# RPCs that take an empty request: any bytes that happen to parse are a valid call
_EMPTY_OK = {
    LIST,
    OIP_PREFIX + "ServerLive",
    OIP_PREFIX + "ServerReady",
    OIP_PREFIX + "ServerMetadata",
}


def raw_case(rng: random.Random) -> Case:
    rpc = rng.choice([*EVERY_RPC, REFLECTION, *HEALTH])
    kind = rng.choice(["random", "truncated", "appended"])
    valid = _valid(rng).SerializeToString() if rpc in (EXPLAIN, STREAM) else b"\x0a\x04tiny"
    if kind == "random":
        data = rng.randbytes(rng.randrange(1, 512))
    elif kind == "truncated":
        data = valid[: rng.randrange(1, max(2, len(valid)))]
    else:
        data = valid + rng.randbytes(rng.randrange(1, 64))
    # bytes may happen to parse (protobuf skips unknown fields): then it is a request with odd
    # fields, refused by validation, or (for RPCs without fields, or a cut that ends on a
    # field boundary) a valid call
    codes = REFUSED | {Code.OK}
    if rpc in HEALTH:  # an unknown service name is NOT_FOUND; List is not implemented
        codes |= {Code.UNIMPLEMENTED}
    payload: bytes | list[bytes] = [data] if rpc in STREAMING else data
    return Case(f"raw.{kind}", rpc, payload, frozenset(codes), ())


def auth_case(rng: random.Random) -> Case:
    rpc = rng.choice(EVERY_RPC)
    token = rng.choice(
        [
            None,
            "",
            "Bearer",
            "Bearer ",
            f"Bearer {TOKEN}x",
            f"Bearer {TOKEN[:-1]}",
            f"bearer  {TOKEN[1:]}",
            f"Basic {TOKEN}",
            f"{TOKEN}",
            f"Bearer {'A' * rng.randrange(100, 4000)}",
            f"Bearer {_ascii(rng, rng.randrange(1, 64))}",
        ]
    )
    payload: bytes | list[bytes]
    payload = _valid(rng).SerializeToString() if rpc in (EXPLAIN, STREAM) else b""
    if rpc in STREAMING:
        payload = [payload]
    return Case(
        "auth.token", rpc, payload, frozenset({Code.UNAUTHENTICATED}), ("bearer token",), token
    )


def _ascii(rng: random.Random, n: int) -> str:
    return "".join(chr(rng.randrange(33, 127)) for _ in range(n))


def oversized_case(rng: random.Random) -> Case:
    req = _valid(rng)
    req.tensor.data = bytes(LIMITS["max_message_bytes"] + rng.randrange(1, 1 << 16))
    return Case(
        "oversized",
        rng.choice([EXPLAIN, INFER]) if rng.random() < 0.2 else EXPLAIN,
        req.SerializeToString(),
        frozenset({Code.RESOURCE_EXHAUSTED}),
        ("larger than max", "message"),
    )


def stream_case(rng: random.Random) -> Case:
    items: list[Case] = []
    for _ in range(rng.randrange(2, 7)):
        family, req, codes, words = _weighted(rng, EXPLAIN_MUTATIONS)(rng)
        items.append(Case(family, STREAM, req.SerializeToString(), codes, words))
    payload = [c.payload for c in items if isinstance(c.payload, bytes)]
    return Case("stream", STREAM, payload, frozenset({Code.OK}), (), items=items)


def _weighted(rng: random.Random, options: list[tuple[Callable, int]]) -> Callable:
    total = sum(w for _, w in options)
    pick = rng.randrange(total)
    for fn, w in options:
        if pick < w:
            return fn
        pick -= w
    raise AssertionError


def _explain_case(rng: random.Random) -> Case:
    family, req, codes, words = _weighted(rng, EXPLAIN_MUTATIONS)(rng)
    return Case(family, EXPLAIN, req.SerializeToString(), codes, words)


FAMILIES: list[tuple[Callable[[random.Random], Case], int]] = [
    (_explain_case, 60),
    (oip_case, 15),
    (raw_case, 10),
    (auth_case, 8),
    (stream_case, 5),
    (oversized_case, 1),
]


def generate(seed: int, n: int) -> list[Case]:
    """``n`` cases from ``seed`` (the same seed gives the same cases)."""
    rng = random.Random(seed)
    return [_weighted(rng, FAMILIES)(rng) for _ in range(n)]
