// cam_fuse on the CPU: weighted channel sum -> ReLU -> bilinear upsample -> min-max normalise.
//
// Per image, in one task of at::parallel_for: the low-resolution map [h, w] is accumulated in
// float32, every source row is interpolated horizontally once ([h, W], tiny), and each output
// row is one vectorisable blend of two such rows. With normalisation a first pass over the rows
// finds the extremes without storing anything, and the second writes every output pixel once,
// already normalised. No [B, K, H, W] tensor is ever made.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "xai_serve.h"

namespace xai_serve {
namespace {

// Source indices and weights of one axis, as PyTorch's bilinear (align_corners=False) computes
// them: float arithmetic, negative source positions clamped to 0. Values are interpolated as
// a + t * (b - a), so a constant map stays exactly constant (see bilinear_upsample_reference).
struct AxisInterp {
  std::vector<int64_t> i0, i1;
  std::vector<float> l1;

  AxisInterp(int64_t in, int64_t out) : i0(out), i1(out), l1(out) {
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    for (int64_t d = 0; d < out; ++d) {
      float src = scale * (static_cast<float>(d) + 0.5f) - 0.5f;
      if (src < 0.f) src = 0.f;
      const int64_t lo = std::min(static_cast<int64_t>(src), in - 1);
      const float lambda = std::min(std::max(src - static_cast<float>(lo), 0.f), 1.f);
      i0[d] = lo;
      i1[d] = lo + (lo < in - 1 ? 1 : 0);
      l1[d] = lambda;
    }
  }
};

// Min and max over the upsampled map, evaluated row by row from the horizontally interpolated
// source rows, in independent lanes so the loop vectorises.
std::pair<float, float> upsampled_extremes(const float* rows, const AxisInterp& ys, int64_t W) {
  constexpr int kLanes = 16;
  float lo[kLanes], hi[kLanes];
  std::fill(lo, lo + kLanes, std::numeric_limits<float>::infinity());
  std::fill(hi, hi + kLanes, -std::numeric_limits<float>::infinity());
  const int64_t H = static_cast<int64_t>(ys.i0.size());
  for (int64_t y = 0; y < H; ++y) {
    const float* r0 = rows + ys.i0[y] * W;
    const float* r1 = rows + ys.i1[y] * W;
    const float t = ys.l1[y];
    int64_t x = 0;
    for (; x + kLanes <= W; x += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const float v = r0[x + l] + t * (r1[x + l] - r0[x + l]);
        lo[l] = v < lo[l] ? v : lo[l];
        hi[l] = v > hi[l] ? v : hi[l];
      }
    }
    for (; x < W; ++x) {
      const float v = r0[x] + t * (r1[x] - r0[x]);
      lo[0] = v < lo[0] ? v : lo[0];
      hi[0] = v > hi[0] ? v : hi[0];
    }
  }
  return {*std::min_element(lo, lo + kLanes), *std::max_element(hi, hi + kLanes)};
}

template <typename scalar_t>
void channel_sum(const scalar_t* act, const scalar_t* wgt, bool elementwise, int64_t K,
                 int64_t hw, float* acc) {
  std::fill(acc, acc + hw, 0.f);
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* a = act + k * hw;
    if (elementwise) {
      const scalar_t* wk = wgt + k * hw;
      for (int64_t p = 0; p < hw; ++p) acc[p] += static_cast<float>(wk[p]) * static_cast<float>(a[p]);
    } else {
      const float wk = static_cast<float>(wgt[k]);
      for (int64_t p = 0; p < hw; ++p) acc[p] += wk * static_cast<float>(a[p]);
    }
  }
}

// The same sum for channels-last activations ([h, w, K] per image): one dot product over the
// channels per position, reading the activations once, in order (no NCHW copy first).
// Elementwise weights must then be channels-last too.
template <typename scalar_t>
void channel_sum_cl(const scalar_t* act, const scalar_t* wgt, bool elementwise, int64_t K,
                    int64_t hw, float* acc) {
  constexpr int kLanes = 16;  // independent partial sums, so that the loop vectorises
  for (int64_t p = 0; p < hw; ++p) {
    const scalar_t* a = act + p * K;
    const scalar_t* wk = elementwise ? wgt + p * K : wgt;
    float part[kLanes] = {};
    int64_t k = 0;
    for (; k + kLanes <= K; k += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        part[l] += static_cast<float>(wk[k + l]) * static_cast<float>(a[k + l]);
      }
    }
    float sum = 0.f;
    for (; k < K; ++k) sum += static_cast<float>(wk[k]) * static_cast<float>(a[k]);
    for (int l = 0; l < kLanes; ++l) sum += part[l];
    acc[p] = sum;
  }
}

at::Tensor cam_fuse_cpu(const at::Tensor& activations, const at::Tensor& weights,
                        c10::IntArrayRef size, bool relu, bool normalize) {
  check_cam_fuse(activations, weights, size);
  const int64_t B = activations.size(0), K = activations.size(1);
  const int64_t h = activations.size(2), w = activations.size(3);
  const int64_t H = size[0], W = size[1];
  at::Tensor out = at::empty({B, H, W}, activations.options().dtype(at::kFloat));
  if (B == 0) return out;

  const bool elementwise = weights.dim() == 4;
  // Channels-last activations (a channels-last model's layer) are read in place when the
  // weights are per channel, or elementwise in the same layout; otherwise both go NCHW.
  const auto cl = at::MemoryFormat::ChannelsLast;
  const bool channels_last = K > 1 && h * w > 1 && activations.is_contiguous(cl) &&
                             (!elementwise || weights.is_contiguous(cl));
  const at::Tensor act = channels_last ? activations : activations.contiguous();
  const at::Tensor wgt = channels_last && elementwise ? weights : weights.contiguous();
  const AxisInterp ys(h, H), xs(w, W);
  float* out_data = out.data_ptr<float>();

  XAI_SERVE_DISPATCH_FLOATS(act.scalar_type(), "cam_fuse_cpu", [&] {
    const scalar_t* act_data = act.const_data_ptr<scalar_t>();
    const scalar_t* wgt_data = wgt.const_data_ptr<scalar_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> low(h * w), rows(h * W);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t wstride = elementwise ? K * h * w : K;
        if (channels_last) {
          channel_sum_cl(act_data + b * K * h * w, wgt_data + b * wstride, elementwise, K,
                         h * w, low.data());
        } else {
          channel_sum(act_data + b * K * h * w, wgt_data + b * wstride, elementwise, K, h * w,
                      low.data());
        }
        if (relu) {
          for (float& v : low) v = std::max(v, 0.f);
        }
        for (int64_t y = 0; y < h; ++y) {
          const float* src = low.data() + y * w;
          float* row = rows.data() + y * W;
          for (int64_t x = 0; x < W; ++x) {
            const float a = src[xs.i0[x]];
            row[x] = a + xs.l1[x] * (src[xs.i1[x]] - a);
          }
        }
        // Pass 1 finds the extremes without storing; pass 2 writes each output once.
        float* img = out_data + b * H * W;
        float lo = 0.f, scale = 1.f;
        if (normalize) {
          const auto [mn, mx] = upsampled_extremes(rows.data(), ys, W);
          const float span = mx - mn;
          lo = mn;
          scale = span > 0.f ? 1.f / span : 0.f;
        }
        for (int64_t y = 0; y < H; ++y) {
          const float* r0 = rows.data() + ys.i0[y] * W;
          const float* r1 = rows.data() + ys.i1[y] * W;
          const float t = ys.l1[y];
          float* dst = img + y * W;
          if (normalize) {
            for (int64_t x = 0; x < W; ++x) dst[x] = (r0[x] + t * (r1[x] - r0[x]) - lo) * scale;
          } else {
            for (int64_t x = 0; x < W; ++x) dst[x] = r0[x] + t * (r1[x] - r0[x]);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CPU, m) { m.impl("cam_fuse", &xai_serve::cam_fuse_cpu); }
