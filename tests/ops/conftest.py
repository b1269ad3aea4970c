"""Backends, devices, tolerances and launch recording shared by the op tests."""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType
from typing import Any

import pytest
import torch

from xai_serve import ops

HAS_CUDA = torch.cuda.is_available()
# Whether Triton kernels run on this machine and where. tests/conftest.py is the one place that
# decides on the interpreter (TRITON_INTERPRET=1 when no GPU is visible, before anything imports
# Triton); here the tests ask the library what it made of that instead of reading it again.
TRITON = ops.backend_info()["available"]["triton"]
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
INTERPRETED = TRITON and not HAS_CUDA
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The one tolerance table, by the dtype the result is rounded to. float32 allows for another
# summation order (split reductions, atomics); the half types allow one rounding step of their
# own on top of a float32 result that may differ in its last bit.
TOL = {
    torch.float32: {"rtol": 1e-5, "atol": 1e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}

NEEDS_GPU = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def kernel_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs of every kernel backend that can run here."""
    info = ops.backend_info()["available"]
    pairs = []
    if info["cpu"]:
        pairs.append(("cpu", "cpu"))
    if info["triton"]:
        pairs.append(("triton", TRITON_DEVICE))
    if info["cuda"]:
        pairs.append(("cuda", "cuda"))
    return pairs


def backend_params() -> list:
    marks = {"cuda": [pytest.mark.cuda], "triton": [pytest.mark.cuda] if HAS_CUDA else []}
    return [pytest.param(b, d, id=f"{b}-{d}", marks=marks.get(b, [])) for b, d in kernel_backends()]


def every_backend_params() -> list:
    """(backend, device) for all four backends, each on the device it takes, whether or not it
    can run here: for the input checks, which come before a backend is picked. The ``cuda``
    backend gets CUDA tensors and skips without a GPU; Triton gets the device it runs on."""
    gpu = [pytest.mark.cuda, NEEDS_GPU]
    return [
        pytest.param("reference", "cpu", id="reference-cpu"),
        pytest.param("cpu", "cpu", id="cpu-cpu"),
        pytest.param(
            "triton", TRITON_DEVICE, id=f"triton-{TRITON_DEVICE}", marks=gpu if HAS_CUDA else []
        ),
        pytest.param("cuda", "cuda", id="cuda-cuda", marks=gpu),
    ]


def on_device(value: Any, device: str) -> Any:
    """``value`` with a CPU tensor moved to ``device``; anything else (a number, a tensor already
    on another device such as ``meta``) unchanged."""
    if isinstance(value, torch.Tensor) and value.device.type == "cpu":
        return value.to(device)
    return value


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


def triton_module(op: str) -> ModuleType:
    """The module ``xai_serve.ops.triton.<op>`` (kernels and launcher); skips without Triton.

    (``xai_serve.ops.triton.<op>`` as an attribute is the public function, not the module.)
    """
    if not TRITON:
        pytest.skip("triton cannot run here (not installed, or no GPU and no TRITON_INTERPRET)")
    return importlib.import_module(f"xai_serve.ops.triton.{op}")


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch: its grid and every argument by name, constexprs included."""

    grid: tuple[int, ...]
    args: dict[str, Any]


def record_launches(
    monkeypatch: pytest.MonkeyPatch, module: ModuleType, *kernels: str
) -> dict[str, list[Launch]]:
    """Record the launches of ``module``'s ``@triton.jit`` kernels named ``kernels``.

    Each kernel is replaced (for the test) by a wrapper that still launches it; the returned
    lists fill as the launcher runs, so a test can assert the grid and block sizes that really
    ran instead of trusting its own arithmetic.
    """
    launches: dict[str, list[Launch]] = {name: [] for name in kernels}

    class _Recorder:
        def __init__(self, name: str, kernel: Any) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: tuple[int, ...]) -> Any:
            run = self.kernel[grid]

            def launch(*args: Any, **kwargs: Any) -> Any:
                named = dict(zip(self.kernel.arg_names, args, strict=False)) | kwargs
                launches[self.name].append(Launch(tuple(grid), named))
                return run(*args, **kwargs)

            return launch

    for name in kernels:
        monkeypatch.setattr(module, name, _Recorder(name, getattr(module, name)))
    return launches
