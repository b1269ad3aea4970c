// CUDA kernels for xai_serve::segment_mean (see reference.py:segment_mean_reference).
//
// Two launches (after zeroing an fp32 workspace of B * C * S sums and B * S counts):
//   1. segment_sum_kernel: grid = (blocks per image, min(B, 65535)), block = kThreads. A block
//      owns a contiguous range of pixel groups of one image; a thread takes groups of V
//      consecutive pixels (16-byte loads when possible), adds up runs of equal segment ids in
//      registers (neighbouring pixels mostly share a segment) and issues one atomic per run:
//      into per-block shared-memory tables (C * S sums + S counts) when they fit in 48 KiB,
//      flushed to the workspace once per block; else straight into the workspace. Pixel counts
//      are taken once per pixel, not per channel.
//   2. segment_mean_finalize_kernel: out[b, c, s] = count ? sum / count : 0 in the image dtype.
// Ids outside [0, S) are skipped, so unchecked bad ids can never cause an out-of-bounds write.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cuda/vector_io.cuh"
#include "xai_serve.h"

// float32, float16 and bfloat16 only (the checks reject the rest; no dead float64 kernels).

namespace xai_serve {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSharedBytes = 48 * 1024;  // no opt-in needed up to here
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();

using cuda_io::aligned_to;
using cuda_io::load_pack;
using cuda_io::Pack;

// Pass 1. sums: [B, C, S] fp32, counts: [B, S] uint32, both zeroed. With kShared the block
// accumulates into dynamic shared memory laid out as [C * S] float sums then [S] uint32 counts.
// `vec`: HW % V == 0 and the image and segment pointers allow V-wide loads.
template <typename scalar_t, typename index_t, int V, bool kShared>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const scalar_t* __restrict__ images, const index_t* __restrict__ segments,
                       float* __restrict__ sums, unsigned int* __restrict__ counts, int64_t B,
                       int64_t C, int64_t HW, int64_t S, int64_t groups_per_block, bool vec) {
  extern __shared__ float smem[];
  float* s_sum = smem;
  unsigned int* s_cnt = reinterpret_cast<unsigned int*>(smem + (kShared ? C * S : 0));

  const int64_t ngroups = (HW + V - 1) / V;
  const int64_t g_begin = static_cast<int64_t>(blockIdx.x) * groups_per_block;
  const int64_t g_end = g_begin + groups_per_block < ngroups ? g_begin + groups_per_block : ngroups;

  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    float* sum_b = kShared ? s_sum : sums + b * C * S;
    unsigned int* cnt_b = kShared ? s_cnt : counts + b * S;
    if (kShared) {
      for (int64_t i = threadIdx.x; i < C * S; i += kThreads) s_sum[i] = 0.f;
      for (int64_t i = threadIdx.x; i < S; i += kThreads) s_cnt[i] = 0u;
      __syncthreads();
    }

    const index_t* seg_b = segments + b * HW;
    for (int64_t g = g_begin + threadIdx.x; g < g_end; g += kThreads) {
      const int64_t p = g * V;
      int64_t sid[V];
      if (vec) {
        const Pack<index_t, V> ids = load_pack<index_t, V>(seg_b + p);
#pragma unroll
        for (int j = 0; j < V; ++j) sid[j] = static_cast<int64_t>(ids.val[j]);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) sid[j] = p + j < HW ? static_cast<int64_t>(seg_b[p + j]) : -1;
      }

      // Pixel counts: one atomic per run of equal ids.
      {
        int64_t cur = sid[0];
        unsigned int run = 1u;
#pragma unroll
        for (int j = 1; j < V; ++j) {
          if (sid[j] == cur) {
            ++run;
          } else {
            if (cur >= 0 && cur < S) atomicAdd(cnt_b + cur, run);
            cur = sid[j];
            run = 1u;
          }
        }
        if (cur >= 0 && cur < S) atomicAdd(cnt_b + cur, run);
      }

      for (int64_t c = 0; c < C; ++c) {
        const scalar_t* src = images + (b * C + c) * HW + p;
        float x[V];
        if (vec) {
          const Pack<scalar_t, V> pk = load_pack<scalar_t, V>(src);
#pragma unroll
          for (int j = 0; j < V; ++j) x[j] = static_cast<float>(pk.val[j]);
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) x[j] = p + j < HW ? static_cast<float>(src[j]) : 0.f;
        }
        float* dst = sum_b + c * S;
        int64_t cur = sid[0];
        float acc = x[0];
#pragma unroll
        for (int j = 1; j < V; ++j) {
          if (sid[j] == cur) {
            acc += x[j];
          } else {
            if (cur >= 0 && cur < S) atomicAdd(dst + cur, acc);
            cur = sid[j];
            acc = x[j];
          }
        }
        if (cur >= 0 && cur < S) atomicAdd(dst + cur, acc);
      }
    }

    if (kShared) {
      __syncthreads();
      for (int64_t s = threadIdx.x; s < S; s += kThreads) {
        const unsigned int n = s_cnt[s];
        if (n == 0u) continue;  // then every channel's sum is 0 as well
        atomicAdd(counts + b * S + s, n);
        for (int64_t c = 0; c < C; ++c) atomicAdd(sums + (b * C + c) * S + s, s_sum[c * S + s]);
      }
      __syncthreads();  // the tables are cleared for the next image
    }
  }
}

// Pass 2. One thread per output element (grid-stride).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    segment_mean_finalize_kernel(const float* __restrict__ sums,
                                 const unsigned int* __restrict__ counts,
                                 scalar_t* __restrict__ out, int64_t total, int64_t C, int64_t S) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = i / (C * S);
    const int64_t s = i - (i / S) * S;
    const unsigned int n = counts[b * S + s];
    out[i] = static_cast<scalar_t>(n > 0u ? sums[i] / static_cast<float>(n) : 0.f);
  }
}

template <typename scalar_t, typename index_t>
void launch_segment_sum(const at::Tensor& images, const at::Tensor& segments, float* sums,
                        unsigned int* counts, int64_t S, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t B = images.size(0);
  const int64_t C = images.size(1);
  const int64_t HW = images.size(2) * images.size(3);
  const bool vec = HW % V == 0 && aligned_to(images.data_ptr(), 16) &&
                   aligned_to(segments.data_ptr(), sizeof(index_t) * V);

  // Blocks per image: enough blocks in all for about two per SM, but at least one group per
  // thread per block, and at most 8 (so small images do not get many nearly empty blocks).
  const int64_t ngroups = (HW + V - 1) / V;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want_blocks = 2 * sms;
  int64_t groups_per_block = (ngroups * B + want_blocks - 1) / want_blocks;
  groups_per_block = std::max<int64_t>(kThreads, std::min<int64_t>(groups_per_block, 8 * kThreads));
  const int64_t shared_bytes = (C * S + S) * static_cast<int64_t>(sizeof(float));
  const bool use_shared = shared_bytes <= kSharedBytes;
  if (use_shared) {
    // Clearing and flushing the tables should not cost more than the pixels themselves.
    groups_per_block = std::max<int64_t>(groups_per_block, (C * S + S + V - 1) / V);
  }
  groups_per_block = std::min<int64_t>(groups_per_block, ngroups);
  const int64_t blocks_x = std::min<int64_t>((ngroups + groups_per_block - 1) / groups_per_block,
                                             kMaxGridX);
  // blocks_x * groups_per_block >= ngroups unless capped; grow the blocks then.
  if (blocks_x * groups_per_block < ngroups) groups_per_block = (ngroups + blocks_x - 1) / blocks_x;
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(std::min(B, kMaxGridY)));

  const scalar_t* img = images.data_ptr<scalar_t>();
  const index_t* seg = segments.data_ptr<index_t>();
  if (use_shared) {
    segment_sum_kernel<scalar_t, index_t, V, true>
        <<<grid, kThreads, static_cast<size_t>(shared_bytes), stream>>>(
            img, seg, sums, counts, B, C, HW, S, groups_per_block, vec);
  } else {
    segment_sum_kernel<scalar_t, index_t, V, false><<<grid, kThreads, 0, stream>>>(
        img, seg, sums, counts, B, C, HW, S, groups_per_block, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor segment_mean_cuda(const at::Tensor& images, const at::Tensor& segments,
                             int64_t num_segments, bool check_segments) {
  check_segment_mean(images, segments, num_segments);
  const c10::cuda::CUDAGuard device_guard(images.device());
  const int64_t S = num_segments;
  if (check_segments) check_segment_range(segments, S, "segment_mean");

  const int64_t B = images.size(0);
  const int64_t C = images.size(1);
  const int64_t HW = images.size(2) * images.size(3);
  at::Tensor out = at::empty({B, C, S}, images.options());
  if (out.numel() == 0) return out;
  if (HW == 0) return out.zero_();  // no pixels: every mean is 0

  const at::Tensor img = images.contiguous();
  const at::Tensor seg = segments.contiguous();
  // One zeroed workspace: B * C * S fp32 sums, then B * S uint32 counts (all-zero bits are 0 in
  // both types).
  at::Tensor workspace = at::zeros({B * C * S + B * S}, img.options().dtype(at::kFloat));
  float* sums = workspace.data_ptr<float>();
  unsigned int* counts = reinterpret_cast<unsigned int*>(sums + B * C * S);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  XAI_SERVE_DISPATCH_FLOATS(img.scalar_type(), "segment_mean_cuda", [&] {
    if (seg.scalar_type() == at::kInt) {
      launch_segment_sum<scalar_t, int32_t>(img, seg, sums, counts, S, stream);
    } else {
      launch_segment_sum<scalar_t, int64_t>(img, seg, sums, counts, S, stream);
    }
    const int64_t total = B * C * S;
    const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxGridX);
    segment_mean_finalize_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        sums, counts, out.data_ptr<scalar_t>(), total, C, S);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CUDA, m) {
  m.impl("segment_mean", &xai_serve::segment_mean_cuda);
}
