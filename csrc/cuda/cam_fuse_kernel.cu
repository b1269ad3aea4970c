// CUDA kernels for xai_serve::cam_fuse (see xai_serve/ops/reference.py:cam_fuse_reference).
//
// Three launches, never a [B, K, h, w] intermediate:
//   1. cam_lowres_kernel:   low[b, p] = sum_k w * A[b, k, p] (fp32), ReLU if asked. A block owns
//      up to 32 positions of one image and splits K over 512 / P thread groups, which are then
//      reduced in shared memory.
//   2. cam_upsample_kernel: bilinear upsample (F.interpolate's sample positions and weights,
//      align_corners=False; blended in lerp form like the reference)
//      into the float32 output; with normalisation each block also writes its min and max.
//   3. cam_normalize_kernel (only when normalising): each block folds its image's partial
//      min/max and rescales its own pixels in place.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "xai_serve.h"

// float32, float16 and bfloat16 only (the checks reject the rest; no dead float64 kernels).

namespace xai_serve {
namespace {

constexpr int kLowresThreads = 512;  // positions x k-groups per block in phase 1
constexpr int kLowresTile = 32;      // positions per block in phase 1 (at most)
constexpr int kLowresUnroll = 8;     // independent loads in flight per thread
constexpr int kMapThreads = 256;     // phases 2 and 3
constexpr int kMapPixelsPerThread = 4;
constexpr int64_t kMaxMapBlocks = 1024;  // per image; bounds the partial min/max buffers
constexpr int64_t kMaxGridY = 65535;

// min / max that propagate NaN (like torch.amin / amax), so a NaN map normalises to zeros
// exactly as the reference does.
__device__ __forceinline__ float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }

// Block-wide NaN-propagating min and max; the result is valid in thread 0 only. `scratch` holds
// 2 * 32 floats. The caller must __syncthreads() before `scratch` is reused.
template <int kThreads>
__device__ __forceinline__ void block_min_max(float& lo, float& hi, float* scratch) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be whole warps");
  constexpr int kWarps = kThreads / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    lo = nan_min(lo, __shfl_down_sync(0xffffffffu, lo, offset));
    hi = nan_max(hi, __shfl_down_sync(0xffffffffu, hi, offset));
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    scratch[warp] = lo;
    scratch[32 + warp] = hi;
  }
  __syncthreads();
  if (warp == 0) {
    lo = lane < kWarps ? scratch[lane] : INFINITY;
    hi = lane < kWarps ? scratch[32 + lane] : -INFINITY;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      lo = nan_min(lo, __shfl_down_sync(0xffffffffu, lo, offset));
      hi = nan_max(hi, __shfl_down_sync(0xffffffffu, hi, offset));
    }
  }
}

// Phase 1. grid = (ceil(hw / P), min(B, 65535)), block = kLowresThreads.
// Thread t handles position p = blockIdx.x * P + t % P and channels k = g, g + G, g + 2G, ...
// with g = t / P (G = kLowresThreads / P groups). Consecutive threads read consecutive positions
// of one channel (and, when P == hw, run straight on into the next channel), so loads coalesce.
template <typename scalar_t, bool kElementwise>
__global__ void __launch_bounds__(kLowresThreads)
    cam_lowres_kernel(const scalar_t* __restrict__ act, const scalar_t* __restrict__ wts,
                      float* __restrict__ low, int64_t B, int64_t K, int64_t hw, int P, int G,
                      bool relu) {
  __shared__ float red[kLowresThreads];
  const int t = threadIdx.x;
  const int pl = t % P;
  const int g = t / P;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * P + pl;
  const bool active = g < G && p < hw;
  // Largest power of two below 2 * G, halved: the first stride of the tree over groups.
  int first_stride = 1;
  while (first_stride < G) first_stride <<= 1;
  first_stride >>= 1;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float acc = 0.f;
    if (active) {
      const scalar_t* a = act + b * K * hw + p;
      // Per-channel weights: w[b, k]; elementwise weights: w[b, k, p] (same layout as `act`).
      const scalar_t* wp = kElementwise ? wts + b * K * hw + p : wts + b * K;
      const int64_t wstride = kElementwise ? hw : 1;
      int64_t k = g;
      for (; k + static_cast<int64_t>(kLowresUnroll - 1) * G < K;
           k += static_cast<int64_t>(kLowresUnroll) * G) {
        float av[kLowresUnroll];
        float wv[kLowresUnroll];
#pragma unroll
        for (int u = 0; u < kLowresUnroll; ++u) {
          const int64_t kk = k + static_cast<int64_t>(u) * G;
          av[u] = static_cast<float>(a[kk * hw]);
          wv[u] = static_cast<float>(wp[kk * wstride]);
        }
#pragma unroll
        for (int u = 0; u < kLowresUnroll; ++u) acc += wv[u] * av[u];
      }
      for (; k < K; k += G) {
        acc += static_cast<float>(wp[k * wstride]) * static_cast<float>(a[k * hw]);
      }
    }
    red[t] = acc;
    __syncthreads();
    // Tree over the G groups of each position: red[g * P + pl] += red[(g + s) * P + pl].
    for (int s = first_stride; s > 0; s >>= 1) {
      if (g < s && g + s < G) red[t] += red[t + s * P];
      __syncthreads();
    }
    if (g == 0 && p < hw) {
      float v = red[pl];
      if (relu && v < 0.f) v = 0.f;  // clamp_min(0): NaN stays NaN
      low[b * hw + p] = v;
    }
    __syncthreads();  // red is reused by the next image
  }
}

// Phase 2. grid = (nbx, min(B, 65535)), block = kMapThreads; each thread loops over the pixels
// i = blockIdx.x * kMapThreads + threadIdx.x + j * nbx * kMapThreads of its image.
template <typename idx_t, bool kNormalize>
__global__ void __launch_bounds__(kMapThreads)
    cam_upsample_kernel(const float* __restrict__ low, float* __restrict__ out,
                        float* __restrict__ part_lo, float* __restrict__ part_hi, int64_t B,
                        int h, int w, idx_t H, idx_t W, float scale_h, float scale_w) {
  __shared__ float scratch[64];
  const idx_t HW = H * W;
  const idx_t stride = static_cast<idx_t>(gridDim.x) * kMapThreads;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const float* src = low + b * static_cast<int64_t>(h) * w;
    float* dst = out + b * static_cast<int64_t>(HW);
    float lo = INFINITY;
    float hi = -INFINITY;
    for (idx_t i = static_cast<idx_t>(blockIdx.x) * kMapThreads + threadIdx.x; i < HW;
         i += stride) {
      const idx_t y = i / W;
      const idx_t x = i - y * W;
      // Source positions as ATen's upsample_bilinear2d_out_frame (align_corners=False).
      float sy = scale_h * (static_cast<float>(y) + 0.5f) - 0.5f;
      if (sy < 0.f) sy = 0.f;
      const int y0 = static_cast<int>(sy);
      const int y1 = y0 + ((y0 < h - 1) ? 1 : 0);
      const float ly1 = sy - static_cast<float>(y0);
      float sx = scale_w * (static_cast<float>(x) + 0.5f) - 0.5f;
      if (sx < 0.f) sx = 0.f;
      const int x0 = static_cast<int>(sx);
      const int x1 = x0 + ((x0 < w - 1) ? 1 : 0);
      const float lx1 = sx - static_cast<float>(x0);
      const float* r0 = src + static_cast<int64_t>(y0) * w;
      const float* r1 = src + static_cast<int64_t>(y1) * w;
      // Lerp form a + t * (b - a), as the reference: a constant map stays exactly constant.
      const float top = r0[x0] + lx1 * (r0[x1] - r0[x0]);
      const float bottom = r1[x0] + lx1 * (r1[x1] - r1[x0]);
      const float v = top + ly1 * (bottom - top);
      dst[i] = v;
      if (kNormalize) {
        lo = nan_min(lo, v);
        hi = nan_max(hi, v);
      }
    }
    if (kNormalize) {
      block_min_max<kMapThreads>(lo, hi, scratch);
      if (threadIdx.x == 0) {
        part_lo[b * gridDim.x + blockIdx.x] = lo;
        part_hi[b * gridDim.x + blockIdx.x] = hi;
      }
      __syncthreads();  // scratch is reused by the next image
    }
  }
}

// Phase 3. Same grid and pixel assignment as phase 2 (so each block rescales pixels it wrote
// itself); every block first folds the nparts partial min/max of its image.
template <typename idx_t>
__global__ void __launch_bounds__(kMapThreads)
    cam_normalize_kernel(float* __restrict__ out, const float* __restrict__ part_lo,
                         const float* __restrict__ part_hi, int64_t B, idx_t HW, int nparts) {
  __shared__ float scratch[64];
  __shared__ float s_lo;
  __shared__ float s_hi;
  const idx_t stride = static_cast<idx_t>(gridDim.x) * kMapThreads;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float lo = INFINITY;
    float hi = -INFINITY;
    for (int j = threadIdx.x; j < nparts; j += kMapThreads) {
      lo = nan_min(lo, part_lo[b * nparts + j]);
      hi = nan_max(hi, part_hi[b * nparts + j]);
    }
    block_min_max<kMapThreads>(lo, hi, scratch);
    if (threadIdx.x == 0) {
      s_lo = lo;
      s_hi = hi;
    }
    __syncthreads();
    lo = s_lo;
    const float span = s_hi - lo;
    float* dst = out + b * static_cast<int64_t>(HW);
    for (idx_t i = static_cast<idx_t>(blockIdx.x) * kMapThreads + threadIdx.x; i < HW;
         i += stride) {
      dst[i] = span > 0.f ? (dst[i] - lo) / span : 0.f;
    }
    __syncthreads();  // scratch, s_lo and s_hi are reused by the next image
  }
}

template <typename idx_t>
void launch_map_phases(const at::Tensor& low, at::Tensor& out, int64_t B, int64_t h, int64_t w,
                       int64_t H, int64_t W, bool normalize, cudaStream_t stream) {
  const int64_t HW = H * W;
  const int64_t per_block = static_cast<int64_t>(kMapThreads) * kMapPixelsPerThread;
  const int64_t nbx =
      std::max<int64_t>(1, std::min(kMaxMapBlocks, (HW + per_block - 1) / per_block));
  const dim3 grid(static_cast<unsigned>(nbx), static_cast<unsigned>(std::min(B, kMaxGridY)));
  // PyTorch computes the scale on the host as float(in) / out.
  const float scale_h = static_cast<float>(h) / static_cast<float>(H);
  const float scale_w = static_cast<float>(w) / static_cast<float>(W);
  const float* low_ptr = low.data_ptr<float>();
  float* out_ptr = out.data_ptr<float>();
  if (!normalize) {
    cam_upsample_kernel<idx_t, false><<<grid, kMapThreads, 0, stream>>>(
        low_ptr, out_ptr, nullptr, nullptr, B, static_cast<int>(h), static_cast<int>(w),
        static_cast<idx_t>(H), static_cast<idx_t>(W), scale_h, scale_w);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  at::Tensor parts = at::empty({2, B, nbx}, out.options());
  float* part_lo = parts.data_ptr<float>();
  float* part_hi = part_lo + B * nbx;
  cam_upsample_kernel<idx_t, true><<<grid, kMapThreads, 0, stream>>>(
      low_ptr, out_ptr, part_lo, part_hi, B, static_cast<int>(h), static_cast<int>(w),
      static_cast<idx_t>(H), static_cast<idx_t>(W), scale_h, scale_w);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  cam_normalize_kernel<idx_t><<<grid, kMapThreads, 0, stream>>>(
      out_ptr, part_lo, part_hi, B, static_cast<idx_t>(HW), static_cast<int>(nbx));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor cam_fuse_cuda(const at::Tensor& activations, const at::Tensor& weights,
                         c10::IntArrayRef size, bool relu, bool normalize) {
  check_cam_fuse(activations, weights, size);
  const c10::cuda::CUDAGuard device_guard(activations.device());

  const int64_t B = activations.size(0);
  const int64_t K = activations.size(1);
  const int64_t h = activations.size(2);
  const int64_t w = activations.size(3);
  const int64_t H = size[0];
  const int64_t W = size[1];
  at::Tensor out = at::empty({B, H, W}, activations.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  TORCH_CHECK(h <= std::numeric_limits<int>::max() && w <= std::numeric_limits<int>::max(),
              "xai_serve::cam_fuse: activation map too large: ", activations.sizes());

  const at::Tensor act = activations.contiguous();
  const at::Tensor wts = weights.contiguous();
  const int64_t hw = h * w;
  at::Tensor low = at::empty({B, hw}, out.options());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // Phase 1: low-resolution map.
  const int P = static_cast<int>(std::min<int64_t>(hw, kLowresTile));
  const int G = kLowresThreads / P;
  const dim3 grid1(static_cast<unsigned>((hw + P - 1) / P),
                   static_cast<unsigned>(std::min(B, kMaxGridY)));
  const bool elementwise = wts.dim() == 4;
  XAI_SERVE_DISPATCH_FLOATS(act.scalar_type(), "cam_fuse_cuda", [&] {
    if (elementwise) {
      cam_lowres_kernel<scalar_t, true><<<grid1, kLowresThreads, 0, stream>>>(
          act.data_ptr<scalar_t>(), wts.data_ptr<scalar_t>(), low.data_ptr<float>(), B, K, hw, P,
          G, relu);
    } else {
      cam_lowres_kernel<scalar_t, false><<<grid1, kLowresThreads, 0, stream>>>(
          act.data_ptr<scalar_t>(), wts.data_ptr<scalar_t>(), low.data_ptr<float>(), B, K, hw, P,
          G, relu);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  // Phases 2 and 3: upsample (+ normalise). 32-bit pixel indices unless a map is huge.
  const int64_t HW = H * W;
  const int64_t max_stride = kMaxMapBlocks * kMapThreads;
  if (HW + max_stride <= static_cast<int64_t>(std::numeric_limits<int32_t>::max())) {
    launch_map_phases<int32_t>(low, out, B, h, w, H, W, normalize, stream);
  } else {
    launch_map_phases<int64_t>(low, out, B, h, w, H, W, normalize, stream);
  }
  return out;
}

}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CUDA, m) { m.impl("cam_fuse", &xai_serve::cam_fuse_cuda); }
