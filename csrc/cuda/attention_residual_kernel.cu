// xai_serve::attention_residual on CUDA tensors (see reference.py:attention_residual_reference).
//
// A selection is what this op is made of, and on a GPU ATen's topk (radix select) already
// runs it at memory speed, so this registration composes ATen ops -- the reference's maths
// (which of several equal entries are dropped is topk's choice) -- rather than a kernel of its
// own. It exists so that a direct torch.ops call on a CUDA tensor dispatches like every op.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "xai_serve.h"

namespace xai_serve {
namespace {

at::Tensor attention_residual_cuda(const at::Tensor& attention, int64_t drop) {
  check_attention_residual(attention, drop);
  const c10::cuda::CUDAGuard guard(attention.device());
  const int64_t m = attention.size(0), n = attention.size(1);
  at::Tensor a = attention.contiguous();
  if (a.numel() == 0) return a.clone();
  if (drop > 0) {
    at::Tensor flat = a.reshape({m, n * n});
    at::Tensor mask;
    if (2 * drop <= n * n) {
      at::Tensor low = std::get<1>(flat.topk(drop, 1, /*largest=*/false));
      mask = at::zeros_like(flat, flat.options().dtype(at::kBool)).scatter_(1, low, true);
    } else {
      at::Tensor high = std::get<1>(flat.topk(n * n - drop, 1, /*largest=*/true));
      mask = at::ones_like(flat, flat.options().dtype(at::kBool)).scatter_(1, high, false);
    }
    mask.select(1, 0).fill_(false);
    a = flat.masked_fill(mask, 0.0).view({m, n, n});
  }
  at::Tensor r = a * 0.5 + at::eye(n, a.options()) * 0.5;
  return r / r.sum(-1, /*keepdim=*/true);
}

}  // namespace
}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CUDA, m) {
  m.impl("attention_residual", &xai_serve::attention_residual_cuda);
}
