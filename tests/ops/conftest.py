"""Backends, devices and tolerances shared by the op tests."""

from __future__ import annotations

import os

import pytest
import torch

from xai_serve import ops

HAS_CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The one tolerance table, by the dtype the result is rounded to. float32 allows for another
# summation order (split reductions, atomics); the half types allow one rounding step of their
# own on top of a float32 result that may differ in its last bit.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}


def kernel_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs of every kernel backend that can run here."""
    info = ops.backend_info()["available"]
    pairs = []
    if info["cpu"]:
        pairs.append(("cpu", "cpu"))
    if info["triton"]:
        pairs.append(("triton", "cuda" if HAS_CUDA else "cpu"))
    if info["cuda"]:
        pairs.append(("cuda", "cuda"))
    return pairs


def backend_params() -> list:
    marks = {"cuda": [pytest.mark.cuda], "triton": [pytest.mark.cuda] if HAS_CUDA else []}
    return [pytest.param(b, d, id=f"{b}-{d}", marks=marks.get(b, [])) for b, d in kernel_backends()]


def slow_backend(backend: str) -> bool:
    """Triton under the CPU interpreter is slow: such runs get the small shapes only."""
    return backend == "triton" and INTERPRETED


def assert_matches(out: torch.Tensor, ref: torch.Tensor, scale: float = 1.0) -> None:
    """``out`` equals the reference within the table's tolerance (``atol`` times ``scale``)."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert out.dtype == ref.dtype, (out.dtype, ref.dtype)
    assert out.device == ref.device
    tol = TOL[ref.dtype]
    torch.testing.assert_close(out, ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1.0))
