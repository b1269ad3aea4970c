// attention_residual on the CPU: per matrix (one task each), the `drop` smallest entries found
// by a selection (a histogram of the values' top bits, then nth_element within one bin: linear
// time, where topk sorts), then rownorm(0.5 * kept + 0.5 * I) written in one pass per row.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xai_serve.h"

namespace xai_serve {
namespace {

// The float32 bit pattern as an unsigned key in the floats' order (negatives reversed).
inline uint32_t order_key(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The k-th smallest (0-based) of x[0..n): a 4096-bin histogram of the keys' top 12 bits finds
// the bin that holds it, and nth_element runs on that bin's values only (a few per cent of
// them for attention probabilities), instead of on a copy of all n.
float kth_smallest(const float* x, int64_t n, int64_t k, std::vector<int64_t>& bins,
                   std::vector<float>& bucket) {
  bins.assign(4096, 0);
  for (int64_t i = 0; i < n; ++i) ++bins[order_key(x[i]) >> 20];
  int64_t before = 0, bin = 0;
  while (before + bins[bin] <= k) before += bins[bin++];
  bucket.clear();
  for (int64_t i = 0; i < n; ++i) {
    if ((order_key(x[i]) >> 20) == static_cast<uint32_t>(bin)) bucket.push_back(x[i]);
  }
  const int64_t rank = k - before;
  std::nth_element(bucket.begin(), bucket.begin() + rank, bucket.end());
  return bucket[rank];
}

void attention_residual_impl(const float* src, float* dst, int64_t M, int64_t N, int64_t drop) {
  const int64_t NN = N * N;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> bins;
    std::vector<float> bucket;
    for (int64_t m = begin; m < end; ++m) {
      const float* x = src + m * NN;
      float* y = dst + m * NN;
      // The dropped set: every entry below the drop-th smallest value, and of the entries equal
      // to it the first ones in index order until `drop` are counted. Entry [0, 0] counts but
      // is kept (the class token's attention to itself).
      float threshold = 0.f;
      int64_t equal_left = 0;
      if (drop > 0) {
        threshold = kth_smallest(x, NN, drop - 1, bins, bucket);
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
