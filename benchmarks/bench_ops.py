"""Op benchmarks: each kernel backend against the PyTorch reference, same inputs, same run.

Run through ``make bench`` (``python -m benchmarks.run``), which turns the timings into ratios
and writes ``benchmarks/results/<date>-<device>.{json,md}``. Each case's implementations are
collected next to each other, so the reference and the kernels are timed minutes apart at most
on a machine whose speed drifts.

On a GPU every timed round launches the op ``calls`` times and then synchronises once; the
runner divides by ``calls`` (extra_info) so that launch-queue effects do not hide the kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from xai_serve import ops

HAS_CUDA = torch.cuda.is_available()
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class Case:
    name: str
    op: str
    device: str
    make: Callable[[str], dict]
    # bytes that must cross memory at least once: inputs read + output written
    traffic: Callable[[dict], int]
    target: str


def grid_segments(b: int, h: int, w: int, s: int, device: str) -> torch.Tensor:
    side = round(s**0.5)
    ys, xs = torch.arange(h) * side // h, torch.arange(w) * side // w
    seg = (ys[:, None] * side + xs[None, :]).expand(b, h, w)
    return seg.to(device=device, dtype=torch.int32).contiguous()


def _cam(b: int, k: int, dtype: torch.dtype) -> Callable[[str], dict]:
    def make(device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        return {
            "activations": torch.randn(b, k, 7, 7, generator=g).to(device, dtype),
            "weights": torch.randn(b, k, generator=g).to(device, dtype),
            "size": (224, 224),
        }

    return make


def _cam_traffic(a: dict) -> int:
    acts = a["activations"]
    out = acts.shape[0] * a["size"][0] * a["size"][1] * 4
    return acts.numel() * acts.element_size() + out


def _mask(
    b: int, n: int, s: int, dtype: torch.dtype, normalize: bool, channels_last: bool = False
) -> Callable[[str], dict]:
    def make(device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        args = {
            "images": torch.rand(b, 3, 224, 224, generator=g).to(device, dtype),
            "segments": grid_segments(b, 224, 224, s, device),
            "keep": (torch.rand(b, n, s, generator=g) > 0.5).to(device),
            "baseline": 0.0,
            "channels_last": channels_last,
        }
        if normalize:
            args["mean"] = torch.tensor(IMAGENET_MEAN, device=device)
            args["std"] = torch.tensor(IMAGENET_STD, device=device)
        return args

    return make


def _mask_traffic(a: dict) -> int:
    img, keep = a["images"], a["keep"]
    out = img.numel() * keep.shape[1] * img.element_size()
    return img.numel() * img.element_size() + a["segments"].numel() * 4 + keep.numel() + out


def _segmean(b: int, s: int) -> Callable[[str], dict]:
    def make(device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        return {
            "images": torch.rand(b, 3, 224, 224, generator=g).to(device),
            "segments": grid_segments(b, 224, 224, s, device),
            "num_segments": s,
        }

    return make


def _segmean_traffic(a: dict) -> int:
    img = a["images"]
    return img.numel() * 4 + a["segments"].numel() * 4 + img.shape[0] * 3 * a["num_segments"] * 4


def _residual(m: int, n: int, ratio: float) -> Callable[[str], dict]:
    def make(device: str) -> dict:
        g = torch.Generator().manual_seed(0)
        heads = torch.softmax(torch.randn(m, 6, n, n, generator=g) * 3.0, dim=-1)
        return {"attention": heads.mean(dim=1).to(device), "discard_ratio": ratio}

    return make


def _residual_traffic(a: dict) -> int:
    return 2 * a["attention"].numel() * 4


F32, BF16 = torch.float32, torch.bfloat16
CASES = [
    Case(
        "cam_fuse B=32 K=2048 7x7->224x224 fp32",
        "cam_fuse",
        "cpu",
        _cam(32, 2048, F32),
        _cam_traffic,
        ">= 2x reference",
    ),
    Case(
        "superpixel_mask B=1 N=256 S=100 224x224 fp32",
        "superpixel_mask",
        "cpu",
        _mask(1, 256, 100, F32, False),
        _mask_traffic,
        ">= 3x reference",
    ),
    Case(
        "superpixel_mask+norm B=1 N=256 S=100 224x224 fp32",
        "superpixel_mask",
        "cpu",
        _mask(1, 256, 100, F32, True),
        _mask_traffic,
        "",
    ),
    Case(
        "superpixel_mask channels_last B=1 N=256 S=100 224x224 fp32",
        "superpixel_mask",
        "cpu",
        _mask(1, 256, 100, F32, False, channels_last=True),
        _mask_traffic,
        ">= 3x reference",
    ),
    Case(
        "superpixel_mask+norm channels_last B=1 N=256 S=100 224x224 fp32",
        "superpixel_mask",
        "cpu",
        _mask(1, 256, 100, F32, True, channels_last=True),
        _mask_traffic,
        "",
    ),
    Case(
        "segment_mean B=8 S=100 224x224 fp32",
        "segment_mean",
        "cpu",
        _segmean(8, 100),
        _segmean_traffic,
        "pays off vs reference?",
    ),
    Case(
        "attention_residual M=96 N=197 discard 0.9 fp32",
        "attention_residual",
        "cpu",
        _residual(96, 197, 0.9),
        _residual_traffic,
        "pays off vs reference?",
    ),
    Case(
        "cam_fuse B=64 K=2048 7x7->224x224 fp32",
        "cam_fuse",
        "cuda",
        _cam(64, 2048, F32),
        _cam_traffic,
        ">= 3x reference",
    ),
    Case(
        "cam_fuse B=64 K=2048 7x7->224x224 bf16",
        "cam_fuse",
        "cuda",
        _cam(64, 2048, BF16),
        _cam_traffic,
        "",
    ),
    Case(
        "superpixel_mask B=8 N=256 S=100 224x224 fp32",
        "superpixel_mask",
        "cuda",
        _mask(8, 256, 100, F32, False),
        _mask_traffic,
        ">= 70% of peak bandwidth",
    ),
    Case(
        "superpixel_mask+norm B=8 N=256 S=100 224x224 bf16",
        "superpixel_mask",
        "cuda",
        _mask(8, 256, 100, BF16, True),
        _mask_traffic,
        ">= 70% of peak bandwidth",
    ),
    Case(
        "superpixel_mask channels_last B=8 N=256 S=100 224x224 fp32",
        "superpixel_mask",
        "cuda",
        _mask(8, 256, 100, F32, False, channels_last=True),
        _mask_traffic,
        ">= 70% of peak bandwidth",
    ),
    Case(
        "superpixel_mask+norm channels_last B=8 N=256 S=100 224x224 bf16",
        "superpixel_mask",
        "cuda",
        _mask(8, 256, 100, BF16, True, channels_last=True),
        _mask_traffic,
        ">= 70% of peak bandwidth",
    ),
    Case(
        "segment_mean B=64 S=100 224x224 fp32",
        "segment_mean",
        "cuda",
        _segmean(64, 100),
        _segmean_traffic,
        "pays off vs reference?",
    ),
    Case(
        "attention_residual M=768 N=197 discard 0.9 fp32",
        "attention_residual",
        "cuda",
        _residual(768, 197, 0.9),
        _residual_traffic,
        "",
    ),
]


def _impls(case: Case) -> list[str]:
    device = case.device
    avail = ops.backend_info()["available"]
    # "limit": allocating and filling an output of the same size (and memory format), no
    # computation -- the floor of a write-bound op that returns a fresh tensor.
    names = ["reference", *(["limit"] if case.op == "superpixel_mask" else [])]
    if device == "cpu" and avail["cpu"]:
        names.append("cpu")
    if device == "cuda":
        names += [n for n in ("cuda", "triton") if avail[n]]
        if case.op == "attention_residual":
            names = [n for n in names if n != "triton"]  # it has no Triton backend
    return names


def params(with_cuda: bool = HAS_CUDA) -> list:
    """The (case, impl) parameters; the CUDA cases (only ``with_cuda``) are marked ``cuda``, so
    that ``-m cuda`` selects them (``benchmarks/gpu_check.py``)."""
    return [
        pytest.param(
            case,
            impl,
            id=f"{case.name}|{impl}",
            marks=[pytest.mark.cuda] if case.device == "cuda" else [],
        )
        for case in CASES
        if case.device == "cpu" or with_cuda
        for impl in _impls(case)
    ]


PARAMS = params()


@pytest.mark.parametrize(("case", "impl"), PARAMS)
def test_op(benchmark, case: Case, impl: str) -> None:
    args = case.make(case.device)
    op = getattr(ops, case.op)
    # On a GPU the data-dependent checks (one synchronisation each) are left out of the timed
    # calls: a caller checks a request's segments once, not per chunk of coalitions.
    checked = case.op in ("superpixel_mask", "segment_mean")
    opts = {"validate": False} if case.device == "cuda" and checked else {}
    calls = 20 if case.device == "cuda" else 1

    def call() -> torch.Tensor:
        if impl == "limit":
            images, n = args["images"], args["keep"].shape[1]
            shape = (images.shape[0] * n, *images.shape[1:])
            fmt = torch.channels_last if args["channels_last"] else torch.contiguous_format
            out = torch.empty(shape, dtype=images.dtype, device=images.device, memory_format=fmt)
            return out.fill_(0.5)
        return op(**args, **opts, backend=impl)

    def run() -> torch.Tensor:
        for _ in range(calls):
            out = call()
        if case.device == "cuda":
            torch.cuda.synchronize()
        return out

    out = run()  # warm-up: caches, Triton compilation, allocator
    ref = ops.__dict__[f"{case.op}_reference"]  # sanity: the timed output is the right one
    if case.op == "superpixel_mask":
        expected = ref(
            args["images"],
            args["segments"],
            args["keep"],
            None,
            0.0,
            args.get("mean"),
            args.get("std"),
            args["channels_last"],
        )
        layout = torch.channels_last if args["channels_last"] else torch.contiguous_format
        assert out.is_contiguous(memory_format=layout)
    elif case.op == "attention_residual":
        expected = ops.attention_residual(**args, backend="reference")
    else:
        expected = ref(*[v for k, v in args.items()])
    if impl == "limit":
        assert out.shape == expected.shape
    else:
        torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=1e-2)
    benchmark.group = case.name
    benchmark.extra_info.update(
        op=case.op,
        impl=impl,
        device=case.device,
        calls=calls,
        traffic_bytes=case.traffic(args),
        target=case.target,
    )
    benchmark.pedantic(run, rounds=15 if case.device == "cpu" else 30, warmup_rounds=1)
