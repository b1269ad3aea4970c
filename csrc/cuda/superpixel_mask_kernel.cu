// CUDA kernel for xai_serve::superpixel_mask (see reference.py:superpixel_mask_reference).
//
// The op is a pure write stream: B * N * C * H * W outputs from a B * C * H * W image. One launch,
// grid = (pixel vectors of all images / kThreads, coalition chunks), block = kThreads.
// A thread owns V consecutive pixels p..p+V-1 of image b (16-byte vectors: V = 4 for float,
// 8 for half/bfloat16; V = 1 when sizes or pointers do not allow vectors) and a chunk of up to
// kMaxChunk coalitions n0..n0+nc-1:
//   * it loads the V segment ids once and turns keep[b, n, seg] into one bit per coalition;
//   * per channel it loads the V image values and the V baseline values once, normalises both
//     (if mean/std were given) and rounds them to the output dtype: every output of this pixel
//     and channel is one of these two values;
//   * for each coalition it selects per pixel by the keep bit and stores one vector at
//     out[((b * N + n) * C + c) * HW + p] (16-byte streaming stores; a warp writes 512
//     contiguous bytes per store).
// With channels_last output (kNHWC) the unit a thread owns is V consecutive values of an image's
// [HW, C] run instead of V pixels of one channel plane: value e is channel e % C of pixel e / C,
// images and an image baseline are read channels_last too, and the stores for coalition n go to
// out[(b * N + n) * HW * C + e] -- the same 512 contiguous bytes per warp and store. Neighbouring
// values of one pixel share its segment id and keep bits. (With C = 1 both layouts are the same
// memory and the NCHW kernel runs.)
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cuda/vector_io.cuh"
#include "xai_serve.h"

// float32, float16 and bfloat16 only (the checks reject the rest; no dead float64 kernels).

namespace xai_serve {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxChunk = 32;      // coalitions per thread at most (one bit each in a uint32)
constexpr int kMinChunk = 8;       // ... and at least this many when N allows
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

using cuda_io::aligned_to;
using cuda_io::load_pack;
using cuda_io::Pack;

template <typename scalar_t, typename index_t, int V, bool kNHWC>
__global__ void __launch_bounds__(kThreads)
    superpixel_mask_kernel(const scalar_t* __restrict__ images,
                           const index_t* __restrict__ segments,
                           const uint8_t* __restrict__ keep,
                           const scalar_t* __restrict__ baseline,
                           const float* __restrict__ mean, const float* __restrict__ stdev,
                           scalar_t* __restrict__ out, int64_t B, int64_t N, int64_t C,
                           int64_t HW, int64_t S, int chunk, BaselineMode mode, float fill) {
  // A "row" is the run of values a thread takes its V from: one channel plane (HW values) of an
  // image, or with channels_last the whole image (HW * C values, channel fastest).
  const int64_t row = kNHWC ? HW * C : HW;
  const int64_t rows_per_image = kNHWC ? 1 : C;
  const int64_t row_v = row / V;  // V divides the row (checked on the host when V > 1)
  const int64_t total = B * row_v;
  const int64_t n_stride = C * HW;  // out distance between coalitions n and n + 1
  const bool normalize = mean != nullptr;

  for (int64_t gv = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; gv < total;
       gv += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t b = gv / row_v;
    const int64_t e = (gv - b * row_v) * V;  // first value of this thread in its row

    // Segment ids as int32 offsets (S <= INT32_MAX is checked on the host); -1 marks a bad id,
    // which is never kept and never used to index anything. With channels_last, ch[j] is the
    // channel of value j, and a value continuing its pixel reuses the pixel's id.
    int32_t sid[V];
    int32_t ch[V];
    if constexpr (kNHWC) {
      int64_t p = e / C;
      int64_t c = e - p * C;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j == 0 || c == 0) {
          const int64_t id = static_cast<int64_t>(segments[b * HW + p]);
          sid[j] = (id >= 0 && id < S) ? static_cast<int32_t>(id) : -1;
        } else {
          sid[j] = sid[j - 1];
        }
        ch[j] = static_cast<int32_t>(c);
        if (++c == C) {
          c = 0;
          ++p;
        }
      }
    } else {
      const Pack<index_t, V> ids = load_pack<index_t, V>(segments + b * HW + e);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t id = static_cast<int64_t>(ids.val[j]);
        sid[j] = (id >= 0 && id < S) ? static_cast<int32_t>(id) : -1;
        ch[j] = 0;  // unused: the channel is the plane's
      }
    }

    for (int64_t n0 = static_cast<int64_t>(blockIdx.y) * chunk; n0 < N;
         n0 += static_cast<int64_t>(gridDim.y) * chunk) {
      const int nc = static_cast<int>(N - n0 < chunk ? N - n0 : chunk);

      // bits[j] bit i: pixel j is kept under coalition n0 + i. Neighbouring pixels mostly share
      // a segment, so a pixel with its left neighbour's id reuses that neighbour's bits.
      uint32_t bits[V];
      const uint8_t* krow = keep + (b * N + n0) * S;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        if (j > 0 && sid[j] == sid[j - 1]) {
          bits[j] = bits[j - 1];
        } else if (sid[j] < 0) {
          bits[j] = 0u;
        } else {
          const uint8_t* kr = krow + sid[j];
          uint32_t m = 0u;
#pragma unroll 8
          for (int i = 0; i < nc; ++i) {
            m |= static_cast<uint32_t>(kr[static_cast<int64_t>(i) * S] != 0) << i;
          }
          bits[j] = m;
        }
      }

      for (int64_t r = 0; r < rows_per_image; ++r) {
        const int64_t plane = (b * rows_per_image + r) * row;
        const Pack<scalar_t, V> img = load_pack<scalar_t, V>(images + plane + e);
        float base[V];
        if (mode == BaselineMode::kImage) {
          const Pack<scalar_t, V> bl = load_pack<scalar_t, V>(baseline + plane + e);
#pragma unroll
          for (int j = 0; j < V; ++j) base[j] = static_cast<float>(bl.val[j]);
        } else if (mode == BaselineMode::kPerSegment) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int64_t c = kNHWC ? ch[j] : r;
            base[j] = sid[j] >= 0 ? static_cast<float>(baseline[(b * C + c) * S + sid[j]]) : fill;
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) base[j] = fill;
        }

        // The two candidate outputs of each pixel, already in the output dtype.
        Pack<scalar_t, V> kept_val;
        Pack<scalar_t, V> drop_val;
        if (normalize) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const int64_t c = kNHWC ? ch[j] : r;
            const float m = mean[c];
            const float sd = stdev[c];
            kept_val.val[j] = static_cast<scalar_t>((static_cast<float>(img.val[j]) - m) / sd);
            drop_val.val[j] = static_cast<scalar_t>((base[j] - m) / sd);
          }
        } else {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            kept_val.val[j] = img.val[j];
            drop_val.val[j] = static_cast<scalar_t>(base[j]);
          }
        }

        scalar_t* o = out + ((b * N + n0) * rows_per_image + r) * row + e;
        if constexpr (V == 1) {
#pragma unroll 4
          for (int i = 0; i < nc; ++i) {
            o[static_cast<int64_t>(i) * n_stride] =
                ((bits[0] >> i) & 1u) ? kept_val.val[0] : drop_val.val[0];
          }
        } else {
          // Select on 32-bit words: each word holds kPerWord pixels of kLaneBits bits.
          static_assert(sizeof(Pack<scalar_t, V>) == 16, "vector path stores 16 bytes");
          constexpr int kPerWord = V / 4;
          constexpr int kLaneBits = 32 / kPerWord;
          constexpr uint32_t kLaneMask = kPerWord == 1 ? 0xFFFFFFFFu : 0xFFFFu;
          uint32_t kw[4];
          uint32_t dw[4];
          memcpy(kw, &kept_val, sizeof(kw));
          memcpy(dw, &drop_val, sizeof(dw));
#pragma unroll 4
          for (int i = 0; i < nc; ++i) {
            uint32_t ow[4];
#pragma unroll
            for (int w = 0; w < 4; ++w) {
              uint32_t m = 0u;
#pragma unroll
              for (int k = 0; k < kPerWord; ++k) {
                m |= ((0u - ((bits[w * kPerWord + k] >> i) & 1u)) & kLaneMask) << (k * kLaneBits);
              }
              ow[w] = (kw[w] & m) | (dw[w] & ~m);
            }
            // Streaming store: the output is never re-read here, so keep it from evicting the
            // images and the keep table from L2.
            __stcs(reinterpret_cast<uint4*>(o + static_cast<int64_t>(i) * n_stride),
                   make_uint4(ow[0], ow[1], ow[2], ow[3]));
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename index_t, int V, bool kNHWC>
void launch_superpixel_mask(const at::Tensor& images, const at::Tensor& segments,
                            const at::Tensor& keep, const scalar_t* baseline, const float* mean,
                            const float* stdev, at::Tensor& out, int64_t N, int64_t S,
                            BaselineMode mode, float fill, cudaStream_t stream) {
  const int64_t B = images.size(0);
  const int64_t C = images.size(1);
  const int64_t HW = images.size(2) * images.size(3);
  const int64_t vectors = B * ((kNHWC ? HW * C : HW) / V);
  const int64_t blocks_x = std::min<int64_t>((vectors + kThreads - 1) / kThreads, kMaxGridX);
  const auto kernel = superpixel_mask_kernel<scalar_t, index_t, V, kNHWC>;

  // Coalitions per thread ("chunk"). Blocks run in waves of `resident` blocks, and a block's
  // time grows with its chunk, so pick the chunk in [min(N, 8), min(N, kMaxChunk)] that keeps
  // the most block slots busy: useful work N * blocks_x over waves * resident * chunk slots,
  // discounted by chunk / (chunk + 0.5) for the per-chunk loads. Ties go to the larger chunk.
  int blocks_per_sm = 0;
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_sm, kernel, kThreads, 0));
  const int64_t resident =
      static_cast<int64_t>(std::max(blocks_per_sm, 1)) *
      at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t chunk_lo = std::min<int64_t>(N, kMinChunk);
  const int64_t chunk_hi = std::min<int64_t>(N, kMaxChunk);
  int64_t chunk = chunk_hi;
  double best = -1.0;
  for (int64_t ch = chunk_hi; ch >= chunk_lo; --ch) {
    const int64_t blocks = blocks_x * std::min<int64_t>((N + ch - 1) / ch, kMaxGridY);
    const int64_t waves = (blocks + resident - 1) / resident;
    const double score = static_cast<double>(N) * static_cast<double>(blocks_x) /
                         (static_cast<double>(waves) * static_cast<double>(resident) *
                          static_cast<double>(ch)) *
                         (static_cast<double>(ch) / (static_cast<double>(ch) + 0.5));
    if (score > best * (1.0 + 1e-9)) {
      best = score;
      chunk = ch;
    }
  }
  const dim3 grid(static_cast<unsigned>(blocks_x),
                  static_cast<unsigned>(std::min<int64_t>((N + chunk - 1) / chunk, kMaxGridY)));
  kernel<<<grid, kThreads, 0, stream>>>(
      images.data_ptr<scalar_t>(), segments.data_ptr<index_t>(),
      static_cast<const uint8_t*>(keep.data_ptr()), baseline, mean, stdev,
      out.data_ptr<scalar_t>(), B, N, C, HW, S, static_cast<int>(chunk), mode, fill);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename index_t, bool kNHWC>
void dispatch_vector_width(const at::Tensor& images, const at::Tensor& segments,
                           const at::Tensor& keep, const at::Tensor& baseline, const float* mean,
                           const float* stdev, at::Tensor& out, int64_t N, int64_t S,
                           BaselineMode mode, float fill, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(scalar_t);
  const int64_t row = images.size(2) * images.size(3) * (kNHWC ? images.size(1) : 1);
  const scalar_t* base = baseline.defined() ? baseline.data_ptr<scalar_t>() : nullptr;
  // Channels_last reads segment ids one pixel at a time, so their alignment does not matter.
  const bool vec = row % V == 0 && aligned_to(images.data_ptr(), 16) &&
                   aligned_to(out.data_ptr(), 16) &&
                   (kNHWC || aligned_to(segments.data_ptr(), sizeof(index_t) * V)) &&
                   (mode != BaselineMode::kImage || aligned_to(base, 16));
  if (vec) {
    launch_superpixel_mask<scalar_t, index_t, V, kNHWC>(images, segments, keep, base, mean, stdev,
                                                        out, N, S, mode, fill, stream);
  } else {
    launch_superpixel_mask<scalar_t, index_t, 1, kNHWC>(images, segments, keep, base, mean, stdev,
                                                        out, N, S, mode, fill, stream);
  }
}

template <typename scalar_t, typename index_t>
void dispatch_layout(bool nhwc, const at::Tensor& images, const at::Tensor& segments,
                     const at::Tensor& keep, const at::Tensor& baseline, const float* mean,
                     const float* stdev, at::Tensor& out, int64_t N, int64_t S, BaselineMode mode,
                     float fill, cudaStream_t stream) {
  if (nhwc) {
    dispatch_vector_width<scalar_t, index_t, true>(images, segments, keep, baseline, mean, stdev,
                                                   out, N, S, mode, fill, stream);
  } else {
    dispatch_vector_width<scalar_t, index_t, false>(images, segments, keep, baseline, mean, stdev,
                                                    out, N, S, mode, fill, stream);
  }
}

}  // namespace

// (`std_dev` rather than `std` so that the parameter does not hide namespace std.)
at::Tensor superpixel_mask_cuda(const at::Tensor& images, const at::Tensor& segments,
                                const at::Tensor& keep, const std::optional<at::Tensor>& baseline,
                                double fill, const std::optional<at::Tensor>& mean,
                                const std::optional<at::Tensor>& std_dev, bool check_segments,
                                bool channels_last) {
  const BaselineMode mode = check_superpixel_mask(images, segments, keep, baseline, mean, std_dev);
  const c10::cuda::CUDAGuard device_guard(images.device());

  const int64_t B = images.size(0);
  const int64_t C = images.size(1);
  const int64_t H = images.size(2);
  const int64_t W = images.size(3);
  const int64_t N = keep.size(1);
  const int64_t S = keep.size(2);
  if (check_segments) check_segment_range(segments, S, "superpixel_mask");
  TORCH_CHECK(S <= std::numeric_limits<int32_t>::max(),
              "xai_serve::superpixel_mask: too many segments for the CUDA kernel: S = ", S);

  const auto format =
      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({B * N, C, H, W}, images.options().memory_format(format));
  if (out.numel() == 0) return out;

  // The image and an image baseline are read in the output's layout (no copy when they are
  // already in it). With one channel both layouts are the same memory: the NCHW kernel runs.
  const bool nhwc = channels_last && C > 1;
  const at::Tensor img = images.contiguous(format);
  const at::Tensor seg = segments.contiguous();
  const at::Tensor kp = keep.contiguous();
  const at::Tensor base = mode == BaselineMode::kConstant ? at::Tensor()
                          : mode == BaselineMode::kImage  ? baseline->contiguous(format)
                                                          : baseline->contiguous();
  at::Tensor mean_c;
  at::Tensor std_c;
  if (mean.has_value()) {
    mean_c = mean->contiguous();
    std_c = std_dev->contiguous();
  }
  const float* mean_ptr = mean_c.defined() ? mean_c.data_ptr<float>() : nullptr;
  const float* std_ptr = std_c.defined() ? std_c.data_ptr<float>() : nullptr;
  const float fill_f = static_cast<float>(fill);  // the reference's float32 full()
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  XAI_SERVE_DISPATCH_FLOATS(img.scalar_type(), "superpixel_mask_cuda", [&] {
    if (seg.scalar_type() == at::kInt) {
      dispatch_layout<scalar_t, int32_t>(nhwc, img, seg, kp, base, mean_ptr, std_ptr, out, N, S,
                                         mode, fill_f, stream);
    } else {
      dispatch_layout<scalar_t, int64_t>(nhwc, img, seg, kp, base, mean_ptr, std_ptr, out, N, S,
                                         mode, fill_f, stream);
    }
  });
  return out;
}

}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CUDA, m) {
  m.impl("superpixel_mask", &xai_serve::superpixel_mask_cuda);
}
