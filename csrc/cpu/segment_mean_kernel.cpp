// segment_mean on the CPU: per (image, channel) task, one pass over the pixels accumulating
// float32 sums and pixel counts per segment.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "xai_serve.h"

namespace xai_serve {
namespace {

template <typename scalar_t, typename index_t>
void segment_mean_impl(const at::Tensor& images, const at::Tensor& segments, int64_t S,
                       at::Tensor& out) {
  const int64_t C = images.size(1), HW = images.size(2) * images.size(3);
  const scalar_t* img = images.const_data_ptr<scalar_t>();
  const index_t* seg = segments.const_data_ptr<index_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  at::parallel_for(0, images.size(0) * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(S), counts(S);
    for (int64_t bc = begin; bc < end; ++bc) {
      std::fill(sums.begin(), sums.end(), 0.f);
      std::fill(counts.begin(), counts.end(), 0.f);
      const scalar_t* src = img + bc * HW;
      const index_t* sb = seg + (bc / C) * HW;
      // Superpixels are spatially coherent: sum each run of equal ids in a register and flush
      // it once, instead of a read-modify-write of the same bin for every pixel.
      int64_t p = 0;
      while (p < HW) {
        const index_t id = sb[p];
        float run_sum = 0.f;
        int64_t q = p;
        for (; q < HW && sb[q] == id; ++q) run_sum += static_cast<float>(src[q]);
        const int64_t s = static_cast<int64_t>(id);
        if (s >= 0 && s < S) {  // out-of-range ids are only reachable with check_segments=false
          sums[s] += run_sum;
          counts[s] += static_cast<float>(q - p);
        }
        p = q;
      }
      for (int64_t s = 0; s < S; ++s) {
        dst[bc * S + s] = static_cast<scalar_t>(counts[s] > 0.f ? sums[s] / counts[s] : 0.f);
      }
    }
  });
}

at::Tensor segment_mean_cpu(const at::Tensor& images, const at::Tensor& segments,
                            int64_t num_segments, bool check_segments) {
  check_segment_mean(images, segments, num_segments);
  if (check_segments) check_segment_range(segments, num_segments, "segment_mean");
  at::Tensor out = at::empty({images.size(0), images.size(1), num_segments}, images.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor img = images.contiguous();
  const at::Tensor seg = segments.contiguous();
  XAI_SERVE_DISPATCH_FLOATS(img.scalar_type(), "segment_mean_cpu", [&] {
    if (seg.scalar_type() == at::kInt) {
      segment_mean_impl<scalar_t, int32_t>(img, seg, num_segments, out);
    } else {
      segment_mean_impl<scalar_t, int64_t>(img, seg, num_segments, out);
    }
  });
  return out;
}

}  // namespace
}  // namespace xai_serve

TORCH_LIBRARY_IMPL(xai_serve, CPU, m) { m.impl("segment_mean", &xai_serve::segment_mean_cpu); }
