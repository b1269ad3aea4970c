// superpixel_mask on the CPU: N perturbed copies of every image, one write pass.
//
// Per image the kept value and the baseline value of every pixel are prepared once (normalised
// and rounded to the output dtype when mean/std are given; a per-segment colour or a constant
// expanded to an image). Each (image, coalition) task then builds its pixel mask from the
// segment ids and writes every channel as a branch-free bitwise select of two cache-resident
// rows, so the output -- N times larger than anything read -- is written exactly once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "xai_serve.h"

namespace xai_serve {
namespace {

// dst[p] = mask[p] ? a[p] : b[p] on raw bits (the values are already in the output dtype).
template <typename bits_t>
void select_row(bits_t* __restrict dst, const bits_t* __restrict a, const bits_t* __restrict b,
                const uint8_t* __restrict mask, int64_t n) {
  for (int64_t p = 0; p < n; ++p) {
    const bits_t m = static_cast<bits_t>(0) - static_cast<bits_t>(mask[p]);
    dst[p] = (a[p] & m) | (b[p] & ~m);
  }
}

template <typename scalar_t>
scalar_t normalised(float v, int64_t c, const float* mean, const float* std) {
  return static_cast<scalar_t>(mean ? (v - mean[c]) / std[c] : v);
}

template <typename scalar_t, typename index_t>
void superpixel_mask_impl(const at::Tensor& images, const at::Tensor& segments,
                          const at::Tensor& keep, const std::optional<at::Tensor>& baseline,
                          BaselineMode mode, double fill, const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& std, at::Tensor& out) {
  using bits_t = std::conditional_t<sizeof(scalar_t) == 4, uint32_t, uint16_t>;
  static_assert(sizeof(bits_t) == sizeof(scalar_t), "unsupported element size");
  const int64_t B = images.size(0), C = images.size(1);
  const int64_t HW = images.size(2) * images.size(3);
  const int64_t N = keep.size(1), S = keep.size(2);

  const scalar_t* img = images.const_data_ptr<scalar_t>();
  const index_t* seg = segments.const_data_ptr<index_t>();
  const uint8_t* kp = static_cast<const uint8_t*>(keep.const_data_ptr());
  const float* mu = mean ? mean->const_data_ptr<float>() : nullptr;
  const float* sd = std ? std->const_data_ptr<float>() : nullptr;
  const scalar_t* base = baseline ? baseline->const_data_ptr<scalar_t>() : nullptr;

  // Kept values: the image itself, or its normalised copy.
  const scalar_t* kept = img;
  std::vector<scalar_t> kept_buf;
  if (mu) {
    kept_buf.resize(B * C * HW);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t c = bc % C;
        for (int64_t p = 0; p < HW; ++p) {
          kept_buf[bc * HW + p] = normalised<scalar_t>(static_cast<float>(img[bc * HW + p]), c, mu, sd);
        }
      }
    });
    kept = kept_buf.data();
  }
  // Dropped values, always as a full [B, C, HW] image in the output dtype.
  const scalar_t* dropped = base;
  std::vector<scalar_t> drop_buf;
  if (mode != BaselineMode::kImage || mu) {
    drop_buf.resize(B * C * HW);
    at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bc = begin; bc < end; ++bc) {
        const int64_t b = bc / C, c = bc % C;
        for (int64_t p = 0; p < HW; ++p) {
          float v = static_cast<float>(fill);
          if (mode == BaselineMode::kImage) {
            v = static_cast<float>(base[bc * HW + p]);
          } else if (mode == BaselineMode::kPerSegment) {
            const int64_t s = static_cast<int64_t>(seg[b * HW + p]);
            v = (s >= 0 && s < S) ? static_cast<float>(base[bc * S + s]) : static_cast<float>(fill);
          }
          drop_buf[bc * HW + p] = normalised<scalar_t>(v, c, mu, sd);
        }
      }
    });
    dropped = drop_buf.data();
  }

  bits_t* dst = reinterpret_cast<bits_t*>(out.data_ptr<scalar_t>());
  const bits_t* kept_bits = reinterpret_cast<const bits_t*>(kept);
  const bits_t* drop_bits = reinterpret_cast<const bits_t*>(dropped);
  // Grain: one (image, coalition) pair writes C*HW elements, enough work per task.
  at::parallel_for(0, B * N, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> mask(HW);
    for (int64_t bn = begin; bn < end; ++bn) {
      const int64_t b = bn / N;
      const uint8_t* row = kp + bn * S;
      const index_t* sb = seg + b * HW;
      for (int64_t p = 0; p < HW; ++p) {
        const int64_t s = static_cast<int64_t>(sb[p]);
        mask[p] = (s >= 0 && s < S && row[s] != 0) ? 1 : 0;
      }
      for (int64_t c = 0; c < C; ++c) {
        select_row<bits_t>(dst + (bn * C + c) * HW, kept_bits + (b * C + c) * HW,
                           drop_bits + (b * C + c) * HW, mask.data(), HW);
      }
    }
  });
}

at::Tensor superpixel_mask_cpu(const at::Tensor& images, const at::Tensor& segments,
                               const at::Tensor& keep, const std::optional<at::Tensor>& baseline,
                               double fill, const std::optional<at::Tensor>& mean,
                               const std::optional<at::Tensor>& std, bool check_segments) {
  const BaselineMode mode = check_superpixel_mask(images, segments, keep, baseline, mean, std);
  const int64_t B = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3);
  const int64_t N = keep.size(1), S = keep.size(2);
  if (check_segments) check_segment_range(segments, S, "superpixel_mask");
  at::Tensor out = at::empty({B * N, C, H, W}, images.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;

  const at::Tensor img = images.contiguous();
  const at::Tensor seg = segments.contiguous();
  const at::Tensor kp = keep.contiguous();
  std::optional<at::Tensor> base, mu, sd;
  if (baseline) base = baseline->contiguous();
  if (mean) mu = mean->contiguous();
  if (std) sd = std->contiguous();
  XAI_SERVE_DISPATCH_FLOATS(img.scalar_type(), "superpixel_mask_cpu", [&] {
    if (seg.scalar_type() == at::kInt) {
      superpixel_mask_impl<scalar_t, int32_t>(img, seg, kp, base, mode, fill, mu, sd, out);
    } else {
      superpixel_mask_impl<scalar_t, int64_t>(img, seg, kp, base, mode, fill, mu, sd, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CPU, m) {
  m.impl("superpixel_mask", &xai_serve::superpixel_mask_cpu);
}
