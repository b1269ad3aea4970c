"""Builds the one compiled extension, ``xai_serve._C``.

C++ CPU kernels are always built. CUDA kernels are built when a CUDA toolkit is found and either
a GPU is visible or ``XAI_SERVE_FORCE_CUDA=1`` (CI sets it so a CUDA compile error fails there).
``TORCH_CUDA_ARCH_LIST`` picks the architectures; without it and without a visible GPU the
default below is used. Package metadata lives in pyproject.toml.
"""

from __future__ import annotations

import glob
import os
import subprocess

from setuptools import setup

# torch guesses CUDA_HOME from `which nvcc`; on machines where nvcc is a symlink outside the
# toolkit that guess cannot link -lcudart, so prefer the toolkit's own folder.
if "CUDA_HOME" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch
from torch.utils import cpp_extension

DEFAULT_ARCHS = "8.0;9.0+PTX"


def _nvcc_version(cuda_home: str) -> str:
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
    for token in out.replace(",", " ").split():
        if token.startswith("V") and token[1:2].isdigit():
            return token[1:]
    return ""


def _cuda_library_includes() -> list[str]:
    """Include folders for the CUDA math-library headers ATen's CUDA headers need.

    A minimal toolkit (nvcc and the runtime only) lacks cusparse.h / cublas_v2.h; the NVIDIA
    wheels that torch depends on ship them under site-packages/nvidia/*/include.
    """
    assert cpp_extension.CUDA_HOME is not None
    if os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "include", "cusparse.h")):
        return []
    site_packages = os.path.dirname(os.path.dirname(torch.__file__))
    pattern = os.path.join(site_packages, "nvidia", "**", "include", "cusparse.h")
    return sorted(os.path.dirname(h) for h in glob.glob(pattern, recursive=True))


def _want_cuda() -> tuple[bool, str]:
    forced = os.environ.get("XAI_SERVE_FORCE_CUDA", "0") == "1"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if torch.version.cuda is None:
        return False, "this torch build has no CUDA support"
    if torch.cuda.is_available():
        return True, "a GPU is visible"
    if forced:
        return True, "XAI_SERVE_FORCE_CUDA=1"
    return False, "no GPU visible (set XAI_SERVE_FORCE_CUDA=1 to build the CUDA kernels anyway)"


def _extension():
    sources = ["csrc/register.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 or C++20)
    macros = [("XAI_SERVE_TORCH_VERSION", f'"{torch.__version__}"')]
    with_cuda, why = _want_cuda()
    if not with_cuda:
        print(f"xai_serve: building C++ CPU kernels only: {why}")
        return cpp_extension.CppExtension(
            "xai_serve._C",
            sources,
            include_dirs=[os.path.abspath("csrc")],
            define_macros=macros,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
        )
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "detected from the visible GPU")
    version = _nvcc_version(cpp_extension.CUDA_HOME) or str(torch.version.cuda)
    print(f"xai_serve: building C++ CPU and CUDA kernels ({why}); CUDA {version}, archs: {archs}")
    macros += [
        ("XAI_SERVE_WITH_CUDA", "1"),
        ("XAI_SERVE_CUDA_VERSION", f'"{version}"'),
        ("XAI_SERVE_CUDA_ARCHS", f'"{archs}"'),
    ]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    includes = [os.path.abspath("csrc"), *_cuda_library_includes()]
    if len(includes) > 1:
        print(f"xai_serve: CUDA library headers from {includes[1:]}")
    return cpp_extension.CUDAExtension(
        "xai_serve._C",
        sources,
        include_dirs=includes,
        define_macros=macros,
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
