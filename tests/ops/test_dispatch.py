"""Backend selection, forcing, fallback without the extension, and build information."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests._peers import REQUIRE_EXTENSIONS_ENV, extensions_required
from tests.ops.conftest import HAS_CUDA
from xai_serve import InvalidInput, Unavailable, ops

BUILT = ops.backend_info()["available"]["cpu"]
OPS = ("attention_residual", "cam_fuse", "segment_mean", "superpixel_mask")


def _cam(device="cpu", **kw):
    return ops.cam_fuse(
        torch.rand(1, 2, 3, 3, device=device), torch.rand(1, 2, device=device), 5, **kw
    )


@pytest.mark.skipif(not BUILT, reason="extension not built")
def test_cpu_tensors_run_the_cpp_kernel_by_default(monkeypatch):
    monkeypatch.delenv("XAI_SERVE_BACKEND", raising=False)
    _cam()
    info = ops.backend_info()
    assert info["last_used"]["cam_fuse"] == "cpu"
    assert info["default"]["cpu"] == "cpu"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv("XAI_SERVE_BACKEND", "reference")
    _cam()
    assert ops.backend_info()["last_used"]["cam_fuse"] == "reference"
    assert ops.backend_info()["forced"] == "reference"
    # an explicit argument wins over the environment
    if BUILT:
        _cam(backend="cpu")
        assert ops.backend_info()["last_used"]["cam_fuse"] == "cpu"


def test_forcing_a_backend_that_cannot_run_says_how_to_fix_it(monkeypatch):
    with pytest.raises(Unavailable, match="takes CUDA tensors"):
        _cam(backend="cuda")
    monkeypatch.setenv("XAI_SERVE_BACKEND", "cuda")
    with pytest.raises(Unavailable, match="XAI_SERVE_BACKEND='cuda' cannot run"):
        _cam()
    # The one test of the library's TRITON_INTERPRET switch (tests/conftest.py sets it for the
    # session when no GPU is visible): without it Triton cannot take CPU tensors.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not HAS_CUDA:
        assert not ops.backend_info()["available"]["triton"]
        with pytest.raises(Unavailable, match="TRITON_INTERPRET=1"):
            _cam(backend="triton")
    # Triton reads the switch as a boolean: the dispatcher and the launchers read it alike.
    from xai_serve.ops.triton_env import triton_interpreting

    installed = importlib.util.find_spec("triton") is not None
    for word, on in (("true", True), ("Yes", True), ("on", True), ("1", True), ("off", False)):
        monkeypatch.setenv("TRITON_INTERPRET", word)
        assert triton_interpreting() is on, word
        if not HAS_CUDA:
            assert ops.backend_info()["available"]["triton"] is (on and installed), word


def test_unknown_backend_is_invalid():
    with pytest.raises(InvalidInput, match="unknown backend 'fast'"):
        _cam(backend="fast")


def test_build_info_describes_the_build():
    info = ops.backend_info()
    if not BUILT:
        assert info["build"] is None and info["extension_error"]
        return
    from xai_serve import _C

    build = _C.build_info()
    assert build == info["build"]
    assert "cpu" in build["backends"]
    assert build["torch_version"] == torch.__version__
    if "cuda" in build["backends"]:
        assert build["cuda_version"] and build["cuda_archs"]
    else:
        assert build["cuda_version"] is None


def _registered_ops() -> list[str]:
    """Every operator of the ``xai_serve`` namespace the dispatcher knows."""
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("xai_serve::"))


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, key)


@pytest.mark.skipif(not BUILT, reason="extension not built")
def test_dispatcher_kernels_agree_with_the_build_info():
    # Every public op is registered, with a CPU kernel, and with a CUDA kernel exactly when the
    # build says it contains the CUDA kernels.
    names = _registered_ops()
    assert {f"xai_serve::{op}" for op in OPS} <= set(names), names
    with_cuda = "cuda" in ops.backend_info()["build"]["backends"]
    for name in names:
        assert _has_kernel(name, "CPU"), f"{name} has no CPU kernel"
        assert _has_kernel(name, "CUDA") == with_cuda, (name, ops.backend_info()["build"])


def test_cuda_build_registers_a_cuda_kernel_for_every_op():
    # CI builds with XAI_SERVE_FORCE_CUDA=1 (no GPU there): the CUDA kernels must have compiled,
    # linked and registered with the dispatcher, not only set the build macro.
    info = ops.backend_info()
    build = info["build"]
    if build is None or "cuda" not in build["backends"]:
        what = (
            f"the extension is not loaded ({info['extension_error']})"
            if build is None
            else "the extension was built without CUDA kernels (no CUDA toolkit, or no GPU and "
            "no XAI_SERVE_FORCE_CUDA=1 at build time)"
        )
        switches = [
            f"{name}=1"
            for name in (REQUIRE_EXTENSIONS_ENV, "XAI_SERVE_FORCE_CUDA")
            if os.environ.get(name) == "1"
        ]
        if extensions_required() or switches:
            pytest.fail(
                f"{' and '.join(switches)} but {what}; rebuild with "
                "`XAI_SERVE_FORCE_CUDA=1 make setup` on a machine with the CUDA toolkit",
                pytrace=False,
            )
        pytest.skip(f"{what}; `XAI_SERVE_FORCE_CUDA=1 make setup` builds them")
    assert build["cuda_version"] and build["cuda_archs"], build
    names = _registered_ops()
    assert {f"xai_serve::{op}" for op in OPS} <= set(names), names
    missing = [name for name in names if not _has_kernel(name, "CUDA")]
    assert not missing, f"built with CUDA, but no CUDA kernel registered for {missing}"


def test_import_never_fails_without_the_extension():
    # A fresh interpreter in which `xai_serve._C` cannot be imported: the ops fall back to the
    # reference and say why; forcing the C++ backend names the command that builds it.
    code = textwrap.dedent(
        """
        import json, sys, torch
        sys.modules["xai_serve._C"] = None  # makes `from xai_serve import _C` raise ImportError
        from xai_serve import ops, Unavailable
        a, w = torch.rand(1, 2, 3, 3), torch.rand(1, 2)
        out = ops.cam_fuse(a, w, 5)
        ok = torch.allclose(out, ops.cam_fuse_reference(a, w, (5, 5)))
        try:
            ops.cam_fuse(a, w, 5, backend="cpu")
            forced = ""
        except Unavailable as exc:
            forced = str(exc)
        info = ops.backend_info()
        print(json.dumps({"ok": ok, "forced": forced, "last": info["last_used"]["cam_fuse"],
                          "error": info["extension_error"], "cpu": info["available"]["cpu"]}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["last"] == "reference" and result["cpu"] is False
    assert "xai_serve._C" in result["error"]
    assert "make setup" in result["forced"]
