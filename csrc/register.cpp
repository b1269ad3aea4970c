// Op schemas (one TORCH_LIBRARY block) and the Python module's build information.
//
// Kernels live in cpu/<op>_kernel.cpp and cuda/<op>_kernel.cu, each registering itself with
// TORCH_LIBRARY_IMPL for its dispatch key, so torch.ops.xai_serve.<op> dispatches by device.
#include <torch/extension.h>
#include <torch/library.h>

#ifndef XAI_SERVE_TORCH_VERSION
#define XAI_SERVE_TORCH_VERSION ""
#endif
#ifndef XAI_SERVE_CUDA_VERSION
#define XAI_SERVE_CUDA_VERSION ""
#endif
#ifndef XAI_SERVE_CUDA_ARCHS
#define XAI_SERVE_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(xai_serve, m) {
  m.def(
      "cam_fuse(Tensor activations, Tensor weights, int[2] size, bool relu=True, "
      "bool normalize=True) -> Tensor");
  m.def(
      "superpixel_mask(Tensor images, Tensor segments, Tensor keep, Tensor? baseline=None, "
      "float fill=0.0, Tensor? mean=None, Tensor? std=None, bool check_segments=True, "
      "bool channels_last=False) -> Tensor");
  m.def(
      "segment_mean(Tensor images, Tensor segments, int num_segments, "
      "bool check_segments=True) -> Tensor");
  m.def("attention_residual(Tensor attention, int drop) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  pybind11::list backends;
  backends.append("cpu");
#ifdef XAI_SERVE_WITH_CUDA
  backends.append("cuda");
  info["cuda_version"] = XAI_SERVE_CUDA_VERSION;
  info["cuda_archs"] = XAI_SERVE_CUDA_ARCHS;
#else
  info["cuda_version"] = pybind11::none();
  info["cuda_archs"] = pybind11::none();
#endif
  info["backends"] = backends;
  info["torch_version"] = XAI_SERVE_TORCH_VERSION;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xai_serve compiled kernels (ops are registered under torch.ops.xai_serve)";
  m.def("build_info", &build_info,
        "Compiled backends, CUDA version and architectures, torch version built against.");
}
