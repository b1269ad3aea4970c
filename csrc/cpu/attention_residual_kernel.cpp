// attention_residual on the CPU: per matrix (one task each), the `drop` smallest entries found
// with nth_element on a copy (linear time, where a sort or topk is N^2 log), then
// rownorm(0.5 * kept + 0.5 * I) written in one pass per row, the row still in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "xai_serve.h"

namespace xai_serve {
namespace {

void attention_residual_impl(const float* src, float* dst, int64_t M, int64_t N, int64_t drop) {
  const int64_t NN = N * N;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> copy;
    for (int64_t m = begin; m < end; ++m) {
      const float* x = src + m * NN;
      float* y = dst + m * NN;
      // The dropped set: every entry below the drop-th smallest value, and of the entries equal
      // to it the first ones in index order until `drop` are counted. Entry [0, 0] counts but
      // is kept (the class token's attention to itself).
      float threshold = 0.f;
      int64_t equal_left = 0;
      if (drop > 0) {
        copy.assign(x, x + NN);
        std::nth_element(copy.begin(), copy.begin() + (drop - 1), copy.end());
        threshold = copy[drop - 1];
        int64_t below = 0;
        for (int64_t i = 0; i < NN; ++i) below += x[i] < threshold;
        equal_left = drop - below;
      }
      for (int64_t r = 0; r < N; ++r) {
        const float* xr = x + r * N;
        float* yr = y + r * N;
        float sum = 0.f;
        if (drop > 0) {
          for (int64_t c = 0; c < N; ++c) {
            const float v = xr[c];
            bool keep = v > threshold;
            if (v == threshold && equal_left > 0) {
              --equal_left;
            } else if (v == threshold) {
              keep = true;
            }
            if (r == 0 && c == 0) keep = true;
            const float h = keep ? 0.5f * v : 0.f;
            yr[c] = h;
            sum += h;
          }
        } else {
          for (int64_t c = 0; c < N; ++c) {
            const float h = 0.5f * xr[c];
            yr[c] = h;
            sum += h;
          }
        }
        yr[r] += 0.5f;
        sum += 0.5f;
        const float inv = 1.f / sum;
        for (int64_t c = 0; c < N; ++c) yr[c] *= inv;
      }
    }
  });
}

at::Tensor attention_residual_cpu(const at::Tensor& attention, int64_t drop) {
  check_attention_residual(attention, drop);
  const at::Tensor a = attention.contiguous();
  at::Tensor out = at::empty_like(a, at::MemoryFormat::Contiguous);
  if (out.numel() == 0) return out;
  attention_residual_impl(a.const_data_ptr<float>(), out.data_ptr<float>(), a.size(0), a.size(1),
                          drop);
  return out;
}

}  // namespace
}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CPU, m) {
  m.impl("attention_residual", &xai_serve::attention_residual_cpu);
}
